"""Interference-aware merges and predictors: factored results against dense references written
from their definitions, the properties each method claims, and the predictors against the same
quantities computed from raw activations of a tiny model."""

import itertools

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize
import torch
from conftest import load_tiny, make_adapter

from lorasum.adapters import read_adapter
from lorasum.analysis.calibration import calibrate
from lorasum.analysis.predictors.activation import combination_predictors, interference_predictors
from lorasum.data import load_split, tokenize_split
from lorasum.errors import LorasumError
from lorasum.factors import LoraFactors, activation_inner, single_threaded
from lorasum.methods import MergeConfig, get_method, merge_adapters
from lorasum.methods.shiftmatch import RIDGE, bounded_coefficients

D_OUT, D_IN, N = 10, 12, 3


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny forward passes: threaded BLAS only stalls when another job holds a core."""
    with single_threaded():
        yield


def _factors(seed: int, r: int = 2, rows: torch.Tensor | None = None) -> LoraFactors:
    """Random LoRA factors; ``rows`` (d_in, k): A's rows drawn inside that subspace."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, D_IN, generator=g, dtype=torch.float64)
    if rows is not None:
        A = torch.randn(r, rows.shape[1], generator=g, dtype=torch.float64) @ rows.T
    B = torch.randn(D_OUT, r, generator=g, dtype=torch.float64)
    return LoraFactors(A=A.float(), B=B.float(), scale=0.5 + seed % 3)


def _gram(seed: int, basis: torch.Tensor | None = None, n: int = 300) -> torch.Tensor:
    """Per-token Gram matrix of random inputs inside span(basis) (default: all of R^d_in)."""
    g = torch.Generator().manual_seed(100 + seed)
    basis = torch.eye(D_IN, dtype=torch.float64) if basis is None else basis
    k = basis.shape[1]
    coefficients = torch.randn(k, n, generator=g, dtype=torch.float64)
    coefficients *= torch.linspace(0.5, 2.0, k, dtype=torch.float64)[:, None]  # unequal spread
    X = basis @ coefficients  # (d_in, n), inside span(basis)
    return X @ X.T / n


def _dense(f: LoraFactors) -> torch.Tensor:
    return f.scale * f.B.double() @ f.A.double()  # (d_out, d_in)


def _merged(method: str, terms, grams, **options) -> torch.Tensor:
    result = merge_adapters(
        [{"m": t} for t in terms],
        [1.0] * len(terms),
        MergeConfig(method=method, **options),
        [{"m": g} for g in grams],
    )
    f = result.modules["m"]
    return f.scale * f.B.double() @ f.A.double()


def regmean_reference(deltas, grams, alpha: float) -> torch.Tensor:
    """RegMean from its definition: (Σ ΔW_i Ĝ_i)(Σ Ĝ_j + λI)⁻¹, Ĝ shrunk by α, dense."""
    shrunk = [alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g)) for g in grams]
    M = sum(shrunk)
    M = M + 1e-6 * torch.trace(M) * torch.eye(M.shape[0], dtype=M.dtype)
    return sum(d @ g for d, g in zip(deltas, shrunk, strict=True)) @ torch.linalg.inv(M)


def projection_reference(deltas, grams, ratio: float) -> tuple[torch.Tensor, list[int]]:
    """orthogonal_projection from its docstring, with scipy's generalised eigensolver."""
    total, kept = torch.zeros_like(deltas[0]), []
    for j, d in enumerate(deltas):
        own = grams[j].numpy()
        others = sum(grams[i] for i in range(len(grams)) if i != j).numpy() / (len(grams) - 1)
        M = own + others
        M = M + 1e-6 * np.trace(M) * np.eye(M.shape[0])
        mu, V = scipy.linalg.eigh(own, M)  # own v = μ M v, Vᵀ M V = I
        K = mu > 1 / (1 + ratio)
        kept.append(int(K.sum()))
        P = M @ V[:, K] @ V[:, K].T
        total += d @ torch.from_numpy(P)
    return total, kept


# The properties hold up to the ridge λ = 1e-6·tr(M) (relative bias ≈ λ / smallest eigenvalue).
PROPERTY_RTOL = 3e-4


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    err = float((a - b).norm() / b.norm())
    assert err < rtol, err


