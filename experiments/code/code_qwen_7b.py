"""Code-Qwen-7B by continued pretraining of Qwen-7B on text + code (report §4; spec §7.1).

Reproduces: continued pretraining from the base Qwen-7B (not the chat model: the report's
"-Chat" there is a typo, spec §10.9) on a mix of text and code, ~90B tokens at context 8192
with flash attention, AdamW (0.9, 0.95, 1e-8), peak LR 3.0e-5 reached after 3% of the steps,
then constant (no decay). Weight decay 0.1 and clip 1.0 are pretraining's (the report names
none). Batch (ours; the report gives none): pretraining's 4M tokens as 512 x 8192, so
90e9 / (512 x 8192) = 21,458 steps, 644 of them warmup.

Hardware: TPU v5p-256 (128 chips), mesh fsdp=128, full remat, Pallas flash attention.
Expected: 21,458 steps x 4.2M tokens = 90B tokens; ~4.9e10 FLOPs/token at 8192, about 2.2 days
at 40% MFU. Training loss on the code share falls quickly in the first few thousand steps
(the base model has seen little code) and keeps falling slowly; text loss stays near the base's.
Metric: held-out loss on the validation split of the mixture; then HumanEval / MBPP pass@1
(`qwen-jax eval run --benchmarks humaneval,mbpp`; report Table 10: 40.2 / 41.8 for 7B).

Commands:
  qwen-jax compile --config=experiments/code/code_qwen_7b.py          # HBM/FLOPs on v5p-256
  qwen-jax train --config=experiments/code/code_qwen_7b.py --workdir=gs://BUCKET/code_qwen_7b \
      --config.init_from=gs://BUCKET/qwen_7b/export --config.data.data_dir=gs://BUCKET/corpora
  qwen-jax train --config=experiments/code/code_qwen_7b.py:runlocal --workdir=/tmp/code_qwen
      # CPU, about a minute: from the demo model (runs/demo/export, `make demo`)
Data: code_pretrain_v1 (qwen_jax/data/mixtures.py: 4 code documents to 1 text document) reads
data_dir/pretrain/{code,text}/{train*,validation*} (.jsonl "text", .txt or TFRecord); point
data.data_dir at your corpora. init_from must be set: its default is the placeholder
gs://BUCKET/qwen_7b/export, which fails with "no such directory" before anything is written
(a continued pretraining run from random weights would be silently wrong).
"""

from qwen_jax.train import recipes
from qwen_jax.train.config import TrainConfig


def get_config(arg: str | None = None):
    words = recipes.config_words(arg, ("runlocal",))
    c = TrainConfig.defaults()
    recipes.base_model(c, "qwen_7b")
    recipes.long_context(c, recipes.CODE_SEQ_LEN)
    c.init_from = "gs://BUCKET/qwen_7b/export"
    c.data.mixture = c.data.eval_mixture = "code_pretrain_v1"
    c.data.global_batch = recipes.CODE_PRETRAIN_BATCH
    steps = round(
        recipes.CODE_PRETRAIN_TOKENS / (recipes.CODE_PRETRAIN_BATCH * recipes.CODE_SEQ_LEN)
    )
    recipes.constant_after_warmup(c, peak_lr=3.0e-5, total_steps=steps)
    c.run.log_every, c.run.eval_every, c.run.checkpoint_every = 50, 1000, 1000
    c.tpu.topology = recipes.CODE_PRETRAIN_TOPOLOGY["qwen_7b"]
    if "runlocal" in words:
        recipes.variant_runlocal(
            c, "demo_code_pretrain_v1", init_from=f"{recipes.DEMO_DIR}/export", steps=60
        )
        # 128-token rows (the synthetic functions are short) at half the step's cost.
        c.data.seq_len, c.optim.peak_lr = 128, 2e-3
    return c
