"""Run model-written Python against MBPP-style ``assert`` statements in a real sandbox.

:func:`run_python_tests` returns the fraction of asserts that pass; it is what
:func:`brainstacks_hooks.rl.rewards.code_reward` is built on.

The score cannot be forged
--------------------------
**The sandboxed processes never report a verdict, only plain-data values, and every comparison with an
expected value is made by trusted code they cannot reach. So nothing they print, write or exit with can
earn more than an honest completion that returns those values.**

Each assert is split in two in the trainer (:func:`plan_test`). The *probes* are the parts that need the
completion's code: in ``assert add(1, 2) == 3`` that is the call ``add(1, 2)``. The *check* is the rest,
``__probe__[0] == 3``, written in a small whitelisted grammar: literals, displays, comparisons,
``and``/``or``/``not``, subscripts, and calls to a few bounded builtins (``set``, ``sorted``, ``len``,
``math.isclose``, ...). Only the probes enter the sandbox. The harness there runs the completion,
evaluates each probe and writes the values to a pipe as tagged JSON of exact builtin types (None, bool,
int, float, complex, str, bytes, list, tuple, set, frozenset, dict).

The launcher is trusted: it is the sandbox's parent and pid 1 of its PID namespace, it runs as root,
and the sandbox uid can neither signal nor trace it. It reads that pipe. Once the sandboxed processes
are dead, it decodes the values into fresh builtin objects and evaluates the checks under its own time
and memory limits. Then it reports ``passed/total`` on its stderr, which the sandbox has no handle to.
So:

* stdout and the exit status are ignored;
* a forged line on the pipe can only carry values, and a duplicate line for a test makes that test
  fail;
* calling ``os._exit(0)`` before the tests leaves no values, which scores 0;
* an object with a rigged ``__eq__`` cannot cross the boundary, because only data does.

A completion that knows the tests (MBPP prompts show them) can still hard-code the answers. No sandbox
can prevent that, and writing forged values is worth exactly as much as hard-coding them.

The sandbox
-----------
Isolation follows the order of a run, and each step names the mechanism that enforces it:

* ``unshare --net --pid --mount --ipc --uts --fork --kill-child --mount-proc`` starts the launcher in new
  namespaces. The network namespace has no interfaces up, so the network cannot be reached. The PID
  namespace guarantees that when the launcher exits, the kernel kills every process the code started.
* In its private mount namespace, the launcher remounts every mount read-only (a bind remount, which
  changes only this namespace's copy). It mounts a fresh size-limited tmpfs, owned by the sandbox uid,
  on ``/tmp`` (the working directory), and an empty read-only tmpfs over ``/run``, which hides
  world-writable unix sockets. It then checks that every mount except ``/tmp`` is read-only, and
  refuses to run otherwise. The tmpfs dies with the namespace, so nothing is left to clean up.
* It forks the child, which drops to a fresh unprivileged uid/gid (random, in ``[UID_BASE, UID_BASE +
  UID_SPAN)``, so concurrent runs do not share a process budget). The child sets ``no_new_privs`` and
  rlimits on CPU time, address space, file size, open files and processes (``RLIMIT_NPROC`` needs the
  non-root uid). It reads stdin from ``/dev/null``, writes stdout and stderr to files in the tmpfs,
  gets an empty environment (only ``PATH``, ``HOME``, ``TMPDIR`` and ``LANG``), and has the result pipe
  as fd 3. Then it execs ``python -I -S -B``: the stdlib only, with no site-packages and no user paths.
* The launcher enforces the wall-clock limit (``timeout_s``). When the child exits, it kills every
  process of the sandbox uid and exits itself, which tears down the namespace. As a backstop, the
  trainer kills the whole process group if the launcher overruns.

The launcher and the harness are stdlib-only programs in this package, ``_sandbox_launcher.py`` and
``_sandbox_harness.py``. The trainer reads their text once and passes it to the interpreter with ``-c``, so
the sandbox needs no file of theirs and neither program can import anything from ``brainstacks_hooks``.

The sandbox needs root: ``CAP_SYS_ADMIN`` for the namespaces and ``CAP_SETUID`` for the uid drop.
Where either is refused (no root, or Docker's default seccomp profile), :func:`run_python_tests` raises
:class:`SandboxUnavailable`. The exception is ``allow_weak_sandbox=True``: that runs with the rlimits, a
host temporary directory and, as root, the uid drop and a uid-wide kill at the end, and it logs a
warning. The weak mode does not stop writes to world-writable directories or network access, and as
non-root it cannot reap processes that call ``setsid``.

Limits that are not enforced here: memory is bounded per process (``RLIMIT_AS``), so a run can use up to
``MAX_PROCESSES x memory_mb``. The code can read world-readable files, such as the repository. Unix
sockets outside ``/run`` and ``/tmp`` stay reachable if their permissions let any user connect.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.resources
import json
import math
import os
import pwd
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from brainstacks_hooks.errors import BrainstacksError
from brainstacks_hooks.utils.logging import get_logger

logger = get_logger(__name__)

__all__ = [
    "DEFAULT_MEMORY_MB",
    "DEFAULT_TIMEOUT_S",
    "PlannedTest",
    "SandboxUnavailable",
    "bound_names",
    "is_sandbox_available",
    "plan_test",
    "run_python_tests",
]

DEFAULT_TIMEOUT_S = 5.0
"""Wall-clock limit of one run (the completion plus all its tests), in seconds."""
DEFAULT_MEMORY_MB = 512
"""Address-space limit (``RLIMIT_AS``) of each sandboxed process, in MiB."""
MAX_PROCESSES = 16
"""``RLIMIT_NPROC`` of the sandbox uid (processes plus threads)."""
MAX_OPEN_FILES = 64
MAX_FILE_MB = 16
TMPFS_MB = 64
"""Size of the sandbox's ``/tmp`` (its working directory)."""
MAX_RESULT_BYTES = 4 << 20
"""More probe output than this makes the run score 0."""
CHECK_TIMEOUT_S = 5.0
"""Time the launcher may spend decoding values and evaluating checks (after the sandbox is dead)."""
CHECK_MEMORY_MB = 2048
UID_BASE = 1_900_000_000
UID_SPAN = 1 << 24
_GRACE_S = 5.0  # trainer-side backstop on top of timeout_s + CHECK_TIMEOUT_S
_SANDBOX_PATH = "/usr/bin:/bin"


