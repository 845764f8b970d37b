"""lm-eval on the live model through the hooks: base equals plain HFLM, identity stacks in ungated equal base,
routed evaluation equals each request alone under its route, seeded --limit subsets, the install hint."""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from brainstacks_hooks.errors import BackendUnavailable, ConfigError
from brainstacks_hooks.evaluation import harness
from brainstacks_hooks.inference.routed_model import RoutedModel
from brainstacks_hooks.inference.store import StackStore
from brainstacks_hooks.router.gating import Route
from brainstacks_hooks.run_dir import Manifest
from brainstacks_hooks.stacks.brainstacks import BrainStacks
from brainstacks_hooks.stacks.config import StackConfig
from brainstacks_hooks.testing import add_random_stack, make_tiny_llama
from brainstacks_hooks.utils.io import atomic_write_json

WORDS = ["<unk>", "<s>", "</s>", "<pad>", "Question:", "Answer:", "which", "gas", "do", "plants", "take", "in",
         "what", "is", "the", "boiling", "point", "of", "water", "alpha", "beta", "oxygen", "carbon", "dioxide",
         "nitrogen", "helium", "50", "100", "150", "C", "?", "a", "b", "c", "d"]
CFG = StackConfig(rank=4)


def word_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_model():
    return make_tiny_llama(vocab_size=len(WORDS), max_position_embeddings=512)


def routed_model(tmp_path, model, tok, identity: bool = False) -> RoutedModel:
    """A RoutedModel over a store of two domains (random stacks, or zero-init identity stacks)."""
    src = BrainStacks.attach(model, CFG)
    for i, d in enumerate(("chat", "math")):
        if identity:
            src.new_stack(d)
            src.freeze_active()
        else:
            add_random_stack(src, d, seed=10 + i, a_scale=0.5, b_scale=0.5)
    src.save(tmp_path / "stacks")
    src.detach()
    stacks = BrainStacks.attach(model, CFG)
    store = StackStore(stacks, tmp_path / "stacks", budget_bytes=None)
    return RoutedModel(model, tok, stacks, store)


def ll_requests() -> list[Instance]:
    docs = [("Question: which gas do plants take in ?\nAnswer:", [" oxygen", " carbon dioxide", " helium"]),
            ("Question: what is the boiling point of water ?\nAnswer:", [" 50 C", " 100 C", " 150 C"]),
            ("alpha beta", [" a", " b c"]),
            ("what is alpha ?\nAnswer:", [" a", " b", " c", " d"])]  # one-token choices: one shared forward
    reqs = []
    for doc_id, (ctx, choices) in enumerate(docs):
        for i, c in enumerate(choices):
            reqs.append(Instance("loglikelihood", {}, (ctx, c), i, ("t", doc_id, 1)))
    return reqs


def plain(reqs):
    return [Instance(r.request_type, r.doc, r.arguments, r.idx, (r.task_name, r.doc_id, r.repeats)) for r in reqs]


def test_base_mode_through_the_hooks_equals_plain_hflm_on_the_bare_model(tmp_path):
    model, tok = tiny_model(), word_tokenizer()
    want = HFLM(pretrained=model, tokenizer=tok, backend="causal", batch_size=4, max_length=64).loglikelihood(
        plain(ll_requests()))
    rm = routed_model(tmp_path, model, tok)
    lm = harness.brainstacks_lm(rm, "base", batch_size=4, max_length=64)
    assert lm.model is model  # the live model, no copy
    got = lm.loglikelihood(plain(ll_requests()))
    assert [g[1] for g in got] == [w[1] for w in want]
    assert max(abs(g[0] - w[0]) for g, w in zip(got, want)) <= 1e-6
    ungated = harness.brainstacks_lm(rm, "ungated", batch_size=4, max_length=64).loglikelihood(plain(ll_requests()))
    assert max(abs(g[0] - w[0]) for g, w in zip(ungated, want)) > 1e-3  # the random stacks do change the model


def test_zero_init_stacks_in_ungated_equal_base(tmp_path):
    model, tok = tiny_model(), word_tokenizer()
    rm = routed_model(tmp_path, model, tok, identity=True)
    base = harness.brainstacks_lm(rm, "base", batch_size=4).loglikelihood(plain(ll_requests()))
    ungated = harness.brainstacks_lm(rm, "ungated", batch_size=4).loglikelihood(plain(ll_requests()))
    assert rm.store.attached  # the identity stacks were attached and computed
    assert max(abs(a[0] - b[0]) for a, b in zip(base, ungated)) <= 1e-6


