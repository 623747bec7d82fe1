"""Tool use: Qwen's ReAct format, the Qwen2.5 `<tool_call>` format, a tool registry, the
sandboxed code interpreter and the agent loop (spec §6; issue 16).

    from qwen_jax.tools import Agent, LocalModel, Registry, add_code_interpreter
    from qwen_jax.tools.interpreter import CodeInterpreter

    registry = Registry()
    registry.register(my_function)                    # schema from the signature
    with CodeInterpreter() as interpreter:
        add_code_interpreter(registry, interpreter)   # the report's single `code_interpreter`
        result = Agent(LocalModel(engine, tokenizer), registry).run("What is 2**100 mod 7?")
    result.final_answer, result.outcome  # "answered" | "step_cap" | "no_action" | "error"

Modules: spec.py (ToolSpec, ToolCall), react.py (the ReAct prompt and parser), hermes.py (the
Qwen2/2.5 format), registry.py (tools, validation, calls that never raise), interpreter.py (the
kernel), agent.py (the loop; LocalModel, ServerModel), cli.py (`qwen-jax agent`). The
evaluations built on them are qwen_jax.evals.ci_math and qwen_jax.evals.tool_select.
Importing this package does not import JAX.
"""

from qwen_jax.tools.agent import Agent, AgentEvent, AgentResult, LocalModel, ServerModel, Step
from qwen_jax.tools.registry import Registry, add_code_interpreter
from qwen_jax.tools.spec import ToolCall, ToolSpec

__all__ = [
    "Agent",
    "AgentEvent",
    "AgentResult",
    "LocalModel",
    "Registry",
    "ServerModel",
    "Step",
    "ToolCall",
    "ToolSpec",
    "add_code_interpreter",
]