class SandboxUnavailable(BrainstacksError, RuntimeError):
    """This machine cannot run the sandbox (no namespaces, no uid drop, or no usable interpreter).

    Raised instead of running untrusted code with weaker isolation; pass ``allow_weak_sandbox=True`` to
    opt in to rlimits, a temporary directory and (as root) an unprivileged uid only.
    """


# ---------------------------------------------------------------------------------------------------------
# Splitting an assert into sandbox probes and a trusted check
# ---------------------------------------------------------------------------------------------------------

# Builtins the check may call with values that came out of the sandbox: their cost is bounded by the size
# of their arguments (which MAX_RESULT_BYTES bounds).
_BOUNDED_FUNCS = frozenset({
    "abs", "all", "any", "bool", "complex", "dict", "enumerate", "float", "frozenset", "int", "isinstance",
    "len", "list", "max", "min", "repr", "reversed", "set", "sorted", "str", "sum", "tuple", "type", "zip",
})
# Builtins the check may call on dataset constants only (a chosen argument can make them explode).
_CONST_ONLY_FUNCS = frozenset({"bytes", "divmod", "pow", "range", "round"})
_SAFE_NAMES = _BOUNDED_FUNCS | _CONST_ONLY_FUNCS | {"bytearray"}
# Consumers of a whole iterable: ``set(gen())`` equals ``set(list(gen()))``, so a probe that is their only
# iterable argument is materialised to a list in the sandbox (generators cannot cross the boundary).
_CONSUMERS = frozenset({"frozenset", "list", "max", "min", "set", "sorted", "sum", "tuple"})
_SAFE_MATH = frozenset({
    "ceil", "e", "exp", "fabs", "floor", "fsum", "gcd", "hypot", "inf", "isclose", "isfinite", "isinf",
    "isnan", "log", "log10", "log2", "nan", "pi", "sqrt", "tau", "trunc",
})
_PROBE = "__probe__"


