"""`qwen-jax [--verbose] <verb> ...`: the single command-line entry point.

Each verb lives in its own module and owns its argument parsing (argparse, or absl flags with
ml_collections `--config` for the experiment-driven verbs). Modules are imported only when their
verb runs, so `qwen-jax tokenizer ...` never pays for TensorFlow or torch imports.

THE error path of every verb is here (`main`): whatever a verb raises becomes one stderr line
`qwen-jax VERB: error: MESSAGE` and a non-zero exit (2 for usage errors, 1 otherwise, 130 for
Ctrl-C); the traceback and the libraries' start-up logs (libtpu, TensorFlow, XLA) appear only
with `--verbose` or QWEN_JAX_VERBOSE=1.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import glob
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import sys
import traceback

# verb -> (module, function taking argv[1:] of the verb and returning an exit code, one-line help)
VERBS: dict[str, tuple[str, str, str]] = {
    "tokenizer": ("qwen_jax.tokenizer.cli", "main", "encode/decode ids, train SentencePiece"),
    "data": ("qwen_jax.data.cli", "main", "build demo corpus, dedup, list/inspect tasks"),
    "convert": ("qwen_jax.checkpoint.convert", "main", "HF safetensors <-> Orbax params"),
    "eval": ("qwen_jax.evals.cli", "main", "benchmarks (run, fetch-data) and their sandbox"),
    "demo": ("qwen_jax.demo", "main", "the main job: the short reproduction chain + evals"),
    "reproduce": ("qwen_jax.reproduce", "main", "base -> Code-Qwen(-Chat), Math-Qwen-Chat; evals"),
    "train": ("qwen_jax.train.cli", "train_main", "train from an experiment file"),
    "export": ("qwen_jax.train.export", "main", "training checkpoint -> params/HF export"),
    "compile": ("qwen_jax.train.cli", "compile_main", "AOT-compile a train step for a TPU slice"),
    "bench": ("qwen_jax.benchmark", "main", "benchmarks on design.md's bench shape (JSON lines)"),
    "generate": ("qwen_jax.infer.generate_cli", "main", "continue a prompt (KV-cache decoding)"),
    "chat": ("qwen_jax.infer.chat", "main", "interactive ChatML conversation"),
    "rm": ("qwen_jax.train.rm_score", "main", "reward model: `rm score` pairs or responses"),
    "serve": ("qwen_jax.serve.cli", "main", "OpenAI-compatible server, continuous batching"),
    "agent": ("qwen_jax.tools.cli", "main", "ReAct agent with tools and a code interpreter"),
    "sweep": ("qwen_jax.sweep.cli", "main", "plan, launch, watch and collect sweeps"),
}

VERBOSE_ENV = "QWEN_JAX_VERBOSE"
_MAX_MESSAGE = 600  # characters of one error line; --verbose has the whole text


class UsageError(ValueError):
    """Flags or values the user must change: `main` prints the message and exits 2."""


def _usage() -> str:
    lines = ["usage: qwen-jax [--verbose] <verb> [args...]", "", "verbs:"]
    width = max(len(v) for v in VERBS)
    lines += [f"  {verb.ljust(width)}  {help_}" for verb, (_, _, help_) in sorted(VERBS.items())]
    lines += [
        "",
        "`qwen-jax <verb> --help` describes each verb.",
        "An error prints one line `qwen-jax <verb>: error: ...` (exit 2: bad usage, 1: failure).",
        f"--verbose (or {VERBOSE_ENV}=1): tracebacks and the libraries' own logs (libtpu, XLA,",
        "TensorFlow), which are otherwise hidden.",
    ]
    return "\n".join(lines)


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


# ----------------------------------------------------------------------------- start-up noise


def _tpu_host() -> bool:
    """Does this machine have TPU chips (or say it does)? Only then may JAX probe libtpu."""
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return True
    return any(os.environ.get(k) for k in ("TPU_NAME", "TPU_WORKER_ID", "CLOUD_TPU_TASK_ID"))


def _cuda_available() -> bool:
    """A CUDA plugin for jaxlib is installed and an NVIDIA driver device exists."""
    has_plugin = any(
        importlib.util.find_spec(m) is not None for m in ("jax_cuda12_plugin", "jax_cuda13_plugin")
    )
    return has_plugin and os.path.exists("/dev/nvidiactl")


def quiet_environment(verb: str, verbose: bool) -> None:
    """Defaults (never overriding the user's) set before any verb imports JAX or TensorFlow.

    Without JAX_PLATFORMS, JAX loads every installed plugin: libtpu (the `tpu` extra, there for
    `compile`) then probes the host and logs an `E0000 ... INVALID_ARGUMENT` on any non-TPU
    machine. So off a TPU host JAX gets the platforms that exist; `compile` gets the settings
    that let libtpu load for compile-only devices without probing (the Makefile's). Logging
    levels: TF_CPP_MIN_LOG_LEVEL=3 silences TensorFlow's C++ INFO..ERROR lines (oneDNN, cuInit,
    CPU features); its pre-logging-init cudart lines are muted at import (`_MuteNativeImport`).
    """
    env = os.environ
    if not _tpu_host():
        env.setdefault("JAX_PLATFORMS", "cuda,cpu" if _cuda_available() else "cpu")
        if verb in ("compile", "sweep"):  # sweep plan compiles for TPU slices
            env.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
            env.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
            env.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    if verbose:
        return
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.setdefault("GRPC_VERBOSITY", "NONE")
    if "tensorflow" not in sys.modules and not any(
        isinstance(f, _MuteNativeImport) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _MuteNativeImport({"tensorflow"}))


@contextlib.contextmanager
def _native_stderr_muted():
    """Point file descriptor 2 at /dev/null (C++ writes) while Python's sys.stderr still
    reaches the terminal through a duplicate of the original descriptor."""
    if sys.stderr is not None:
        sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    swapped = _fileno(sys.stderr) == 2  # else (a capture, a file) Python's writes are safe
    python_stderr = sys.stderr
    try:
        os.dup2(devnull, 2)
        if swapped:
            sys.stderr = open(saved, "w", closefd=False, buffering=1)  # noqa: SIM115
        yield
    finally:
        if swapped:
            sys.stderr.flush()
            sys.stderr = python_stderr
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _fileno(stream) -> int:
    try:
        return stream.fileno()
    except (OSError, ValueError, AttributeError):
        return -1


class _MuteNativeImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import the named top-level modules with native stderr muted.

    TensorFlow's shared libraries log "Could not find cuda drivers" (and absl's "before
    InitializeLog" banner) while they load, before any log level applies; a Python exception
    raised by the import still propagates and is reported.
    """

    def __init__(self, names: set[str]):
        self.names = names
        self._loaders: dict[str, importlib.abc.Loader] = {}

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.names:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        self._loaders[fullname] = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loaders[spec.name].create_module(spec)

    def exec_module(self, module):
        loader = self._loaders[module.__name__]
        # Leave the real loader on the module (importlib.resources and friends ask it).
        module.__loader__ = module.__spec__.loader = loader
        with _native_stderr_muted():
            loader.exec_module(module)


# ----------------------------------------------------------------------------- error lines


class _ArgparseError(Exception):
    """argparse's error, raised instead of printing the usage block and exiting."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


@contextlib.contextmanager
def _one_line_argparse_errors():
    """Every parser a verb builds (ours or a sub-parser) reports `error()` through `main`'s
    one line instead of argparse's usage block; --help still prints the full help."""
    original = argparse.ArgumentParser.error

    def error(self, message):
        raise _ArgparseError(self.prog, message)

    argparse.ArgumentParser.error = error
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original


_TRACEBACK_TAIL = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception)): (.+)$")


