"""lean: PEFT's LoRA numbers (same gradients; the same dropout draws when PEFT's dropout draws
lean's `keep_mask`) with fewer kept tensors."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from conftest import load_tiny
from peft import LoraConfig, get_peft_model
from torch import nn

from lorasum.models import load_model
from lorasum.training.low_memory import (
    LoraBranch,
    SwiGLU,
    folded_lora,
    keep_mask,
    lean,
    leanable,
    rms_norms,
    swiglu_mlps,
)


def _peft(model_dir, dropout=0.1):
    model = load_tiny(model_dir)
    torch.manual_seed(3)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=dropout,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
        init_lora_weights=False,  # B != 0, so every gradient is non-trivial
    )
    return get_peft_model(model, cfg).train()


@contextlib.contextmanager
def _patched(cls, forward):
    original = cls.forward
    cls.forward = forward
    try:
        yield
    finally:
        cls.forward = original


def _keep_mask_dropout(self, x):
    """nn.Dropout drawing lean's mask (`keep_mask`): PEFT's branch with the draws lean makes."""
    if not self.training or self.p == 0:
        return x
    return x * keep_mask(x.shape, self.p, x.device) / (1 - self.p)


def _step(model, ids, enabled: bool, seed: int = 11):
    """Loss and LoRA gradients of one forward+backward, and the bytes autograd kept for it."""
    kept: dict[int, int] = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    reference = contextlib.nullcontext() if enabled else _patched(nn.Dropout, _keep_mask_dropout)
    with (
        reference,
        lean(model, enabled) as n,
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, sum(kept.values()), n


def test_same_loss_and_gradients_as_peft(tiny_llama):
    model = _peft(tiny_llama)
    ids = torch.randint(3, 100, (4, 24))
    loss_peft, g_peft, kept_peft, n0 = _step(model, ids, enabled=False)
    loss_lean, g_lean, kept_lean, n = _step(model, ids, enabled=True)
    takes = len(leanable(model)) + len(swiglu_mlps(model)) + len(rms_norms(model))
    assert n0 == 0 and n == takes == 2 * 5 + 2 + 5
    torch.testing.assert_close(loss_lean, loss_peft, rtol=0, atol=0)  # same draws, same forward
    assert g_lean.keys() == g_peft.keys()
    for k in g_peft:
        torch.testing.assert_close(g_lean[k], g_peft[k], rtol=1e-5, atol=1e-7)
    # dropout is really on (otherwise the draws would not be tested): another seed, another loss
    assert not torch.equal(_step(model, ids, enabled=True, seed=12)[0], loss_lean)
    assert kept_lean < 0.85 * kept_peft  # the fp32 noise and dropout(x) copies are gone


def test_eval_mode_and_no_dropout_fall_back_or_match(tiny_llama):
    model = _peft(tiny_llama, dropout=0.0)
    ids = torch.randint(3, 100, (2, 16))
    loss_peft, g_peft, *_ = _step(model, ids, enabled=False)
    loss_lean, g_lean, *_ = _step(model, ids, enabled=True)
    torch.testing.assert_close(loss_lean, loss_peft, rtol=0, atol=0)
    for k in g_peft:
        torch.testing.assert_close(g_lean[k], g_peft[k], rtol=1e-5, atol=1e-7)
    model.eval()
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with lean(model):
            leaned = model(input_ids=ids).logits
    assert torch.equal(plain, leaned)
    # the layers' own forward is back after the block
    assert all("forward" not in vars(m) for m in leanable(model) + swiglu_mlps(model))


def test_branch_gradients_against_autograd_reference():
    """p = 0: the hand-written backward equals autograd's (float64 gradcheck)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: LoraBranch.apply(x, a, b, 0.0, 2.0), (x, a, b))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_branch_with_a_frozen_a_keeps_no_input_and_gives_the_same_gradients(p):
    """A frozen A (--lora-a frozen/disjoint): x is not kept for the backward, and the x and B
    gradients equal those of the branch with a trainable A (same mask: same seed)."""
    torch.manual_seed(3)
    x = torch.randn(3, 7, 6, requires_grad=True)
    a, b = torch.randn(2, 6), torch.randn(5, 2, requires_grad=True)
    grads = []
    for a_trains in (True, False):
        a_in = a.clone().requires_grad_(a_trains)
        torch.manual_seed(9)
        out = LoraBranch.apply(x, a_in, b, p, 1.5)
        saved = out.grad_fn.saved_tensors
        kept_x = any(t is not None and t.shape == x.shape and t.dtype == x.dtype for t in saved)
        assert kept_x == a_trains
        grads.append(torch.autograd.grad(out.square().sum(), (x, b)))
    for got, want in zip(grads[1], grads[0], strict=True):
        assert torch.equal(got, want)


