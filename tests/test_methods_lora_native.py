"""The LoRA-native merges (`pico`, `knots_ties`, `knots_ta`, `lora_lego`) against dense references
of their definitions written plainly here, their invariants, and end-to-end composes/CLI."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import load_tiny
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.cluster.vq import kmeans2
from test_compose_methods import IDS, logits_with_delta, peft_adapter, peft_logits
from test_methods import close, dense_sum, dense_terms, merged_dense, rand_terms, run

from lorasum.adapters import read_adapter
from lorasum.cli import main
from lorasum.compose import compose
from lorasum.errors import LorasumError
from lorasum.factors import LoraFactors, delta
from lorasum.methods import MergeConfig
from lorasum.methods.dare import module_seed
from lorasum.methods.knots import aligned_tasks

SETTINGS = settings(max_examples=20, deadline=None)
MODULE = "layers.0.proj"  # the module name `run` passes

cases = st.tuples(
    st.integers(6, 12),  # d_out
    st.integers(6, 12),  # d_in
    st.lists(st.integers(1, 3), min_size=1, max_size=3),  # ranks
    st.integers(0, 10_000),  # seed
    st.lists(st.floats(-2.0, 2.0).filter(lambda w: abs(w) > 0.05), min_size=3, max_size=3),
)


# --- dense references, written from the definitions ---------------------------------------------


def pico_reference(terms, weights, shape):
    """Pico (arXiv 2604.16826, authors' calibrate_layer + compensate_energy) on dense ΔW_i."""
    present = [(t, w) for t, w in zip(terms, weights, strict=True) if t is not None]
    n = len(present)
    B_all = torch.cat([t.B.double() for t, _ in present], dim=1)
    U, S, _ = torch.linalg.svd(B_all, full_matrices=False)
    collision = S**2 / (S**2).sum()
    alpha = 1.0 / (1.0 + (n - 1) * collision)
    fused = torch.zeros(shape, dtype=torch.float64)
    norms = []
    for t, w in present:
        d = w * delta(t.A, t.B, t.scale).double()
        norms.append(float(torch.linalg.matrix_norm(d)))
        fused += d + U @ ((alpha - 1.0)[:, None] * (U.T @ d))
    return fused * (sum(norms) / n / float(torch.linalg.matrix_norm(fused)))


def ties_plain(tasks, weights, density):
    """TIES: trim each task to its top density·numel entries, elect sign by total, disjoint mean."""
    trimmed = []
    for t in tasks:
        k = int(density * t.numel())
        keep = torch.zeros(t.numel(), dtype=torch.bool)
        keep[t.abs().flatten().argsort(descending=True)[:k]] = True
        trimmed.append(t * keep.reshape(t.shape))
    stack = torch.stack(trimmed)
    sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0).double()
    agree = torch.sign(stack) == sign
    w = torch.tensor(weights, dtype=torch.float64)[:, None, None]
    return (stack * w * agree).sum(0) / agree.sum(0).clamp(min=1)


def knots_reference(deltas, weights, rule, density=1.0):
    """KnOTS (arXiv 2410.19735): dense SVD of [ΔW_1 … ΔW_n], merge the ΣV_iᵀ, rebuild U·merged."""
    d_in = deltas[0].shape[1]
    U, S, Vh = torch.linalg.svd(torch.cat([d.double() for d in deltas], dim=1), full_matrices=False)
    k = int(S.gt(1e-6 * S[0]).sum())
    tasks = [S[:k, None] * V for V in torch.split(Vh[:k], d_in, dim=1)]  # (k, d_in) each
    # ΔW_i = 0 (a module the adapter lacks) has V_i = 0; the dense SVD leaves rounding noise
    # there, which TIES would count as votes
    tasks = [
        t if d.abs().max() > 0 else torch.zeros_like(t) for t, d in zip(tasks, deltas, strict=True)
    ]
    if rule == "ta":
        merged = sum(w * t for w, t in zip(weights, tasks, strict=True))
    else:
        merged = ties_plain(tasks, weights, density)
    return U[:, :k] @ merged


