"""Launcher for one untrusted program: namespaces, read-only filesystem, limits, then exec.

Run as a script (`python -I -S -B _jail.py CONFIG_JSON`), never imported by the host: it runs
between the host's fork and the untrusted program's exec, so it must stay single-threaded and
use the standard library only. `sandbox.py` builds CONFIG_JSON and reads the outcome.

With `isolate` set (needs root on Linux) the launcher unshares the mount, network, PID, IPC and
UTS namespaces and forks; the child is PID 1 of a fresh PID namespace, so when it exits or is
killed every process the program started dies with it (the kernel guarantees this; no process
can leave the namespace). In the child's private mount namespace every mount is re-bound
read-only, the working directory becomes a size-capped tmpfs (the host's copy of the staged
files is read before and written back after), and a fresh /proc shows only the namespace.
The child then sets the resource limits, drops to a uid used by no one else (so RLIMIT_NPROC
counts this program's processes only), forbids privilege gain (no_new_privs, so setuid binaries
do not help), arms a parent-death SIGKILL, and execs the program.

Two options serve a long-lived process (the code interpreter's kernel, `sandbox.spawn`):
`bind_workdir` keeps the host's working directory itself as the writable cwd (bind-mounted
read-write in the sealed namespace, handed recursively to the sandbox uid) so the host sees the
files it writes, and `expose` makes host directories (a venv under a 0700 /root) reachable
read-only at the same path. A `cpu_s` of null leaves RLIMIT_CPU unlimited (the kernel arms it
per cell).

Without `isolate` only the limits and (as root) the uid drop apply; the host then sweeps the
uid's processes itself. Exit code 125 with a `qwen-jax-jail:` line on stderr means the launcher
itself failed (for example unshare refused), not the program.
"""

import ctypes
import json
import os
import resource
import select
import signal
import stat
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
JAIL_FAILED = 125

_libc = ctypes.CDLL(None, use_errno=True)


def _fail(msg: str) -> None:
    os.write(2, f"qwen-jax-jail: {msg}\n".encode())
    os._exit(JAIL_FAILED)


def _call(name: str, *args) -> None:
    if getattr(_libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}{args!r}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None) -> None:
    enc = [None if a is None else a.encode() for a in (source, target, fstype, data)]
    _call("mount", enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3])


def _mount_points() -> list[str]:
    """Mount points of this namespace (field 5 of mountinfo, octal escapes undone)."""
    points = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            raw = line.split()[4].decode()
            points.append(raw.encode().decode("unicode_escape"))
    return points


def _blocking_ancestor(path: str) -> str | None:
    """The outermost directory above `path` that "other" may not search, if any."""
    parts = path.strip("/").split("/")[:-1]
    for i in range(len(parts)):
        ancestor = "/" + "/".join(parts[: i + 1])
        if not os.stat(ancestor).st_mode & stat.S_IXOTH:
            return ancestor
    return None


