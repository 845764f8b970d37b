"""Tests of keyword leak detection and evaluation n-gram decontamination."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from brainstacks_hooks.data import (
    DecontaminationConfig,
    KeywordMatcher,
    decontaminate,
    detect_leak,
    keyword_scores,
    load_domain_rows,
    load_eval_questions,
)
from brainstacks_hooks.errors import ConfigError

SHARED_DATA = Path("/work/shared/data")
needs_shared = pytest.mark.skipif(not (SHARED_DATA / "eval").is_dir(), reason="shared/data not present")

EVAL_LONG = (
    "A farmer has seventeen sheep and all but nine of them run away into the dark forest near the old mill, "
    "so how many sheep does the farmer have left at the end of the day?"
)
EVAL_SHORT = "Who invented the light bulb?"


def _r(rid: str, instruction: str, output: str = "Sure.", input: str = "") -> dict[str, str]:
    return {"id": rid, "instruction": instruction, "input": input, "output": output}


def _rows() -> dict[str, list[dict[str, str]]]:
    return {
        "chat": [
            _r("c-plain", "Write a short poem about autumn leaves.", "Leaves fall softly."),
            _r(
                "c-code",
                "Write a Python function that reverses a string.",
                "def rev(s):\n    return s[::-1]\nprint(rev('ab'))",
            ),
            _r(
                "c-med",
                "What is the usual treatment for a chronic infection?",
                "A physician decides on antibiotic therapy after diagnosis of the patient.",
            ),
            _r("c-eval", "Answer this: " + EVAL_LONG.upper() + " Think step by step.", "Nine."),
            _r("c-short", "who invented the light-bulb?", "Edison."),
            _r("c-partial", "seventeen sheep and all but nine of them run away into the dark", "ok"),
        ],
        "code": [
            _r("k-1", "Implement bubble sort in Python.", "def sort(a):\n    return sorted(a)"),
            # looks like math, but only chat is checked by default
            _r("k-2", "Calculate the average and the total and the ratio.", "def avg(a): return sum(a)"),
        ],
        "medical": [_r("m-1", "What are symptoms of flu?", "Fever and cough.")],
    }


def test_keyword_scores_whole_words_and_symbols() -> None:
    scores = keyword_scores("import os\nprint(x) in Python; the img is 5mg")
    assert scores["code"] == 3  # import, print(, python
    assert scores["medical"] == 0  # "mg" is matched as a whole word only: not in "img" nor "5mg"
    assert keyword_scores("dose 5 mg")["medical"] == 2
    assert keyword_scores("important imagery")["code"] == 0  # no substring hits for plain words


def test_decontaminate_reassigns_and_drops() -> None:
    rows = _rows()
    before = copy.deepcopy(rows)
    out, report = decontaminate(rows, [EVAL_LONG, EVAL_SHORT, "Short one?"])
    assert rows == before  # inputs are not mutated
    assert report.dropped == {"eval_overlap": {"chat": 2}}
    assert report.examples["eval_overlap"] == ["c-eval", "c-short"]
    assert report.moved == {"chat->code": 1, "chat->medical": 1}
    assert [r["id"] for r in out["chat"]] == ["c-plain", "c-partial"]  # a partial overlap (<50%) stays
    assert [r["id"] for r in out["code"]] == ["k-1", "k-2", "c-code"]
    moved = out["code"][-1]
    assert moved["domain"] == "code" and moved["original_domain"] == "chat"
    assert [r["id"] for r in out["medical"]] == ["m-1", "c-med"]
    for d in rows:
        moved_out = sum(v for k, v in report.moved.items() if k.startswith(f"{d}->"))
        dropped = sum(c.get(d, 0) for c in report.dropped.values())
        assert report.n_kept[d] + moved_out + dropped == report.n_read[d] == len(rows[d])
        assert report.n_out[d] == len(out[d])


def test_report_reproduces_exactly() -> None:
    a_out, a = decontaminate(_rows(), [EVAL_LONG, EVAL_SHORT])
    b_out, b = decontaminate(_rows(), [EVAL_LONG, EVAL_SHORT])
    assert json.dumps(a.to_dict()) == json.dumps(b.to_dict())
    assert a_out == b_out


def test_policies_and_check_domains() -> None:
    _, drop = decontaminate(_rows(), [], DecontaminationConfig(policy="drop"))
    assert drop.dropped == {"keyword_leak": {"chat": 2}} and drop.moved == {}
    keep_out, keep = decontaminate(_rows(), [], DecontaminationConfig(policy="keep"))
    assert keep.flagged == {"chat->code": 1, "chat->medical": 1} and keep.moved == {}
    assert len(keep_out["chat"]) == 6
    _, all_domains = decontaminate(_rows(), [], DecontaminationConfig(check_domains=None))
    assert all_domains.flagged == {"chat->code": 1, "chat->medical": 1, "code->math": 1}
    # there is no math domain here, so the code row flagged as math stays in code
    assert all_domains.moved == {"chat->code": 1, "chat->medical": 1}
    off_out, off = decontaminate(_rows(), [EVAL_LONG], DecontaminationConfig(enabled=False))
    assert off_out == _rows() and off.moved == {} and off.dropped == {}
    # a leak into a domain that is not being built stays where it is
    only_chat = {"chat": _rows()["chat"]}
    out, rep = decontaminate(only_chat, [])
    assert len(out["chat"]) == 6 and rep.moved == {} and rep.flagged == {"chat->code": 1, "chat->medical": 1}
    with pytest.raises(ConfigError, match="reassign, drop or keep"):
        DecontaminationConfig(policy="move")  # type: ignore[arg-type]


def test_ties_are_deterministic() -> None:
    matcher = KeywordMatcher({"code": ("alpha", "beta", "gamma"), "medical": ("delta", "eps", "zeta")})
    row = _r("t", "alpha beta gamma delta eps zeta")
    assert detect_leak(row, "chat", matcher, 3) == "code"  # earlier keyword domain wins a tie
    assert detect_leak(row, "medical", matcher, 3) is None  # the row's own domain wins a tie
    assert detect_leak(_r("u", "alpha beta"), "chat", matcher, 3) is None  # below min hits


def test_boilerplate_ngrams_are_ignored() -> None:
    stem = "which of the following statements about the passage above is most strongly supported by it"
    evals = [f"{stem} case {i}" for i in range(6)]  # stem 13-grams occur in 6 > 5 questions
    row = {"chat": [_r("b", f"{stem} here")]}
    _, report = decontaminate(row, evals)
    assert report.dropped == {}
    _, report = decontaminate(row, evals[:2])
    assert report.dropped == {"eval_overlap": {"chat": 1}}


@pytest.fixture(scope="module")
def real_rows() -> dict[str, list[dict]]:
    return {d: load_domain_rows(d, "train", data_dir=SHARED_DATA)[0] for d in ("chat", "code", "math")}


@needs_shared
def test_real_data_report_is_consistent(real_rows: dict[str, list[dict]]) -> None:
    questions = load_eval_questions(SHARED_DATA)
    assert len(questions) > 10000
    gsm_question = load_eval_questions(SHARED_DATA, ["gsm8k"])[0]
    leaked = _r("leak-1", "Solve this problem carefully.", "The answer is 18.", input=gsm_question)
    rows = {d: list(r) for d, r in real_rows.items()}
    rows["chat"].append(leaked)
    config = DecontaminationConfig(check_domains=None)
    out, report = decontaminate(rows, questions, config)
    total_dropped = 0
    for d, drs in rows.items():
        moved_out = sum(v for k, v in report.moved.items() if k.startswith(f"{d}->"))
        dropped = sum(c.get(d, 0) for c in report.dropped.values())
        total_dropped += dropped
        assert report.n_kept[d] + moved_out + dropped == report.n_read[d] == len(drs)
        assert report.n_out[d] == len(out[d])
    assert sum(report.n_out.values()) == sum(report.n_read.values()) - total_dropped
    assert "leak-1" in report.examples["eval_overlap"]
    assert report.moved.get("chat->code", 0) > 20  # LIMA/Alpaca programming questions
    assert not any(r["id"] == "leak-1" for rs in out.values() for r in rs)
    out2, report2 = decontaminate(rows, questions, config)
    assert report2.to_dict() == report.to_dict() and out2 == out