@pytest.mark.parametrize("alpha", [0.9, 0.5, 1.0])
def test_factored_regmean_equals_dense_regmean(alpha):
    terms = [_factors(i) for i in range(N)]
    grams = [
        _gram(i) + 0.3 * _gram(10 + i, torch.randn(D_IN, 3, dtype=torch.float64)) for i in range(N)
    ]
    reference = regmean_reference([_dense(t) for t in terms], grams, alpha)
    _close(_merged("regmean", terms, grams, regmean_alpha=alpha), reference)
    _close(_merged("regmean_rescaled", terms, grams, regmean_alpha=alpha), N * reference)


def test_regmean_with_identical_grams_is_the_mean_and_rescaled_the_sum():
    terms = [_factors(i) for i in range(N)]
    grams = [_gram(0)] * N
    total = sum(_dense(t) for t in terms)
    _close(_merged("regmean", terms, grams), total / N, PROPERTY_RTOL)
    _close(_merged("regmean_rescaled", terms, grams), total, PROPERTY_RTOL)


def test_regmean_on_disjoint_input_subspaces_is_the_sum():
    # domain i's inputs and adapter i's rows live on coordinates 4i..4i+3 (the diagonal
    # shrinkage keeps coordinate blocks apart)
    eye = torch.eye(D_IN, dtype=torch.float64)
    blocks = [eye[:, 4 * i : 4 * i + 4] for i in range(N)]
    terms = [_factors(i, rows=blocks[i]) for i in range(N)]
    grams = [_gram(i, blocks[i]) for i in range(N)]
    total = sum(_dense(t) for t in terms)
    _close(_merged("regmean", terms, grams), total, PROPERTY_RTOL)
    _close(_merged("regmean_rescaled", terms, grams), N * total, PROPERTY_RTOL)


