"""Tiny Qwen on the embedded demo corpus: the README's main job (`make demo`).

Reproduces: nothing from the report; it exercises the whole pretraining path on CPU (seqio
mixture of stdlib code, docstring prose and synthetic math, a SentencePiece vocab trained on it,
packing, AdamW + warmup/cosine, Orbax checkpoints, export).
Hardware: 2 CPU cores; mesh fsdp over whatever devices exist. Expected time: a few minutes.
Metric: training loss falls well below the corpus unigram entropy (printed by `qwen-jax demo`).

Commands:
  qwen-jax demo --workdir runs/demo          # builds data + tokenizer, trains, exports, samples
  qwen-jax train --config=experiments/pretrain/tiny.py --workdir=runs/tiny \
      --config.data.data_dir=runs/demo/data \
      --config.data.tokenizer=runs/demo/tokenizer/tokenizer.model
  qwen-jax train --config=experiments/pretrain/tiny.py:runlocal ...   # 20 steps, for tests
  # continue from the demo's weights (fresh optimizer) on your own files (.jsonl "text" field,
  # or .txt = one document per file; local or gs://):
  qwen-jax train --config=experiments/pretrain/tiny.py --workdir=runs/tiny-more \
      --config.init_from=runs/demo/export --config.data.mixture='my_corpus/*.jsonl' \
      --config.data.eval_mixture=my_heldout.jsonl \
      --config.data.tokenizer=runs/demo/tokenizer/tokenizer.model
"""

from qwen_jax.train.config import TrainConfig


def get_config(arg: str | None = None):
    c = TrainConfig.defaults()
    c.model.preset = "tiny"  # derived from Qwen-7B's layout (MHA, qkv bias, untied, rope 1e4)
    c.model.hidden_size = 128
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 4
    c.model.head_dim = 32
    c.model.ffn_size = 352  # v1's 8/3 rule at d=128
    c.model.seq_length = 256
    c.model.max_position_embeddings = 1024
    c.data.mixture = "demo_pretrain_v1"
    c.data.eval_mixture = "demo_pretrain_v1"
    c.data.tokenizer = "runs/demo/tokenizer/tokenizer.model"
    c.data.seq_len = 256
    c.data.global_batch = 8
    c.optim.peak_lr = 3e-3
    c.optim.warmup_steps = 30
    c.optim.total_steps = 300
    c.optim.weight_decay = 0.1
    c.run.steps = 300
    c.run.log_every = 20
    c.run.eval_every = 100
    c.run.eval_batches = 4
    c.run.checkpoint_every = 100
    c.run.keep_checkpoints = 2
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    if arg == "runlocal":
        c.model.hidden_size, c.model.num_layers, c.model.ffn_size = 64, 2, 176
        c.model.num_heads = c.model.num_kv_heads = 4
        c.model.head_dim = 16
        c.data.seq_len, c.data.global_batch = 64, 8
        c.optim.warmup_steps, c.optim.total_steps = 5, 20
        c.run.steps, c.run.log_every, c.run.eval_every, c.run.checkpoint_every = 20, 5, 10, 10
    return c
