"""One GRPO iteration side by side: ours (`build_rl(...).iteration`) against TRL's GRPOTrainer.

  python -m benchmarks.grpo_bench [--shape bench] [--prompts 2] [--group 4]
      [--prompt-tokens 32] [--new-tokens 32] [--sides trl,ours] [--work runs/grpo_bench]
      [--out benchmarks/results/grpo_cpu.json] [--smoke]

--smoke checks that both sides run and the JSON is written, in about a minute: a 2-layer,
d 64 variant of the bench shape (same vocabulary), 1 prompt x group 2, 8 prompt and 4 new
tokens; its figures mean nothing (the JSON says "smoke": true).

An iteration is what each trainer does per optimizer step: sample `group` responses for each of
`prompts` prompts with the current weights (rollout), score them (reward, the policy's old and
the reference's log-probs), and one AdamW update of the policy over all prompts x group rows.
Each side runs one warm-up iteration (compilation, allocations; not measured), then one measured
iteration; the figures are seconds per measured iteration on each side, the ratio TRL / ours
(> 1: ours is faster), and our split between rollout, scoring and update (the metrics
`time_rollout_s`, `time_score_s`, `time_update_s` of RL.iteration). TRL runs first and is
freed before ours is built; both in this one process, one after the other (each gets every
core). Write --out only from a quiet machine: the load average before and after is recorded.

Equal work on both sides:
  * Model: the bench shape (qwen_jax/bench_shapes.py, design.md §5: 8 layers, d 512, untied
    151,936 vocab), fp32 weights and compute, random weights (ours: our initialiser, seed 0;
    TRL: transformers' Qwen2ForCausalLM of the same config, torch seed 0).
  * Tokenizer and prompts: the real Qwen2 tokenizer files (both sides); each prompt is
    --prompt-tokens distinct single-token words (checked: it encodes to exactly that many ids),
    given to TRL as text and to ours as those ids. No chat template on either side.
  * Responses of exactly --new-tokens tokens on both sides, no early stop: TRL
    max_completion_length = min_new_tokens = --new-tokens (generate suppresses EOS until then);
    ours max_new_tokens = --new-tokens with the rollout's stop ids cleared (`RolloutEngine`
    passes them per call, nothing recompiles). Sampling at temperature 1, top-p 1 on both.
  * GRPO: group size = num_generations = --group; one optimizer step per iteration over all
    rows (TRL: per_device_train_batch_size = prompts x group, steps_per_generation 1, one
    gradient-accumulation step; ours: ppo_epochs 1, minibatches 1); KL to a frozen fp32
    reference in the loss, k3, beta = kl_coef = 0.04 (both compute the reference's log-probs);
    AdamW at LR 1e-6; dropout off; no activation recomputation (TRL's gradient checkpointing,
    on by default in TRL 1.x, off: our bench-shape model has no remat). Rewards are constant on
    both sides (TRL: a function returning 1.0; ours: the math rule reward against an answer no
    random response contains, so 0.0): the advantages are then 0, which changes no amount of
    work.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

from qwen_jax.bench_shapes import SHAPES, emit

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")
KL_COEF, LR, SEED = 0.04, 1e-6, 0
# Frequent English words: each " word" is a single Qwen2 token (checked per prompt).
WORDS = (
    "the of and to in is was for that on as with by he at from his it an were are which this "
    "be or had not but first one their its new after who they have her she two been other when "
    "there all during into school time may years more most only over city some world would "
    "where later up such used many can state about national out known university united then "
    "made team film year three also part number being war between these both under age early "
    "since well season family including until series through end while home life under game"
).split()


def qwen2_tokenizer_dir() -> Path:
    """The real Qwen2 tokenizer files, as tests/test_tokenizer_hf_spm.py caches them."""
    from benchmarks.serve_bench import qwen2_tokenizer_dir as find

    return find()


def make_prompts(tok_dir: Path, n: int, length: int) -> tuple[list[str], list[list[int]]]:
    """n distinct prompts of exactly `length` Qwen2 tokens each: (texts, their ids)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    words = [w for w in dict.fromkeys(WORDS) if len(tok.encode(" " + w)) == 1]
    texts, ids = [], []
    for i in range(n):
        picked = [words[(i * 7 + 13 * j) % len(words)] for j in range(length)]
        text = "".join(" " + w for w in picked)
        enc = tok.encode(text)
        if len(enc) != length:
            raise SystemExit(f"prompt {i} encodes to {len(enc)} tokens, not {length}")
        texts.append(text)
        ids.append(enc)
    return texts, ids


