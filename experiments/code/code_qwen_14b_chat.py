"""Code-Qwen-14B-Chat by multi-stage SFT of Code-Qwen-14B (report §4; spec §7.1).

Reproduces: supervised finetuning of Code-Qwen-14B (experiments/code/code_qwen_14b.py) on ChatML
conversations, loss on the assistant turns and the structural tokens only (tokenizer/chatml.py),
AdamW (0.9, 0.95, 1e-8), peak LR 2.0e-6, half-cosine warmup over 3% of each stage's steps, then
constant.
The report says "multi-stage" and publishes neither the stages nor their data; ours, chosen
with `--config=FILE:stage1` (the default) or `:stage2`:
  stage 1  code_sft_v1: code instructions 0.7 + general chat 0.3, 4000 steps, from Code-Qwen;
           broad first, so the model learns the chat format and keeps holding a conversation
  stage 2  code_instruct_sft_v1: code instructions only, 1000 steps, from stage 1's run;
           a short narrow stage at the same LR sharpens the code answers last
Context 8192 (Code-Qwen's; the report gives no SFT length) with flash attention, batch 128,
weight decay 0.1, dropout 0.1, clip 1.0 (the general SFT settings, spec §5.1).

Hardware: the slice of qwen_jax.train.recipes.TOPOLOGY (v5p-64); mesh fsdp, full remat.
Expected: stage 1 4000 x 128 x 8192 = 4.2B tokens, stage 2 1.0B tokens; held-out chat loss of
code answers well below Code-Qwen's in the first few hundred steps, flat after.
Metric: held-out chat loss (eval_loss); HumanEval / MBPP pass@1 (report Table 10: 66.4 / 52.4
for 14B; `qwen-jax eval run --benchmarks humaneval,mbpp`).

Commands:
  qwen-jax compile --config=experiments/code/code_qwen_14b_chat.py     # HBM/FLOPs on the slice
  qwen-jax train --config=experiments/code/code_qwen_14b_chat.py:stage1 \
      --workdir=gs://BUCKET/code_qwen_14b_chat_stage1 --config.init_from=gs://BUCKET/code_qwen_14b \
      --config.data.data_dir=gs://BUCKET/corpora
  qwen-jax train --config=experiments/code/code_qwen_14b_chat.py:stage2 \
      --workdir=gs://BUCKET/code_qwen_14b_chat \
      --config.init_from=gs://BUCKET/code_qwen_14b_chat_stage1 \
      --config.data.data_dir=gs://BUCKET/corpora
  qwen-jax train --config=experiments/code/code_qwen_14b_chat.py:runlocal --workdir=/tmp/code_chat
      # CPU, about a minute: the demo chain's code SFT (stage 2's code data) from the demo
      # Code-Qwen at runs/demo/code_qwen (`qwen-jax reproduce` overrides init_from);
      # `:stage1,runlocal` runs stage 1 on the demo chat + code + math SFT mixture
Data: the SFT layout under data.data_dir: sft/{code,chat}/{train,validation}*.jsonl with
OpenAI-style "messages" (qwen_jax/data/tasks.py); init_from is a training workdir (its latest
checkpoint) or an export; its default is a placeholder that fails before anything is written.
"""

from qwen_jax.train import recipes
from qwen_jax.train.config import TrainConfig

# stage -> (mixture, steps, init_from placeholder: the previous stage's workdir)
STAGES = {
    "stage1": ("code_sft_v1", 4000, "gs://BUCKET/code_qwen_14b"),
    "stage2": ("code_instruct_sft_v1", 1000, "gs://BUCKET/code_qwen_14b_chat_stage1"),
}
LOCAL = {"stage1": "demo_sft_v1", "stage2": "demo_sft_code_v1"}


def get_config(arg: str | None = None):
    words = recipes.config_words(arg, ("stage1", "stage2", "runlocal"))
    if words >= {"stage1", "stage2"}:
        raise ValueError("choose one of :stage1 and :stage2")
    # Plain `:runlocal` is the demo chain's one code SFT stage: stage 2's data.
    stage = "stage1" if "stage1" in words or not words else "stage2"
    mixture, steps, init_from = STAGES[stage]
    c = TrainConfig.defaults()
    recipes.base_model(c, "qwen_14b")
    recipes.long_context(c, recipes.CODE_SEQ_LEN)
    c.init_from = init_from
    c.model.dropout = 0.1
    c.data.mixture = c.data.eval_mixture = mixture
    c.data.global_batch = 128
    recipes.constant_after_warmup(c, peak_lr=2.0e-6, total_steps=steps)
    c.optim.warmup_shape = "cosine"  # spec §7.1: "cosine warmup over 3% then constant"
    c.run.log_every, c.run.eval_every, c.run.checkpoint_every = 10, 200, 500
    if "runlocal" in words:
        recipes.variant_runlocal(c, LOCAL[stage], init_from=recipes.DEMO_CODE_QWEN, steps=60)
    return c