def test_swiglu_gradients_against_autograd_reference():
    torch.manual_seed(0)
    gate = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    up = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLU.apply, (gate, up))
    out = SwiGLU.apply(gate, up)
    torch.testing.assert_close(out, torch.nn.functional.silu(gate) * up, rtol=0, atol=0)
    # fp32: the forward and both gradients bitwise autograd's through silu(gate) * up
    g32, u32 = (t.detach().float().requires_grad_() for t in (gate, up))
    upstream = torch.randn(2, 5, 7)
    want_out = torch.nn.functional.silu(g32) * u32
    want = torch.autograd.grad(want_out, (g32, u32), upstream)
    got_out = SwiGLU.apply(g32, u32)
    got = torch.autograd.grad(got_out, (g32, u32), upstream)
    assert torch.equal(got_out, want_out)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_branch_with_dropout_matches_definition(p):
    """The backward rebuilds dropout(x) from the kept mask: same gradients as the definition
    (to float32 rounding of each tensor's scale: the backward orders its products for speed)."""
    torch.manual_seed(11)  # the inputs do not depend on what earlier tests drew
    x = torch.randn(3, 7, 6, requires_grad=True)
    a = torch.randn(2, 6, requires_grad=True)
    b = torch.randn(5, 2, requires_grad=True)
    torch.manual_seed(5)
    out = LoraBranch.apply(x, a, b, p, 1.5)
    out.square().sum().backward()
    got = (x.grad, a.grad, b.grad)
    x.grad = a.grad = b.grad = None
    torch.manual_seed(5)
    noise = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
    ref = ((x * noise) @ a.t() @ b.t()) * 1.5
    torch.testing.assert_close(out, ref)
    ref.square().sum().backward()
    for g, r in zip(got, (x.grad, a.grad, b.grad), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6 * float(r.abs().max()))


def test_train_gives_the_same_adapter_with_and_without_lean(
    tiny_llama, qa_files, tmp_path, monkeypatch
):
    from safetensors.torch import load_file

    import lorasum.training.loop as train_mod
    from lorasum.training import TrainConfig, train

    cfg = TrainConfig(
        model=str(tiny_llama),
        data=[str(qa_files["arith"])],
        max_steps=3,
        batch_size=4,
        max_length=48,
        lr=1e-3,
        target_modules="q_proj,k_proj,v_proj,o_proj,down_proj",
        eval_val=False,
        precision="fp32",
    )
    train(cfg, tmp_path / "lean", progress=False)
    real_lean = train_mod.lean
    monkeypatch.setattr(train_mod, "lean", lambda m, enabled=True: real_lean(m, False))
    monkeypatch.setattr(nn.Dropout, "forward", _keep_mask_dropout)  # PEFT drawing lean's masks
    train(cfg, tmp_path / "peft", progress=False)

    def log(d):
        return [json.loads(x) for x in (d / "train_log.jsonl").read_text().splitlines()]

    for a, b in zip(log(tmp_path / "lean"), log(tmp_path / "peft"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    wa = load_file(tmp_path / "lean" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-7)


def _peft_tiny(tiny_llama, dropout: float):
    from peft import LoraConfig, get_peft_model

    model = load_model(str(tiny_llama))
    torch.manual_seed(0)
    cfg = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "down_proj"]
    )
    peft = get_peft_model(model, cfg)
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)  # B non-zero: the branch must matter
    return peft.train()