@dataclass(frozen=True)
class PlannedTest:
    """One test after :func:`plan_test`.

    Attributes:
        source (`str`): the test as given.
        probes (`tuple[tuple[str, bool], ...]`): ``(expression, consume)`` pairs that the sandbox evaluates
            in order; ``consume`` materialises an iterable to a list there.
        check (`str`): the trusted expression over ``__probe__[i]`` that decides the test, outside the sandbox.
    """

    source: str
    probes: tuple[tuple[str, bool], ...]
    check: str


class _Splitter:
    def __init__(self, shadowed: frozenset[str] = frozenset()) -> None:
        self.probes: list[tuple[str, bool]] = []
        self.safe_names = _SAFE_NAMES - shadowed
        self.math_ok = "math" not in shadowed

    def probe(self, node: ast.expr, consume: bool = False) -> ast.expr:
        self.probes.append((ast.unparse(node), consume))
        index = ast.Constant(len(self.probes) - 1)
        return ast.Subscript(value=ast.Name(_PROBE, ast.Load()), slice=index, ctx=ast.Load())

    def pure(self, node: ast.expr) -> bool:
        """True when ``node`` needs no probe (only dataset constants and whitelisted calls)."""
        splitter = _Splitter()
        splitter.safe_names, splitter.math_ok = self.safe_names, self.math_ok
        splitter.rewrite(node)
        return not splitter.probes

    def rewrite(self, node: ast.expr, consume: bool = False) -> ast.expr:
        """``node`` in the check grammar; every subtree outside it becomes a probe."""
        if isinstance(node, ast.Constant):
            return node
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            if any(isinstance(e, ast.Starred) for e in node.elts):
                return self.probe(node, consume)
            elts = [self.rewrite(e) for e in node.elts]
            return ast.Set(elts=elts) if isinstance(node, ast.Set) else type(node)(elts=elts, ctx=ast.Load())
        if isinstance(node, ast.Dict):
            if any(k is None for k in node.keys):
                return self.probe(node, consume)
            return ast.Dict(keys=[self.rewrite(k) for k in node.keys], values=[self.rewrite(v) for v in node.values])
        if isinstance(node, ast.UnaryOp):
            return ast.UnaryOp(op=node.op, operand=self.rewrite(node.operand))
        if isinstance(node, ast.BoolOp):
            return ast.BoolOp(op=node.op, values=[self.rewrite(v) for v in node.values])
        if isinstance(node, ast.Compare):
            return ast.Compare(left=self.rewrite(node.left), ops=node.ops,
                               comparators=[self.rewrite(c) for c in node.comparators])
        if isinstance(node, ast.IfExp):
            return ast.IfExp(test=self.rewrite(node.test), body=self.rewrite(node.body),
                             orelse=self.rewrite(node.orelse))
        if isinstance(node, ast.BinOp):
            # Arithmetic on a sandbox value can be made arbitrarily expensive ("a" * huge): constants only.
            return node if self.pure(node.left) and self.pure(node.right) else self.probe(node, consume)
        if isinstance(node, ast.Subscript):
            sl = node.slice
            if isinstance(sl, ast.Slice):
                new_slice: ast.expr = ast.Slice(*(None if p is None else self.rewrite(p)
                                                  for p in (sl.lower, sl.upper, sl.step)))
            else:
                new_slice = self.rewrite(sl)
            return ast.Subscript(value=self.rewrite(node.value), slice=new_slice, ctx=ast.Load())
        if isinstance(node, ast.Name):
            return node if node.id in self.safe_names else self.probe(node, consume)
        if self.math_ok and _is_math_attr(node):
            return node
        if isinstance(node, ast.Call):
            call = self._rewrite_call(node)
            if call is not None:
                return call
        return self.probe(node, consume)

    def _rewrite_call(self, node: ast.Call) -> ast.Call | None:
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if not (name in self.safe_names or (self.math_ok and _is_math_attr(node.func))):
            return None
        if any(isinstance(a, ast.Starred) for a in node.args) or not all(k.arg for k in node.keywords):
            return None
        if name == "type" and (len(node.args) != 1 or node.keywords):
            return None  # type(name, bases, dict) builds classes
        bounded = name is None or name in _BOUNDED_FUNCS  # every whitelisted math function is bounded
        if not bounded and not all(self.pure(a) for a in [*node.args, *(k.value for k in node.keywords)]):
            return None
        one_iterable = name in _CONSUMERS and (name not in ("min", "max") or len(node.args) == 1)
        args = [self.rewrite(a, consume=(i == 0 and one_iterable)) for i, a in enumerate(node.args)]
        keywords = [ast.keyword(arg=k.arg, value=self.rewrite(k.value)) for k in node.keywords]
        return ast.Call(func=node.func, args=args, keywords=keywords)


