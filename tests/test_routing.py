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
from lorasum.errors import LorasumError
from lorasum.evaluate import evaluate_batches
from lorasum.models import load_tokenizer
from lorasum.routing import (
    GAUSSIAN_FLOOR,
    evaluate_routed,
    gaussian_of,
    gaussian_scores,
    oracle_from_singles,
    prompt_centroid,
    prompt_gaussian,
    prompt_ids,
    prompt_vectors,
    route,
    route_gaussian,
    router_tokens,
)
from lorasum.tokens import tokenize_cached


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
            h = model(input_ids=torch.tensor([prompt_ids(tok, r.question, 32)]),
                      output_hidden_states=True).hidden_states[-1][0]  # fmt: skip
        raw.append(h.mean(0))
    together = prompt_centroid(model, tok, rows, 32, batch_size=2)
    torch.testing.assert_close(together, F.normalize(torch.stack(raw).mean(0), dim=0),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
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
        ev = evaluate_batches(net, make_batches(items, 4, tok.pad_token_id, False), [n],
                              torch.device("cpu"))  # fmt: skip
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
        routes="oracle,nearest,gaussian,arrow",
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
    assert plan["units"]["eval/42/route-arrow-arith+colors"] == "cached"
    assert set(plan["units"].values()) == {"cached"}
    (row,) = res["combinations"]
    routes = row["routes"]
    assert list(routes) == ["oracle", "nearest", "gaussian", "arrow"]
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
        "| gaussian: Δ% · routed right | arrow: Δ% · routed right |" in report
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
