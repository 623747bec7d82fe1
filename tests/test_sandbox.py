"""Sandbox: verdicts, limits, and hostile programs that must leave the host untouched.

Every hostile test checks the host afterwards (files, processes, sockets), not just the status.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from qwen_jax.evals import sandbox
from qwen_jax.evals.sandbox import Limits, classify, execute, execute_many

ROOT_LINUX = sys.platform == "linux" and os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT_LINUX, reason="full isolation needs root on Linux")
FAST = Limits(wall_s=5.0, cpu_s=3, memory_bytes=512 << 20)


def _sandbox_processes() -> list[tuple[int, str]]:
    """Live (non-zombie) processes owned by sandbox uids, anywhere on the host."""
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
        if uid >= sandbox.UID_BASE and not fields["State"].strip().startswith("Z"):
            found.append((int(entry.name), fields["Name"].strip()))
    return found


def _assert_no_leftovers(timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sandbox_processes() == []


def _sandbox_tempdirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("qwen-jax-sbx-*")}


@pytest.mark.skipif(not ROOT_LINUX, reason="the namespace mode exists only as root on Linux")
def test_namespaces_work_here():
    assert sandbox.isolation() == "namespaces"


def test_fallback_is_loud(monkeypatch):
    """If the namespace probe fails, isolation() says so with a RuntimeWarning."""
    broken = sandbox.ExecResult("error", 125, "", "qwen-jax-jail: unshare failed", "x", 0.0, "")
    monkeypatch.setattr(sandbox, "_run", lambda *a, **k: broken)
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 0)
    monkeypatch.setattr(sandbox.sys, "platform", "linux")
    sandbox.isolation.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="NOT blocked"):
            assert sandbox.isolation() == "uid"
    finally:
        sandbox.isolation.cache_clear()


@pytest.mark.parametrize(
    "source, status, detail",
    [
        ("assert sum([1, 2]) == 3\nprint('hi')", "passed", ""),
        ("assert 1 + 1 == 3, 'wrong sum'", "failed", "AssertionError: wrong sum"),
        ("def f(:\n    pass", "error", "SyntaxError"),
        ("{}['missing']", "error", "KeyError"),
        ("import sys\nsys.exit(3)", "error", "exit code 3"),
        # An early clean exit skips the tests: the end-of-program marker is never printed.
        ("import sys\nsys.exit(0)\nassert False", "failed", "exited before the end"),
    ],
)
def test_verdicts(source, status, detail):
    result = execute(source, FAST)
    assert result.status == status, result
    assert detail in result.detail
    if status == "passed":
        assert result.stdout == "hi\n"  # the marker is removed from what the caller sees


def test_classify_rules():
    m = "MARK"
    assert classify(0, False, "x\nMARK\n", "", m) == ("passed", "")
    assert classify(-signal.SIGKILL, True, "", "", m)[0] == "timeout"
    assert classify(-signal.SIGXCPU, False, "", "", m)[0] == "timeout"
    assert classify(1, False, "", "Traceback...\nMemoryError", m)[0] == "memory"
    err = "Traceback (most recent call last):\nOSError: [Errno 30] Read-only file system: '/x'"
    assert classify(1, False, "", err, m)[0] == "blocked"
    assert classify(1, False, "", "PermissionError: [Errno 13] denied", m)[0] == "blocked"
    assert classify(1, False, "", "ZeroDivisionError: division by zero", m)[0] == "error"


def test_infinite_loop_is_killed():
    t0 = time.monotonic()
    result = execute("while True:\n    pass", Limits(wall_s=4.0, cpu_s=1))
    assert result.status == "timeout"
    assert time.monotonic() - t0 < 4.0 + 3.0
    _assert_no_leftovers()


def test_sleeping_program_hits_wall_clock():
    result = execute("import time\ntime.sleep(600)", Limits(wall_s=1.5, cpu_s=5))
    assert (result.status, result.detail) == ("timeout", "wall-clock limit")
    assert result.wall_s < 1.5 + 3.0
    _assert_no_leftovers()


@pytest.mark.parametrize(
    "source",
    ["x = bytearray(64 * 2**30)", "chunks = []\nwhile True:\n    chunks.append(bytearray(2**24))"],
)
def test_memory_cap(source):
    result = execute(source, Limits(wall_s=20.0, cpu_s=15, memory_bytes=256 << 20))
    assert result.status == "memory", result


@needs_root
@pytest.mark.parametrize(
    "source",
    [
        "import os\nwhile True:\n    os.fork()",
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    ],
)
def test_fork_bomb_is_contained(source):
    result = execute(source, Limits(wall_s=3.0, cpu_s=2, nproc=16))
    assert result.status in ("blocked", "timeout"), result
    _assert_no_leftovers()


DAEMON = """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(600)
    os._exit(0)
