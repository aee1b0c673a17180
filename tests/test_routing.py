"""Routing instead of adding: the router's math, its centroids, the routed evaluation against
the oracle rebuilt from single-adapter evaluations, and routes in a tiny study."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import load_tiny, make_adapter, qa_domains
from test_results_schema import assert_reads_back_whole

from lorasum.data import QA, load_split, make_batches
from lorasum.data.token_cache import tokenize_cached
from lorasum.errors import LorasumError
from lorasum.evaluate import evaluate_batches
from lorasum.models import load_tokenizer
from lorasum.routing import (
    GAUSSIAN_FLOOR,
    evaluate_mixture,
    evaluate_routed,
    gaussian_of,
    gaussian_scores,
    mixture_nll,
    mixture_weights,
    oracle_from_singles,
    prompt_centroid,
    prompt_gaussian,
    prompt_ids,
    prompt_vectors,
    route,
    route_gaussian,
    router_tokens,
)


@pytest.fixture(autouse=True)
def _fp32(monkeypatch):
    monkeypatch.setenv("LORASUM_PRECISION", "fp32")


def test_route_picks_the_highest_cosine_and_breaks_ties_to_the_first():
    centroids = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    vecs = torch.tensor(
        [
            [5.0, 0.1],  # nearly along x: centroid 0
            [0.2, 3.0],  # nearly along y: centroid 1
            [2.0, 2.1],  # the diagonal: centroid 2 (scale does not matter)
            [0.0, 0.0],  # every cosine 0: the first
        ]
    )
    assert route(vecs, centroids).tolist() == [0, 1, 2, 0]
    # an exact tie between two identical centroids goes to the lower index, every time
    twins = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    assert route(torch.tensor([[3.0, 0.0]]), twins).tolist() == [1]
    # the oracle: argmax of the cosine matrix computed by hand
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(20, 8, generator=g), torch.randn(4, 8, generator=g)
    cos = (x / x.norm(dim=1, keepdim=True)) @ (c / c.norm(dim=1, keepdim=True)).T
    assert route(x, c).tolist() == cos.argmax(1).tolist()


def test_gaussian_scores_are_diagonal_normal_log_likelihoods():
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(3, 6, generator=g, dtype=torch.float64)
    var = torch.rand(3, 6, generator=g, dtype=torch.float64) + 0.1
    x = torch.randn(10, 6, generator=g, dtype=torch.float64)
    got = gaussian_scores(x, torch.stack([mu, var], 1))  # (N, K)
    floored = var + GAUSSIAN_FLOOR * var.mean(1, keepdim=True)
    normal = torch.distributions.Normal(mu, floored.sqrt())  # the oracle, per adapter
    want = torch.stack([normal.log_prob(xi).sum(1) for xi in x])  # (N, K), with its constant
    const = 0.5 * 6 * math.log(2 * math.pi)
    assert torch.allclose(got - const, want, atol=1e-10)
    assert route_gaussian(x, torch.stack([mu, var], 1)).tolist() == want.argmax(1).tolist()
    # rows drawn from one of two well-separated Gaussians go to it, whatever their scale
    a = torch.stack([torch.zeros(4), torch.ones(4)])  # mean 0, variance 1
    b = torch.stack([torch.full((4,), 10.0), torch.full((4,), 4.0)])  # mean 10, variance 4
    rows = torch.tensor([[0.5, -0.3, 0.1, 0.0], [9.0, 11.0, 12.0, 8.5]])
    assert route_gaussian(rows, torch.stack([a, b])).tolist() == [0, 1]
    assert route_gaussian(rows, torch.stack([a, a])).tolist() == [0, 0]  # ties: the first
    # gaussian_of: mean and unbiased variance, in float32
    v = torch.randn(7, 5, generator=g)
    s = gaussian_of(v)
    assert s.dtype == torch.float32 and s.shape == (2, 5)
    assert torch.allclose(s[0], v.mean(0)) and torch.allclose(s[1], v.var(0, unbiased=True))


def test_prompt_gaussian_reads_only_the_first_prompts(tiny_llama):
    model = load_tiny(tiny_llama)
    tok = load_tokenizer(str(tiny_llama))
    rows = [QA(f"What is {i} plus {i + 2}?", str(2 * i + 2)) for i in range(6)]
    got = prompt_gaussian(model, tok, rows, max_length=32, prompts=4)
    assert torch.allclose(got, gaussian_of(prompt_vectors(model, tok, rows[:4], 32)), atol=1e-6)
    other_tail = rows[:4] + [QA("Which colour is the sky?", "blue")] * 2
    assert torch.equal(got, prompt_gaussian(model, tok, other_tail, max_length=32, prompts=4))


def test_prompt_centroid_is_the_mean_prompt_hidden_state(tiny_llama):
    model = load_tiny(tiny_llama)
    tok = load_tokenizer(str(tiny_llama))
    row = QA("What is 3 plus 4?", "7")
    got = prompt_centroid(model, tok, [row], max_length=32)
    ids = torch.tensor([prompt_ids(tok, row.question, 32)])
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]  # (T, H)
    expected = F.normalize(hidden.mean(0), dim=0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # the answer is never read: another answer, the same centroid
    other = prompt_centroid(model, tok, [QA(row.question, "a different answer")], max_length=32)
    torch.testing.assert_close(got, other, rtol=0, atol=0)
    # several rows (padded in one batch): the mean of each row's own mean, normalised
    rows = [row, QA("Which colour is item 12 of the long list?", "red")]
    each = torch.stack([prompt_centroid(model, tok, [r], 32, batch_size=1) for r in rows])
    raw = []
    for r in rows:
        with torch.no_grad():
            h = model(
                input_ids=torch.tensor([prompt_ids(tok, r.question, 32)]), output_hidden_states=True
            ).hidden_states[-1][0]
        raw.append(h.mean(0))
    together = prompt_centroid(model, tok, rows, 32, batch_size=2)
    torch.testing.assert_close(
        together, F.normalize(torch.stack(raw).mean(0), dim=0), rtol=1e-5, atol=1e-6
    )
    assert not torch.allclose(each[0], each[1])


@pytest.fixture(scope="module")
def two_adapters(tiny_llama, qa_files, tmp_path_factory):
    d = tmp_path_factory.mktemp("routing")
    names = ["arith", "colors"]
    paths = {n: make_adapter(tiny_llama, d / n, seed=i + 1) for i, n in enumerate(names)}
    sources = {n: load_split(str(qa_files[n]), 42, None, None, None, 6) for n in names}
    for n, s in sources.items():
        s.name = n
    return paths, sources


def test_routed_to_the_true_domain_is_the_oracle(tiny_llama, two_adapters):
    from peft import PeftModel

    paths, sources = two_adapters
    model = load_tiny(tiny_llama)
    tok = load_tokenizer(str(tiny_llama))
    names = list(paths)
    # the oracle from each adapter's own evaluation on its own domain's rows
    singles = {}
    for n in names:
        items = tokenize_cached(tok, [sources[n]], "test", 32)
        net = PeftModel.from_pretrained(model, str(paths[n]))
        ev = evaluate_batches(
            net, make_batches(items, 4, tok.pad_token_id, False), [n], torch.device("cpu")
        )
        net.unload()
        singles[n] = ev["per_dataset"][n]
    oracle = oracle_from_singles(singles)
    truth = [d for d, n in enumerate(names) for _ in sources[n].splits["test"]]
    got = evaluate_routed(model, tok, paths, sources, 32, assignment=truth)
    assert got["perplexity"] == pytest.approx(oracle["perplexity"], rel=1e-5)
    assert got["tokens"] == oracle["tokens"]
    for n in names:
        assert got["per_dataset"][n]["nll"] == pytest.approx(singles[n]["nll"], rel=1e-5)
    assert got["routing_accuracy"] == 100.0
    assert got["confusion"] == {
        "arith": {"arith": len(sources["arith"].splits["test"]), "colors": 0},
        "colors": {"arith": 0, "colors": len(sources["colors"].splits["test"])},
    }
    # everything to the first adapter: half right, and the colours rows score as arith's
    wrong = evaluate_routed(model, tok, paths, sources, 32, assignment=[0] * len(truth))
    n_arith = len(sources["arith"].splits["test"])
    assert wrong["routing_accuracy"] == pytest.approx(100.0 * n_arith / len(truth))
    assert wrong["per_dataset"]["arith"]["nll"] == pytest.approx(singles["arith"]["nll"], rel=1e-5)
    assert wrong["per_dataset"]["colors"]["nll"] != pytest.approx(singles["colors"]["nll"])
    assert wrong["confusion"]["colors"] == {"arith": len(truth) - n_arith, "colors": 0}
    # the shared model is left without LoRA layers
    assert not any("lora" in k for k in model.state_dict())


def test_nearest_routes_by_the_centroids(tiny_llama, two_adapters):
    """With the centroids given, the routed rows are `route` of each prompt; centroids built
    from each domain's own training rows."""
    paths, sources = two_adapters
    model = load_tiny(tiny_llama)
    tok = load_tokenizer(str(tiny_llama))
    cents = torch.stack([prompt_centroid(model, tok, sources[n], 32) for n in paths])
    got = evaluate_routed(model, tok, paths, sources, 32, centroids=cents)
    rows = [qa for n in paths for qa in sources[n].splits["test"]]
    vecs = torch.stack([prompt_centroid(model, tok, [qa], 32) for qa in rows])
    chosen = route(vecs, cents).tolist()
    forced = evaluate_routed(model, tok, paths, sources, 32, assignment=chosen)
    assert got["perplexity"] == pytest.approx(forced["perplexity"], rel=1e-6)
    assert got["confusion"] == forced["confusion"]
    # gaussian: the rows routed by `route_gaussian` against each domain's own summary
    gauss = torch.stack([prompt_gaussian(model, tok, sources[n], 32) for n in paths])
    got = evaluate_routed(model, tok, paths, sources, 32, gaussians=gauss)
    raw = prompt_vectors(model, tok, rows, 32)  # not normalised: a density is not a direction
    forced = evaluate_routed(
        model, tok, paths, sources, 32, assignment=route_gaussian(raw, gauss).tolist()
    )
    assert got["perplexity"] == pytest.approx(forced["perplexity"], rel=1e-6)
    assert got["confusion"] == forced["confusion"]
    # the prompt tokens a summary reads: the first `prompts` training prompts, cut as routed
    src = sources[next(iter(paths))]
    first = [len(prompt_ids(tok, qa.question, 32)) for qa in src.splits["train"][:3]]
    assert router_tokens(tok, src, 32, prompts=3) == sum(first)
    assert router_tokens(tok, src, 32) > router_tokens(tok, src, 32, prompts=3)
    with pytest.raises(ValueError, match="centroids or gaussians"):
        evaluate_routed(model, tok, paths, sources, 32, centroids=cents, gaussians=gauss)


