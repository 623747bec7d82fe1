"""`qwen-jax generate`, `chat` and `eval ppl` on a tiny params export with its own tokenizer:
outputs equal the library API, perplexity equals a direct full-forward computation, and bad input
gives clear errors (exit 2, one line), never a traceback."""

import base64
import io
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax import cli
from qwen_jax.checkpoint import save_params
from qwen_jax.infer import chat, generate_cli, ppl
from qwen_jax.infer.load import load_engine
from qwen_jax.model import config as C
from qwen_jax.model import rope
from qwen_jax.model.factory import create_model
from qwen_jax.tokenizer.chatml import build_prompt

# 256 byte tokens + Qwen's 208 specials = 464 ids: eod 256, im_start 257, im_end 258.
CFG = C.tiny(vocab_size=512, init_std=0.1, seq_length=32, max_position_embeddings=256)
TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity. "
) * 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer_cli")
    vocab = root / "qwen.tiktoken"
    vocab.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    save_params(create_model(CFG, seed=5), root / "export", tokenizer_files=[vocab])
    save_params(
        create_model(CFG.replace(vocab_size=256), seed=5),
        root / "small_vocab",
        tokenizer_files=[vocab],
    )
    save_params(create_model(CFG, seed=5), root / "no_tokenizer")
    (root / "data.txt").write_text(TEXT)
    return root


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load_engine(ckpt / "export")


