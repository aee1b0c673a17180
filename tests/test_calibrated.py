"""`calibrated` family on a tiny model: the composed factors are Σ c ΔW (dense oracle), the
hooked model during the fit is the base model with that ΔW written into its weights, the fit
lowers the loss it minimises, stays within its token budget and leaves the model untouched."""

import pytest
import torch
from conftest import load_tiny, make_adapter
from test_compose_methods import IDS, logits_with_delta

from lorasum.adapters import read_adapter
from lorasum.data import load_split, make_batches, tokenize_split
from lorasum.errors import LorasumError
from lorasum.factors import single_threaded
from lorasum.methods.calibrated import (
    _hook_modules,
    budget_report,
    coefficient_budget,
    compose_with_coefficients,
    fit_calibrated,
    fit_coefficients,
    group_of,
)
from lorasum.models import load_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _one_thread():
    with single_threaded():
        yield


@pytest.fixture(scope="module")
def setup(tiny_llama, qa_files, tmp_path_factory):
    d = tmp_path_factory.mktemp("calibrated")
    adapters = [
        read_adapter(make_adapter(tiny_llama, d / n, r=2, seed=i)).modules
        for i, n in enumerate("ab")
    ]
    tok = load_tokenizer(str(tiny_llama))
    sources = [load_split(str(qa_files[n]), 42) for n in ("arith", "colors")]
    items = tokenize_split(tok, sources, "val", 32)
    batches = make_batches(items, 4, tok.pad_token_id, shuffle=False)
    return adapters, batches


def _dense(modules):
    return {m: f.scale * f.B.double() @ f.A.double() for m, f in modules.items()}


def test_composed_factors_are_the_coefficient_weighted_sum(setup):
    adapters, _ = setup
    coefficients = {"q_proj": [0.5, 2.0], "k_proj": [1.0, -1.0], "v_proj": [0.0, 1.0]}
    coefficients |= {"o_proj": [1.5, 0.25], "down_proj": [1.0, 1.0]}
    got = _dense(compose_with_coefficients(adapters, coefficients, "type"))
    each = [_dense(a) for a in adapters]
    for m, d in got.items():
        c = coefficients[group_of(m, "type")]
        want = c[0] * each[0][m] + c[1] * each[1][m]
        assert torch.allclose(d, want, rtol=1e-5, atol=1e-6)


