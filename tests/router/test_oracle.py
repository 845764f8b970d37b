"""Outcome oracle: exhaustive and greedy search, threshold and chat-floor semantics, soft boost, blend,
per-domain cache, cross-domain analysis, and the BrainStacks-backed loss."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import pytest
import torch

from brainstacks_hooks.router.analysis import cross_domain_analysis, plot_cross_domain
from brainstacks_hooks.router.config import RouterConfig
from brainstacks_hooks.router.oracle import (
    BASE_KEY,
    OracleExample,
    OracleRecord,
    all_route_keys,
    completion_losses,
    decide,
    parse_route_key,
    route_key,
    run_oracle,
    search_routes,
    select_route_exhaustive,
    select_route_greedy,
)
from brainstacks_hooks.testing import CharTokenizer

RowLoss = Callable[[dict[str, float] | None], float]


class FakeLoss:
    """``loss_fn`` whose per-row loss is a function of the executed weights; records every call."""

    def __init__(self, rows: Sequence[RowLoss]) -> None:
        self.rows = list(rows)
        self.calls: list[tuple[dict[str, float] | None, list[int]]] = []

    def __call__(self, weights: dict[str, float] | None, rows: torch.Tensor) -> torch.Tensor:
        self.calls.append((weights, rows.tolist()))
        return torch.tensor([self.rows[r](weights) for r in rows.tolist()])


def by_members(table: Mapping[str, float], domains: Sequence[str], base: float = 9.0) -> RowLoss:
    """Loss looked up by the set of route members: weight >= 0.5 (a member runs at 0.8, or 1.0 when it is also
    the label; chat at the floor and a label-only domain run at 0.2 and count as "not in the route")."""

    def f(weights: dict[str, float] | None) -> float:
        if weights is None:
            return base
        return table[route_key([d for d, w in weights.items() if w >= 0.5], domains)]

    return f


def cfg(**kw) -> RouterConfig:
    return RouterConfig(**kw)


# --------------------------------------------------------------------------------------------- selection
def test_exhaustive_finds_best_subset_greedy_misses():
    domains = ["chat", "code", "math"]
    losses = {k: 1.0 for k in all_route_keys(domains)}
    losses.update({"code": 1.2, "math": 1.2, "code+math": 0.5, "chat+code+math": 0.495})
    assert select_route_exhaustive(losses, domains, 0.01) == ["code", "math"]  # chat adds only 0.005
    assert select_route_greedy(losses, domains, 0.01) == []  # no single domain helps


def test_every_member_must_beat_the_best_route_without_it():
    domains = ["a", "b"]
    # a+b improves on a and b by a lot, but on the empty route by only 0.005: rejected.
    losses = {"": 1.0, "a": 1.5, "b": 1.5, "a+b": 0.995}
    assert select_route_exhaustive(losses, domains, 0.01) == []
    losses["a+b"] = 0.98
    assert select_route_exhaustive(losses, domains, 0.01) == ["a", "b"]


def test_threshold_is_strict():
    domains = ["a", "b"]
    losses = {"": 1.0, "a": 0.75, "b": 2.0, "a+b": 2.0}  # improvement exactly 0.25 (exact in binary)
    assert select_route_exhaustive(losses, domains, 0.25) == []
    assert select_route_greedy(losses, domains, 0.25) == []
    losses["a"] = 0.5
    assert select_route_exhaustive(losses, domains, 0.25) == ["a"]
    assert select_route_greedy(losses, domains, 0.25) == ["a"]


def test_ties_prefer_fewer_domains():
    domains = ["a", "b"]
    assert select_route_exhaustive({"": 1.0, "a": 0.5, "b": 0.5, "a+b": 0.5}, domains, 0.01) == ["a"]


def test_greedy_is_best_improvement():
    domains = ["a", "b", "c"]
    losses = {"": 1.0, "a": 0.9, "b": 0.5, "c": 0.8, "a+b": 0.45, "b+c": 0.6, "a+b+c": 0.6}
    assert select_route_greedy(losses, domains, 0.01) == ["a", "b"]


# -------------------------------------------------------------------------------------------- decision
def test_soft_boost_and_blend():
    domains = ["chat", "math", "medical", "reasoning"]
    c = cfg(exhaustive_max_domains=6)
    losses = {k: 2.0 for k in all_route_keys(domains)}
    losses.update({"": 1.0, "chat+math": 0.4, "chat+math+reasoning": 0.395})
    d = decide(losses, domains, c, labels=["medical"])
    assert d.route == ["chat", "math"] and d.soft == ["reasoning"]
    assert d.discovered == {"chat": 1.0, "math": 1.0, "medical": 0.0, "reasoning": 0.5}
    assert d.target == pytest.approx({"chat": 0.8, "math": 0.8, "medical": 0.2, "reasoning": 0.4})
    assert d.best_loss == 0.4 and d.empty_loss == 1.0
    # Reasoning that does not help at all gets no soft target.
    losses["chat+math+reasoning"] = 0.4
    assert decide(losses, domains, c, labels=["reasoning"]).target["reasoning"] == pytest.approx(0.2)
    # Reasoning that passes the threshold is a full member (1.0), not soft.
    losses["chat+math+reasoning"] = 0.3
    d = decide(losses, domains, c, labels=["reasoning"])
    assert d.route == ["chat", "math", "reasoning"] and d.soft == []
    assert d.target["reasoning"] == pytest.approx(1.0)


def test_blend_weights_follow_config():
    domains = ["chat", "code"]
    losses = {"": 1.0, "chat": 1.0, "code": 0.5, "chat+code": 0.9}
    d = decide(losses, domains, cfg(blend_discovered=0.6), labels=["chat"])
    assert d.target == pytest.approx({"chat": 0.4, "code": 0.6})


# ----------------------------------------------------------------------------------------------- search
def test_exhaustive_search_one_batched_forward_per_route_with_chat_floor():
    domains = ["chat", "code", "math"]
    tables = [
        {
            "": 1.0,
            "chat": 0.9,
            "code": 0.6,
            "math": 1.1,
            "chat+code": 0.55,
            "chat+math": 1.0,
            "code+math": 0.7,
            "chat+code+math": 0.65,
        },
        {k: 2.0 for k in all_route_keys(domains)},
    ]

    fake = FakeLoss([by_members(t, domains, base=5.0) for t in tables])
    out = search_routes(fake, 2, domains, cfg())
    assert len(fake.calls) == 8 + 1  # 2^3 routes + the stacks-off forward
    assert all(rows == [0, 1] for _, rows in fake.calls)  # each route: one call over the whole batch
    executed = [w for w, _ in fake.calls]
    assert None in executed  # stacks off (base_loss)
    assert {"chat": 0.2} in executed  # the empty route runs chat at the floor
    assert {"chat": 0.2, "math": 0.8} in executed  # a single domain also gets the chat floor
    assert {"chat": 0.8} in executed
    assert out[0][BASE_KEY] == 5.0 and out[0]["code"] == pytest.approx(0.6)
    assert decide(out[0], domains, cfg(), ["code"]).route == ["chat", "code"]
    assert decide(out[1], domains, cfg(), ["code"]).route == []


def test_without_chat_domain_empty_route_is_the_base_forward():
    domains = ["code", "math"]
    fake = FakeLoss([by_members({"": 1.0, "code": 0.5, "math": 1.0, "code+math": 0.6}, domains, base=1.0)])
    out = search_routes(fake, 1, domains, cfg())
    assert len(fake.calls) == 4  # the empty route and the stacks-off forward are one call
    assert out[0][""] == out[0][BASE_KEY] == 1.0


def test_greedy_search_beyond_exhaustive_limit():
    domains = ["a", "b", "c", "d"]
    t0 = {
        "": 1.0,
        "a": 0.9,
        "b": 0.5,
        "c": 0.8,
        "d": 1.0,
        "a+b": 0.45,
        "b+c": 0.48,
        "b+d": 0.6,
        "a+b+c": 0.46,
        "a+b+d": 0.5,
    }
    t1 = {"": 1.0, "a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}
    fake = FakeLoss([by_members(t0, domains, 1.0), by_members(t1, domains, 1.0)])  # no chat: empty = base
    c = cfg(exhaustive_max_domains=2, chat_domain="none", soft_domains=())
    out = search_routes(fake, 2, domains, c)
    assert decide(out[0], domains, c, ["a"]).route == ["a", "b"]
    assert decide(out[1], domains, c, ["a"]).route == []
    assert len(fake.calls) < 16  # far fewer than 2^4 routes
    # Second-step candidates ran only on the row that accepted a first domain.
    assert all(rows == [0] for w, rows in fake.calls if w is not None and len(w) == 2)


def test_search_rejects_bad_loss_fn_output():
    with pytest.raises(ValueError, match="finite losses"):
        search_routes(lambda w, rows: torch.full((len(rows),), float("nan")), 1, ["a"], cfg())


# ------------------------------------------------------------------------------------------ run + cache
class FakeBackend:
    def __init__(self, losses: Mapping[str, RowLoss], skip: Sequence[str] = ()) -> None:
        self.losses = losses  # by example id
        self.skip = set(skip)
        self.forwards = 0
        self.prepared: list[str] = []

    def prepare(self, examples):
        self.prepared += [e.example_id for e in examples]
        return [None if e.example_id in self.skip else 7 for e in examples]

    def batch_loss_fn(self, examples):
        fake = FakeLoss([self.losses[e.example_id] for e in examples])

        def fn(weights, rows):
            self.forwards += 1
            return fake(weights, rows)

        return fn


def _examples():
    return [
        OracleExample("m1", "medical", "What is BMI?", "", "weight / height^2"),
        OracleExample("m2", "medical", "Define fever", "", "high temperature"),
        OracleExample("c1", "code", "Reverse a string", "", "s[::-1]"),
    ]


def _backend(skip=()):
    domains = ["chat", "code", "math"]
    t_med = {k: 1.0 for k in all_route_keys(domains)} | {"math": 0.7, "chat+math": 0.4}
    t_code = {k: 1.0 for k in all_route_keys(domains)} | {"code": 0.3}
    return FakeBackend(
        {
            "m1": by_members(t_med, domains),
            "m2": by_members(t_med, domains),
            "c1": by_members(t_code, domains),
        },
        skip,
    ), domains


def test_run_oracle_caches_per_domain(tmp_path):
    backend, domains = _backend()
    c = cfg(oracle_batch_size=2)
    res = run_oracle(
        _examples(),
        c,
        backend=backend,
        domains=domains,
        stack_signature="s1",
        cache_dir=tmp_path,
        progress=False,
    )
    assert [r.example_id for r in res.records] == ["m1", "m2", "c1"]
    assert res.n_computed == 3 and res.n_cached == 0
    assert res.records[0].route == ["chat", "math"]
    assert res.records[2].route == ["code"]
    assert (tmp_path / "oracle_medical.json").is_file() and (tmp_path / "oracle_code.json").is_file()
    assert res.targets(domains)[0].tolist() == pytest.approx([0.8, 0.0, 0.8])  # medical label has no stack
    first_forwards = backend.forwards

    # Same signature: everything from the cache, no forward at all.
    res2 = run_oracle(
        _examples(),
        c,
        backend=backend,
        domains=domains,
        stack_signature="s1",
        cache_dir=tmp_path,
        progress=False,
    )
    assert backend.forwards == first_forwards and res2.n_cached == 3 and res2.n_computed == 0
    assert [r.to_dict() for r in res2.records] == [r.to_dict() for r in res.records]

    # A new example and a changed one: only those two are computed.
    exs = [*_examples(), OracleExample("m3", "medical", "Define fever", "", "high temperature")]
    exs[2] = OracleExample("c1", "code", "Reverse a string", "", "''.join(reversed(s))")
    backend.losses["m3"] = backend.losses["m1"]
    backend.prepared.clear()
    res3 = run_oracle(
        exs, c, backend=backend, domains=domains, stack_signature="s1", cache_dir=tmp_path, progress=False
    )
    assert sorted(backend.prepared) == ["c1", "m3"] and res3.n_computed == 2 and res3.n_cached == 2

    # Other settings that do not change losses (threshold, blend): re-derived without any forward.
    forwards = backend.forwards
    res4 = run_oracle(
        exs,
        cfg(oracle_batch_size=2, oracle_threshold=0.5, blend_discovered=1.0),
        backend=backend,
        domains=domains,
        stack_signature="s1",
        cache_dir=tmp_path,
        progress=False,
    )
    assert backend.forwards == forwards
    assert res4.records[0].route == []  # see test_changed_threshold_rederives_route_from_cache


def test_changed_threshold_rederives_route_from_cache(tmp_path):
    backend, domains = _backend()
    run_oracle(
        _examples(),
        cfg(),
        backend=backend,
        domains=domains,
        stack_signature="s",
        cache_dir=tmp_path,
        progress=False,
    )
    forwards = backend.forwards
    res = run_oracle(
        _examples(),
        cfg(oracle_threshold=0.35, blend_discovered=1.0),
        backend=backend,
        domains=domains,
        stack_signature="s",
        cache_dir=tmp_path,
        progress=False,
    )
    assert backend.forwards == forwards
    # math alone improves the empty route by 0.3 (< 0.35): not admissible; chat+math by 0.6 over the empty
    # route but only 0.3 over math: not admissible either. The route is empty.
    assert res.records[0].route == []
    assert res.records[0].target == {"chat": 0.0, "code": 0.0, "math": 0.0}


def test_signature_change_recomputes_and_skips_unscorable(tmp_path):
    backend, domains = _backend(skip=["m2"])
    res = run_oracle(
        _examples(),
        cfg(),
        backend=backend,
        domains=domains,
        stack_signature="s1",
        cache_dir=tmp_path,
        progress=False,
    )
    assert res.skipped == ["m2"] and [r.example_id for r in res.records] == ["m1", "c1"]
    forwards = backend.forwards
    res2 = run_oracle(
        _examples(),
        cfg(),
        backend=backend,
        domains=domains,
        stack_signature="s2",
        cache_dir=tmp_path,
        progress=False,
    )
    assert backend.forwards > forwards and res2.n_computed == 2
    # Settings that change losses (chat floor) also invalidate.
    forwards = backend.forwards
    run_oracle(
        _examples(),
        cfg(chat_floor=0.3),
        backend=backend,
        domains=domains,
        stack_signature="s2",
        cache_dir=tmp_path,
        progress=False,
    )
    assert backend.forwards > forwards


# -------------------------------------------------------------------------------------------- analysis
def _record(domain: str, route: list[str], soft=(), base=2.0, best=1.0) -> OracleRecord:
    return OracleRecord(
        example_id=f"{domain}-{route}",
        domain=domain,
        labels=[domain],
        content_sha="x",
        n_tokens=5,
        base_loss=base,
        losses={},
        route=route,
        soft=list(soft),
        best_loss=best,
    )


def test_cross_domain_analysis_and_plot(tmp_path):
    recs = [_record("medical", ["chat", "math"]) for _ in range(3)] + [_record("medical", ["medical"])]
    recs += [_record("reasoning", ["chat", "reasoning"], soft=["reasoning"]), _record("reasoning", [])]
    a = cross_domain_analysis(recs)
    med = a["per_domain"]["medical"]
    assert med["n"] == 4 and med["excludes_own"] == 0.75 and med["own_only"] == 0.25
    assert med["top_routes"][0] == ["chat+math", 3]
    rea = a["per_domain"]["reasoning"]
    assert rea["own_with_others"] == 0.5 and rea["empty"] == 0.5 and rea["soft_fraction"] == 0.5
    assert a["overall"]["n"] == 6 and a["overall"]["mean_improvement"] == pytest.approx(1.0)
    fig = plot_cross_domain(a, tmp_path / "routes.png")
    assert fig is not None and (tmp_path / "routes.png").stat().st_size > 1000
    # Records as dicts (e.g. read back from the cache) work too.
    assert cross_domain_analysis([r.to_dict() for r in recs]) == a


def test_completion_losses_ignore_prompt_and_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 3, 6]])
    out = completion_losses(logits, labels)
    ref0 = torch.nn.functional.cross_entropy(logits[0, 1:3], labels[0, 2:4])
    ref1 = torch.nn.functional.cross_entropy(logits[1, :4], labels[1, 1:])
    assert torch.allclose(out, torch.stack([ref0, ref1]))


# ------------------------------------------------------------------------------ real BrainStacks backend
#: Two small examples of two source domains, shared by the real-model oracle tests.
SMALL_EXAMPLES = [
    OracleExample.make("math", "Add 2 and 3", "", "The answer is 5."),
    OracleExample.make("chat", "Say hello politely", "", "Hello, nice to meet you!"),
]


@pytest.fixture
def two_domain_stacks(tiny_llama, add_random_stack):
    """Random frozen stacks for chat and math on the tiny Llama."""
    from brainstacks_hooks import BrainStacks, StackConfig

    bs = BrainStacks.attach(tiny_llama, StackConfig())
    for seed, domain in enumerate(["chat", "math"]):
        add_random_stack(bs, domain, seed)
    return bs


def test_stack_backend_end_to_end(tiny_llama, two_domain_stacks, tmp_path):
    from brainstacks_hooks.data.formatting import encode_example
    from brainstacks_hooks.router.oracle import run_oracle_on_stacks, stacks_signature

    bs = two_domain_stacks
    tok = CharTokenizer()
    exs = [
        *SMALL_EXAMPLES,
        OracleExample.make("math", "Multiply 4 by 6", "", "4 * 6 = 24, so the answer is 24."),
        OracleExample.make("math", "x" * 200, "", "too long to fit"),  # answer would not fit: skipped
    ]
    c = RouterConfig(oracle_max_length=128, oracle_batch_size=2)
    calls = [0]
    tiny_llama.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    res = run_oracle_on_stacks(bs, tok, exs, c, cache_dir=tmp_path, progress=False)
    assert res.skipped == [exs[3].example_id] and len(res.records) == 3
    # Mixed-route batches of 2 rows: math has 2 examples x (4 routes + base) = 10 rows -> 5 forwards, chat
    # 1 x 5 = 5 rows -> 3 forwards.
    assert calls[0] == 5 + 3
    rec = res.records[0]
    assert set(rec.losses) == set(all_route_keys(["chat", "math"]))

    # Stored losses equal a direct forward with the executed weights (chat at the floor).
    enc = encode_example(tok, exs[0].instruction, "", exs[0].output, 128)
    ids, labels = torch.tensor([enc["input_ids"]]), torch.tensor([enc["labels"]])
    from brainstacks_hooks.router.oracle import executed_weights

    for key in ("math", "", "chat"):
        weights = executed_weights(parse_route_key(key), ["chat", "math"], c, exs[0].labels)
        with torch.no_grad(), bs.routed(weights):
            direct = completion_losses(tiny_llama(input_ids=ids).logits, labels)[0].item()
        assert rec.losses[key] == pytest.approx(direct, abs=1e-4)
    with torch.no_grad(), bs.base_only():
        assert rec.base_loss == pytest.approx(
            completion_losses(tiny_llama(input_ids=ids).logits, labels)[0].item(), abs=1e-4
        )
    assert rec.n_tokens == sum(1 for y in enc["labels"] if y != -100)

    # The per-route path (one forward per route over a batch) gives the same losses.
    per_route = run_oracle_on_stacks(bs, tok, exs, c, cache_dir=None, progress=False, mixed_batches=False)
    for a, b in zip(res.records, per_route.records):
        assert a.losses == pytest.approx(b.losses, abs=1e-4) and a.route == b.route

    # Cached: no forward on a second run.
    n = calls[0]
    res2 = run_oracle_on_stacks(bs, tok, exs, c, cache_dir=tmp_path, progress=False)
    assert calls[0] == n and res2.n_cached == 3

    # Changed stack tensors change the signature, which recomputes.
    sig = stacks_signature(bs, tok)
    with torch.no_grad():
        next(iter(bs.frozen_stacks[1].items()))[1].B.add_(0.01)
    assert stacks_signature(bs, tok) != sig
    run_oracle_on_stacks(bs, tok, exs, c, cache_dir=tmp_path, progress=False)
    assert calls[0] > n


def test_stack_backend_bf16_autocast(tiny_llama, two_domain_stacks, tmp_path):
    """bf16 oracle forwards: losses within bf16 noise of fp32, and a separate cache entry (recomputed)."""
    from brainstacks_hooks.router.oracle import run_oracle_on_stacks

    bs, tok, exs = two_domain_stacks, CharTokenizer(), SMALL_EXAMPLES
    c = RouterConfig(oracle_max_length=128, oracle_batch_size=2)
    calls = [0]
    tiny_llama.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    fp32 = run_oracle_on_stacks(bs, tok, exs, c, cache_dir=tmp_path, progress=False)
    n = calls[0]
    autocast_dtypes = []
    first_linear = next(m for m in tiny_llama.modules() if isinstance(m, torch.nn.Linear))
    first_linear.register_forward_hook(lambda m, a, o: autocast_dtypes.append(o.dtype))
    bf16 = run_oracle_on_stacks(bs, tok, exs, c, cache_dir=tmp_path, progress=False, bf16=True)
    assert calls[0] > n and bf16.n_cached == 0  # the fp32 cache is not reused for bf16
    assert autocast_dtypes and set(autocast_dtypes) == {torch.bfloat16}
    for a, b in zip(fp32.records, bf16.records):
        assert a.losses.keys() == b.losses.keys()
        for k in a.losses:
            assert b.losses[k] == pytest.approx(a.losses[k], rel=0.05)
            assert math.isfinite(b.losses[k])
    # And the bf16 results are now cached under their own signature.
    m = calls[0]
    again = run_oracle_on_stacks(bs, tok, exs, c, cache_dir=tmp_path, progress=False, bf16=True)
    assert calls[0] == m and again.n_cached == 2


def test_routes_are_scored_at_the_gated_weights_inference_would_run():
    from brainstacks_hooks.router.gating import apply_gating
    from brainstacks_hooks.router.oracle import executed_weights

    domains, c = ["chat", "code", "math"], cfg()
    assert executed_weights(["math"], domains, c, ["math"]) == {"chat": 0.2, "math": 1.0}
    # a label domain left out of the route still runs at 0.2 (above the 0.12 gate), as the trained router would
    assert executed_weights(["code"], domains, c, ["math"]) == {"chat": 0.2, "code": 0.8, "math": 0.2}
    assert executed_weights([], domains, c, ["math"]) == {"chat": 0.2, "math": 0.2}
    # a route is scored at exactly what inference runs for a router that outputs the route's target
    table = {k: 1.0 for k in all_route_keys(domains)} | {"code+math": 0.4}
    decision = decide(table, domains, c, ["math"])
    assert decision.route == ["code", "math"]
    inference = apply_gating(decision.target, c.chat_floor, c.chat_domain, c.gate_threshold).weights
    assert inference == executed_weights(decision.route, domains, c, ["math"])


def test_mixed_route_search_runs_each_row_at_its_own_gated_weights():
    from brainstacks_hooks.router.oracle import executed_weights

    domains, c = ["chat", "code", "math"], cfg()
    seen: list[tuple[dict[str, float] | None, int]] = []

    def multi_fn(items):
        seen.extend(items)
        return torch.ones(len(items))

    labels = [["math"], ["code"]]
    search_routes(lambda w, r: torch.ones(len(r)), 2, domains, c, multi_fn=multi_fn, rows_per_forward=5,
                  labels=labels)
    assert len(seen) == 2 * (8 + 1)  # every route of both rows, plus their stacks-off forwards
    for row, lab in enumerate(labels):
        got = sorted((tuple(sorted((w or {}).items()))) for w, r in seen if r == row)
        want = sorted([()] + [tuple(sorted(executed_weights(parse_route_key(k), domains, c, lab).items()))
                              for k in all_route_keys(domains)])
        assert got == want