ROUTES = {"Question: which": {"chat": 1.0}, "Question: what": {"chat": 0.5, "math": 0.8}, "alpha": {"math": 0.7},
          "what": {"chat": 0.3}}


def fake_route(prompts):
    out = []
    for p in prompts:
        w = next(v for k, v in ROUTES.items() if p.startswith(k))
        out.append(Route(weights=dict(w), scores=dict(w), gated_on=sorted(w), gap=False))
    return out


@pytest.mark.parametrize("mixed_batches", [True, False], ids=["mixed-route-batches", "grouped-by-route"])
def test_routed_evaluation_equals_each_request_alone_under_its_route(tmp_path, mixed_batches):
    model, tok = tiny_model(), word_tokenizer()
    rm = routed_model(tmp_path, model, tok)
    calls = []
    rm.route = lambda prompts: calls.append(list(prompts)) or fake_route(prompts)
    lm = harness.brainstacks_lm(rm, "routed", batch_size=4, mixed_batches=mixed_batches)
    reqs = ll_requests()
    order = [0, 3, 6, 8, 1, 4, 9, 7, 2, 10, 5, 11]  # documents interleaved: answers must come back in this order
    got = lm.loglikelihood([plain(reqs)[i] for i in order])
    assert sum(len(c) for c in calls) == 4  # each document's context routed once, shared by its choices
    if mixed_batches:  # one lm-eval pass: batches hold several routes, no call ran grouped
        assert lm.route_batches["mixed"] >= 1 and lm.route_batches["grouped_calls"] == 0
    else:
        assert lm.route_batches == {"mixed": 0, "single": 0, "grouped_calls": 1}
    for j, i in enumerate(order):
        r = plain(reqs)[i]
        with rm.store.routed(fake_route([r.args[0]])[0].weights):
            alone = HFLM.loglikelihood(lm, [r], disable_tqdm=True)[0]
        assert abs(got[j][0] - alone[0]) <= 1e-5 and got[j][1] == alone[1]
    base = harness.brainstacks_lm(rm, "base", batch_size=4).loglikelihood(plain(reqs))
    assert abs(got[0][0] - base[0][0]) > 1e-3  # the routes are not the base model
    assert {h: r["weights"] for h, r in lm.routes.items()} == {
        harness.context_hash(c): w for c, w in
        [(reqs[0].args[0], ROUTES["Question: which"]), (reqs[3].args[0], ROUTES["Question: what"]),
         (reqs[6].args[0], ROUTES["alpha"]), (reqs[8].args[0], ROUTES["what"])]}
    assert set(lm.request_routes) == {("t", 0), ("t", 1), ("t", 2), ("t", 3)}
    assert rm.stacks.mode.kind == "train"  # the previous mode is restored

    gen = [Instance("generate_until", {}, (ctx, {"until": ["</s>"], "max_gen_toks": 4, "do_sample": False}), 0,
                    ("g", i, 1)) for i, ctx in enumerate(["Question: which gas", "Question: what is", "alpha"])]
    before = dict(lm.route_batches)
    got_gen = lm.generate_until(gen)
    if mixed_batches:  # the three contexts generate in one batch, each row under its own route
        assert lm.route_batches["mixed"] == before["mixed"] + 1
    for g, text in zip(gen, got_gen):
        with rm.store.routed(fake_route([g.args[0]])[0].weights):
            assert HFLM.generate_until(lm, [g], disable_tqdm=True)[0] == text