def _is_math_attr(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "math"
            and node.attr in _SAFE_MATH)


def bound_names(source: str) -> frozenset[str]:
    """Every name ``source`` might bind (an over-approximation; ``*`` for a star import).

    A whitelisted builtin that the completion rebinds (``def sum(a, b): ...``) must be called in the
    sandbox, where it resolves as Python would; treating too many names as bound only moves work there.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return frozenset()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            names.update(node.names)
        elif isinstance(node, ast.MatchAs | ast.MatchStar) and node.name:
            names.add(node.name)
    return frozenset(names)


def plan_test(test: str, shadowed: frozenset[str] = frozenset()) -> PlannedTest:
    """Split one test (one or more ``assert`` statements) into sandbox probes and a trusted check.

    ``shadowed`` names (see :func:`bound_names`) are never treated as trusted builtins; ``"*"`` (a star
    import) shadows them all.

    Raises:
        ValueError: the test is not valid Python made only of ``assert`` statements (the verdict of any
            other statement could only come from inside the sandbox, where it can be forged).

    Example:
        >>> t = plan_test("assert sorted(pairs(3)) == [(1, 2), (2, 1)]")
        >>> t.probes, t.check
        ((('pairs(3)', True),), 'sorted(__probe__[0]) == [(1, 2), (2, 1)]')
    """
    if not isinstance(test, str):
        raise ValueError(f"a test must be a string of assert statements, got {type(test).__name__}")
    try:
        tree = ast.parse(test)
    except SyntaxError as exc:
        raise ValueError(f"test is not valid Python ({exc.msg}): {test!r}") from exc
    if not tree.body or not all(isinstance(s, ast.Assert) for s in tree.body):
        raise ValueError(f"a test must consist of assert statements only (MBPP style), got: {test!r}")
    if "*" in shadowed:
        shadowed = shadowed | _SAFE_NAMES | {"math"}
    splitter = _Splitter(frozenset(shadowed))
    parts = [splitter.rewrite(s.test) for s in tree.body]  # type: ignore[attr-defined]
    expr = parts[0] if len(parts) == 1 else ast.BoolOp(op=ast.And(), values=parts)
    check = ast.unparse(ast.fix_missing_locations(expr))
    compile(check, "<check>", "eval")  # fail here, not in the launcher
    return PlannedTest(source=test, probes=tuple(splitter.probes), check=check)


# ---------------------------------------------------------------------------------------------------------
# Code that runs in the child processes: two stdlib-only programs in this package, passed with ``-c``
# ---------------------------------------------------------------------------------------------------------


def _child_program(name: str) -> str:
    """The source of a child program shipped in this package (read once, at import; works from a wheel)."""
    return importlib.resources.files("brainstacks_hooks.rl").joinpath(name).read_text(encoding="utf-8")


# The sandboxed side (any Python >= 3.8): run the completion, evaluate each probe, write the values (never a
# verdict) to fd 3.
_HARNESS = _child_program("_sandbox_harness.py")
# The trusted side (root, pid 1 of the namespaces): isolate, start the child, enforce the wall clock, kill
# what is left, then decode the values and evaluate the checks. Reports on its stderr as "bsbx:..." lines.
_LAUNCHER = _child_program("_sandbox_launcher.py")


# ---------------------------------------------------------------------------------------------------------
# Trainer side: probing the machine, starting a run, reading the launcher's report
# ---------------------------------------------------------------------------------------------------------

_PROBE_LOCK = threading.Lock()
_PROBED: dict[bool, tuple[str | None, str]] = {}  # isolate -> (interpreter or None, reason)
_WEAK_WARNED = False


def _reachable_by_others(path: str) -> bool:
    """True when an unrelated uid can execute ``path`` (and traverse every directory above it)."""
    try:
        real = os.path.realpath(path)
        if not os.stat(real).st_mode & 0o001:
            return False
        parent = os.path.dirname(real)
        while True:
            if not os.stat(parent).st_mode & 0o001:
                return False
            if parent == "/":
                return True
            parent = os.path.dirname(parent)
    except OSError:
        return False


def _interpreter_candidates() -> list[str]:
    """The trainer's own Python first, then system ones; as root only those an unprivileged uid can run."""
    found = [sys.executable, getattr(sys, "_base_executable", ""), "/usr/bin/python3", "/usr/local/bin/python3",
             shutil.which("python3") or ""]
    out: list[str] = []
    for p in found:
        if p and os.path.exists(p):
            real = os.path.realpath(p)
            if real not in out and (os.geteuid() != 0 or _reachable_by_others(real)):
                out.append(real)
    return out