"""


@needs_root
@pytest.mark.parametrize("mode", ["namespaces", "uid"])
def test_daemons_do_not_outlive_the_run(mode):
    """A double-forked, setsid'd child escapes the process group; it must die anyway (PID
    namespace teardown, or the uid sweep in the fallback mode)."""
    result = sandbox._run(DAEMON, FAST, mode=mode)
    assert result.status == "passed", result
    _assert_no_leftovers()


@needs_root
def test_cannot_write_or_delete_host_files(tmp_path):
    target = tmp_path / "shared"
    target.mkdir()
    canary = target / "canary.txt"
    canary.write_text("original")
    # World-writable on purpose: only the read-only mount stands between the program and it.
    target.chmod(0o777)
    canary.chmod(0o666)
    before = (canary.read_text(), canary.stat().st_mtime_ns, sorted(os.listdir(target)))
    attempts = {
        "overwrite": f"open({str(canary)!r}, 'w').write('owned')",
        "delete": f"import os\nos.remove({str(canary)!r})",
        "create": f"open({str(target / 'new.txt')!r}, 'w').write('x')",
        "tmp": "open('/tmp/qwen-jax-sandbox-escape', 'w').write('x')",
        "shm": "open('/dev/shm/qwen-jax-sandbox-escape', 'w').write('x')",
    }
    for name, source in attempts.items():
        result = execute(source, FAST)
        assert result.status == "blocked", (name, result)
    after = (canary.read_text(), canary.stat().st_mtime_ns, sorted(os.listdir(target)))
    assert after == before
    assert not Path("/tmp/qwen-jax-sandbox-escape").exists()
    assert not Path("/dev/shm/qwen-jax-sandbox-escape").exists()


def test_own_directory_is_writable_and_removed():
    dirs_before = _sandbox_tempdirs()
    source = (
        "import os, tempfile\n"
        "open('out.txt', 'w').write('data')\n"
        "assert open('out.txt').read() == 'data'\n"
        "assert tempfile.gettempdir() == os.getcwd() == os.environ['HOME']\n"
    )
    assert execute(source, FAST).status == "passed"
    assert _sandbox_tempdirs() == dirs_before


@needs_root
def test_no_network_not_even_host_loopback():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        connect = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)"
        result = execute(connect, FAST)
        assert result.status == "blocked", result
        resolve = "import socket\nsocket.getaddrinfo('pypi.org', 443)"
        assert execute(resolve, FAST).status == "blocked"
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever reached the host's listener
    finally:
        server.close()


@needs_root
def test_parent_environment_and_processes_are_invisible(monkeypatch):
    secret = "qwen-jax-secret-7f3a9c"
    monkeypatch.setenv("QWEN_JAX_TEST_SECRET", secret)
    canary = subprocess.Popen(["sleep", "60"])
    try:
        source = f"""
import os, signal
print(sorted(os.environ))
for pid in ({os.getpid()}, {canary.pid}):
    try:
        print(open(f'/proc/{{pid}}/environ', 'rb').read())
    except OSError as e:
        print('environ', pid, type(e).__name__)
print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))
os.kill({canary.pid}, signal.SIGKILL)
"""
        result = execute(source, FAST)
        assert secret not in result.stdout + result.stderr
        assert "QWEN_JAX_TEST_SECRET" not in result.stdout
        assert f"environ {os.getpid()} FileNotFoundError" in result.stdout
        assert result.status == "blocked"  # the kill found no such process
        assert canary.poll() is None  # the host's process is alive
    finally:
        canary.kill()
        canary.wait()


def test_output_is_capped():
    limits = Limits(wall_s=10.0, cpu_s=8, output_bytes=4096, file_bytes=1 << 20)
    result = execute("while True:\n    print('x' * 1000)", limits)
    assert result.status == "error" and "File too large" in result.detail
    assert len(result.stdout) < 4096 + 100
    assert "bytes cut" in result.stdout


def test_pool_keeps_order_and_runs_in_parallel():
    sources = [f"import time\ntime.sleep(1)\nprint({i})" for i in range(4)]
    t0 = time.monotonic()
    results = execute_many(sources, FAST, workers=2)
    elapsed = time.monotonic() - t0
    assert [r.stdout.strip() for r in results] == ["0", "1", "2", "3"]
    assert all(r.status == "passed" for r in results)
    assert elapsed < 4.0  # 2 workers: about 2 s, sequential would be over 4 s
