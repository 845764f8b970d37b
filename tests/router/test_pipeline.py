"""Router pipeline on a tiny finished SFT run: end to end, saved router, report, routed losses, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from brainstacks_hooks.cli.main import main as cli_main
from brainstacks_hooks.loss import completion_nll, evaluate_loss
from brainstacks_hooks.router.config import RouterConfig
from brainstacks_hooks.router.pipeline import (
    LOSS_MODES,
    MIXED_SOURCE,
    RouterPipelineConfig,
    build_mixed_examples,
    example_nll,
    recovered_fraction,
    summary_table,
    train_router_for_run,
    user_text,
)
from brainstacks_hooks.router.serialization import load_router
from brainstacks_hooks.router.train import prompt_key
from brainstacks_hooks.run_dir import RunDir
from brainstacks_hooks.testing import make_tiny_model_dir, tiny_run_config
from brainstacks_hooks.training.outer_loop import run_sft

pytestmark = pytest.mark.slow


def _router_config(**overrides) -> RouterPipelineConfig:
    router = RouterConfig(epochs=2, hidden=16, seq_len=128, oracle_max_length=128, oracle_batch_size=8,
                          feature_batch_size=8)
    kw = dict(router=router, label_rows_per_domain=4, test_oracle_rows_per_domain=3, mixed_pairs=2,
              test_mixed_pairs=2, timing_prompts=1, generation_prompts=1, generation_tokens=2, progress=False)
    kw.update(overrides)
    return RouterPipelineConfig(**kw)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, data_dir):
    model_dir = make_tiny_model_dir(tmp_path_factory.mktemp("models"))
    # The smallest run that still accepts one stack per domain: 2 steps, 1 round, 8 train / 4 val rows.
    cfg = tiny_run_config(model_dir, tmp_path_factory.mktemp("run") / "out", domains=("chat", "code"),
                          max_steps=2, eval_steps=1, learning_rate=2e-2)
    cfg.inner.max_inner_rounds = 1
    cfg.null_space.enabled = False
    cfg.router_rows.gap_domains = ["math"]  # test rows of a domain without stacks: the gap signal
    for dom in cfg.domains:
        dom.train_samples, dom.val_samples = 8, 4
    run = run_sft(cfg)
    assert run.stacks.stacks_for("chat") and run.stacks.stacks_for("code"), "both domains need a stack"
    return run


@pytest.fixture(scope="module")
def router_run(sft_run):
    # model=None: the pipeline loads the base model and the stacks from the run directory itself.
    return train_router_for_run(sft_run.run_dir, _router_config())


def test_report_has_every_field(router_run, sft_run):
    report = router_run.report
    on_disk = json.loads((router_run.router_dir / "report.json").read_text())
    assert on_disk == report
    assert report["domains"] == ["chat", "code"]
    v = report["validation"]
    for key in ("single_top1", "mixed_set", "single_top1_label", "mixed_set_label", "val_bce"):
        assert v[key] is None or 0.0 <= v[key] <= (1.0 if key != "val_bce" else 100.0), key
    assert 4 <= v["n_single"] <= 6 and v["n_mixed"] >= 1  # 3 test rows per domain (an over-long one is skipped)
    for key in ("top1_margin", "score_spread", "calibration"):
        assert v[key] is None or 0.0 <= v[key] <= 1.0, key
    per = report["cross_domain"]["per_domain"]
    assert set(per) == {"chat", "code"} and MIXED_SOURCE not in per
    for stats in per.values():
        assert 0.0 <= stats["excludes_own"] <= 1.0 and stats["top_routes"]
    assert (router_run.router_dir / report["cross_domain_plot"]).is_file()
    for d in ("chat", "code"):
        row = report["val_losses"][d]
        assert 2 <= row["n_examples"] <= 3 and row["n_tokens"] > 0
        for mode in LOSS_MODES:
            assert math.isfinite(row[mode])
        assert row["recovered_fraction"] == recovered_fraction(row["oracle"], row["ungated"], row["routed"])
        assert math.isfinite(row["oracle_cross_fitted"])
        assert row["recovered_cross_fitted"] == recovered_fraction(row["oracle_cross_fitted"], row["ungated"],
                                                                   row["routed"])
    t = report["timing"]
    assert t["features_ms_per_prompt"]["n"] == 1 and t["router_ms_per_prompt"]["median"] >= 0
    assert t["generate_ms_per_prompt"]["n"] == 1 and t["generation_tokens"] == 2
    assert report["router"]["best_epoch"] in (1, 2) and len(report["router"]["history"]) == 2
    assert report["oracle"]["search"] == "exhaustive" and report["oracle"]["n_computed"] > 0
    text = summary_table(report)
    assert "chat" in text and "recovered" in text and "x-fit" in text


def test_router_saved_and_loaded_with_the_stacks_fingerprint(router_run, sft_run):
    router, meta = load_router(router_run.router_dir, expected_fingerprint=sft_run.stacks.fingerprint_dict())
    assert meta["domains"] == ["chat", "code"] and meta["chat_floor"] == 0.2 and meta["gate_threshold"] == 0.12
    assert meta["feature_recipe"]["seq_len"] == 128
    run = RunDir.open(sft_run.run_dir)
    assert meta["stacks"] == run.stack_index().identity() == run.stack_identity()  # bound to these stacks
    ids = json.loads((run.rows_dir / "router.json").read_text())["ids"]
    assert len(ids["test"]) == 3 * 6 and ids["oracle_train"] and ids["test_oracle"] and ids["label_only"]
    state = router_run.router.state_dict()
    for k, v in router.state_dict().items():
        assert torch.equal(v, state[k].cpu()), k


def test_no_prompt_on_both_sides_of_the_split(router_run, sft_run):
    train = {prompt_key(p) for p in router_run.train_prompts}
    test = {prompt_key(p) for p in router_run.test_prompts}
    assert train and test and not train & test
    assert router_run.report["data"]["router_rows"]["train"] == len(train)


def test_router_rows_were_never_trained_on_by_a_stack(router_run, sft_run):
    run = RunDir.open(sft_run.run_dir)
    sft = {r["id"] for r in run.read_rows("sft_train")} | {r["id"] for r in run.read_rows("sft_val")}
    oracle_rows, test_rows = run.read_rows("router_train"), run.read_rows("router_test")
    assert oracle_rows and test_rows and not ({r["id"] for r in oracle_rows} | {r["id"] for r in test_rows}) & sft
    assert {r["domain"] for r in test_rows} == {"chat", "code", "math"}  # math: no stacks, the gap domain
    # the oracle's single-domain training examples are exactly router_train rows
    ids = json.loads((run.rows_dir / "router.json").read_text())["ids"]
    assert set(ids["label_only"]) <= {r["id"] for r in run.read_rows("sft_train")}
    assert set(ids["test"]) <= {r["id"] for r in test_rows}
    # the loss table runs on held-out test rows, scored by the oracle too
    table = router_run.report["val_losses"]
    assert all(row["oracle"] is not None and row["n_examples"] >= 1 for row in table.values())


def test_the_gap_flag_is_measured_on_a_domain_without_stacks(router_run):
    gap = router_run.report["gap"]
    assert gap["n_untrained"] == 6 and set(gap["per_domain"]) == {"chat", "code", "math"}
    assert 0.0 <= gap["untrained_domains"] <= 1.0
    assert router_run.report["linear_probe"]["n"] == router_run.report["held_out"]["n"] == 12


def test_routed_weights_reach_the_right_stacks(router_run, sft_run):
    stacks, pad = sft_run.stacks, sft_run.tokenizer.pad_token_id
    val = sft_run.data.val["code"]
    with stacks.routed({"code": 1.0}):
        routed = evaluate_loss(stacks.model, val, pad, 8, False)
    with stacks.isolated("code"):
        isolated = evaluate_loss(stacks.model, val, pad, 8, False)
    with stacks.routed({"chat": 1.0}):
        chat_only = evaluate_loss(stacks.model, val, pad, 8, False)
    assert abs(routed - isolated) < 1e-5 and abs(chat_only - routed) > 1e-6
    # example_nll equals the shared evaluator, and the report's routed losses are reproducible
    from brainstacks_hooks.data.formatting import encode_rows

    test_rows = {r["id"]: r for r in RunDir.open(sft_run.run_dir).read_rows("router_test")}
    entry = router_run.val_routes[0]
    (ex,), _ = encode_rows(sft_run.tokenizer, [test_rows[entry["id"]]], 128)
    with stacks.routed(entry["weights"]):
        s, c = example_nll(stacks.model, ex, False)
        sums, counts = completion_nll(stacks.model, [ex], pad, 1, False)
    assert abs(s / c - entry["losses"]["routed"]) < 1e-5
    assert abs(float(sums[0]) / int(counts[0]) - s / c) < 1e-5
    assert set(entry["weights"]) == set(entry["gated_on"]) and entry["weights"]["chat"] >= 0.2


def test_mixed_examples_are_deterministic_and_labelled():
    pools = {d: [{"instruction": f"{d} task {i}", "input": "", "output": f"{d} answer {i}"} for i in range(5)]
             for d in ("chat", "code", "math")}
    a = build_mixed_examples(pools, 6, seed=3)
    assert [e.example_id for e in a] == [e.example_id for e in build_mixed_examples(pools, 6, seed=3)]
    assert len(a) == 6 and all(e.domain == MIXED_SOURCE and len(set(e.labels)) == 2 for e in a)
    assert {frozenset(e.labels) for e in a} == {frozenset(p) for p in (("chat", "code"), ("chat", "math"),
                                                                        ("code", "math"))}
    first, second = a[0].instruction.split("\n\n")
    assert first.startswith(a[0].labels[0]) and second.startswith(a[0].labels[1])
    assert build_mixed_examples({"chat": pools["chat"]}, 4, seed=0) == []
    assert user_text("do it", "with this") == "do it\n\nwith this"


def test_cli_route_prints_json_with_weights_and_gap(router_run, sft_run, capsys):
    capsys.readouterr()
    assert cli_main(["-q", "route", str(sft_run.run_dir), "Write a Python function that reverses a list.",
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["scores"]) == {"chat", "code"}
    assert set(out["weights"]) == set(out["gated_on"]) and out["weights"].get("chat", 0) >= 0.2
    assert out["gap"] == all(s <= out["gate_threshold"] for s in out["scores"].values())
    assert out["timings_ms"]["features_ms"] > 0


def test_cli_router_rerun_hits_the_caches(router_run, sft_run, tmp_path, capsys):
    import yaml

    cfg = _router_config().to_dict()
    cfg.pop("run_dir")
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli_main(["-q", "router", str(sft_run.run_dir), "--config", str(path), "timing_prompts=0",
                     "generation_prompts=0"]) == 0
    assert "recovered" in capsys.readouterr().out
    report = json.loads((router_run.router_dir / "report.json").read_text())
    assert report["oracle"]["n_computed"] == 0 and report["oracle"]["n_cached"] > 0
    assert report["timing"]["features_computed"] == 0
    # same data, same seed: the same validation routes
    assert report["val_losses"] == router_run.report["val_losses"]