def _embedded_error(text: str) -> str | None:
    """The original `Type: message` of a Python exception whose traceback another library
    wrapped into its own error text (TensorFlow's py_function / from_generator errors)."""
    if "Traceback (most recent call last)" not in text:
        return None
    tail = text.rsplit("Traceback (most recent call last)", 1)[1]
    for line in tail.splitlines():
        m = _TRACEBACK_TAIL.match(line.strip())
        if m and not line.startswith((" ", "\t")):
            return f"{m.group(1)}: {m.group(2)}"
    return None


def error_message(e: BaseException) -> str:
    """One line for an exception: its text (whitespace collapsed), the type where the text is
    empty or only a repr (KeyError('x')), the original error inside a wrapped traceback."""
    text = str(e)
    embedded = _embedded_error(text)
    if embedded is not None:
        text = embedded
    elif not text.strip() or isinstance(e, KeyError | AttributeError | IndexError | TypeError):
        text = f"{type(e).__name__}: {text}" if text.strip() else type(e).__name__
    text = " ".join(text.split())
    if len(text) > _MAX_MESSAGE:
        text = text[: _MAX_MESSAGE - 40].rstrip() + " ... (--verbose shows the whole message)"
    return text


def _strip_prefix(message: str, verb: str) -> str:
    """`SystemExit("qwen-jax train: error: x")` or `"error: x"` -> `"x"`."""
    for prefix in (f"qwen-jax {verb}: error:", f"qwen-jax {verb}:", "error:"):
        if message.startswith(prefix):
            return message[len(prefix) :].strip()
    return message


