"""Serving: an OpenAI-compatible HTTP server with continuous batching and tool calls.

  scheduler.py   Scheduler: admits requests into the free slots of a running decode batch,
                 chunked prefill between decode steps, per-request sampling and stops, 429 when
                 the queue is full (GenRequest -> Handle streaming TokenEvents, then Finished)
  templates.py   ChatTemplate per checkpoint: ChatML + Qwen's ReAct tools (v1), or the
                 checkpoint's own Jinja chat template (Qwen1.5/2/2.5) with <tool_call> parsing
  protocol.py    the OpenAI wire format: request validation, error bodies, response pieces
  app.py         create_app: the FastAPI routes (/v1/chat/completions, /v1/completions,
                 /v1/models, /health, /metrics), SSE streaming, disconnects cancel
  metrics.py     Prometheus text of the scheduler's stats
  cli.py         `qwen-jax serve`

Test double: qwen_jax.testing.scripted.ScriptedScheduler (fixed replies, same interface).
"""
