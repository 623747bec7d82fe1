"""Code-Qwen and Math-Qwen experiment files (issue 17) against the spec's numbers, and their bad
input: the hyperparameters of every variant file are checked against a table typed here from
the spec (§7.1, §7.2; §5.1 for "the general SFT settings"), so the files cannot drift from the
report; the SFT variants' mixtures mask system and user inputs (read through the real pipeline
from the standard corpus layout); a missing init_from, or an export with another vocabulary or
architecture, fails with one InitFromError before anything is written; a mixture naming an
unregistered task fails with one MixtureError line."""

from __future__ import annotations

import dataclasses
import json
import sysconfig
from pathlib import Path

import pytest

from qwen_jax.checkpoint import save_params
from qwen_jax.data import mixtures, tasks
from qwen_jax.data.pipeline import get_iterator, resolve
from qwen_jax.model.factory import create_model
from qwen_jax.testing.experiments import REPO
from qwen_jax.tokenizer import load_tokenizer, train_sentencepiece
from qwen_jax.train import init_from
from qwen_jax.train.config import TrainConfig, load_experiment
from qwen_jax.train.loop import model_vocab_size, train
from qwen_jax.train.optim import learning_rate

ADAMW = (0.9, 0.95, 1e-8)  # spec §7.1 (both variants), §5.1 (the general SFT settings)


@dataclasses.dataclass(frozen=True)
class Spec:
    peak_lr: float
    init: str  # what init_from starts from: "base" Qwen, or "code" (Code-Qwen)
    sft: bool  # chat SFT: loss masked on system and user inputs
    seq_len: int | None = None  # None: the spec gives none
    warmup_fraction: float | None = None  # of the steps
    warmup_steps: int | None = None
    steps: int | None = None
    tokens: float | None = None  # steps x batch x seq_len
    warmup_shape: str = "linear"  # §7.1: Code-Qwen-Chat's warmup is cosine


# Typed from the spec, not from the files. §7.1: Code-Qwen: continued pretraining from the base,
# ~90B tokens, context 8192, LR 3.0e-5 (7B) / 6.0e-5 (14B), 3% warmup, no decay. Code-Qwen-Chat:
# LR 1.0e-5 (7B) / 2.0e-6 (14B), warmup over 3% of the steps, then constant. §7.2: Math-Qwen-Chat:
# SFT from the base, sequence 1024, loss masked on system and user, peak LR 2e-5, 50,000 steps,
# otherwise the general SFT settings (§5.1: warmup over the first 1430 steps, no decay named).
SPEC = {
    "code/code_qwen_7b": Spec(3.0e-5, "base", False, 8192, 0.03, tokens=90e9),
    "code/code_qwen_14b": Spec(6.0e-5, "base", False, 8192, 0.03, tokens=90e9),
    "code/code_qwen_7b_chat": Spec(
        1.0e-5, "code", True, warmup_fraction=0.03, warmup_shape="cosine"
    ),
    "code/code_qwen_14b_chat": Spec(
        2.0e-6, "code", True, warmup_fraction=0.03, warmup_shape="cosine"
    ),
    "math/math_qwen_7b_chat": Spec(2e-5, "base", True, 1024, warmup_steps=1430, steps=50_000),
    "math/math_qwen_14b_chat": Spec(2e-5, "base", True, 1024, warmup_steps=1430, steps=50_000),
}
# The chat files' stages (`:stage1`, the default, and `:stage2`) each follow the recipe.
ARGS = {
    name: [None, "stage2"] if name.endswith("_chat") and "code" in name else [None] for name in SPEC
}
CASES = [(name, arg) for name in SPEC for arg in ARGS[name]]


def _config(name: str, arg: str | None = None) -> TrainConfig:
    return TrainConfig.from_config_dict(load_experiment(REPO / f"experiments/{name}.py", arg))


def test_the_table_covers_every_variant_file():
    files = {
        f"{p.parent.name}/{p.stem}"
        for d in ("code", "math")
        for p in (REPO / "experiments" / d).glob("*.py")
    }
    assert files == set(SPEC)


