"""Versioned seqio Mixtures with explicit rates.

Rates follow seqio: the probability that the next *example* comes from a task (normalized by
the sum). Token shares follow from the tasks' mean lengths (share_i ~ rate_i x mean_len_i);
`BatchIterator.stats()` reports both. Measured on the embedded corpus (qwen-jax-demo-corpus/3,
the demo's 2048-piece SentencePiece vocab, one epoch of each train split): mean document length
code ~373 tokens (~950 short synthetic modules beside ~50 whole stdlib files), text ~296,
math ~64. So demo_pretrain_v1's token shares are text ~66% / math ~29% / code ~5%, and
demo_code_pretrain_v1's text ~73% / code ~17% / math ~10%. Re-measure after changing the corpus:
`get_iterator(task, ..., num_epochs=1)` to the end, then `stats()["tasks"][task]`.

Every mixture is registered through `add_mixture`, which checks that the tasks it names are
registered: a misspelt or missing task is one `MixtureError` line naming the mixture and the
task (seqio's own check says only "Provider name not registered").
"""

from __future__ import annotations

from collections.abc import Mapping

import seqio

from qwen_jax.data import tasks  # noqa: F401  (registers the tasks the mixtures name)


class MixtureError(ValueError):
    """A mixture names a task (or sub-mixture) that is not registered, or has no positive rate."""


def add_mixture(name: str, rates: Mapping[str, float]) -> seqio.Mixture:
    """Register `name` mixing registered tasks/mixtures at `rates` (per example, normalized)."""
    known = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
    missing = sorted(set(rates) - known)
    if missing:
        tasks_known = sorted(seqio.TaskRegistry.names())
        raise MixtureError(
            f"mixture {name!r} names unregistered task {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f"; registered tasks: {', '.join(tasks_known)}"
        )
    if not any(r > 0 for r in rates.values()):
        raise MixtureError(f"mixture {name!r} has no positive rate: {dict(rates)}")
    return seqio.MixtureRegistry.add(name, list(rates.items()))


DEMO_PRETRAIN_RATES = {
    "demo_pretrain_text_v1": 0.32,
    "demo_pretrain_code_v1": 0.02,
    "demo_pretrain_math_v1": 0.66,
}
# Code-Qwen's shape (spec §7.1): continued pretraining on text + code; 5x the base mixture's
# code rate, ~17% of the tokens (module docstring).
DEMO_CODE_PRETRAIN_RATES = {
    "demo_pretrain_code_v1": 0.10,
    "demo_pretrain_text_v1": 0.54,
    "demo_pretrain_math_v1": 0.36,
}
DEMO_SFT_RATES = {"demo_sft_chat_v1": 0.5, "demo_sft_code_v1": 0.25, "demo_sft_math_v1": 0.25}

add_mixture("demo_pretrain_v1", DEMO_PRETRAIN_RATES)
add_mixture("demo_code_pretrain_v1", DEMO_CODE_PRETRAIN_RATES)
add_mixture("demo_sft_v1", DEMO_SFT_RATES)

# Full-size mixtures. The tasks read the standard layout under the run's data_dir
# (e.g. gs://BUCKET/corpora/{pretrain,sft}/<domain>/{train*,validation*}; tasks.py) with Qwen's
# vocabulary, so users point `data.data_dir` at their own corpora; the `demo_` prefix of the task
# names names the layout they share with the embedded corpus, not the data.

# Pretraining (experiments/pretrain/qwen_*.py). The report publishes no proportions
# (spec §4.1); these example rates are ours.
QWEN_PRETRAIN_RATES = {
    "demo_pretrain_text_v1": 0.70,
    "demo_pretrain_code_v1": 0.05,
    "demo_pretrain_math_v1": 0.25,
}
add_mixture("qwen_pretrain_v1", QWEN_PRETRAIN_RATES)

# Code-Qwen's continued pretraining (experiments/code/code_qwen_{7b,14b}.py; spec §7.1): "a mix
# of text and code", ratio unpublished. Ours: 4 code documents to 1 text document. Code carries
# the new skill, and a fifth of the stream stays general text so the model keeps its language
# ability (catastrophic forgetting of a base model's text ability is the known failure of
# code-only continued pretraining; Code Llama kept ~15% natural language). With source files
# several times longer than web documents, the token share of code is higher still: read the
# pipeline's `stats()` on your corpus and set these rates to the token shares you want.
CODE_PRETRAIN_RATES = {"demo_pretrain_code_v1": 0.8, "demo_pretrain_text_v1": 0.2}
add_mixture("code_pretrain_v1", CODE_PRETRAIN_RATES)

# Code-Qwen-Chat's SFT (experiments/code/code_qwen_{7b,14b}_chat.py; the report's stages are
# unpublished). Stage 1, code_sft_v1: code instructions plus general chat, so the chat model
# still holds a conversation; stage 2, code_instruct_sft_v1: code instructions only.
CODE_SFT_RATES = {"demo_sft_code_v1": 0.7, "demo_sft_chat_v1": 0.3}
add_mixture("code_sft_v1", CODE_SFT_RATES)
add_mixture("code_instruct_sft_v1", {"demo_sft_code_v1": 1.0})

# Math-Qwen-Chat's SFT (experiments/math/math_qwen_{7b,14b}_chat.py; spec §7.2): the report's
# "augmented math instructional dataset" is unpublished; math conversations only.
add_mixture("math_sft_v1", {"demo_sft_math_v1": 1.0})
