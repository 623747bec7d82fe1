"""The code interpreter tool: one persistent, sandboxed Python kernel per conversation.

    with CodeInterpreter(files=[Path("data.csv")], out_dir=Path("figs")) as ci:
        ci.run("import pandas as pd\\ndf = pd.read_csv('data.csv')").status   # "ok"
        result = ci.run("df.plot(); len(df)")     # the figure comes back as figs/figure-2-0.png
        result.observation()                      # what the model reads after `Observation:`

The kernel (`_kernel.py`) runs under the evaluation sandbox's jail (`qwen_jax.evals.sandbox`,
read its docstring for what is and is not protected): its own PID and network namespaces (no
network at all), a read-only host filesystem, a uid of its own, resource limits (`Limits`:
memory, processes, file size, CPU per cell) and a scrubbed environment. Its working directory is
a private host directory (`workdir`), bind-mounted writable as its cwd, so uploads are copied in
and figures come out; it outlives kernel restarts and is deleted by `close()`.

Each `run` sends one cell and waits at most `limits.wall_s`. What can happen (`CellResult`):
  ok       the cell ran; output is what it printed (a bare last expression is shown)
  error    an exception in the cell (traceback in the output); the kernel and its state live on
  timeout  the wall clock or the CPU limit ran out: the process group is killed, a fresh
           kernel started (state lost, `restarted`)
  memory   the memory cap was hit (MemoryError): the kernel is restarted
  died     the kernel ended (os._exit, a signal, a crash): restarted
Forbidden actions (writing outside the directory, sockets, signalling host processes) fail with
an exception in the cell (status "error": Read-only file system, Network is unreachable, ...).

The working directory is a host directory, not a size-capped tmpfs: each file is capped by
RLIMIT_FSIZE, and the host measures the directory every 0.2 s while a cell runs; a cell that
grows it past `limits.tmpfs_bytes` is killed (status "died", the files stay for the model to
delete). A fast writer can overshoot the cap by what it writes in 0.2 s. Figures are saved for
matplotlib only (Agg backend).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import select
import shutil
import signal
import stat
import struct
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

from qwen_jax.evals import sandbox
from qwen_jax.evals.sandbox import Limits
from qwen_jax.tools import _kernel
from qwen_jax.tools.spec import ToolSpec

# Notebook-like defaults, wider than the evaluation sandbox's: imports of numpy/matplotlib need
# address space, and a user cell may legitimately compute for a while.
# `tmpfs_bytes` caps the working directory here (a host directory, checked while cells run).
DEFAULT_LIMITS = Limits(wall_s=30.0, cpu_s=30, memory_bytes=4 << 30, nproc=32, tmpfs_bytes=1 << 30)
START_TIMEOUT_S = 60.0
_MAX_REPLY_BYTES = 8 << 20
_HEADER = struct.Struct(">I")
_FIGURE = re.compile(r"figure-(\d+)-\d+\.png")

# Qwen-Agent's benchmark tool (spec §6 [QA]: benchmark/prompt/qwen_react.py): args_format "code"
# puts the triple-backtick sentence where other tools have "Format the arguments as a JSON
# object." (react.tool_description).
CODE_INTERPRETER = ToolSpec(
    name="code_interpreter",
    name_for_human="代码解释器",
    description="代码解释器，可用于执行Python代码。",
    args_format="code",
    parameters={
        "type": "object",
        "properties": {"code": {"type": "string", "description": "待执行的代码"}},
        "required": ["code"],
    },
)


class KernelError(RuntimeError):
    """The kernel could not be started (a host problem, not something the cell did)."""


@dataclasses.dataclass(frozen=True)
class CellResult:
    """What one cell did. `images` are host paths of PNG files (in `out_dir` when given, else
    in the kernel's working directory, deleted by `close()`)."""

    status: str  # "ok" | "error" | "timeout" | "memory" | "died"
    output: str  # captured stdout+stderr (capped), then the traceback for "error"
    images: tuple[Path, ...]
    restarted: bool  # the kernel was restarted after this cell (state lost)
    detail: str = ""  # one line: the exception, the limit that ran out, how the kernel died

    def observation(self) -> str:
        """The text fed back to the model after `Observation:`."""
        text = self.output.rstrip()
        if self.status == "ok":
            lines = [text] if text or self.images else ["Finished execution."]
            lines = [t for t in lines if t] + [f"![{p.name}]({p})" for p in self.images]
            return "\n".join(lines)
        if self.status == "error":
            return f"Error: {self.detail}" + (f"\n{text}" if text else "")
        why = {
            "timeout": "the time limit",
            "memory": "running out of memory",
            "died": "the kernel died",
        }[self.status]
        lines = [text] if text else []
        lines.append(f"Error: {self.detail}.")
        if self.restarted:
            lines.append(
                f"The kernel was restarted after {why}: variables are lost (imports too; "
                "files in the working directory remain)."
            )
        return "\n".join(lines)


class CodeInterpreter:
    """One persistent sandboxed Python kernel (one conversation). Thread-safe: cells run one at
    a time. The kernel starts on the first `run`; `files` are uploaded before that."""

    def __init__(
        self,
        limits: Limits | None = None,
        *,
        files: Sequence[Path] = (),
        out_dir: Path | None = None,
    ):
        self.limits = limits or DEFAULT_LIMITS
        self.out_dir = None if out_dir is None else Path(out_dir)
        self._lock = threading.Lock()
        self._cell = 0
        self._kernel: list[sandbox.SandboxProcess] = []  # 0 or 1, shared with the finalizer
        base = Path(tempfile.mkdtemp(prefix="qwen-jax-ci-"))
        # 0711: the sandbox uid may reach its directory and the kernel script, list nothing.
        base.chmod(0o711)
        self._base = base
        self.workdir = base / "work"
        self.workdir.mkdir(mode=0o700)
        self._script = base / "kernel.py"
        shutil.copyfile(_kernel.__file__, self._script)
        self._script.chmod(0o644)
        self._finalizer = weakref.finalize(self, _cleanup, self._kernel, base)
        for path in files:
            self.upload(path)

    def __enter__(self) -> CodeInterpreter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Kill the kernel and delete its working directory."""
        with self._lock:
            self._finalizer()

    def upload(self, path: Path) -> str:
        """Copy a host file into the kernel's directory (replacing one of the same name, never
        following a link the kernel put there); returns the name the code can open."""
        path = Path(path)
        name = path.name
        if name in ("", ".", ".."):
            raise ValueError(f"cannot upload {str(path)!r}: not a file name")
        if not path.is_file():
            raise ValueError(f"cannot upload {str(path)!r}: not a file")
        with self._lock:
            if not self._finalizer.alive:
                raise KernelError("the code interpreter is closed")
            dir_fd = os.open(self.workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                try:
                    os.unlink(name, dir_fd=dir_fd)
                except FileNotFoundError:
                    pass
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                fd = os.open(name, flags, 0o644, dir_fd=dir_fd)
                with open(fd, "wb") as dst, open(path, "rb") as src:
                    shutil.copyfileobj(src, dst)
                    if self._kernel and self._kernel[0].uid is not None:
                        os.fchown(dst.fileno(), self._kernel[0].uid, self._kernel[0].uid)
            finally:
                os.close(dir_fd)
        return name

    def run(self, code: str) -> CellResult:
        """Run one cell in the kernel (started or restarted as needed)."""
        with self._lock:
            if not self._finalizer.alive:
                raise KernelError("the code interpreter is closed")
            if not self._kernel:
                self._start()
            self._cell += 1
            result = self._exchange(self._kernel[0], self._cell, code)
            if result.restarted:
                self._kernel.pop().close()
                self._start()
            return result

    # -- the kernel process ------------------------------------------------------------------

    def _start(self) -> None:
        mode = sandbox.isolation()
        python, expose = sandbox.sandbox_python(mode)
        work = str(self.workdir)
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": work,
            "TMPDIR": work,
            "LANG": "C.UTF-8",
            "MPLBACKEND": "Agg",
            "MPLCONFIGDIR": os.path.join(work, ".matplotlib"),
            # One thread per BLAS: threads count against RLIMIT_NPROC and RLIMIT_AS.
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        config = json.dumps({"cpu_s": self.limits.cpu_s})
        argv = [python, "-I", "-B", "-u", str(self._script), config]
        kernel = sandbox.spawn(argv, self.workdir, env, self.limits, cpu_limit=False, expose=expose)
        self._kernel.append(kernel)
        reader = _Reader(kernel, self.limits.output_bytes)
        reply = reader.reply(time.monotonic() + START_TIMEOUT_S)
        if not isinstance(reply, dict) or not reply.get("ready"):
            kernel = self._kernel.pop()
            rc = kernel.kill()
            reader.drain()
            kernel.close()
            raise KernelError(
                f"the code interpreter's kernel did not start (exit status {rc}): "
                + reader.text()[-2000:].strip()
            )

    def _exchange(self, kernel: sandbox.SandboxProcess, cell: int, code: str) -> CellResult:
        reader = _Reader(kernel, self.limits.output_bytes)
        reader.drain()  # output background processes wrote since the last cell is not this one's
        body = json.dumps({"cell": cell, "code": code}).encode()
        try:
            _write_all(kernel.proc.stdin.fileno(), _HEADER.pack(len(body)) + body)
        except BrokenPipeError:
            return self._death(kernel, reader)
        # A cell may not grow the directory past the cap (a directory already over it, after
        # uploads or an earlier overrun, may not grow at all): the host's disk is shared.
        cap = max(self.limits.tmpfs_bytes, _usage(self.workdir))

        def too_big() -> bool:
            return _usage(self.workdir, stop_after=cap) > cap

        reply = reader.reply(time.monotonic() + self.limits.wall_s, too_big)
        if reply is _TOO_BIG or (isinstance(reply, dict) and too_big()):
            kernel.kill()
            reader.drain()
            detail = (
                "the working directory grew past its size limit of "
                f"{self.limits.tmpfs_bytes >> 20} MiB (delete files to make room)"
            )
            return CellResult("died", reader.text(), (), True, detail)
        if reply is _TIMEOUT:
            kernel.kill()
            reader.drain()
            detail = f"the code ran past the wall-clock limit of {self.limits.wall_s:g} s per cell"
            return CellResult("timeout", reader.text(), (), True, detail)
        if reply is None or reply.get("cell") != cell:
            return self._death(kernel, reader)
        reader.drain()
        status = reply.get("status")
        if status not in ("ok", "error", "memory"):
            return self._death(kernel, reader)
        error = str(reply.get("error", ""))
        output = reader.text() + error
        images = tuple(self._collect(cell, reply.get("images", [])))
        if status == "ok":
            return CellResult("ok", output, images, False)
        if status == "error":
            return CellResult("error", output, images, False, _last_line(error))
        return CellResult("memory", output, images, True, self._memory_detail())

    def _death(self, kernel: sandbox.SandboxProcess, reader: _Reader) -> CellResult:
        """The kernel stopped answering: wait for it (briefly), tell how it ended."""
        try:
            rc = kernel.proc.wait(timeout=5)
        except Exception:
            rc = None
        kernel.kill()
        reader.drain()
        output = reader.text()
        if rc == _kernel.CPU_EXIT:
            detail = f"the code ran past the CPU limit of {self.limits.cpu_s} s per cell"
            return CellResult("timeout", output, (), True, detail)
        if "MemoryError" in output[-2000:]:
            return CellResult("memory", output, (), True, self._memory_detail())
        if rc is not None and rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = f"signal {-rc}"
            detail = f"the kernel was killed by {name}"
        else:
            detail = f"the kernel exited (exit status {rc})"
        return CellResult("died", output, (), True, detail)

    def _memory_detail(self) -> str:
        mib = self.limits.memory_bytes >> 20
        return f"MemoryError: the code ran past the memory limit of {mib} MiB"

    def _collect(self, cell: int, names) -> list[Path]:
        """Host paths of this cell's figures; only names the kernel may have made are read, and
        never through a link."""
        paths = []
        for name in names if isinstance(names, list) else []:
            m = _FIGURE.fullmatch(str(name))
            if not m or int(m.group(1)) != cell:
                continue
            try:
                # O_NONBLOCK: a FIFO planted under the name must not hang the host.
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                fd = os.open(self.workdir / name, flags)
            except OSError:
                continue
            with open(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    continue
                if self.out_dir is None:
                    paths.append(self.workdir / name)
                    continue
                self.out_dir.mkdir(parents=True, exist_ok=True)
                dest = self.out_dir / name
                with open(dest, "wb") as out:
                    shutil.copyfileobj(f, out)
                paths.append(dest)
        return paths


_TIMEOUT = object()
_TOO_BIG = object()
_POLL_S = 0.2  # how often a running cell's directory size is checked


class _Reader:
    """Reads the kernel's reply frames and, alongside, its output pipe, keeping the output's
    head and tail (`cap` bytes in all) so a flood cannot fill the host's memory."""

    def __init__(self, kernel: sandbox.SandboxProcess, cap: int):
        self.replies = kernel.proc.stdout.fileno()
        self.output = kernel.proc.stderr.fileno()
        self.cap = cap
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0
        self.buffer = bytearray()

    def reply(self, deadline: float, too_big=None):
        """The next frame (a dict), None if the kernel closed its end, _TIMEOUT, or _TOO_BIG
        when `too_big()` (polled every _POLL_S) says the working directory outgrew its cap."""
        open_fds = [self.replies, self.output]
        next_poll = deadline if too_big is None else time.monotonic() + _POLL_S
        while True:
            frame = self._frame()
            if frame is not None:
                return frame
            now = time.monotonic()
            if now >= deadline:
                return _TIMEOUT
            if too_big is not None and now >= next_poll:
                if too_big():
                    return _TOO_BIG
                next_poll = now + _POLL_S
            wait = max(0.0, min(deadline, next_poll) - now)
            ready, _, _ = select.select(open_fds, [], [], wait)
            for fd in ready:
                data = os.read(fd, 1 << 16)
                if fd == self.output:
                    if not data:
                        open_fds.remove(fd)
                    self._keep(data)
                elif not data:
                    return None
                else:
                    self.buffer += data
                    if len(self.buffer) > _MAX_REPLY_BYTES + _HEADER.size:
                        return None

    def _frame(self) -> dict | None:
        if len(self.buffer) < _HEADER.size:
            return None
        (n,) = _HEADER.unpack_from(self.buffer)
        if len(self.buffer) < _HEADER.size + n:
            return None
        body = bytes(self.buffer[_HEADER.size : _HEADER.size + n])
        del self.buffer[: _HEADER.size + n]
        try:
            frame = json.loads(body)
        except ValueError:
            return {}
        return frame if isinstance(frame, dict) else {}

    def drain(self, max_s: float = 0.5) -> None:
        """Read what the output pipe holds now (until EOF when the kernel is gone)."""
        deadline = time.monotonic() + max_s
        while time.monotonic() < deadline:
            try:
                ready, _, _ = select.select([self.output], [], [], 0)
            except ValueError:  # closed
                return
            if not ready:
                return
            data = os.read(self.output, 1 << 16)
            if not data:
                return
            self._keep(data)

    def _keep(self, data: bytes) -> None:
        self.total += len(data)
        half = self.cap // 2
        room = half - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        self.tail += data
        del self.tail[:-half]

    def text(self) -> str:
        data = bytes(self.head)
        cut = self.total - len(self.head) - len(self.tail)
        if cut > 0:
            data += f"\n...[{cut} bytes cut]...\n".encode()
        data += bytes(self.tail)
        return data.decode("utf-8", errors="replace")


def _usage(root: Path, stop_after: int | None = None) -> int:
    """Bytes of disk the tree under `root` holds (links not followed); the walk ends early
    once the total passes `stop_after`."""
    total, stack = 0, [str(root)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                total += entry.stat(follow_symlinks=False).st_blocks * 512
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
            except OSError:
                continue
            if stop_after is not None and total > stop_after:
                return total
    return total


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "error"


def _cleanup(kernels: list, base: Path) -> None:
    while kernels:
        kernels.pop().close()
    shutil.rmtree(base, ignore_errors=True)


_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|$)", re.DOTALL)
_INLINE_FENCE = re.compile(r"```(.*?)```", re.DOTALL)


def extract_code(action_input: str) -> str:
    """The code in a model's `Action Input`: a ```py fenced block (the first; an unclosed one
    runs to the end), a json5 object {"code": ...} (itself possibly fenced), or the raw text."""
    import json5  # the tools extra; here so importing this module stays light

    text = action_input.strip()
    if text.startswith("{"):
        try:
            obj = json5.loads(text)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("code"), str):
            text = obj["code"].strip()
    m = _FENCE.search(text) or _INLINE_FENCE.search(text)
    if m:
        return m.group(1).strip("\n")
    return text
