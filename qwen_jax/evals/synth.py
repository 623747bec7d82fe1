"""The held-out synthetic benchmarks of the reproduction chain (spec §7; issue 17).

Their items are the demo corpus's `eval/` files (`qwen-jax data build-demo --out DIR` writes
them; pass `--data-dir DIR`): problems and functions whose keys hash to the held-out split, so
no training text of the demo corpus holds them (qwen_jax/data/synthetic_{math,code}.py).

    synth_math  one-step and multi-step word problems (eval/synth_math.jsonl); the chat protocol
                of GSM8K (spec §9): the question as the user turn through ChatML, greedy, the
                prediction is the last number of the reply (`extract.last_number`, decimal
                rule), equal to the gold within 1e-4. Chat only, whatever `--chat` says: the
                variant it measures is a chat model (Math-Qwen-Chat), and the base is scored
                under the same prompt.
    synth_code  small functions with assert tests (eval/synth_code.jsonl), pass@1 greedy, the
                program run in evals.sandbox. Base protocol (default; what Code-Qwen's
                continued pretraining teaches): HumanEval's, the signature + docstring as the
                prompt, the completion cut by HumanEval's rules, program = prompt + completion +
                tests. Chat protocol (`--chat`; what Code-Qwen-Chat's SFT teaches): the request
                in words as the user turn; the code is the reply's first fenced block (else the
                reply), program = code + tests.
    code_ppl    token-level perplexity of held-out code (eval/code_heldout.jsonl: the held-out
                functions with their docstrings): exp(-sum log p / tokens) pooled over the
                documents, each scored after an end-of-text token (the boundary training
                documents follow). Lower is better; the per-document value is each sample's
                `extracted`. Needs an engine-backed model (`EngineEvalModel`: Engine.score).

Items are ordered round-robin over their categories (templates / families), so `--limit N`
samples every kind.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from qwen_jax.evals.data import read_records, require
from qwen_jax.evals.extract import cut_at, fenced_code, last_number, numbers_match
from qwen_jax.evals.humaneval import CUT_RULES
from qwen_jax.evals.model_api import chat_prompt
from qwen_jax.evals.sandbox import Limits
from qwen_jax.evals.tasks import Item, Task, Verdict, bad_item, code_verdicts, task_name
from qwen_jax.tokenizer.chatml import STOP_TOKENS

FILES = {
    "synth_math": "synth_math.jsonl",
    "synth_code": "synth_code.jsonl",
    "code_ppl": "code_heldout.jsonl",
}
LIMITS = Limits(wall_s=10.0, cpu_s=5)
NUMBER_RULE = "decimal"  # GSM8K chat's rule (spec §9)


def load(data_dir: Path, benchmark: str) -> list[dict]:
    path = Path(data_dir) / "eval" / FILES[benchmark]
    if not path.exists():
        raise FileNotFoundError(
            f"{benchmark}: {path} not found; write it with `qwen-jax data build-demo --out DIR` "
            "and pass --data-dir DIR"
        )
    return read_records(path)


def round_robin(items: list[Item]) -> list[Item]:
    """Items reordered category by category in turn (first-seen category order)."""
    by_cat: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        by_cat[it.category].append(it)
    queues = list(by_cat.values())
    out = []
    for i in range(max((len(q) for q in queues), default=0)):
        out += [q[i] for q in queues if i < len(q)]
    return out


def _zero_shot(benchmark: str, shots: int | None) -> None:
    if shots not in (None, 0):
        raise ValueError(f"{benchmark} is 0-shot, got shots={shots}")


# --- synth_math ---------------------------------------------------------------------------------
def build_math(
    data_dir: Path, *, shots: int | None = None, chat: bool = False, max_new_tokens: int = 128
) -> Task:
    _zero_shot("synth_math", shots)
    items = []
    for i, row in enumerate(load(data_dir, "synth_math")):
        item_id = str(row.get("id", i))
        try:
            require(row, {"question": str, "answer": str, "template": str})
        except ValueError as e:
            items.append(bad_item(item_id, "all", e))
            continue
        prompt = chat_prompt(row["question"])
        items.append(Item(item_id, row["template"], prompt, row["answer"]))

    def score(batch: list[Item], outputs: list[str]) -> list[Verdict]:
        verdicts = []
        for item, out in zip(batch, outputs):
            pred = last_number(out, NUMBER_RULE)
            status = "scored" if pred is not None else "no_answer"
            verdicts.append(Verdict(pred, numbers_match(pred, item.gold, NUMBER_RULE), status))
        return verdicts

    return Task(
        task_name("synth_math", 0, True),
        "generate",
        round_robin(items),
        score,
        max_new_tokens=max_new_tokens,
        stop=STOP_TOKENS,
    )


# --- synth_code ---------------------------------------------------------------------------------
_CODE_FIELDS = {"task_id": str, "family": str, "entry_point": str, "prompt": str, "ask": str}


def code_program(code: str, tests: list[str]) -> str:
    """The sandboxed program: the model's code, then the asserts; passes iff it runs to the end."""
    return code.rstrip("\n") + "\n\n" + "\n".join(tests) + "\n"


