"""
Mistral-7B in one file: the transformer, its KV cache, sampling, and loading/saving the
official weights in both layouts (Hugging Face's and Mistral's own).

    from model import ModelArgs, Transformer
    model = Transformer.from_pretrained("path/to/Mistral-7B-v0.1", device="cuda",
                                        dtype=torch.bfloat16)
    logits = model(tokens)                       # (B, T) -> (B, T, 32000), float32

The architecture, top to bottom: token embedding -> n_layers x [RMSNorm -> grouped-query
attention with rotary positions and a sliding window -> residual -> RMSNorm -> SwiGLU
feed-forward -> residual] -> RMSNorm -> output layer (not tied to the embedding).

Parameter names follow Mistral's reference code (`layers.N.attention.wq.weight`, ...), so
Mistral's `consolidated.safetensors` loads as is; Hugging Face's names are mapped on load
and on save. Rotary embeddings rotate adjacent pairs of dimensions (2i, 2i+1), as Mistral
does; Hugging Face rotates (i, i + d/2) and permutes the rows of wq/wk to match, so we undo
that permutation when loading its files (and redo it when saving).
"""

import json
import math
import os
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8             # grouped-query attention: 4 query heads share a k/v head
    head_dim: int = 128
    hidden_dim: int = 14336         # feed-forward width
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0     # Mistral-7B-v0.1; later Mistral models use 1e6
    sliding_window: Optional[int] = 4096  # a token sees at most this many tokens (itself too)

    @classmethod
    def from_name(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS = {
    "mistral-7b": dict(),  # the defaults above are Mistral-7B-v0.1
    # small enough to train on a laptop CPU, same shape of everything (GQA, window, ...)
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=384,
                 sliding_window=4096),
}


# -----------------------------------------------------------------------------
# the building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 for accuracy in bf16, then scale in the input's dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.type_as(x)


def rope_cos_sin(positions, head_dim, theta):
    """Rotation angles for positions (T,) or (B, T) (integers) -> cos, sin of shape
    (..., T, 1, D/2), float32, on positions' device, with D = head_dim. Pair i (dimensions
    2i, 2i+1) at position p turns by the angle p * theta^(-2i/D), i = 0 .. D/2 - 1: pair 0 by
    p radians, the last ones slowest. The 1 broadcasts over heads in apply_rope."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float()
                               / head_dim)                            # (D/2,)
    angles = positions.float()[..., None] * inv_freq                  # (..., T, D/2)
    return angles.cos()[..., None, :], angles.sin()[..., None, :]     # (..., T, 1, D/2)


def apply_rope(x, cos, sin):
    """Rotate each pair of adjacent dimensions (2i, 2i+1) of x (B, T, H, D) by its angle:
    (x_2i, x_2i+1) -> (x_2i cos - x_2i+1 sin, x_2i sin + x_2i+1 cos), with cos, sin
    (T, 1, D/2) or (B, T, 1, D/2) from rope_cos_sin. Computed in float32; returns x's shape
    and dtype."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)             # 2 x (B, T, H, D/2)
    rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)                             # (B, T, H, D)


class KVCache:
    """Keys and values of every token seen so far, for decoding one token at a time.
    (A plain object, not a module: it is no part of the model's weights.)"""

    def __init__(self, batch_size, max_seq_len, n_kv_heads, head_dim, dtype, device):
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, start, k, v):
        """Write k, v (B, Hkv, T, D) at [start, start+T); return all keys/values so far."""
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} tokens, asked to write up to {end}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]                  # (B, Hkv, end, D)


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.cache = None

    def project(self, x, cos, sin):
        """x (B, T, dim) -> q (B, H, T, D) and k, v (B, Hkv, T, D), rotary positions applied."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, cos, sin, mask, start, attend=None):
        """attend: optional function (q, k, v) -> (B, H, T, D) that replaces the attention
        below (Quiet-STaR's thought branches attend in their own pattern)."""
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if attend is not None:
            y = attend(q, k, v)
        else:
            if self.cache is not None:
                k, v = self.cache.update(start, k, v)                   # (B, Hkv, S, D)
            # mask None means plain causal attention over exactly the keys present
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               is_causal=mask is None and T > 1, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))            # (B, T, dim)