def _run(main, argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_ids_json_equals_api(ckpt, loaded, capsys):
    engine, _ = loaded
    argv = ["--checkpoint", str(ckpt / "export"), "--prompt-ids", "1,2,3", "--json"]
    code, out, _ = _run(generate_cli.main, [*argv, "--max-new-tokens", "6"], capsys)
    assert code == 0
    got = json.loads(out)
    (ref,) = engine.generate([[1, 2, 3]], max_new_tokens=6)
    assert got["prompt_ids"] == [1, 2, 3] and got["token_ids"] == ref.token_ids
    np.testing.assert_allclose(got["logprobs"], ref.logprobs, atol=1e-6)
    assert got["finish_reason"] == ref.finish_reason
    assert got["text"] is not None  # the export carries its tokenizer


def test_generate_text_streams_and_json_has_text(ckpt, loaded, capsys):
    engine, tok = loaded
    base = ["--checkpoint", str(ckpt / "export"), "--prompt", "It was the", "--max-new-tokens"]
    code, streamed, _ = _run(cli.main, ["generate", *base, "8"], capsys)
    assert code == 0
    code, out, _ = _run(cli.main, ["generate", *base, "8", "--json"], capsys)
    got = json.loads(out)
    assert got["prompt_ids"] == tok.encode("It was the")
    ids = [t for t in got["token_ids"] if t != tok.eod_id]
    assert got["text"] == tok.decode(ids)
    assert streamed == got["text"] + "\n"


@pytest.mark.parametrize(
    "extra,msg",
    [
        (["--prompt", ""], "prompt 0 is empty"),
        (["--prompt-ids", ",".join(["7"] * 300)], "context budget is 256"),
        (["--prompt-ids", "1", "--temperature", "0", "--top-k", "5"], "greedy"),
        (["--prompt-ids", "1", "--top-p", "2", "--temperature", "1"], "top_p"),
        (["--prompt-ids", "1", "--window", "4,4,4"], "the model has 2"),
        (["--prompt-ids", "600"], "outside the model's vocabulary"),
        (["--prompt-ids", "1", "--max-new-tokens", "0"], "max-new-tokens must be >= 1"),
    ],
)
def test_generate_bad_input(ckpt, capsys, extra, msg):
    code, out, err = _run(generate_cli.main, ["--checkpoint", str(ckpt / "export"), *extra], capsys)
    assert code == 2 and msg in err and "Traceback" not in err
    assert err.startswith("qwen-jax generate: error:")


def test_generate_refuses_mismatched_tokenizer_and_missing_checkpoint(ckpt, capsys):
    small = ["--checkpoint", str(ckpt / "small_vocab"), "--prompt", "hi"]
    code, _, err = _run(generate_cli.main, small, capsys)
    assert code == 2 and "has 464 ids but checkpoint" in err and "256 embedding rows" in err
    code, _, err = _run(
        generate_cli.main, ["--checkpoint", str(ckpt / "nope"), "--prompt", "hi"], capsys
    )
    assert code == 2 and "is not a directory" in err


def test_generate_conflicting_sources_are_an_argparse_error(ckpt, capsys):
    with pytest.raises(SystemExit) as e:
        generate_cli.main(["--checkpoint", str(ckpt), "--prompt", "a", "--prompt-ids", "1"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_chat_cli_replies_equal_api_with_history(ckpt, loaded):
    engine, tok = loaded
    args = chat.build_parser().parse_args(
        ["--checkpoint", str(ckpt / "export"), "--temperature", "0", "--repetition-penalty", "1",
         "--top-p", "1", "--max-new-tokens", "6", "--system", "Be brief."]
    )  # fmt: skip
    stdin, stdout = io.StringIO("hello\n\nwhat next\n/exit\nnever read\n"), io.StringIO()
    assert chat.run(args, stdin=stdin, stdout=stdout) == 0
    stops = [tok.im_end_id, tok.im_start_id, tok.eod_id]
    history, expected = [], ""
    for user in ["hello", "what next"]:
        msgs = [*history, {"role": "user", "content": user}]
        ids = build_prompt(tok, msgs, system="Be brief.", max_window_tokens=255)
        (ref,) = engine.generate([ids], max_new_tokens=6, stop_ids=stops, tokenizer=tok)
        expected += ref.text + "\n"
        history += [msgs[-1], {"role": "assistant", "content": ref.text}]
    assert stdout.getvalue() == expected


def test_chat_session_truncates_history_to_the_window(loaded):
    engine, tok = loaded
    session = chat.ChatSession(engine, tok, max_window_tokens=80, max_new_tokens=2)
    for i in range(4):
        session.send(f"question number {i}")
    ids = session.prompt_ids("last")
    assert len(ids) <= 80
    assert tok.decode(ids).count("question number") < 4  # oldest turns were dropped
    assert tok.decode(ids).endswith("last<|im_end|>\n<|im_start|>assistant\n")


def _direct_ppl(model, tokens, length, ntk):
    """exp(mean NLL) with one full forward per window (no cache, no chunks)."""
    wins = np.asarray(tokens).reshape(-1, length)
    alpha = rope.ntk_alpha(jnp.full((len(wins),), length), CFG.seq_length) if ntk else None
    logits, _ = model(jnp.asarray(wins), rope_alpha_b=alpha)
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)[:, :-1]
    gold = np.take_along_axis(logp, wins[:, 1:, None], axis=-1)
    return math.exp(-gold.mean())


def test_perplexity_equals_direct_computation(monkeypatch, loaded):
    engine, tok = loaded
    from qwen_jax.infer.longctx import with_long_context

    model = engine.model()
    tokens = np.asarray(tok.encode(TEXT), np.int64)[:256]
    monkeypatch.setattr(ppl, "MAX_CHUNK", 16)  # 64-token windows in 4 cached chunks
    for ntk in (False, True):
        view = with_long_context(model, ntk=ntk, logn=False)
        got = ppl.perplexity(view, tokens, 64, batch=2)
        assert got == pytest.approx(_direct_ppl(view, tokens, 64, ntk), rel=1e-5)


def test_eval_ppl_cli_prints_the_ladder(ckpt, capsys):
    argv = ["eval", "ppl", "--checkpoint", str(ckpt / "export"), "--data", str(ckpt / "data.txt"),
            "--lengths", "32,64", "--ladder", "--window", "8,0", "--json"]  # fmt: skip
    code, out, err = _run(cli.main, argv, capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(rows) == 8 and all(r["ppl"] > 1 and math.isfinite(r["ppl"]) for r in rows)
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 4 and "+ dynamic ntk + logn + window" in table[-1]
    # below the training length (32) every row is the same model
    at32 = [r["ppl"] for r in rows if r["length"] == 32]
    assert max(at32[:3]) == pytest.approx(min(at32[:3]), rel=1e-6)


def test_eval_ppl_bad_input(ckpt, capsys):
    base = ["--checkpoint", str(ckpt / "export"), "--data", str(ckpt / "data.txt")]
    code, _, err = _run(ppl.main, [*base, "--lengths", "100000"], capsys)
    assert code == 2 and "fewer than the longest length" in err
    code, _, err = _run(ppl.main, [*base, "--ladder", "--ntk"], capsys)
    assert code == 2 and "--ladder sets --ntk/--logn" in err
    code, _, err = _run(ppl.main, [*base[:2], "--data", str(ckpt / "missing.txt")], capsys)
    assert code == 2 and "does not exist" in err


def test_checkpoint_without_tokenizer_takes_ids_only(ckpt, capsys):
    argv = ["--checkpoint", str(ckpt / "no_tokenizer")]
    code, _, err = _run(generate_cli.main, [*argv, "--prompt", "hi"], capsys)
    assert code == 2 and "has no tokenizer: pass --tokenizer, or --prompt-ids" in err
    code, out, _ = _run(
        generate_cli.main, [*argv, "--prompt-ids", "4,5", "--max-new-tokens", "3"], capsys
    )
    assert code == 0 and len(out.strip().split(",")) == 3


def test_eval_model_adapter(loaded):
    from qwen_jax.evals.model_api import EvalModel
    from qwen_jax.infer.eval_model import EngineEvalModel

    engine, tok = loaded
    em = EngineEvalModel(engine, tok, batch_size=2)
    assert isinstance(em, EvalModel)
    prompts = ["It was the", "<|im_start|>user\nhi<|im_end|>\n", "age of"]
    scores = em.next_token_logprobs(prompts, [" ", "a", "t"])
    full = engine.next_token_logprobs([tok.encode(p, allowed_special="all") for p in prompts])
    np.testing.assert_allclose(scores, full[:, [ord(" "), ord("a"), ord("t")]], atol=1e-6)
    texts = em.generate(prompts, max_new_tokens=8, stop=["<|im_end|>"])
    ref = engine.generate(
        [tok.encode(p, allowed_special="all") for p in prompts],
        max_new_tokens=8,
        stop_ids=[tok.eod_id, tok.im_end_id],
        tokenizer=tok,
    )
    assert texts == [r.text for r in ref]
    with pytest.raises(ValueError, match="not one"):
        em.next_token_logprobs(prompts, ["ab"])


def test_long_context_switches_follow_the_checkpoint(ckpt):
    engine, _ = load_engine(ckpt / "export")
    assert (engine.cfg.use_dynamic_ntk, engine.cfg.use_logn_attn, engine.cfg.attn_windows) == (
        True,
        True,
        (),
    )  # as saved (the tiny config inherits Qwen-7B's switches)
    engine, _ = load_engine(ckpt / "export", ntk=False, windows=(8, 0))
    assert (engine.cfg.use_dynamic_ntk, engine.cfg.use_logn_attn, engine.cfg.attn_windows) == (
        False,
        True,
        (8, 0),
    )
