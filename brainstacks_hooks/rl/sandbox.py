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
# Code that runs in the child processes (self-contained; the harness runs on any Python >= 3.8)
# ---------------------------------------------------------------------------------------------------------

# The sandboxed side: run the completion, evaluate each probe, write the values (never a verdict) to fd 3.
_HARNESS = r'''
import os, sys
def _bsbx_main(job_path, out_fd):
    import json
    write, typ, lst = os.write, type, list
    with open(job_path, "rb") as f:
        job = json.loads(f.read().decode("utf-8"))
    try:
        os.unlink(job_path)
    except OSError:
        pass
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)
    def emit(rec):
        data = memoryview((json.dumps(rec, separators=(",", ":")) + "\n").encode())
        while data:
            data = data[write(out_fd, data):]
    def enc(v, d):
        # Subclasses (defaultdict, Counter, namedtuple, IntEnum) cross as their base type: only data crosses.
        if d > 64:
            raise ValueError("value nested too deeply")
        if v is None or v is True or v is False:
            return v
        if isinstance(v, str):
            return str.__str__(v)
        if isinstance(v, int) and not isinstance(v, bool):
            v = int.__int__(v)
            return {"i": "%x" % v if v >= 0 else "-%x" % -v}
        if isinstance(v, float):
            return {"f": float.__repr__(float.__float__(v))}
        if isinstance(v, complex):
            return {"c": [float.__repr__(complex.__getattribute__(v, "real")),
                          float.__repr__(complex.__getattribute__(v, "imag"))]}
        if isinstance(v, dict):
            return {"d": [[enc(k, d + 1), enc(x, d + 1)] for k, x in lst(dict.items(v))]}
        if isinstance(v, list):
            return [enc(x, d + 1) for x in lst(list.__iter__(v))]
        if isinstance(v, tuple):
            return {"t": [enc(x, d + 1) for x in tuple.__iter__(v)]}
        if isinstance(v, frozenset):
            return {"fs": [enc(x, d + 1) for x in frozenset.__iter__(v)]}
        if isinstance(v, set):
            return {"s": [enc(x, d + 1) for x in set.__iter__(v)]}
        if isinstance(v, bytearray):
            return {"ba": bytearray.hex(v)}
        if isinstance(v, bytes):
            return {"b": bytes.hex(v)}
        raise TypeError("cannot return a %s from the sandbox" % typ(v).__name__)
    def name(e):
        try:
            return str(typ(e).__name__)[:80]
        except BaseException:
            return "?"
    ns = {"__name__": "__sandbox__", "__builtins__": __builtins__}
    try:
        if job["setup"]:
            exec(compile(job["setup"], "<setup>", "exec"), ns)
        exec(compile(job["code"], "<completion>", "exec"), ns)
    except BaseException as e:
        emit({"error": name(e)})
        return
    for i, probes in enumerate(job["tests"]):
        out = []
        for src, consume in probes:
            try:
                v = eval(compile(src, "<test %d>" % i, "eval"), ns)
                if consume:
                    v = lst(v)
                out.append(["v", enc(v, 0)])
            except BaseException as e:
                out.append(["x", name(e)])
        emit({"t": i, "v": out})
_bsbx_main(sys.argv[1], 3)
os._exit(0)
'''