def _probe(isolate: bool) -> tuple[str | None, str]:
    """Find an interpreter with which a trivial job passes in this mode (cached per process)."""
    with _PROBE_LOCK:
        if isolate in _PROBED:
            return _PROBED[isolate]
        result: tuple[str | None, str] | None = None
        if not sys.platform.startswith("linux"):
            result = (None, f"the sandbox needs Linux; this is {sys.platform}")
        elif isolate and os.geteuid() != 0:
            result = (None, "the sandbox needs root (CAP_SYS_ADMIN for the namespaces, CAP_SETUID to drop to an "
                            "unprivileged uid, without which RLIMIT_NPROC is not enforced)")
        elif isolate and shutil.which("unshare") is None:
            result = (None, "util-linux `unshare` is not on PATH")
        else:
            reasons: list[str] = []
            plan = [plan_test("assert x == 1")]
            code = "import collections, functools, heapq, itertools, json, math, re, string\nx = 1\n"
            for python in _interpreter_candidates():
                try:
                    status, passed = _execute(code, "", plan, 10.0, DEFAULT_MEMORY_MB, isolate, python)
                except SandboxUnavailable as exc:
                    reasons.append(f"{python}: {exc}")
                    continue
                if status == "done" and passed == 1:
                    result = (python, "ok")
                    break
                reasons.append(f"{python}: a trivial job did not pass (status {status!r})")
            if result is None:
                result = (None, "; ".join(reasons) or "no Python interpreter that an unprivileged uid can run")
        _PROBED[isolate] = result
        return result


def _namespaces_available() -> tuple[bool, str]:
    """Whether the full sandbox works here, and if not why (runs a trivial job once per process)."""
    python, reason = _probe(True)
    return python is not None, reason


def is_sandbox_available() -> bool:
    """True when :func:`run_python_tests` runs with full isolation on this machine (probed once).

    Example:
        >>> isinstance(is_sandbox_available(), bool)
        True
    """
    return _namespaces_available()[0]


def _uid_has_processes(uid: int) -> bool:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    return True
    return False


def _new_uid(check_free: bool) -> int:
    for _ in range(100):
        uid = UID_BASE + secrets.randbelow(UID_SPAN)
        try:
            pwd.getpwuid(uid)
            continue
        except KeyError:
            pass
        if not (check_free and _uid_has_processes(uid)):
            return uid
    raise SandboxUnavailable("could not find a free sandbox uid")


