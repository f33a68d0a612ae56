"""The code sandbox's supervisor: soup/rewards/sandbox.py starts it; read that module first.

Run as `python -I -S sandbox_supervisor.py CONFIG_JSON`, as soup's own user, with only the
standard library (it imports nothing from soup). Its stdin is the program's payload, which
only the runner (RUNNER, below) reads.

With namespaces (soup is root with CAP_SYS_ADMIN, or a user the kernel lets create user namespaces):

    supervisor    host namespaces; waits for init until the deadline, then SIGKILLs it
      init        pid 1 of new pid + network + mount namespaces: every mount read-only, a
                  private /proc, size-capped tmpfs on /tmp and /dev/shm; reaps orphans.
                  When init exits (or dies) the kernel kills everything left in the namespace.
        program   user nobody when soup is root; rlimits; no new privileges; then
                  execve(python -I -S -c RUNNER) with /tmp, an empty tmpfs, as its directory

Without them (unshare refused, or isolation "none"): the supervisor, a child subreaper,
starts the program itself in an empty directory, and afterwards kills every process left
below it; orphans are reparented to a subreaper, so one that called setsid is still found.

Report (JSON lines on CONFIG["report_fd"], never visible to the program):
    {"program_group": pid}                              without namespaces, at start
    {"program_status": <os.waitpid status>}            from whoever reaped the program
    {"isolation": "namespaces"|"none", "timed_out": b}  always last
    {"setup_error": "..."}                              the program could not be started
"""

import ctypes
import fcntl
import json
import os
import re
import resource
import signal
import sys
import time

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
MS_NOATIME, MS_NODIRATIME, MS_RELATIME, MS_STRICTATIME = 0x400, 0x800, 0x200000, 0x1000000
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
NOBODY = 65534
# A bind remount must keep these per-mount flags: inside a user namespace they are locked,
# and dropping one fails with EPERM (mount(2), "locked mounts").
_KEPT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
               "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}

# What the program process runs. Everything it needs comes on stdin (the payload is gone from
# stdin once read). It runs the solution, then the tests, in one namespace; only if both finish
# without an exception does it write the run's nonce to fd 3, so leaving early (sys.exit,
# os._exit, a signal) never counts as passing. `write` and friends are bound before any
# program code runs, so monkeypatching os/builtins cannot intercept them. Python-level
# socket blocking is a second line behind the network namespace (and the only one without it).
RUNNER = r"""# soup-code-sandbox runner
def run():
    import json, os, socket, sys, traceback
    write, exit_now, compile_, exec_, print_exc = os.write, os._exit, compile, exec, traceback.print_exc
    payload = json.loads(sys.stdin.buffer.read())
    token = payload.pop("nonce").encode()

    def refused(*args, **kwargs):
        raise OSError("network access is disabled in soup's code sandbox")

    import _socket
    for module in (socket, _socket):
        for name in ("socket", "SocketType", "create_connection", "create_server", "socketpair", "fromfd"):
            if hasattr(module, name):
                setattr(module, name, refused)
    sys.argv = ["solution.py"]
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec_(compile_(payload["solution"], "solution.py", "exec"), namespace)
        exec_(compile_(payload["tests"], "tests.py", "exec"), namespace)
    except BaseException:
        print_exc()
        code = 1
    else:
        write(3, token)
        code = 0
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    exit_now(code)
run()
"""

_libc = ctypes.CDLL(None, use_errno=True)


def _call(name, *args):
    """A libc call that raises OSError (with errno) when it fails."""
    if getattr(_libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}: {os.strerror(errno)}")


def _report(config, **fields):
    os.write(config["report_fd"], (json.dumps(fields) + "\n").encode())


def _tasks_of(uid):
    """How many tasks (threads count, as for RLIMIT_NPROC) `uid` runs now."""
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    status = f.read()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if fields.get("Uid", "").split()[:1] == [str(uid)]:
                count += int(fields.get("Threads", "1"))
    return count


def _enter_namespaces():
    """unshare pid + net + mount namespaces; True on success, False when the kernel refuses.

    Root unshares them directly (it then runs the program as nobody). Any other user needs a
    new user namespace too, mapping only itself: the program, exec'd with that non-zero uid,
    keeps no capability, so it cannot undo the read-only mounts. (Root inside a fresh user
    namespace could not map nobody without a helper in the parent namespace: it falls back.)
    """
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWNS | (0 if uid == 0 else CLONE_NEWUSER)
    if _libc.unshare(flags) != 0:
        return False
    if uid != 0:
        for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1\n"),
                           ("/proc/self/gid_map", f"{gid} {gid} 1\n")):
            with open(path, "w") as f:
                f.write(text)
    return True


def _mounts():
    """(mount point, per-mount options) of every mount, parents before children."""
    with open("/proc/self/mountinfo") as f:
        rows = [line.split() for line in f]

    def unescape(path):  # mountinfo writes a space as \040
        return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)

    return sorted(((unescape(r[4]), r[5].split(",")) for r in rows), key=lambda m: m[0].count("/"))