def _bf16_grads(peft, ids, taken_over: bool, seed: int = 0):
    peft.zero_grad()
    torch.manual_seed(seed)
    with lean(peft, enabled=taken_over) as n, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = peft(input_ids=ids).logits.float().square().mean()
    loss.backward()
    grads = {k: p.grad.clone() for k, p in peft.named_parameters() if p.grad is not None}
    return n, float(loss.detach()), grads


def test_bf16_autocast_branch_equals_peft_without_dropout(tiny_llama):
    """Under CPU bf16 autocast the lean branch skips PEFT's fp32 round trip of x; without
    dropout it computes the same products in bf16: same loss and LoRA gradients to bf16 accuracy."""
    peft = _peft_tiny(tiny_llama, 0.0)
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    n, loss_lean, g_lean = _bf16_grads(peft, ids, True)
    assert n > 0
    _, loss_peft, g_peft = _bf16_grads(peft, ids, False)
    assert loss_lean == pytest.approx(loss_peft, rel=1e-2)
    assert g_lean.keys() == g_peft.keys() and g_lean
    for k in g_lean:
        assert g_lean[k].dtype == torch.float32  # the LoRA weights' gradients stay fp32
        cos = torch.nn.functional.cosine_similarity(g_lean[k].flatten(), g_peft[k].flatten(), 0)
        assert cos > 0.99, k


def test_bf16_autocast_branch_dropout_is_seeded_and_bernoulli():
    """The bf16 path's mask: kept with probability 1 − p, the same for a seed, another for
    another seed; the branch's gradients follow the mask it drew."""
    from lorasum.training.low_memory import keep_mask, keep_threshold

    torch.manual_seed(3)
    m1 = keep_mask(torch.Size([400_000]), 0.1, torch.device("cpu"))
    torch.manual_seed(3)
    m2 = keep_mask(torch.Size([400_000]), 0.1, torch.device("cpu"))
    torch.manual_seed(4)
    m3 = keep_mask(torch.Size([400_000]), 0.1, torch.device("cpu"))
    assert m1.dtype == torch.uint8 and torch.equal(m1, m2) and not torch.equal(m1, m3)
    kept = m1.double().mean().item()
    assert abs(kept - 0.9) < 4 * (0.9 * 0.1 / 400_000) ** 0.5  # binomial: within 4 sigma
    for p in (0.05, 0.3, 0.5, 1e-6):  # not quantised: P(keep) = t / 2³¹ tracks 1 - p at any p
        assert abs(keep_threshold(p) / 2**31 - (1 - p)) <= 2**-32
        torch.manual_seed(0)
        f = keep_mask(torch.Size([400_000]), p, torch.device("cpu")).double().mean().item()
        assert abs(f - (1 - p)) < 4 * ((1 - p) * p / 400_000) ** 0.5 + 1e-6
    # eight elements come from one 64-bit draw: each byte position uniform, neighbours independent
    torch.manual_seed(1)
    m = keep_mask(torch.Size([1_000_003]), 0.5, torch.device("cpu"))  # not a multiple of 8
    assert m.shape == (1_000_003,)
    per_position = m[:1_000_000].double().view(-1, 8)
    sigma = (0.25 / per_position.shape[0]) ** 0.5
    assert (per_position.mean(0) - 0.5).abs().max() < 4.5 * sigma
    pairs = per_position[:, :-1] * per_position[:, 1:]
    assert abs(pairs.mean() - 0.25) < 4 * (0.1875 / pairs.numel()) ** 0.5
    # the 23 bits behind a tie on the first 8 decide: with t = 128·2²³ + 2²², P(keep) = 1/2 +
    # 1/512 (ties dropped would give 1/2, ties kept 1/2 + 1/256: both ~8 sigma away)
    p_tie = 1 - (128 * 2**23 + 2**22) / 2**31
    assert keep_threshold(p_tie) == 128 * 2**23 + 2**22
    n = 4_000_000
    torch.manual_seed(5)
    f = keep_mask(torch.Size([n]), p_tie, torch.device("cpu")).double().mean().item()
    assert abs(f - (0.5 + 1 / 512)) < 4 * (0.25 / n) ** 0.5
    assert keep_mask(torch.Size([1000]), 1e-13, torch.device("cpu")).all()  # t = 2³¹: all kept
    assert not keep_mask(torch.Size([1000]), 1.0, torch.device("cpu")).any()
    assert keep_mask(torch.Size([3, 5, 7]), 0.1, torch.device("cpu")).shape == (3, 5, 7)

    # the branch: with a = I-like and b = I, the output is x·mask/(1−p)·scaling, in bf16
    x = torch.randn(64, 8, dtype=torch.bfloat16, requires_grad=True)
    a = torch.eye(8, requires_grad=True)
    b = torch.eye(8, requires_grad=True)
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = LoraBranch.apply(x, a, b, 0.25, 2.0, True)
    torch.manual_seed(7)
    mask = keep_mask(x.shape, 0.25, x.device)
    want = (x.float() * mask / 0.75 * 2.0).to(torch.bfloat16)
    torch.testing.assert_close(out, want, rtol=2e-2, atol=1e-2)
    out.float().sum().backward()
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    assert torch.equal(x.grad == 0, mask == 0)  # dropped elements get no gradient