def _execute(code: str, setup_code: str, plans: Sequence[PlannedTest], timeout_s: float, memory_mb: int,
             isolate: bool, python: str) -> tuple[str, int]:
    """Run one job; returns ``(outcome, tests passed)``, outcome ``done`` when the count is meaningful."""
    root = os.geteuid() == 0
    uid = _new_uid(check_free=not isolate) if root else os.getuid()
    gid = uid if root else os.getgid()
    workdir = "/tmp" if isolate else tempfile.mkdtemp(prefix="bsbx-")
    cfg = {
        "isolate": isolate, "uid": uid, "gid": gid, "workdir": workdir, "python": python, "harness": _HARNESS,
        "timeout_s": float(timeout_s), "cpu_s": max(1, math.ceil(timeout_s)), "memory_bytes": int(memory_mb) << 20,
        "fsize_bytes": MAX_FILE_MB << 20, "nofile": MAX_OPEN_FILES, "nproc": MAX_PROCESSES, "tmpfs_mb": TMPFS_MB,
        "path": _SANDBOX_PATH, "max_result_bytes": MAX_RESULT_BYTES, "check_timeout_s": CHECK_TIMEOUT_S,
        "check_memory_bytes": CHECK_MEMORY_MB << 20, "safe_names": sorted(_SAFE_NAMES),
    }
    payload = json.dumps({"job": {"code": code, "setup": setup_code, "tests": [p.probes for p in plans]},
                          "checks": [p.check for p in plans]}).encode()
    command = [sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(cfg)]
    if isolate:
        command = [shutil.which("unshare") or "unshare", "--net", "--pid", "--mount", "--ipc", "--uts", "--fork",
                   "--kill-child", "--mount-proc", "--", *command]
    try:
        if not isolate:
            os.chmod(workdir, 0o700)
            if root:
                os.chown(workdir, uid, gid)
        try:
            proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    start_new_session=True, cwd="/",
                                    env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"})
        except OSError as exc:
            raise SandboxUnavailable(f"could not start the sandbox launcher: {exc}") from exc
        deadline = time.monotonic() + timeout_s + CHECK_TIMEOUT_S + _GRACE_S
        err, finished = _communicate(proc, payload, deadline)
        if not finished:
            _kill(proc)
            logger.warning("the sandbox launcher overran its %.1fs limit; killed its process group", timeout_s)
            return "timeout", 0
    finally:
        if not isolate:
            shutil.rmtree(workdir, ignore_errors=True)
    text = err.decode("utf-8", "replace")
    lines = [ln[len("bsbx:"):] for ln in text.splitlines() if ln.startswith("bsbx:")]
    passed = 0
    for ln in lines:
        if ln.startswith("child-stderr "):
            logger.debug("sandboxed code wrote to stderr: %s", ln[len("child-stderr "):])
        elif ln.startswith("score "):
            passed = int(ln.split()[1])
    final = lines[-1] if lines else ""
    if final.startswith("setup-error"):
        raise SandboxUnavailable(f"the sandbox could not be set up: {final[len('setup-error '):]}")
    if final not in ("done", "timeout", "overflow", "check-timeout", "check-memory", "check-error"):
        raise SandboxUnavailable(f"the sandbox launcher failed (exit status {proc.returncode}): "
                                 f"{text.strip()[-500:] or 'no output'}")
    return final, passed


def _communicate(proc: subprocess.Popen, payload: bytes, deadline: float) -> tuple[bytes, bool]:
    """Feed the job to the launcher and read its stderr until it closes; ``(stderr, finished in time)``."""
    assert proc.stdin is not None and proc.stderr is not None
    err = bytearray()
    sel = selectors.DefaultSelector()
    os.set_blocking(proc.stdin.fileno(), False)
    sel.register(proc.stdin, selectors.EVENT_WRITE)
    sel.register(proc.stderr, selectors.EVENT_READ)
    pending = memoryview(payload)
    try:
        while proc.stderr in [k.fileobj for k in sel.get_map().values()]:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(err), False
            for key, _ in sel.select(timeout=remaining):
                if key.fileobj is proc.stdin:
                    try:
                        pending = pending[os.write(proc.stdin.fileno(), pending[:65536]):]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                else:
                    data = os.read(key.fd, 65536)
                    if not data:
                        sel.unregister(proc.stderr)
                    elif len(err) < 1 << 20:
                        err.extend(data)
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return bytes(err), False
        return bytes(err), True
    finally:
        sel.close()
        with contextlib.suppress(OSError):
            proc.stdin.close()
        proc.stderr.close()


