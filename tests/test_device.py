"""
A GPU dry run without a GPU: the whole training step and thinking generation at
Mistral-7B's shapes (all 32 layers, the paper's 256-token window, 9 thought tokens, 4 talk
steps, 2 thoughts) on the meta device, which holds shapes and no data.

Every tensor the code makes must be made on the model's device: one made without device=
lands on the CPU and mixing it with a meta tensor fails here exactly as it would on CUDA
("Expected all tensors to be on the same device"). A host sync that needs a value
(.item(), .tolist(), `if tensor:`) fails here too, so the training hot path has none but
the one per step that logs and checks the metrics (which a dry run reports as NaN).
The CPU tests never see either kind of fault: everything there is on the CPU.
"""
import math

import pytest
import torch

from model import ModelArgs, Transformer
from quietstar import QuietStar, QuietStarConfig, quietstar_loss
from train import clip_gradients

META = torch.device("meta")


def mistral_quietstar(dtype=torch.float32, **config):
    with META:
        qs = QuietStar(Transformer(ModelArgs(vocab_size=32002)), QuietStarConfig(**config)).to(dtype)
    qs.init_thought_parameters()
    return qs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_step_at_mistral_shapes_on_meta(dtype):
    qs = mistral_quietstar(dtype).train()
    assert qs.model.args.n_layers == 32 and qs.config.n_thought_tokens == 9
    tokens = torch.randint(3, 32000, (1, 256), device=META)
    valid = torch.ones(1, 256, dtype=torch.bool, device=META)
    thoughts = qs.sample_thoughts(tokens, valid)
    assert thoughts.shape == (1, 2, 256, 9) and thoughts.device == META
    out = qs(tokens, thoughts, valid)
    loss, metrics = quietstar_loss(out, tokens, thoughts, valid, qs.config)
    assert loss.device == META and all(math.isnan(v) for v in metrics.values())
    loss.backward()
    assert all(p.grad is not None and p.grad.device == META for p in qs.parameters())
    norm = clip_gradients(qs, 1.0, fsdp=False)
    assert norm.device == META
    optimizer = torch.optim.AdamW(qs.parameters(), lr=1e-6, weight_decay=1e-3)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_thinking_generation_at_mistral_shapes_on_meta():
    qs = mistral_quietstar(torch.bfloat16).eval()
    new, thoughts = qs.generate_ids([[1, 415, 5565], [1, 22557]], 3, think=True, top_k=50, top_p=0.9)
    assert new.shape == (2, 3) and thoughts.shape == (2, 3, 9) and new.device == META
    new, _ = qs.generate_ids([[1, 415]], 2, think=False)
    assert new.shape == (1, 2)
    logits, thought = qs.next_token_logits_on_device([1, 415, 5565])
    assert logits.shape == (32002,) and thought.shape == (9,) and logits.device == META
    logits, _ = qs.next_token_logits_on_device([1, 415], thought=[5] * 9)
    assert logits.device == META


def test_the_dry_run_catches_a_tensor_made_without_device():
    """The point of this file: the very bug that crashed the first GPU step is caught."""
    qs = mistral_quietstar(n_thought_tokens=2, n_talk=2)
    with META:
        qs.model.layers = qs.model.layers[:1]
    tokens = torch.randint(3, 32000, (1, 16), device=META)
    original = torch.arange

    def arange_on_the_cpu(*args, **kwargs):     # the old code: torch.arange(L) with no device
        kwargs.pop("device", None)
        return original(*args, **kwargs)
    torch.arange = arange_on_the_cpu
    try:
        with pytest.raises((RuntimeError, ValueError), match="device"):
            qs(tokens, torch.zeros(1, 2, 16, 2, dtype=torch.long, device=META))
    finally:
        torch.arange = original


def test_no_cast_made_while_sampling_reaches_the_backward():
    """fp32 master weights with bf16 autocast (one GPU, DDP): train.py enters autocast once for
    sampling and once for the forward. In one context, the bf16 weight casts cached while
    sampling were reused by the forward: the oldest nodes of its graph, which hold
    every block's weight gradient to the end of the backward. (CPU autocast stands in for CUDA's.)"""
    import train
    from cli import make_settings
    cfg = make_settings(train.TrainConfig, dict(seq_len=16, docs_per_step=1, micro_batch_size=1,
                                                dtype="bfloat16", n_thought_tokens=2, n_talk=2))
    torch.manual_seed(0)
    with torch.device("cpu"):
        qs = QuietStar(Transformer(ModelArgs.from_name("tiny", vocab_size=1002)), train.quietstar_config(cfg))
    qs.config.delimiter_init_id = 7
    qs.init_thought_parameters()
    sampled_by = []
    sample = train.sample_thoughts

    def sample_and_mark(*args):      # a graph node made right after sampling: its sequence number
        thoughts = sample(*args)
        sampled_by.append((torch.ones(1, requires_grad=True) * 2).grad_fn._sequence_nr())
        return thoughts
    train.sample_thoughts = sample_and_mark
    try:
        tokens = torch.randint(3, 1000, (1, 16))
        loss, _, _ = train.micro_step(qs, qs, tokens, torch.ones(1, 16, dtype=torch.bool), [0], cfg, 0,
                                      train.autocast_context("cpu", cfg, fsdp=False))
    finally:
        train.sample_thoughts = sample
    casts, seen, stack = [], set(), [loss.grad_fn]
    while stack:                                          # every node of the backward graph
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node.name().startswith("ToCopyBackward"):
            casts.append(node._sequence_nr())
        stack += [f for f, _ in node.next_functions]
    assert len(casts) > 20                                # the forward's own casts are there
    assert min(casts) > sampled_by[0]                     # and none from sampling


@pytest.mark.parametrize("ffn_chunks", [1, 2])
def test_compiled_blocks_run_one_graph_per_pass_without_breaks(ffn_chunks):
    """train.py --compile with activation checkpointing: sampling (the text, then 9 steps of
    every branch), the training forward and backward, twice, with no graph break and no
    recompilation after the first step: one graph for the text pass, two for the branch steps
    (the first step, and the rest), one for the joint pass. (Breaks were: checkpointing's op
    refusing the sampling caches' mutation; recompiles: the cache growing at every step, past
    torch.compile's limit of 8; with ffn_chunks, a closure per block made each block recompile.)
    Dynamo only (backend="eager"): no compiler needed."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from test_quietstar import batch_with_padding, tiny_quietstar
    from train import blocks_of, enable_activation_checkpointing
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    qs = tiny_quietstar(sliding_window=5, n_layers=3, n_thought_tokens=9)
    enable_activation_checkpointing(qs, ffn_chunks)
    for block in blocks_of(qs):
        block.compile(backend="eager")
    tokens = batch_with_padding()
    graphs = []
    for _ in range(2):
        loss, _ = qs.loss(tokens, qs.sample_thoughts(tokens))
        loss.backward()
        graphs.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    assert not counters["graph_break"], list(counters["graph_break"])
    assert graphs == [4, 4] and not counters["recompiles"]
