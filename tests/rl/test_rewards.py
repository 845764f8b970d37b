"""Tests of the verifiable rewards: GSM8K final-number match, the format reward and the code reward.

Nothing here is skipped: the code-reward tests fail where the machine refuses the sandbox (the
``full_sandbox`` fixture in ``tests/rl/conftest.py``), and the reference-answer test fails without the
GSM8K file of the shared data (``$BRAINSTACKS_DATA_DIR/eval/gsm8k.jsonl``).
"""

from __future__ import annotations

import doctest
import json
import os
import time
from pathlib import Path

import pytest

from brainstacks_hooks.rl import rewards, sandbox
from brainstacks_hooks.rl.rewards import (
    code_reward,
    completion_text,
    extract_code,
    extract_final_number,
    format_reward,
    gsm8k_reward,
)
from brainstacks_hooks.rl.sandbox import SandboxUnavailable

needs_sandbox = pytest.mark.usefixtures("full_sandbox")  # fails where the machine refuses the sandbox
# tests/conftest.py sets BRAINSTACKS_DATA_DIR to ../shared/data when that exists; the fallback is the same place.
GSM8K = Path(os.environ.get("BRAINSTACKS_DATA_DIR", Path(__file__).resolve().parents[3] / "shared" / "data")) \
    / "eval" / "gsm8k.jsonl"


def chat(text: str) -> list[dict[str, str]]:
    """A TRL conversational completion."""
    return [{"role": "assistant", "content": text}]


# ---------------------------------------------------------------------------------------------------------
# extract_final_number
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    # \boxed{} first, wherever it is, and with nested braces, fractions and LaTeX noise
    (r"The answer is 5, but on reflection \boxed{7}. Check: 7 + 1 = 8", "7"),
    (r"\boxed{\frac{3}{4}}", "0.75"),
    (r"\boxed{-\dfrac{1}{3}}", "-1/3"),
    (r"\boxed{18 \text{ dollars}}", "18"),
    (r"\boxed{\$1,234}", "1234"),
    (r"\boxed{A} so the count is 5", "5"),  # a box without a number does not count
    # then "#### N" (GSM8K's reference format)
    ("Work: 3 * 4 = 12 ...\n#### 12\nNote 99", "12"),
    ("#### -7", "-7"),
    # then "the answer is N" / "Answer: N"
    ("The answer is 5. (Check: 5 * 2 = 10)", "5"),
    ("answer: **42**", "42"),
    ("The final answer is: $1,234.50.", "1234.5"),
    # else the last number
    ("First 3 apples, then 4 more: 7 apples.", "7"),
    ("It costs $1,234 in all", "1234"),
    ("He owes -$5 now", "-5"),
    ("The temperature is -3.", "-3"),
    ("That is 3.50 dollars.", "3.5"),
    ("Pages 10-20 were read", "20"),  # subtraction, not a negative number
    ("0.5 of them", "0.5"),
    ("nothing numeric", None),
    ("", None),
])
def test_extract_final_number(text, expected) -> None:
    assert extract_final_number(text) == expected


def test_reference_answers_extract_to_their_final_line() -> None:
    if not GSM8K.is_file():
        pytest.fail(f"{GSM8K} not found: set BRAINSTACKS_DATA_DIR to the shared data directory (the one with "
                    "eval/gsm8k.jsonl)", pytrace=False)
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:300]]
    for row in rows:
        final = row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        assert extract_final_number(row["answer"]) == final, row["id"]
        assert gsm8k_reward([f"So the result is {final}."], answer=[row["answer"]]) == [1.0]


# ---------------------------------------------------------------------------------------------------------
# gsm8k_reward and format_reward
# ---------------------------------------------------------------------------------------------------------

GSM8K_ANSWER = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72 clips.\n#### 72"