def test_mixture_weights_are_a_tempered_posterior_with_small_weights_dropped():
    scores = torch.tensor([[0.0, -1.0, -50.0], [-3.0, -3.0, -3.0], [10.0, 0.0, 0.0]])
    w = mixture_weights(scores, temperature=2.0, floor=0.05)
    # the oracle: softmax(scores / 2) by hand, weights under 0.05 zeroed, rows renormalised
    e = torch.exp(scores.double() / 2.0)
    p = e / e.sum(1, keepdim=True)
    p[p < 0.05] = 0.0
    assert torch.allclose(w, p / p.sum(1, keepdim=True), atol=1e-12)
    assert w[0, 2] == 0 and w[2, 1:].eq(0).all() and w[2, 0] == 1  # dropped, renormalised
    assert torch.allclose(w[1], torch.full((3,), 1 / 3, dtype=torch.float64))
    assert torch.allclose(w.sum(1), torch.ones(3, dtype=torch.float64))
    # a floor above every weight still keeps each row's top adapter: the hard route
    hard = mixture_weights(scores, temperature=1.0, floor=0.99)
    assert hard.argmax(1).tolist() == scores.argmax(1).tolist() and hard.eq(1).sum() == 3
    # temperature → 0 is the hard route, a large one the uniform mix
    assert mixture_weights(scores, 1e-6, 0.0)[0].tolist() == [1.0, 0.0, 0.0]
    assert torch.allclose(
        mixture_weights(scores[:1], 1e6, 0.0),
        torch.full((1, 3), 1 / 3, dtype=torch.float64),
        atol=1e-5,
    )


