"""Math-Qwen-7B-Chat by math SFT of the base Qwen-7B (report §5.1; spec §7.2).

Reproduces: supervised finetuning directly from the base Qwen-7B (not from Qwen-7B-Chat) on math
conversations, sequence 1024, loss masked on the system and user inputs: the SFT tasks' loss
weights (tokenizer/chatml.py, spec §5.1) are 0 on system and user content and on role names,
1 on the assistant's content and the structural <|im_start|>/<|im_end|>/newline tokens. Otherwise
the general SFT settings (recipes.chat_sft_optimizer: AdamW (0.9, 0.95, 1e-8), warmup over 1430
steps, then constant, weight decay 0.1, clip 1.0; batch 128, dropout 0.1) except peak LR 2e-5
and 50,000 steps. The report publishes no data ("augmented math instructional dataset").

Hardware: the slice of qwen_jax.train.recipes.TOPOLOGY (v5p-32); mesh fsdp, full remat.
Expected: 50,000 x 128 x 1024 = 6.6B tokens; held-out loss on worked answers falls fast in the
warmup and slowly after.
Metric: held-out chat loss (eval_loss); GSM8K / MATH greedy accuracy with the report's
extraction (`qwen-jax eval run --benchmarks gsm8k,math`; report Table 12: 62.5 / 17.2 for 7B).

Commands:
  qwen-jax compile --config=experiments/math/math_qwen_7b_chat.py    # HBM/FLOPs on the slice
  qwen-jax train --config=experiments/math/math_qwen_7b_chat.py \
      --workdir=gs://BUCKET/math_qwen_7b_chat --config.init_from=gs://BUCKET/qwen_7b/export \
      --config.data.data_dir=gs://BUCKET/corpora
  qwen-jax train --config=experiments/math/math_qwen_7b_chat.py:runlocal --workdir=/tmp/math_chat
      # CPU, about a minute: from the demo model (runs/demo/export, `make demo`)
Data: math_sft_v1 reads data.data_dir/sft/math/{train,validation}*.jsonl, OpenAI-style
"messages" records (qwen_jax/data/tasks.py); or pass user files as data.mixture. init_from's
default is the placeholder gs://BUCKET/qwen_7b/export, which fails with "no such directory"
before anything is written: set it to the base model's export or workdir.
"""

from qwen_jax.train import recipes
from qwen_jax.train.config import TrainConfig


def get_config(arg: str | None = None):
    words = recipes.config_words(arg, ("runlocal",))
    c = TrainConfig.defaults()
    recipes.base_model(c, "qwen_7b")
    c.data.seq_len = recipes.MATH_SEQ_LEN
    c.init_from = "gs://BUCKET/qwen_7b/export"
    c.model.dropout = 0.1
    c.data.mixture = c.data.eval_mixture = "math_sft_v1"
    c.data.global_batch = 128
    recipes.chat_sft_optimizer(c, peak_lr=2e-5)
    c.optim.total_steps = c.run.steps = 50_000
    c.run.log_every, c.run.eval_every, c.run.checkpoint_every = 50, 1000, 2000
    if "runlocal" in words:
        recipes.variant_runlocal(
            c, "demo_sft_math_v1", init_from=f"{recipes.DEMO_DIR}/export", steps=150
        )
        # Short conversations: 128-token rows halve the step's cost; a tiny model from a
        # 200-step base learns one-step word problems in ~150 steps at a pretraining-like LR.
        c.data.seq_len, c.optim.peak_lr = 128, 3e-3
    return c
