"""model.py against Hugging Face transformers (stored logits) and against itself."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import ModelArgs, Transformer, apply_rope, rope_cos_sin, sample

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
HF_DIR = os.path.join(FIXTURES, "mistral_tiny_hf")
MISTRAL_DIR = os.path.join(FIXTURES, "mistral_tiny_mistral")
REF = load_file(os.path.join(FIXTURES, "mistral_tiny_logits.safetensors"))


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def tiny_model(**overrides):
    args = ModelArgs.from_name("tiny", vocab_size=300, **overrides)
    return Transformer(args).eval()


# -----------------------------------------------------------------------------
# parity with Hugging Face's MistralForCausalLM

@pytest.mark.parametrize("path", [HF_DIR, MISTRAL_DIR], ids=["hf-layout", "mistral-layout"])
def test_logits_equal_transformers(path):
    model = Transformer.from_pretrained(path)
    a = model.args   # the fixture covers GQA, a window shorter than the input, rope_theta
    assert (a.n_heads, a.n_kv_heads, a.sliding_window, a.rope_theta) == (4, 2, 6, 5000.0)
    assert REF["tokens"].shape[1] > a.sliding_window
    with torch.no_grad():
        logits = model(REF["tokens"])
    assert logits.shape == (2, 16, 300) and logits.dtype == torch.float32
    assert rel_err(logits, REF["logits"]) <= 1e-4


def test_left_padded_batch_equals_transformers():
    model = Transformer.from_pretrained(HF_DIR)
    valid = REF["padded_valid"]
    with torch.no_grad():
        logits = model(REF["padded_tokens"], REF["padded_positions"], key_valid=valid)
    assert rel_err(logits[valid], REF["padded_logits"][valid]) <= 1e-4


def test_both_layouts_load_the_same_weights():
    hf, mistral = Transformer.from_pretrained(HF_DIR), Transformer.from_pretrained(MISTRAL_DIR)
    for (name, a), (_, b) in zip(hf.state_dict().items(), mistral.state_dict().items()):
        assert torch.equal(a, b), name


def test_save_pretrained_round_trip(tmp_path):
    model = Transformer.from_pretrained(MISTRAL_DIR)
    model.save_pretrained(str(tmp_path))
    # what we write is what transformers wrote, tensor for tensor (q/k permuted back)
    ours = load_file(str(tmp_path / "model.safetensors"))
    theirs = {}
    for f in os.listdir(HF_DIR):
        if f.endswith(".safetensors"):
            theirs.update(load_file(os.path.join(HF_DIR, f)))
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    reloaded = Transformer.from_pretrained(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(reloaded(REF["tokens"]), model(REF["tokens"]))
    assert not any(f.endswith(".tmp") for f in os.listdir(tmp_path))


def test_load_in_bfloat16():
    model = Transformer.from_pretrained(HF_DIR, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        assert rel_err(model(REF["tokens"]), REF["logits"]) < 0.05


# -----------------------------------------------------------------------------
# the model against itself

def test_kv_cache_decoding_equals_full_recompute():
    model = tiny_model(sliding_window=5)
    tokens = torch.randint(0, 300, (2, 14))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(2, 14)
        steps = [model(tokens[:, :6])]                       # prefill, longer than the window
        steps += [model(tokens[:, i:i + 1], start=i) for i in range(6, 14)]
        model.clear_cache()
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_sliding_window_matters_only_beyond_the_window():
    tokens = torch.randint(0, 300, (1, 12))
    narrow = tiny_model(sliding_window=4)
    wide = tiny_model(sliding_window=None)
    wide.load_state_dict(narrow.state_dict())
    with torch.no_grad():
        a, b = narrow(tokens), wide(tokens)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6)     # nothing cut off yet
    assert not torch.allclose(a[:, 4:], b[:, 4:], atol=1e-3)


def test_explicit_positions_act_as_a_shift():
    model = tiny_model()
    tokens = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        base = model(tokens)
        shifted = model(tokens, positions=torch.arange(10) + 37)
        per_row = model(tokens, positions=torch.stack([torch.arange(10) + 5, torch.arange(10)]))
    # rotary attention depends only on position differences
    assert torch.allclose(shifted, base, atol=1e-4)
    assert torch.allclose(per_row, base, atol=1e-4)
    # but not on positions that break the order
    with torch.no_grad():
        scrambled = model(tokens, positions=torch.arange(10).flip(0))
    assert not torch.allclose(scrambled, base, atol=1e-3)


def test_rope_keeps_lengths_and_makes_scores_depend_on_distance_only():
    """Properties, not the formula: each rotated pair keeps its length, and q.k after the
    rotation depends only on how far apart the two positions are."""
    q, k = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8)     # (B, T, H, D)
    rotate = lambda x, p: apply_rope(x, *rope_cos_sin(torch.tensor([p]), 8, 10000.0))
    pair_length = lambda x: x.view(*x.shape[:-1], 4, 2).norm(dim=-1)
    assert torch.allclose(pair_length(rotate(q, 7)), pair_length(q), atol=1e-5)
    score = lambda pq, pk: (rotate(q, pq) * rotate(k, pk)).sum(-1)
    assert torch.allclose(score(5, 2), score(13, 10), atol=1e-4)
    assert torch.allclose(score(0, 0), (q * k).sum(-1), atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 3), atol=1e-3)


def test_generate_is_deterministic_and_batch_independent():
    model = tiny_model()
    prompts = [[1, 5, 9, 12], [1, 7], [3, 3, 3, 3, 3, 3]]
    g = lambda seed: torch.Generator().manual_seed(seed)
    a = model.generate(prompts, 8, temperature=1.0, generator=g(1))
    b = model.generate(prompts, 8, temperature=1.0, generator=g(1))
    assert a == b and all(len(row) == 8 for row in a)
    greedy = model.generate(prompts, 8, temperature=0, eos_id=-1)
    alone = [model.generate([p], 8, temperature=0, eos_id=-1)[0] for p in prompts]
    assert greedy == alone                      # left padding changes nothing
    # and greedy decoding is the argmax of a full recompute at every step
    seq = prompts[0] + greedy[0]
    with torch.no_grad():
        logits = model(torch.tensor([seq]))[0]
    assert logits[len(prompts[0]) - 1:-1].argmax(-1).tolist() == greedy[0]


def test_generate_stops_at_eos():
    model = tiny_model()
    first = model.generate([[1, 2, 3]], 5, temperature=0, eos_id=-1)[0]
    out = model.generate([[1, 2, 3], [4, 5]], 5, temperature=0, eos_id=first[1])
    assert out[0] == first[:2]                  # ends with the EOS it produced
    assert len(out[1]) <= 5


def test_sample_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    assert set(sample(logits, 1.0, top_p=0.7, generator=g).tolist()) == {0, 1}
    assert set(sample(logits, 1.0, top_p=0.85, generator=g).tolist()) == {0, 1, 2}
    assert set(sample(logits, 0).tolist()) == {0}
    freq = torch.bincount(sample(logits, 1.0, generator=g), minlength=4) / 2000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.04)


def test_presets():
    a = ModelArgs.from_name("mistral-7b")
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.hidden_dim) == \
        (4096, 32, 32, 8, 128, 14336)
    assert (a.vocab_size, a.norm_eps, a.rope_theta, a.sliding_window) == (32000, 1e-5, 1e4, 4096)
    with torch.device("meta"):
        assert Transformer(a).num_params() == 7_241_732_096
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelArgs.from_name("mistral-8b")


# -----------------------------------------------------------------------------
# bad checkpoints give errors that name the file and the problem

def copy_checkpoint(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_missing_shard(tmp_path):
    ckpt = copy_checkpoint(HF_DIR, tmp_path)
    os.remove(ckpt / "model-00003-of-00005.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00003-of-00005.safetensors: weight file missing"):
        Transformer.from_pretrained(str(ckpt))


def test_no_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json .* or params.json"):
        Transformer.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        Transformer.from_pretrained(str(tmp_path / "nowhere"))


def test_missing_and_unexpected_keys(tmp_path):
    ckpt = copy_checkpoint(MISTRAL_DIR, tmp_path)
    weights = load_file(str(ckpt / "consolidated.safetensors"))
    save_file({k: v for k, v in weights.items() if k != "norm.weight"},
              str(ckpt / "consolidated.safetensors"))
    with pytest.raises(ValueError, match="lacks 1 tensors.*norm.weight"):
        Transformer.from_pretrained(str(ckpt))
    save_file({**weights, "layers.0.attention.bias": torch.zeros(3)},
              str(ckpt / "consolidated.safetensors"))
    with pytest.raises(ValueError, match="consolidated.safetensors: unexpected tensor 'layers.0.attention.bias'"):
        Transformer.from_pretrained(str(ckpt))


def test_shape_mismatch(tmp_path):
    ckpt = copy_checkpoint(MISTRAL_DIR, tmp_path)
    params = json.load(open(ckpt / "params.json"))
    json.dump({**params, "hidden_dim": 128}, open(ckpt / "params.json", "w"))
    with pytest.raises(ValueError, match=r"consolidated.safetensors: tensor 'layers.0.feed_forward.w1.weight' has shape \(96, 64\), the config says \(128, 64\)"):
        Transformer.from_pretrained(str(ckpt))


def test_truncated_safetensors(tmp_path):
    ckpt = copy_checkpoint(MISTRAL_DIR, tmp_path)
    data = (ckpt / "consolidated.safetensors").read_bytes()
    (ckpt / "consolidated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="consolidated.safetensors: cannot read this safetensors file"):
        Transformer.from_pretrained(str(ckpt))
