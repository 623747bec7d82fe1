"""Versioned seqio Mixtures with explicit rates.

Rates follow seqio: the probability that the next *example* comes from a task (normalized by
the sum). Token shares follow from the tasks' mean lengths; `BatchIterator.stats()` reports
both. Mean document lengths in the embedded corpus (demo SentencePiece vocab, 4096 pieces):
code ~4000 tokens (whole stdlib files), text ~260, math ~77. The demo rates are set from
those so the token shares come out near text 40% / code 35% / math 25%.
"""

from __future__ import annotations

import seqio

from qwen_jax.data import tasks  # noqa: F401  (registers the tasks the mixtures name)

DEMO_PRETRAIN_RATES = {
    "demo_pretrain_text_v1": 0.32,
    "demo_pretrain_code_v1": 0.02,
    "demo_pretrain_math_v1": 0.66,
}
# Code-Qwen's shape (spec §7.1): continued pretraining on text + code; ~70% code tokens here.
DEMO_CODE_PRETRAIN_RATES = {
    "demo_pretrain_code_v1": 0.10,
    "demo_pretrain_text_v1": 0.54,
    "demo_pretrain_math_v1": 0.36,
}
DEMO_SFT_RATES = {"demo_sft_chat_v1": 0.5, "demo_sft_code_v1": 0.25, "demo_sft_math_v1": 0.25}

seqio.MixtureRegistry.add("demo_pretrain_v1", list(DEMO_PRETRAIN_RATES.items()))
seqio.MixtureRegistry.add("demo_code_pretrain_v1", list(DEMO_CODE_PRETRAIN_RATES.items()))
seqio.MixtureRegistry.add("demo_sft_v1", list(DEMO_SFT_RATES.items()))

# Full-size pretraining (experiments/pretrain/qwen_*.py). The report publishes no proportions
# (spec §4.1); these example rates are ours. The tasks read the standard layout under the run's
# data_dir (e.g. gs://BUCKET/corpora/pretrain/{text,code,math}/...) with Qwen's vocabulary; their
# `demo_` prefix names the layout they share with the embedded corpus, not the data.
QWEN_PRETRAIN_RATES = {
    "demo_pretrain_text_v1": 0.70,
    "demo_pretrain_code_v1": 0.05,
    "demo_pretrain_math_v1": 0.25,
}
seqio.MixtureRegistry.add("qwen_pretrain_v1", list(QWEN_PRETRAIN_RATES.items()))