def test_gsm8k_reward_right_wrong_and_partial_batches() -> None:
    right = "48 in April and 24 in May, so 48 + 24 = 72 clips."
    wrong = "She sold 48 + 12 = 60 clips."
    assert gsm8k_reward([right], answer=[GSM8K_ANSWER]) == [1.0]
    assert gsm8k_reward([wrong], answer=[GSM8K_ANSWER]) == [0.0]
    assert gsm8k_reward([right, wrong, r"\boxed{72}", "no idea"], answer=[GSM8K_ANSWER] * 4) == [1.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize(("completion", "reference"), [
    ("The answer is 1,234.", "1234"),
    ("Total: $1234", "#### 1,234"),
    ("It is 3.50", "3.5"),
    ("It is 3.5", "#### 3.50"),
    ("x = -4", "-4"),
    ("The answer is 72.", 72),
    ("The answer is 0.5", 0.5),
    (r"\boxed{\frac{1}{2}}", "0.5"),
])
def test_gsm8k_reward_normalises_numbers(completion, reference) -> None:
    assert gsm8k_reward([completion], answer=[reference]) == [1.0]


def test_gsm8k_reward_compares_exactly() -> None:
    assert gsm8k_reward(["The answer is 72.01"], answer=["72"]) == [0.0]
    assert gsm8k_reward(["The answer is -72"], answer=["72"]) == [0.0]
    assert gsm8k_reward(["The answer is 72"], answer=["no number"]) == [0.0]
    with pytest.raises(ValueError, match="answers"):
        gsm8k_reward(["a", "b"], answer=["1"])


def test_conversational_completions() -> None:
    convo = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "12?"},
             {"role": "assistant", "content": "The answer is 72."}]
    pieces = [{"type": "text", "text": "The answer "}, {"type": "text", "text": "is 72"}]
    parts = [{"role": "assistant", "content": pieces}]
    assert completion_text(convo) == "The answer is 72."
    assert completion_text(parts) == "The answer is 72"
    assert completion_text({"role": "assistant", "content": "x"}) == "x"
    assert gsm8k_reward([chat("The answer is 72."), convo, parts, chat("It is 71")],
                        answer=[GSM8K_ANSWER] * 4) == [1.0, 1.0, 1.0, 0.0]
    assert format_reward([chat(r"\boxed{3}"), chat("maybe 3")]) == [1.0, 0.0]


def test_format_reward() -> None:
    stated = [r"so \boxed{42}", "#### 42", "The answer is 42.", "Answer: -3.5", "The final answer is $7$"]
    unstated = ["I think it is 42", r"\boxed{}", "The answer is unclear", ""]
    assert format_reward(stated) == [1.0] * len(stated)
    assert format_reward(unstated) == [0.0] * len(unstated)


# ---------------------------------------------------------------------------------------------------------
# code_reward
# ---------------------------------------------------------------------------------------------------------

TESTS = ["assert square(2) == 4", "assert square(-3) == 9", "assert square(0) == 0"]


def test_extract_code() -> None:
    fenced = "Here you go:\n```python\ndef f():\n    return 1\n```\nAnd usage:\n```py\nprint(f())\n```\nBye"
    assert extract_code(fenced) == "def f():\n    return 1\n\nprint(f())\n"
    assert extract_code("def f():\n    return 1") == "def f():\n    return 1"  # no fences: the whole text
    assert extract_code("```\nx = 1\n```") == "x = 1\n"  # untagged fence
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"  # truncated generation
    assert extract_code("```bash\npip install x\n```\n```text\nout\n```") == "out\n"  # no python: the last block


@needs_sandbox
def test_code_reward_partial_right_and_wrong() -> None:
    right = "```python\ndef square(x):\n    return x * x\n```"
    partial = "```python\ndef square(x):\n    return x * abs(x)\n```"  # wrong for -3 only
    wrong = "```python\ndef square(x):\n    return x + x\n```"  # right for 2 and 0
    broken = "```python\ndef square(x) return x\n```"
    scores = code_reward([right, partial, wrong, broken, ""], test_list=[TESTS] * 5)
    assert scores == pytest.approx([1.0, 2 / 3, 2 / 3, 0.0, 0.0])


@needs_sandbox
def test_code_reward_conversational_string_tests_and_setup() -> None:
    completion = chat("Sure!\n```python\ndef area(s):\n    return SIDES * s\n```")
    assert code_reward([completion], test_list=["assert area(2) == 8\nassert area(3) == 12"],
                       test_setup_code=["SIDES = 4"]) == [1.0]
    assert code_reward([completion], test_list=[["assert area(2) == 8"]]) == [0.0]  # SIDES undefined
    with pytest.raises(ValueError, match="test lists"):
        code_reward([completion, completion], test_list=[TESTS])


@needs_sandbox
def test_code_reward_runs_completions_concurrently() -> None:
    slow = "```python\nimport time\ntime.sleep(0.6)\ndef square(x):\n    return x * x\n```"
    start = time.monotonic()
    assert code_reward([slow] * 4, test_list=[TESTS] * 4, max_workers=4) == [1.0] * 4
    assert time.monotonic() - start < 4 * 0.6


def test_code_reward_refuses_without_a_sandbox(monkeypatch) -> None:
    monkeypatch.setattr(sandbox, "_namespaces_available", lambda: (False, "simulated"))
    with pytest.raises(SandboxUnavailable, match="simulated"):
        code_reward(["def square(x):\n    return x * x"], test_list=[TESTS])


@needs_sandbox  # the code_reward example runs code in the sandbox
def test_docstring_examples() -> None:
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    for test in finder.find(rewards):
        runner.run(test)
    assert runner.failures == 0 and runner.tries >= 8
