"""The code interpreter: a persistent sandboxed kernel, its state, figures, uploads, and hostile
cells that must be contained (right status, a usable kernel after) with the host untouched.

Like tests/test_sandbox.py, every hostile test checks the host afterwards (files, processes,
sockets), not just the status.
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from qwen_jax.evals import sandbox
from qwen_jax.evals.sandbox import Limits
from qwen_jax.tools import react
from qwen_jax.tools.interpreter import CODE_INTERPRETER, CellResult, CodeInterpreter, extract_code

ROOT_LINUX = sys.platform == "linux" and os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT_LINUX, reason="full isolation needs root on Linux")
HOSTILE = Limits(
    wall_s=3.0, cpu_s=2, memory_bytes=512 << 20, nproc=16, output_bytes=4096, tmpfs_bytes=16 << 20
)


def _sandbox_processes(uids) -> list[tuple[int, int, str]]:
    """Live (non-zombie) processes, anywhere on the host, of the given sandbox uids."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        uid = int(fields["Uid"].split()[0])
        zombie = fields["State"].strip().startswith("Z")
        if uid >= sandbox.UID_BASE and uid in uids and not zombie:
            found.append((int(entry.name), uid, fields["Name"].strip()))
    return found


def _assert_no_leftovers(*uids, timeout_s: float = 3.0) -> None:
    """No process of these kernels' uids is left (the module's own kernel may live on)."""
    assert uids and None not in uids
    deadline = time.monotonic() + timeout_s
    while _sandbox_processes(uids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sandbox_processes(uids) == []


def _kernel_uid(ci: CodeInterpreter):
    return ci._kernel[0].uid if ci._kernel else None


@pytest.fixture(scope="module")
def ci():
    with CodeInterpreter(HOSTILE) as interpreter:
        yield interpreter


def _assert_usable_and_fresh(ci, result: CellResult, old_uid) -> None:
    """After a restart: state is gone, the new kernel answers, the old one left nothing."""
    assert result.restarted
    assert "The kernel was restarted" in result.observation()
    assert "variables are lost" in result.observation()
    after = ci.run("print('marker' in globals(), 6 * 7)")
    assert (after.status, after.output) == ("ok", "False 42\n"), after
    if ROOT_LINUX:
        assert _kernel_uid(ci) != old_uid
        _assert_no_leftovers(old_uid)


def test_state_persists_between_cells(tmp_path):
    with CodeInterpreter(HOSTILE) as ci:
        assert ci.run("x = 20\nimport json\nopen('note.txt', 'w').write('kept')").status == "ok"
        result = ci.run("x += 1\nprint(json.dumps({'x': x}), open('note.txt').read())")
        assert (result.status, result.output) == ("ok", '{"x": 21} kept\n'), result
        # A bare last expression is shown, as in a notebook; None is not.
        assert ci.run("x * 2").output == "42\n"
        assert ci.run("None").observation() == "Finished execution."
        # An exception keeps the kernel and its state.
        error = ci.run("y = x\n1 / 0")
        assert (error.status, error.restarted) == ("error", False)
        assert error.detail == "ZeroDivisionError: division by zero"
        assert 'File "<cell 5>", line 2' in error.output
        assert error.observation().startswith("Error: ZeroDivisionError")
        assert ci.run("print(y)").output == "21\n"
        # The working directory is the host's: the file is there.
        assert (ci.workdir / "note.txt").read_text() == "kept"
        workdir = ci.workdir
    assert not workdir.exists()  # close() removed it


def test_figure_comes_back_as_png(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    limits = Limits(wall_s=60.0, cpu_s=60, memory_bytes=2 << 30, nproc=16)
    with CodeInterpreter(limits, out_dir=tmp_path / "figs") as ci:
        code = (
            "import matplotlib.pyplot as plt\n"
            "plt.figure(figsize=(2, 1), dpi=50)\n"
            "plt.plot([0, 1], [1, 0])\n"
            "print(plt.get_backend())"
        )
        result = ci.run(code)
        assert result.status == "ok", result
        assert result.output.strip().lower() == "agg"
        assert result.images == (tmp_path / "figs" / "figure-1-0.png",)
        data = result.images[0].read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert imread(result.images[0]).shape[:2] == (50, 100)
        assert "![figure-1-0.png](" in result.observation()
        # Figures are closed after the cell: the next cell returns none.
        assert ci.run("print(len(plt.get_fignums()))").output == "0\n"


def test_upload_then_read(tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("a,b\n1,2\n")
    with CodeInterpreter(HOSTILE, files=[data]) as ci:
        assert ci.run("print(open('data.csv').read().split())").output == "['a,b', '1,2']\n"
        later = tmp_path / "later.txt"
        later.write_text("second")
        assert ci.upload(later) == "later.txt"
        assert ci.run("print(open('later.txt').read())").output == "second\n"
        with pytest.raises(ValueError, match="not a file"):
            ci.upload(tmp_path / "missing.txt")


@needs_root
def test_upload_does_not_follow_a_planted_link(tmp_path):
    """The kernel makes `data.csv` a link to a host file; uploading data.csv must replace the
    link, not write through it as root."""
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    victim.chmod(0o644)
    src = tmp_path / "up" / "data.csv"
    src.parent.mkdir()
    src.write_text("uploaded")
    with CodeInterpreter(HOSTILE) as ci:
        assert ci.run(f"import os\nos.symlink({str(victim)!r}, 'data.csv')").status == "ok"
        ci.upload(src)
        assert ci.run("print(open('data.csv').read())").output == "uploaded\n"
    assert victim.read_text() == "original"


def test_infinite_loop_times_out_and_restarts(ci):
    ci.run("marker = 1")
    old_uid = _kernel_uid(ci)
    t0 = time.monotonic()
    result = ci.run("print('started')\nwhile True:\n    pass")
    assert result.status == "timeout", result
    assert time.monotonic() - t0 < HOSTILE.wall_s + 3.0
    assert result.output == "started\n"  # what it printed before it was stopped
    assert "Error:" in result.observation()
    _assert_usable_and_fresh(ci, result, old_uid)


def test_cpu_limit_is_per_cell():
    """Cells that each stay under cpu_s run, though together they pass it; a cell over it is
    stopped (CPU limit, or the wall clock when the machine is busy)."""
    busy = (
        "import time\n"
        "t = time.process_time()\n"
        "while time.process_time() - t < 0.6:\n    pass\n"
        "print('done')"
    )
    with CodeInterpreter(Limits(wall_s=30.0, cpu_s=1, memory_bytes=512 << 20)) as ci:
        assert [ci.run(busy).status for _ in range(2)] == ["ok", "ok"]
        result = ci.run("while True:\n    pass")
        assert (result.status, result.restarted) == ("timeout", True), result
        assert result.detail == "the code ran past the CPU limit of 1 s per cell"


@needs_root
def test_fork_bomb_is_contained(ci):
    ci.run("marker = 1")
    old_uid = _kernel_uid(ci)
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    result = ci.run(bomb)
    assert result.status == "timeout", result
    _assert_usable_and_fresh(ci, result, old_uid)
    # Without the except, forks fail at RLIMIT_NPROC: an error in the cell, the kernel lives.
    result = ci.run("import os\nwhile True:\n    os.fork()")
    assert result.status in ("error", "timeout"), result
    assert ci.run("print('alive')").output == "alive\n"
    deadline = time.monotonic() + 3.0  # the forked copies exit at their first failed fork
    while len(_sandbox_processes({_kernel_uid(ci)})) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_sandbox_processes({_kernel_uid(ci)})) == 1  # the kernel alone


def test_forked_child_does_not_answer_for_the_kernel(ci):
    """A child forked by a cell runs on to the end of the cell too: it must exit there, not
    send a second reply nor take the next request."""
    code = "import os\npid = os.fork()\nif pid:\n    os.waitpid(pid, 0)\nprint(pid > 0)"
    result = ci.run(code)
    assert (result.status, result.restarted) == ("ok", False), result
    for n in range(3):
        after = ci.run(f"print({n})")
        assert (after.status, after.output, after.restarted) == ("ok", f"{n}\n", False), after
    if ROOT_LINUX:
        assert len(_sandbox_processes({_kernel_uid(ci)})) == 1  # the kernel alone


@pytest.mark.parametrize(
    "code",
    ["x = bytearray(64 * 2**30)", "marker = []\nwhile True:\n    marker.append(bytearray(2**24))"],
)
def test_memory_cap(ci, code):
    ci.run("marker = 1")
    old_uid = _kernel_uid(ci)
    result = ci.run(code)
    assert result.status == "memory", result
    assert "MemoryError" in result.observation()
    _assert_usable_and_fresh(ci, result, old_uid)


def test_os_exit_kills_the_kernel_which_restarts(ci):
    ci.run("marker = 1")
    old_uid = _kernel_uid(ci)
    result = ci.run("print('bye')\nimport os\nos._exit(3)")
    assert result.status == "died", result
    assert "bye" in result.output
    assert result.detail == "the kernel exited (exit status 3)"
    assert result.observation().startswith("bye\nError: the kernel exited (exit status 3).\n")
    _assert_usable_and_fresh(ci, result, old_uid)


def test_directory_size_is_capped(ci):
    """A cell that keeps writing files is stopped once the directory passes its cap; the files
    stay (the model is told to delete them) and the next cell can."""
    ci.run("marker = 1")
    old_uid = _kernel_uid(ci)
    code = "i = 0\nwhile True:\n    open(f'blob{i}', 'wb').write(b'x' * 2**20)\n    i += 1"
    result = ci.run(code)
    assert result.status == "died", result
    assert "size limit of 16 MiB" in result.observation()
    size = sum(p.stat().st_size for p in ci.workdir.glob("blob*"))
    assert 16 << 20 < size < 1 << 30  # stopped soon after the cap, not at the wall clock
    _assert_usable_and_fresh(ci, result, old_uid)
    cleanup = ci.run(
        "import os\nfor f in os.listdir():\n    os.remove(f) if f.startswith('blob') else None"
    )
    assert cleanup.status == "ok", cleanup
    assert list(ci.workdir.glob("blob*")) == []


def test_output_is_capped(ci):
    result = ci.run("for i in range(10000):\n    print('x' * 100)")
    assert result.status == "ok"
    assert len(result.output) < HOSTILE.output_bytes + 100
    assert "bytes cut" in result.output


def test_printed_text_cannot_forge_a_reply(ci):
    fake = '\\x00\\x00\\x00\\x2a{"cell": 99, "status": "ok", "error": "", "images": []}'
    result = ci.run(f"import sys\nsys.stdout.write('{fake}')\nraise ValueError('real')")
    assert (result.status, result.detail) == ("error", "ValueError: real")


@needs_root
def test_cannot_write_outside_its_directory(ci):
    # Under /tmp, not pytest's 0700 tmp_path: the kernel can reach it, the mount is the guard.
    target = Path(tempfile.mkdtemp(prefix="qwen-jax-canary-"))
    target.chmod(0o777)
    canary = target / "canary.txt"
    canary.write_text("original")
    canary.chmod(0o666)  # world-writable: only the read-only mount stands in the way
    before = (canary.read_text(), canary.stat().st_mtime_ns, sorted(os.listdir(target)))
    for code in (
        f"open({str(canary)!r}, 'w').write('owned')",
        f"import os\nos.remove({str(canary)!r})",
        f"open({str(target / 'new.txt')!r}, 'w').write('x')",
        "open('/tmp/qwen-jax-ci-escape', 'w').write('x')",
    ):
        result = ci.run(code)
        assert (result.status, result.restarted) == ("error", False), (code, result)
        assert "Read-only file system" in result.detail
    after = (canary.read_text(), canary.stat().st_mtime_ns, sorted(os.listdir(target)))
    shutil.rmtree(target)
    assert after == before
    assert not Path("/tmp/qwen-jax-ci-escape").exists()


@needs_root
def test_no_network_not_even_host_loopback(ci):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)"
        result = ci.run(code)
        assert result.status == "error", result
        assert "unreachable" in result.detail.lower()
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever reached the host's listener
    finally:
        server.close()


@needs_root
def test_host_environment_and_processes_are_invisible(ci, monkeypatch):
    secret = "qwen-jax-ci-secret-51d2"
    monkeypatch.setenv("QWEN_JAX_CI_SECRET", secret)
    canary = subprocess.Popen(["sleep", "60"])
    try:
        code = f"""
import os, signal
print(sorted(os.environ))
for pid in ({os.getpid()}, {canary.pid}):
    try:
        print(open(f'/proc/{{pid}}/environ', 'rb').read())
    except OSError as e:
        print('environ', pid, type(e).__name__)
os.kill({canary.pid}, signal.SIGKILL)
"""
        result = ci.run(code)
        assert secret not in result.output
        assert "QWEN_JAX_CI_SECRET" not in result.output
        assert f"environ {os.getpid()} FileNotFoundError" in result.output
        assert (result.status, result.detail) == (
            "error",
            "ProcessLookupError: [Errno 3] No such process",
        )
        assert canary.poll() is None  # the host's process is alive
    finally:
        canary.kill()
        canary.wait()


def test_close_leaves_nothing_behind():
    before = {p.name for p in Path(tempfile.gettempdir()).glob("qwen-jax-ci-*")}
    ci = CodeInterpreter(HOSTILE)
    assert ci.run("import subprocess\np = subprocess.Popen(['sleep', '60'])").status == "ok"
    uid = _kernel_uid(ci)
    ci.close()
    if ROOT_LINUX:
        _assert_no_leftovers(uid)
    assert {p.name for p in Path(tempfile.gettempdir()).glob("qwen-jax-ci-*")} == before
    with pytest.raises(RuntimeError, match="closed"):
        ci.run("1")


@pytest.mark.parametrize(
    "action_input, code",
    [
        ("```py\nprint(1)\n```", "print(1)"),
        ("```python\nx = 1\nprint(x)\n```\nThis prints 1.", "x = 1\nprint(x)"),
        ("```\nprint(2)", "print(2)"),  # generation stopped before the closing fence
        ('{"code": "print(3)"}', "print(3)"),
        ("{'code': '```py\\nprint(4)\\n```',}", "print(4)"),  # json5: quotes, trailing comma
        ("print(5)", "print(5)"),
        ("{not json at all", "{not json at all"),
    ],
)
def test_extract_code(action_input, code):
    assert extract_code(action_input) == code


def test_code_interpreter_tool_is_qwens():
    """The whole description line as Qwen's code-interpreter prompt renders it: the code
    sentence where other tools ask for a JSON object (written out, not built by the code)."""
    assert CODE_INTERPRETER.name == "code_interpreter"
    assert CODE_INTERPRETER.name_for_human == "代码解释器"
    assert react.tool_description(CODE_INTERPRETER) == (
        "code_interpreter: Call this tool to interact with the 代码解释器 API. "
        "What is the 代码解释器 API useful for? 代码解释器，可用于执行Python代码。 "
        'Parameters: [{"name": "code", "description": "待执行的代码", "required": true, '
        '"schema": {"type": "string"}}] '
        "Enclose the code within triple backticks (`) at the beginning and end of the code."
    )


@needs_root
def test_children_that_exit_between_cells_do_not_hold_the_process_limit():
    """Children that outlive their cell and exit before the next one are zombies until reaped:
    as such they count against RLIMIT_NPROC, so the next cell's fork must find them reaped."""
    limits = Limits(wall_s=10.0, cpu_s=5, memory_bytes=512 << 20, nproc=8)
    with CodeInterpreter(limits) as ci:
        spawn = (
            "import os, time\n"
            "for _ in range(7):\n    if os.fork() == 0:\n        time.sleep(0.5)\n        break"
        )
        assert ci.run(spawn).status == "ok"
        uid = _kernel_uid(ci)
        deadline = time.monotonic() + 10.0  # the children sleep, then exit at the cell's end
        while len(_sandbox_processes({uid})) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_sandbox_processes({uid})) == 1
        result = ci.run(
            "import os\npid = os.fork()\nif pid:\n    os.waitpid(pid, 0)\n    print('forked')"
        )
        assert (result.status, result.output) == ("ok", "forked\n"), result