# --smoke: the bench shape cut to 2 layers of width 64 (the vocabulary, hence the tokenizer and
# the LM head's share of the work, kept), and the smallest GRPO workload.
SMOKE_SHAPE = dict(
    SHAPES["bench"], hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16,
    ffn_size=128,
)  # fmt: skip
SMOKE_WORKLOAD = {"prompts": 1, "group": 2, "prompt_tokens": 8, "new_tokens": 4}


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- TRL ---------------------------------------------------------------------------------------


def run_trl(shape: dict, args, texts: list[str], tok_dir: Path, work: Path) -> dict:
    """Seconds of TRL's measured iteration (its second optimizer step)."""
    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, TrainerCallback

    torch.manual_seed(SEED)
    config = Qwen2Config(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["ffn_size"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"],
        max_position_embeddings=shape["max_position_embeddings"],
        rope_theta=10_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    # Saved once and given by path: with beta > 0 TRL loads its reference model from the
    # policy's path (a second copy of the same random weights).
    model_dir = work / f"trl-{args.shape}"
    if not (model_dir / "config.json").exists():
        Qwen2ForCausalLM(config).save_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    rows = args.prompts * args.group

    class Timer(TrainerCallback):
        def __init__(self):
            self.starts, self.seconds = [], []

        def on_step_begin(self, a, state, control, **kw):
            self.starts.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            self.seconds.append(time.perf_counter() - self.starts[-1])

    timer = Timer()
    cfg = trl.GRPOConfig(
        output_dir=str(work / "trl"),
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=SEED,
        max_steps=2,
        learning_rate=LR,
        lr_scheduler_type="constant",
        per_device_train_batch_size=rows,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=args.group,
        max_completion_length=args.new_tokens,
        generation_kwargs={"min_new_tokens": args.new_tokens},
        temperature=1.0,
        top_p=1.0,
        beta=KL_COEF,
        disable_dropout=True,
        gradient_checkpointing=False,  # TRL 1.x defaults it on; ours recomputes nothing
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        dataloader_num_workers=0,
        model_init_kwargs={"dtype": torch.float32},
    )
    trainer = trl.GRPOTrainer(
        model=str(model_dir),
        reward_funcs=lambda completions, **kw: [1.0] * len(completions),
        args=cfg,
        train_dataset=datasets.Dataset.from_dict({"prompt": texts}),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    trainer.train()
    lengths = [h.get("completions/mean_length") for h in trainer.state.log_history]
    out = {
        "seconds": timer.seconds[-1],
        "warmup_seconds": timer.seconds[0],
        "mean_completion_length": [x for x in lengths if x is not None],
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "loss_type": cfg.loss_type,
    }  # fmt: skip
    del trainer
    gc.collect()
    return out


# --- ours --------------------------------------------------------------------------------------


def run_ours(shape: dict, args, prompt_ids: list[list[int]], tok_dir: Path, work: Path) -> dict:
    """Seconds of our measured iteration (RL.iteration) and its split."""
    import flax
    import jax
    from flax import nnx

    from qwen_jax.checkpoint.params import is_params_dir, save_params
    from qwen_jax.model.config import PRESETS
    from qwen_jax.model.transformer import Qwen
    from qwen_jax.rl.algo import build_rl
    from qwen_jax.rl.config import RLConfig
    from qwen_jax.sharding import make_mesh
    from qwen_jax.tokenizer import load_tokenizer
    from qwen_jax.train.config import DataConfig, RunConfig, TrainConfig
    from qwen_jax.train.optim import OptimConfig

    overrides = tuple(sorted(shape.items()))
    export = work / f"policy-{args.shape}"
    if not is_params_dir(export):
        model = Qwen(PRESETS["qwen_7b"].replace(**dict(overrides)), rngs=nnx.Rngs(SEED))
        save_params(model, export, tokenizer_files=[tok_dir / f for f in TOKENIZER_FILES])
        del model
    n_prompts = args.prompts
    config = TrainConfig(
        model_preset="qwen_7b",
        model_overrides=overrides,
        data=DataConfig(tokenizer=str(tok_dir)),
        optim=OptimConfig(peak_lr=LR, warmup_steps=0, schedule="constant", total_steps=10),
        run=RunConfig(seed=SEED),
        rl=RLConfig(
            algorithm="grpo",
            reward_fn="math",
            samples_per_prompt=args.group,
            prompts_per_step=n_prompts,
            max_prompt_len=args.prompt_tokens,
            max_new_tokens=args.new_tokens,
            temperature=1.0,
            top_p=1.0,
            kl_coef=KL_COEF,
            kl_estimator="k3",
            kl_in_reward=False,
            normalize_reward=False,
            value_warmup_steps=0,
            ppo_epochs=1,
            minibatches=1,
            reference_dtype="float32",
        ),
        init_from=str(export),
    )
    tokenizer = load_tokenizer(str(tok_dir))
    mesh = make_mesh(config.mesh)
    rl = build_rl(config, tokenizer, mesh)
    rl.rollout.stop_ids = ()  # responses of exactly max_new_tokens (see module docstring)
    records = [{"answer": "987654321"}] * n_prompts
    # XLA compilations per iteration: the measured one must compile nothing.
    compiles = [0]
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: compiles.__setitem__(
            0, compiles[0] + (name == "/jax/core/compile/backend_compile_duration")
        )
    )
    runs = []
    with jax.set_mesh(mesh):
        state = rl.init_state()
        for i in range(2):
            batch = prompt_ids[i * n_prompts : (i + 1) * n_prompts]
            compiles[0] = 0
            t0 = time.perf_counter()
            state, metrics = rl.iteration(state, batch, records)
            jax.block_until_ready(state)
            runs.append((time.perf_counter() - t0, metrics, compiles[0]))
    seconds, metrics, measured_compiles = runs[-1]
    split = {k: metrics[k] for k in ("time_rollout_s", "time_score_s", "time_update_s")}
    out = {
        "seconds": seconds,
        "warmup_seconds": runs[0][0],
        "split_s": split,
        "compiles": {"warmup": runs[0][2], "measured": measured_compiles},
        "response_len": metrics["response_len"],
        "finished_frac": metrics["finished_frac"],
        "versions": {"jax": jax.__version__, "flax": flax.__version__},
    }
    del rl, state
    gc.collect()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="bench", choices=sorted(SHAPES))
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--sides", default="trl,ours")
    p.add_argument("--work", default=str(REPO / "runs" / "grpo_bench"))
    p.add_argument("--out", default="", help="results JSON (only from a quiet machine)")
    p.add_argument("--smoke", action="store_true", help="tiny shape and workload (a check)")
    args = p.parse_args(argv)
    if args.smoke:
        args.shape = "smoke"
        for k, v in SMOKE_WORKLOAD.items():
            setattr(args, k, v)
    if args.group < 2:
        raise SystemExit("--group must be >= 2 (GRPO)")
    sides = [s for s in args.sides.split(",") if s]
    shape = SMOKE_SHAPE if args.smoke else SHAPES[args.shape]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = qwen2_tokenizer_dir()
    # Two iterations (warm-up, measured) of distinct prompts on each side.
    texts, ids = make_prompts(tok_dir, 2 * args.prompts, args.prompt_tokens)
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "load_avg_before": load_avg(),
        "shape": args.shape,
        "smoke": args.smoke,
        "workload": {"prompts": args.prompts, "group": args.group,
                     "rows": args.prompts * args.group, "prompt_tokens": args.prompt_tokens,
                     "new_tokens": args.new_tokens},
    }  # fmt: skip
    results = {}
    if "trl" in sides:
        results["trl"] = run_trl(shape, args, texts, tok_dir, work)
        emit("grpo_iteration_trl", results["trl"]["seconds"], "s", shape=args.shape)
    if "ours" in sides:
        results["ours"] = run_ours(shape, args, ids, tok_dir, work)
        emit("grpo_iteration_ours", results["ours"]["seconds"], "s", shape=args.shape)
        for k, v in results["ours"]["split_s"].items():
            emit(f"grpo_ours_{k}", v, "s", shape=args.shape)
    report.update(results)
    if "trl" in results and "ours" in results:
        ratio = results["trl"]["seconds"] / results["ours"]["seconds"]
        report["ratio_trl_over_ours"] = ratio
        emit("grpo_iteration_ratio_trl_over_ours", ratio, "x", shape=args.shape)
    report["load_avg_after"] = load_avg()
    print(json.dumps(report, indent=2), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
