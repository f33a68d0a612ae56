"""The code sandbox stops what a completion's program must not do, scores it 0, and leaves nothing behind.

Most tests run twice: isolation "auto" (namespaces where this machine allows them) and
"none" (the fallback of machines that refuse unshare). Guarantees only namespaces give
(no network for a child process, a read-only filesystem, a private /tmp) are asserted
where namespaces are in use and skipped with the reason otherwise. Every test checks
afterwards that no sandbox process and no soup-sandbox-* directory is left.
"""

import os
import socket
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from soup.errors import ConfigError, SoupError
from soup.rewards import sandbox
from soup.rewards.sandbox import Limits, describe_sandbox, run_python

FAST = 2.0
# Wall-clock bounds leave room for a loaded machine: the status, not the time, is the check.
SLACK_S = 5.0
MODES = ["auto", "none"]


def limits(isolation, **overrides):
    return Limits(**{"timeout_s": FAST, "cpu_s": 2, "isolation": isolation, **overrides})


@pytest.fixture(scope="module")
def namespaces_here() -> bool:
    return run_python("", "", Limits(isolation="auto")).isolation == "namespaces"


def needs_namespaces(isolation, namespaces_here):
    if isolation == "none" or not namespaces_here:
        pytest.skip("only namespaces give this guarantee (soup/rewards/sandbox.py: 'Without them')")


def processes_matching(*needles: bytes) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if any(needle in cmdline for needle in needles):
                found.append(int(entry.name))
    return found


def sandbox_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("soup-sandbox-*")}


@pytest.fixture(autouse=True)
def leaves_nothing_behind():
    dirs = sandbox_dirs()
    yield
    assert sandbox_dirs() == dirs
    assert processes_matching(b"soup-code-sandbox", b"sandbox_supervisor.py", b"soup-escapee-") == []


@pytest.mark.parametrize("isolation", MODES)
def test_a_passing_program_passes_and_its_output_comes_back(isolation):
    result = run_python("def f(x):\n    print('called')\n    return x + 1", "assert f(1) == 2", limits(isolation))
    assert result.status == "passed" and result.passed and result.stdout == "called\n"


@pytest.mark.parametrize("isolation", MODES)
def test_a_failing_assert_fails_with_its_traceback(isolation):
    result = run_python("def f(x):\n    return x", "assert f(1) == 2", limits(isolation))
    assert result.status == "failed"
    assert 'File "tests.py", line 1' in result.stderr and "AssertionError" in result.stderr


@pytest.mark.parametrize("isolation", MODES)
def test_leaving_before_the_tests_run_is_not_a_pass(isolation):
    assert run_python("import os\nos._exit(0)", "assert False", limits(isolation)).status == "exited"
    assert run_python("import sys\nsys.exit(0)", "assert False", limits(isolation)).status == "failed"
    assert run_python("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "", limits(isolation)).status \
        == "crashed"


@pytest.mark.parametrize("isolation", MODES)
def test_an_infinite_loop_is_stopped_by_the_timeout(isolation):
    started = time.monotonic()
    result = run_python("while True:\n    pass", "", limits(isolation))
    # The CPU limit (as long as the timeout) can land first on a busy machine: stopped either way.
    assert result.status in ("timeout", "crashed") and not result.passed
    assert time.monotonic() - started < FAST + SLACK_S


def test_cpu_time_is_limited_below_the_wall_clock():
    started = time.monotonic()
    result = run_python("while True:\n    pass", "", limits("auto", timeout_s=10, cpu_s=1))
    assert result.status == "crashed"  # SIGXCPU at 1 CPU second, before the 10 s timeout
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("isolation", MODES)
def test_a_memory_bomb_is_stopped(isolation):
    generous = limits(isolation, timeout_s=10)  # ends at the memory limit, well before
    result = run_python("x = bytearray(10 * 2**30)", "", generous)  # 10 GiB at once
    assert result.status == "failed" and "MemoryError" in result.stderr
    result = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(2**26))", "", generous)
    # 64 MiB at a time, to the limit; zero-filling them costs CPU time, so on a loaded machine
    # the CPU limit (a crash by SIGXCPU) may land first. Stopped and scored 0 either way.
    assert (result.status == "failed" and "MemoryError" in result.stderr) or result.status == "crashed", result


@pytest.mark.parametrize("isolation", MODES)
def test_a_fork_bomb_is_bounded_and_every_process_is_gone(isolation):
    # Each process keeps forking whatever fails; RLIMIT_NPROC bounds the count, the timeout ends them.
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    started = time.monotonic()
    result = run_python(bomb, "", limits(isolation, processes=16))
    assert result.status == "timeout" and time.monotonic() - started < FAST + SLACK_S


@pytest.mark.parametrize("isolation", MODES)
def test_a_process_that_leaves_the_group_is_killed_too(isolation):
    tag = f"soup-escapee-{uuid.uuid4().hex[:8]}"
    daemon = (f"import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
              f"        os.execv('/bin/sleep', ['{tag}', '60'])\n    os._exit(0)\n")
    result = run_python(daemon, "import time\ntime.sleep(0.3)", limits(isolation))
    assert result.status == "passed"  # the program itself was fine; its daemon must still be gone
    assert processes_matching(tag.encode()) == []


