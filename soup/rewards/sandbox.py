"""Running a completion's Python against a row's tests, in a subprocess that cannot hurt the run.

Each program runs as `python -I -S` (no user site, no PYTHON* variables, no site
packages) in a fresh empty temporary directory that is removed afterwards, in its own
process group (killed whole on the wall-clock timeout), with:

- RLIMIT_AS (memory), RLIMIT_CPU (seconds), RLIMIT_FSIZE (bytes per file written) and
  RLIMIT_NPROC (processes) set before it starts;
- no network: a fresh network namespace (unshare(CLONE_NEWNET): only a down loopback)
  where the kernel allows it, and in every case a start-up hook that replaces
  socket.socket before the program runs;
- when soup runs as root, the program runs as `nobody` instead: root ignores
  RLIMIT_NPROC and may write anywhere, `nobody` may write only to its own directory.
  It runs the first Python interpreter `nobody` can reach (soup's own, else python3 on
  PATH): the program needs only the standard library.
  Not as root, the program has the user's file permissions (only the size limit applies
  to writes outside its directory): run RL with code rewards as root in a container, or
  as a dedicated user, for that guarantee.
- stdout and stderr go to files in its directory, capped by RLIMIT_FSIZE and read back
  truncated, so a program printing without end cannot fill memory.

A program that passes its tests exits 0; anything else (a failed assert, a crash, a
limit hit, the timeout) is a failure, and `SandboxResult.status` says which.
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CLONE_NEWNET = 0x40000000
PR_SET_CHILD_SUBREAPER = 36
OUTPUT_CAP = 64 * 1024

# Runs before the program: no sockets, whatever the namespace allowed.
_BOOTSTRAP = """
import socket, sys
def _refused(*args, **kwargs):
    raise OSError("network access is disabled in soup's sandbox")
socket.socket = socket.create_connection = socket.socketpair = socket.create_server = _refused
sys.argv = ["program.py"]
source = open("program.py").read()
exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
"""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0
    cpu_s: int = 5
    memory_bytes: int = 1 << 30
    file_bytes: int = 1 << 20
    processes: int = 32


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str  # passed | failed | timeout | killed (a signal, e.g. a limit) | error (soup could not run it)
    output: str  # stdout then stderr, truncated to OUTPUT_CAP bytes each


def run_python(program: str, limits: Limits = Limits()) -> SandboxResult:
    """Run `program` (the completion's code followed by the row's tests) in the sandbox."""
    workdir = Path(tempfile.mkdtemp(prefix="soup-sandbox-"))
    # Processes the program orphans become ours, so we can reap them (PID 1 may not).
    _set_subreaper(True)
    interpreter = _interpreter()
    as_nobody = os.geteuid() == 0 and interpreter is not None
    interpreter = interpreter or sys.executable
    try:
        (workdir / "program.py").write_text(program, encoding="utf-8")
        if as_nobody:
            os.chown(workdir, 65534, 65534)
        with open(workdir / "stdout", "wb") as out, open(workdir / "stderr", "wb") as err:
            if as_nobody:
                os.chown(workdir / "stdout", 65534, 65534)
                os.chown(workdir / "stderr", 65534, 65534)
            proc = subprocess.Popen([interpreter, "-I", "-S", "-c", _BOOTSTRAP], cwd=workdir, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, env={"PATH": "/usr/bin:/bin", "HOME": str(workdir)},
                                    start_new_session=True, preexec_fn=_confine(limits, as_nobody))
            try:
                code = proc.wait(timeout=limits.timeout_s)
                status = "passed" if code == 0 else ("killed" if code < 0 else "failed")
            except subprocess.TimeoutExpired:
                status = "timeout"
            finally:
                _kill_group(proc)
        output = _read_capped(workdir / "stdout") + _read_capped(workdir / "stderr")
        return SandboxResult(status == "passed", status, output)
    except OSError as exc:
        return SandboxResult(False, "error", str(exc))
    finally:
        _set_subreaper(False)
        shutil.rmtree(workdir, ignore_errors=True)


def _set_subreaper(on: bool) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _interpreter() -> str | None:
    """A Python interpreter every user may run (so `nobody` can), or None."""
    for candidate in (os.path.realpath(sys.executable), shutil.which("python3", path="/usr/bin:/bin:/usr/local/bin")):
        if candidate and _world_executable(Path(candidate)):
            return candidate
    return None


def _world_executable(path: Path) -> bool:
    """Whether a user with no special rights may run `path`: o+x on it and on every folder above it."""
    try:
        real = path.resolve()
        return all(os.stat(p).st_mode & 0o001 for p in (real, *real.parents))
    except OSError:
        return False


def _confine(limits: Limits, as_nobody: bool):
    """The child's set-up between fork and exec (no Python objects shared with the parent)."""

    def setup() -> None:
        try:  # a network namespace with only a down loopback; the bootstrap blocks sockets regardless
            ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET)
        except (OSError, AttributeError):
            pass
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if as_nobody:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))

    return setup


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the program and everything it started (its process group), until none is left."""
    deadline = time.monotonic() + 5.0
    while True:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            break
        proc.poll()  # reap the leader, our child
        if not _live_members(proc.pid) or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    proc.wait()
    while time.monotonic() < deadline:  # reap what it started: they were reparented to us
        try:
            pid, _ = os.waitpid(-proc.pid, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.01)


def _live_members(pgid: int) -> bool:
    """Whether a process of group `pgid` is still running (zombies, which hold nothing, do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _read_capped(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(OUTPUT_CAP).decode("utf-8", errors="replace")
    except OSError:
        return ""
