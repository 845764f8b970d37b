"""Verifiable rewards with TRL's reward-function signature ``(completions, **kwargs) -> list[float]``.

TRL calls each reward function with the batch's ``completions`` and every dataset column as a keyword
argument (a list aligned with ``completions``). So ``gsm8k_reward`` reads the ``answer`` column and
``code_reward`` reads MBPP's ``test_list`` (and ``test_setup_code`` when present). A completion is a
string (standard format) or a list of ``{"role", "content"}`` messages (conversational format); both
work everywhere.

* :func:`gsm8k_reward`: 1.0 when the completion's final number equals the reference's.
* :func:`format_reward`: 1.0 when the completion states a final answer in a recognised form.
* :func:`code_reward`: fraction of the asserts that pass, run in :mod:`brainstacks_hooks.rl.sandbox`.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal, localcontext
from fractions import Fraction
from typing import Any

from brainstacks_hooks.rl.sandbox import DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT_S, run_python_tests

__all__ = [
    "code_reward",
    "completion_text",
    "extract_code",
    "extract_final_number",
    "format_reward",
    "gsm8k_reward",
]

# A number as written in prose: "-3", "$1,234.50", "$-5", ".5". A minus right after a word, digit or bracket
# is subtraction ("10-3" ends in 3, not -3); thousands separators must come in groups of three.
_NUMBER = (r"(?:(?<![\w.)\]])(?P<neg>-)\s*)?(?:\$\s*(?P<neg2>-)?\s*)?"
           r"(?<![\w.])(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?![\d])")
_NUMBER_RE = re.compile(_NUMBER)
_HASHES_RE = re.compile(r"####\s*" + _NUMBER)
_ANSWER_IS_RE = re.compile(r"\banswer(?:\s+is)?\s*[:=]?\s*(?:\*\*|__)?\s*" + _NUMBER, re.IGNORECASE)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FRAC_RE = re.compile(r"^\s*(-)?\s*\\[dt]?frac\s*\{\s*(-?\d+(?:\.\d+)?)\s*\}\s*\{\s*(-?\d+(?:\.\d+)?)\s*\}\s*$")
_LATEX_NOISE_RE = re.compile(r"\\text\{[^{}]*\}|\\[,;!: ]|\\\$|\\%|\^\{?\\circ\}?|\\(?:mathrm|textbf)\b")


def completion_text(completion: Any) -> str:
    """The text of one completion: a string, a message dict, or a conversational list of messages.

    For a list, the content of the last ``assistant`` message is used (the last message if none is
    marked as the assistant). Content given as a list of parts is joined from its ``text`` parts.

    Example:
        >>> completion_text([{"role": "assistant", "content": "The answer is 4."}])
        'The answer is 4.'
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_text(completion.get("content", ""))
    if isinstance(completion, Sequence) and completion:
        messages = [m for m in completion if isinstance(m, dict)]
        assistant = [m for m in messages if m.get("role") == "assistant"]
        chosen = assistant[-1] if assistant else (messages[-1] if messages else None)
        return _content_text(chosen.get("content", "")) if chosen is not None else ""
    return "" if completion is None else str(completion)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return "" if content is None else str(content)


def _to_fraction(match: re.Match) -> Fraction:
    value = Fraction(match.group("num").replace(",", ""))
    return -value if (match.group("neg") is None) != (match.group("neg2") is None) else value


def _boxed_contents(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}``, with nested braces balanced (an unclosed box runs to the end)."""
    out = []
    for m in _BOXED_RE.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        out.append(text[m.end():i - 1] if depth == 0 else text[m.end():])
    return out


def _boxed_value(content: str) -> Fraction | None:
    frac = _FRAC_RE.match(content)
    if frac:
        den = Fraction(frac.group(3))
        if den == 0:
            return None
        value = Fraction(frac.group(2)) / den
        return -value if frac.group(1) else value
    numbers = list(_NUMBER_RE.finditer(_LATEX_NOISE_RE.sub(" ", content)))
    return _to_fraction(numbers[-1]) if numbers else None


def _final_value(text: str, fallback: bool = True) -> Fraction | None:
    """The final number of ``text``: ``\\boxed{}``, then ``#### N``, then "the answer is N", then the last number."""
    for content in reversed(_boxed_contents(text)):
        value = _boxed_value(content)
        if value is not None:
            return value
    for pattern in (_HASHES_RE, _ANSWER_IS_RE) + ((_NUMBER_RE,) if fallback else ()):
        matches = list(pattern.finditer(text))
        if matches:
            return _to_fraction(matches[-1])
    return None