@pytest.mark.parametrize("name,arg", CASES, ids=lambda x: str(x))
def test_variant_hyperparameters_match_the_spec(name, arg):
    spec, cfg = SPEC[name], _config(name, arg)
    o, steps = cfg.optim, cfg.run.steps
    assert o.peak_lr == spec.peak_lr
    assert (o.b1, o.b2, o.eps) == ADAMW
    assert o.total_steps == steps
    assert o.warmup_shape == spec.warmup_shape
    # The schedule as the trainer computes it: warmup (linear or half-cosine) to the peak, then
    # flat (no decay).
    lr = learning_rate(o)
    assert float(lr(o.warmup_steps)) == pytest.approx(spec.peak_lr, rel=1e-6)
    for s in (steps // 2, steps - 1, steps):
        assert float(lr(s)) == pytest.approx(spec.peak_lr, rel=1e-6), s
    assert float(lr(o.warmup_steps // 2)) < spec.peak_lr
    if spec.warmup_fraction is not None:  # 3% of the steps, to the nearest step
        assert abs(o.warmup_steps - spec.warmup_fraction * steps) <= 0.5, (o.warmup_steps, steps)
    if spec.warmup_steps is not None:
        assert o.warmup_steps == spec.warmup_steps
    if spec.steps is not None:
        assert steps == spec.steps
    if spec.tokens is not None:  # ~90B tokens: within one step's tokens
        per_step = cfg.data.global_batch * cfg.data.seq_len
        assert abs(steps * per_step - spec.tokens) <= per_step / 2, steps * per_step
    if spec.seq_len is not None:
        assert cfg.data.seq_len == spec.seq_len
    if cfg.data.seq_len >= 8192:  # spec §7.1: Flash Attention at 8192
        assert cfg.model_config().attention_impl == "pallas"
    # Masking: SFT files train only on sft tasks (loss weights from the ChatML mask; the
    # pipeline test below reads them); continued pretraining learns every token (lm).
    kinds = {tasks.task_kind(t) for t in resolve(cfg.data.mixture)[0]}
    assert kinds == ({"sft"} if spec.sft else {"lm"}), kinds
    assert cfg.objective.name == "lm"
    # init_from names the right kind of model (a placeholder to be overridden, never "").
    preset = cfg.model_preset
    size = preset.removeprefix("qwen_")
    assert preset in ("qwen_7b", "qwen_14b") and size in name
    want = f"/qwen_{size}/" if spec.init == "base" else f"/code_qwen_{size}"
    assert want in cfg.init_from, cfg.init_from
    assert cfg.tpu.topology


def test_code_chat_stages_differ_in_data_and_start():
    one, two = _config("code/code_qwen_7b_chat"), _config("code/code_qwen_7b_chat", "stage2")
    assert one == _config("code/code_qwen_7b_chat", "stage1")
    assert one.data.mixture != two.data.mixture
    assert "stage1" in two.init_from and "stage1" not in one.init_from
    with pytest.raises(ValueError, match="unknown experiment argument 'stage3'"):
        _config("code/code_qwen_7b_chat", "stage3")


@pytest.mark.parametrize("name", SPEC)
def test_runlocal_keeps_the_recipe_shape(name):
    full, local = _config(name), _config(name, "runlocal")
    assert local.model_config().num_params() < 10_000_000
    assert local.optim.schedule == full.optim.schedule == "constant"
    assert local.optim.warmup_shape == full.optim.warmup_shape
    assert local.model_config().attention_impl == "xla"  # the flash kernel is interpreted on CPU
    assert {tasks.task_kind(t) for t in resolve(local.data.mixture)[0]} == {
        tasks.task_kind(t) for t in resolve(full.data.mixture)[0]
    }
    assert local.init_from.startswith("runs/demo/")


# ------------------------------------------------------------------ assets for the bad input


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A small SentencePiece vocab (trained on stdlib files) and a data dir in the standard
    SFT layout with one math, code and chat conversation each."""
    root = tmp_path_factory.mktemp("variants")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [stdlib / f for f in ("json/decoder.py", "textwrap.py", "string.py", "shlex.py")]
    spm = train_sentencepiece(texts, root / "tok", 512, max_chars=200_000)
    convo = {
        "math": (
            "Natalia sold 48 clips in April. How many?",
            "She sold 48 clips. The answer is 48",
        ),
        "code": ("Write add(a, b).", "def add(a, b):\n    return a + b"),
        "chat": ("Say hello to the reader.", "Hello there, dear reader!"),
    }
    for domain, (question, answer) in convo.items():
        rec = {
            "messages": [
                {"role": "system", "content": "You are a careful tutor."},
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
        }
        for split in ("train", "validation"):
            out = root / "data" / "sft" / domain / f"{split}.jsonl"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(rec) + "\n")
    return root, spm, convo


@pytest.mark.parametrize(
    "name", ["math/math_qwen_7b_chat", "code/code_qwen_7b_chat", "code/code_qwen_14b_chat:stage2"]
)
def test_sft_mixture_learns_only_the_answers(assets, name):
    """The full-size mixture, read from the standard layout under data_dir: weighted targets
    are the assistant's reply (and ChatML's structural tokens); system and user are not."""
    root, spm, convo = assets
    path, _, arg = name.partition(":")
    cfg = _config(path, arg or None)
    tok = load_tokenizer(str(spm))
    it = get_iterator(
        cfg.data.mixture,
        split="validation",
        sequence_length=256,
        batch_size=1,
        seed=0,
        data_dir=str(root / "data"),
        vocab=str(spm),
        num_epochs=1,
    )
    seen = set()
    try:
        for batch in it:
            targets, weights = batch["decoder_target_tokens"][0], batch["decoder_loss_weights"][0]
            learned = tok.decode([int(t) for t, w in zip(targets, weights, strict=True) if w > 0])
            masked = tok.decode([int(t) for t, w in zip(targets, weights, strict=True) if w == 0])
            for domain, (question, answer) in convo.items():
                if answer in learned:
                    seen.add(domain)
                    assert question not in learned and "careful tutor" not in learned
                    assert question in masked and "careful tutor" in masked
    finally:
        it.close()
    assert seen, "no conversation of the mixture came through"


def _export(root: Path, spm: Path, name: str, **model_changes) -> Path:
    """A randomly initialised export of the runlocal model of code_qwen_7b (the demo model's
    architecture), with `model_changes` applied."""
    c = load_experiment(REPO / "experiments/code/code_qwen_7b.py", "runlocal")
    c.data.tokenizer = str(spm)
    cfg = TrainConfig.from_config_dict(c)
    vocab = model_vocab_size(cfg, load_tokenizer(str(spm)).vocab_size)
    model_cfg = cfg.model_config(vocab).replace(**model_changes)
    return save_params(create_model(model_cfg), root / name, tokenizer_files=[spm])


def _runlocal(name: str, spm: Path, source: str, root: Path) -> TrainConfig:
    c = load_experiment(REPO / f"experiments/{name}.py", "runlocal")
    c.data.tokenizer, c.data.data_dir, c.init_from = str(spm), str(root / "data"), source
    return TrainConfig.from_config_dict(c)


def test_a_matching_export_passes_the_check(assets):
    """The control for the failures below: the same export, unchanged, is accepted."""
    root, spm, _ = assets
    good = _export(root, spm, "good")
    cfg = _runlocal("code/code_qwen_7b_chat", spm, str(good), root)
    tok = load_tokenizer(str(spm))
    source = init_from.find_source(cfg.init_from)
    init_from.check_source(source, cfg.model_config(model_vocab_size(cfg, tok.vocab_size)))
    assert source.kind == "params"


@pytest.mark.parametrize("name", sorted(SPEC))
def test_the_full_size_placeholder_init_from_fails_clearly(name):
    cfg = _config(name)
    with pytest.raises(init_from.InitFromError, match=r"init_from='gs://BUCKET/.*no such dir"):
        init_from.find_source(cfg.init_from)


@pytest.mark.parametrize(
    "name,make,message",
    [
        ("code/code_qwen_7b", None, r"init_from='.*nowhere': no such directory"),
        ("code/code_qwen_7b", {"vocab_size": 1024}, r"vocabulary mismatch: the source has 1024"),
        ("code/code_qwen_7b_chat", {"num_layers": 2}, r"parameter mismatch: .* shape \(2, "),
        ("math/math_qwen_7b_chat", {"ffn_size": 320}, r"parameter mismatch: .* shape .*320"),
    ],
    ids=["missing", "vocabulary", "layers", "ffn"],
)
def test_a_bad_init_from_fails_before_anything_is_written(assets, tmp_path, name, make, message):
    root, spm, _ = assets
    if make is None:
        source = str(tmp_path / "nowhere")
    else:
        source = str(_export(tmp_path, spm, "other", **make))
    cfg = _runlocal(name, spm, source, root)
    with pytest.raises(init_from.InitFromError, match=message):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_mixture_naming_an_unregistered_task_is_one_clear_error():
    with pytest.raises(mixtures.MixtureError) as err:
        mixtures.add_mixture("p1_bad_mix_v1", {"demo_sft_code_v1": 1.0, "no_such_task_v1": 1.0})
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("mixture 'p1_bad_mix_v1' names unregistered task 'no_such_task_v1';")
    assert "demo_sft_code_v1" in msg  # the registered tasks are listed
    with pytest.raises(ValueError, match="unknown task or mixture 'p1_bad_mix_v1'"):
        resolve("p1_bad_mix_v1")  # nothing was registered
    with pytest.raises(mixtures.MixtureError, match="has no positive rate"):
        mixtures.add_mixture("p1_zero_mix_v1", {"demo_sft_code_v1": 0.0})