def lego_reference(terms, weights, k, seed):
    """LoRA-LEGO: units [a, b] (scale split evenly), scipy k-means++, mean, norm rescale, dense."""
    rows = []
    for t, w in zip(terms, weights, strict=True):
        if t is not None:
            c = w * t.scale
            for j in range(t.rank):
                a = math.copysign(math.sqrt(abs(c)), c) * t.A[j].double()
                b = math.sqrt(abs(c)) * t.B[:, j].double()
                rows.append(torch.cat([a, b]))
    X = torch.stack(rows)
    d_in = next(t for t in terms if t is not None).shape[1]
    if len(rows) <= k:
        labels = np.arange(len(rows))
    else:
        _, labels = kmeans2(X.numpy(), k, minit="++", rng=np.random.default_rng(seed))
    out = 0
    for label in set(labels.tolist()):
        members = X[torch.from_numpy(labels == label)]
        centroid = members.mean(0)
        centroid = centroid * members.norm(dim=1).mean() / centroid.norm()
        out = out + torch.outer(centroid[d_in:], centroid[:d_in])
    return out


# --- pico ----------------------------------------------------------------------------------------


@SETTINGS
@given(cases)
def test_pico_equals_dense_reference(case):
    d_out, d_in, ranks, seed, ws = case
    terms = rand_terms(d_out, d_in, ranks, seed, missing={1} if len(ranks) == 3 else ())
    w = ws[: len(ranks)]
    result = run("pico", terms, w)
    close(merged_dense(result), pico_reference(terms, w, (d_out, d_in)))
    present = [(t, wi) for t, wi in zip(terms, w, strict=True) if t is not None]
    target = sum(abs(wi) * float(delta(t.A, t.B, t.scale).norm()) for t, wi in present)
    assert float(merged_dense(result).norm()) == pytest.approx(target / len(present), rel=1e-4)


def test_pico_single_adapter_or_module_is_the_adapter_itself():
    f, g = rand_terms(9, 7, [3, 2], seed=4)
    close(merged_dense(run("pico", [f], [0.7])), 0.7 * delta(f.A, f.B, f.scale).double())
    close(merged_dense(run("pico", [None, g], [1.0, 2.0])), 2 * delta(g.A, g.B, g.scale).double())


def test_pico_downscales_the_shared_output_direction():
    """Two adapters that write along one shared output direction (same B column, same A row):
    Pico lowers that direction's share of ΔW below the plain sum's."""
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        shared_b, shared_a = torch.randn(16, 1, generator=g), torch.randn(1, 12, generator=g)
        f1, f2 = (
            LoraFactors(
                torch.cat([shared_a, torch.randn(1, 12, generator=g)]),
                torch.cat([shared_b, torch.randn(16, 1, generator=g)], 1),
                1,
            )
            for _ in range(2)
        )
        u = shared_b[:, 0].double() / shared_b.norm()

        def share(d, u=u):  # fraction of ‖ΔW‖² along the shared output direction
            return float((u @ d).norm() ** 2 / d.norm() ** 2)

        plain = dense_sum([f1, f2], [1.0, 1.0], (16, 12))
        assert share(merged_dense(run("pico", [f1, f2], [1.0, 1.0]))) < share(plain) - 0.005


def test_pico_truncates_with_rank():
    terms = rand_terms(12, 10, [3, 3], seed=2)
    result = run("pico", terms, [1.0, 1.0], rank=2)
    assert result.factors.rank == 2 and 0 < result.kept_energy < 1
    full = pico_reference(terms, [1.0, 1.0], (12, 10))
    U, S, Vh = torch.linalg.svd(full)
    close(merged_dense(result), (U[:, :2] * S[:2]) @ Vh[:2])


# --- knots ---------------------------------------------------------------------------------------