def test_mixture_nll_is_the_mixture_of_the_answer_likelihoods():
    nll = torch.tensor([[2.0, 5.0], [40.0, 1.0], [3.0, float("nan")]], dtype=torch.float64)
    w = torch.tensor([[0.5, 0.5], [0.25, 0.75], [1.0, 0.0]], dtype=torch.float64)
    want = [
        -math.log(0.5 * math.exp(-2.0) + 0.5 * math.exp(-5.0)),
        -math.log(0.25 * math.exp(-40.0) + 0.75 * math.exp(-1.0)),
        3.0,  # one adapter kept: its own NLL, the dropped one's NaN never read
    ]
    assert mixture_nll(nll, w).tolist() == pytest.approx(want, rel=1e-12)
    # never worse than any kept adapter's NLL plus its −log weight, never better than the best
    g = torch.Generator().manual_seed(0)
    nll, w = torch.rand(50, 3, generator=g) * 30, torch.rand(50, 3, generator=g)
    w = w / w.sum(1, keepdim=True)
    got = mixture_nll(nll, w)
    assert (got <= (nll.double() - w.double().log()).min(1).values + 1e-9).all()
    assert (got >= nll.double().min(1).values - 1e-9).all()
    # huge NLLs stay finite (log-sum-exp, not exp)
    assert mixture_nll(torch.tensor([[1e4, 2e4]]), torch.tensor([[0.5, 0.5]])).item() == (
        pytest.approx(1e4 + math.log(2))
    )