def _expose(paths: list[str]) -> None:
    """Make each directory in `paths` reachable read-only at its own path: a small tmpfs over
    the blocking ancestor holds the path down to a bind mount of the real directory (the rest
    of that ancestor is hidden). Runs in the private mount namespace, before the read-only pass.
    """
    paths = [p for p in paths if not any(p != q and p.startswith(q + "/") for q in paths)]
    fds = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in paths}  # before anything is hidden
    blocked = {}
    for p in paths:
        ancestor = _blocking_ancestor(p)
        if ancestor is not None:
            blocked.setdefault(ancestor, []).append(p)
    for ancestor in sorted(blocked, key=len):
        _mount("tmpfs", ancestor, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
        for p in blocked[ancestor]:
            os.makedirs(p, mode=0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{fds[p]}", p, None, MS_BIND | MS_REC)
    for fd in fds.values():
        os.close(fd)


def _seal_filesystem(workdir: str, tmpfs_bytes: int, uid: int, cfg: dict) -> None:
    """Private mount namespace: everything read-only except the working directory (a tmpfs,
    or with `bind_workdir` the host's directory itself)."""
    bind = cfg.get("bind_workdir", False)
    staged = {}
    for name in [] if bind else os.listdir(workdir):
        with open(os.path.join(workdir, name), "rb") as f:
            staged[name] = f.read()
    # Without MS_PRIVATE the remounts below would propagate back to the host's mounts.
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    if uid is not None:
        _expose(cfg.get("expose", []))
    for point in _mount_points():
        # A bind remount changes the flags of this namespace's view only; the superblock (and
        # every other namespace) keeps writing normally.
        try:
            _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)
        except OSError:
            if point == "/":
                raise
    if bind:
        # A bind mount starts with its source's (now read-only) flags; the remount clears them.
        _mount(workdir, workdir, None, MS_BIND)
        _mount(None, workdir, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)
    else:
        opts = f"size={tmpfs_bytes},mode=0700,uid={uid},gid={uid}"
        _mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, opts)
    for name, data in staged.items():
        path = os.path.join(workdir, name)
        with open(path, "wb") as f:
            f.write(data)
        os.chown(path, uid, uid)
    # /proc of the new PID namespace: the program sees its own processes only.
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _set_limits(limits: dict) -> None:
    def both(res, value):
        resource.setrlimit(res, (value, value))

    both(resource.RLIMIT_AS, limits["memory_bytes"])
    # Soft limit sends SIGXCPU (catchable), the hard one a second later SIGKILL.
    if limits["cpu_s"] is not None:
        resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"] + 1))
    both(resource.RLIMIT_NPROC, limits["nproc"])
    both(resource.RLIMIT_FSIZE, limits["file_bytes"])
    both(resource.RLIMIT_NOFILE, limits["nofile"])
    both(resource.RLIMIT_CORE, 0)


def _become(cfg: dict, parent_alive_fd: int | None) -> None:
    """Limits, drop privileges, exec the program (never returns)."""
    uid = cfg["uid"]
    _set_limits(cfg["limits"])
    os.chdir(cfg["workdir"])
    if uid is not None and cfg.get("bind_workdir", False):
        # The host's directory is the program's, with all it holds (files a previous kernel
        # of the same conversation, under another uid, left). lchown: links are not followed;
        # a file with other hard links may be a host file linked in (no mount guard in uid mode).
        for root, dirs, files in os.walk("."):
            for name in dirs + files:
                path = os.path.join(root, name)
                if name in dirs or os.lstat(path).st_nlink == 1:
                    os.lchown(path, uid, uid)
        os.chown(".", uid, uid)
        os.chmod(".", 0o700)
    elif uid is not None and not cfg["isolate"]:
        # No tmpfs in this mode: the host's directory itself becomes the program's (0700).
        for name in os.listdir("."):
            os.chown(name, uid, uid)
        os.chown(".", uid, uid)
        os.chmod(".", 0o700)
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    _call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    # Set after the uid change, which clears it. Kills the program if the launcher dies.
    _call("prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent_alive_fd is not None:
        # The launcher may have died before PDEATHSIG was armed: its pipe end is then closed.
        if select.select([parent_alive_fd], [], [], 0)[0]:
            os._exit(JAIL_FAILED)
        os.close(parent_alive_fd)
    os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])


def _wait_and_mirror(pid: int) -> None:
    """Wait for the namespace's PID 1 and exit the way it did."""
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # these two take no handler at all
            signal.signal(sig, signal.SIG_DFL)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.kill(os.getpid(), sig)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else JAIL_FAILED)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    base = cfg["uid_base"]
    cfg["uid"] = None if base is None else base + os.getpid()
    # The launcher dies with the host thread that started it (its child then dies too).
    _call("prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if not cfg["isolate"]:
        try:
            _become(cfg, None)
        except Exception as e:
            _fail(f"setup failed: {type(e).__name__}: {e}")
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    try:
        _call("unshare", flags)
    except OSError as e:
        _fail(f"unshare failed: {e}")
    alive_r, alive_w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(alive_r)
        _wait_and_mirror(pid)
    os.close(alive_w)
    try:
        _seal_filesystem(cfg["workdir"], cfg["limits"]["tmpfs_bytes"], cfg["uid"], cfg)
        _become(cfg, alive_r)
    except Exception as e:  # report and never fall through to running unsandboxed
        _fail(f"setup failed: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
