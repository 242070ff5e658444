"""quietstar_ops.py: each lean or fast version against the plain reference beside it."""
import math

import pytest
import torch
import torch.nn.functional as F

from model import attention_mask
from quietstar_ops import chunked_thought_attention, joint_block_mask, joint_flex_attention, \
    sample_by_inverse_cdf, thought_attention, token_nll
from test_quietstar import V, batch_with_padding, tiny_quietstar
from train import enable_activation_checkpointing


def random_branch_inputs(B=2, H=4, Hkv=2, L=7, P=2, M=3, D=8, window=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, 5:] = False                                                  # padding
    visible = attention_mask(0, L, valid, window, "cpu")[:, 0]            # (B, L, L)
    return (r(B, H, P * L, M, D), r(B, Hkv, L, D), r(B, Hkv, L, D), r(B, Hkv, P * L, M, D),
            r(B, Hkv, P * L, M, D), visible)


@pytest.mark.parametrize("window, per_chunk", [(None, 2), (3, 2), (3, 1), (None, 100)])
def test_chunked_attention_equals_reference_with_gradients(window, per_chunk):
    q, kt, vt, kb, vb, visible = random_branch_inputs(window=window)
    P = q.shape[2] // kt.shape[2]
    ref = thought_attention(q, kt, vt, kb, vb, visible.repeat(1, P, 1))
    out = chunked_thought_attention(q, kt, vt, kb, vb, visible, window, per_chunk)
    assert (out - ref).abs().max() < 1e-12
    weights = torch.randn_like(ref)
    grads_ref = torch.autograd.grad((ref * weights).sum(), (q, kt, vt, kb, vb))
    grads = torch.autograd.grad((out * weights).sum(), (q, kt, vt, kb, vb))
    for a, b in zip(grads, grads_ref):
        assert (a - b).abs().max() < 1e-12


@pytest.mark.parametrize("window", [None, 4])
def test_joint_attention_flex_and_chunked_equal_reference(window):
    """The three ways _joint_pass can attend, on the same q, k, v of [text ; branches]:
    flex (eager on the CPU, forward only) and chunked against the reference."""
    torch.manual_seed(0)
    qs = tiny_quietstar(sliding_window=window)
    B, L, P, M = 2, 9, 2, qs.config.branch_len
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, 6:] = False
    S, H, Hkv, D = L + P * L * M, 4, 2, 8
    q, k, v = torch.randn(B, H, S, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    outs = {}
    for impl in ("reference", "chunked", "flex"):
        qs.attention_impl = impl
        with torch.no_grad():
            outs[impl] = qs._joint_attention(valid, P * L, M)(q, k, v)
    assert (outs["chunked"] - outs["reference"]).abs().max() < 1e-5
    assert (outs["flex"] - outs["reference"]).abs().max() < 1e-5
    mask = joint_block_mask(valid, M, S, window)
    assert (joint_flex_attention(q, k, v, mask) - outs["reference"]).abs().max() < 1e-5


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    """FlexAttention's autograd path on the CPU: torch 2.13 refuses backward on the CPU in a
    front-end check only; past it, eager flex runs its (unfused) math forward and backward
    with the block mask. This tests the mask and the gradients, not CUDA's fused kernel
    (gpu_check.py does that on a GPU)."""
    import torch.nn.attention.flex_attention as flex
    monkeypatch.setattr(flex, "_validate_device", lambda *args: None)
    monkeypatch.setattr(flex, "_warn_once", lambda *args, **kwargs: None)     # "unfused"
    made = []
    create = flex.create_block_mask
    monkeypatch.setattr(flex, "create_block_mask", lambda *a, **k: made.append(1) or create(*a, **k))
    return made


@pytest.mark.parametrize("window", [None, 4])
def test_flex_gradients_equal_reference(flex_backward_on_cpu, window):
    torch.manual_seed(6)
    qs = tiny_quietstar(sliding_window=window)
    B, L, P, M = 2, 9, 2, qs.config.branch_len
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, 6:] = False                                                  # padding
    S, H, Hkv, D = L + P * L * M, 4, 2, 8
    inputs = [torch.randn(B, h, S, D, requires_grad=True) for h in (H, Hkv, Hkv)]
    weights = torch.randn(B, H, S, D)
    results = {}
    for impl in ("reference", "flex"):
        qs.attention_impl = impl
        out = qs._joint_attention(valid, P * L, M)(*inputs)
        results[impl] = out, torch.autograd.grad((out * weights).sum(), inputs)
    (ref, ref_grads), (out, grads) = results["reference"], results["flex"]
    assert (out - ref).abs().max() < 1e-5
    for name, a, b in zip("qkv", grads, ref_grads):
        assert (a - b).abs().max() < 1e-5, name


