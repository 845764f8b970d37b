"""Build the Colab notebooks of ``colab/`` from one source (this file): ``python colab/build_notebooks.py``.

Every notebook starts with the same install cell (the package comes from the path or URL the user sets in
``BRAINSTACKS_SOURCE``, never from a made-up address) and the same settings cell (backend and precision picked
from the hardware; ``BRAINSTACKS_SMOKE=1`` swaps in the embedded SmolLM2, the local data and tiny step counts, which
is how ``tests/test_notebooks.py`` executes every notebook on CPU). ``tests/test_notebooks.py`` also checks that
the committed notebooks are what this script writes, so edit here and rebuild.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

INSTALL = '''import os
import subprocess
import sys

# ==== Set this first: where pip installs brainstacks_hooks from =================================
BRAINSTACKS_SOURCE = ""  # e.g. "git+https://github.com/<you>/brainstacks_hooks", a wheel, or a folder (Drive)
# ===================================================================================================

EXTRAS = "{extras}"
SOURCE = os.environ.get("BRAINSTACKS_SOURCE", BRAINSTACKS_SOURCE)
try:
    import brainstacks_hooks
except ImportError:
    if not SOURCE:
        raise RuntimeError("brainstacks_hooks is not installed: set BRAINSTACKS_SOURCE in this cell to the git URL, "
                           "wheel or folder of brainstacks_hooks, then run the cell again") from None
    spec = f"brainstacks-hooks[{{EXTRAS}}] @ {{SOURCE}}" if "://" in SOURCE else f"{{SOURCE}}[{{EXTRAS}}]"
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", spec])
    import brainstacks_hooks
print("brainstacks_hooks", brainstacks_hooks.__version__)
'''

SETTINGS = '''from brainstacks_hooks.models.hardware import suggest_settings

SMOKE = os.environ.get("BRAINSTACKS_SMOKE") == "1"  # CPU smoke mode: embedded SmolLM2, local data, tiny steps
IN_COLAB = "google.colab" in sys.modules
HW = suggest_settings()
print(HW)


def sh(cmd: str) -> None:
    """Run a shell command, stream its output here, and stop the notebook if it fails."""
    print("$", cmd, flush=True)
    proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        print(line, end="")
    if proc.wait():
        raise RuntimeError(f"command failed with status {{proc.returncode}}: {{cmd}}")


# Smoke mode: the quickstart config on the embedded model with tiny settings (the test sets BRAINSTACKS_DATA_DIR).
SMOKE_SFT = ("train.max_steps=3 train.eval_steps=3 train.warmup_steps=0 train.learning_rate=5e-4 train.max_length=96 "
             "router_rows.train_per_domain=4 router_rows.test_per_domain=4 "
             + " ".join(f"domains.{{i}}.train_samples=8 domains.{{i}}.val_samples=3" for i in range(3)))
SMOKE_ROUTER = ("oracle_rows_per_domain=2 label_rows_per_domain=4 test_rows_per_domain=3 test_oracle_rows_per_domain=2 "
                "mixed_pairs=1 test_mixed_pairs=1 timing_prompts=1 generation_prompts=0 router.epochs=2 "
                "router.oracle_max_length=96")
# the run directory: put it on Google Drive to survive a disconnect
RUN_DIR = os.environ.get("BRAINSTACKS_NOTEBOOK_RUN_DIR", "{run_dir}")
{extra}
'''

TRAIN_CELL = '''if SMOKE:
    CONFIG, SFT_OVERRIDES = "quickstart_fast", SMOKE_SFT
else:  # TinyLlama-1.1B, 4 domains from the hub; clear the overrides for the paper's settings
    CONFIG = "tinyllama_4domains"
    SFT_OVERRIDES = " ".join(["train.max_steps=60 train.eval_steps=20 inner.max_inner_rounds=1", *HW.overrides()])
sh(f"brainstacks train {CONFIG} {SFT_OVERRIDES} output_dir={RUN_DIR}")  # resumes when RUN_DIR holds this run
'''

ROUTER_CELL = '''ROUTER_OVERRIDES = SMOKE_ROUTER if SMOKE else "oracle_rows_per_domain=50 router.oracle_max_length=512"
sh(f"brainstacks router {RUN_DIR} --config router_quickstart {ROUTER_OVERRIDES}")
'''


def ensure_run_cell(router: bool = False):
    """The cell that makes the notebook standalone: train the quickstart run (and its router) when missing."""
    src = ('from brainstacks_hooks.run_dir import RunDir\n\n'
           'if not RunDir.is_run_dir(RUN_DIR):  # no run yet: train the quickstart first\n'
           + "    " + TRAIN_CELL.replace("\n", "\n    ").rstrip())
    if router:
        src += ("\nif not (RunDir.open(RUN_DIR).router_dir / 'router.json').is_file():\n    "
                + ROUTER_CELL.replace("\n", "\n    ").rstrip())
    return new_code_cell(src)


def header(title: str, body: str, extras: str, run_dir: str = "runs/colab_tinyllama", extra: str = "") -> list:
    return [
        new_markdown_cell(f"# {title}\n\n{body}\n\n*Runtime -> Change runtime type -> GPU* (a T4 is enough for the "
                          "defaults; it trains in fp16, L4/A100 in bf16), then set `BRAINSTACKS_SOURCE` in the first "
                          "cell. `BRAINSTACKS_SMOKE=1` runs the notebook on a CPU in minutes with the embedded "
                          "SmolLM2-135M and tiny settings (what the tests do)."),
        new_code_cell(INSTALL.format(extras=extras)),
        new_code_cell(SETTINGS.format(run_dir=run_dir, extra=extra)),
    ]


def quickstart() -> list:
    cells = header(
        "Brainstacks quickstart: SFT of several domains, the meta-router, routed chat",
        "SFT of the curriculum (chat, code, medical, math on TinyLlama-1.1B in 4-bit; chat, code, math on SmolLM2 in "
        "smoke mode): each domain trains residual MoE-LoRA stacks through forward hooks on all 7 projections, "
        "accepted only if they lower the validation loss, frozen and protected by null-space projection. Then the "
        "outcome-based meta-router and routed generation with each route explained.",
        "bnb,eval")
    cells += [
        new_markdown_cell("## 1. SFT (inner and outer loop; rerunning the cell resumes)"),
        new_code_cell(TRAIN_CELL),
        new_markdown_cell("The forgetting matrix: each earlier domain's validation loss after every later domain "
                          "(`prefix` must not move)."),
        new_code_cell('import json\n\nfrom IPython.display import Image, display\n\n'
                      'forgetting = json.load(open(f"{RUN_DIR}/forgetting.json"))\n'
                      'print(json.dumps(forgetting["summary"], indent=1))\n'
                      'display(Image(f"{RUN_DIR}/forgetting.png"))'),
        new_markdown_cell("## 2. The meta-router (oracle targets on rows no stack trained on)"),
        new_code_cell(ROUTER_CELL),
        new_markdown_cell("## 3. Routed chat, with the route of every turn explained"),
        new_code_cell('from brainstacks_hooks.inference.routed_model import GenerationSettings, RoutedModel\n'
                      'from brainstacks_hooks.quickstart import PAPER_PROMPTS\n\n'
                      'rm = RoutedModel.from_run(RUN_DIR, require_router=True)\n'
                      'settings = GenerationSettings(max_new_tokens=4 if SMOKE else 96)\n'
                      'for prompt in PAPER_PROMPTS:\n'
                      '    (gen,) = rm.generate([prompt], mode="routed", settings=settings)\n'
                      '    e = gen.explain\n'
                      '    print(f"### {prompt}\\nroute {e.weights}  stacks {e.stacks_used}  gap {e.gap}")\n'
                      '    print("   ", " ".join(gen.text.split())[:300])\n'
                      'print(rm.store.stats())'),
    ]
    return cells


def paper_5domains() -> list:
    extra = ('if IN_COLAB:  # the run directory on Drive: a disconnect loses nothing, rerun to resume\n'
             '    from google.colab import drive\n\n'
             '    drive.mount("/content/drive")\n'
             '    RUN_DIR = os.environ.get("BRAINSTACKS_NOTEBOOK_RUN_DIR",\n'
             '                             "/content/drive/MyDrive/brainstacks/gemma3_12b")\n'
             'MODEL_ID = "google/gemma-3-12b-it"  # or any HF model id (a smaller one for a T4)')
    cells = header(
        "The paper's 5-domain run (Gemma 3 12B IT), resumable across Colab disconnects",
        "Chat -> code -> math -> medical -> reasoning with the paper's settings (`gemma3_12b_5domains`), on the "
        "Unsloth backend when it is installed (4-bit, hooks on all 7 projections, generation through the HF path), "
        "else bnb 4-bit. It needs a large GPU (24 GB+ for 12B; pick a smaller `MODEL_ID` for a T4). The run "
        "directory lives on Google Drive: after a disconnect, run the notebook again and training continues from "
        "the last finished round (finished stacks are verified by checksum and reused).",
        "unsloth,bnb", run_dir="runs/gemma3_12b_5domains", extra=extra)
    cells += [
        new_markdown_cell("## SFT of the five domains (rerun this cell after a disconnect)"),
        new_code_cell('if SMOKE:\n'
                      '    CONFIG, OVERRIDES = "quickstart_fast", SMOKE_SFT\n'
                      'else:\n'
                      '    CONFIG = "gemma3_12b_5domains"\n'
                      '    OVERRIDES = " ".join([f"model.name_or_path={MODEL_ID}", *HW.overrides()])\n'
                      'sh(f"brainstacks train {CONFIG} {OVERRIDES} output_dir={RUN_DIR}")'),
        new_code_cell('from brainstacks_hooks.run_dir import RunDir\nfrom brainstacks_hooks.training.outer_loop '
                      'import summary_table\n\nrun = RunDir.open(RUN_DIR)\nprint(summary_table(run.manifest))\n'
                      'print("sessions:", run.manifest.sessions, " finished:", run.manifest.finished)'),
        new_markdown_cell("## The router on the five domains"),
        new_code_cell('FULL_ROUTER = "oracle_rows_per_domain=200 router.oracle_max_length=512"\n'
                      'ROUTER = SMOKE_ROUTER if SMOKE else FULL_ROUTER\n'
                      'sh(f"brainstacks router {RUN_DIR} --config router_quickstart {ROUTER}")'),
    ]
    return cells


def router() -> list:
    cells = header(
        "The outcome-based meta-router: oracle, training, held-out report, routes",
        "Trains the meta-router of a finished SFT run (from `01_quickstart`, or any run directory): the oracle "
        "scores which domains' stacks lower each prompt's loss on rows no stack trained on, the router learns those "
        "targets from base-model features, and the report compares it with a linear probe on held-out prompts.",
        "bnb")
    cells += [
        ensure_run_cell(),
        new_code_cell(ROUTER_CELL),
        new_code_cell('import json\n\nfrom IPython.display import Image, display\n\n'
                      'report = json.load(open(f"{RUN_DIR}/router/report.json"))\n'
                      'print("held-out:", json.dumps(report["held_out"], indent=1))\n'
                      'print("linear probe:", json.dumps(report["linear_probe"], indent=1))\n'
                      'print("gap:", json.dumps(report["gap"], indent=1))\n'
                      'display(Image(f"{RUN_DIR}/router/cross_domain.png"))'),
        new_code_cell('sh(f\'brainstacks route {RUN_DIR} "Write a Python function that reverses a string." --json\')'),
    ]
    return cells


def rl() -> list:
    cells = header(
        "Per-domain RL refinement: GRPO with verifiable rewards and DPO, on a new stack of the domain",
        "Each RL round adds a zero-init stack of the domain on top of its frozen SFT stacks (so `reference` mode is "
        "exactly the SFT policy: TRL never reloads the checkpoint), trains it with TRL's GRPO or DPO trainer, "
        "measures a held-out metric before and after and keeps the stack only when it improved. GRPO's rewards are "
        "GSM8K exact match and a format reward; code rewards run in a namespaced, rlimited sandbox.",
        "bnb")
    cells += [
        ensure_run_cell(),
        new_markdown_cell("## GRPO on math (held-out: GSM8K test rows)"),
        new_code_cell('if SMOKE:\n'
                      '    GRPO = ("trainer.max_steps=1 trainer.per_device_train_batch_size=2 "\n'
                      '            "trainer.num_generations=2 trainer.max_completion_length=8 "\n'
                      '            "data.train_rows=2 data.eval_rows=2 "\n'
                      '            "eval.max_new_tokens=8 eval.sft_val_rows=2 min_improvement=-1")\n'
                      'else:  # GSM8K from the hub when no local data dir is set\n'
                      '    GRPO = ("trainer.max_steps=60 data.train_source=hf:openai/gsm8k:main:train "\n'
                      '            "data.eval_source=hf:openai/gsm8k:main:test data.eval_rows=100")\n'
                      'sh(f"brainstacks rl grpo rl_grpo_math_cpu run_dir={RUN_DIR} {GRPO}")'),
        new_markdown_cell("## DPO on chat (chosen = the reference answer, rejected = the SFT policy's own sample)"),
        new_code_cell('if SMOKE:\n'
                      '    DPO = ("trainer.max_steps=1 trainer.per_device_train_batch_size=2 trainer.max_length=256 "\n'
                      '           "data.train_rows=2 data.eval_rows=2 pairs.max_new_tokens=6 eval.sft_val_rows=2 "\n'
                      '           "min_improvement=-1")\n'
                      'else:  # held-out pairs from the validation rows of the run\n'
                      '    DPO = "trainer.max_steps=60 data.eval_source=sft_val"\n'
                      'sh(f"brainstacks rl dpo rl_dpo_chat_cpu run_dir={RUN_DIR} {DPO}")'),
        new_code_cell('from brainstacks_hooks.rl.round import summary_table\n\n'
                      'print(summary_table(RunDir.open(RUN_DIR).manifest))'),
        new_markdown_cell("An accepted RL round adds a stack, so the router (bound to the stacks it was trained on) "
                          "is retrained on the new set."),
        new_code_cell(ROUTER_CELL),
    ]
    return cells


def superposition() -> list:
    cells = header(
        "Superposition inference: stacks loaded from disk on demand, under a memory budget",
        "`RoutedModel` routes each prompt, loads only the gated-on domains' stacks from the run directory into a "
        "`StackStore` with a device budget (LRU eviction, checksums), and serves mixed-route batches in one "
        "forward. The cache statistics show hits, misses, evictions and the bytes resident.",
        "bnb")
    cells += [
        ensure_run_cell(router=True),
        new_markdown_cell("A budget of about two domains (each domain's stacks plus the hooks' grouped copy of the "
                          "current route): switching domains loads from disk and evicts the least recently used."),
        new_code_cell('from brainstacks_hooks.inference.routed_model import GenerationSettings, RoutedModel\n\n'
                      'run = RunDir.open(RUN_DIR)\n'
                      'domain_bytes = {d: sum((run.path / r.file).stat().st_size\n'
                      '                        for r in run.manifest.accepted_rounds(d))\n'
                      '                for d in run.manifest.domain_order}\n'
                      'budget = int(2.1 * max(domain_bytes.values()))  # one domain + its grouped copy, with room\n'
                      'rm = RoutedModel.from_run(RUN_DIR, budget_bytes=budget)\n'
                      'settings = GenerationSettings(max_new_tokens=4 if SMOKE else 64)\n'
                      'prompts = {"code": "Write a Python function that reverses a string.",\n'
                      '           "math": "What is 15% of 80?", "chat": "Give me three tips for better sleep."}\n'
                      'for domain, prompt in prompts.items():\n'
                      '    (gen,) = rm.generate([prompt], mode=f"isolated:{domain}", settings=settings)\n'
                      '    e = gen.explain\n'
                      '    text = " ".join(gen.text.split())[:120]\n'
                      '    print(f"{domain}: loaded {e.loaded} hits {e.cache_hits} | {text}")\n'
                      'print(rm.store.stats())'),
        new_markdown_cell("Routed serving: every prompt gets its own route and all of them run in one mixed-route "
                          "batch (the budget grows to what the union of the routes needs)."),
        new_code_cell('rm.store.budget_bytes = None  # unlimited for the mixed batch below\n'
                      'for gen in rm.generate(list(prompts.values()), settings=settings):\n'
                      '    print(gen.explain.weights, "|", " ".join(gen.text.split())[:160])\n'
                      'print(rm.store.stats())'),
    ]
    return cells


def evaluation() -> list:
    cells = header(
        "Evaluation: benchmarks in base / ungated / routed modes on lm-evaluation-harness, and the run report",
        "Offline lm-eval tasks shipped with the package (ARC, HellaSwag, TruthfulQA, MMLU, MedQA, MedMCQA, GSM8K) "
        "read from a data directory (`BRAINSTACKS_DATA_DIR`, the layout of `shared/data`), evaluated on the live "
        "hooked model in each mode, with the delta to `base`; then `brainstacks report` writes one Markdown report "
        "with every table and plot of the run.",
        "bnb,eval", extra=('# the benchmark files: a folder with eval/*.jsonl in the layout of shared/data (e.g. on '
                           'Drive)\nDATA_DIR = os.environ.get("BRAINSTACKS_DATA_DIR", "")'))
    cells += [
        ensure_run_cell(router=True),
        new_code_cell('FULL = "bs_arc_easy,bs_arc_challenge,bs_hellaswag,bs_gsm8k"\n'
                      'TASKS = "bs_arc_easy,bs_gsm8k" if SMOKE else FULL\n'
                      'LIMIT = 2 if SMOKE else 200\n'
                      'if not DATA_DIR:\n'
                      '    print("Set DATA_DIR (a folder with eval/*.jsonl) in the settings cell to run the "\n'
                      '          "benchmarks; skipping them (the report below says what is missing).")\n'
                      'else:\n'
                      '    for mode in ("base", "routed"):\n'
                      '        sh(f"brainstacks eval {RUN_DIR} --tasks {TASKS} --mode {mode} --limit {LIMIT} "\n'
                      '           f"--data-dir {DATA_DIR}")'),
        new_code_cell('from IPython.display import Markdown, display\n\n'
                      'sh(f"brainstacks report {RUN_DIR} --utilization-rows {2 if SMOKE else 16}")\n'
                      'display(Markdown(open(f"{RUN_DIR}/report/report.md").read()))'),
    ]
    return cells


NOTEBOOKS = {
    "01_quickstart.ipynb": quickstart,
    "02_paper_5domains.ipynb": paper_5domains,
    "03_router.ipynb": router,
    "04_rl_dpo_grpo.ipynb": rl,
    "05_superposition_inference.ipynb": superposition,
    "06_evaluation.ipynb": evaluation,
}


def build(name: str) -> nbformat.NotebookNode:
    nb = new_notebook(cells=NOTEBOOKS[name]())
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}, "accelerator": "GPU", "colab": {"provenance": []}}
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i}"
    return nb


def main() -> None:
    for name in NOTEBOOKS:
        nbformat.write(build(name), HERE / name)
        print("wrote", HERE / name)


if __name__ == "__main__":
    sys.exit(main())