def test_mixed_batches_run_grouped_when_two_routes_share_a_model_input(tmp_path):
    """"alpha beta" and "alpha  beta" tokenize alike: lm-eval would compute them in one forward, so the call
    runs grouped by route and each answer is still its own route's."""
    model, tok = tiny_model(), word_tokenizer()
    rm = routed_model(tmp_path, model, tok)
    routes = {"alpha beta": {"chat": 1.0}, "alpha  beta": {"math": 0.7}}
    rm.route = lambda prompts: [Route(weights=routes[p], scores={}, gated_on=[], gap=False) for p in prompts]
    reqs = [Instance("loglikelihood", {}, (ctx, c), i, ("t", d, 1))
            for d, ctx in enumerate(routes) for i, c in enumerate([" a", " b c"])]
    lm = harness.brainstacks_lm(rm, "routed", batch_size=4)
    got = lm.loglikelihood(plain(reqs))
    assert lm.route_batches["grouped_calls"] == 1
    for r, g in zip(plain(reqs), got):
        with rm.store.routed(routes[r.args[0]]):
            alone = HFLM.loglikelihood(lm, [r], disable_tqdm=True)[0]
        assert abs(g[0] - alone[0]) <= 1e-5 and g[1] == alone[1]
    assert abs(got[0][0] - got[2][0]) > 1e-4  # the two routes really differ


def test_bad_mode_and_auto_batch_size_are_refused(tmp_path):
    model, tok = tiny_model(), word_tokenizer()
    rm = routed_model(tmp_path, model, tok)
    with pytest.raises(ConfigError, match="unknown domain"):
        harness.brainstacks_lm(rm, "prefix:nosuch")
    with pytest.raises(ConfigError, match="auto"):
        harness.brainstacks_lm(rm, "base", batch_size="auto")


def test_limit_subsets_are_seeded_and_reproducible():
    a = harness.seeded_samples({"x": 100, "y": 5}, 10, seed=1)
    assert a == harness.seeded_samples({"x": 100, "y": 5}, 10, seed=1)
    assert a["x"] != harness.seeded_samples({"x": 100, "y": 5}, 10, seed=2)["x"]
    assert a["x"] == sorted(set(a["x"])) and len(a["x"]) == 10 and all(0 <= i < 100 for i in a["x"])
    assert a["y"] == [0, 1, 2, 3, 4]  # fewer documents than the limit: all of them
    assert len(harness.seeded_samples({"x": 100}, 0.25, seed=1)["x"]) == 25
    assert a["x"] != list(range(10))  # not the first N


ARC = [{"id": f"arc-{i}", "question": q, "choices": ch, "answer_index": g} for i, (q, ch, g) in enumerate([
    ("which gas do plants take in ?", ["oxygen", "carbon dioxide", "helium"], 1),
    ("what is the boiling point of water ?", ["50 C", "100 C", "150 C"], 1),
    ("alpha beta", ["a", "b", "c"], 0),
    ("which gas is the ?", ["nitrogen", "helium"], 0),
    ("what is alpha ?", ["a", "b", "c", "d"], 3),
    ("what is beta ?", ["a", "b"], 1),
])]


