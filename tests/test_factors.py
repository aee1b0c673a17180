"""The factored algebra against dense oracles."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorasum.factors import (
    LoraFactors,
    concat,
    cosine,
    delta,
    global_cosine,
    inner,
    rms,
    sq_norm,
    sum_factors,
)


def rand_factors(d_out, d_in, r, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return LoraFactors(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), scale)


def dense(f: LoraFactors) -> torch.Tensor:
    return delta(f.A, f.B, f.scale).double()


dims = st.tuples(
    st.integers(1, 24),
    st.integers(1, 24),
    st.integers(1, 6),
    st.integers(1, 6),
    st.integers(0, 10_000),
    st.floats(0.1, 20.0),
    st.floats(0.1, 20.0),
)


@settings(max_examples=60, deadline=None)
@given(dims)
def test_factored_inner_equals_dense(case):
    d_out, d_in, r1, r2, seed, s1, s2 = case
    f1 = rand_factors(d_out, d_in, r1, seed, s1)
    f2 = rand_factors(d_out, d_in, r2, seed + 1, s2)
    expected = float((dense(f1) * dense(f2)).sum())
    assert inner(f1, f2) == pytest.approx(expected, rel=1e-4, abs=1e-3)
    dense_cos = float(
        torch.nn.functional.cosine_similarity(dense(f1).flatten(), dense(f2).flatten(), dim=0)
    )
    assert cosine(f1, f2) == pytest.approx(dense_cos, abs=1e-5)
    # symmetry and bounds
    assert cosine(f1, f2) == pytest.approx(cosine(f2, f1), abs=1e-12)
    assert -1.0 <= cosine(f1, f2) <= 1.0


@settings(max_examples=40, deadline=None)
@given(dims)
def test_cosine_self_is_one_and_scale_invariant(case):
    d_out, d_in, r1, _, seed, s1, s2 = case
    f = rand_factors(d_out, d_in, r1, seed, s1)
    assert cosine(f, f) == pytest.approx(1.0, abs=1e-9)
    g = rand_factors(d_out, d_in, r1, seed + 7, s1)
    scaled = LoraFactors(f.A, f.B, s1 * s2)
    assert cosine(scaled, g) == pytest.approx(cosine(f, g), abs=1e-9)
    negated = LoraFactors(-f.A, f.B, f.scale)
    assert cosine(negated, g) == pytest.approx(-cosine(f, g), abs=1e-9)
    assert sq_norm(f) == pytest.approx(float(dense(f).pow(2).sum()), rel=1e-4)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 16), st.integers(2, 16), st.integers(1, 5), st.integers(0, 1000))
def test_invariant_to_refactorisation(d_out, d_in, r, seed):
    """B·A = (B·M)(M⁻¹·A): the cosine must not depend on the factorisation."""
    f = rand_factors(d_out, d_in, r, seed)
    g = rand_factors(d_out, d_in, r, seed + 3)
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(r, r, generator=gen, dtype=torch.float64) + 3 * torch.eye(
        r, dtype=torch.float64
    )
    f2 = LoraFactors(
        (torch.linalg.inv(M) @ f.A.double()).float(), (f.B.double() @ M).float(), f.scale
    )
    assert cosine(f2, g) == pytest.approx(cosine(f, g), abs=1e-4)


def test_zero_delta_is_orthogonal():
    f = rand_factors(5, 7, 2, 0)
    zero = LoraFactors(torch.randn(2, 7), torch.zeros(5, 2), 1.0)
    assert cosine(f, zero) == 0.0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        inner(rand_factors(5, 7, 2, 0), rand_factors(7, 5, 2, 0))
    with pytest.raises(ValueError):
        LoraFactors(torch.randn(2, 7), torch.randn(5, 3), 1.0)


def test_concat_is_exact_weighted_sum_with_padding():
    f1, f2 = rand_factors(6, 9, 2, 1, 16.0), rand_factors(6, 9, 5, 2, 0.5)
    out = concat([f1, None, f2], [0.7, 3.0, -1.5], rank=10)
    assert out.rank == 10 and out.scale == 1.0
    expected = 0.7 * dense(f1) - 1.5 * dense(f2)
    torch.testing.assert_close(dense(out), expected, rtol=1e-5, atol=1e-4)


def test_sum_factors_handles_missing_modules_and_ranks():
    a = {"m1": rand_factors(4, 6, 2, 1), "m2": rand_factors(3, 5, 2, 2)}
    b = {"m1": rand_factors(4, 6, 3, 3, 0.25), "m3": rand_factors(8, 2, 1, 4)}
    out = sum_factors([a, b], [1.0, 2.0])
    assert set(out) == {"m1", "m2", "m3"}
    assert len({f.rank for f in out.values()}) == 1  # one rank for a PEFT config
    torch.testing.assert_close(
        dense(out["m1"]), dense(a["m1"]) + 2 * dense(b["m1"]), rtol=1e-5, atol=1e-4
    )
    torch.testing.assert_close(dense(out["m2"]), dense(a["m2"]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense(out["m3"]), 2 * dense(b["m3"]), rtol=1e-5, atol=1e-5)


def test_global_cosine_matches_concatenated_dense():
    a = {"m1": rand_factors(4, 6, 2, 1), "m2": rand_factors(3, 5, 2, 2)}
    b = {"m1": rand_factors(4, 6, 3, 3), "m2": rand_factors(3, 5, 1, 4)}
    va = torch.cat([dense(a[n]).flatten() for n in ("m1", "m2")])
    vb = torch.cat([dense(b[n]).flatten() for n in ("m1", "m2")])
    expected = float(va @ vb / (va.norm() * vb.norm()))
    assert global_cosine(a, b) == pytest.approx(expected, abs=1e-6)


def test_rms():
    assert rms([3.0, -4.0]) == pytest.approx(math.sqrt(12.5))
    assert math.isnan(rms([]))