def test_rmsnorm_equals_the_models_norm_and_its_gradient():
    """RMSNorm against LlamaRMSNorm: forward bitwise, input gradient to float rounding (and
    float64 gradcheck)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from lorasum.training.low_memory import RMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(48, eps=1e-5)
    nn.init.normal_(norm.weight)
    norm.weight.requires_grad_(False)
    x = (3 * torch.randn(2, 7, 48)).requires_grad_()
    g = torch.randn(2, 7, 48)
    want = norm(x)
    (want_grad,) = torch.autograd.grad(want, x, g)
    got = RMSNorm.apply(x, norm.weight, norm.variance_epsilon)
    (got_grad,) = torch.autograd.grad(got, x, g)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)
    x64 = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w64 = torch.randn(5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: RMSNorm.apply(x, w64, 1e-6), (x64,))


def test_lean_norms_survive_train_eval_switches_and_are_restored(tiny_llama):
    """transformers re-kernelizes RMSNorm layers on every train/eval switch: the takeover must
    outlive a validation pass inside the block; afterwards the norms are the model's class
    again. A trainable norm weight falls back to autograd (and gets its gradient)."""
    from lorasum.training.low_memory import RMSNorm

    model = _peft(tiny_llama, dropout=0.0)
    norms = rms_norms(model)
    classes = [type(m) for m in norms]
    calls = []
    real = RMSNorm.apply

    def counting(*args):
        calls.append(1)
        return real(*args)

    ids = torch.randint(3, 100, (2, 12))
    with contextlib.ExitStack() as stack:
        stack.enter_context(lean(model))
        RMSNorm.apply = counting
        stack.callback(lambda: setattr(RMSNorm, "apply", real))
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
        assert not calls  # evaluation: the class's own forward
        model.train()
        model(input_ids=ids).logits.sum().backward()
        assert len(calls) == len(norms)  # every norm taken over after the switch
        norms[0].weight.requires_grad_(True)
        model(input_ids=ids).logits.sum().backward()
        assert len(calls) == 2 * len(norms) - 1 and norms[0].weight.grad is not None
    assert [type(m) for m in norms] == classes


def _keep_mask_reference(n: int, p: float) -> torch.Tensor:
    """keep_mask written out plainly: 8 bytes per int64 draw, each byte against the threshold's
    top 8 bits, every tie (in index order) decided by 23 more bits from one int64 draw each."""
    from lorasum.training.low_memory import keep_threshold

    t = keep_threshold(p)
    lead, rest = t >> 23, t & (2**23 - 1)
    draws = torch.empty((n + 7) // 8, dtype=torch.int64).random_(-(2**63), None)
    top = draws.view(torch.uint8)[:n].tolist()
    keep = [b < lead for b in top]
    ties = [i for i, b in enumerate(top) if b == lead]
    if ties:
        low = torch.empty(len(ties), dtype=torch.int64).random_().tolist()
        for i, bits in zip(ties, low, strict=True):
            keep[i] = (bits & (2**23 - 1)) < rest
    return torch.tensor(keep, dtype=torch.uint8)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 100_003])
def test_keep_mask_equals_the_plain_lazy_comparison(n):
    """Same seed, same mask as the element-by-element definition, ties included (p = 0.1: the
    threshold's top byte is 230 and its other 23 bits 3,355,443; ~n/256 ties)."""
    for p in (0.1, 0.5, 0.999):
        torch.manual_seed(n)
        want = _keep_mask_reference(n, p)
        torch.manual_seed(n)
        got = keep_mask(torch.Size([n]), p, torch.device("cpu"))
        assert torch.equal(got, want), (n, p)


def test_keep_mask_ignores_ties_in_the_last_words_padding():
    """n = 9: the second int64 draw holds one element and 7 padding bytes. A seed whose padding
    ties the threshold's top byte (and whose element does not) still gives the reference mask."""
    lead = 230  # p = 0.1
    for seed in range(5000):
        torch.manual_seed(seed)
        top = torch.empty(2, dtype=torch.int64).random_(-(2**63), None).view(torch.uint8)
        if lead in top[9:].tolist() and lead not in top[:9].tolist():
            break
    else:
        pytest.fail("no seed with a tie in the padding only")
    torch.manual_seed(seed)
    want = _keep_mask_reference(9, 0.1)
    torch.manual_seed(seed)
    assert torch.equal(keep_mask(torch.Size([9]), 0.1, torch.device("cpu")), want)


def test_softmax_nll_is_cross_entropy_with_its_gradient():
    """SoftmaxNll against F.cross_entropy: forward bitwise, gradients to float rounding for any
    upstream weights (zero and negative included); a second backward raises."""
    from lorasum.training.low_memory import SoftmaxNll

    torch.manual_seed(0)
    logits = (3 * torch.randn(37, 211)).requires_grad_()
    targets = torch.randint(0, 211, (37,))
    weights = torch.randn(37)
    weights[:5] = 0.0
    ref = nn.functional.cross_entropy(logits, targets, reduction="none")
    (want,) = torch.autograd.grad((ref * weights).sum(), logits)
    got = SoftmaxNll.apply(logits, targets)
    assert torch.equal(got, ref.detach())
    (grad,) = torch.autograd.grad((got * weights).sum(), logits, retain_graph=True)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)
    assert torch.equal(grad[:5], torch.zeros_like(grad[:5]))
    with pytest.raises(RuntimeError, match="twice"):
        torch.autograd.grad(got.sum(), logits)

    # under CPU bf16 autocast, cross_entropy runs in fp32: so does SoftmaxNll (same NLL bitwise)
    w = torch.randn(16, 211, requires_grad=True)
    h = torch.randn(37, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = h @ w  # bf16
        ref = nn.functional.cross_entropy(logits, targets, reduction="none")
        got = SoftmaxNll.apply(logits, targets)
    assert logits.dtype == torch.bfloat16 and got.dtype == ref.dtype == torch.float32
    assert torch.equal(got, ref)
    (want,) = torch.autograd.grad(ref.sum(), w, retain_graph=True)
    (grad,) = torch.autograd.grad(got.sum(), w)
    torch.testing.assert_close(grad, want)


def test_head_nll_is_the_projection_then_softmax_nll():
    """HeadNll against SoftmaxNll(F.linear(h, w)): the NLL and the input gradient bitwise, the
    weight gradient when the weight needs one; a second backward raises."""
    from lorasum.training.low_memory import HeadNll, SoftmaxNll

    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = (0.5 * torch.randn(211, 16)).requires_grad_()
    targets = torch.randint(0, 211, (37,))
    weights = torch.randn(37)
    ref = SoftmaxNll.apply(nn.functional.linear(h, w), targets)
    want = torch.autograd.grad((ref * weights).sum(), (h, w))
    got = HeadNll.apply(h, w, targets)
    assert torch.equal(got, ref)
    grad = torch.autograd.grad((got * weights).sum(), (h, w), retain_graph=True)
    assert torch.equal(grad[0], want[0])
    torch.testing.assert_close(grad[1], want[1], rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match="twice"):
        torch.autograd.grad(got.sum(), h)
    frozen = w.detach()  # the tied embeddings in LoRA training: no weight gradient computed
    (gh,) = torch.autograd.grad(HeadNll.apply(h, frozen, targets).sum(), h)
    (want_h,) = torch.autograd.grad(SoftmaxNll.apply(h @ frozen.t(), targets).sum(), h)
    assert torch.equal(gh, want_h)


def test_token_nll_trains_through_head_nll_with_the_same_numbers(tiny_llama, monkeypatch):
    """fp32 training takes the fused head (HeadNll) and gives the per-row NLL and the LoRA
    gradients of the unfused path bitwise; under bf16 autocast it is not taken."""
    from lorasum.data import Batch
    from lorasum.evaluate import token_nll
    from lorasum.training import low_memory as lean

    peft = _peft_tiny(tiny_llama, dropout=0.0)
    torch.manual_seed(2)
    ids = torch.randint(3, 100, (3, 12))
    counted = torch.ones_like(ids, dtype=torch.bool)
    counted[0, :4] = False
    batch = Batch(ids, torch.ones_like(ids), counted, torch.zeros(3, dtype=torch.long))
    params = [p for p in peft.parameters() if p.requires_grad]
    calls = []
    original = lean.HeadNll.forward
    monkeypatch.setattr(
        lean.HeadNll, "forward", staticmethod(lambda *a: calls.append(1) or original(*a))
    )

    def run():
        per_row, counts = token_nll(peft, batch)
        return per_row, torch.autograd.grad(per_row.sum() / counts.sum(), params)

    fused, fused_grads = run()
    assert calls == [1]
    monkeypatch.setattr("lorasum.evaluate.fused_head", lambda head, hidden: False)
    plain, plain_grads = run()
    assert calls == [1] and torch.equal(fused, plain)
    for a, b in zip(fused_grads, plain_grads, strict=True):
        assert torch.equal(a, b)
    monkeypatch.undo()
    head = peft.get_output_embeddings()
    handle = head.register_forward_hook(lambda *a: None)  # a hook must run: not fused
    assert not lean.fused_head(head, torch.zeros(1))
    handle.remove()
    assert lean.fused_head(head, torch.zeros(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        token_nll(peft, batch)[0].sum().backward()
    assert not lean.fused_head(peft.get_output_embeddings(), torch.zeros(1, dtype=torch.bfloat16))


def test_token_nll_with_autograd_matches_cross_entropy(tiny_llama):
    """token_nll's training loss (SoftmaxNll) gives the per-row NLL and the LoRA gradients of
    the same model scored with F.cross_entropy."""
    from lorasum.data import Batch
    from lorasum.evaluate import counted_logits, token_nll

    peft = _peft_tiny(tiny_llama, dropout=0.0)
    torch.manual_seed(2)
    ids = torch.randint(3, 100, (3, 12))
    counted = torch.ones_like(ids, dtype=torch.bool)
    counted[0, :4] = False
    batch = Batch(ids, torch.ones_like(ids), counted, torch.zeros(3, dtype=torch.long))
    params = [p for p in peft.parameters() if p.requires_grad]

    per_row, counts = token_nll(peft, batch)
    got = torch.autograd.grad(per_row.sum() / counts.sum(), params)
    logits, targets = counted_logits(peft, batch)
    ref = nn.functional.cross_entropy(logits, targets, reduction="sum") / counts.sum()
    want = torch.autograd.grad(ref, params)
    torch.testing.assert_close(per_row.sum() / counts.sum(), ref.detach())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)


def test_attention_under_autograd_runs_in_fp32_and_gives_sdpa_numbers(tiny_llama, monkeypatch):
    """bf16 autocast on a CPU: with autograd the attention runs in fp32 (the output and the
    gradients agree with an fp32 attention to bf16 rounding); without autograd it is sdpa's own
    bf16 call, bitwise; the model's attention implementation is back after the block."""
    from lorasum.training.low_memory import FP32_ATTENTION, fp32_attention_backward

    peft = _peft_tiny(tiny_llama, dropout=0.0)
    ids = torch.randint(3, 100, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: the mask path, not only is_causal

    def run(grad: bool, takeover: bool):
        peft.zero_grad()
        with (
            fp32_attention_backward(peft, enabled=takeover) as switched,
            torch.autocast("cpu", dtype=torch.bfloat16),
            torch.set_grad_enabled(grad),
        ):
            assert switched == takeover
            if takeover:
                assert peft.get_base_model().config._attn_implementation == FP32_ATTENTION
            logits = peft(input_ids=ids, attention_mask=mask).logits.float()
        grads = {}
        if grad:
            logits[mask.bool()].square().mean().backward()
            grads = {k: p.grad.clone() for k, p in peft.named_parameters() if p.grad is not None}
        return logits.detach(), grads

    seen: list[torch.dtype] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        seen.append(q.dtype)
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    layers = peft.get_base_model().config.num_hidden_layers
    assert torch.equal(run(False, True)[0], run(False, False)[0])  # no autograd: sdpa's own
    seen.clear()
    with torch.autocast("cpu", enabled=False):
        inner = torch.nn.functional.scaled_dot_product_attention
        spied_autocast: list[bool] = []

        def spy_autocast(q, *args, **kwargs):  # was autocast on inside the attention call?
            spied_autocast.append(torch.is_autocast_enabled("cpu"))
            return inner(q, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy_autocast)
    taken, g_taken = run(True, True)
    assert spied_autocast == [False] * layers and seen == [torch.float32] * layers  # fp32
    spied_autocast.clear()
    seen.clear()
    plain, g_plain = run(True, False)
    assert spied_autocast == [True] * layers  # autocast's own (bf16) attention
    assert not torch.equal(taken, plain)
    assert peft.get_base_model().config._attn_implementation == "sdpa"
    keep = mask.bool()
    torch.testing.assert_close(taken[keep], plain[keep], rtol=5e-2, atol=5e-2)
    assert g_taken.keys() == g_plain.keys() and g_taken
    for k in g_taken:
        cos = torch.nn.functional.cosine_similarity(g_taken[k].flatten(), g_plain[k].flatten(), 0)
        assert cos > 0.99, k


# --- evaluation: folded LoRA weights ------------------------------------------------------------


def _count_folds(monkeypatch) -> list[int]:
    import lorasum.training.low_memory as lean_module

    calls: list[int] = []
    real = lean_module.folded_weight

    def counting(layer, name):
        calls.append(1)
        return real(layer, name)

    monkeypatch.setattr(lean_module, "folded_weight", counting)
    return calls


def test_folded_lora_gives_peft_logits_in_fp32_eval_and_leaves_the_weights(tiny_llama, monkeypatch):
    model = _peft(tiny_llama).eval()  # dropout 0.1: identity in eval, as PEFT has it
    ids = torch.randint(3, 100, (3, 20))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = _count_folds(monkeypatch)
    with torch.no_grad():
        peft_logits = model(input_ids=ids).logits
        with folded_lora(model) as n:
            folded = model(input_ids=ids).logits
    assert n == len(leanable(model)) == 2 * 5 and len(calls) == n  # every module, once
    torch.testing.assert_close(folded, peft_logits, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all("forward" not in vars(m) for m in leanable(model))
    # the oracle of one module: x (W + s B A)ᵀ + bias in float64
    layer = leanable(model)[0]
    x = torch.randn(5, layer.in_features)
    W = layer.base_layer.weight.double() + layer.scaling["default"] * (
        layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
    )
    with torch.no_grad(), folded_lora(model):
        torch.testing.assert_close(layer(x).double(), x.double() @ W.T, rtol=1e-5, atol=1e-6)


def test_folded_lora_leaves_grad_train_bf16_and_disabled_adapters_to_peft(tiny_llama, monkeypatch):
    model = _peft(tiny_llama)
    ids = torch.randint(3, 100, (2, 12))
    calls = _count_folds(monkeypatch)
    model.eval()
    with folded_lora(model):
        with_grad = model(input_ids=ids).logits  # autograd on: PEFT's own forward
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            amp = model(input_ids=ids).logits
        with torch.no_grad(), model.disable_adapter():
            base = model(input_ids=ids).logits
    assert calls == []
    assert torch.equal(with_grad, model(input_ids=ids).logits)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(amp, model(input_ids=ids).logits)
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(base, model(input_ids=ids).logits)
    model.train()
    with torch.no_grad(), folded_lora(model):
        torch.manual_seed(0)
        trained = model(input_ids=ids).logits  # dropout on: not folded
    torch.manual_seed(0)
    with torch.no_grad():
        assert torch.equal(trained, model(input_ids=ids).logits)
    assert calls == []


def test_folded_lora_inside_lean_restores_lean_then_the_class_forward(tiny_llama, monkeypatch):
    """Validation during training: the fold nests in `lean` and gives lean's binding back."""
    model = _peft(tiny_llama)
    calls = _count_folds(monkeypatch)
    ids = torch.randint(3, 100, (2, 12))
    with lean(model):
        leaned = {id(m): vars(m)["forward"] for m in leanable(model)}
        model.eval()
        with torch.no_grad(), folded_lora(model):
            model(input_ids=ids)
        assert all(vars(m)["forward"] is leaned[id(m)] for m in leanable(model))
        model.train()
    assert calls and all("forward" not in vars(m) for m in leanable(model))


def test_evaluate_batches_folds_in_fp32_with_the_same_perplexity(tiny_llama, monkeypatch):
    import lorasum.evaluate as ev
    from lorasum.data import Batch

    model = _peft(tiny_llama).eval()
    ids = torch.randint(3, 100, (4, 16))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 10:] = False  # padding
    counted = mask.clone()
    counted[:, :6] = False  # prompt
    batch = Batch(
        input_ids=ids,
        attention_mask=mask.long(),
        counted=counted,
        dataset=torch.tensor([0, 1, 0, 1]),
    )
    calls = _count_folds(monkeypatch)
    folded = ev.evaluate_batches(model, [batch], ["a", "b"], torch.device("cpu"))
    assert calls
    monkeypatch.setattr(ev, "folded_lora", lambda model, enabled: contextlib.nullcontext(0))
    peft = ev.evaluate_batches(model, [batch], ["a", "b"], torch.device("cpu"))
    assert folded["tokens"] == peft["tokens"] > 0
    for name in ("a", "b"):
        assert folded["per_dataset"][name]["nll"] == pytest.approx(
            peft["per_dataset"][name]["nll"], rel=1e-6
        )


@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")
def test_folded_lora_leaves_a_lora_bias_to_peft(tiny_llama, monkeypatch):
    """PEFT's ``lora_bias`` adds a bias to lora_B, which W + s·B·A does not hold: not folded."""
    model = load_tiny(tiny_llama)
    torch.manual_seed(3)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_bias=True)
    model = get_peft_model(model, cfg).eval()
    for layer in leanable(model):
        nn.init.normal_(layer.lora_B["default"].weight)
        nn.init.normal_(layer.lora_B["default"].bias)
    calls = _count_folds(monkeypatch)
    ids = torch.randint(3, 100, (2, 12))
    with torch.no_grad():
        peft_logits = model(input_ids=ids).logits
        with folded_lora(model):
            assert torch.equal(model(input_ids=ids).logits, peft_logits)
    assert calls == []
