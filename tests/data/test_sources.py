"""Tests of domain/eval loading: bad-row accounting, seeded sampling, data-dir resolution, HF sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from brainstacks_hooks.constants import ENV_DATA_DIR
from brainstacks_hooks.data import (
    HFSource,
    load_domain_rows,
    load_eval_questions,
    load_eval_rows,
    resolve_data_dir,
)
from brainstacks_hooks.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
if not SHARED_DATA.is_dir():
    SHARED_DATA = Path("/work/shared/data")
needs_shared = pytest.mark.skipif(not (SHARED_DATA / "math").is_dir(), reason="shared/data not present")


def _row(i: int, **kw: object) -> dict[str, object]:
    return {
        "id": f"r-{i}",
        "instruction": f"Question {i}?",
        "input": "",
        "output": f"Answer {i}.",
        "source": "unit",
        **kw,
    }


def _write_domain(root: Path, domain: str = "chat", split: str = "train") -> Path:
    lines = [json.dumps(_row(i)) for i in range(40)]
    lines += [
        '{"id": "bad-1", "instruction": "broken',  # malformed JSON
        "not json at all",  # malformed JSON
        "",  # blank line: not a row
        json.dumps(["a", "list"]),  # wrong_type:row
        json.dumps({"id": "m1", "output": "x"}),  # missing_field:instruction
        json.dumps({"id": "m2", "instruction": "x"}),  # missing_field:output
        json.dumps({"id": "t1", "instruction": "x", "output": 7}),  # wrong_type:output
        json.dumps({"id": "e1", "instruction": "x", "output": "   "}),  # empty_output
        json.dumps({"id": "e2", "instruction": "x", "output": "<|im_end|><eos>"}),  # empty after cleaning
        json.dumps({"id": "o1", "instruction": "x", "output": "y" * 500}),  # overlong
        json.dumps(_row(3)),  # duplicate_id
        json.dumps({"id": "c1", "instruction": "<start_of_turn>user\nHi<end_of_turn>", "output": "Hey</s>"}),
    ]
    path = root / domain / f"{split}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_bad_rows_are_counted_by_reason(tmp_path: Path) -> None:
    _write_domain(tmp_path)
    rows, report = load_domain_rows("chat", "train", data_dir=tmp_path, max_chars=300)
    assert report.dropped == {
        "duplicate_id": 1,
        "empty_output": 2,
        "malformed_json": 2,
        "missing_field:instruction": 1,
        "missing_field:output": 1,
        "overlong": 1,
        "wrong_type:output": 1,
        "wrong_type:row": 1,
    }
    assert report.n_read == 51 and report.n_valid == 41 == report.n_kept == len(rows)
    assert report.n_read == report.n_valid + sum(report.dropped.values())
    assert set(rows[0]) == {"id", "instruction", "input", "output", "domain", "source"}
    cleaned = next(r for r in rows if r["id"] == "c1")
    assert (cleaned["instruction"], cleaned["output"], cleaned["source"]) == ("Hi", "Hey", "chat-train")
    assert report.kept_by_source == {"chat-train": 1, "unit": 40}
    assert json.loads(json.dumps(report.to_dict())) == report.to_dict()


def test_seeded_sampling_is_reproducible_and_not_the_head(tmp_path: Path) -> None:
    _write_domain(tmp_path)
    a, rep_a = load_domain_rows("chat", "train", data_dir=tmp_path, n=10, seed=7)
    b, rep_b = load_domain_rows("chat", "train", data_dir=tmp_path, n=10, seed=7)
    c, rep_c = load_domain_rows("chat", "train", data_dir=tmp_path, n=10, seed=8)
    ids = [r["id"] for r in a]
    assert ids == [r["id"] for r in b] and rep_a.sample_ids_hash == rep_b.sample_ids_hash
    assert ids != [r["id"] for r in c] and rep_a.sample_ids_hash != rep_c.sample_ids_hash
    assert ids != [f"r-{i}" for i in range(10)]  # never "the first N rows"
    assert (
        len(set(ids)) == 10 and rep_a.n_kept == 10 and rep_a.n_valid == 42
    )  # the 500-char row is fine at the default max_chars


def test_data_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_DATA_DIR, raising=False)
    assert resolve_data_dir() is None
    with pytest.raises(DataError, match=ENV_DATA_DIR):
        load_domain_rows("chat", "train")
    with pytest.raises(DataError, match="does not exist"):
        resolve_data_dir(tmp_path / "nope")
    _write_domain(tmp_path)
    monkeypatch.setenv(ENV_DATA_DIR, str(tmp_path))
    assert resolve_data_dir() == tmp_path
    rows, _ = load_domain_rows("chat", "train")
    assert len(rows) == 42
    with pytest.raises(DataError, match="not found"):
        load_domain_rows("code", "train")
    monkeypatch.setenv(ENV_DATA_DIR, str(tmp_path / "missing"))
    with pytest.raises(DataError, match="does not exist"):
        resolve_data_dir()


def test_hf_source_sampling_messages_and_loud_errors(tmp_path: Path) -> None:
    plain = tmp_path / "plain.jsonl"
    plain.write_text(
        "\n".join(json.dumps({"q": f"Q{i}?", "a": f"A{i}"}) for i in range(30)), encoding="utf-8"
    )
    chats = tmp_path / "chats.jsonl"
    conv = [
        {"from": "system", "value": "S"},
        {"from": "human", "value": "Hi?"},
        {"from": "gpt", "value": "Hey"},
    ]
    chats.write_text(
        json.dumps({"conversations": conv}) + "\n" + json.dumps({"conversations": []}) + "\n",
        encoding="utf-8",
    )
    src = HFSource(
        "json", data_files=str(plain), instruction_field="q", input_field=None, output_field="a", take=8
    )
    rows, report = load_domain_rows("chat", "train", hf_sources=[src], seed=3)
    again, _ = load_domain_rows("chat", "train", hf_sources=[src], seed=3)
    assert [r["id"] for r in rows] == [r["id"] for r in again] and len(rows) == 8
    assert [r["instruction"] for r in rows] != [f"Q{i}?" for i in range(8)]
    assert all(r["output"] == "A" + r["instruction"][1:-1] for r in rows)
    assert report.origin == ["hf:json:train"]

    msg_src = HFSource("json", data_files=str(chats), messages_field="conversations")
    rows, report = load_domain_rows("chat", "train", hf_sources=[msg_src])
    assert [(r["instruction"], r["output"]) for r in rows] == [("Hi?", "Hey")]
    assert report.dropped == {"missing_field:instruction": 1}

    with pytest.raises(DataError, match="could not load"):
        load_domain_rows("chat", "train", hf_sources=[HFSource("json", data_files=str(plain), split="test")])


def test_eval_rows_are_strict(tmp_path: Path) -> None:
    (tmp_path / "eval").mkdir()
    good = [{"id": f"q{i}", "question": f"Q{i}", "choices": ["a", "b"], "answer_index": 0} for i in range(20)]
    (tmp_path / "eval" / "toy.jsonl").write_text("\n".join(json.dumps(r) for r in good), encoding="utf-8")
    rows = load_eval_rows("toy", data_dir=tmp_path, n=5, seed=1)
    assert len(rows) == 5 and rows == load_eval_rows("toy", data_dir=tmp_path, n=5, seed=1)
    assert [r["id"] for r in rows] != [f"q{i}" for i in range(5)]
    assert load_eval_questions(tmp_path) == [f"Q{i}" for i in range(20)]
    (tmp_path / "eval" / "bad.jsonl").write_text(json.dumps({"id": "x", "question": "Q"}), encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:1"):
        load_eval_rows("bad", data_dir=tmp_path)
    with pytest.raises(DataError, match="not found"):
        load_eval_rows("missing", data_dir=tmp_path)


@needs_shared
def test_real_shared_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_DATA_DIR, str(SHARED_DATA))
    rows, report = load_domain_rows("math", "train", n=200, seed=42)
    assert report.n_read == report.n_valid + sum(report.dropped.values())
    assert report.n_read == 3000 and report.n_kept == len(rows) == 200
    assert report.kept_by_source == {"gsm8k_train": 200}
    assert all(r["domain"] == "math" and "####" in r["output"] for r in rows)
    assert rows == load_domain_rows("math", "train", n=200, seed=42)[0]

    val, val_report = load_domain_rows("medical", "val")
    assert val_report.n_kept == len(val) == val_report.n_valid and val_report.n_read == 300
    gsm = load_eval_rows("gsm8k", n=50, seed=0)
    assert len(gsm) == 50 and all(r["final"].lstrip("-").isdigit() for r in gsm)
    mmlu = load_eval_rows("mmlu", n=20)
    assert all(0 <= r["answer_index"] < len(r["choices"]) for r in mmlu)