# The trusted side (root, pid 1 of the namespaces): isolate, start the child, enforce the wall clock, kill
# what is left, then decode the values and evaluate the checks. Reports on its stderr as "bsbx:..." lines.
_LAUNCHER = r'''
import builtins, ctypes, fcntl, json, math, os, re, resource, select, signal, stat, sys, time

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
MS_REC, MS_PRIVATE = 16384, 1 << 18
FLAG_OF = {b"nosuid": MS_NOSUID, b"nodev": MS_NODEV, b"noexec": MS_NOEXEC, b"noatime": 1024,
           b"nodiratime": 2048, b"relatime": 1 << 21, b"nosymfollow": 256}
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


class Timeout(Exception):
    pass


def status(line):
    os.write(2, ("bsbx:" + line.replace("\n", " ") + "\n").encode("utf-8", "replace"))


def mount(src, target, fstype, flags, data=None):
    if libc.mount(src, target, fstype, flags, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "mount %r: %s" % (target, os.strerror(err)))


def mounts():
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            sep = fields.index(b"-")
            point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4])
            out.append((point, fields[5].split(b","), fields[sep + 1], fields[sep + 2]))
    return out


def isolate(cfg):
    mount(None, b"/", None, MS_REC | MS_PRIVATE)
    for point, opts, _, _ in mounts():
        if b"ro" not in opts:
            flags = MS_REMOUNT | MS_BIND | MS_RDONLY  # per-mount flags of this namespace's copy only
            for o in opts:
                flags |= FLAG_OF.get(o, 0)
            mount(None, point, None, flags)
    tmpfs = "size=%dm,nr_inodes=4096,mode=0700,uid=%d,gid=%d" % (cfg["tmpfs_mb"], cfg["uid"], cfg["gid"])
    mount(b"bsbx", b"/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, tmpfs.encode())
    if os.path.isdir("/run") and not os.path.islink("/run"):
        mount(b"bsbx-run", b"/run", b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, b"size=4k,mode=0755")
    top = {}
    for point, opts, fstype, src in mounts():
        top[point] = (opts, fstype, src)
    for point, (opts, fstype, src) in top.items():
        if point == b"/tmp":
            if (fstype, src) != (b"tmpfs", b"bsbx") or b"rw" not in opts:
                raise RuntimeError("/tmp is not the sandbox tmpfs")
        elif b"ro" not in opts:
            raise RuntimeError("mount %r is still writable" % point)


def count_tasks(uid):
    n = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                real, threads = None, 1
                with open("/proc/%s/status" % entry) as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            real = int(line.split()[1])
                        elif line.startswith("Threads:"):
                            threads = int(line.split()[1])
                if real == uid:
                    n += threads
            except (OSError, ValueError):
                pass
    return n


def become_sandbox(cfg, err_w, res_w):
    uid, gid, workdir = cfg["uid"], cfg["gid"], cfg["workdir"]
    err_w = fcntl.fcntl(err_w, fcntl.F_DUPFD_CLOEXEC, 100)
    res_w = fcntl.fcntl(res_w, fcntl.F_DUPFD_CLOEXEC, 100)
    root = os.geteuid() == 0
    nproc = cfg["nproc"] if root else count_tasks(os.getuid()) + cfg["nproc"]
    try:  # under memory pressure the kernel kills the sandbox first, not the launcher or the trainer
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    if root:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    else:
        os.setpgid(0, 0)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # cleared by the uid change: set it again
    if os.getppid() != cfg["launcher_pid"]:
        os._exit(1)
    os.chdir(workdir)
    os.dup2(os.open("/dev/null", os.O_RDONLY), 0)
    for fd, name in ((1, ".stdout"), (2, ".stderr")):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        os.dup2(os.open(os.path.join(workdir, name), flags, 0o600), fd)
    os.dup2(res_w, 3)
    os.close(res_w)
    os.closerange(4, err_w)
    os.closerange(err_w + 1, 4096)
    limits = [(resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"] + 1), (resource.RLIMIT_CORE, 0, 0),
              (resource.RLIMIT_AS, cfg["memory_bytes"], cfg["memory_bytes"]),
              (resource.RLIMIT_FSIZE, cfg["fsize_bytes"], cfg["fsize_bytes"]),
              (resource.RLIMIT_NOFILE, cfg["nofile"], cfg["nofile"]), (resource.RLIMIT_NPROC, nproc, nproc)]
    for res, soft, hard in limits:
        cur_hard = resource.getrlimit(res)[1]
        if cur_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, cur_hard), min(hard, cur_hard)
        resource.setrlimit(res, (soft, hard))
    return err_w


def kill_uid(uid, gid):
    # kill(-1) as the sandbox uid reaches exactly the processes of that (fresh) uid.
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            try:
                os.setgroups([])
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)


def descendants(root_pid):
    parent_of = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry, "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                if fields[0] not in (b"Z", b"X"):
                    parent_of[int(entry)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = set(), {root_pid}
    while frontier:
        frontier = {pid for pid, ppid in parent_of.items() if ppid in frontier and pid not in found}
        found |= frontier
    return found


def reap_descendants(cfg, child):
    # Weak mode. The launcher is a child subreaper, so orphans (setsid or not) stay its descendants. As root,
    # kill(-1) as the fresh uid reaches them all at once; otherwise stop the whole tree first (a stopped
    # process cannot fork) until a scan finds nothing new, then kill it. Then reap until nothing is left.
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        if os.geteuid() == 0:
            kill_uid(cfg["uid"], cfg["gid"])
        else:
            stopped = set()
            while time.monotonic() < deadline:
                new = descendants(os.getpid()) - stopped
                if not new:
                    break
                for pid in new:
                    try:
                        os.kill(pid, signal.SIGSTOP)
                    except OSError:
                        pass
                stopped |= new
            for pid in stopped:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        while True:
            try:
                pid = os.waitpid(-1, os.WNOHANG)[0]
            except ChildProcessError:
                return True
            if pid == 0:
                break
        time.sleep(0.005)
    return False


def stderr_tail(workdir):
    try:
        fd = os.open(os.path.join(workdir, ".stderr"), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return ""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return ""
        os.lseek(fd, max(0, st.st_size - 1500), 0)
        return os.read(fd, 1500).decode("utf-8", "replace")
    finally:
        os.close(fd)


class ProbeError:
    def __init__(self, name):
        self.name = name


class Probes(tuple):
    def __getitem__(self, index):
        value = tuple.__getitem__(self, index)
        if isinstance(value, ProbeError):
            raise RuntimeError("probe %d raised %s in the sandbox" % (index, value.name))
        return value


def decode(obj, depth=0):
    if depth > 64:
        raise ValueError("value nested too deeply")
    t = type(obj)
    if obj is None or t is bool or t is str:
        return obj
    if t is list:
        return [decode(x, depth + 1) for x in obj]
    if t is dict and len(obj) == 1:
        ((tag, payload),) = obj.items()
        if tag == "i" and type(payload) is str:
            return int(payload, 16)
        if tag == "f" and type(payload) is str:
            return float(payload)
        if tag == "c" and type(payload) is list and len(payload) == 2:
            return complex(float(payload[0]), float(payload[1]))
        if tag == "b" and type(payload) is str:
            return bytes.fromhex(payload)
        if tag == "ba" and type(payload) is str:
            return bytearray.fromhex(payload)
        if type(payload) is list:
            items = [decode(x, depth + 1) for x in payload]
            if tag == "t":
                return tuple(items)
            if tag == "s":
                return set(items)
            if tag == "fs":
                return frozenset(items)
            if tag == "d" and all(type(kv) is list and len(kv) == 2 for kv in items):
                return {kv[0]: kv[1] for kv in items}
    raise ValueError("not an encoded value")


def passes(code, n_probes, entries, safe_builtins):
    if type(entries) is not list or len(entries) != n_probes:
        return False
    values = []
    for entry in entries:
        if type(entry) is not list or len(entry) != 2 or entry[0] not in ("v", "x"):
            return False
        values.append(decode(entry[1]) if entry[0] == "v" else ProbeError(str(entry[1])[:80]))
    return bool(eval(code, {"__builtins__": safe_builtins, "math": math, "__probe__": Probes(values)}))


def score(checks, n_probes, records, safe_names):
    safe_builtins = {n: getattr(builtins, n) for n in safe_names}
    codes = [compile(c, "<check %d>" % i, "eval") for i, c in enumerate(checks)]
    seen, duplicated = {}, set()
    for line in records.splitlines():
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if type(rec) is not dict:
            continue
        if "error" in rec:
            return 0  # the completion (or the setup code) raised at top level
        t = rec.get("t")
        if type(t) is not int or not 0 <= t < len(codes):
            continue
        if t in seen:
            duplicated.add(t)
        seen[t] = rec.get("v")
    passed = 0
    for i, code in enumerate(codes):
        if i in seen and i not in duplicated:
            try:
                passed += passes(code, n_probes[i], seen[i], safe_builtins)
            except Exception:
                pass
    return passed


def main():
    cfg = json.loads(sys.argv[1])
    payload = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    checks, n_probes = payload["checks"], [len(p) for p in payload["job"]["tests"]]
    cfg["launcher_pid"] = os.getpid()
    if not cfg["isolate"]:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    job_path = os.path.join(cfg["workdir"], ".bsbx-job.json")
    try:
        if cfg["isolate"]:
            isolate(cfg)
        fd = os.open(job_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o444)
        view = memoryview(json.dumps(payload["job"]).encode("utf-8"))
        while view:
            view = view[os.write(fd, view):]
        os.close(fd)
    except Exception as e:
        status("setup-error %s: %s" % (type(e).__name__, e))
        os._exit(125)
    del payload

    def on_alarm(signum, frame):
        raise Timeout()

    signal.signal(signal.SIGALRM, on_alarm)
    err_r, err_w = os.pipe()
    res_r, res_w = os.pipe()
    child, outcome, records = None, "done", bytearray()
    try:
        signal.setitimer(signal.ITIMER_REAL, cfg["timeout_s"])
        child = os.fork()
        if child == 0:
            try:
                os.close(err_r)
                os.close(res_r)
                err_w = become_sandbox(cfg, err_w, res_w)
                python = cfg["python"]
                env = {"PATH": cfg["path"], "HOME": cfg["workdir"], "TMPDIR": cfg["workdir"], "LANG": "C.UTF-8"}
                os.execve(python, [python, "-I", "-S", "-B", "-c", cfg["harness"], job_path], env)
            except BaseException as e:
                try:
                    os.write(err_w, ("%s: %s" % (type(e).__name__, e)).encode("utf-8", "replace")[:1000])
                finally:
                    os._exit(127)
        os.close(err_w)
        os.close(res_w)
        failure = b""
        while True:
            data = os.read(err_r, 1000)
            if not data:
                break
            failure += data
        if failure:
            os.kill(child, signal.SIGKILL)
            reason = failure.decode("utf-8", "replace")
            status("setup-error could not start %s in the sandbox: %s" % (cfg["python"], reason))
            os._exit(125)
        try:
            pidfd = os.pidfd_open(child)
        except (AttributeError, OSError):  # Python < 3.9 or Linux < 5.3: poll instead
            pidfd = None
        reading, exited = True, False
        while not exited:
            fds = ([res_r] if reading else []) + ([pidfd] if pidfd is not None else [])
            ready = select.select(fds, [], [], None if pidfd is not None else 0.02)[0]
            if res_r in ready:
                data = os.read(res_r, 65536)
                if not data:
                    reading = False
                elif len(records) + len(data) > cfg["max_result_bytes"]:
                    outcome = "overflow"
                    break
                else:
                    records += data
            if pidfd is None or pidfd in ready:
                exited = os.waitpid(child, os.WNOHANG)[0] == child
        os.set_blocking(res_r, False)
        while reading and outcome == "done":  # what the child wrote just before it exited
            try:
                data = os.read(res_r, 65536)
            except BlockingIOError:
                break
            if not data:
                break
            if len(records) + len(data) > cfg["max_result_bytes"]:
                outcome = "overflow"
            records += data
        signal.setitimer(signal.ITIMER_REAL, 0)
    except Timeout:
        outcome = "timeout"
    if cfg["isolate"]:
        kill_uid(cfg["uid"], cfg["gid"])  # stop the rest now; the namespace teardown reaps them
    elif child and not reap_descendants(cfg, child):
        status("child-stderr 'some sandboxed processes could not be reaped'")
    tail = stderr_tail(cfg["workdir"])
    if tail:
        status("child-stderr " + repr(tail))
    if outcome == "done":
        resource.setrlimit(resource.RLIMIT_AS, (cfg["check_memory_bytes"], resource.getrlimit(resource.RLIMIT_AS)[1]))
        signal.setitimer(signal.ITIMER_REAL, cfg["check_timeout_s"])
        try:
            passed = score(checks, n_probes, bytes(records), cfg["safe_names"])
            signal.setitimer(signal.ITIMER_REAL, 0)
            status("score %d %d" % (passed, len(checks)))
        except Timeout:
            outcome = "check-timeout"
        except MemoryError:
            outcome = "check-memory"
        except Exception as e:  # nothing the sandbox wrote may crash the launcher
            status("child-stderr 'check failed: %s'" % type(e).__name__)
            outcome = "check-error"
    status(outcome)
    os._exit(0)


main()
'''


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
