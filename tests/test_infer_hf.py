"""Greedy generation equals transformers `generate` on the same random-weight checkpoint (MHA and
GQA, batched with left padding): same tokens, log-probabilities within 1e-4."""

import numpy as np
import pytest
import torch

from qwen_jax.checkpoint.hf import load_hf
from qwen_jax.infer.engine import Engine
from qwen_jax.testing.hf_reference import make_hf_model

ATOL = 1e-4
NEW = 12
PROMPTS = [[11, 200, 37, 5, 90, 64, 3], [250, 8, 8, 1]]


def _hf_generate(hf, prompts):
    """Left-padded batch through transformers' greedy `generate`; per-row tokens, log-probs."""
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[:, width:].numpy()
    logits = torch.stack(out.logits, dim=1).float()  # [B, NEW, V] raw (unprocessed) logits
    logp = torch.log_softmax(logits, dim=-1).numpy()
    chosen = np.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    return tokens, chosen


@pytest.mark.parametrize(
    "variant", [dict(heads=4, kv_heads=4), dict(heads=4, kv_heads=2, tied=True)], ids=["mha", "gqa"]
)
def test_greedy_generate_matches_transformers(tmp_path, variant):
    hf = make_hf_model(**variant, seed=7)
    hf.save_pretrained(tmp_path / "hf")
    _, model = load_hf(tmp_path / "hf")
    ours = Engine(model).generate(PROMPTS, max_new_tokens=NEW)
    ref_tokens, ref_logp = _hf_generate(hf, PROMPTS)
    for i, res in enumerate(ours):
        assert res.token_ids == ref_tokens[i].tolist()
        np.testing.assert_allclose(res.logprobs, ref_logp[i], atol=ATOL, rtol=0)
