"""Merge methods against dense oracles on random factors (hypothesis, small shapes).

Oracles: the dense weighted sum; the dense SVD (Eckart–Young tail energy); PEFT's
`merge_utils` on the dense ΔW_i; TSV-M and Iso-C written densely from the papers.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorasum.errors import LorasumError
from lorasum.factors import LoraFactors, delta
from lorasum.methods import MergeConfig, MergeMethod, get_method, merge_adapters, register
from lorasum.methods.dare import module_seed
from lorasum.methods.registry import ModuleMerge

SETTINGS = settings(max_examples=25, deadline=None)


def rand_terms(d_out, d_in, ranks, seed, missing=()):
    """Random factors with non-zero A and B; indices in ``missing`` are absent (zero ΔW)."""
    g = torch.Generator().manual_seed(seed)
    terms = []
    for i, r in enumerate(ranks):
        scale = float(torch.rand((), generator=g)) * 3 + 0.2
        f = LoraFactors(
            torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), scale
        )
        terms.append(None if i in missing else f)
    return terms


def dense_terms(terms, shape):
    return [torch.zeros(shape) if t is None else delta(t.A, t.B, t.scale) for t in terms]


def dense_sum(terms, weights, shape) -> torch.Tensor:
    out = torch.zeros(shape, dtype=torch.float64)
    for d, w in zip(dense_terms(terms, shape), weights, strict=True):
        out += w * d.double()
    return out


def merged_dense(result: ModuleMerge) -> torch.Tensor:
    f = result.factors
    return delta(f.A, f.B, f.scale).double()


def run(method, terms, weights, **options) -> ModuleMerge:
    cfg = MergeConfig(method=method, **options)
    return get_method(method).merge(terms, weights, cfg, "layers.0.proj")


def close(got, expected, rtol=1e-4):
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(got, expected, rtol=0, atol=rtol * scale)


cases = st.tuples(
    st.integers(1, 10),  # d_out
    st.integers(1, 10),  # d_in
    st.lists(st.integers(1, 4), min_size=1, max_size=3),  # ranks
    st.integers(0, 10_000),  # seed
    st.lists(st.floats(-2.0, 2.0).filter(lambda w: abs(w) > 0.05), min_size=3, max_size=3),
)


@SETTINGS
@given(cases)
def test_sum_weighted_mean_equal_dense_weighted_sum(case):
    d_out, d_in, ranks, seed, ws = case
    shape = (d_out, d_in)
    terms = rand_terms(d_out, d_in, ranks, seed, missing={1} if len(ranks) > 2 else ())
    w = ws[: len(ranks)]
    expected = dense_sum(terms, w, shape)
    for method in ("sum", "weighted"):
        result = run(method, terms, w)
        close(merged_dense(result), expected)
        assert result.kept_energy == 1.0 and result.relative_error == 0.0
    mean = [1.0 / len(ranks)] * len(ranks)
    close(merged_dense(run("mean", terms, mean)), dense_sum(terms, mean, shape))


@SETTINGS
@given(cases, st.integers(1, 12))
def test_svd_is_exact_above_total_rank_and_eckart_young_below(case, rank):
    d_out, d_in, ranks, seed, ws = case
    shape = (d_out, d_in)
    terms = rand_terms(d_out, d_in, ranks, seed)
    w = ws[: len(ranks)]
    target = dense_sum(terms, w, shape)
    result = run("svd", terms, w, rank=rank)
    got = merged_dense(result)
    assert result.factors.rank == min(rank, sum(ranks), d_out, d_in)
    S = torch.linalg.svdvals(target)  # oracle spectrum
    total = float((S**2).sum())
    tail = float((S[rank:] ** 2).sum())  # best rank-K error² (Eckart–Young)
    err = float(((got - target) ** 2).sum())
    assert err == pytest.approx(tail, abs=1e-6 * max(total, 1.0))
    assert result.kept_energy == pytest.approx(1 - tail / total, abs=1e-6)
    assert result.relative_error == pytest.approx(math.sqrt(tail / total), abs=1e-4)
    if rank >= sum(ranks):
        close(got, target)
        assert result.relative_error < 1e-5


@SETTINGS
@given(cases, st.sampled_from([0.5, 0.8, 0.95, 0.99, 1.0]))
def test_svd_rank_auto_keeps_the_smallest_rank_reaching_keep(case, keep):
    d_out, d_in, ranks, seed, ws = case
    terms = rand_terms(d_out, d_in, ranks, seed)
    w = ws[: len(ranks)]
    S = torch.linalg.svdvals(dense_sum(terms, w, (d_out, d_in)))
    kept = torch.cumsum(S**2, 0) / (S**2).sum()
    result = run("svd", terms, w, rank="auto", keep=keep)
    k = result.factors.rank
    assert result.kept_energy >= keep - 1e-6
    if k > 1:  # one direction less would not reach keep
        assert float(kept[k - 2]) < keep + 1e-6


def peft_merge(name, deltas, w, **kwargs):
    from peft.utils import merge_utils

    return getattr(merge_utils, name)(deltas, torch.tensor(w, dtype=torch.float32), **kwargs)


dense_cases = st.tuples(
    st.integers(2, 8),
    st.integers(2, 8),
    st.lists(st.integers(1, 3), min_size=2, max_size=3),
    st.integers(0, 10_000),
    st.lists(st.floats(-2.0, 2.0).filter(lambda w: abs(w) > 0.05), min_size=3, max_size=3),
    st.sampled_from([0.1, 0.3, 0.5, 0.9]),
    st.sampled_from(["total", "frequency"]),
)


@SETTINGS
@given(dense_cases)
def test_ties_dare_magnitude_equal_peft_merge_utils(case):
    d_out, d_in, ranks, seed, ws, density, sign = case
    shape = (d_out, d_in)
    terms = rand_terms(d_out, d_in, ranks, seed, missing={0} if len(ranks) == 3 else ())
    w = ws[: len(ranks)]
    deltas = dense_terms(terms, shape)
    full = min(shape)  # rank ≥ min(d_out, d_in): the re-compression is exact
    expected = {
        "ties": peft_merge("ties", deltas, w, density=density, majority_sign_method=sign),
        "magnitude_prune": peft_merge("magnitude_prune", deltas, w, density=density),
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(module_seed(7, "layers.0.proj"))
        expected["dare_linear"] = peft_merge("dare_linear", deltas, w, density=density)
        torch.manual_seed(module_seed(7, "layers.0.proj"))
        expected["dare_ties"] = peft_merge(
            "dare_ties", deltas, w, density=density, majority_sign_method=sign
        )
    options = {
        "ties": {"majority_sign": sign},
        "magnitude_prune": {},
        "dare_linear": {"seed": 7},
        "dare_ties": {"seed": 7, "majority_sign": sign},
    }
    for method, want in expected.items():
        want = want.double()
        assert want.abs().max() > 0 or density < 0.3  # not vacuous
        exact = run(method, terms, w, density=density, rank=full, **options[method])
        close(merged_dense(exact), want)
        # default rank Σr: the best rank-Σr approximation of PEFT's dense result
        truncated = run(method, terms, w, density=density, **options[method])
        S = torch.linalg.svdvals(want)
        k = min(sum(r for r, t in zip(ranks, terms, strict=True) if t is not None), full)
        tail = float((S[k:] ** 2).sum())
        err = float(((merged_dense(truncated) - want) ** 2).sum())
        assert err == pytest.approx(tail, abs=1e-5 * max(float((S**2).sum()), 1.0))


@SETTINGS
@given(cases)
def test_dare_linear_at_density_one_equals_weighted(case):
    d_out, d_in, ranks, seed, ws = case
    terms = rand_terms(d_out, d_in, ranks, seed)
    w = ws[: len(ranks)]
    got = run("dare_linear", terms, w, density=1.0, rank=min(d_out, d_in))
    close(merged_dense(got), dense_sum(terms, w, (d_out, d_in)))


def test_dare_masks_are_seeded_per_module_and_leave_the_global_rng_alone():
    terms = rand_terms(6, 5, [2, 3], seed=3)
    state = torch.random.get_rng_state()
    a = merged_dense(run("dare_linear", terms, [1.0, 1.0], density=0.5, seed=1))
    assert torch.equal(torch.random.get_rng_state(), state)
    b = merged_dense(run("dare_linear", terms, [1.0, 1.0], density=0.5, seed=1))
    c = merged_dense(run("dare_linear", terms, [1.0, 1.0], density=0.5, seed=2))
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-3
    assert module_seed(1, "x.q_proj") != module_seed(1, "x.k_proj")


# --- TSV and Iso-C: dense references written from the papers ----------------------------------


def tsv_reference(deltas, k_per_task, alpha):
    """TSV-M (arXiv 2412.00081): per-task top-k SVD, concatenate, orthogonalise (P Qᵀ), rebuild."""
    Us, Ss, Vs = [], [], []
    for d in deltas:
        U, S, Vh = torch.linalg.svd(d.double(), full_matrices=False)
        k = min(k_per_task, int(S.gt(1e-6 * S[0]).sum())) if S[0] > 0 else 0
        Us.append(U[:, :k])
        Ss.append(S[:k])
        Vs.append(Vh[:k].T)
    U, S, V = torch.cat(Us, 1), torch.cat(Ss), torch.cat(Vs, 1)
    P, _, Qh = torch.linalg.svd(U, full_matrices=False)
    Pv, _, Qvh = torch.linalg.svd(V, full_matrices=False)
    return alpha * (P @ Qh) @ torch.diag(S) @ (Pv @ Qvh).T


def iso_reference(total, n_directions, alpha):
    """Iso-C (arXiv 2502.04959): σ̄·U Vᵀ over the non-zero spectrum of the task-arithmetic sum."""
    U, S, Vh = torch.linalg.svd(total, full_matrices=False)
    k = n_directions
    return alpha * S[:k].mean() * U[:, :k] @ Vh[:k]


tall_cases = st.tuples(
    st.integers(9, 14),
    st.integers(9, 14),
    st.lists(st.integers(1, 3), min_size=1, max_size=3),
    st.integers(0, 10_000),
    st.lists(st.floats(-2.0, 2.0).filter(lambda w: abs(w) > 0.05), min_size=3, max_size=3),
    st.floats(-2.0, 2.0),
)


@SETTINGS
@given(tall_cases, st.sampled_from([None, 1, 2]))
def test_tsv_equals_dense_reference(case, task_rank):
    d_out, d_in, ranks, seed, ws, alpha = case
    shape = (d_out, d_in)
    terms = rand_terms(d_out, d_in, ranks, seed)
    w = ws[: len(ranks)]
    deltas = [wi * d.double() for wi, d in zip(w, dense_terms(terms, shape), strict=True)]
    k = task_rank if task_rank is not None else min(shape) // len(ranks)
    expected = tsv_reference(deltas, k, alpha)
    options = {"method_scale": alpha} | ({"task_rank": task_rank} if task_rank else {})
    result = run("tsv", terms, w, **options)
    close(merged_dense(result), expected)
    assert result.factors.rank == sum(min(k, r) for r in ranks)


@SETTINGS
@given(tall_cases)
def test_iso_equals_dense_reference(case):
    d_out, d_in, ranks, seed, ws, alpha = case
    terms = rand_terms(d_out, d_in, ranks, seed)
    w = ws[: len(ranks)]
    total = dense_sum(terms, w, (d_out, d_in))
    n = sum(ranks)  # random factors, Σr ≤ 9 ≤ min(d): the sum has exactly Σr non-zero σ
    result = run("iso", terms, w, method_scale=alpha)
    close(merged_dense(result), iso_reference(total, n, alpha))
    assert result.factors.rank == n
    S = torch.linalg.svdvals(merged_dense(result))[:n]  # isotropic: one singular value
    assert float(S.max() - S.min()) < 1e-4 * max(1.0, float(S.max()))


def test_iso_ignores_repeated_directions():
    """Two copies of one adapter: the sum has rank r, not 2r; no arbitrary direction is added."""
    (f,) = rand_terms(8, 7, [2], seed=1)
    result = run("iso", [f, f], [1.0, 1.0])
    assert result.factors.rank == 2
    total = 2 * delta(f.A, f.B, f.scale).double()
    close(merged_dense(result), iso_reference(total, 2, 1.0))


def test_tsv_and_iso_truncate_with_rank():
    terms = rand_terms(12, 10, [3, 3], seed=2)
    for method in ("tsv", "iso"):
        result = run(method, terms, [1.0, 1.0], rank=2)
        assert result.factors.rank == 2 and 0 < result.kept_energy < 1
    iso = run("iso", terms, [1.0, 1.0], rank=3)
    assert iso.kept_energy == pytest.approx(3 / 6)  # isotropic: every direction weighs the same


# --- the engine and the registry ----------------------------------------------------------------


def test_engine_pads_to_one_rank_and_treats_missing_modules_as_zero():
    a = {"m.0.q": rand_terms(5, 4, [2], 1)[0], "m.0.v": rand_terms(3, 4, [1], 2)[0]}
    b = {"m.0.q": rand_terms(5, 4, [3], 3)[0]}
    result = merge_adapters([a, b], [1.0, -0.5], MergeConfig(method="sum", pad_rank_to=8))
    assert result.needed_rank == 5 and result.rank == 8
    assert {f.rank for f in result.modules.values()} == {8}
    close(
        merged_dense(ModuleMerge(result.modules["m.0.v"])), dense_sum([a["m.0.v"]], [1.0], (3, 4))
    )
    expected_q = dense_sum([a["m.0.q"], b["m.0.q"]], [1.0, -0.5], (5, 4))
    close(merged_dense(ModuleMerge(result.modules["m.0.q"])), expected_q)
    with pytest.raises(
        LorasumError, match=r"--pad-rank-to 4 is below the rank this merge needs \(5\)"
    ):
        merge_adapters([a, b], [1.0, 1.0], MergeConfig(method="sum", pad_rank_to=4))


def test_registry_lists_known_names_and_refuses_duplicates():
    with pytest.raises(LorasumError) as e:
        get_method("tiez")
    assert "tiez" in str(e.value)
    for name in ("sum", "weighted", "mean", "svd", "ties", "dare_linear", "tsv", "iso"):
        assert name in str(e.value)
    with pytest.raises(ValueError, match="already registered"):
        register(MergeMethod(name="sum", merge=lambda *a: None, summary="again"))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"method": "nope"}, "unknown merge method 'nope'; choose one of: sum, weighted"),
        ({"method": "sum", "rank": 4}, "--rank does not apply to sum"),
        ({"method": "svd"}, "svd needs --rank K"),
        ({"method": "ties"}, "ties needs --density"),
        ({"method": "ties", "density": 1.5}, "--density 1.5: must be in (0, 1]"),
        ({"method": "svd", "rank": "big"}, "--rank 'big': expected an integer or 'auto'"),
        ({"method": "svd", "rank": 4, "keep": 0.9}, "--keep only applies with --rank auto"),
        ({"method": "ties", "density": 0.2, "majority_sign": "max"}, "--majority-sign 'max'"),
        ({"method": "iso", "seed": 3}, "--seed does not apply to iso"),
        ({"method": "sum", "pad_rank_to": 0}, "--pad-rank-to 0: must be ≥ 1"),
    ],
)
def test_merge_config_refuses_with_one_clear_line(options, message):
    with pytest.raises(LorasumError) as e:
        MergeConfig(**options)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_merge_config_reports_every_problem_at_once():
    with pytest.raises(LorasumError) as e:
        MergeConfig(method="ties", density=2.0, seed=1, method_scale=float("nan"))
    msg = str(e.value)
    assert "--density 2.0" in msg and "--seed does not apply" in msg and "--method-scale" in msg


def test_resolved_options_fill_in_method_defaults():
    assert MergeConfig(method="dare_ties", density=0.3).resolved() == {
        "method": "dare_ties",
        "density": 0.3,
        "majority_sign": "total",
        "rank": None,
        "seed": 0,
        "pad_rank_to": None,
    }
    assert MergeConfig(method="svd", rank="auto").resolved()["keep"] == 0.99


def test_factored_merges_run_single_threaded_and_restore_the_setting():
    from lorasum.factors import single_threaded

    before = torch.get_num_threads()
    seen = []
    with single_threaded():
        seen.append(torch.get_num_threads())
    assert seen == [1] and torch.get_num_threads() == before
    a = {"m.0.q": rand_terms(6, 5, [2], 1)[0]}
    merge_adapters([a, a], [1.0, 1.0], MergeConfig(method="svd", rank=2))
    assert torch.get_num_threads() == before