def test_mixture_evaluation_against_each_row_scored_alone(tiny_llama, two_adapters):
    """`evaluate_mixture`: one-hot weights are the routed evaluation; even weights are the
    mixture of each row's likelihood under each adapter, each row scored alone (no padding);
    the gaussian path is the weights computed from `gaussian_scores`."""
    from peft import PeftModel

    paths, sources = two_adapters
    model = load_tiny(tiny_llama)
    tok = load_tokenizer(str(tiny_llama))
    names = list(paths)
    items = tokenize_cached(tok, [sources[n] for n in names], "test", 32)
    truth = [d for _, d in items]
    one_hot = F.one_hot(torch.tensor(truth), 2).double()
    got = evaluate_mixture(model, tok, paths, sources, 32, weights=one_hot)
    routed = evaluate_routed(model, tok, paths, sources, 32, assignment=truth)
    assert got["perplexity"] == pytest.approx(routed["perplexity"], rel=1e-9)
    for n in names:
        assert got["per_dataset"][n] == pytest.approx(routed["per_dataset"][n], rel=1e-9)
    assert got["confusion"] == routed["confusion"] and got["routing_accuracy"] == 100.0
    assert got["mixed_rows"] == 0.0 and got["adapter_rows"] == 1.0
    # each row alone under each adapter (batch of one), mixed half and half by hand
    alone = torch.zeros(len(items), 2, dtype=torch.float64)
    for k, n in enumerate(names):
        net = PeftModel.from_pretrained(model, str(paths[n]))
        for i, item in enumerate(items):
            ev = evaluate_batches(
                net, make_batches([item], 1, tok.pad_token_id, False), names, torch.device("cpu")
            )
            alone[i, k] = ev["nll"]
        net.unload()
    half = torch.full((len(items), 2), 0.5, dtype=torch.float64)
    even = evaluate_mixture(model, tok, paths, sources, 32, weights=half)
    want = sum(-math.log(0.5 * math.exp(-a) + 0.5 * math.exp(-b)) for a, b in alone.tolist())
    assert even["nll"] == pytest.approx(want, rel=1e-5)
    assert even["tokens"] == routed["tokens"]
    assert even["mixed_rows"] == 100.0 and even["adapter_rows"] == 2.0
    # the gaussian path: the weights `mixture_weights` makes of each prompt's scores
    gauss = torch.stack([prompt_gaussian(model, tok, sources[n], 32) for n in names])
    rows = [qa for n in names for qa in sources[n].splits["test"]]
    w = mixture_weights(gaussian_scores(prompt_vectors(model, tok, rows, 32), gauss), 300.0)
    by_gauss = evaluate_mixture(model, tok, paths, sources, 32, gaussians=gauss, temperature=300.0)
    forced = evaluate_mixture(model, tok, paths, sources, 32, weights=w)
    assert by_gauss["nll"] == pytest.approx(forced["nll"], rel=1e-9)
    assert by_gauss["mixed_rows"] == forced["mixed_rows"]
    with pytest.raises(ValueError, match="rows"):
        evaluate_mixture(model, tok, paths, sources, 32, weights=half[:-1])
    assert not any("lora" in k for k in model.state_dict())