def test_fit_lowers_its_loss_within_budget_and_matches_the_written_adapter(setup, tiny_llama):
    adapters, batches = setup
    model = load_tiny(tiny_llama)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = sum(int(b.attention_mask.sum()) for b in batches)
    budget = 3 * tokens  # three passes over the validation batches
    fit = fit_coefficients(model, adapters, batches, budget, lr=0.1)
    assert 0 < fit.tokens <= budget and fit.steps >= len(batches)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    assert all(p.requires_grad for p in model.parameters())
    # the loss of the first pass vs the last full pass over the same batches
    n = len(batches)
    first, last = (
        sum(fit.losses[:n]),
        sum(fit.losses[(fit.steps // n - 1) * n : fit.steps // n * n]),
    )
    assert last < first
    assert set(fit.coefficients) == {"q_proj", "k_proj", "v_proj", "o_proj", "down_proj"}
    # the coefficients' adapter acts as the written ΔW: no fit step at lr 0 gives the sum
    still = fit_coefficients(load_tiny(tiny_llama), adapters, batches[:1], budget, lr=0.0)
    assert all(c == [1.0, 1.0] for c in still.coefficients.values())
    summed = {
        m: d0 + d1
        for (m, d0), d1 in zip(
            _dense(adapters[0]).items(), _dense(adapters[1]).values(), strict=True
        )
    }
    composed = _dense(still.modules)
    assert all(torch.allclose(composed[m], summed[m], rtol=1e-5, atol=1e-6) for m in summed)
    # the model the fit optimised (base + hooks) is the base model with the composed ΔW written
    groups = sorted(fit.coefficients)
    index = {m: groups.index(group_of(m, "type")) for m in fit.modules}
    coeffs = torch.tensor([fit.coefficients[g] for g in groups])
    hooked = load_tiny(tiny_llama)
    handles = _hook_modules(hooked, adapters, index, coeffs)
    try:
        with torch.no_grad():
            got = hooked(input_ids=IDS).logits
    finally:
        for h in handles:
            h.remove()
    expected = logits_with_delta(tiny_llama, {m: d.float() for m, d in _dense(fit.modules).items()})
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    report = budget_report(fit, training_tokens=100 * tokens)
    assert report["category"] == "calibrated" and report["fraction"] == pytest.approx(
        fit.tokens / (100 * tokens)
    )


def test_budget_and_refusals(setup, tiny_llama):
    adapters, batches = setup
    assert coefficient_budget(20_000) == 200
    with pytest.raises(LorasumError, match="budget fraction"):
        coefficient_budget(100, 0.0)
    # a budget below one batch takes no step: the coefficients stay 1 (the sum)
    fit = fit_coefficients(load_tiny(tiny_llama), adapters, batches, max_tokens=1)
    assert fit.steps == 0 and fit.tokens == 0 and "note" in fit.info
    assert all(c == 1.0 for cs in fit.coefficients.values() for c in cs)
    with pytest.raises(LorasumError, match="no validation rows"):
        fit_coefficients(load_tiny(tiny_llama), adapters, [], max_tokens=100)
    with pytest.raises(LorasumError, match="unknown coefficient granularity"):
        group_of("model.layers.0.self_attn.q_proj", "row")


def test_fit_calibrated_keeps_to_one_percent_of_merged_training(tiny_llama, qa_files, setup):
    adapters, _ = setup
    tok = load_tokenizer(str(tiny_llama))
    sources = [load_split(str(qa_files[n]), 42) for n in ("arith", "colors")]
    fit, report = fit_calibrated(load_tiny(tiny_llama), tok, adapters, sources, 20_000)
    assert report["max_tokens"] == 200 and 0 < report["tokens"] <= 200
    assert report["fraction"] <= 0.01 and report["steps"] == fit.steps >= 1


def _mean_nll(model, adapters, batches, coefficients: dict, granularity: str) -> float:
    """Answer-token NLL per counted token of ``batches`` with Σ c ΔW hooked into the model."""
    from lorasum.evaluate import token_nll

    groups = sorted(coefficients)
    names = sorted(set().union(*(a.keys() for a in adapters)))
    index = {m: groups.index(group_of(m, granularity)) for m in names}
    coeffs = torch.tensor([coefficients[g] for g in groups])
    handles = _hook_modules(model, adapters, index, coeffs)
    try:
        with torch.no_grad():
            parts = [token_nll(model, b) for b in batches]
    finally:
        for h in handles:
            h.remove()
    return float(sum(n.sum() for n, _ in parts) / sum(c.sum() for _, c in parts))


def test_learned_fits_per_layer_on_its_rows_and_does_not_lose_to_the_sum(
    setup, tiny_llama, qa_files
):
    """`learned`: one coefficient per layer and adapter, fitted on the first K validation rows
    of each domain (never the test split); the folded adapter is Σ c·s·B·A (dense oracle), and
    on its own rows its loss is no higher than the sum's (coefficients all 1)."""
    from lorasum.methods.calibrated import _interleaved_batches, fit_learned

    adapters, _ = setup
    tok = load_tokenizer(str(tiny_llama))
    sources = [load_split(str(qa_files[n]), 42) for n in ("arith", "colors")]
    for s, n in zip(sources, ("arith", "colors"), strict=True):
        s.name = n
    model = load_tiny(tiny_llama)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit, report = fit_learned(
        model, tok, adapters, sources, 10_000, rows=3, epochs=5, max_length=32, lr=0.1
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    layers = model.config.num_hidden_layers
    assert set(fit.coefficients) == {str(i) for i in range(layers)}
    assert all(len(c) == 2 for c in fit.coefficients.values())
    assert report["rows_per_domain"] == {"arith": 3, "colors": 3} and report["split"] == "val"
    batches = _interleaved_batches(tok, sources, 32, 4, rows=3)
    assert sum(b.input_ids.shape[0] for b in batches) == 6 and fit.steps == 5 * len(batches)
    assert report["tokens"] == 5 * sum(int(b.attention_mask.sum()) for b in batches)
    assert report["fraction"] == pytest.approx(report["tokens"] / 10_000)
    # folded into the factors: ΔW_m = Σ_i c_{layer(m),i} s_i B_i A_i
    got, each = _dense(fit.modules), [_dense(a) for a in adapters]
    for m, d in got.items():
        c = fit.coefficients[group_of(m, "layer")]
        want = c[0] * each[0][m] + c[1] * each[1][m]
        assert torch.allclose(d, want, rtol=1e-5, atol=1e-6)
    ones = {g: [1.0, 1.0] for g in fit.coefficients}
    summed = _mean_nll(model, adapters, batches, ones, "layer")
    learned = _mean_nll(model, adapters, batches, fit.coefficients, "layer")
    assert learned <= summed
    assert fit.losses[0] == pytest.approx(
        _mean_nll(model, adapters, batches[:1], ones, "layer"), rel=1e-5
    )  # the fit starts at the sum


@pytest.mark.parametrize(
    "options,message",
    [
        ({"rows": 0}, "rows 0: use a whole number >= 1"),
        ({"epochs": 1.5}, "epochs 1.5"),
        ({"granularity": "row"}, "granularity 'row'"),
        ({"lr": -1}, "lr -1"),
        ({"fraction": 0.1}, "unknown options ['fraction']"),
    ],
)
def test_learned_options_are_checked_in_one_line(options, message, tiny_llama, qa_files):
    from lorasum.study.config import resolve_study

    with pytest.raises(LorasumError, match=f"methods.learned: {message}".replace("[", r"\[")):
        resolve_study("tiny", None, {"methods": {"sum": {}, "learned": options}})


def test_learned_runs_in_a_study_with_its_cost_beside_retraining(tiny_llama, qa_files, tmp_path):
    import json

    from conftest import qa_domains

    from lorasum.study.reproduce import reproduce

    res = reproduce(
        tmp_path / "s",
        preset="tiny",
        model=str(tiny_llama),
        progress=False,
        domains=qa_domains(qa_files, 2),
        max_order=2,
        methods={"learned": {"rows": 2, "epochs": 2}},
    )
    [row] = res["combinations"]
    assert row["methods"]["learned"]["category"] == "calibrated"
    [fit] = res["budget"]["calibrated"]
    name = "+".join(row["domains"])
    assert fit["method"] == "learned" and fit["combination"] == name
    assert fit["merged_training_tokens"] > 0 and 0 < fit["fraction"] < 1
    marker = json.loads(
        (tmp_path / "s" / "seed-42" / "methods" / "learned" / name / "lorasum.json").read_text()
    )
    assert marker["method"] == "learned" and marker["budget"]["epochs"] == 2
    assert set(marker["budget"]["coefficient_values"]) == {"0", "1"}  # the tiny model's layers