def _is_usage_error(e: BaseException) -> bool:
    types_: list[type] = [UsageError, _ArgparseError]
    for module, name in (("qwen_jax.infer.options", "UsageError"), ("absl.flags", "Error")):
        mod = sys.modules.get(module)
        if mod is not None and isinstance(getattr(mod, name, None), type):
            types_.append(getattr(mod, name))
    return isinstance(e, tuple(types_))


def _report(verb: str, message: str) -> None:
    print(f"qwen-jax {verb}: error: {message}", file=sys.stderr, flush=True)


def run_verb(verb: str, argv: list[str], verbose: bool) -> int:
    """Run one verb under THE error convention; returns the process exit code."""
    module_name, func_name, _ = VERBS[verb]
    try:
        with _one_line_argparse_errors():
            func = getattr(importlib.import_module(module_name), func_name)
            return int(func(argv) or 0)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return int(e.code or 0)  # argparse's --help (0), or a verb's own exit status
        _report(verb, error_message(Exception(_strip_prefix(str(e.code), verb))))
        return 1
    except KeyboardInterrupt:
        _report(verb, "interrupted")
        return 130
    except BrokenPipeError:  # `qwen-jax ... | head`: the reader left; nothing to say
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:  # noqa: BLE001 - THE place every verb's error becomes one line
        if verbose:
            traceback.print_exc()
        message = error_message(e)
        if isinstance(e, _ArgparseError) and e.prog != f"qwen-jax {verb}":
            message += f" (see {e.prog} --help)"
        _report(verb, message)
        return 2 if _is_usage_error(e) else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    flag = False
    while argv and argv[0] in ("-v", "--verbose"):
        flag, argv = True, argv[1:]
    verbose = flag or is_verbose()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        close = difflib.get_close_matches(verb, VERBS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(
            f"qwen-jax: error: unknown verb {verb!r}{hint} (`qwen-jax --help` lists them)",
            file=sys.stderr,
        )
        return 2
    quiet_environment(verb, verbose)
    saved = os.environ.get(VERBOSE_ENV)
    if flag:
        os.environ[VERBOSE_ENV] = "1"  # the verb's modules and subprocesses see it too
    try:
        return run_verb(verb, rest, verbose)
    finally:
        if flag and saved is None:
            del os.environ[VERBOSE_ENV]
        elif flag:
            os.environ[VERBOSE_ENV] = saved


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy: verbs raise
    # qwen_jax.cli.UsageError, which must be the class the handler checks.
    from qwen_jax.cli import main as _main

    sys.exit(_main())