@pytest.fixture(scope="module")
def routed_study(tiny_llama, qa_files, tmp_path_factory):
    from lorasum.study.reproduce import reproduce

    mp = pytest.MonkeyPatch()
    mp.setenv("LORASUM_PRECISION", "fp32")
    out = tmp_path_factory.mktemp("routed") / "run"
    settings = dict(
        preset="tiny",
        model=str(tiny_llama),
        domains=qa_domains(qa_files, 2),
        max_order=2,
        paper_variants=False,
        cross_domain=False,
        routes="oracle,nearest,gaussian,mixture,arrow",
    )
    try:
        res = reproduce(out, progress=False, **settings)
        # the routed evaluation is cached by its key like any evaluation: nothing left to run
        plan = reproduce(out, plan_only=True, **settings)
    finally:
        mp.undo()
    return out, res, plan


def test_study_reports_routes(routed_study):
    out, res, plan = routed_study
    assert plan["units"]["eval/42/route-nearest-arith+colors"] == "cached"
    assert plan["units"]["eval/42/route-gaussian-arith+colors"] == "cached"
    assert plan["units"]["eval/42/route-mixture-arith+colors"] == "cached"
    assert plan["units"]["eval/42/route-arrow-arith+colors"] == "cached"
    assert set(plan["units"].values()) == {"cached"}
    (row,) = res["combinations"]
    routes = row["routes"]
    assert list(routes) == ["oracle", "nearest", "gaussian", "mixture", "arrow"]
    # the oracle rebuilt from the singles' evaluation files
    nll = tokens = 0.0
    for d in row["domains"]:
        ev = json.loads((out / "seed-42" / "evals" / f"single-{d}.json").read_text())["result"]
        nll += ev["per_dataset"][d]["nll"]
        tokens += ev["per_dataset"][d]["tokens"]
    assert routes["oracle"]["ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-9)
    assert routes["oracle"]["routing_accuracy"] == 100.0
    for r in routes.values():
        assert r["delta_pct"] == pytest.approx((r["ppl"] / row["ppl_merged"] - 1) * 100)
    nearest = json.loads(
        (out / "seed-42" / "evals" / "route-nearest-arith+colors.json").read_text()
    )
    assert routes["nearest"]["ppl"] == nearest["result"]["perplexity"]
    assert routes["nearest"]["routing_accuracy"] == nearest["result"]["routing_accuracy"]
    assert 0.0 <= routes["nearest"]["routing_accuracy"] <= 100.0
    assert sorted(p.name for p in (out / "routers").iterdir()) == [
        "arith-gaussian.safetensors",
        "arith.safetensors",
        "colors-gaussian.safetensors",
        "colors.safetensors",
    ]
    # gaussian: its routed evaluation, and the prompt tokens its summaries read (the first
    # GAUSSIAN_PROMPTS training prompts of each domain; the tiny domains have fewer)
    gaussian = json.loads(
        (out / "seed-42" / "evals" / "route-gaussian-arith+colors.json").read_text()
    )["result"]
    assert routes["gaussian"]["ppl"] == gaussian["perplexity"]
    assert routes["gaussian"]["routing_accuracy"] == gaussian["routing_accuracy"]
    assert routes["gaussian"]["router_tokens"] == sum(gaussian["router_tokens"].values()) > 0
    # the tiny domains have fewer than 64 training rows: both summaries read every prompt
    assert routes["nearest"]["router_tokens"] == routes["gaussian"]["router_tokens"]
    assert routes["oracle"]["router_tokens"] is None and routes["arrow"]["router_tokens"] is None
    # mixture: gaussian's summaries (no file of its own), soft; its serving cost recorded
    mixture = json.loads(
        (out / "seed-42" / "evals" / "route-mixture-arith+colors.json").read_text()
    )["result"]
    assert routes["mixture"]["ppl"] == mixture["perplexity"]
    assert routes["mixture"]["router_tokens"] == routes["gaussian"]["router_tokens"]
    assert routes["mixture"]["adapter_rows"] == mixture["adapter_rows"]
    assert 1.0 <= mixture["adapter_rows"] <= 2.0 and 0.0 <= mixture["mixed_rows"] <= 100.0
    assert "adapter_rows" not in routes["gaussian"]
    assert row["per_seed"][0]["routes"]["nearest"]["ppl"] == routes["nearest"]["ppl"]
    # the tiny domains' prompts are told apart by their first words: every row routed right,
    # so the nearest route scores exactly what the oracle does
    assert routes["nearest"]["routing_accuracy"] == 100.0
    assert routes["nearest"]["ppl"] == pytest.approx(routes["oracle"]["ppl"], rel=1e-6)
    # arrow: PEFT's per-token mix of both singles, no routing accuracy
    arrow = json.loads((out / "seed-42" / "evals" / "route-arrow-arith+colors.json").read_text())
    assert routes["arrow"]["ppl"] == arrow["result"]["perplexity"]
    assert arrow["result"]["arrow"] == {"top_k": 2, "router_temperature": 1.0, "rng_seed": 0}
    assert arrow["result"]["tokens"] == row["tokens"]
    assert routes["arrow"]["routing_accuracy"] is None
    assert row["per_seed"][0]["routes"]["arrow"]["routing_accuracy"] is None
    report = (out / "report.md").read_text()
    assert (
        "| combination | oracle: Δ% · routed right | nearest: Δ% · routed right "
        "| gaussian: Δ% · routed right | mixture: Δ% · routed right "
        "| arrow: Δ% · routed right |" in report
    )
    oracle_cell = f"{routes['oracle']['delta_pct']:+.2f} · 100%"
    assert f"| arith + colors | {oracle_cell} |" in report
    assert f"{routes['arrow']['delta_pct']:+.2f} · n/a |" in report
    assert "--lora" in report and "Arrow" in report


def test_results_json_with_routes_reads_back_whole(routed_study):
    out, res, _ = routed_study
    assert_reads_back_whole(out, res)


def test_unknown_route_is_one_line():
    from lorasum.study.config import resolve_study

    with pytest.raises(LorasumError) as e:
        resolve_study("tiny", overrides={"routes": ["oracle", "nearst"]})
    assert "\n" not in str(e.value) and "nearst" in str(e.value) and "nearest" in str(e.value)
    assert resolve_study("tiny").routes == []