@pytest.mark.parametrize("isolation", MODES)
def test_a_write_outside_its_directory_fails(isolation, tmp_path, namespaces_here):
    if isolation == "none" and os.geteuid() != 0:
        pytest.skip("without namespaces a non-root program has the user's file permissions (sandbox.py says so)")
    target = tmp_path / "outside.txt"
    result = run_python(f"open({str(target)!r}, 'w').write('x')", "", limits(isolation))
    assert result.status == "failed" and not target.exists()
    # namespaces: /tmp is a private tmpfs, so the path is not even there; as nobody: no permission
    assert any(error in result.stderr for error in ("FileNotFoundError", "PermissionError", "Read-only file system"))


@pytest.mark.parametrize("isolation", MODES)
def test_the_filesystem_is_read_only_and_tmp_is_private(isolation, namespaces_here):
    needs_namespaces(isolation, namespaces_here)
    name = f"soup-escapee-{uuid.uuid4().hex[:8]}"
    try:
        result = run_python(f"open('/tmp/{name}', 'w').write('x')\nopen('/var/tmp/{name}', 'w')", "",
                            limits(isolation))
        assert result.status == "failed" and "Read-only file system: '/var/tmp/" in result.stderr
        assert not Path(f"/tmp/{name}").exists() and not Path(f"/var/tmp/{name}").exists()
        result = run_python("import os\nprint(os.getcwd(), os.listdir('.'))", "", limits(isolation))
        assert result.stdout == "/tmp []\n" and result.readonly_refused == ()
    finally:  # only if the sandbox failed: never leave the test's own files behind
        for leaked in (Path(f"/tmp/{name}"), Path(f"/var/tmp/{name}")):
            leaked.unlink(missing_ok=True)


@pytest.mark.parametrize("isolation", MODES)
def test_file_sizes_are_capped(isolation):
    result = run_python("open('big', 'wb').write(b'x' * (5 << 20))", "", limits(isolation))  # 5 MiB > file_mb=1
    assert result.status == "failed" and "File too large" in result.stderr


def test_the_private_tmp_caps_the_total_written(namespaces_here):
    needs_namespaces("auto", namespaces_here)
    fill = "for i in range(80):\n    open(f'f{i}', 'wb').write(b'x' * ((1 << 20) - 1))"  # 80 MiB > tmp_mb=64
    result = run_python(fill, "", limits("auto"))
    assert result.status == "failed" and "No space left on device" in result.stderr


@pytest.mark.parametrize("isolation", MODES)
def test_output_is_capped(isolation):
    result = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", "",
                        limits(isolation, output_kb=8))
    assert result.status == "failed" and len(result.stdout) == 8 * 1024


@pytest.fixture
def listening_port():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.3)
    yield server
    server.close()


def assert_no_connection(server):
    with pytest.raises(socket.timeout):
        server.accept()


@pytest.mark.parametrize("isolation", MODES)
def test_a_network_connection_is_refused(isolation, listening_port):
    port = listening_port.getsockname()[1]
    for program in (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
                    f"import _socket\n_socket.socket().connect(('127.0.0.1', {port}))"):
        result = run_python(program, "", limits(isolation))
        assert result.status == "failed" and "OSError" in result.stderr, program
    assert_no_connection(listening_port)


@pytest.mark.parametrize("isolation", MODES)
def test_a_child_interpreter_gets_no_network_either(isolation, listening_port, namespaces_here):
    needs_namespaces(isolation, namespaces_here)
    port = listening_port.getsockname()[1]
    child = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)"
    program = f"import subprocess, sys\nassert subprocess.run([sys.executable, '-c', {child!r}]).returncode == 0"
    result = run_python(program, "", limits(isolation))
    assert result.status == "failed" and "Network is unreachable" in result.stderr
    assert_no_connection(listening_port)


def test_root_runs_programs_as_nobody():
    uid = run_python("import os\nprint(os.getuid())", "", limits("auto")).stdout.strip()
    assert uid == ("65534" if os.geteuid() == 0 else str(os.getuid()))


def test_root_without_an_interpreter_nobody_can_run_is_a_config_error(monkeypatch):
    sandbox._interpreter.cache_clear()
    monkeypatch.setattr(sandbox, "_others_can_run", lambda path: False)
    try:
        with pytest.raises(ConfigError, match="user nobody cannot run any of"):
            sandbox._interpreter(True)
    finally:
        sandbox._interpreter.cache_clear()


def test_describe_sandbox_says_what_holds_here(namespaces_here):
    line = describe_sandbox()
    assert line.startswith("code sandbox: ")
    assert ("namespaces" in line) is namespaces_here


def test_a_hung_supervisor_is_killed_by_the_backstop_and_raises(monkeypatch, tmp_path):
    hung = tmp_path / "hung_supervisor_soup_test.py"
    hung.write_text("import time\ntime.sleep(60)\n")
    monkeypatch.setattr(sandbox, "SUPERVISOR", hung)
    monkeypatch.setattr(sandbox, "BACKSTOP_S", 0.5)
    started = time.monotonic()
    with pytest.raises(SoupError, match="the code sandbox failed to run a program"):
        run_python("", "", limits("auto", timeout_s=0.5))
    assert time.monotonic() - started < 1 + SLACK_S and processes_matching(b"hung_supervisor_soup_test") == []


def test_a_setup_error_is_a_soup_error_not_a_score(monkeypatch, tmp_path):
    failing = tmp_path / "failing_supervisor.py"
    failing.write_text("import json, os, sys\nconfig = json.loads(sys.argv[1])\n"
                       "os.write(config['report_fd'], b'{\"setup_error\": \"PermissionError: setuid\"}\\n')\n")
    monkeypatch.setattr(sandbox, "SUPERVISOR", failing)
    with pytest.raises(SoupError, match="PermissionError: setuid\n  fix: "):
        run_python("", "", limits("auto"))
