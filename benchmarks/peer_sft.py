"""The chat-SFT peer: TRL's `SFTTrainer` on transformers' `Qwen2ForCausalLM` (+ PEFT for LoRA),
PyTorch eager on CPU, the bench shape.

Same shape (the "bench" row of qwen_jax/bench_shapes.py, read as a plain file: the peer never
imports qwen_jax), random init, no download. Same workload as `qwen-jax bench --what
sft,sft_lora`: TRAIN_BATCH rows of TRAIN_LEN tokens per step, each row packing conversations of
SFT_CONVERSATION random tokens whose second half is the completion (the loss on it only:
prompt-completion `completion_mask`, `completion_only_loss`), packed by TRL (`packing=True`, its
"bfd" strategy: padding-free, position ids restart per conversation, which transformers turns
into a per-conversation causal mask, so attention never crosses conversations, as ours).
AdamW (0.9, 0.95, 1e-8, weight decay 0.1), clip 1.0, fp32, no gradient checkpointing (TRL's
defaults are bf16 and checkpointing; ours runs neither), threads = CPU cores. LoRA: PEFT's
`LoraConfig` with bench_shapes.LORA (rank, alpha, dropout, the 7 projections), as ours.
Everything else is TRL's default SFT step (its per-step entropy and token-accuracy metrics
included: what a TRL user runs).

Timed: the optimizer steps only (a TrainerCallback between on_step_begin and on_step_end), the
median after 2 warm-up steps. Memory as ours (bench_shapes.PEAK_RSS_METHOD, one process per
workload) and the optimizer-state bytes (every tensor in `trainer.optimizer.state`).

  python -m benchmarks.peer_sft [--what sft,sft_lora] [--steps N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.peer_infer import _TABLE, BENCH_SHAPE, emit, peer_model

TRAIN_BATCH, TRAIN_LEN = _TABLE["TRAIN_BATCH"], _TABLE["TRAIN_LEN"]
SFT_CONVERSATION, LORA = _TABLE["SFT_CONVERSATION"], _TABLE["LORA"]
PEAK_RSS_METHOD = _TABLE["PEAK_RSS_METHOD"]
baseline_rss, reset_peak_rss, peak_rss = (
    _TABLE[k] for k in ("baseline_rss", "reset_peak_rss", "peak_rss")
)
WARMUP = 2


def _dataset(shape: dict, steps: int):
    """Enough conversations for `steps` packed batches: input_ids [SFT_CONVERSATION] each, the
    completion (loss) on the second half."""
    from datasets import Dataset

    n = steps * TRAIN_BATCH * (TRAIN_LEN // SFT_CONVERSATION)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, shape["vocab_size"], size=(n, SFT_CONVERSATION)).tolist()
    half = SFT_CONVERSATION // 2
    return Dataset.from_dict(
        {"input_ids": ids, "completion_mask": [[0] * half + [1] * half] * n},
    )


def _tokenizer():
    """A two-token tokenizer built in memory: TRL wants a processing class (pad / eos ids); the
    data is already token ids, so its vocabulary is never used."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<pad>")),
        pad_token="<pad>",
        eos_token="<eos>",
    )


class _Timer:
    """TrainerCallback (duck-typed; made a subclass in `_callback`): wall time of each optimizer
    step; resets the RSS high-water mark once the warm-up steps are done and reads it after each
    step (`peak`: the high-water mark over the timed steps)."""

    def __init__(self):
        self.times, self._t, self.peak = [], None, 0

    def on_step_begin(self, args, state, control, **kwargs):
        if len(self.times) == WARMUP and self._t is None:
            reset_peak_rss()
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t)
        self.peak = peak_rss()


def _callback():
    from transformers import TrainerCallback

    return type("StepTimer", (_Timer, TrainerCallback), {})()


def peer_sft(shape: dict = BENCH_SHAPE, steps: int = 5, lora: bool = False) -> list[dict]:
    """TRL SFT steps on a bench shape (QwenConfig keywords), full or LoRA: the same rows as
    qwen_jax.train.bench.bench_sft, with "impl": "trl"."""
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    baseline = baseline_rss()
    model = peer_model(shape).train()
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=LORA["rank"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=list(LORA["targets"]),
            bias="none",
            task_type="CAUSAL_LM",
        )
    args = SFTConfig(
        output_dir="/tmp/qwen-jax-peer-sft",  # required; nothing is written (no saving, no logs)
        max_steps=WARMUP + steps,
        per_device_train_batch_size=TRAIN_BATCH,
        gradient_accumulation_steps=1,
        max_length=TRAIN_LEN,
        packing=True,
        completion_only_loss=True,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        weight_decay=0.1,
        max_grad_norm=1.0,
        bf16=False,
        fp16=False,
        activation_checkpointing=False,  # TRL defaults to checkpointing (its old name)
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        eval_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    timer = _callback()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=_dataset(shape, WARMUP + steps),
        processing_class=_tokenizer(),
        peft_config=peft_config,
        callbacks=[timer],
    )
    trainer.remove_callback(PrinterCallback)  # its dict lines would mix with the JSON rows
    trainer.train()
    peak = timer.peak - baseline
    step_s = float(np.median(timer.times[WARMUP:]))
    opt_bytes = sum(
        t.numel() * t.element_size()
        for s in trainer.optimizer.state.values()
        for t in s.values()
        if torch.is_tensor(t)
    )
    trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    name = "sft_lora" if lora else "sft"
    common = dict(impl="trl", batch=TRAIN_BATCH, seq=TRAIN_LEN, packing=True)
    if lora:
        common.update(lora_rank=LORA["rank"], lora_targets=list(LORA["targets"]))
    return [
        emit(
            f"{name}_tokens_per_s",
            TRAIN_BATCH * TRAIN_LEN / step_s,
            "tokens/s",
            step_ms=1000 * step_s,
            trained_params=trained,
            **common,
        ),
        emit(
            f"{name}_opt_state_bytes",
            opt_bytes,
            "bytes",
            method="sum of the tensors in trainer.optimizer.state",
            **common,
        ),
        emit(f"{name}_peak_rss_bytes", peak, "bytes", method=PEAK_RSS_METHOD, **common),
    ]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--what", default="sft,sft_lora", help="sft and/or sft_lora")
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    for what in a.what.split(","):
        if what not in ("sft", "sft_lora"):
            raise SystemExit(f"peer_sft: unknown workload {what!r}; choose from sft, sft_lora")
        peer_sft(BENCH_SHAPE, a.steps, lora=what == "sft_lora")
