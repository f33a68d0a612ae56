"""The code sandbox stops what a completion's program must not do, scores it 0, and leaves nothing behind."""

import os
import socket
import time
from pathlib import Path

import pytest

from soup.rewards.sandbox import Limits, run_python

FAST = Limits(timeout_s=2.0, cpu_s=2)
PASSING_TAIL = "\ndef f(x):\n    return x + 1\nassert f(1) == 2\n"


def sandbox_dirs() -> set[str]:
    import tempfile

    return {p.name for p in Path(tempfile.gettempdir()).glob("soup-sandbox-*")}


def processes_of_nobody() -> int:
    count = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            if "\nUid:\t65534\t" in status.read_text():
                count += 1
        except OSError:
            pass
    return count


@pytest.fixture(autouse=True)
def leaves_nothing_behind():
    dirs, procs = sandbox_dirs(), processes_of_nobody()
    yield
    assert sandbox_dirs() == dirs
    assert processes_of_nobody() <= procs


def test_a_passing_program_passes():
    result = run_python("print('hello')" + PASSING_TAIL, FAST)
    assert result.passed and result.status == "passed" and "hello" in result.output


def test_a_failing_assert_fails():
    assert run_python("assert 1 == 2", FAST).status == "failed"


def test_an_infinite_loop_is_stopped_by_the_timeout():
    started = time.monotonic()
    result = run_python("while True:\n    pass" + PASSING_TAIL, FAST)
    assert not result.passed and result.status in ("timeout", "killed")
    assert time.monotonic() - started < 5


def test_a_memory_bomb_is_stopped():
    result = run_python("x = bytearray(10 ** 10)" + PASSING_TAIL, FAST)
    assert not result.passed and "MemoryError" in result.output


def test_a_fork_bomb_is_stopped_and_every_process_is_gone():
    started = time.monotonic()
    result = run_python("import os\nwhile True:\n    os.fork()" + PASSING_TAIL, FAST)
    assert not result.passed
    assert time.monotonic() - started < 6


def test_a_network_connection_is_refused(tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    port = server.getsockname()[1]
    for program in (f"import socket\nsocket.create_connection(('127.0.0.1', {port}))",
                    f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))"):
        result = run_python(program + PASSING_TAIL, FAST)
        assert not result.passed, program
    with pytest.raises(socket.timeout):
        server.accept()
    server.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="without root the program has the user's file permissions "
                                                "(soup/rewards/sandbox.py says so)")
def test_a_write_outside_its_directory_is_refused(tmp_path):
    target = tmp_path / "outside.txt"
    result = run_python(f"open({str(target)!r}, 'w').write('x')" + PASSING_TAIL, FAST)
    assert not result.passed and "Permission denied" in result.output
    assert not target.exists()


def test_output_is_capped():
    result = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", FAST)
    assert not result.passed and len(result.output) <= 2 * 64 * 1024
