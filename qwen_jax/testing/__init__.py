"""Helpers shared by the tests, the GPU check scripts and the benchmarks (importable, so nothing
puts tests/ on sys.path and no test module imports another).

  tolerance      assert_close (max-norm relative, non-finite fails), assert_grads_close, and the
                 fixed tolerances of design.md §4 and the kernel issue
  configs        tiny configs derived from the real presets (dispatch, serving)
  batches        packed batches (documents per row, positions restarting, padding)
  model_parity   logits + gradients of a model, and "change X, still equals XLA" checks
  generation     engine-level equality (tokens, log-probs) and the decode-dispatch case
  kernel_cases   decode / matmul / flash-attention cases, inputs, float64 references, checks
  hf_reference   transformers Qwen2 on random weights (torch/transformers: the `test` extra)
  demo_assets    the demo corpus + a small SentencePiece vocab (tests/conftest.py's fixture)
  experiments    the checkout's experiment files (load one with train.config.load_experiment)
  compile_cache  a persistent XLA compilation cache for a module that builds one step many times
"""