class FeedForward(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)     # gate
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)     # down
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)     # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, cos, sin, mask, start, attend=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, start, attend)
        return h + self.ffn(h)

    def ffn(self, h):
        # the feed-forward sublayer, its norm included: token-wise, so train.py can recompute
        # it in chunks of tokens (enable_activation_checkpointing's ffn_chunks)
        return self.feed_forward(self.ffn_norm(h))


def attention_mask(start, T, key_valid, window, device):
    """
    Which keys each query may see, or None when plain causal attention is right.
    The T queries sit at cache indices start..start+T-1; key s is visible to the query at
    index t when s <= t, t - s < window, and key_valid[b, s] (False marks padding).
    Returns a bool mask (B or 1, 1, T, start+T).
    """
    S = start + T
    if key_valid is None and (start == 0 or T == 1) and (window is None or S <= window):
        return None
    t = torch.arange(start, S, device=device)[:, None]                 # (T, 1)
    s = torch.arange(S, device=device)[None, :]                         # (1, S)
    mask = s <= t
    if window is not None:
        mask = mask & (t - s < window)
    if key_valid is not None:
        # a padding query still sees itself, so that no row of softmax is empty (NaN)
        mask = (mask & key_valid[:, None, :]) | (s == t)                # (B, T, S)
    return mask.view(-1, 1, T, S)


# -----------------------------------------------------------------------------
# the transformer

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per GPU, for MFU

class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.device.type != "meta":
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden(self, tokens, positions=None, start=0, key_valid=None):
        """
        tokens (B, T) -> final-normed hidden states (B, T, dim). tokens may also be input
        embeddings (B, T, dim), for inputs that are not rows of the embedding table.
        positions: rotary positions (T,) or (B, T); default start, start+1, ...
        start: cache index of the first token (only with a cache, see setup_cache).
        key_valid: bool (B, start+T), False where a token is padding no one may attend to.
        """
        B, T = tokens.shape[:2]
        if positions is None:
            positions = torch.arange(start, start + T, device=tokens.device)   # (T,)
        cos, sin = rope_cos_sin(positions, self.args.head_dim, self.args.rope_theta)
        mask = attention_mask(start, T, key_valid, self.args.sliding_window, tokens.device)
        h = tokens if tokens.is_floating_point() else self.tok_embeddings(tokens)  # (B, T, dim)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, start)
        return self.norm(h)

    def forward(self, tokens, positions=None, start=0, key_valid=None):
        """tokens (B, T) -> logits (B, T, vocab_size) in float32. Arguments as in hidden()."""
        return self.output(self.hidden(tokens, positions, start, key_valid)).float()

    def setup_cache(self, batch_size, max_seq_len):
        """Give every layer a KV cache; forward() then appends to it at index `start`."""
        p = self.output.weight
        for layer in self.layers:
            layer.attention.cache = KVCache(batch_size, max_seq_len, self.args.n_kv_heads,
                                            self.args.head_dim, p.dtype, p.device)

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.cache = None

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, context_len):
        """Forward FLOPs for one token that attends to context_len tokens (x3 for training)."""
        a = self.args
        matmul_params = self.num_params() - self.tok_embeddings.weight.numel()
        attention = 2 * 2 * a.n_layers * a.n_heads * a.head_dim * context_len  # q.k and p.v
        return 2 * matmul_params + attention

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 eos_id=2, generator=None):
        """
        Continue each prompt (a list of lists of token ids; lengths may differ).
        Returns a list of new-token lists, each ending at its first EOS (included).
        temperature 0 means greedy. Prompts are left-padded so they end together.
        """
        device = self.output.weight.device
        tokens, positions, key_valid = left_pad(prompts, max_new_tokens, device)
        B, P = tokens.shape

        self.setup_cache(B, P + max_new_tokens)
        try:
            logits = self(tokens, positions, 0, key_valid[:, :P])[:, -1]   # (B, vocab)
            out = torch.empty(B, 0, dtype=torch.long, device=device)
            done = torch.zeros(B, dtype=torch.bool, device=device)
            for i in range(max_new_tokens):
                next_token = sample(logits, temperature, top_k, top_p, generator)  # (B,)
                next_token = torch.where(done, eos_id, next_token)
                out = torch.cat([out, next_token[:, None]], dim=1)
                done |= next_token == eos_id
                if i == max_new_tokens - 1 or all_done(done):
                    break
                positions = positions[:, -1:] + 1                          # (B, 1)
                logits = self(next_token[:, None], positions, P + i, key_valid[:, :P + i + 1])[:, -1]
        finally:
            self.clear_cache()
        return [trim_at_eos(row, eos_id) for row in out.tolist()]

    # -------------------------------------------------------------------------
    # loading and saving the official checkpoints

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32):
        """Load a checkpoint directory in Hugging Face or Mistral layout (see load_checkpoint)."""
        args, state_dict, _ = load_checkpoint(path, device, dtype)
        with torch.device("meta"):          # no memory is allocated until the weights arrive
            model = cls(args)
        model.load_state_dict(state_dict, strict=True, assign=True)
        return model.eval()

    def save_pretrained(self, path, dtype=None):
        """Write config.json + model.safetensors in Hugging Face's layout (atomically)."""
        save_hf_checkpoint(self.args, self.state_dict(), path, dtype)