@pytest.mark.parametrize("ratio", [4.0, 1.5])
def test_orthogonal_projection_equals_its_dense_definition(ratio):
    # each domain: a shared part plus a few directions of its own
    shared = torch.randn(D_IN, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    grams = [
        _gram(i, shared)
        + 3 * _gram(20 + i, torch.eye(D_IN, dtype=torch.float64)[:, 3 * i : 3 * i + 3])
        + 1e-3 * torch.eye(D_IN, dtype=torch.float64)
        for i in range(N)
    ]
    terms = [_factors(i, r=3) for i in range(N)]
    reference, kept = projection_reference([_dense(t) for t in terms], grams, ratio)
    assert all(0 < k < D_IN for k in kept), kept  # some directions kept, some dropped
    _close(_merged("orthogonal_projection", terms, grams, projection_ratio=ratio), reference)


def test_orthogonal_projection_acts_as_each_adapter_on_its_own_domain():
    # disjoint but not coordinate-aligned input subspaces; adapters read everywhere
    Q, _ = torch.linalg.qr(
        torch.randn(D_IN, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    )
    bases = [Q[:, 4 * i : 4 * i + 4] for i in range(N)]
    terms = [_factors(i) for i in range(N)]
    grams = [_gram(i, bases[i]) for i in range(N)]
    merged = _merged("orthogonal_projection", terms, grams)
    total = sum(_dense(t) for t in terms)
    for i in range(N):
        X = bases[i] @ torch.randn(4, 50, dtype=torch.float64)  # domain i's inputs
        _close(merged @ X, _dense(terms[i]) @ X, PROPERTY_RTOL)
        assert float((total @ X - _dense(terms[i]) @ X).norm()) > 0.1 * float(
            (_dense(terms[i]) @ X).norm()
        )  # the plain sum has cross-talk there


def test_orthogonal_projection_keeps_the_sum_where_inputs_coincide():
    terms = [_factors(i) for i in range(N)]
    grams = [_gram(0)] * N  # full rank, identical
    _close(
        _merged("orthogonal_projection", terms, grams), sum(_dense(t) for t in terms), PROPERTY_RTOL
    )


def soft_reference(deltas, grams) -> torch.Tensor:
    """soft_projection from its docstring: Σ ΔW_j M V diag(min(1, Nμ)) Vᵀ, scipy's eigensolver."""
    n = len(grams)
    M = sum(grams).numpy()
    M = M + 1e-6 * np.trace(M) * np.eye(M.shape[0])
    total = torch.zeros_like(deltas[0])
    for d, g in zip(deltas, grams, strict=True):
        mu, V = scipy.linalg.eigh(g.numpy(), M)  # Ĝ_j v = μ M v, Vᵀ M V = I
        f = np.clip(n * mu, 0.0, 1.0)
        total += d @ torch.from_numpy(M @ V @ np.diag(f) @ V.T)
    return total


def _shared_plus_own_grams() -> list[torch.Tensor]:
    """Each domain: a shared part plus a few input directions of its own."""
    shared = torch.randn(D_IN, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    eye = torch.eye(D_IN, dtype=torch.float64)
    return [
        _gram(i, shared) + 3 * _gram(20 + i, eye[:, 3 * i : 3 * i + 3]) + 1e-3 * eye
        for i in range(N)
    ]


def test_soft_projection_equals_its_dense_definition():
    grams = _shared_plus_own_grams()
    terms = [_factors(i, r=3) for i in range(N)]
    reference = soft_reference([_dense(t) for t in terms], grams)
    merged = _merged("soft_projection", terms, grams)
    _close(merged, reference)
    # neither the sum nor rescaled RegMean (α = 1) here: the cap binds on some directions only
    total = sum(_dense(t) for t in terms)
    rescaled = N * regmean_reference([_dense(t) for t in terms], grams, 1.0)
    assert float((merged - total).norm()) > 1e-2 * float(total.norm())
    assert float((merged - rescaled).norm()) > 1e-2 * float(total.norm())


def test_soft_projection_is_the_sum_on_shared_inputs_and_each_adapter_on_its_own():
    terms = [_factors(i) for i in range(N)]
    total = sum(_dense(t) for t in terms)
    _close(_merged("soft_projection", terms, [_gram(0)] * N), total, PROPERTY_RTOL)
    Q, _ = torch.linalg.qr(
        torch.randn(D_IN, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    )
    bases = [Q[:, 4 * i : 4 * i + 4] for i in range(N)]
    merged = _merged("soft_projection", terms, [_gram(i, bases[i]) for i in range(N)])
    for i in range(N):
        X = bases[i] @ torch.randn(4, 50, dtype=torch.float64)
        _close(merged @ X, _dense(terms[i]) @ X, PROPERTY_RTOL)


def _shift_k(deltas, grams) -> np.ndarray:
    n = len(deltas)
    return np.array(
        [
            [float(torch.trace(deltas[j] @ grams[i] @ deltas[i].T)) for j in range(n)]
            for i in range(n)
        ]
    )


def _shift_inputs(seed: int = 5):
    """Raw inputs per domain (d_in, n): a shared part plus directions of its own."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(D_IN, 3, dtype=torch.float64, generator=g)
    eye = torch.eye(D_IN, dtype=torch.float64)
    return [
        shared @ torch.randn(3, 200, generator=g, dtype=torch.float64)
        + eye[:, 3 * i : 3 * i + 3] @ torch.randn(3, 200, generator=g, dtype=torch.float64)
        for i in range(N)
    ]


def _repeating(scales) -> list[LoraFactors]:
    """Adapters that all repeat part of one shift (the sum overshoots it)."""
    common = _factors(50, r=2)
    return [
        LoraFactors(A=torch.cat([t.A, common.A]), B=torch.cat([t.B, common.B], dim=1), scale=s)
        for t, s in zip((_factors(i, r=2) for i in range(N)), scales, strict=True)
    ]


def test_shift_match_keeps_each_domains_own_shift_exactly():
    X = _shift_inputs()
    grams = [x @ x.T / x.shape[1] for x in X]
    terms = _repeating([1.0] * N)
    deltas = [_dense(t) for t in terms]
    K = _shift_k(deltas, grams)
    c = np.linalg.solve(K, np.diag(K))  # the definition, where it is inside the bounds
    assert np.all((c > 0) & (c < 1)), c
    merged = _merged("shift_match", terms, grams)
    _close(merged, sum(float(ci) * d for ci, d in zip(c, deltas, strict=True)), 1e-5)
    total = sum(deltas)
    for i in range(N):  # the defining property, on the raw activations
        own = deltas[i] @ X[i]
        got = float((merged @ X[i] * own).sum())
        assert got == pytest.approx(float((own * own).sum()), rel=1e-5)
        assert float((total @ X[i] * own).sum()) > 1.05 * float((own * own).sum())  # overshoot


def test_shift_match_bounded_where_the_exact_solution_would_flip_an_adapter():
    X = _shift_inputs()
    grams = [x @ x.T / x.shape[1] for x in X]
    terms = _repeating([0.5, 1.5, 2.5])  # adapter 1's shift is repeated 2–3× by the others
    deltas = [_dense(t) for t in terms]
    K = _shift_k(deltas, grams)
    assert np.linalg.solve(K, np.diag(K)).min() < 0
    beta = K / np.diag(K)[:, None]

    def objective(c):  # the docstring's bounded least squares, by another solver
        return float(((beta @ c - 1) ** 2).sum() + 1e-6 * ((c - 1) ** 2).sum())

    best = scipy.optimize.minimize(
        objective,
        np.ones(N),
        bounds=[(0, N)] * N,
        method="L-BFGS-B",
        options={"ftol": 1e-15, "gtol": 1e-12},
    )
    merged = _merged("shift_match", terms, grams)
    _close(merged, sum(float(ci) * d for ci, d in zip(best.x, deltas, strict=True)), 1e-4)


def _active_set_oracle(beta: np.ndarray, upper: float) -> np.ndarray:
    """The bounded least squares by enumeration: every variable at 0, at ``upper`` or free
    (free ones by an unconstrained solve); the best feasible assignment. Exact for small N."""
    n = beta.shape[1]
    system = np.vstack([beta, np.sqrt(RIDGE) * np.eye(n)])
    target = np.concatenate([np.ones(beta.shape[0]), np.sqrt(RIDGE) * np.ones(n)])
    best, best_cost = None, np.inf
    for states in itertools.product((0, 1, 2), repeat=n):  # 0: lower, 1: upper, 2: free
        c = np.array([0.0 if st == 0 else upper for st in states])
        free = [k for k, st in enumerate(states) if st == 2]
        if free:
            rest = (
                target
                - system[:, [k for k in range(n) if k not in free]]
                @ c[[k for k in range(n) if k not in free]]
            )
            c[free] = np.linalg.lstsq(system[:, free], rest, rcond=None)[0]
            if np.any(c[free] < -1e-12) or np.any(c[free] > upper + 1e-12):
                continue
        cost = float(((system @ c - target) ** 2).sum())
        if cost < best_cost:
            best, best_cost = c, cost
    return best


@pytest.mark.parametrize("n", [2, 3, 4])
def test_shift_coefficients_solve_the_bounded_problem_exactly(n):
    rng = np.random.default_rng(n)
    active = 0
    for _ in range(60):
        beta = rng.uniform(-0.2, 1.5, size=(n, n))
        np.fill_diagonal(beta, 1.0)
        oracle = _active_set_oracle(beta, float(n))
        got = bounded_coefficients(beta, float(n))
        active += bool(np.any(oracle < 1e-9))
        np.testing.assert_allclose(got, oracle, atol=1e-6)
    assert active > 5  # the bounds matter in many of the draws


def test_shift_match_limits():
    eye = torch.eye(D_IN, dtype=torch.float64)
    blocks = [eye[:, 4 * i : 4 * i + 4] for i in range(N)]
    terms = [_factors(i, rows=blocks[i]) for i in range(N)]  # no cross-talk: the sum
    total = sum(_dense(t) for t in terms)
    _close(_merged("shift_match", terms, [_gram(i, blocks[i]) for i in range(N)]), total)
    same = [_factors(0)] * N  # identical adapters on identical inputs: the mean (= each one)
    _close(_merged("shift_match", same, [_gram(0)] * N), _dense(same[0]), 1e-5)
    with pytest.raises(LorasumError, match="drop --weights"):
        from lorasum.methods import resolve_weights

        resolve_weights(get_method("shift_match"), [1.0, 2.0], 2)


@pytest.mark.parametrize("method", ["soft_projection", "shift_match"])
def test_new_methods_skip_an_absent_adapter(method):
    eye = torch.eye(D_IN, dtype=torch.float64)
    terms = [_factors(0), None, _factors(2)]
    grams = [_gram(i) + _gram(5 + i, eye[:, :3]) for i in range(N)]
    deltas = [_dense(terms[0]), _dense(terms[2])]
    if method == "shift_match":  # no equation for the absent adapter's domain
        K = _shift_k(deltas, [grams[0], grams[2]])
        c = np.linalg.solve(K, np.diag(K))
        assert np.all((c > 0) & (c < 2)), c  # inside the bounds: the exact solution
        reference = sum(float(ci) * d for ci, d in zip(c, deltas, strict=True))
    else:  # its Ĝ still enters M (N = 3)
        reference = soft_reference(
            [deltas[0], torch.zeros(D_OUT, D_IN, dtype=torch.float64), deltas[1]], grams
        )
    _close(_merged(method, terms, grams), reference)


def test_shift_match_records_its_coefficients_per_module():
    """The recipe's per-module report carries c, in adapter order, None for an absent adapter;
    the values are the ones the defining solve gives (and the ones the merge applied)."""
    eye = torch.eye(D_IN, dtype=torch.float64)
    terms = [_factors(0), None, _factors(2)]
    grams = [_gram(i) + _gram(5 + i, eye[:, :3]) for i in range(N)]
    K = _shift_k([_dense(terms[0]), _dense(terms[2])], [grams[0], grams[2]])
    c = np.linalg.solve(K, np.diag(K))
    result = merge_adapters(
        [{"m": t} for t in terms],
        [1.0] * N,
        MergeConfig(method="shift_match"),
        [{"m": g} for g in grams],
    )
    got = result.report["m"]["coefficients"]
    assert got[1] is None and got[0] == pytest.approx(c[0], abs=1e-5)
    assert got[2] == pytest.approx(c[1], abs=1e-5) and abs(c[0] - 1) > 1e-3
    assert (
        "coefficients"
        not in merge_adapters(
            [{"m": t} for t in terms], [1.0] * N, MergeConfig(method="sum")
        ).report["m"]
    )


def test_missing_module_and_rank_option():
    eye = torch.eye(D_IN, dtype=torch.float64)
    terms = [_factors(0), None, _factors(2)]  # adapter 2 does not adapt the module
    grams = [_gram(i) + _gram(5 + i, eye[:, :3]) for i in range(N)]
    reference = regmean_reference(
        [_dense(terms[0]), torch.zeros(D_OUT, D_IN, dtype=torch.float64), _dense(terms[2])],
        grams,
        0.9,
    )
    _close(_merged("regmean", terms, grams), reference)
    full = _merged("regmean", terms, grams)
    S = torch.linalg.svdvals(full)
    low = _merged("regmean", terms, grams, rank=2)
    assert abs(float((full - low).norm()) - float(S[2:].norm())) < 1e-5 * float(S.norm())


def test_calibrated_methods_say_so_and_refuse_to_run_without_statistics():
    for name in (
        "regmean",
        "regmean_rescaled",
        "orthogonal_projection",
        "soft_projection",
        "shift_match",
    ):
        assert get_method(name).calibration
    assert not get_method("sum").calibration
    with pytest.raises(LorasumError, match="needs input statistics.*--calibration"):
        merge_adapters([{"m": _factors(0)}], [1.0], MergeConfig(method="regmean"))
    with pytest.raises(LorasumError, match="--regmean-alpha 1.5"):
        MergeConfig(method="regmean", regmean_alpha=1.5)
    with pytest.raises(LorasumError, match="--projection-ratio does not apply to regmean"):
        MergeConfig(method="regmean", projection_ratio=2.0)
    with pytest.raises(LorasumError, match="drop --weights"):
        from lorasum.methods import resolve_weights

        resolve_weights(get_method("regmean"), [1.0, 2.0], 2)


# --- predictors --------------------------------------------------------------------------------


def test_activation_inner_is_the_dense_trace():
    f1, f2 = _factors(0, r=3), _factors(1, r=2)
    G = _gram(0)
    dense = torch.trace(_dense(f1) @ G @ _dense(f2).T)
    assert activation_inner(f1, f2, G) == pytest.approx(float(dense), rel=1e-6)


@pytest.fixture(scope="module")
def two_domains(tiny_llama, qa_files, tmp_path_factory):
    d = tmp_path_factory.mktemp("interference")
    paths = {
        name: make_adapter(tiny_llama, d / name, seed=i, r=3)
        for i, name in enumerate(("arith", "colors"))
    }
    model = load_tiny(tiny_llama)
    from lorasum.models import load_tokenizer

    tok = load_tokenizer(str(tiny_llama))
    cal = {
        n: calibrate(p, [str(qa_files[n])], model=model, tokenizer=tok, max_length=32, cache=False)
        for n, p in paths.items()
    }
    return paths, cal, model, tok


def _raw_inputs(model, tok, source_file, modules) -> dict[str, torch.Tensor]:
    """Every module's inputs over the train split, one sequence at a time (no padding)."""
    src = load_split(str(source_file), 42)
    items = tokenize_split(tok, [src], "train", 32)
    collected = {m: [] for m in modules}
    hooks = [
        model.get_submodule(m).register_forward_hook(
            lambda mod, args, out, m=m: collected[m].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for m in modules
    ]
    try:
        with torch.inference_mode():
            for t, _ in items:
                model(input_ids=torch.tensor([t.input_ids]))
    finally:
        for h in hooks:
            h.remove()
    return {m: torch.cat(x).double() for m, x in collected.items()}  # (n, d_in)


def test_predictors_from_grams_equal_those_from_raw_activations(two_domains, qa_files):
    paths, cal, model, tok = two_domains
    factors = {n: read_adapter(p).modules for n, p in paths.items()}
    modules = sorted(factors["arith"])
    X = {n: _raw_inputs(model, tok, qa_files[n], modules) for n in paths}
    for n in paths:  # the calibration counted every non-padding token
        assert cal[n].tokens[modules[0]] == X[n][modules[0]].shape[0]
    result = interference_predictors(factors, cal)
    pair = result["pairs"][0]
    assert (pair["a"], pair["b"]) == ("arith", "colors")

    def out_energy(name_w, name_x, m):  # ‖ΔW X‖²_F / n, from raw inputs
        return (
            float((X[name_x][m] @ _dense(factors[name_w][m]).T).pow(2).sum())
            / X[name_x][m].shape[0]
        )

    num = sum(out_energy("colors", "arith", m) for m in modules)
    den = sum(out_energy("arith", "arith", m) for m in modules)
    assert pair["cross_talk_b_to_a"] == pytest.approx(num / den, rel=1e-4)
    assert result["cross_talk"][0][1] == pytest.approx(num / den, rel=1e-4)
    for m in modules:
        # activation cosine: outputs on both domains' inputs, each domain normalised per token
        Xa, Xb = X["arith"][m], X["colors"][m]
        ya = [Xs @ _dense(factors["arith"][m]).T / Xs.shape[0] ** 0.5 for Xs in (Xa, Xb)]
        yb = [Xs @ _dense(factors["colors"][m]).T / Xs.shape[0] ** 0.5 for Xs in (Xa, Xb)]
        a, b = torch.cat(ya).flatten(), torch.cat(yb).flatten()
        cos = float(a @ b / (a.norm() * b.norm()))
        assert pair["modules"][m]["activation_cosine"] == pytest.approx(cos, rel=1e-4, abs=1e-6)
        kappa = out_energy("arith", "colors", m) / out_energy("colors", "colors", m)
        assert pair["modules"][m]["cross_talk_a_to_b"] == pytest.approx(kappa, rel=1e-4)
    # overshoot β and orthogonal cross-talk κ⊥ from the concatenated raw outputs on arith
    own_out = torch.cat(
        [(X["arith"][m] @ _dense(factors["arith"][m]).T).flatten() for m in modules]
    )
    other_out = torch.cat(
        [(X["arith"][m] @ _dense(factors["colors"][m]).T).flatten() for m in modules]
    )
    beta = float(other_out @ own_out / (own_out @ own_out))
    residual = other_out - beta * own_out  # the part of colors' output arith's adapter lacks
    assert pair["overshoot_b_to_a"] == pytest.approx(beta, rel=1e-4, abs=1e-8)
    ortho = float(residual @ residual / (own_out @ own_out))
    assert pair["orthogonal_cross_talk_b_to_a"] == pytest.approx(ortho, rel=1e-4)
    assert result["overshoot"][0][1] == pair["overshoot_b_to_a"]
    combo = combination_predictors(result, ["arith", "colors"])
    assert combo["mean_overshoot"] == pytest.approx(
        (pair["overshoot_a_to_b"] + pair["overshoot_b_to_a"]) / 2
    )
    assert combo["rms_cosine"] == pytest.approx(pair["rms_cosine"])
    assert combo["max_cross_talk"] == max(pair["cross_talk_a_to_b"], pair["cross_talk_b_to_a"])


@pytest.mark.parametrize(
    "method", ["regmean", "regmean_rescaled", "orthogonal_projection", "soft_projection"]
)
def test_factorisations_are_reused_by_identity_only(method):
    """Modules sharing one Gram object (q/k/v) give what separate copies give; new objects,
    even at a reused address, are never served a cached factorisation."""
    from lorasum.methods.regmean import _FACTORED

    terms = [_factors(i, r=2) for i in range(N)]
    other = [_factors(10 + i, r=2) for i in range(N)]
    grams = [
        _gram(i) + 0.5 * _gram(30 + i, torch.eye(D_IN, dtype=torch.float64)[:, :3])
        for i in range(N)
    ]
    config = MergeConfig(method=method)
    adapters = [{"k": t, "q": o} for t, o in zip(terms, other, strict=True)]
    shared = merge_adapters(adapters, [1.0] * N, config, [{"k": g, "q": g} for g in grams])
    _FACTORED.clear()
    copies = [{"k": g.clone(), "q": g.clone()} for g in grams]
    separate = merge_adapters(adapters, [1.0] * N, config, copies)
    for m in ("k", "q"):
        a, b = shared.modules[m], separate.modules[m]
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
    # new values in new objects: the result follows them
    eye = torch.eye(D_IN, dtype=torch.float64)
    disjoint = [_gram(60 + i, eye[:, 4 * i : 4 * i + 4]) + 1e-3 * eye for i in range(N)]
    changed = [{"k": d, "q": g} for d, g in zip(disjoint, grams, strict=True)]
    got = merge_adapters(adapters, [1.0] * N, config, changed).modules["k"]
    _FACTORED.clear()
    fresh = merge_adapters(
        adapters, [1.0] * N, config, [{"k": c["k"].clone(), "q": c["q"]} for c in changed]
    )
    assert torch.equal(got.A, fresh.modules["k"].A)
    assert not torch.allclose(got.A, shared.modules["k"].A)


def test_predictors_read_from_the_cache_file_module_by_module_equal_those_in_memory(
    tiny_llama, qa_files, tmp_path
):
    """The study's predictors unit reads each domain's Ĝ from the calibration cache one module
    at a time (memory bounded by one module, not by the number of domains): the result must be
    bitwise the one from the Calibrations in memory, and each Ĝ read once per domain."""
    from lorasum.models import load_tokenizer

    model, tok = load_tiny(tiny_llama), load_tokenizer(str(tiny_llama))
    names = ("arith", "colors", "finance")
    paths = {n: make_adapter(tiny_llama, tmp_path / n, seed=i, r=3) for i, n in enumerate(names)}
    cal = {
        n: calibrate(p, [str(qa_files[n])], model=model, tokenizer=tok, max_length=32)
        for n, p in paths.items()
    }
    factors = {n: read_adapter(p).modules for n, p in paths.items()}
    in_memory = interference_predictors(factors, cal)
    reads: list[tuple[str, str]] = []

    class Counted(dict):
        def __init__(self, name, grams):
            super().__init__()
            self.name, self.grams = name, grams

        def __contains__(self, m):
            return m in self.grams

        def __getitem__(self, m):
            reads.append((self.name, m))
            return self.grams[m]

    lazy = {n: cal[n].per_token(from_file=True) for n in names}
    assert all(c.path is not None and c.path.is_file() for c in cal.values())
    assert type(lazy["arith"]).__name__ == "PerTokenGrams"
    from_file = interference_predictors(factors, {n: Counted(n, lazy[n]) for n in names})
    assert from_file == in_memory
    modules = sorted(factors["arith"])
    assert sorted(reads) == sorted((n, m) for n in names for m in modules)
    # a domain's statistics missing a module of the adapters: the same clear error as before
    short = {n: dict(itertools.islice(lazy[n].items(), 1)) for n in names}
    with pytest.raises(LorasumError, match="calibrate every adapter on the union"):
        interference_predictors(factors, short)
