"""Qwen-1.8B-Chat by chat SFT (report §3.1; spec §5.1).

Reproduces: supervised finetuning of the pretrained Qwen-1.8B on ChatML conversations,
loss on the assistant turns and the structural tokens only (tokenizer/chatml.py), packed
conversations that never attend across each other, AdamW (0.9, 0.95, 1e-8), sequence 2048,
batch 128, 4000 steps, warmup over 1430 steps to peak 2e-6 (then constant: the report names no
decay), weight decay 0.1, dropout 0.1, clip 1.0.
Hardware: the slice of qwen_jax.train.recipes.TOPOLOGY; mesh fsdp over it, full remat.
Expected: 4000 steps x 128 x 2048 = 1.05B tokens; held-out chat loss falls fastest in the
warmup and flattens after (no public loss curve to match).
Metric: held-out chat loss (eval_loss on the validation split); then the chat evaluations.

Commands:
  qwen-jax compile --config=experiments/sft/qwen_1_8b_chat.py            # HBM/FLOPs on the slice
  qwen-jax train --config=experiments/sft/qwen_1_8b_chat.py --workdir=gs://BUCKET/qwen_1_8b_chat \
      --config.init_from=gs://BUCKET/qwen_1_8b/export \
      --config.data.mixture='gs://BUCKET/sft/train-*.jsonl' \
      --config.data.eval_mixture=gs://BUCKET/sft/validation.jsonl
  qwen-jax train --config=experiments/sft/qwen_1_8b_chat.py:runlocal --workdir=/tmp/sft  # CPU
Data: a registered SFT task or mixture (demo_sft_v1 reads the standard layout under
data.data_dir) or user jsonl files with OpenAI-style "messages" or ShareGPT-style
"conversations" (qwen_jax/data/user_files.py).
"""

from qwen_jax.train import recipes
from qwen_jax.train.config import TrainConfig


def get_config(arg: str | None = None):
    c = TrainConfig.defaults()
    recipes.base_model(c, "qwen_1_8b")
    c.model.dropout = 0.1
    c.data.mixture = c.data.eval_mixture = "demo_sft_v1"
    c.data.global_batch = 128
    recipes.chat_sft_optimizer(c, peak_lr=2e-6)
    c.run.log_every, c.run.eval_every, c.run.checkpoint_every = 10, 200, 500
    if arg == "runlocal":
        recipes.runlocal(c, "demo_sft_v1")
    return c
