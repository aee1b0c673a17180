"""`lorasum similarity`: N×N matrix, per-layer/type breakdowns, principal angles, plots, CLI."""

import json
import math

import pytest
import torch
from conftest import make_adapter
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import subspace_angles

from lorasum.adapters import read_adapter
from lorasum.analysis.similarity import (
    HEATMAP_NAME,
    JSON_NAME,
    PER_LAYER_NAME,
    format_similarity,
    layer_index,
    module_type,
    similarity,
)
from lorasum.cli import main
from lorasum.errors import LorasumError
from lorasum.factors import LoraFactors, cosine, delta, principal_cosines, rms


@pytest.fixture(scope="module")
def three(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("sim3")
    paths = [
        make_adapter(tiny_llama, d / "a", r=2, alpha=16.0, seed=1),
        make_adapter(tiny_llama, d / "b", r=5, alpha=4.0, seed=2),
        make_adapter(tiny_llama, d / "c", r=3, alpha=8.0, seed=1),  # shares a's init of A
    ]
    return paths


@pytest.fixture(scope="module")
def plotted(three, tmp_path_factory):
    """similarity() of the three adapters with --plot: (result, plot directory)."""
    plots = tmp_path_factory.mktemp("plots") / "p"
    return similarity(three, plot=plots), plots


def dense_cosine(f1: LoraFactors, f2: LoraFactors) -> float:
    d1, d2 = delta(f1.A, f1.B, f1.scale).double(), delta(f2.A, f2.B, f2.scale).double()
    return float((d1 * d2).sum() / (d1.norm() * d2.norm()))


def dense_principal_cosines(d1: torch.Tensor, d2: torch.Tensor) -> list[float]:
    """Oracle: column spaces of the dense ΔW (rank-revealing SVD), angles by scipy."""
    bases = []
    for d in (d1, d2):
        U, S, _ = torch.linalg.svd(d.double(), full_matrices=False)
        bases.append(U[:, : int(S.gt(1e-6 * S[0]).sum())].numpy())
    return sorted((math.cos(a) for a in subspace_angles(*bases)), reverse=True)


def test_matrix_breakdowns_and_angles_match_dense_oracles(three, plotted):
    result = plotted[0]
    names = result["names"]
    assert names == ["a", "b", "c"]
    factors = {n: read_adapter(p).modules for n, p in zip(names, three, strict=True)}
    m = result["matrix"]["rms_cosine"]
    for i, ni in enumerate(names):
        assert m[i][i] == pytest.approx(1.0, abs=1e-9)
        for j, nj in enumerate(names):
            assert m[i][j] == pytest.approx(m[j][i], abs=1e-12)
            if i != j:
                dense = [dense_cosine(factors[ni][k], factors[nj][k]) for k in factors[ni]]
                assert m[i][j] == pytest.approx(rms(dense), abs=1e-6)
    pair = next(p for p in result["pairs"] if (p["a"], p["b"]) == ("a", "b"))
    fa, fb = factors["a"], factors["b"]
    for layer in ("0", "1"):
        mods = [k for k in fa if layer_index(k) == int(layer)]
        want = rms([dense_cosine(fa[k], fb[k]) for k in mods])
        assert pair["per_layer"][layer] == pytest.approx(want, abs=1e-6)
    for kind in ("q_proj", "down_proj"):
        mods = [k for k in fa if module_type(k) == kind]
        want = rms([dense_cosine(fa[k], fb[k]) for k in mods])
        assert pair["per_module_type"][kind] == pytest.approx(want, abs=1e-6)
    for k in fa:
        da, db = delta(fa[k].A, fa[k].B, fa[k].scale), delta(fb[k].A, fb[k].B, fb[k].scale)
        col = pair["column_space"]["modules"][k]
        assert col == pytest.approx(dense_principal_cosines(da, db), abs=1e-5)
        row = pair["row_space"]["modules"][k]
        assert row == pytest.approx(dense_principal_cosines(da.T, db.T), abs=1e-5)
        assert len(col) == 2  # min(r_a, r_b)
    # a and c share their initial A (same seed): their row spaces overlap more than a and b's
    ac = next(p for p in result["pairs"] if (p["a"], p["b"]) == ("a", "c"))
    assert ac["row_space"]["mean_overlap"] > pair["row_space"]["mean_overlap"]
    assert 0 < pair["column_space"]["chance_overlap"] < 1


@settings(max_examples=25, deadline=None)
@given(
    st.integers(3, 12),
    st.integers(3, 12),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(0, 10_000),
)
def test_cosines_and_angles_are_invariant_to_refactorisation(d_out, d_in, r1, r2, seed):
    """B·M, M⁻¹·A is the same ΔW: cosine and principal angles must not move."""
    g = torch.Generator().manual_seed(seed)
    f1 = LoraFactors(torch.randn(r1, d_in, generator=g), torch.randn(d_out, r1, generator=g), 1.5)
    f2 = LoraFactors(torch.randn(r2, d_in, generator=g), torch.randn(d_out, r2, generator=g), 0.5)
    M = torch.randn(r1, r1, generator=g) + 3 * torch.eye(r1)
    g1 = LoraFactors(torch.linalg.solve(M, f1.A), f1.B @ M, 1.5)
    assert cosine(g1, f2) == pytest.approx(cosine(f1, f2), abs=1e-5)
    c1 = principal_cosines(f1.B, f2.B)
    torch.testing.assert_close(principal_cosines(g1.B, f2.B), c1, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        principal_cosines(g1.A.T, f2.A.T), principal_cosines(f1.A.T, f2.A.T), atol=1e-5, rtol=0
    )
    assert principal_cosines(f1.B, f1.B @ M) == pytest.approx([1.0] * r1, abs=1e-5)
    assert c1.numel() == min(r1, r2, d_out) and bool((c1 <= 1).all())


def test_plots_json_and_table(plotted):
    result, plots = plotted
    for name in (HEATMAP_NAME, PER_LAYER_NAME):
        data = (plots / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    saved = json.loads((plots / JSON_NAME).read_text())
    assert saved["matrix"] == result["matrix"]
    assert not [p for p in plots.iterdir() if p.name.startswith(".")]
    table = format_similarity(result)
    assert "[1] a" in table and "RMS cosine over modules" in table
    assert "q_proj" in table and "down_proj" in table and "col overlap" in table
    ab = result["matrix"]["rms_cosine"][0][1]
    assert f"{ab:+.4f}" in table


def test_cli_similarity_table_json_and_plot(three, tmp_path, capsys):
    assert main(["similarity", *map(str, three), "--plot", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "whole-adapter cosine" in out and "RMS cos: layer" in out
    assert f"plots written to {tmp_path / 'p'}" in out
    result = json.loads((tmp_path / "p" / JSON_NAME).read_text())
    assert len(result["matrix"]["rms_cosine"]) == 3 and len(result["pairs"]) == 3
    assert main(["similarity", *map(str, three[:2]), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["matrix"]["rms_cosine"]) == 2 and len(result["pairs"]) == 1
    assert {"per_layer", "per_module_type", "column_space", "row_space"} <= set(result["pairs"][0])


def test_similarity_refuses_adapters_of_two_architectures(tiny_llama, tiny_gpt2, tmp_path, capsys):
    a = make_adapter(tiny_llama, tmp_path / "a", seed=1)
    b = make_adapter(tiny_gpt2, tmp_path / "b", seed=2)
    cfg = json.loads((b / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tiny_llama)
    (b / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LorasumError, match="different model architectures"):
        similarity([a, b])
    code = main(["similarity", str(a), str(b), "--plot", str(tmp_path / "p")])
    assert code == 2 and "different model architectures" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