def _private_filesystem(config):
    """In the new mount namespace: everything read-only, a fresh /proc, private tmpfs for /tmp
    and /dev/shm. Returns the mount points that could not be made read-only (reported)."""
    _call("mount", b"none", b"/", None, MS_REC | MS_PRIVATE, None)  # nothing propagates to the host
    refused = []
    for point, options in _mounts():
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY
        for option in options:
            flags |= _KEPT_FLAGS.get(option, 0)
        if _libc.mount(None, point.encode(), None, flags, None) != 0:
            refused.append(point)
    # A procfs of the new pid namespace: the program sees only its own processes.
    if _libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) != 0:
        refused.append("/proc (new procfs)")
    tmpfs = f"size={config['tmp_bytes']},mode=1777".encode()
    for point in (b"/tmp", b"/dev/shm"):
        if os.path.isdir(point):
            _call("mount", b"tmpfs", point, b"tmpfs", MS_NOSUID | MS_NODEV, tmpfs)
    os.chdir("/tmp")
    return refused


def _exec_program(config, tasks_now):
    """In the child that becomes the program: drop to its user, set limits, exec the runner."""
    os.dup2(config["done_fd"], 3)  # the runner's success channel (inheritable)
    os.setpgid(0, 0)  # a group of its own, which the supervisor can kill in one call
    if config["as_nobody"]:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    # After the uid change, so its RLIMIT_NPROC check at execve sees root's (unlimited) limit;
    # counted above what the user already runs, since the limit is per user, not per program.
    for limit, value in ((resource.RLIMIT_AS, config["memory_bytes"]), (resource.RLIMIT_CPU, config["cpu_s"]),
                         (resource.RLIMIT_FSIZE, config["file_bytes"]), (resource.RLIMIT_CORE, 0),
                         (resource.RLIMIT_NPROC, tasks_now + config["processes"])):
        resource.setrlimit(limit, (value, value))
    _call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # no setuid binary can raise it again
    interpreter = config["interpreter"]
    env = {"PATH": "/usr/bin:/bin", "HOME": os.getcwd(), "LANG": "C.UTF-8"}
    os.execve(interpreter, [interpreter, "-I", "-S", "-c", RUNNER], env)


def _run_init(config, tasks_now):
    """pid 1 of the namespaces: set up the filesystem, start the program, reap until it ends."""
    _call("prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # supervisor killed: namespace goes too
    refused = _private_filesystem(config)
    if refused:
        _report(config, readonly_refused=refused)
    program = os.fork()
    if program == 0:
        _start(_exec_program, config, tasks_now)
    while True:  # orphans of the program are reparented to us: reap them too
        pid, status = os.waitpid(-1, 0)
        if pid == program:
            _report(config, program_status=status)
            os._exit(0)


def _start(target, config, tasks_now):
    """Run target in a forked child; any failure before the program starts is reported."""
    try:
        target(config, tasks_now)
    except BaseException as exc:
        _report(config, setup_error=f"{type(exc).__name__}: {exc}")
    os._exit(70)


def _wait(pid, deadline):
    """os.waitpid status of pid, or None when the deadline passed first."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.005)


def _kill_descendants(program):
    """SIGKILL the program's process group, then every process below us, until we have no
    child left, live or zombie. The group kill is one call the kernel makes race-free
    against fork; the sweep finds processes that left the group: as a child subreaper we
    inherit every orphan, so the tree below us holds all of them."""
    try:
        os.killpg(program, signal.SIGKILL)
    except ProcessLookupError:
        pass
    while True:
        for pid in _descendants(os.getpid()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return
        time.sleep(0.002)


def _descendants(root):
    """Every process below `root` in the process tree, from one read of /proc."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            found.append(child)
            stack.append(child)
    return found


def main():
    config = json.loads(sys.argv[1])
    deadline = time.monotonic() + config["timeout_s"]
    # Move both channels above fd 3 (which the program's done channel becomes) and mark them
    # close-on-exec: the program never holds the report, and holds `done` only as fd 3.
    for key in ("report_fd", "done_fd"):
        moved = fcntl.fcntl(config[key], fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(config[key])
        config[key] = moved
    tasks_now = _tasks_of(NOBODY if config["as_nobody"] else os.getuid())
    isolated = config["isolation"] == "auto" and _enter_namespaces()
    if not isolated:
        _call("prctl", PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        os.chdir(config["workdir"])
    child = os.fork()
    if child == 0:
        _start(_run_init if isolated else _exec_program, config, tasks_now)
    if not isolated:  # soup's backstop kills this group if we ever hang (init has PDEATHSIG instead)
        _report(config, program_group=child)
    status = _wait(child, deadline)
    if status is None:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    elif not isolated:
        _report(config, program_status=status)
    if not isolated:
        _kill_descendants(child)
    _report(config, isolation="namespaces" if isolated else "none", timed_out=status is None)


if __name__ == "__main__":
    main()
