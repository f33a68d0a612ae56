"""Run a completion's Python against a row's tests, in a process tree that cannot hurt the run.

`run_python(solution, tests, limits)` starts soup/rewards/sandbox_supervisor.py (its
docstring draws the process tree) and returns how the program ended. What holds:

Always
- `python -I -S` (no site-packages, no user site, no PYTHON* variables), a minimal
  environment, stdin at end of file, in an empty directory; soup's temporary directory
  (output files) is removed afterwards.
- RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE (bytes per file, stdout/stderr included),
  RLIMIT_CORE=0 and RLIMIT_NPROC (processes, above what the user already runs: the limit
  is per user, not per program), and no_new_privs.
- A wall-clock timeout, then SIGKILL; nothing the program started outlives the call.
- It passes only if the solution and then the tests ran to the end without an exception:
  the runner writes a per-run random token on a channel of its own, so `sys.exit(0)` or
  `os._exit(0)` before the tests scores 0. Code that digs the token out of the
  interpreter's memory, or tests that compare with `==` on objects the solution controls
  (an `__eq__` that always says True), can still pass: write tests that check types.
- stdout and stderr go to files capped by RLIMIT_FSIZE and are read back truncated.
- When soup runs as root, the program runs as user `nobody`, with the first Python
  interpreter nobody can run (soup's own, else python3 in /usr/bin or /usr/local/bin).

With namespaces (isolation "namespaces": soup runs as root with CAP_SYS_ADMIN, as in a
VM or a privileged container, or as a user the kernel lets create user namespaces;
`describe_sandbox()` says which held here)
- No network: a new network namespace with only a loopback that is down; a program that
  starts another interpreter or a binary gets no network either.
- New pid namespace: when the program ends or times out, the kernel kills every process
  left in it, including ones that called setsid or daemonised.
- Every mount read-only; /tmp (its working directory) and /dev/shm are private tmpfs,
  each capped at `tmp_mb` and gone with the namespace. Not root, the program keeps no
  capability in its user namespace, so it cannot remount anything writable.

Without them (isolation "none": unshare refused, e.g. a non-root user where unprivileged
user namespaces are disabled, or a container without CAP_SYS_ADMIN, or `isolation="none"`)
- Network blocked only by replacing socket constructors inside the program's Python:
  ctypes or a child process gets through.
- Leftover processes are found through the supervisor (a child subreaper) and killed.
- Not root: the program has the user's file permissions (only RLIMIT_FSIZE bounds
  writes elsewhere). Root: it runs as nobody, which can still write in world-writable
  directories (/tmp, /var/tmp, /dev/shm); such files stay behind.
For every guarantee, run code rewards where namespaces work: as root in a VM or a
privileged container, or as a user allowed unprivileged user namespaces.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from soup.errors import ConfigError, SoupError

SUPERVISOR = Path(__file__).with_name("sandbox_supervisor.py")
NOBODY = 65534
# Extra seconds soup waits for the supervisor, which enforces timeout_s itself, before it
# kills the supervisor's process group (init dies with it, and the namespace with init).
BACKSTOP_S = 10.0
Status = Literal["passed", "failed", "exited", "timeout", "crashed"]


@dataclass(frozen=True)
class Limits:
    """What one program may use; the defaults suit unit-test-sized programs.

    timeout_s: wall clock from start to SIGKILL.
    cpu_s: RLIMIT_CPU, CPU seconds per process.
    memory_mb: RLIMIT_AS, address space per process (a bit above what it can touch).
    file_mb: RLIMIT_FSIZE, the largest file it may write (stdout and stderr included).
    tmp_mb: size of each of its private tmpfs, /tmp and /dev/shm (namespaces only).
    processes: RLIMIT_NPROC above the tasks its user already runs.
    output_kb: how much of stdout and of stderr soup reads back.
    isolation: "auto" (namespaces where the kernel allows, else none) or "none".
    """

    timeout_s: float = 5.0
    cpu_s: int = 5
    memory_mb: int = 1024
    file_mb: int = 1
    tmp_mb: int = 64
    processes: int = 32
    output_kb: int = 64
    isolation: Literal["auto", "none"] = "auto"


@dataclass(frozen=True)
class SandboxResult:
    """How one program ended.

    status: passed (solution and tests ran to the end), failed (an exception: a failed
      assert, an error, MemoryError), exited (left before the end, e.g. sys.exit or
      os._exit), timeout (killed at timeout_s) or crashed (killed by a signal: RLIMIT_CPU,
      a segfault).
    isolation: "namespaces" or "none" (see the module docstring).
    readonly_refused: mount points that could not be made read-only (namespaces only).
    """

    status: Status
    isolation: str
    stdout: str
    stderr: str
    wall_s: float
    readonly_refused: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_python(solution: str, tests: str, limits: Limits = Limits()) -> SandboxResult:
    """Run `solution` then `tests` (asserts) as one program in the sandbox; see the module doc.

    Raises SoupError when the sandbox itself fails (an environment problem, never the
    program's doing); anything the program does is a status.
    """
    as_nobody = os.geteuid() == 0
    interpreter = _interpreter(as_nobody)
    started = time.monotonic()
    nonce = secrets.token_hex(16)
    soup_dir = Path(tempfile.mkdtemp(prefix="soup-sandbox-"))
    try:
        # The program's directory when there are no namespaces; with them it works in a tmpfs.
        work = soup_dir / "work"
        work.mkdir()
        if as_nobody:
            os.chown(work, NOBODY, NOBODY)
        payload = json.dumps({"nonce": nonce, "solution": solution, "tests": tests}).encode()
        with open(soup_dir / "stdout", "wb") as out, open(soup_dir / "stderr", "wb") as err, \
                open(soup_dir / "report", "wb") as report, open(soup_dir / "done", "wb") as done:
            config = {"interpreter": interpreter, "as_nobody": as_nobody, "isolation": limits.isolation,
                      "workdir": str(work), "timeout_s": limits.timeout_s, "cpu_s": limits.cpu_s,
                      "memory_bytes": limits.memory_mb << 20, "file_bytes": limits.file_mb << 20,
                      "tmp_bytes": limits.tmp_mb << 20, "processes": limits.processes,
                      "report_fd": report.fileno(), "done_fd": done.fileno()}
            supervisor = subprocess.Popen(
                [sys.executable, "-I", "-S", str(SUPERVISOR), json.dumps(config)], cwd=soup_dir, env={},
                stdin=subprocess.PIPE, stdout=out, stderr=err, pass_fds=(report.fileno(), done.fileno()),
                start_new_session=True)
            try:
                supervisor.communicate(payload, timeout=limits.timeout_s + BACKSTOP_S)
            except subprocess.TimeoutExpired:  # the supervisor itself hung: end everything it started
                for group in (supervisor.pid, _report(soup_dir).get("program_group")):
                    if group:
                        _kill_group(group)
                supervisor.wait()
        fields = _report(soup_dir)
        cap = limits.output_kb << 10
        stdout, stderr = _read(soup_dir / "stdout", cap), _read(soup_dir / "stderr", cap)
        finished = "isolation" in fields and (fields["timed_out"] or "program_status" in fields)
        if "setup_error" in fields or not finished:
            raise SoupError(
                "the code sandbox failed to run a program: "
                f"{fields.get('setup_error') or f'supervisor exit {supervisor.returncode}: {stderr[-500:]}'}\n"
                "  fix: this is the machine, not the program: see soup/rewards/sandbox.py for what it needs "
                "(fork, setuid to nobody when root); the code reward's isolation=none skips namespaces.")
        status = _status(fields, nonce=nonce, done=_read(soup_dir / "done", 64))
        return SandboxResult(status, fields["isolation"], stdout, stderr, time.monotonic() - started,
                             tuple(fields.get("readonly_refused", ())))
    finally:
        shutil.rmtree(soup_dir, ignore_errors=True)


def _report(soup_dir: Path) -> dict:
    """The supervisor's JSON lines (sandbox_supervisor.py's docstring), merged into one dict."""
    lines = _read(soup_dir / "report", 1 << 20).splitlines()
    return {key: value for line in lines if line.strip() for key, value in json.loads(line).items()}


def _kill_group(group: int) -> None:
    try:
        os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _status(report: dict, *, nonce: str, done: str) -> Status:
    if report["timed_out"]:
        return "timeout"
    raw = report["program_status"]
    if os.WIFSIGNALED(raw):
        return "crashed"
    code = os.waitstatus_to_exitcode(raw)
    if code == 0 and done == nonce:
        return "passed"
    return "exited" if code == 0 else "failed"


def _read(path: Path, cap: int) -> str:
    with open(path, "rb") as f:
        return f.read(cap).decode("utf-8", errors="replace")


@lru_cache(maxsize=2)
def _interpreter(as_nobody: bool) -> str:
    """The Python the program runs with: soup's own, or (as nobody) the first nobody can run."""
    if not as_nobody:
        return sys.executable
    candidates = [os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"]
    for candidate in candidates:
        if _others_can_run(Path(candidate)):
            return str(Path(candidate).resolve())
    raise ConfigError(
        "the code reward runs programs as user nobody (soup runs as root), and user nobody cannot run any of: "
        f"{', '.join(candidates)}.\n"
        "  fix: install a system Python (apt-get install python3-minimal), or run soup as a non-root user.")


def _others_can_run(path: Path) -> bool:
    """Whether a user with no special rights may run `path`: o+x on it and every folder above."""
    try:
        real = path.resolve(strict=True)
        return all(os.stat(p).st_mode & 0o001 for p in (real, *real.parents))
    except OSError:
        return False


def describe_sandbox(limits: Limits = Limits()) -> str:
    """One line for the run's effective-features log: what isolation a program really gets here."""
    result = run_python("", "", limits)
    user = "nobody" if os.geteuid() == 0 else "soup's user"
    where = ("pid/net/mount namespaces, read-only root, private /tmp" if result.isolation == "namespaces"
             else "no namespaces (sockets blocked in Python only)")
    refused = f", not read-only: {', '.join(result.readonly_refused)}" if result.readonly_refused else ""
    return (f"code sandbox: {where}{refused}, as {user}, timeout {limits.timeout_s:g}s, "
            f"memory {limits.memory_mb} MiB, {limits.processes} processes")
