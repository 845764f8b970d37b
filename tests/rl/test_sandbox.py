"""Tests of the code sandbox: scores, limits, isolation, no trace left, and a score that cannot be forged.

Most tests need the full sandbox (root, namespaces): where the machine refuses it they fail with the probe's
reason (the ``full_sandbox`` fixture in ``tests/rl/conftest.py``); nothing here is skipped. The
``SandboxUnavailable`` and weak-mode tests run everywhere.
"""

from __future__ import annotations

import doctest
import errno
import logging
import os
import socket
import stat
import time
import uuid
from pathlib import Path

import pytest

from brainstacks_hooks.errors import BrainstacksError
from brainstacks_hooks.rl import sandbox
from brainstacks_hooks.rl.sandbox import SandboxUnavailable, bound_names, plan_test, run_python_tests

REPO = Path(__file__).resolve().parents[2]
needs_sandbox = pytest.mark.usefixtures("full_sandbox")  # fails where the machine refuses the sandbox

ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]


def _sandbox_processes() -> list[tuple[int, str]]:
    """Every process (zombies included) that runs as a sandbox uid: there must be none between runs."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                uid = os.stat(f"/proc/{entry}").st_uid
                with open(f"/proc/{entry}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if sandbox.UID_BASE <= uid < sandbox.UID_BASE + sandbox.UID_SPAN:
                found.append((int(entry), state))
    return found


def _bsbx_temp_dirs() -> set[str]:
    return {name for name in os.listdir("/tmp") if name.startswith("bsbx-")}


@pytest.fixture
def no_trace():
    """Fail if a run leaves a sandbox process or a sandbox temporary directory behind."""
    dirs_before = _bsbx_temp_dirs()
    assert _sandbox_processes() == []
    yield
    assert _sandbox_processes() == []
    assert _bsbx_temp_dirs() <= dirs_before


# ---------------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------------

@needs_sandbox
def test_correct_code_scores_one(no_trace) -> None:
    assert run_python_tests(ADD, ADD_TESTS) == 1.0


@needs_sandbox
def test_partially_correct_code_scores_the_fraction(no_trace) -> None:
    code = "def add(a, b):\n    return abs(a) + b\n"  # wrong only for negative a
    assert run_python_tests(code, ADD_TESTS) == pytest.approx(2 / 3)
    assert run_python_tests("def add(a, b):\n    return None\n", ADD_TESTS) == 0.0


@needs_sandbox
def test_failures_to_run_score_zero(no_trace) -> None:
    assert run_python_tests("def add(a, b) return a", ADD_TESTS) == 0.0  # syntax error
    assert run_python_tests(ADD + "raise RuntimeError('boom')\n", ADD_TESTS) == 0.0  # top-level error
    assert run_python_tests(ADD + "x = input()\n", ADD_TESTS) == 0.0  # stdin is /dev/null: EOFError
    assert run_python_tests("", ADD_TESTS) == 0.0
    assert run_python_tests(ADD, []) == 0.0


@needs_sandbox
def test_values_compare_with_python_semantics(no_trace) -> None:
    code = (
        "import collections\n"
        "def pairs(n):\n    return ((i, n - i) for i in range(1, n))\n"  # a generator
        "def counts(s):\n    return collections.Counter(s)\n"  # a dict subclass
        "def point():\n    return collections.namedtuple('P', 'x y')(1, 2)\n"  # a tuple subclass
        "def half(x):\n    return x / 2\n"
        "def sum(a, b):\n    return a * b\n"  # shadows the builtin the check would otherwise use
        "def lazy():\n    return map(str, [1])\n"
        "if __name__ == '__main__':\n    raise SystemExit(1)\n"  # does not run
    )
    tests = [
        "assert set(pairs(3)) == {(1, 2), (2, 1)}",
        "assert counts('aab') == {'a': 2, 'b': 1}",
        "assert point() == (1, 2)",
        "assert math.isclose(half(1), 0.5) and half(3) == 1.5",
        "assert sum(2, 3) == 6",
        "assert lazy() == ['1']",  # a map object is not a list, in Python as here
        "assert list(lazy()) == ['1']",
    ]
    assert run_python_tests(code, tests) == pytest.approx(6 / 7)


@needs_sandbox
def test_setup_code_runs_before_the_completion(no_trace) -> None:
    setup = ("class Node:\n    def __init__(self, v, nxt=None):\n        self.v, self.nxt = v, nxt\n"
             "head = Node(1, Node(2))\n")
    code = "def length(node):\n    return 0 if node is None else 1 + length(node.nxt)\n"
    assert run_python_tests(code, ["assert length(head) == 2"], setup_code=setup) == 1.0
    assert run_python_tests(code, ["assert length(head) == 2"]) == 0.0  # NameError without the setup


# ---------------------------------------------------------------------------------------------------------
# Limits: each gives 0 and leaves no process and no file
# ---------------------------------------------------------------------------------------------------------

@needs_sandbox
def test_infinite_loop_is_killed_at_the_wall_clock_limit(no_trace) -> None:
    for code in (ADD + "while True:\n    pass\n", ADD + "import time\ntime.sleep(60)\n"):
        start = time.monotonic()
        assert run_python_tests(code, ADD_TESTS, timeout_s=1.0) == 0.0
        assert time.monotonic() - start < 1.0 + 1.5


@needs_sandbox
def test_fork_bomb_is_contained_and_cleaned_up(no_trace) -> None:
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    assert run_python_tests(ADD + bomb, ADD_TESTS, timeout_s=1.0) == 0.0
    assert time.monotonic() - start < 1.0 + 1.5
    # RLIMIT_NPROC bites (it would not for root): the sandbox cannot get past MAX_PROCESSES processes.
    counter = (
        "import os, time\n"
        "def forks():\n    n = 0\n    try:\n        while n < 100:\n            if os.fork() == 0:\n"
        "                time.sleep(30)\n                os._exit(0)\n            n += 1\n"
        "    except OSError:\n        pass\n    return n\n"
    )
    assert run_python_tests(counter, [f"assert 1 <= forks() < {sandbox.MAX_PROCESSES}"]) == 1.0


@needs_sandbox
def test_two_gigabyte_allocation_fails(no_trace) -> None:
    start = time.monotonic()
    assert run_python_tests(ADD + "x = bytearray(2 * 1024 ** 3)\n", ADD_TESTS) == 0.0
    assert time.monotonic() - start < 5.0
    probe = "def alloc():\n    try:\n        bytearray(2 * 1024 ** 3)\n        return 'ok'\n" \
            "    except MemoryError:\n        return 'MemoryError'\n"
    assert run_python_tests(probe, ["assert alloc() == 'MemoryError'"]) == 1.0  # RLIMIT_AS, not a crash


WRITER = (
    "def write(path):\n    try:\n        with open(path, 'w') as f:\n            f.write('pwned')\n"
    "        return 'written'\n    except OSError as e:\n        return e.errno\n"
    "def read(path):\n    with open(path) as f:\n        return f.read()\n"
)


@needs_sandbox
def test_writes_outside_its_directory_fail_and_leave_no_trace(tmp_path, no_trace) -> None:
    name = f"bsbx-test-{uuid.uuid4().hex}"
    # /var/tmp and /dev/shm are world-writable on the host: only the read-only remount stops these.
    world_writable = [p for p in (f"/var/tmp/{name}", f"/dev/shm/{name}") if os.path.isdir(os.path.dirname(p))]
    for path in world_writable:
        assert os.stat(os.path.dirname(path)).st_mode & stat.S_IWOTH
    others = [str(tmp_path / name), str(REPO / name), f"/run/{name}", f"/etc/{name}"]
    outside = world_writable + others
    try:
        tests = [f"assert write({p!r}) == 'written'" for p in outside]
        assert run_python_tests(WRITER, tests) == 0.0
        # read-only mounts answer EROFS; a repository under /tmp (a CI clone) is hidden by the private /tmp
        # instead (ENOENT): the write fails either way, which the first check above asserts for every path
        repo_errnos = (errno.EROFS, errno.ENOENT)
        erofs = [f"assert write({p!r}) == {errno.EROFS}" for p in [*world_writable, f"/run/{name}"]]
        erofs.append(f"assert write({str(REPO / name)!r}) in {repo_errnos}")
        assert run_python_tests(WRITER, erofs) == 1.0
        # Its own /tmp is a private tmpfs: writing /tmp/<name> works in there and leaves nothing on the host.
        own = f"assert write('/tmp/{name}') == 'written' and read('/tmp/{name}') == 'pwned'"
        assert run_python_tests(WRITER, [own]) == 1.0
        for path in [*outside, f"/tmp/{name}"]:
            assert not os.path.exists(path), path
    finally:  # should the sandbox ever regress, do not leave its files behind
        for path in [*outside, f"/tmp/{name}"]:
            if os.path.isfile(path):
                os.unlink(path)


@needs_sandbox
def test_network_is_unreachable(no_trace, tmp_path) -> None:
    connect = (
        "import socket\n"
        "def connect(port):\n    try:\n        socket.create_connection(('127.0.0.1', port), timeout=2).close()\n"
        "        return 'connected'\n    except OSError as e:\n        return e.errno\n"
        "def connect_unix(path):\n    try:\n        s = socket.socket(socket.AF_UNIX)\n        s.connect(path)\n"
        "        return 'connected'\n    except OSError as e:\n        return e.errno\n"
    )
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    unix_path = f"/run/bsbx-test-{uuid.uuid4().hex}.sock"
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        unix.bind(unix_path)
        os.chmod(unix_path, 0o777)  # any uid may connect, so only hiding /run stops it
        unix.listen()
        unix.setblocking(False)
        assert run_python_tests(connect, [f"assert connect({port}) == 'connected'"]) == 0.0
        assert run_python_tests(connect, [f"assert connect_unix({unix_path!r}) == 'connected'"]) == 0.0
        assert run_python_tests(connect, [f"assert connect({port}) == {errno.ENETUNREACH}"]) == 1.0
        for sock in (listener, unix):
            with pytest.raises(BlockingIOError):
                sock.accept()  # nothing ever connected
    finally:
        listener.close()
        unix.close()
        if os.path.exists(unix_path):
            os.unlink(unix_path)


@needs_sandbox
def test_runs_unprivileged_isolated_and_with_an_empty_environment(no_trace, monkeypatch) -> None:
    monkeypatch.setenv("BSBX_TRAINER_SECRET", "hunter2")
    code = (
        "import os, sys\n"
        "def ids():\n    return [os.getuid(), os.geteuid(), os.getgid()]\n"
        "def groups():\n    return os.getgroups()\n"
        "def env():\n    return sorted(os.environ)\n"
        "def stdin():\n    return sys.stdin.read()\n"
        "def flags():\n    return (sys.flags.isolated, sys.flags.no_site)\n"
        "def pids():\n    return sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
        "def fds():\n    return sorted(int(f) for f in os.listdir('/proc/self/fd'))[:4]\n"
    )
    tests = [
        f"assert min(ids()) >= {sandbox.UID_BASE} and len(set(ids())) == 1",
        "assert groups() == []",
        "assert env() == ['HOME', 'LANG', 'PATH', 'TMPDIR']",
        "assert stdin() == ''",
        "assert flags() == (1, 1)",
        "assert pids() == [1, 2]",  # its own PID namespace: the launcher and itself
        "assert fds() == [0, 1, 2, 3]",
    ]
    assert run_python_tests(code, tests) == 1.0


# ---------------------------------------------------------------------------------------------------------
# The score cannot be forged
# ---------------------------------------------------------------------------------------------------------

@needs_sandbox
def test_exiting_before_the_tests_scores_zero(no_trace) -> None:
    endings = ("import os\nos._exit(0)\n", "import sys\nsys.exit(0)\n", "import os\nos.kill(os.getpid(), 9)\n",
               "import atexit, os\natexit.register(os._exit, 0)\nraise SystemExit(0)\n")
    for ending in endings:
        assert run_python_tests(ADD + ending, ADD_TESTS) == 0.0


@needs_sandbox
def test_printing_a_fake_success_marker_scores_zero(no_trace) -> None:
    code = (
        "import sys\n"
        "def add(a, b):\n    return None\n"
        "print('PASSED 3/3'); print('score: 1.0'); print('OK')\n"
        "print('bsbx:score 3 3'); print('bsbx:done')\n"  # the launcher's own report format, on stdout
        "sys.stderr.write('bsbx:score 3 3\\nbsbx:done\\n')\n"
    )
    assert run_python_tests(code, ADD_TESTS) == 0.0


@needs_sandbox
def test_forged_result_lines_are_worth_only_the_values_they_carry(no_trace) -> None:
    header = "import os, json\ndef add(a, b):\n    return None\n"
    verdicts = (  # verdict-shaped forgeries: ignored
        "os.write(3, b'{\"t\":0,\"pass\":true}\\n{\"score\":1.0}\\n{\"t\":1,\"v\":[]}\\nPASSED\\n')\n"
        "os._exit(0)\n"
    )
    assert run_python_tests(header + verdicts, ADD_TESTS) == 0.0
    truthy = ("for i in range(3):\n    os.write(3, json.dumps({'t': i, 'v': [['v', True]]}).encode() + b'\\n')\n"
              "os._exit(0)\n")
    assert run_python_tests(header + truthy, ADD_TESTS) == 0.0  # True == 3 is False in the check
    duplicated = "os.write(3, b'{\"t\":0,\"v\":[[\"v\",{\"i\":\"3\"}]]}\\n')\n"  # then the harness writes its own
    assert run_python_tests("def add(a, b):\n    return a + b\n" + header.split("\n")[0] + "\n" + duplicated,
                            ADD_TESTS) == pytest.approx(2 / 3)
    # Forging the right value for test 0 is worth exactly what hard-coding it is worth.
    exact = "os.write(3, b'{\"t\":0,\"v\":[[\"v\",{\"i\":\"3\"}]]}\\n')\nos._exit(0)\n"
    assert run_python_tests(header + exact, ADD_TESTS) == run_python_tests("def add(a, b):\n    return 3\n", ADD_TESTS)


@needs_sandbox
def test_rigged_equality_cannot_cross_the_boundary(no_trace) -> None:
    always_equal = "class A:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return A()\n"
    assert run_python_tests(always_equal, ADD_TESTS) == 0.0
    rigged_int = "class I(int):\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return I(0)\n"
    assert run_python_tests(rigged_int, ADD_TESTS) == pytest.approx(1 / 3)  # crosses as the int 0


def test_plan_test_keeps_expected_values_out_of_the_sandbox() -> None:
    plan = plan_test("assert add(1, 2) == 3")
    assert plan.probes == (("add(1, 2)", False),)
    assert plan.check == "__probe__[0] == 3"
    plan = plan_test("assert math.isclose(area(2), 12.566, rel_tol=0.001)\nassert not is_odd(2)")
    assert [p for p, _ in plan.probes] == ["area(2)", "is_odd(2)"]
    assert "12.566" in plan.check and "12.566" not in repr(plan.probes)
    # Arithmetic on a sandbox value is done in the sandbox (its cost cannot be chosen by the completion).
    assert plan_test("assert 'a' * count(3) == 'aaa'").probes == (("'a' * count(3)", False),)
    # A builtin the completion rebinds is called in the sandbox, where it resolves as in Python.
    shadowed = bound_names("def sorted(x):\n    return x\n")
    assert plan_test("assert sorted(f(1)) == [1]", shadowed).probes == (("sorted(f(1))", False),)
    assert "*" in bound_names("from math import *")


@pytest.mark.parametrize("bad", ["print(1)", "x = 1\nassert x == 1", "assert (", "", "def f(): pass"])
def test_tests_must_be_assert_statements(bad) -> None:
    with pytest.raises(ValueError):
        plan_test(bad)
    with pytest.raises(ValueError):
        run_python_tests(ADD, [bad])


def test_tests_must_be_a_sequence_and_limits_in_range() -> None:
    with pytest.raises(ValueError, match="sequence"):
        run_python_tests(ADD, "assert add(1, 2) == 3")
    with pytest.raises(ValueError, match="timeout_s"):
        run_python_tests(ADD, ADD_TESTS, timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        run_python_tests(ADD, ADD_TESTS, memory_mb=8)


# ---------------------------------------------------------------------------------------------------------
# Where the machine refuses the sandbox
# ---------------------------------------------------------------------------------------------------------

def test_refuses_to_run_without_namespaces(monkeypatch) -> None:
    monkeypatch.setattr(sandbox, "_namespaces_available", lambda: (False, "simulated: unshare refused"))
    with pytest.raises(SandboxUnavailable, match="simulated: unshare refused") as info:
        run_python_tests(ADD, ADD_TESTS)
    assert isinstance(info.value, BrainstacksError)
    assert "allow_weak_sandbox" in str(info.value)


def test_a_refusing_unshare_is_detected_by_the_probe(monkeypatch, tmp_path) -> None:
    fake = tmp_path / "unshare"
    fake.write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n")
    fake.chmod(0o755)
    real_which = sandbox.shutil.which
    monkeypatch.setattr(sandbox.shutil, "which", lambda name, *a, **k: str(fake) if name == "unshare"
                        else real_which(name, *a, **k))
    monkeypatch.setattr(sandbox, "_PROBED", {})  # forget the cached probe
    monkeypatch.setattr(os, "geteuid", lambda: 0)  # as if root, so that the probe gets as far as unshare
    available, reason = sandbox._namespaces_available()
    assert not available
    assert "Operation not permitted" in reason
    with pytest.raises(SandboxUnavailable, match="Operation not permitted"):
        run_python_tests(ADD, ADD_TESTS)


def test_weak_sandbox_is_opt_in_and_warns(monkeypatch, caplog, no_trace) -> None:
    monkeypatch.setattr(sandbox, "_namespaces_available", lambda: (False, "simulated"))
    monkeypatch.setattr(sandbox, "_WEAK_WARNED", False)
    with caplog.at_level(logging.WARNING, logger="brainstacks_hooks"):
        assert run_python_tests("def add(a, b):\n    return abs(a) + b\n", ADD_TESTS,
                                allow_weak_sandbox=True) == pytest.approx(2 / 3)
    assert any("WEAK sandbox" in r.getMessage() for r in caplog.records)
    # Even the weak mode kills what the code left running (as root, every process of the fresh uid).
    bomb = ("import os\nwhile True:\n    try:\n        if os.fork() == 0:\n            os.setsid()\n"
            "    except OSError:\n        pass\n")
    start = time.monotonic()
    assert run_python_tests(ADD + bomb, ADD_TESTS, timeout_s=1.0, allow_weak_sandbox=True) == 0.0
    assert time.monotonic() - start < 1.0 + 4.0


@needs_sandbox  # the run_python_tests example runs code in the sandbox
def test_docstring_examples() -> None:
    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(sandbox):
        runner.run(test)
    assert runner.failures == 0 and runner.tries >= 4
