"""
The two costly operations of a Quiet-STaR step, each as a plain reference and a lean version
that computes the same numbers (tests/test_quietstar_ops.py holds them together):

1. Attention of the thought branches (see quietstar.py for who sees whom).
   - thought_attention: the readable reference. Every branch token scores all text keys and
     its own branch keys, masked, one softmax. Keeps (rows, heads, L, M, L+M) probabilities.
   - chunked_thought_attention: the same, a block of positions at a time. A block scores
     only the text keys its positions can see (causal, window), and under autograd its
     scores are recomputed in backward instead of kept (torch.utils.checkpoint). Plain
     PyTorch: runs on every device; the CPU default.
   - joint_flex_attention: text and every branch as one sequence, one FlexAttention call
     with a block mask (blocks no query may see are skipped). Compiled, it is a fused
     flash-style kernel that keeps only the output and the log-sum-exp: the CUDA default.
2. The output layer's negative log-likelihood: token_nll takes hidden states and targets
   and never holds the (rows x vocabulary) logits, in chunks of rows that are recomputed in
   backward. Losses and rewards stay float32 whatever the compute dtype.
3. Sampling thought tokens with one random number per row (sample_by_inverse_cdf), and
   turning the step's metrics into floats with one host sync (metrics_to_floats).
"""

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# about this many float32 scores or logits per chunk (128 MiB): small enough to be a
# transient, big enough for efficient matmuls
CHUNK_ELEMENTS = 2 ** 25


