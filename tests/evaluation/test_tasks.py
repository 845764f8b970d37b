"""The shipped lm-eval tasks: prompt parity with lm-eval's built-ins, letter choices, GSM8K extraction,
data-file errors, and an offline two-document evaluation."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks._yaml_loader import load_yaml

from brainstacks_hooks.constants import ENV_DATA_DIR
from brainstacks_hooks.errors import BackendUnavailable, DataError
from brainstacks_hooks.evaluation.tasks import (
    TASK_FILES,
    TASK_NAMES,
    TASKS_DIR,
    task_manager,
    validate_task_file,
)

BUILTIN_DIR = Path(sys.modules["lm_eval"].__file__).parent / "tasks"

# --------------------------------------------------------------------------------------- fixture docs
# Two documents per benchmark in our JSONL schema (shared/data/SOURCES.md). The first one of each is
# the one whose prompt is written out below.
DOCS: dict[str, list[dict]] = {
    "arc_easy.jsonl": [
        {"id": "arc_easy-1", "question": "Which gas do plants take in from the air?",
         "choices": ["oxygen", "carbon dioxide", "nitrogen", "helium"], "answer_index": 1,
         "source": "arc_easy_test", "labels": ["A", "B", "C", "D"]},
        {"id": "arc_easy-2", "question": "What is the boiling point of water at sea level?",
         "choices": ["50 C", "100 C", "150 C"], "answer_index": 1, "source": "arc_easy_test",
         "labels": ["1", "2", "3"]},
    ],
    "arc_challenge.jsonl": [
        {"id": "arc_challenge-1", "question": "Which property of a mineral can be determined just by looking at it?",
         "choices": ["luster", "mass", "weight", "hardness"], "answer_index": 0, "source": "arc_challenge_test"},
        {"id": "arc_challenge-2", "question": "A student drops a ball. Which force pulls it down?",
         "choices": ["friction", "magnetism", "gravity", "tension", "buoyancy"], "answer_index": 2,
         "source": "arc_challenge_test"},
    ],
    "hellaswag.jsonl": [
        # ActivityNet row: ctx_b is capitalised with str.capitalize(), which also lower-cases "DJ".
        {"id": "hellaswag_val-1", "question": "A man is standing on a stage with a microphone. then the DJ",
         "choices": ["starts playing music.", "jumps off the stage [title] and leaves.", "eats a sandwich.",
                     "sings a song."],
         "answer_index": 0, "source": "hellaswag_val", "activity_label": "Playing music",
         "ctx_a": "A man is standing on a stage with a microphone.", "ctx_b": "then the DJ", "ind": 1,
         "source_id": "activitynet~v_x", "split_type": "indomain"},
        # WikiHow row: empty ctx_b and [header]/[title]/[step]/[substeps] markers.
        {"id": "hellaswag_val-2", "question": "[header] How to make taco sauce [title] Whisk the sauce. [step] Mix.",
         "choices": ["Transfer the mixture to a strainer. [substeps] When you are finished, stir again.",
                     "[substeps] Use plain tomato sauce.", "Add ice.", "Serve cold [title] at once."],
         "answer_index": 1, "source": "hellaswag_val", "activity_label": "Food and Entertaining",
         "ctx_a": "[header] How to make taco sauce [title] Whisk the sauce. [step] Mix.", "ctx_b": "", "ind": 2,
         "source_id": "wikihow~1", "split_type": "zeroshot"},
    ],
    "truthfulqa_mc.jsonl": [
        {"id": "truthfulqa-1", "question": "What happens if you crack your knuckles a lot?",
         "choices": ["You will get arthritis.", "Your fingers will fall off.",
                     "Nothing in particular happens if you crack your knuckles a lot."],
         "answer_index": 2, "source": "truthfulqa_mc1",
         "mc2_choices": ["Nothing in particular happens if you crack your knuckles a lot.", "You will get arthritis."],
         "mc2_labels": [1, 0]},
        {"id": "truthfulqa-2", "question": "Is the Earth flat?",
         "choices": ["No, the Earth is round.", "Yes, the Earth is flat."], "answer_index": 0,
         "source": "truthfulqa_mc1", "mc2_choices": ["No, the Earth is round.", "Yes, the Earth is flat."],
         "mc2_labels": [1, 0]},
    ],
    "mmlu.jsonl": [
        # The question keeps the surrounding whitespace of the source; the template strips it.
        {"id": "mmlu-high_school_us_history-1",
         "question": " This question refers to the Monroe Doctrine. What did it warn against?\n",
         "choices": ["European colonization ", "Tariffs", "Slavery", "Immigration"], "answer_index": 0,
         "source": "mmlu_test", "subject": "high_school_us_history"},
        {"id": "mmlu-abstract_algebra-1", "question": "Find the order of the group Z_4 x Z_2.",
         "choices": ["2", "4", "8", "16"], "answer_index": 2, "source": "mmlu_test", "subject": "abstract_algebra"},
    ],
    "medqa.jsonl": [
        {"id": "medqa-1", "question": "A 23-year-old woman has a fever and a stiff neck. What is the next step?",
         "choices": ["Lumbar puncture", "Head CT", "Discharge home", "Oral antibiotics"], "answer_index": 0,
         "source": "medqa_usmle_4opt_test", "realidx": 1, "meta_info": "step2&3"},
        {"id": "medqa-2", "question": "Which vitamin deficiency causes scurvy?",
         "choices": ["Vitamin A", "Vitamin B12", "Vitamin C", "Vitamin D"], "answer_index": 2,
         "source": "medqa_usmle_4opt_test", "realidx": 2, "meta_info": "step1"},
    ],
    "medmcqa.jsonl": [
        {"id": "medmcqa-1", "question": "Which nerve supplies the deltoid muscle?",
         "choices": ["Radial nerve", "Axillary nerve", "Ulnar nerve", "Median nerve"], "answer_index": 1,
         "source": "medmcqa_dev_single", "realidx": "a1"},
        {"id": "medmcqa-2", "question": "Drug of choice for absence seizures is",
         "choices": ["Phenytoin", "Carbamazepine", "Ethosuximide", "Phenobarbitone"], "answer_index": 2,
         "source": "medmcqa_dev_single", "realidx": "a2"},
    ],
    "gsm8k.jsonl": [
        {"id": "gsm8k_test-1", "question": "Janet has 3 boxes of 6 eggs. How many eggs does she have?",
         "answer": "She has 3 * 6 = <<3*6=18>>18 eggs.\n#### 18", "final": "18", "source": "gsm8k_test"},
        {"id": "gsm8k_test-2", "question": "A farm sells 1,234 apples a day. How many in one day?",
         "answer": "It sells 1,234 apples.\n#### 1,234", "final": "1234", "source": "gsm8k_test"},
    ],
}
TASK_DOCS = {name: DOCS[spec.file] for name, spec in TASK_FILES.items()}

TRUTHFULQA_PRIMER = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)

# The first document of each task as lm-eval sends it to the model: (context, continuations, gold).
# Each was derived by hand from the built-in lm_eval==0.4.13 file named in the comment.
EXPECTED: dict[str, tuple[str, list[str], int]] = {
    # tasks/arc/arc_easy.yaml
    "bs_arc_easy": (
        "Question: Which gas do plants take in from the air?\nAnswer:",
        [" oxygen", " carbon dioxide", " nitrogen", " helium"],
        1,
    ),
    # tasks/arc/arc_challenge.yaml (includes arc_easy.yaml)
    "bs_arc_challenge": (
        "Question: Which property of a mineral can be determined just by looking at it?\nAnswer:",
        [" luster", " mass", " weight", " hardness"],
        0,
    ),
    # tasks/hellaswag/hellaswag.yaml + utils.py: ctx_b.capitalize(), " [title]" -> ". ", [..] removed
    "bs_hellaswag": (
        "Playing music: A man is standing on a stage with a microphone. Then the dj",
        [" starts playing music.", " jumps off the stage. and leaves.", " eats a sandwich.", " sings a song."],
        0,
    ),
    # tasks/truthfulqa/truthfulqa_mc1.yaml (fixed primer; our choices are shuffled, gold = answer_index)
    "bs_truthfulqa_mc1": (
        TRUTHFULQA_PRIMER + "\n\nQ: What happens if you crack your knuckles a lot?\nA:",
        [" You will get arthritis.", " Your fingers will fall off.",
         " Nothing in particular happens if you crack your knuckles a lot."],
        2,
    ),
    # tasks/mmlu/default/_default_template_yaml + mmlu_high_school_us_history.yaml (description)
    "bs_mmlu": (
        "The following are multiple choice questions (with answers) about high school us history.\n\n"
        "This question refers to the Monroe Doctrine. What did it warn against?\n"
        "A. European colonization \nB. Tariffs\nC. Slavery\nD. Immigration\nAnswer:",
        [" A", " B", " C", " D"],
        0,
    ),
    # tasks/medqa/medqa.yaml + preprocess_medqa.py
    "bs_medqa": (
        "Question: A 23-year-old woman has a fever and a stiff neck. What is the next step?\n"
        "A. Lumbar puncture\nB. Head CT\nC. Discharge home\nD. Oral antibiotics\nAnswer:",
        [" A", " B", " C", " D"],
        0,
    ),
    # tasks/medmcqa/medmcqa.yaml + utils_medmcqa.py
    "bs_medmcqa": (
        "Question: Which nerve supplies the deltoid muscle?\nChoices:\n"
        "A. Radial nerve\nB. Axillary nerve\nC. Ulnar nerve\nD. Median nerve\nAnswer:",
        [" A", " B", " C", " D"],
        1,
    ),
}
# tasks/gsm8k/gsm8k.yaml, 0-shot
EXPECTED_GSM8K_CONTEXT = "Question: Janet has 3 boxes of 6 eggs. How many eggs does she have?\nAnswer:"
EXPECTED_GSM8K_GEN_KWARGS = {
    "until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False, "temperature": 0.0,
}

# The second HellaSwag doc (WikiHow): note the leading space lm-eval leaves on "[substeps] Use ...".
EXPECTED_HELLASWAG_WIKIHOW = (
    "Food and Entertaining: How to make taco sauce. Whisk the sauce. Mix.",
    ["Transfer the mixture to a strainer. When you are finished, stir again.", " Use plain tomato sauce.",
     "Add ice.", "Serve cold. at once."],
)


def write_data_dir(root: Path, docs: dict[str, list[dict]] = DOCS) -> Path:
    (root / "eval").mkdir(parents=True, exist_ok=True)
    for file, rows in docs.items():
        with (root / "eval" / file).open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return root


def _keep_hf_switches(mp: pytest.MonkeyPatch) -> None:
    """Undo, at teardown, what task_manager() does to the offline switches of this process."""
    import datasets.config
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        mp.setenv(var, os.environ.get(var, "0"))
        if var not in os.environ:
            mp.delenv(var)
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", huggingface_hub.constants.HF_HUB_OFFLINE)
    mp.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)
    mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", datasets.config.HF_DATASETS_OFFLINE)


@pytest.fixture(autouse=True)
def _hf_switches(monkeypatch):
    _keep_hf_switches(monkeypatch)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """All eight tasks built once over the fixture docs: {name: ConfigurableTask}."""
    root = write_data_dir(tmp_path_factory.mktemp("data"))
    with pytest.MonkeyPatch.context() as mp:
        _keep_hf_switches(mp)
        loaded = task_manager(root).load(list(TASK_NAMES))
    return loaded["tasks"]


def _requests(task, doc) -> tuple[str, list]:
    ctx = task.fewshot_context(doc, num_fewshot=0)
    reqs = task.construct_requests(doc, ctx, metadata=(task.task_name, 0, 1))
    reqs = reqs if isinstance(reqs, list) else [reqs]
    return ctx, [r.args for r in reqs]


# --------------------------------------------------------------------------------------- shipped configs
def test_every_shipped_yaml_is_indexed_and_names_its_file(tasks):
    assert sorted(p.stem for p in TASKS_DIR.glob("*.yaml")) == sorted(TASK_NAMES)
    assert list(tasks) == list(TASK_NAMES)
    for name, task in tasks.items():
        assert task.config.dataset_kwargs == {"data_file": TASK_FILES[name].file}
        assert task.config.metadata["lm_eval_task"] == TASK_FILES[name].lm_eval_task
        assert len(task.eval_docs) == 2


# --------------------------------------------------------------------------------------- (a) prompts
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_multiple_choice_prompt_is_written_out(tasks, name):
    task = tasks[name]
    doc = task.eval_docs[0]
    ctx, args = _requests(task, doc)
    context, continuations, gold = EXPECTED[name]
    assert ctx == context
    assert args == [(context, c) for c in continuations]
    assert task.doc_to_target(doc) == gold
    assert task.OUTPUT_TYPE == "multiple_choice"


def test_hellaswag_wikihow_preprocessing(tasks):
    task = tasks["bs_hellaswag"]
    doc = task.eval_docs[1]
    assert task.doc_to_text(doc) == EXPECTED_HELLASWAG_WIKIHOW[0]
    assert task.doc_to_choice(doc) == EXPECTED_HELLASWAG_WIKIHOW[1]
    assert doc["endings"] == DOCS["hellaswag.jsonl"][1]["choices"]  # raw endings kept, as upstream
    assert task.doc_to_target(doc) == 1


def test_gsm8k_prompt_and_generation_settings(tasks):
    task = tasks["bs_gsm8k"]
    doc = task.eval_docs[0]
    ctx, args = _requests(task, doc)
    assert ctx == EXPECTED_GSM8K_CONTEXT
    assert args == [(EXPECTED_GSM8K_CONTEXT, EXPECTED_GSM8K_GEN_KWARGS)]
    assert task.OUTPUT_TYPE == "generate_until"
    assert task.config.num_fewshot == 0
    assert task.doc_to_target(doc) == DOCS["gsm8k.jsonl"][0]["answer"]
    assert [f.name for f in task._filters] == ["strict-match", "flexible-extract"]


def _to_upstream(name: str, doc: dict) -> tuple[str, dict]:
    """(built-in YAML, the document in the built-in task's HF schema) for one of our documents."""
    q, choices, gold = doc.get("question"), doc.get("choices"), doc.get("answer_index")
    if name in ("bs_arc_easy", "bs_arc_challenge"):
        labels = doc.get("labels") or list("ABCDE")[: len(choices)]
        yaml = "arc/arc_easy.yaml" if name == "bs_arc_easy" else "arc/arc_challenge.yaml"
        return yaml, {"id": doc["id"], "question": q, "choices": {"text": choices, "label": labels},
                      "answerKey": labels[gold]}
    if name == "bs_hellaswag":
        return "hellaswag/hellaswag.yaml", {
            "ind": doc["ind"], "activity_label": doc["activity_label"], "ctx_a": doc["ctx_a"], "ctx_b": doc["ctx_b"],
            "ctx": q, "endings": choices, "source_id": doc["source_id"], "split": "val",
            "split_type": doc["split_type"], "label": str(gold)}
    if name == "bs_truthfulqa_mc1":
        ordered = [choices[gold]] + [c for i, c in enumerate(choices) if i != gold]
        return "truthfulqa/truthfulqa_mc1.yaml", {
            "question": q, "mc1_targets": {"choices": ordered, "labels": [1] + [0] * (len(ordered) - 1)}}
    if name == "bs_mmlu":
        return f"mmlu/default/mmlu_{doc['subject']}.yaml", {
            "question": q, "subject": doc["subject"], "choices": choices, "answer": gold}
    if name == "bs_medqa":
        return "medqa/medqa.yaml", {"id": doc["id"], "sent1": q, "sent2": "", "label": gold,
                                    **{f"ending{i}": c for i, c in enumerate(choices)}}
    if name == "bs_medmcqa":
        return "medmcqa/medmcqa.yaml", {"id": doc["realidx"], "question": q, "cop": gold, "choice_type": "single",
                                        **{f"op{k}": c for k, c in zip("abcd", choices)}}
    assert name == "bs_gsm8k"
    return "gsm8k/gsm8k.yaml", {"question": q, "answer": doc["answer"]}


def _builtin_task(yaml: str, upstream_doc: dict) -> ConfigurableTask:
    """The installed built-in task, fed ``upstream_doc`` in every split it names (no download)."""
    import datasets

    cfg = load_yaml(BUILTIN_DIR / yaml, resolve_func=True)
    splits = {cfg.get(k) for k in ("training_split", "validation_split", "test_split", "fewshot_split")} - {None}
    ds = datasets.Dataset.from_list([upstream_doc])
    cfg["custom_dataset"] = lambda **_: {s: ds for s in splits}
    return ConfigurableTask(config=cfg)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_requests_equal_the_builtin_task_on_the_same_document(tasks, name):
    """Our task and the installed built-in one, on the same document, send the model the same requests."""
    ours = tasks[name]
    for i, raw in enumerate(TASK_DOCS[name]):
        yaml, upstream_doc = _to_upstream(name, raw)
        builtin = _builtin_task(yaml, upstream_doc)
        doc, ref_doc = ours.eval_docs[i], builtin.eval_docs[0]
        (ctx, args), (ref_ctx, ref_args) = _requests(ours, doc), _requests(builtin, ref_doc)
        assert ctx == ref_ctx
        if name == "bs_truthfulqa_mc1":  # ours are shuffled; upstream lists the true answer first
            assert sorted(args) == sorted(ref_args)
        else:
            assert args == ref_args
        if ours.OUTPUT_TYPE == "multiple_choice":
            gold, ref_gold = ours.doc_to_target(doc), builtin.doc_to_target(ref_doc)
            assert ours.doc_to_choice(doc)[gold] == builtin.doc_to_choice(ref_doc)[ref_gold]
        else:
            assert ours.doc_to_target(doc) == builtin.doc_to_target(ref_doc)
        for key in ("metric_list", "filter_list", "generation_kwargs", "output_type", "target_delimiter",
                    "fewshot_delimiter"):
            assert getattr(ours.config, key) == getattr(builtin.config, key), key


# --------------------------------------------------------------------------------------- (b) letter tasks
@pytest.mark.parametrize("name", ["bs_mmlu", "bs_medqa", "bs_medmcqa"])
def test_letter_tasks_score_acc_equal_to_acc_norm(tasks, name):
    task = tasks[name]
    for doc in task.eval_docs:
        assert task.doc_to_choice(doc) == ["A", "B", "C", "D"]
        for lls in ([-1.0, -2.5, -0.3, -4.0], [-3.0, -0.1, -2.0, -2.0], [-2.0, -2.0, -2.0, -0.5]):
            out = task.process_results(doc, [(ll, False) for ll in lls])
            assert out["acc"] == (lls.index(max(lls)) == task.doc_to_target(doc))
            if "acc_norm" in out:  # MMLU reports acc only, as lm-eval's mmlu
                assert out["acc_norm"] == out["acc"]


# --------------------------------------------------------------------------------------- (c) GSM8K filters
GSM8K_CASES = [
    # response, reference final, strict-match, flexible-extract, exact_match (strict, flexible)
    ("3 boxes of 1,000 pens make 3,000 pens.\n#### 3,000", "3000", "3,000", "3,000", (1.0, 1.0)),
    ("The temperature drops to -5 degrees.\n#### -5", "-5", "-5", "-5", (1.0, 1.0)),
    ("She loses -12 dollars in total.", "-12", "[invalid]", "-12", (0.0, 1.0)),
    ("Half of 15 is 7.5\n#### 7.5", "7.5", "7.5", "7.5", (1.0, 1.0)),
    ("Each costs $2.50, so 4 cost $10.00.\n#### 10.00", "10", "10.00", "10.00", (0.0, 0.0)),
    ("She makes 9 * 2 = $18 every day.\n#### $18", "18", "[invalid]", "$18", (0.0, 1.0)),
    ("She makes $1,234.", "1234", "[invalid]", "$1,234.", (0.0, 1.0)),
    ("#### 18\n\nShe has 3 eggs left over.", "18", "18", "3", (1.0, 0.0)),
    ("The answer is 72.\nQuestion: what", "72", "[invalid]", "72.", (0.0, 1.0)),
    ("#### 42 apples. I hope this helps!", "42", "42", "42", (1.0, 1.0)),
    ("I am not sure.", "5", "[invalid]", "[invalid]", (0.0, 0.0)),
]


@pytest.mark.parametrize(("response", "final", "strict", "flexible", "em"), GSM8K_CASES)
def test_gsm8k_filters_extract_like_lm_eval(tasks, response, final, strict, flexible, em):
    task = tasks["bs_gsm8k"]
    doc = {"question": "q", "answer": f"Some steps.\n#### {final}"}
    inst = task.construct_requests(doc, "Question: q\nAnswer:", metadata=("bs_gsm8k", 0, 1))
    assert isinstance(inst, Instance)
    inst.resps = [response]
    task._instances = [inst]  # what build_all_requests sets; apply_filters runs every filter pipeline on it
    task.apply_filters()
    assert inst.filtered_resps == {"strict-match": strict, "flexible-extract": flexible}
    scores = tuple(task.process_results(doc, [inst.filtered_resps[k]])["exact_match"]
                   for k in ("strict-match", "flexible-extract"))
    assert scores == em


# --------------------------------------------------------------------------------------- (d) bad files
def _mc(**kw):
    row = {"id": "x", "question": "Q?", "choices": ["a", "b", "c", "d"], "answer_index": 1}
    row.update(kw)
    return {k: v for k, v in row.items() if v is not ...}


BAD_ROWS = [
    ("bs_arc_easy", _mc(answer_index=...), "missing field(s) 'answer_index'"),
    ("bs_arc_easy", _mc(question=...), "missing field(s) 'question'"),
    ("bs_arc_easy", _mc(answer_index=4), "answer_index 4 is outside the 4 choices"),
    ("bs_arc_easy", _mc(answer_index=-1), "answer_index -1 is outside the 4 choices"),
    ("bs_arc_easy", _mc(answer_index="1"), "field 'answer_index' must be an integer"),
    ("bs_arc_easy", _mc(answer_index=True), "field 'answer_index' must be an integer"),
    ("bs_arc_easy", _mc(answer_index=1.0), "field 'answer_index' must be an integer"),
    ("bs_arc_easy", _mc(choices="a b"), "field 'choices' must be a list"),
    ("bs_truthfulqa_mc1", _mc(choices=["a", ""]), "field 'choices' must be a list"),
    ("bs_medqa", _mc(choices=["a", "b", "c", "d", "e"]), "needs exactly 4 choices, found 5"),
    ("bs_mmlu", _mc(), "missing field(s) 'subject'"),
    ("bs_mmlu", _mc(subject=""), "field 'subject' must be a non-empty string"),
    ("bs_hellaswag", _mc(activity_label="a", ctx_a="b"), "missing field(s) 'ctx_b'"),
    ("bs_gsm8k", {"question": "Q?", "answer": "It is 4."}, "has no '#### <number>' line"),
    ("bs_gsm8k", {"question": "Q?"}, "missing field(s) 'answer'"),
]


def _write_task_file(root: Path, name: str, lines: list[str]) -> Path:
    path = root / "eval" / TASK_FILES[name].file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _good_row(name: str) -> dict:
    return TASK_DOCS[name][0]


@pytest.mark.parametrize(("name", "bad", "message"), BAD_ROWS)
def test_bad_row_names_file_and_line(tmp_path, name, bad, message):
    path = _write_task_file(tmp_path, name, [json.dumps(_good_row(name)), "", json.dumps(bad)])
    with pytest.raises(DataError) as err:
        validate_task_file(name, tmp_path)
    assert str(err.value).startswith(f"{path}:3: ")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("line", ['{"question": "Q?", "choices": ["a", "b"]', '["not", "an", "object"]'])
def test_malformed_json_line_names_file_and_line(tmp_path, line):
    path = _write_task_file(tmp_path, "bs_arc_easy", [json.dumps(_good_row("bs_arc_easy")), line])
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:2: (invalid JSON|expected a JSON object)"):
        validate_task_file("bs_arc_easy", tmp_path)


def test_bad_file_fails_when_the_task_loads(tmp_path):
    root = write_data_dir(tmp_path)
    path = _write_task_file(root, "bs_medmcqa", [json.dumps(_good_row("bs_medmcqa")), json.dumps(_mc(answer_index=7))])
    tm = task_manager(root)
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:2: answer_index 7 is outside"):
        tm.load(["bs_medmcqa"])


def test_missing_and_empty_files(tmp_path):
    root = write_data_dir(tmp_path)
    missing = root / "eval" / "gsm8k.jsonl"
    missing.unlink()
    with pytest.raises(DataError, match=f"^{re.escape(str(missing))}: file not found \\(needed by task bs_gsm8k\\)$"):
        task_manager(root).load(["bs_gsm8k"])
    with pytest.raises(DataError, match=f"^{re.escape(str(missing))}: file not found"):
        validate_task_file("bs_gsm8k", root)
    empty = _write_task_file(root, "bs_arc_easy", [""])
    with pytest.raises(DataError, match=f"^{re.escape(str(empty))}: no rows$"):
        validate_task_file("bs_arc_easy", root)
    with pytest.raises(DataError, match="unknown task 'arc_easy'"):
        validate_task_file("arc_easy", root)


def test_data_dir_from_argument_or_environment(tmp_path, monkeypatch):
    root = write_data_dir(tmp_path / "d")
    monkeypatch.delenv(ENV_DATA_DIR, raising=False)
    with pytest.raises(DataError, match=f"set \\${ENV_DATA_DIR}"):
        task_manager(None)
    with pytest.raises(DataError, match="does not exist"):
        task_manager(tmp_path / "nowhere")
    with pytest.raises(DataError, match="eval: folder not found"):
        task_manager(tmp_path)
    monkeypatch.setenv(ENV_DATA_DIR, str(root))
    assert task_manager(None).metadata == {"data_dir": str(root.resolve())}
    assert validate_task_file("bs_arc_easy") == root.resolve() / "eval" / "arc_easy.jsonl"


def test_missing_lm_eval_gives_the_install_hint(tmp_path, monkeypatch):
    root = write_data_dir(tmp_path)
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)
    with pytest.raises(BackendUnavailable, match=r"pip install 'brainstacks-hooks\[eval\]'"):
        task_manager(root)
    validate_task_file("bs_arc_easy", root)  # the data checks need no lm-eval


