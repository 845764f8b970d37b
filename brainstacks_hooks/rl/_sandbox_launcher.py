"""The trusted side of :func:`brainstacks_hooks.rl.sandbox.run_python_tests` (a program, not a module to import).

The trainer runs it as ``python -I -S -c <this file's text> <config JSON>``, under ``unshare`` (new mount,
PID, network, IPC and UTS namespaces) unless in the weak mode, and writes the job (the code, the probes
and the checks) to its stdin. As root and pid 1 of the PID namespace it isolates the mounts, forks the
sandboxed child (which drops to the sandbox uid and execs the harness, ``_sandbox_harness.py``), enforces
the wall clock, kills what is left, then decodes the probe values and evaluates the checks under its own
limits. It reports only on its stderr, as ``bsbx:<status>`` lines; the last one is the outcome.

It runs under ``-I -S``, so it uses the standard library only (no ``brainstacks_hooks``, no third-party
package). Nothing the sandbox writes may crash it: every failure ends in a status line.
"""

import builtins
import ctypes
import fcntl
import json
import math
import os
import re
import resource
import select
import signal
import stat
import sys
import time

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
        raise OSError(err, f"mount {target!r}: {os.strerror(err)}")


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
    tmpfs = f"size={cfg['tmpfs_mb']:d}m,nr_inodes=4096,mode=0700,uid={cfg['uid']:d},gid={cfg['gid']:d}"
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
            raise RuntimeError(f"mount {point!r} is still writable")


def count_tasks(uid):
    n = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                real, threads = None, 1
                with open(f"/proc/{entry}/status") as f:
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
                with open(f"/proc/{entry}/stat", "rb") as f:
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
            raise RuntimeError(f"probe {index:d} raised {value.name} in the sandbox")
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
    codes = [compile(c, f"<check {i}>", "eval") for i, c in enumerate(checks)]
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
        status(f"setup-error {type(e).__name__}: {e}")
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
                    os.write(err_w, f"{type(e).__name__}: {e}".encode("utf-8", "replace")[:1000])
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
            status(f"setup-error could not start {cfg['python']} in the sandbox: {reason}")
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
            status(f"score {passed:d} {len(checks):d}")
        except Timeout:
            outcome = "check-timeout"
        except MemoryError:
            outcome = "check-memory"
        except Exception as e:  # nothing the sandbox wrote may crash the launcher
            status(f"child-stderr 'check failed: {type(e).__name__}'")
            outcome = "check-error"
    status(outcome)
    os._exit(0)


if __name__ == "__main__":
    main()
