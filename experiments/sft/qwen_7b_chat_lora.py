"""Qwen-7B-Chat with LoRA: the official repository's LoRA recipe (spec §5.1, [FT]).

Reproduces: Qwen's finetune/finetune_lora_single_gpu.sh on Qwen-7B: adapters of rank 64,
alpha 16, dropout 0.05 on c_attn, c_proj (attention output and MLP down projection, both named
c_proj in v1), w1 and w2 (every dense projection of every block); the base frozen (optionally
held int8: --config.model.lora_int8_base=True, a Q-LoRA-style memory saving); AdamW (0.9,
0.95), LR 3e-4 with 1% warmup and cosine decay, weight decay 0.1, clip 1.0. The script's batch
(2 x 8 accumulation on one GPU) and 512-token sequences are scaled here to the chat-SFT batch
of 128 x 2048; the optimizer state exists for the adapters only.
Hardware: v5p-8 (4 chips) is plenty for a frozen 7B base; mesh fsdp.
Expected: held-out chat loss within a few hundredths of full SFT's at the same step (LoRA
at r=64 on every projection); adapters 160M parameters, optimizer state for them only.
Metric: held-out chat loss; export merged (HF) or as a PEFT adapter (`qwen-jax export --peft`).

Commands:
  qwen-jax compile --config=experiments/sft/qwen_7b_chat_lora.py
  qwen-jax train --config=experiments/sft/qwen_7b_chat_lora.py --workdir=gs://BUCKET/q7_lora \
      --config.init_from=gs://BUCKET/qwen_7b/export --config.data.mixture='chats/*.jsonl'
  qwen-jax train --config=experiments/sft/qwen_7b_chat_lora.py:runlocal --workdir=/tmp/lora
"""

from qwen_jax.train import recipes
from qwen_jax.train.config import TrainConfig


def get_config(arg: str | None = None):
    c = TrainConfig.defaults()
    recipes.base_model(c, "qwen_7b")
    c.tpu.topology = "v5p-8"
    c.model.lora_rank = 64
    c.model.lora_alpha = 16.0
    c.model.lora_dropout = 0.05
    c.model.lora_targets = ("c_attn", "c_proj", "w1", "w2")
    c.data.mixture = c.data.eval_mixture = "demo_sft_v1"
    c.data.global_batch = 128
    c.optim.peak_lr = 3e-4
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.95, 1e-8
    c.optim.warmup_steps, c.optim.total_steps = 40, 4000
    c.optim.final_lr_fraction = 0.0
    c.optim.weight_decay = 0.1
    c.run.steps = 4000
    c.run.log_every, c.run.eval_every, c.run.checkpoint_every = 10, 200, 500
    if arg == "runlocal":
        recipes.runlocal(c, "demo_sft_v1", peak_lr=3e-3)
        c.model.lora_rank = 8
    return c