def left_pad(prompts, max_new_tokens, device, pad_id=0):
    """Prompts of different lengths -> tokens (B, P) padded on the left so that they end
    together, rotary positions (B, P) starting at 0 at each prompt's first token, and
    key_valid (B, P + max_new_tokens), False at the padding."""
    B, P = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    key_valid = torch.zeros(B, P + max_new_tokens, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        tokens[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
        key_valid[b, P - len(p):] = True
    positions = (key_valid[:, :P].cumsum(1) - 1).clamp(min=0)               # (B, P)
    return tokens, positions, key_valid


def all_done(done):
    """done.all() as a Python bool (a host sync: generation stops early). The meta device
    holds no values, so a dry run on it (tests/test_device.py) runs to max_new_tokens."""
    return done.device.type != "meta" and bool(done.all())


def trim_at_eos(tokens, eos_id):
    return tokens[:tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> one token per row (B,): greedy at temperature 0, else sampled.
    generator: a torch.Generator, or a list of B of them (then a row's draw does not depend
    on the other rows of the batch)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth_best = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]   # (B, 1)
        logits = logits.masked_fill(logits < kth_best, -math.inf)
    if top_p is not None:
        # keep the smallest set of best tokens whose probabilities add up to top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        mass_before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)
        sorted_logits = sorted_logits.masked_fill(mass_before > top_p, -math.inf)
        logits = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# -----------------------------------------------------------------------------
# checkpoint files: Hugging Face layout (config.json + model*.safetensors) and Mistral's
# own (params.json + consolidated.safetensors or consolidated.00.pth)

HF_NAMES = {  # Hugging Face name -> ours; "{}" is the layer number
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
}


def rename(name, table):
    """Map a parameter name through a table like HF_NAMES; None if it is not there."""
    parts = name.split(".")
    digits = [p for p in parts if p.isdigit()]
    template = ".".join("{}" if p.isdigit() else p for p in parts)
    return table[template].format(*digits) if template in table else None


def permute_for_rope(w, n_heads, to_hf):
    """
    Hugging Face stores wq/wk with each head's rows reordered (the even dims of a pair
    first, then the odd ones) for its rotate-half RoPE. to_hf=False undoes that.
    Use n_heads for wq and n_kv_heads for wk.
    """
    out_features, dim = w.shape
    half = out_features // n_heads // 2
    shape = (n_heads, half, 2, dim) if to_hf else (n_heads, 2, half, dim)
    return w.reshape(shape).transpose(1, 2).reshape(out_features, dim)


def read_json(file, required=()):
    """A JSON object from a file, with errors that name the file: not found, not JSON, not
    an object, or a required key missing."""
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: file not found") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object {{...}}, got {type(data).__name__}")
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{file}: missing key {missing[0]!r}")
    return data


def checked_args(file, values):
    """ModelArgs from {field: value}, each value of the field's type and in range."""
    for name, value in values.items():
        kind = {"norm_eps": float, "rope_theta": float}.get(name, int)
        if name == "sliding_window" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            raise ValueError(f"{file}: {name} should be {'a number' if kind is float else 'an integer'}, "
                             f"got {value!r}")
        if not value > 0:
            raise ValueError(f"{file}: {name} should be > 0, got {value!r}")
    args = ModelArgs(**values)
    if args.n_heads % args.n_kv_heads:
        raise ValueError(f"{file}: n_heads {args.n_heads} is not a multiple of n_kv_heads {args.n_kv_heads}")
    return args


def read_config(path):
    """Return (ModelArgs, layout) for a checkpoint directory; layout is "hf" or "mistral"."""
    hf_file, mistral_file = os.path.join(path, "config.json"), os.path.join(path, "params.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: checkpoint directory not found")
    if os.path.isfile(hf_file):
        c = read_json(hf_file, required=("hidden_size", "num_hidden_layers", "num_attention_heads",
                                         "intermediate_size", "vocab_size"))
        if c.get("hidden_act", "silu") != "silu" or c.get("tie_word_embeddings", False):
            raise ValueError(f"{hf_file}: not a Mistral architecture (needs hidden_act silu "
                             f"and untied embeddings)")
        # transformers >= 5 writes rope_theta inside "rope_parameters"; older files at the top
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"{hf_file}: rope_parameters should be an object, got {rope!r}")
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"{hf_file}: rope_type {rope['rope_type']!r} is not supported")
        dim, heads = c["hidden_size"], c["num_attention_heads"]
        numbers = all(isinstance(x, int) and x > 0 for x in (dim, heads))   # else checked_args says so
        args = dict(dim=dim, n_layers=c["num_hidden_layers"], n_heads=heads,
                    n_kv_heads=c.get("num_key_value_heads", heads),
                    head_dim=c.get("head_dim") or (dim // heads if numbers else 0),
                    hidden_dim=c["intermediate_size"], vocab_size=c["vocab_size"],
                    norm_eps=c.get("rms_norm_eps", 1e-5),
                    rope_theta=rope.get("rope_theta", c.get("rope_theta", 10000.0)),
                    sliding_window=c.get("sliding_window"))
        return checked_args(hf_file, args), "hf"
    if os.path.isfile(mistral_file):
        c = read_json(mistral_file, required=("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                                              "hidden_dim", "vocab_size"))
        known = {f.name for f in fields(ModelArgs)}
        # Mistral-7B-v0.1's params.json has no rope_theta: the dataclass default 10000 is right
        return checked_args(mistral_file, {k: v for k, v in c.items() if k in known}), "mistral"
    raise FileNotFoundError(f"{path}: no config.json (Hugging Face layout) or params.json "
                            f"(Mistral layout) in this directory")


def weight_files(path, layout):
    """The weight files of a checkpoint directory, checked to exist."""
    if layout == "hf":
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            weight_map = read_json(index, required=("weight_map",))["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise ValueError(f"{index}: weight_map should map tensor names to file names")
            files = sorted(set(weight_map.values()))
        else:
            files = ["model.safetensors"]
    elif os.path.isfile(os.path.join(path, "consolidated.00.pth")):  # the v0.1 tarball
        files = ["consolidated.00.pth"]
    else:
        files = ["consolidated.safetensors"]
    for f in files:
        if not os.path.isfile(os.path.join(path, f)):
            raise FileNotFoundError(f"{os.path.join(path, f)}: weight file missing")
    return [os.path.join(path, f) for f in files]


def read_tensors(file):
    """Yield (name, tensor) from one weight file, lazily (memory-mapped)."""
    if file.endswith(".pth"):
        yield from read_weights_only(file).items()
        return
    from safetensors import safe_open
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except Exception as e:  # safetensors raises its own error type for broken files
        raise ValueError(f"{file}: cannot read this safetensors file, truncated or not "
                         f"safetensors ({e})") from None


def tensor_names(path):
    """The names of every tensor stored in a checkpoint directory (safetensors: headers only)."""
    from safetensors import safe_open
    names = set()
    for file in weight_files(path, read_config(path)[1]):
        if file.endswith(".pth"):
            names |= set(read_weights_only(file))
            continue
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                names |= set(f.keys())
        except Exception as e:
            raise ValueError(f"{file}: cannot read this safetensors file, truncated or not "
                             f"safetensors ({e})") from None
    return names


def read_weights_only(file, mmap=True):
    """torch.load of a .pth/.pt file that holds only tensors (and plain containers). A file
    holding other Python objects is refused, and no code from it runs."""
    import pickle
    try:
        data = torch.load(file, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{file}: not a weights-only file (it holds Python objects other than "
                         f"tensors, which could run code when loaded; refused)") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: file not found") from None
    except Exception as e:
        raise ValueError(f"{file}: cannot read this file, truncated or not a torch "
                         f"checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{file}: expected a dict of tensors")
    return data


def load_checkpoint(path, device="cpu", dtype=torch.float32, allow_extra=()):
    """
    Read a checkpoint directory -> (ModelArgs, state_dict with our names, extras).
    Tensors go one at a time from the memory-mapped file straight to device and dtype, so a
    7B model never needs a second copy. Names in `allow_extra` are returned in `extras`
    untouched (Quiet-STaR's own tensors); any other unknown name is an error.
    """
    args, layout = read_config(path)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    state_dict, extras = {}, {}
    for file in weight_files(path, layout):
        for name, tensor in read_tensors(file):
            ours = rename(name, HF_NAMES) if layout == "hf" else name
            if name in allow_extra:
                extras[name] = tensor.to(device=device, dtype=dtype)
                continue
            if name.endswith("rotary_emb.inv_freq"):   # old HF files store this; we compute it
                continue
            if ours not in expected:
                raise ValueError(f"{file}: unexpected tensor {name!r}")
            if tensor.shape != expected[ours]:
                raise ValueError(f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"the config says {tuple(expected[ours])}")
            if layout == "hf" and ours.endswith(("wq.weight", "wk.weight")):
                n = args.n_heads if ours.endswith("wq.weight") else args.n_kv_heads
                tensor = permute_for_rope(tensor, n, to_hf=False)
            state_dict[ours] = tensor.to(device=device, dtype=dtype)
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return args, state_dict, extras


def save_hf_checkpoint(args, state_dict, path, dtype=None, extras=None):
    """Write args and weights as Hugging Face's Mistral layout; each file appears whole."""
    from safetensors.torch import save_file
    to_ours = {v: k for k, v in HF_NAMES.items()}
    tensors = {}
    for name, t in state_dict.items():
        if name.endswith(("wq.weight", "wk.weight")):
            t = permute_for_rope(t, args.n_heads if "wq" in name else args.n_kv_heads, to_hf=True)
        if rename(name, to_ours) is None:
            raise ValueError(f"save: {name!r} is not a Mistral parameter (pass it in extras)")
        tensors[rename(name, to_ours)] = t.detach().to(dtype or t.dtype).contiguous().cpu()
    tensors.update({k: v.detach().contiguous().cpu() for k, v in (extras or {}).items()})
    config = dict(architectures=["MistralForCausalLM"], model_type="mistral",
                  hidden_size=args.dim, num_hidden_layers=args.n_layers,
                  num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
                  head_dim=args.head_dim, intermediate_size=args.hidden_dim,
                  vocab_size=args.vocab_size, rms_norm_eps=args.norm_eps,
                  rope_theta=args.rope_theta, sliding_window=args.sliding_window,
                  hidden_act="silu", tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=2, max_position_embeddings=32768,
                  torch_dtype=str(next(iter(tensors.values())).dtype).replace("torch.", ""))
    os.makedirs(path, exist_ok=True)
    weights, config_file = os.path.join(path, "model.safetensors"), os.path.join(path, "config.json")
    save_file(tensors, weights + ".tmp", metadata={"format": "pt"})
    os.replace(weights + ".tmp", weights)
    with open(config_file + ".tmp", "w") as f:
        json.dump(config, f, indent=2)
    os.replace(config_file + ".tmp", config_file)