def test_flex_training_step_builds_one_mask(flex_backward_on_cpu):
    """A whole loss and backward with flex, two blocks, activation checkpointing: one block
    mask for the joint pass (not one per block and per recomputation), and the loss and every
    gradient of the reference path."""
    torch.manual_seed(7)
    qs = tiny_quietstar(sliding_window=5).double()      # the policy term (x 1e6) magnifies rounding
    enable_activation_checkpointing(qs)
    tokens = batch_with_padding()
    thoughts = qs.sample_thoughts(tokens)
    results = {}
    for impl in ("reference", "flex"):
        qs.attention_impl = impl
        qs.zero_grad()
        flex_backward_on_cpu.clear()
        loss, _ = qs.loss(tokens, thoughts)
        loss.backward()
        results[impl] = loss.item(), {n: p.grad.clone() for n, p in qs.named_parameters()}
    assert len(flex_backward_on_cpu) == 1 and len(qs.model.layers) == 2
    (loss_ref, grads_ref), (loss_flex, grads_flex) = results["reference"], results["flex"]
    assert math.isclose(loss_ref, loss_flex, rel_tol=1e-6)
    worst = max(((grads_flex[n] - g).abs().max() / g.abs().max()).item() for n, g in grads_ref.items())
    assert worst < 1e-5, worst


def test_whole_forward_equal_for_every_attention_impl():
    torch.manual_seed(1)
    qs = tiny_quietstar(sliding_window=5)
    tokens = batch_with_padding()
    thoughts = qs.sample_thoughts(tokens)
    results = {}
    for impl in ("reference", "chunked"):
        qs.attention_impl = impl
        qs.zero_grad()
        loss, m = qs.loss(tokens, thoughts)
        loss.backward()
        results[impl] = loss.item(), {n: p.grad.clone() for n, p in qs.named_parameters()}
    (loss_ref, grads_ref), (loss_chunked, grads_chunked) = results["reference"], results["chunked"]
    assert math.isclose(loss_ref, loss_chunked, rel_tol=1e-6)
    for name, g in grads_ref.items():
        assert (grads_chunked[name] - g).abs().max() <= 1e-5 * g.abs().max() + 1e-9, name


@pytest.mark.parametrize("temperature, rows", [(1.0, 3), (3.0, 5), (3.0, None)])
def test_token_nll_equals_full_logits_with_gradients(temperature, rows):
    torch.manual_seed(2)
    output = torch.nn.Linear(16, 40, bias=False).double()
    h = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 38, (2, 7))
    excluded = torch.tensor([38, 39])
    logits = output(h).index_fill(-1, excluded, -math.inf) / temperature
    ref = F.cross_entropy(logits.reshape(-1, 40), targets.reshape(-1), reduction="none").view(2, 7)
    nll = token_nll(output, h, targets, temperature, excluded, rows_per_chunk=rows)
    assert nll.shape == (2, 7) and (nll - ref).abs().max() < 1e-12
    weights = torch.rand(2, 7, dtype=torch.float64)
    g_ref = torch.autograd.grad((ref * weights).sum(), (h, output.weight))
    g = torch.autograd.grad((nll * weights).sum(), (h, output.weight))
    for a, b in zip(g, g_ref):
        assert (a - b).abs().max() < 1e-12


def test_token_nll_is_float32_from_bfloat16():
    """Rewards are differences of losses near 10: bf16 would round them by ~0.05."""
    torch.manual_seed(3)
    output = torch.nn.Linear(16, 40, bias=False).bfloat16()
    h = torch.randn(5, 16).bfloat16()
    targets = torch.randint(0, 40, (5,))
    nll = token_nll(output, h, targets)
    assert nll.dtype == torch.float32
    assert torch.equal(nll, F.cross_entropy(output(h).float(), targets, reduction="none"))


def test_inverse_cdf_sampling_follows_the_distribution():
    torch.manual_seed(4)
    logits = torch.randn(6) * 2
    logits[[1, 4]] = -math.inf                                 # like the delimiters: never drawn
    n = 40000
    tokens = sample_by_inverse_cdf(logits.expand(n, 6), 1 - torch.rand(n), 1.0)
    freq = torch.bincount(tokens, minlength=6) / n
    assert (freq - logits.softmax(-1)).abs().max() < 0.01 and freq[[1, 4]].sum() == 0
    assert torch.equal(sample_by_inverse_cdf(logits[None], torch.ones(1), 0), logits.argmax()[None])


def test_thoughts_do_not_depend_on_batch_padding():
    """One generator per text: a text's thoughts are the same alone or padded in a batch."""
    torch.manual_seed(5)
    qs = tiny_quietstar()
    text = torch.randint(3, V, (1, 6))
    g = lambda: torch.Generator().manual_seed(9)
    alone = qs.sample_thoughts(text, generator=[g()])
    batch = torch.cat([F.pad(text, (0, 4), value=2), torch.randint(3, V, (1, 10))])
    together = qs.sample_thoughts(batch, generator=[g(), torch.Generator().manual_seed(1)])
    assert torch.equal(together[:1, :, :6], alone)
