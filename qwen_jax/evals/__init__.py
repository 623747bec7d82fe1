"""Evaluation: the report's benchmarks and protocols, answer extraction, sandboxed execution.

Entry points: `qwen-jax eval run|fetch-data` (cli.py), `runner.run(model, benchmarks, ...)`,
`tasks.build_task(name, data_dir, shots=, chat=)`, `sandbox.execute(source, Limits())`.
Models are reached only through the `EvalModel` protocol (model_api.py); the engine's adapter
is `qwen_jax.infer.load_eval_model`.
"""

from qwen_jax.evals.metrics import pass_at_k
from qwen_jax.evals.model_api import EvalModel, chat_prompt
from qwen_jax.evals.runner import run
from qwen_jax.evals.sandbox import ExecResult, Limits, execute, execute_many
from qwen_jax.evals.tasks import BENCHMARKS, Task, build_task

__all__ = [
    "BENCHMARKS",
    "EvalModel",
    "ExecResult",
    "Limits",
    "Task",
    "build_task",
    "chat_prompt",
    "execute",
    "execute_many",
    "pass_at_k",
    "run",
]
