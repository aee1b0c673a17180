"""The batched projection merges (one Cholesky per distinct M, whitenings and
eigendecompositions stacked) against the per-adapter dense computation they replaced, written
plainly here from the methods' definitions: random LoRA factors with non-zero B, several
shapes, full-rank, rank-deficient and overlapping input statistics, an absent adapter."""

import pytest
import torch

from lorasum.factors import LoraFactors
from lorasum.methods import MergeConfig, merge_adapters
from lorasum.methods.regmean import _FACTORED


def _ridged(M: torch.Tensor) -> torch.Tensor:
    return M + 1e-6 * torch.trace(M) * torch.eye(M.shape[0], dtype=M.dtype)


def _pencil(own: torch.Tensor, M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """μ, V with Ĝ_j V = M V diag(μ), Vᵀ M V = I, one adapter at a time.

    As in the per-adapter code this replaced, the eigendecomposition of C = L⁻¹ Ĝ_j L⁻ᵀ runs
    in float32 (its eigenvalues lie in [0, 1]); the rest is float64. With a ridge-dominated
    null space (rank-deficient inputs) that rounding alone moves the result by ~1e-5 from a
    float64 eigendecomposition, so the reference keeps it to test the restructuring exactly.
    """
    L = torch.linalg.cholesky(M)
    Linv = torch.linalg.inv(L)
    C = Linv @ own @ Linv.T
    mu, Q = torch.linalg.eigh(((C + C.T) / 2).float())
    return mu.double(), Linv.T @ Q.double()


def projection_dense(deltas, grams, ratio: float) -> torch.Tensor:
    """Σ_j ΔW_j M_j V_K V_Kᵀ, M_j = Ĝ_j + mean_{i≠j} Ĝ_i + λI, K = {μ > 1/(1+ρ)}."""
    total = 0
    for j, d in enumerate(deltas):
        if d is None:
            continue
        others = [g for i, g in enumerate(grams) if i != j]
        M = _ridged(grams[j] + (sum(others) / len(others) if others else 0 * grams[j]))
        mu, V = _pencil(grams[j], M)
        K = V[:, mu > 1 / (1 + ratio)]
        total = total + d @ M @ K @ K.T
    return total


def soft_dense(deltas, grams) -> torch.Tensor:
    """Σ_j ΔW_j M V_j diag(min(1, N μ_j)) V_jᵀ, M = Σ Ĝ_i + λI."""
    M = _ridged(sum(grams))
    total = 0
    for j, d in enumerate(deltas):
        if d is None:
            continue
        mu, V = _pencil(grams[j], M)
        total = total + d @ M @ V @ torch.diag((len(grams) * mu).clamp(0, 1)) @ V.T
    return total


def _gram(g: torch.Generator, basis: torch.Tensor, tokens: int) -> torch.Tensor:
    """Per-token Gram of ``tokens`` random inputs inside span(basis) (d_in, k)."""
    X = basis @ torch.randn(basis.shape[1], tokens, generator=g, dtype=torch.float64)
    return X @ X.T / tokens


def _grams(kind: str, n: int, d_in: int, g: torch.Generator) -> list[torch.Tensor]:
    eye = torch.eye(d_in, dtype=torch.float64)
    if kind == "full":
        return [_gram(g, eye, 4 * d_in) for _ in range(n)]
    if kind == "rank_deficient":  # fewer tokens than dimensions: each Ĝ_j singular
        return [_gram(g, eye, d_in // 3) for _ in range(n)]
    if kind == "overlapping":  # a shared subspace plus a few directions of one's own
        shared = torch.randn(d_in, d_in // 3, generator=g, dtype=torch.float64)
        own = [eye[:, 2 * j : 2 * j + 3] for j in range(n)]  # neighbours overlap in one axis
        return [_gram(g, shared, 2 * d_in) + 3 * _gram(g, own[j], 50) for j in range(n)]
    if kind == "identical":  # every M_j equal, also for N = 3
        return [_gram(g, eye, 2 * d_in)] * n
    raise ValueError(kind)


def _factors(g: torch.Generator, d_out: int, d_in: int, r: int) -> LoraFactors:
    A = torch.randn(r, d_in, generator=g)
    B = torch.randn(d_out, r, generator=g)  # non-zero B: ΔW ≠ 0
    return LoraFactors(A=A, B=B, scale=0.5 + float(torch.rand(1, generator=g)))


def _dense(f: LoraFactors | None) -> torch.Tensor | None:
    return None if f is None else f.scale * f.B.double() @ f.A.double()


CASES = [  # (d_out, d_in, ranks (None = absent adapter), Gram kind)
    (10, 12, (2, 3), "full"),
    (7, 24, (4, 4, 2), "full"),
    (16, 30, (4, 8), "rank_deficient"),
    (9, 18, (3, None, 2), "rank_deficient"),
    (12, 20, (2, 4, 3), "overlapping"),
    (8, 16, (4, 4), "overlapping"),
    (6, 15, (2, 3, 4), "identical"),
]


@pytest.mark.parametrize(
    "method,ratio",
    [("soft_projection", None), ("orthogonal_projection", 4.0), ("orthogonal_projection", 1.5)],
)
@pytest.mark.parametrize("d_out,d_in,ranks,kind", CASES)
def test_batched_projection_equals_the_per_adapter_dense_definition(
    method, ratio, d_out, d_in, ranks, kind
):
    g = torch.Generator().manual_seed(d_in * 31 + len(ranks))
    grams = _grams(kind, len(ranks), d_in, g)
    terms = [None if r is None else _factors(g, d_out, d_in, r) for r in ranks]
    deltas = [_dense(t) for t in terms]
    options = {} if ratio is None else {"projection_ratio": ratio}
    _FACTORED.clear()
    result = merge_adapters(
        [{"m": t} if t is not None else {} for t in terms],
        [1.0] * len(terms),
        MergeConfig(method=method, **options),
        [{"m": G} for G in grams],
    )
    f = result.modules["m"]
    got = f.scale * f.B.double() @ f.A.double()
    if method == "soft_projection":
        reference = soft_dense(deltas, grams)
    else:
        reference = projection_dense(deltas, grams, ratio)
    assert float(reference.norm()) > 1e-3 * sum(float(d.norm()) for d in deltas if d is not None)
    err = float((got - reference).norm() / reference.norm())
    assert err < 1e-5, err


@pytest.mark.parametrize("method", ["regmean_rescaled", "orthogonal_projection", "soft_projection"])
def test_threaded_modules_give_what_one_thread_gives(method):
    """`merge_adapters` spreads the calibration methods' input groups over torch's threads,
    each running on one thread: the result must not depend on how many (bitwise), and q/k/v
    reading one Ĝ object must still get what separate copies give."""
    from lorasum.methods.engine import input_groups

    g = torch.Generator().manual_seed(7)
    n, d_in = 2, 24
    grams = _grams("overlapping", n, d_in, g)
    layers = [[G * (1 + k) for G in grams] for k in range(3)]  # 3 layers, distinct objects
    adapters = [{} for _ in range(n)]
    stats = [{} for _ in range(n)]
    for k, per in enumerate(layers):
        for m in ("q", "k", "v", "o"):
            for j in range(n):
                adapters[j][f"{k}.{m}"] = _factors(g, 16, d_in, 3)
                stats[j][f"{k}.{m}"] = per[j] if m != "o" else per[j].clone()
    names = sorted(adapters[0])
    assert len(input_groups(names, stats)) == 6  # q/k/v of a layer share, o is apart
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = merge_adapters(adapters, [1.0] * n, MergeConfig(method=method), stats)
        torch.set_num_threads(3)
        many = merge_adapters(adapters, [1.0] * n, MergeConfig(method=method), stats)
    finally:
        torch.set_num_threads(threads)
    assert list(many.modules) == list(one.modules)
    for name in names:
        a, b = one.modules[name], many.modules[name]
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B), name


def _compose(method: str, terms, grams):
    _FACTORED.clear()  # no in-process reuse: only the disk cache may carry eigenpairs over
    result = merge_adapters(
        [{"m": t} for t in terms],
        [1.0] * len(terms),
        MergeConfig(method=method),
        [{"m": G} for G in grams],
    )
    return result.modules["m"]


def test_cached_eigenpairs_give_the_same_composition_bitwise(monkeypatch):
    """The second composition over the same calibration statistics (another seed's adapters, or
    the other projection method of a pair) reads the eigenpairs the first wrote: no whitening
    or eigendecomposition runs, and the factors are bitwise those of a computation without the
    cache. Other statistics miss; a damaged file is recomputed."""
    from lorasum.methods import projection

    calls = []
    original = projection.spectrum
    monkeypatch.setattr(projection, "spectrum", lambda C: calls.append(1) or original(C))
    g = torch.Generator().manual_seed(3)
    grams = _grams("overlapping", 2, 20, g)
    seed1 = [_factors(g, 8, 20, 4) for _ in range(2)]
    seed2 = [_factors(g, 8, 20, 4) for _ in range(2)]

    monkeypatch.setenv("LORASUM_SPECTRA_GB", "0")  # no cache: the reference
    want = {m: _compose(m, seed2, grams) for m in ("soft_projection", "orthogonal_projection")}
    assert len(calls) == 4 and not list(projection.spectra_dir().iterdir())
    monkeypatch.delenv("LORASUM_SPECTRA_GB")

    calls.clear()
    _compose("soft_projection", seed1, grams)  # fills the cache: one file per adapter
    assert len(calls) == 2 and len(list(projection.spectra_dir().glob("spectrum-*"))) == 2
    for method in ("soft_projection", "orthogonal_projection"):  # N = 2: the same M, hits
        got = _compose(method, seed2, grams)
        assert torch.equal(got.A, want[method].A) and torch.equal(got.B, want[method].B)
    assert len(calls) == 2

    other = _grams("overlapping", 2, 20, g)  # other statistics: computed, not read
    _compose("soft_projection", seed2, other)
    assert len(calls) == 4
    for f in projection.spectra_dir().glob("spectrum-*"):
        f.write_bytes(b"not a safetensors file")
    got = _compose("soft_projection", seed2, grams)
    assert len(calls) == 6 and torch.equal(got.A, want["soft_projection"].A)


def test_the_eigenpair_cache_keeps_to_its_cap(monkeypatch):
    """Past $LORASUM_SPECTRA_GB the least recently used files go; the newest stay."""
    import time

    from lorasum.methods import projection

    g = torch.Generator().manual_seed(4)
    terms = [_factors(g, 6, 30, 2) for _ in range(2)]
    names = lambda: {f.name for f in projection.spectra_dir().glob("spectrum-*")}  # noqa: E731
    _compose("soft_projection", terms, _grams("full", 2, 30, g))
    size = next(projection.spectra_dir().glob("spectrum-*")).stat().st_size
    monkeypatch.setenv("LORASUM_SPECTRA_GB", str(3.5 * size / 2**30))
    for _ in range(3):
        time.sleep(0.02)  # distinct modification times
        before = names()
        _compose("soft_projection", terms, _grams("full", 2, 30, g))
    assert len(names()) == 3 and len(names() - before) == 2  # the last composition's two kept


def test_two_compositions_at_once_compute_each_entry_once(monkeypatch):
    """Two workers needing the same eigenpairs at the same time (two seeds' compositions
    started together): one computes under the entry's lock, the other waits and reads it."""
    import threading
    import time

    from lorasum.methods import projection

    calls = []
    original = projection.spectrum

    def slow(C):
        calls.append(1)
        time.sleep(0.3)  # long enough for the other thread to arrive while this one computes
        return original(C)

    monkeypatch.setattr(projection, "spectrum", slow)
    g = torch.Generator().manual_seed(5)
    G = _grams("full", 2, 16, g)
    L = torch.linalg.cholesky(_ridged(sum(G)))
    results = [None, None]

    def work(i):
        results[i] = projection.cached_spectrum(L, G[0])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert not list(projection.spectra_dir().glob("*.lock"))  # the lock file went with the write
