"""The sandboxed side of :func:`brainstacks_hooks.rl.sandbox.run_python_tests` (a program, not a module to import).

The launcher execs it as ``python -I -S -B -c <this file's text> <job path>`` as the unprivileged sandbox
uid, with the result pipe as fd 3. It runs the completion (after the setup code), evaluates each probe and
writes the values, never a verdict, to fd 3 as tagged JSON lines of exact builtin types; the launcher
decodes them and evaluates the checks (see the ``sandbox`` module docstring).

Constraints, because it runs in the sandbox under whichever interpreter the probe picked:

* the standard library only (no ``brainstacks_hooks``, no third-party package: ``-S`` drops site-packages);
* Python >= 3.8 (no ``match``, no ``X | Y`` types, no ``str.removeprefix``);
* the completion runs in this very process and may rebind builtins, so everything the encoder relies on
  (``os.write``, ``type``, ``list``, the base types' own methods) is bound before the completion runs.
"""

import os
import sys


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
            return {"i": f"{v:x}" if v >= 0 else f"-{-v:x}"}
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
        raise TypeError(f"cannot return a {typ(v).__name__} from the sandbox")
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
                v = eval(compile(src, f"<test {i}>", "eval"), ns)
                if consume:
                    v = lst(v)
                out.append(["v", enc(v, 0)])
            except BaseException as e:
                out.append(["x", name(e)])
        emit({"t": i, "v": out})


if __name__ == "__main__":
    _bsbx_main(sys.argv[1], 3)
    os._exit(0)
