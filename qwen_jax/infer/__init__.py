"""Inference: KV-cache generation, sampling, chat, long context (NTK / LogN / windows), PPL.

  engine, tok = load_engine("runs/demo/export")            # params export or HF directory
  out = engine.generate([tok.encode("Hello")], max_new_tokens=32,
                        sampling=SamplingParams(temperature=0.7, top_p=0.8), tokenizer=tok,
                        stop_ids=[tok.eod_id])
  out[0].text, out[0].token_ids, out[0].logprobs

CLI: `qwen-jax generate`, `qwen-jax chat`, `qwen-jax eval ppl`, `qwen-jax bench --what
prefill,decode`.
"""

from qwen_jax.infer.chat import ChatSession
from qwen_jax.infer.engine import Engine, Generation, GenerationError
from qwen_jax.infer.eval_model import EngineEvalModel, load_eval_model
from qwen_jax.infer.load import TokenizerMismatch, generate_text, load_engine
from qwen_jax.infer.longctx import parse_windows, prefill_alpha, with_long_context
from qwen_jax.infer.ppl import perplexity
from qwen_jax.infer.sampling import SamplingParams

__all__ = [
    "ChatSession",
    "Engine",
    "EngineEvalModel",
    "Generation",
    "GenerationError",
    "SamplingParams",
    "TokenizerMismatch",
    "generate_text",
    "load_engine",
    "load_eval_model",
    "parse_windows",
    "perplexity",
    "prefill_alpha",
    "with_long_context",
]