def build_code(
    data_dir: Path,
    *,
    shots: int | None = None,
    chat: bool = False,
    workers: int = 2,
    max_new_tokens: int | None = None,
) -> Task:
    _zero_shot("synth_code", shots)
    items = []
    for i, row in enumerate(load(data_dir, "synth_code")):
        item_id = str(row.get("task_id", i))
        try:
            require(row, {**_CODE_FIELDS, "tests": list})
            if not row["tests"] or not all(isinstance(t, str) for t in row["tests"]):
                raise ValueError("tests must be a non-empty list of strings")
        except ValueError as e:
            items.append(bad_item(item_id, "all", e))
            continue
        prompt = chat_prompt(row["ask"]) if chat else row["prompt"]
        meta = {"prompt": row["prompt"], "tests": row["tests"], "entry_point": row["entry_point"]}
        items.append(Item(item_id, row["family"], prompt, "", meta))

    def score(batch: list[Item], outputs: list[str]) -> list[Verdict]:
        if chat:
            codes = [(fenced_code(o) or o) for o in outputs]
            programs = [code_program(c, it.meta["tests"]) for it, c in zip(batch, codes)]
        else:
            codes = [cut_at(o, CUT_RULES) for o in outputs]
            programs = [
                code_program(it.meta["prompt"] + c, it.meta["tests"]) for it, c in zip(batch, codes)
            ]
        return code_verdicts(codes, programs, LIMITS, workers)

    return Task(
        task_name("synth_code", 0, chat),
        "generate",
        round_robin(items),
        score,
        max_new_tokens=max_new_tokens or (128 if chat else 64),
        stop=STOP_TOKENS if chat else CUT_RULES,
        metric="pass@1",
    )


# --- code_ppl -----------------------------------------------------------------------------------
def score_texts(model, texts: list[str]) -> list[tuple[float, int]]:
    """(sum of -log p, token count) of each text after an end-of-text token, through the
    model's engine (`Engine.score`: one forward, log-probs through the chunked head)."""
    engine, tok = getattr(model, "engine", None), getattr(model, "tok", None)
    if engine is None or tok is None or not hasattr(engine, "score"):
        raise ValueError(
            "code_ppl needs token log-probabilities: an engine-backed model (EngineEvalModel)"
        )
    keep = engine.max_context - 1
    ids = [tok.encode(t, allowed_special=set())[:keep] for t in texts]
    logps = engine.score([[tok.eod_id]] * len(ids), ids)
    return [(-float(lp.sum()), len(lp)) for lp in logps]


def build_ppl(data_dir: Path, *, shots: int | None = None, chat: bool = False) -> Task:
    _zero_shot("code_ppl", shots)
    items = []
    for i, row in enumerate(load(data_dir, "code_ppl")):
        item_id = str(row.get("source", i))
        try:
            require(row, {"text": str})
            if not row["text"].strip():
                raise ValueError("empty text")
        except ValueError as e:
            items.append(bad_item(item_id, "all", e))
            continue
        category = item_id.split(":")[1] if item_id.count(":") >= 2 else "all"
        items.append(Item(item_id, category, row["text"], ""))

    def query(model, batch: list[Item]) -> list[str]:
        scored = score_texts(model, [it.prompt for it in batch])
        return [json.dumps({"nll": nll, "tokens": n}) for nll, n in scored]

    def score(batch: list[Item], outputs: list[str]) -> list[Verdict]:
        verdicts = []
        for out in outputs:
            r = json.loads(out)
            ppl = math.exp(r["nll"] / max(r["tokens"], 1))
            # No right/wrong per document: the benchmark's number is the pooled perplexity.
            verdicts.append(Verdict(f"{ppl:.4f}", False, "scored", f"tokens={r['tokens']}"))
        return verdicts

    return Task(
        task_name("code_ppl", 0, False),
        "generate",
        round_robin(items),
        score,
        metric="perplexity",
        query=query,
        report=report_ppl,
    )


def report_ppl(records: list[dict]) -> dict:
    """Pooled token-level perplexity of the scored documents ("overall": the benchmark's
    number, lower is better)."""
    nll = tokens = 0.0
    for r in records:
        out = json.loads(r["output"])
        nll, tokens = nll + out["nll"], tokens + out["tokens"]
    ppl = math.exp(nll / tokens) if tokens else None
    shown = "-" if ppl is None else f"{ppl:.3f}"
    table = "\n".join(
        [
            "| documents | tokens | nll / token | perplexity |",
            "|---|---|---|---|",
            f"| {len(records)} | {int(tokens)} | "
            f"{'-' if not tokens else f'{nll / tokens:.4f}'} | {shown} |",
        ]
    )
    return {"overall": ppl, "metrics": {"perplexity": ppl, "tokens": int(tokens)}, "table": table}