def fake_run_dir(tmp_path):
    run = tmp_path / "run"
    atomic_write_json(run / "manifest.json", Manifest(fingerprint={}, config_key={}, config={},
                                                      domain_order=["chat", "math"]).to_dict())
    data = tmp_path / "data"
    (data / "eval").mkdir(parents=True)
    (data / "eval" / "arc_easy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ARC))
    return run, data


def test_evaluate_run_writes_results_samples_and_routes_with_a_seeded_subset(tmp_path):
    model, tok = tiny_model(), word_tokenizer()
    rm = routed_model(tmp_path, model, tok)
    rm.route = fake_route_any
    run, data = fake_run_dir(tmp_path)
    first = harness.evaluate_run(run, ["bs_arc_easy"], "routed", limit=3, data_dir=data, batch_size=4, rm=rm)
    out = run / "eval" / "routed"
    saved = json.loads((out / "results.json").read_text())
    assert saved == first
    ids = first["samples"]["bs_arc_easy"]
    assert len(ids) == 3 and ids == harness.seeded_samples({"bs_arc_easy": 6}, 3, 1234)["bs_arc_easy"]
    samples = [json.loads(line) for line in (out / "samples_bs_arc_easy.jsonl").read_text().splitlines()]
    assert sorted({s["doc_id"] for s in samples}) == ids
    assert {s["doc"]["id"] for s in samples} == {ARC[i]["id"] for i in ids}
    m = first["metrics"]["bs_arc_easy"]
    assert set(m) == {"acc", "acc_norm"} and m["acc"]["stderr"] is not None
    assert first["data_files"]["bs_arc_easy"]["sha256"] and first["versions"]["lm-eval"]
    routes = [json.loads(line) for line in (out / "routes.jsonl").read_text().splitlines()]
    assert sorted(r["doc_id"] for r in routes) == ids and len(first["routes"]) == 3
    second = harness.evaluate_run(run, ["bs_arc_easy"], "routed", limit=3, data_dir=data, batch_size=4, rm=rm,
                                  out_dir=tmp_path / "again")
    assert second["samples"] == first["samples"] and second["metrics"] == first["metrics"]
    base = harness.evaluate_run(run, ["bs_arc_easy"], "base", limit=3, data_dir=data, batch_size=4, rm=rm)
    assert base["routes"] is None and (run / "eval" / "base" / "results.json").is_file()
    assert base["samples"] == first["samples"]



def test_fewer_documents_than_processes_is_a_clear_error(tmp_path, monkeypatch):
    """Under several processes every process needs a document of every task (else lm-eval's collectives hang)."""
    model, tok = tiny_model(), word_tokenizer()
    rm = routed_model(tmp_path, model, tok)
    run, data = fake_run_dir(tmp_path)
    monkeypatch.setattr(harness.distributed, "world_size", lambda: 4)
    with pytest.raises(ConfigError, match=r"4 processes but only .*bs_arc_easy.*: 3"):
        harness.evaluate_run(run, ["bs_arc_easy"], "base", limit=3, data_dir=data, batch_size=4, rm=rm)
    assert not (run / "eval").exists()

def fake_route_any(prompts):
    return [Route(weights={"chat": 1.0} if "which" in p else {"math": 0.6}, scores={}, gated_on=[], gap=False)
            for p in prompts]


def test_cli_summary_prints_the_delta_to_base(tmp_path):
    from brainstacks_hooks.cli.eval_commands import summary_table

    table = summary_table({"bs_arc_easy": {"acc": {"value": 0.5, "stderr": 0.1}}},
                          {"bs_arc_easy": {"acc": {"value": 0.4, "stderr": 0.1}}})
    assert "+0.1000" in table and "0.4000" in table


def test_missing_lm_eval_gives_the_install_hint(monkeypatch):
    for name in list(sys.modules):
        if name == "lm_eval" or name.startswith("lm_eval."):
            monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(BackendUnavailable, match=r"pip install 'brainstacks-hooks\[eval\]'"):
        harness.brainstacks_lm_class()
    with pytest.raises(BackendUnavailable, match=r"brainstacks-hooks\[eval\]"):
        harness.brainstacks_lm(object(), "base")


def test_cli_eval_is_registered_and_rejects_a_bad_task_or_domain_before_loading(tmp_path, capsys):
    from brainstacks_hooks.cli.main import main

    run, data = fake_run_dir(tmp_path)  # no model in it: the errors must come before any load
    assert main(["eval", str(run), "--tasks", "bs_nosuch", "--mode", "base", "--data-dir", str(data)]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert main(["eval", str(run), "--tasks", "bs_arc_easy", "--mode", "prefix:nosuch", "--data-dir", str(data)]) == 2
    assert "unknown domain 'nosuch'" in capsys.readouterr().err
    assert main(["eval", str(run), "--tasks", "bs_arc_easy", "--mode", "train", "--data-dir", str(data)]) == 2
    assert "unknown evaluation mode" in capsys.readouterr().err


def test_half_precision_models_get_an_fp32_log_softmax_and_unsloth_generates_without_cache(tmp_path):
    import torch

    model, tok = tiny_model(), word_tokenizer()
    rm = routed_model(tmp_path, model, tok)
    assert harness.brainstacks_lm(rm, "base").softmax_dtype is None  # fp32 model: lm-eval's default
    model.to(torch.bfloat16)
    assert harness.brainstacks_lm(rm, "base").softmax_dtype == torch.float32
    model.to(torch.float32)
    seen = []
    generate = model.generate
    spy = model.generate = lambda *a, **kw: seen.append(kw["use_cache"]) or generate(*a, **kw)
    rm.use_cache = False  # what RoutedModel sets for the Unsloth backend
    lm = harness.brainstacks_lm(rm, "ungated")
    lm.generate_until([Instance("generate_until", {}, ("alpha", {"until": ["</s>"], "max_gen_toks": 2}), 0,
                                ("g", 0, 1))])
    assert seen == [False] and model.generate is spy  # an instance-level generate is put back
