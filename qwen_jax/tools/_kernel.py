"""The code interpreter's kernel: the script the jailed Python runs, one per conversation.

Run as a script (`python -I -B -u _kernel.py CONFIG_JSON`) inside the sandbox, never imported
by the host except for the constants below; standard library only (matplotlib is used when the
cell imported it). The host (`interpreter.py`) talks to it over two pipes with frames of a 4-byte
big-endian length and UTF-8 JSON:

  host -> kernel  {"cell": int, "code": str}          on fd 0 (moved to a private fd)
  kernel -> host  {"ready": true}                     once, after start-up
                  {"cell": int, "status": "ok" | "error" | "memory",
                   "error": str, "images": [names]}   after each cell, on fd 1 (moved too)

Everything the cell (and its subprocesses) prints goes to fds 1 and 2, which the kernel points
at the host's separate output pipe, so no output, however crafted, is read as a reply. (Code in
the cell can still find the protocol fds and forge its own reply: that only lies to its own
conversation, the sandbox stays the boundary.)

Per cell: the CPU soft limit is moved to "CPU used so far + cpu_s" (RLIMIT_CPU is cumulative
and the kernel lives across cells); SIGXCPU then ends the kernel with CPU_EXIT, which the host
reports as a timeout. The host's wall clock per cell is the backstop (it kills the process
group). A bare last expression is printed (`repr`), as in a notebook. After the cell, every open
matplotlib figure is saved as `figure-<cell>-<k>.png` in the working directory and closed.
"""

import ast
import builtins
import json
import linecache
import math
import os
import resource
import signal
import struct
import sys
import traceback

CPU_EXIT = 86  # exit status after the per-cell CPU limit (SIGXCPU)
_HEADER = struct.Struct(">I")


def _read_exact(fd: int, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _recv(fd: int) -> dict | None:
    header = _read_exact(fd, _HEADER.size)
    if header is None:
        return None
    body = _read_exact(fd, _HEADER.unpack(header)[0])
    return None if body is None else json.loads(body)


def _send(fd: int, message: dict) -> None:
    body = json.dumps(message).encode()
    data = _HEADER.pack(len(body)) + body
    while data:
        data = data[os.write(fd, data) :]


def _on_sigxcpu(signum, frame):
    os._exit(CPU_EXIT)


def _arm_cpu_limit(cpu_s: int) -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = math.ceil(usage.ru_utime + usage.ru_stime + cpu_s)  # whole seconds
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
    # PID 1 of a namespace ignores signals it has no handler for, SIGXCPU included.
    signal.signal(signal.SIGXCPU, _on_sigxcpu)


def _compile_cell(code: str, filename: str):
    """(body, last_expression or None): a bare last expression is evaluated and shown."""
    tree = ast.parse(code, filename, "exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
        last = compile(last, filename, "eval")
    return compile(tree, filename, "exec"), last


def _format_error(exc: BaseException) -> str:
    """The traceback without the kernel's own frame (the cell's frames and the message)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _run_cell(cell: int, code: str, namespace: dict) -> tuple[str, str]:
    """(status, error text) of running `code` in `namespace`."""
    filename = f"<cell {cell}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    try:
        body, last = _compile_cell(code, filename)
        exec(body, namespace)
        if last is not None:
            value = eval(last, namespace)
            if value is not None:
                print(repr(value))
        return "ok", ""
    except SystemExit as e:
        if e.code in (None, 0):
            return "ok", ""
        return "error", _format_error(e)
    except MemoryError as e:
        namespace.clear()  # free what the cell kept, so the reply can be built (restart follows)
        return "memory", _format_error(e)
    except BaseException as e:
        return "error", _format_error(e)


def _save_figures(cell: int) -> tuple[list[str], str]:
    """Save and close every open matplotlib figure; (file names, error text)."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return [], ""
    names, errors = [], ""
    for k, num in enumerate(plt.get_fignums()):
        name = f"figure-{cell}-{k}.png"
        try:
            plt.figure(num).savefig(name, format="png")
            names.append(name)
        except Exception as e:
            errors += f"could not save figure {num}: {type(e).__name__}: {e}\n"
    plt.close("all")
    return names, errors


def _reap_children() -> None:
    """Collect exited children (as PID 1 also orphans): zombies count against RLIMIT_NPROC."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main() -> None:
    cfg = json.loads(sys.argv[1])
    # The protocol moves to private fds; fds 1 and 2 become the host's output pipe (the
    # launcher's stderr) for the cell and every process it starts; stdin reads nothing.
    requests, replies = os.dup(0), os.dup(1)
    os.dup2(2, 1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    # A file over RLIMIT_FSIZE fails with EFBIG in the cell instead of killing the kernel.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    sys.path.insert(0, os.getcwd())  # -I leaves the working directory off sys.path
    kernel_pid = os.getpid()
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    _send(replies, {"ready": True})
    while True:
        request = _recv(requests)
        if request is None:
            os._exit(0)
        cell = request["cell"]
        # Children of the last cell (and orphans, as PID 1) may have exited since its reply:
        # as zombies they would count against RLIMIT_NPROC and fail this cell's forks.
        _reap_children()
        _arm_cpu_limit(cfg["cpu_s"])
        status, error = _run_cell(cell, request["code"], namespace)
        if os.getpid() != kernel_pid:
            os._exit(0)  # a child the cell forked got here: it must not answer or read
        images, fig_errors = _save_figures(cell)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        _reap_children()
        reply = {"cell": cell, "status": status, "error": error + fig_errors, "images": images}
        _send(replies, reply)


if __name__ == "__main__":
    main()