def thought_attention(q, k_text, v_text, k_branch, v_branch, text_visible, branch_visible=None):
    """
    Attention for the thought branches of C positions at once.
    q:                (R, H, C, Mq, D)   the newest Mq branch tokens of each position
    k_text, v_text:   (R, Hkv, S, D)     keys/values of the text, shared by all branches
    k_branch, v_branch: (R, Hkv, C, Mk, D) every branch token so far (the queries are the last Mq)
    text_visible:     bool (R or 1, C, S) which text tokens position c's branch may see
    branch_visible:   bool (Mq, Mk) which branch keys each query sees; default causal, the
                      queries being the last Mq
    Returns (R, H, C, Mq, D). Scores against text and against the branch share one softmax,
    so this equals attention over [visible text ; own branch] done one position at a time.
    """
    R, H, C, Mq, D = q.shape
    Hkv, S, Mk = k_text.shape[1], k_text.shape[2], k_branch.shape[3]
    q = q.view(R, Hkv, H // Hkv, C, Mq, D) * D ** -0.5                # query heads grouped per k/v head
    text_scores = torch.einsum("rkgcmd,rksd->rkgcms", q, k_text)       # (R, Hkv, G, C, Mq, S)
    branch_scores = torch.einsum("rkgcmd,rkcnd->rkgcmn", q, k_branch)  # (R, Hkv, G, C, Mq, Mk)
    if branch_visible is None:
        query_index = torch.arange(Mk - Mq, Mk, device=q.device)[:, None]   # (Mq, 1)
        branch_visible = torch.arange(Mk, device=q.device) <= query_index    # (Mq, Mk) causal
    scores = torch.cat([
        text_scores.float().masked_fill(~text_visible[:, None, None, :, None, :], -torch.inf),
        branch_scores.float().masked_fill(~branch_visible, -torch.inf)], dim=-1)
    probs = scores.softmax(dim=-1).to(q.dtype)                          # (R, Hkv, G, C, Mq, S+Mk)
    out = (torch.einsum("rkgcms,rksd->rkgcmd", probs[..., :S], v_text) +
           torch.einsum("rkgcmn,rkcnd->rkgcmd", probs[..., S:], v_branch))
    return out.reshape(R, H, C, Mq, D)


def chunked_thought_attention(q, k_text, v_text, k_branch, v_branch, text_visible, window=None,
                              positions_per_chunk=None):
    """
    thought_attention for the training pass, where every text position i of a row has P
    branches (P = C // L) of M tokens each, ordered c = p * L + i.
    q (B, H, C, M, D); k_text, v_text (B, Hkv, L, D); k_branch, v_branch (B, Hkv, C, M, D);
    text_visible bool (B, L, L): what the branch at position i sees of the text. -> (B, H, C, M, D)
    Positions i0..i1-1 see text keys lo..i1-1 only (lo = i0 - window + 1 with a sliding window),
    so a block skips the keys it is masked from, and no block's scores outlive it.
    """
    B, H, C, M, D = q.shape
    L = k_text.shape[2]
    P = C // L
    if positions_per_chunk is None:     # bound the transient scores of one block
        positions_per_chunk = max(1, CHUNK_ELEMENTS // (B * H * P * M * (L + M)))
    recompute = torch.is_grad_enabled() and q.requires_grad

    def block(i0, i1, q, k_text, v_text, k_branch, v_branch):
        lo = max(0, i0 - window + 1) if window else 0
        pick = lambda t: t.unflatten(2, (P, L))[:, :, :, i0:i1].flatten(2, 3)   # (B, h, P*(i1-i0), M, D)
        visible = text_visible[:, i0:i1, lo:i1].repeat(1, P, 1)                   # (B, P*(i1-i0), i1-lo)
        return thought_attention(pick(q), k_text[:, :, lo:i1], v_text[:, :, lo:i1],
                                 pick(k_branch), pick(v_branch), visible)

    outs = []
    for i0 in range(0, L, positions_per_chunk):
        i1 = min(i0 + positions_per_chunk, L)
        inputs = (i0, i1, q, k_text, v_text, k_branch, v_branch)
        out = checkpoint(block, *inputs, use_reentrant=False, preserve_rng_state=False) \
            if recompute else block(*inputs)
        outs.append(out.unflatten(2, (P, i1 - i0)))                               # (B, H, P, i1-i0, M, D)
    return torch.cat(outs, dim=3).flatten(2, 3)                                   # (B, H, C, M, D)


def joint_mask_mod(L, M, text_valid, window):
    """
    FlexAttention mask for one sequence per row: the L text tokens, then C = P * L branches
    of M tokens (branch c belongs to text position c % L). Query q may see key k when
      text query i:            k is text, k <= i, within the window, real (or k == i)
      branch token m of c at i: k is text as for the text query i, or k is token m' <= m of
                                its own branch c.
    text_valid: bool (B, L), False at padding.
    """
    def position(index):                       # -> text position, branch id, index in branch
        is_text = index < L
        branch = (index - L).clamp(min=0) // M
        return torch.where(is_text, index, branch % L), branch, (index - L) % M, is_text

    def mask_mod(b, h, q_idx, kv_idx):
        qi, q_branch, q_m, q_text = position(q_idx)
        ki, k_branch, k_m, k_text = position(kv_idx)
        sees_text = k_text & (ki <= qi) & (text_valid[b, ki] | (ki == qi))
        if window is not None:
            sees_text = sees_text & (qi - ki < window)
        sees_own_branch = ~q_text & ~k_text & (q_branch == k_branch) & (k_m <= q_m)
        return sees_text | sees_own_branch
    return mask_mod


def joint_block_mask(text_valid, M, S, window=None):
    """The BlockMask of joint_mask_mod for sequences of S = L + C * M tokens, on text_valid's
    device. Made once per joint pass and shared by every block (and by checkpointing's
    recomputation): building it costs a pass over all (query, key) blocks, 0.5 GiB and
    seconds at 7,424 tokens, and inside a compiled block it would break the graph."""
    from torch.nn.attention.flex_attention import create_block_mask
    B, L = text_valid.shape
    return create_block_mask(joint_mask_mod(L, M, text_valid, window), B, None, S, S,
                             device=text_valid.device)


_compiled_flex = None


def flex_kernel(device):
    """flex_attention compiled (a fused flash-style kernel, blocks of the mask that are all
    False skipped, no score matrix kept) on CUDA; elsewhere eager: slow, and without backward
    on the CPU (a check, not a path; the tests run its backward past that front-end check)."""
    from torch.nn.attention.flex_attention import flex_attention
    global _compiled_flex
    if device.type != "cuda":
        return flex_attention
    _compiled_flex = _compiled_flex or torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def joint_flex_attention(q, k, v, block_mask):
    """
    Text and branches in one FlexAttention call. q (B, H, S, D), k, v (B, Hkv, S, D) with
    S = L + C * M (text first); block_mask from joint_block_mask. -> (B, H, S, D).
    """
    return flex_kernel(q.device)(q, k, v, block_mask=block_mask, enable_gqa=True)


def token_nll(output, h, targets, temperature=1.0, excluded=None, rows_per_chunk=None):
    """
    -log softmax(output(h) / temperature)[target] for every row, in float32.
    output: the output layer (d -> V); h (..., d); targets long (...); excluded: token ids
    whose logits are set to -inf first (Quiet-STaR's delimiters). -> (...) float32.
    The logits are made a chunk of rows at a time and never kept: under autograd each
    chunk is recomputed in backward, so memory holds one chunk of (rows x V) at most.
    """
    d, V = h.shape[-1], output.weight.shape[0]
    flat_h, flat_targets = h.reshape(-1, d), targets.reshape(-1)
    rows = rows_per_chunk or max(1, CHUNK_ELEMENTS // V)
    recompute = torch.is_grad_enabled() and h.requires_grad

    def nll(h, targets):
        logits = output(h)                                                   # (rows, V)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> float32
        if excluded is not None:
            logits = logits.index_fill(-1, excluded, -math.inf)
        return F.cross_entropy(logits / temperature, targets, reduction="none")

    parts = []
    for r in range(0, flat_h.shape[0], rows):
        inputs = (flat_h[r:r + rows], flat_targets[r:r + rows])
        parts.append(checkpoint(nll, *inputs, use_reentrant=False, preserve_rng_state=False)
                     if recompute else nll(*inputs))
    return torch.cat(parts).view(targets.shape)


def sample_by_inverse_cdf(logits, uniforms, temperature):
    """One token per row of logits (..., V), given one uniform number in (0, 1] per row: the
    first token whose cumulative probability reaches it. (multinomial would draw a random
    number per vocabulary entry: 11% of a CPU training step.) -> (...) long"""
    if temperature == 0:
        return logits.argmax(-1)
    cdf = (logits.float() / temperature).softmax(-1).cumsum(-1)                  # (..., V)
    u = (uniforms * cdf[..., -1]).unsqueeze(-1).contiguous()                    # (..., 1)
    return torch.searchsorted(cdf, u).squeeze(-1).clamp(max=logits.shape[-1] - 1)


def metrics_to_floats(metrics):
    """{name: 0-d tensor} -> {name: float} with one host sync for all of them."""
    names = list(metrics)
    values = torch.stack([metrics[n].detach().float() for n in names])
    if values.device.type == "meta" or _is_fake(values):
        return {n: float("nan") for n in names}       # a dry run on shapes only has no numbers
    return dict(zip(names, values.tolist()))


def _is_fake(t):       # a FakeTensorMode tensor (estimate.py): shapes and devices, no data
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t)