@SETTINGS
@given(cases, st.sampled_from([1.0, 0.6, 0.3]))
def test_knots_ties_equals_dense_svd_of_the_concatenation(case, density):
    d_out, d_in, ranks, seed, ws = case
    terms = rand_terms(d_out, d_in, ranks, seed, missing={1} if len(ranks) == 3 else ())
    w = ws[: len(ranks)]
    deltas = dense_terms(terms, (d_out, d_in))
    result = run("knots_ties", terms, w, density=density)
    close(merged_dense(result), knots_reference(deltas, w, "ties", density))


@SETTINGS
@given(cases)
def test_knots_ta_equals_the_weighted_sum_and_the_dense_reference(case):
    d_out, d_in, ranks, seed, ws = case
    terms = rand_terms(d_out, d_in, ranks, seed)
    w = ws[: len(ranks)]
    got = merged_dense(run("knots_ta", terms, w))
    close(got, knots_reference(dense_terms(terms, (d_out, d_in)), w, "ta"))
    close(got, dense_sum(terms, w, (d_out, d_in)))


def test_aligned_tasks_rebuild_each_delta_in_one_orthonormal_basis():
    terms = rand_terms(10, 8, [3, 2, 2], seed=5, missing={1})
    U, tasks = aligned_tasks(terms)
    torch.testing.assert_close(U.T @ U, torch.eye(U.shape[1], dtype=torch.float64))
    for t, T in zip(terms, tasks, strict=True):
        expected = torch.zeros(10, 8) if t is None else delta(t.A, t.B, t.scale)
        close(U @ T, expected.double())


def test_knots_ties_invariants():
    f, g = rand_terms(9, 8, [3, 2], seed=6)
    d_f = delta(f.A, f.B, f.scale).double()
    close(merged_dense(run("knots_ties", [f], [1.0], density=1.0)), d_f)  # one adapter
    close(merged_dense(run("knots_ties", [f, f], [1.0, 1.0], density=1.0)), d_f)  # disjoint mean
    close(merged_dense(run("knots_ties", [f, None], [2.0, 1.0], density=1.0)), 2 * d_f)
    assert run("knots_ties", [f, g], [1.0, 1.0], density=0.5, rank=2).factors.rank == 2


# --- lora_lego -----------------------------------------------------------------------------------


@SETTINGS
@given(cases, st.sampled_from([None, 1, 2, 4]), st.integers(0, 3))
def test_lora_lego_equals_clustering_done_here(case, rank, seed):
    d_out, d_in, ranks, tseed, ws = case
    terms = rand_terms(d_out, d_in, ranks, tseed, missing={1} if len(ranks) == 3 else ())
    w = ws[: len(ranks)]
    k = rank if rank is not None else max(t.rank for t in terms if t is not None)
    options = {"seed": seed} | ({"rank": rank} if rank else {})
    result = run("lora_lego", terms, w, **options)
    expected = lego_reference(terms, w, k, module_seed(seed, MODULE))
    close(merged_dense(result), expected)
    assert result.factors.rank <= k
    again = run("lora_lego", terms, w, **options)  # deterministic for a given seed
    torch.testing.assert_close(again.factors.A, result.factors.A, rtol=0, atol=0)


def test_lora_lego_invariants():
    f, g = rand_terms(9, 8, [3, 3], seed=7)
    d_f = delta(f.A, f.B, f.scale).double()
    close(merged_dense(run("lora_lego", [f], [1.0])), d_f)  # rank 3 ≤ k: every unit kept
    close(merged_dense(run("lora_lego", [f, f], [1.0, 1.0])), d_f)  # duplicates pair up
    close(
        merged_dense(run("lora_lego", [None, g], [1.0, -1.5])),
        -1.5 * delta(g.A, g.B, g.scale).double(),
    )
    result = run("lora_lego", [f, g], [1.0, 1.0], rank=6)  # 6 units, 6 clusters: the exact sum
    close(merged_dense(result), dense_sum([f, g], [1.0, 1.0], (9, 8)))