def _canonical(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den != 1:  # not a terminating decimal (only from \frac): keep it exact
        return f"{value.numerator}/{value.denominator}"
    with localcontext() as ctx:
        ctx.prec = 100
        text = format(Decimal(value.numerator) / Decimal(value.denominator), "f")
    return text.rstrip("0").rstrip(".")


def extract_final_number(text: str) -> str | None:
    r"""The final number stated in ``text``, normalised (``"1,234.50"`` gives ``"1234.5"``), or None.

    Looked for in this order: the last ``\boxed{...}`` that holds a number (``\frac{a}{b}`` included),
    the last ``#### N`` (GSM8K's reference format), the last "the answer is N" (or "Answer: N"), and
    finally the last number anywhere. Commas, ``$``, a leading minus and trailing text or periods are
    handled. A non-integer that is not a terminating decimal is returned as ``"a/b"``.

    Example:
        >>> extract_final_number(r"3 + 4 = 7, so the total is \boxed{7} apples.")
        '7'
        >>> extract_final_number("She pays $1,234.50. The answer is 1,234.50.")
        '1234.5'
        >>> extract_final_number("The temperature fell to -3 degrees.")
        '-3'
        >>> extract_final_number("no digits here") is None
        True
    """
    value = _final_value(text)
    return None if value is None else _canonical(value)


def gsm8k_reward(completions: Sequence[Any], answer: Sequence[Any], **kwargs: Any) -> list[float]:
    r"""1.0 for each completion whose final number equals the reference answer, else 0.0.

    ``answer`` is TRL's dataset column: a GSM8K answer ending in ``#### N`` or a plain number (a string
    or a number). Numbers compare exactly as rationals, so ``3.50`` equals ``3.5`` and ``1,234`` equals
    ``1234``. A reference without a number scores 0.0.

    Example:
        >>> gsm8k_reward(["So she has $1,234.50 left.", r"The total is \boxed{7}.", "The answer is 8."],
        ...              answer=["She ... <<1000+234.5=1234.5>>\n#### 1234.5", "8", 8])
        [1.0, 0.0, 1.0]
    """
    if len(answer) != len(completions):
        raise ValueError(f"gsm8k_reward got {len(completions)} completions but {len(answer)} answers")
    rewards = []
    for completion, ref in zip(completions, answer):
        expected = _final_value(str(ref))
        got = _final_value(completion_text(completion))
        rewards.append(1.0 if expected is not None and got == expected else 0.0)
    return rewards


def format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    r"""1.0 for each completion that states its final answer in a recognised form, else 0.0.

    Recognised forms are a ``\boxed{}`` holding a number, ``#### N`` and "the answer is N" (or
    "Answer: N"). A number that merely appears last in the text does not count.

    Example:
        >>> format_reward([r"\boxed{42}", "#### 42", "The answer is 42.", "I think it is 42"])
        [1.0, 1.0, 1.0, 0.0]
    """
    return [0.0 if _final_value(completion_text(c), fallback=False) is None else 1.0 for c in completions]


_FENCE_RE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = {"", "python", "python3", "py", "py3"}


def extract_code(text: str) -> str:
    """The Python code in a completion: every fenced python block, joined in order; else the whole text.

    Blocks tagged ``python``/``py``, or untagged, are joined, so a definition block followed by an
    example block still runs. A final unclosed fence (a truncated generation) runs to the end of the
    text. When there are fences but none is Python, the last block is used.

    Example:
        >>> extract_code("Here:\\n```python\\ndef f():\\n    return 1\\n```\\nDone.")
        'def f():\\n    return 1\\n'
    """
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE_RE.finditer(text)]
    if not blocks:
        return text
    python = [code for tag, code in blocks if tag in _PYTHON_TAGS]
    return "\n".join(python) if python else blocks[-1][1]


def _as_tests(tests: Any) -> list[str]:
    """One completion's tests: a list of assert strings, or one string of assert statements."""
    if isinstance(tests, str):
        try:
            tree = ast.parse(tests)
        except SyntaxError as exc:
            raise ValueError(f"test_list entry is not valid Python ({exc.msg}): {tests!r}") from exc
        return [ast.get_source_segment(tests, stmt) or "" for stmt in tree.body]
    return [str(t) for t in tests]


def code_reward(completions: Sequence[Any], test_list: Sequence[Any], test_setup_code: Sequence[str] | None = None,
                *, timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB,
                allow_weak_sandbox: bool = False, max_workers: int | None = None, **kwargs: Any) -> list[float]:
    r"""Fraction of each completion's MBPP-style asserts that pass in the sandbox.

    The code is taken from the completion's fenced python blocks if it has any (:func:`extract_code`) and
    run by :func:`~brainstacks_hooks.rl.sandbox.run_python_tests`, several completions at a time. A
    completion that fails to run scores 0.0. Where the machine refuses the sandbox, this raises
    :class:`~brainstacks_hooks.rl.sandbox.SandboxUnavailable` unless ``allow_weak_sandbox=True``. To
    change a limit, wrap it in a named function (TRL logs rewards by ``__name__``).

    Args:
        completions: TRL's completions (strings or conversational message lists).
        test_list: per completion, a list of assert strings (or one string of asserts).
        test_setup_code: per completion, MBPP's ``test_setup_code`` (optional dataset column).
        timeout_s, memory_mb, allow_weak_sandbox: passed to ``run_python_tests``.
        max_workers (`int`, *optional*): concurrent sandboxes; default ``min(8, os.cpu_count())``.

    Example:
        >>> completion = [{"role": "assistant", "content": "```python\ndef add(a, b):\n    return a + b\n```"}]
        >>> code_reward([completion], test_list=[["assert add(1, 2) == 3", "assert add(1, 1) == 3"]])
        [0.5]
    """
    if len(test_list) != len(completions):
        raise ValueError(f"code_reward got {len(completions)} completions but {len(test_list)} test lists")
    setups = list(test_setup_code) if test_setup_code is not None else [""] * len(completions)
    jobs = [(extract_code(completion_text(c)), _as_tests(t), setup or "")
            for c, t, setup in zip(completions, test_list, setups)]

    def run(job: tuple[str, list[str], str]) -> float:
        code, tests, setup = job
        if not code.strip() or not tests:
            return 0.0
        return run_python_tests(code, tests, timeout_s=timeout_s, memory_mb=memory_mb, setup_code=setup,
                                allow_weak_sandbox=allow_weak_sandbox)

    workers = max(1, min(len(jobs), max_workers or min(8, os.cpu_count() or 1)))
    if workers == 1:
        return [run(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(run, jobs))
