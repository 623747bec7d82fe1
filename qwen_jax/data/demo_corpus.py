"""The embedded default corpus, built by the project itself with no downloads.

`build_demo(out)` writes, deterministically for a given Python installation (same stdlib ->
same bytes), the layout the `demo_*` Tasks read:
  pretrain/code   Python standard-library source files (one document per file), and modules of
                  small synthetic functions with docstrings (synthetic_code.py, "train" tasks)
  pretrain/text   English prose: stdlib docstrings and the language reference topics that ship
                  as `pydoc_data.topics`
  pretrain/math   synthetic word problems with worked answers (synthetic_math.py, both tiers)
  sft/{chat,code,math}, preference, prompts   small synthetic sets (synthetic_chat.py; code SFT
                  also asks for the synthetic functions, math SFT also has one-step problems)
  eval/           the held-out benchmarks (qwen_jax.evals.synth): synth_math.jsonl,
                  synth_code.jsonl, code_heldout.jsonl; no training file holds any of them
Each training set has `train-0000k-of-00004.jsonl` (or `train.jsonl`) and `validation.jsonl`
(every 20th record). `manifest.json` lists every file with its record count, size and sha256.
About 5 MB; a few seconds to build.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import sys
import sysconfig
from pathlib import Path

import numpy as np

from qwen_jax.data import synthetic_chat as chat
from qwen_jax.data import synthetic_code
from qwen_jax.data.synthetic_math import EASY_TEMPLATES, problem, problem_pair

VERSION = "qwen-jax-demo-corpus/3"  # 3: one-digit easy math and code constants
_SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "encodings",
    "pydoc_data",
}
CODE_BUDGET, PROSE_BUDGET = 700_000, 800_000  # characters


def stdlib_files() -> list[tuple[str, Path]]:
    """(relative path, path) of stdlib modules between 1 and 64 KB, in a stable pseudo-random
    order (sha1 of the relative path) so budgets sample the whole library, not just "a"-"c"."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and "-" not in d]
        for name in filenames:
            p = Path(dirpath) / name
            if name.endswith(".py") and 1024 <= p.stat().st_size <= 65536:
                out.append((p.relative_to(root).as_posix(), p))
    return sorted(out, key=lambda rp: hashlib.sha1(rp[0].encode()).hexdigest())