def test_lora_lego_rescales_a_merged_unit_to_its_members_mean_norm():
    """Two units in one cluster: the merged unit points along their mean, norm = mean norm."""
    f = LoraFactors(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 0.0]]), 4.0)
    result = run("lora_lego", [f], [1.0], rank=1).factors
    x1 = torch.tensor([2.0, 0.0, 2.0])  # √4·[a_1, b_1]
    x2 = torch.tensor([0.0, 4.0, 0.0])  # √4·[a_2, b_2]
    mean = (x1 + x2) / 2
    unit = mean * (x1.norm() + x2.norm()) / 2 / mean.norm()
    got = torch.cat([result.A[0], result.B[:, 0]])
    torch.testing.assert_close(got, unit)


def test_lora_lego_refuses_rank_auto():
    (f,) = rand_terms(5, 4, [2], seed=1)
    with pytest.raises(LorasumError, match="integer --rank"):
        run("lora_lego", [f, f], [1.0, 1.0], rank="auto")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"method": "knots_ties"}, "knots_ties needs --density"),
        ({"method": "pico", "density": 0.5}, "--density does not apply to pico"),
        ({"method": "lora_lego", "method_scale": 2.0}, "--method-scale does not apply"),
    ],
)
def test_new_methods_refuse_what_they_do_not_read(options, message):
    with pytest.raises(LorasumError, match=message):
        MergeConfig(**options)


# --- end to end: PEFT adapters in, a loadable PEFT adapter out -----------------------------------


@pytest.fixture(scope="module")
def two_adapters(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("native")
    a = peft_adapter(tiny_llama, d / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    b = peft_adapter(
        tiny_llama, d / "b", 2, r=2, lora_alpha=8, target_modules=["q_proj", "down_proj"]
    )
    return tiny_llama, [a, b]


def _reference(method, factors, weights, name, options):
    terms = [f.modules.get(name) for f in factors]
    shape = next(t.shape for t in terms if t is not None)
    if method == "pico":
        return pico_reference(terms, weights, shape)
    if method.startswith("knots"):
        rule = "ta" if method == "knots_ta" else "ties"
        return knots_reference(dense_terms(terms, shape), weights, rule, options.get("density"))
    k = options.get("rank") or max(t.rank for t in terms if t is not None)
    return lego_reference(terms, weights, k, module_seed(options.get("seed", 0), name))


@pytest.mark.parametrize(
    "method, options",
    [
        ("pico", {}),
        ("knots_ties", {"density": 0.5}),
        ("knots_ta", {}),
        ("lora_lego", {"rank": 3, "seed": 2}),
    ],
)
def test_compose_writes_a_peft_adapter_with_the_method_merge(
    two_adapters, tmp_path, method, options
):
    model_dir, paths = two_adapters
    weights = [1.0, 0.5]
    compose(paths, tmp_path / "out", weights=weights, method=method, **options)
    factors = [read_adapter(p) for p in paths]
    names = sorted(set().union(*(f.modules for f in factors)))
    expected = {n: _reference(method, factors, weights, n, options).float() for n in names}
    want = logits_with_delta(model_dir, expected)
    base = load_tiny(model_dir)(input_ids=IDS).logits
    assert (want - base).abs().max() > 1e-2  # the merge really changes the output
    torch.testing.assert_close(peft_logits(model_dir, tmp_path / "out"), want, rtol=1e-4, atol=1e-4)
    recipe = json.loads((tmp_path / "out" / "recipe.json").read_text())
    assert recipe["method"] == method and sorted(recipe["modules"]) == names


def test_cli_compose_knots_ties(two_adapters, tmp_path):
    _, (a, b) = two_adapters
    out = tmp_path / "out"
    argv = ["compose", str(a), str(b), "--method", "knots_ties", "--density", "0.4", "--out"]
    assert main([*argv, str(out)]) == 0
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["options"]["density"] == 0.4 and recipe["method"] == "knots_ties"
    assert (out / "adapter_model.safetensors").exists()