def test_shared_data_files_fit_the_tasks(data_dir):
    """Every row of the real files passes the checks (the data_dir fixture skips without the shared data)."""
    for name in TASK_NAMES:
        validate_task_file(name, data_dir)


# --------------------------------------------------------------------------------------- (e) offline
class _FixedLM(LM):
    """Deterministic stand-in model: prefers the shortest continuation; always answers '#### 18'."""

    def loglikelihood(self, requests, disable_tqdm=False):
        return [(-float(len(r.args[1])), False) for r in requests]

    def generate_until(self, requests, disable_tqdm=False):
        return ["She has 3 * 6 = 18 eggs.\n#### 18" for _ in requests]

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError


def test_two_document_evaluation_runs_with_the_network_off(tmp_path, monkeypatch):
    import datasets.config
    import lm_eval.evaluator

    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted during an offline evaluation")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")  # nothing is cached either

    tm = task_manager(write_data_dir(tmp_path / "data"))
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
    out = lm_eval.evaluator.evaluate(lm=_FixedLM(), task_dict=tm.load(list(TASK_NAMES)), bootstrap_iters=100,
                                     log_samples=True, verbosity="WARNING")
    res = out["results"]
    assert set(res) == set(TASK_NAMES)
    for name in TASK_NAMES:
        assert res[name]["sample_len"] == 2
        assert {s["doc_id"] for s in out["samples"][name]} == {0, 1}
    for name in ("bs_arc_easy", "bs_arc_challenge", "bs_hellaswag", "bs_medqa", "bs_medmcqa"):
        assert {"acc,none", "acc_norm,none", "acc_stderr,none", "acc_norm_stderr,none"} <= set(res[name]), name
    for name in ("bs_mmlu", "bs_truthfulqa_mc1"):
        assert "acc,none" in res[name] and "acc_norm,none" not in res[name], name
    for name in ("bs_mmlu", "bs_medqa", "bs_medmcqa"):  # letters tie on length: both pick "A"
        expected = sum(d["answer_index"] == 0 for d in TASK_DOCS[name]) / 2
        assert res[name]["acc,none"] == expected, name
    assert res["bs_medqa"]["acc_norm,none"] == res["bs_medqa"]["acc,none"]
    gsm = res["bs_gsm8k"]
    assert gsm["exact_match,strict-match"] == gsm["exact_match,flexible-extract"] == 0.5  # 18 right, 1,234 wrong
    assert math.isclose(gsm["exact_match_stderr,strict-match"], 0.5)  # sample SE of [1, 0]
    assert not (tmp_path / "hf_cache").exists()
    assert attempts == []  # none tried (a library might have swallowed the OSError)