def _kill(proc: subprocess.Popen) -> None:
    """Backstop: SIGKILL the launcher's process group and wait until the namespace's pid 1 has exited."""
    children: list[int] = []
    with contextlib.suppress(OSError, ValueError):
        for tid in os.listdir(f"/proc/{proc.pid}/task"):
            with open(f"/proc/{proc.pid}/task/{tid}/children") as f:
                children += [int(p) for p in f.read().split()]
    for pid in children:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    end = time.monotonic() + 5.0
    for pid in children:  # the kernel kills the rest of the namespace before its pid 1 becomes a zombie
        while time.monotonic() < end:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        break
            except OSError:
                break
            time.sleep(0.01)


def run_python_tests(code: str, tests: Sequence[str], timeout_s: float = DEFAULT_TIMEOUT_S,
                     memory_mb: int = DEFAULT_MEMORY_MB, setup_code: str = "",
                     allow_weak_sandbox: bool = False) -> float:
    """Run ``code`` in the sandbox and return the fraction of ``tests`` (MBPP-style asserts) that pass.

    The module docstring describes the isolation and why the score cannot be forged. The run scores 0.0
    when the code fails to run: it raises at top level, hits a limit or the wall-clock timeout, or exits
    before the tests. ``setup_code`` (MBPP's ``test_setup_code``) runs before ``code``, in the same
    namespace. Module-level ``if __name__ == "__main__":`` blocks do not run. Values cross the sandbox
    boundary only as plain builtin data, so a test passes only when the completion returns such data
    (a list, not a ``map``; generators are fine inside ``list(...)``, ``set(...)``, ``sorted(...)``
    and the like).

    Args:
        code (`str`): the untrusted program (e.g. a model's completion, without markdown fences).
        tests (`Sequence[str]`): assert statements, one test per string.
        timeout_s (`float`): wall-clock limit of the whole run; CPU time is limited to ``ceil(timeout_s)``.
        memory_mb (`int`): address-space limit per process, in MiB.
        setup_code (`str`): trusted code run before ``code`` (imports or classes the tests use).
        allow_weak_sandbox (`bool`): where the sandbox is refused, run anyway with rlimits, a temporary
            directory and (as root) an unprivileged uid only, and log a warning. Default: raise.

    Raises:
        SandboxUnavailable: the machine refuses the sandbox (and ``allow_weak_sandbox`` is False), or
            setting it up failed before any untrusted code ran.
        ValueError: a test is not made of assert statements, or a limit is out of range.

    Example:
        >>> code = "def add(a, b):\\n    return a + b"
        >>> run_python_tests(code, ["assert add(1, 2) == 3", "assert add(2, 2) == 5"])
        0.5
    """
    if isinstance(tests, str):
        raise ValueError("tests must be a sequence of assert statements, not a single string")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if memory_mb < 64:
        raise ValueError(f"memory_mb must be at least 64 (the interpreter needs it), got {memory_mb}")
    shadowed = bound_names(setup_code) | bound_names(code)
    plans = [plan_test(t, shadowed) for t in tests]
    if not plans:
        return 0.0
    ok, reason = _namespaces_available()
    if ok:
        python, isolate = _probe(True)[0], True
    elif not allow_weak_sandbox:
        raise SandboxUnavailable(
            f"refusing to run untrusted code: the sandbox is not available here ({reason}). Run as root on a "
            "machine that allows namespaces, or pass allow_weak_sandbox=True to accept rlimits and a "
            "temporary directory only.")
    else:
        python, weak_reason = _probe(False)
        if python is None:
            raise SandboxUnavailable(f"even the weak sandbox cannot run here: {weak_reason}")
        isolate = False
        global _WEAK_WARNED
        if not _WEAK_WARNED:
            _WEAK_WARNED = True
            logger.warning("running untrusted code in the WEAK sandbox (%s): rlimits, a temporary directory and "
                           "%s only; no network, PID or mount isolation", reason,
                           "an unprivileged uid" if os.geteuid() == 0 else "no uid drop")
    assert python is not None
    outcome, passed = _execute(code, setup_code, plans, timeout_s, memory_mb, isolate, python)
    if outcome != "done":
        logger.debug("sandbox run ended with %s", outcome)
        return 0.0
    return passed / len(plans)