def _documented(tree: ast.Module):
    """Module, classes, and functions at module/class level: the nodes docstrings live on
    (function bodies are not searched: nested definitions rarely carry documentation)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.Module | ast.ClassDef):
            stack.extend(
                n
                for n in reversed(node.body)
                if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            )


def _module_name(rel: str) -> str:
    parts = rel[:-3].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _first_paragraph(doc: str) -> str:
    return " ".join(doc.split("\n\n")[0].split())


def stdlib_documents(files) -> tuple[list[dict], list[dict], list[tuple[str, str, str]]]:
    """Code documents, prose documents (docstrings >= 300 chars) and API facts
    (qualified name, signature, first docstring paragraph) of public module-level functions."""
    code, prose, apis = [], [], []
    code_chars = prose_chars = 0
    for rel, path in files:
        if code_chars >= CODE_BUDGET and prose_chars >= PROSE_BUDGET and len(apis) >= 800:
            break
        source = path.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        if code_chars < CODE_BUDGET:
            code.append({"text": source, "source": f"stdlib/{rel}"})
            code_chars += len(source)
        module = _module_name(rel)
        for node in _documented(tree):
            doc = ast.get_docstring(node, clean=True)
            if not doc:
                continue
            if len(doc) >= 300 and prose_chars < PROSE_BUDGET:
                prose.append({"text": doc, "source": f"stdlib/{rel}:{getattr(node, 'name', '')}"})
                prose_chars += len(doc)
            if (
                isinstance(node, ast.FunctionDef)
                and node in tree.body
                and not node.name.startswith("_")
                and len(_first_paragraph(doc)) >= 40
            ):
                sig = "(" + ", ".join(a.arg for a in node.args.args) + ")"
                apis.append((f"{module}.{node.name}", sig, _first_paragraph(doc)))
    return code, prose, apis


def reference_topics(budget: int) -> list[dict]:
    """The language reference prose shipped as `pydoc_data.topics` (sorted by topic)."""
    from pydoc_data.topics import topics

    out, used = [], 0
    for name in sorted(topics):
        text = topics[name].strip()
        if used >= budget:
            break
        if len(text) >= 300:
            out.append({"text": text, "source": f"pydoc_data.topics:{name}"})
            used += len(text)
    return out


# Volumes of the learnable synthetic domains (together about 2 MB of the corpus: the whole corpus
# stays under test_data_demo.py's 6 MB bound).
CODE_MODULES, FUNCTIONS_PER_MODULE, CODE_CONVERSATIONS = 1000, 6, 2400
EASY_MATH_DOCS, EASY_MATH_CONVERSATIONS, GSM_MATH_CONVERSATIONS = 2000, 3000, 600


def _interleave(a: list, b: list) -> list:
    """a and b merged evenly (so every prefix, and the every-20th validation split, has both)."""
    out, ia, ib, n = [], iter(a), iter(b), len(a) + len(b)
    for i in range(n):
        out.append(next(ib) if (i + 1) * len(b) // n > i * len(b) // n else next(ia))
    return out


def synthetic_sets(apis: list[tuple[str, str, str]], seed: int = 0) -> dict[str, list[dict]]:
    rng = np.random.default_rng(seed)
    math_docs = []
    for i in range(2000 + EASY_MATH_DOCS):
        p = problem(rng, tier="easy" if i % 2 else "gsm")
        math_docs.append(
            {"text": f"Question: {p.question}\nAnswer: {p.solution}", "source": "synthetic_math"}
        )
    sft_math, prompts = [], []
    for _ in range(GSM_MATH_CONVERSATIONS):
        msgs, _ = chat.math_conversation(rng)
        sft_math.append({"messages": msgs})
    easy = [problem(rng, tier="easy") for _ in range(EASY_MATH_CONVERSATIONS)]
    sft_math = _interleave(
        sft_math,
        [
            {
                "messages": [
                    {"role": "user", "content": p.question},
                    {"role": "assistant", "content": p.solution},
                ]
            }
            for p in easy
        ],
    )
    sft_code = [{"messages": chat.code_conversation(rng)} for _ in range(600)]
    code_rng = random.Random(seed)
    train_tasks = synthetic_code.tasks("train")
    synth_convs = [
        {"messages": synthetic_code.conversation(train_tasks[i % len(train_tasks)], code_rng)}
        for i in code_rng.sample(range(CODE_CONVERSATIONS), CODE_CONVERSATIONS)
    ]
    sft_code = _interleave(sft_code, synth_convs)
    sft_chat = []
    for i in range(1200):
        msgs = (
            chat.api_conversation(rng, apis[int(rng.integers(len(apis)))])
            if i % 2
            else chat.text_conversation(rng)
        )
        rec = {"messages": msgs}
        if rng.random() < 0.2:
            rec["system"] = chat.SYSTEMS[int(rng.integers(len(chat.SYSTEMS)))]
        sft_chat.append(rec)
    pref = []
    for i in range(900):
        if i % 3 == 0:
            pref.append(chat.math_preference(rng))
        elif i % 3 == 1:
            pref.append(chat.code_preference(rng))
        else:
            api = apis[int(rng.integers(len(apis)))]
            pref.append(chat.unhelpful_preference(rng, chat.api_conversation(rng, api)))
    for i in range(600):
        if i % 2:
            right, _ = problem_pair(rng)
            prompts.append({"prompt": right.question, "answer": str(right.answer)})
        else:
            q, _, _ = apis[int(rng.integers(len(apis)))]
            prompts.append({"prompt": f"What does `{q}` do in Python?"})
    return {
        "pretrain/math": math_docs,
        "pretrain/code_synthetic": [
            {"text": t, "source": "synthetic_code"}
            for t in synthetic_code.modules(
                train_tasks, CODE_MODULES, FUNCTIONS_PER_MODULE, code_rng
            )
        ],
        "sft/math": sft_math,
        "sft/code": sft_code,
        "sft/chat": sft_chat,
        "preference": pref,
        "prompts": prompts,
    }


def _write(out: Path, prefix: str, records: list[dict], train_files: int) -> dict[str, dict]:
    """Every 20th record -> validation.jsonl; the rest round-robin over the train files."""
    val = [r for i, r in enumerate(records) if i % 20 == 19]
    train = [r for i, r in enumerate(records) if i % 20 != 19]
    files = {"validation.jsonl": val}
    if train_files == 1:
        files["train.jsonl"] = train
    else:
        for k in range(train_files):
            files[f"train-{k:05d}-of-{train_files:05d}.jsonl"] = train[k::train_files]
    meta = {}
    (out / prefix).mkdir(parents=True, exist_ok=True)
    for name, recs in files.items():
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode("utf-8")
        (out / prefix / name).write_bytes(data)
        meta[f"{prefix}/{name}"] = {
            "records": len(recs),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    return meta


def heldout_sets(seed: int = 0, easy_per_template: int = 25, gsm: int = 0) -> dict:
    """The held-out benchmark files (qwen_jax.evals.synth reads them): every synthetic code
    task of the "heldout" split, and word problems drawn from the "heldout" keys (distinct
    questions; `easy_per_template` of each one-step template, then `gsm` multi-step ones:
    none by default, the tiny models of the chain do not learn two-step arithmetic)."""
    rng = np.random.default_rng(seed + 1)
    math, seen = [], set()

    def add(tier: str, want: int, template=None) -> None:
        got = 0
        while got < want:
            p = problem(rng, tier=tier, split="heldout")
            if p.question in seen or (template and not p.key.startswith(template)):
                continue
            seen.add(p.question)
            math.append(
                {
                    "id": f"{p.key}/{len(math)}",
                    "tier": tier,
                    "template": p.key.split(":")[0],
                    "question": p.question,
                    "solution": p.solution,
                    "answer": str(p.answer),
                }
            )
            got += 1

    for t in EASY_TEMPLATES:
        add("easy", easy_per_template, t.__name__.lstrip("_") + ":")
    add("gsm", gsm)
    heldout = synthetic_code.tasks("heldout")
    return {
        "eval/synth_math.jsonl": math,
        "eval/synth_code.jsonl": [synthetic_code.eval_record(t) for t in heldout],
        "eval/code_heldout.jsonl": [
            {"text": t.solution, "source": f"synthetic_code:{t.family}:{t.name}"} for t in heldout
        ],
    }


def _write_file(out: Path, rel: str, records: list[dict]) -> dict[str, dict]:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    (out / rel).write_bytes(data)
    meta = {"records": len(records), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return {rel: meta}


def build_demo(out: str | Path, seed: int = 0) -> dict:
    """Write the demo corpus under `out`; returns the manifest (also written to
    `out/manifest.json`)."""
    out = Path(out)
    code, prose, apis = stdlib_documents(stdlib_files())
    prose += reference_topics(budget=max(0, PROSE_BUDGET - sum(len(d["text"]) for d in prose)))
    sets = {"pretrain/text": prose, **synthetic_sets(apis, seed)}
    # One code task: the stdlib files and the synthetic modules, interleaved.
    sets["pretrain/code"] = _interleave(code, sets.pop("pretrain/code_synthetic"))
    files = {}
    for prefix, records in sorted(sets.items()):
        files.update(_write(out, prefix, records, 4 if prefix.startswith("pretrain") else 1))
    for rel, records in heldout_sets(seed).items():
        files.update(_write_file(out, rel, records))
    manifest = {
        "version": VERSION,
        "python": sys.version.split()[0],
        "seed": seed,
        "total_bytes": sum(m["bytes"] for m in files.values()),
        "files": files,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest
