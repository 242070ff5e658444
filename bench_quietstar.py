"""
Quiet-STaR benchmarks, ours against a dense-mask reference in the same run.

    python bench_quietstar.py step              # sample + loss + backward, L x n_thought_tokens grid
    python bench_quietstar.py generate          # thinking generation vs plain decoding
    python bench_quietstar.py scaling --dim 256 --vocab_size 4096 --lengths 256 2048   # cost per text token
    python bench_quietstar.py attention --length 256 --dtype bfloat16   # memory kept per layer
    python bench_quietstar.py step --preset mistral-7b --device cuda --dtype bfloat16 --lengths 256

The reference does what the official code does: after the text pass it feeds one token per
position per step through the whole model, with a KV cache that grows by L keys a step and
a dense mask of L x L*(step+1) (a causal text block, then one diagonal block per step), and
samples each thought token inline. Ours samples without gradient through a small cache, then
runs one forward with gradient over [text | all branches] with two-part attention.
Each configuration runs in a fresh process so that its peak memory (CPU: max resident set
size; GPU: max allocated) is its own.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from model import ModelArgs, Transformer, rope_cos_sin, sample
from quietstar import QuietStar, QuietStarConfig, QuietStarOutput, quietstar_loss, talk_targets


class GrowingCache:
    """KV cache that appends every step's keys/values (with gradient), as the official code's."""

    def __init__(self):
        self.k = self.v = None

    def update(self, start, k, v):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


def dense_forward(qs, tokens, generator=None):
    """The official layout and cost: returns (QuietStarOutput, thoughts); thoughts are sampled
    inline at temperature 1 from the unmixed logits, without gradient through the sample."""
    c, m = qs.config, qs.model
    B, L = tokens.shape
    P, N, T, M = c.n_thoughts, c.n_thought_tokens, c.n_talk, c.branch_len
    R = B * P
    rows = tokens.repeat_interleave(P, 0)                                  # (R, L)
    valid = rows != c.pad_id
    caches = [GrowingCache() for _ in m.layers]
    for layer, cache in zip(m.layers, caches):
        layer.attention.cache = cache
    try:
        h_base = m.hidden(rows, key_valid=valid)                          # (R, L, d)
        text_mask = qs._text_visible(valid)                                # (R, L, L)
        eye = torch.eye(L, dtype=torch.bool, device=tokens.device).expand(R, L, L)
        x = qs._delimiter("start", (R, L))
        padded = torch.cat([rows, torch.full((R, T), c.pad_id, device=tokens.device)], 1)
        hiddens, thoughts = [], []
        for step in range(M):
            mask = torch.cat([text_mask] + [eye] * (step + 1), dim=-1)[:, None]  # (R, 1, L, L*(step+2))
            cos, sin = rope_cos_sin(torch.arange(L, device=tokens.device) + 1 + step,
                                    m.args.head_dim, m.args.rope_theta)
            h = x
            for layer in m.layers:
                h = layer(h, cos, sin, mask, 0)
            h = m.norm(h)                                                  # (R, L, d)
            hiddens.append(h)
            if step < N:
                with torch.no_grad():
                    token = sample(qs._thought_logits(h).view(R * L, -1), c.thought_temperature,
                                   generator=generator).view(R, L)
                thoughts.append(token)
                x = m.tok_embeddings(token)
            elif step == N:
                x = qs._delimiter("end", (R, L))
            else:
                x = m.tok_embeddings(padded[:, step - N: step - N + L])   # x_{i+s}
    finally:
        m.clear_cache()
    h_branch = torch.stack(hiddens, dim=2)                                 # (R, L, M, d)
    shifted = (torch.arange(L, device=tokens.device)[:, None] + torch.arange(T, device=tokens.device)).clamp(max=L - 1)
    mixed, w = qs._mix(h_base[:, shifted], h_branch[:, :, N + 1:])
    thoughts = torch.stack(thoughts, -1).view(B, P, L, N)
    # the per-token log-likelihoods from full logits of every row, as the official code
    nll = lambda logits, t: F.cross_entropy(logits.flatten(0, -2), t.flatten(), reduction="none").view(t.shape)
    targets, _ = talk_targets(tokens, tokens != c.pad_id, T)
    out = QuietStarOutput(
        base_nll=nll(m.output(h_base[:, :-1]).float(), rows[:, 1:])[::P],
        talk_nll=nll(m.output(mixed).float(), targets.repeat_interleave(P, 0)),
        thought_logp=-nll(qs._thought_logits(h_branch[:, :, :N]) / c.reinforce_temperature,
                          thoughts.reshape(R, L, N)),
        mix_weight=w, base_hidden=h_base[::P], branch_hidden=h_branch, talk_hidden=mixed, head=qs)
    return out, thoughts


def build(preset, n_thought_tokens, device, dtype, dim=None, vocab_size=32002):
    torch.manual_seed(0)
    widths = dict(dim=dim, hidden_dim=3 * dim, head_dim=dim // ModelArgs.from_name(preset).n_heads) if dim else {}
    with torch.device(device):
        model = Transformer(ModelArgs.from_name(preset, vocab_size=vocab_size, **widths))
        qs = QuietStar(model, QuietStarConfig(n_thought_tokens=n_thought_tokens,
                                             delimiter_init_id=min(11940, vocab_size - 3)))
    qs.init_thought_parameters()
    with torch.no_grad():
        qs.mixing_head[4].weight.normal_(std=0.02)   # as after some training: thoughts matter
    return qs.to(dtype)


def one_step(qs, tokens, impl):
    if impl == "ours":
        thoughts = qs.sample_thoughts(tokens)
        loss, _ = qs.loss(tokens, thoughts)
    else:
        out, thoughts = dense_forward(qs, tokens)
        loss, _ = quietstar_loss(out, tokens, thoughts, tokens != qs.config.pad_id, qs.config)
    loss.backward()
    qs.zero_grad(set_to_none=True)


def run_step(a):
    """One configuration, in this process: prints a JSON line."""
    device, dtype = a.device, getattr(torch, a.dtype)
    qs = build(a.preset, a.n_thought_tokens, device, dtype, a.dim, a.vocab_size)
    qs.attention_impl = a.attention
    tokens = torch.randint(3, a.vocab_size - 2, (a.batch_size, a.length), device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    one_step(qs, tokens, a.impl)                     # warm-up
    times = []
    for _ in range(a.repeat):
        sync()
        t0 = time.perf_counter()
        one_step(qs, tokens, a.impl)
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    c = qs.config
    processed = a.batch_size * a.length * (1 + c.n_thoughts * c.branch_len)   # every token position run
    print(json.dumps(dict(impl=a.impl, L=a.length, N=a.n_thought_tokens, seconds=min(times),
                          peak_bytes=peak, tokens_processed=processed)))


def bench_step(a):
    hardware = torch.cuda.get_device_name() if a.device.startswith("cuda") else \
        f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} threads"
    print(f"sample_thoughts + loss + backward, preset {a.preset}, {a.dtype}, batch {a.batch_size}, "
          f"n_thoughts 2, n_talk 4; {hardware}; torch {torch.__version__}")
    print(f"{'L':>5s} {'N':>3s} {'ours s':>8s} {'dense s':>8s} {'speed-up':>8s} "
          f"{'ours MB':>8s} {'dense MB':>9s} {'mem ratio':>9s}")
    for L in a.lengths:
        for N in a.thought_lengths:
            row = {}
            for impl in ("ours", "dense"):
                cmd = [sys.executable, __file__, "one", f"--impl={impl}", f"--length={L}",
                       f"--n_thought_tokens={N}", f"--preset={a.preset}", f"--device={a.device}",
                       f"--dtype={a.dtype}", f"--batch_size={a.batch_size}", f"--repeat={a.repeat}"]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    row[impl] = None
                    print(f"  {impl} L={L} N={N} failed: {done.stderr.strip().splitlines()[-1]}")
                else:
                    row[impl] = json.loads(done.stdout.strip().splitlines()[-1])
            o, d = row["ours"], row["dense"]
            if o and d:
                print(f"{L:5d} {N:3d} {o['seconds']:8.3f} {d['seconds']:8.3f} "
                      f"{d['seconds'] / o['seconds']:7.2f}x {o['peak_bytes'] / 2**20:8.0f} "
                      f"{d['peak_bytes'] / 2**20:9.0f} {d['peak_bytes'] / o['peak_bytes']:8.2f}x", flush=True)


def bench_scaling(a):
    """Ours alone at growing L: time and peak memory per text token, against the first L."""
    print(f"sample_thoughts + loss + backward, ours ({a.attention or 'default'} attention), preset {a.preset}, dim {a.dim or 'preset'}, "
          f"vocabulary {a.vocab_size}, {a.dtype}, batch {a.batch_size}, N {a.n_thought_tokens}, "
          f"2 thoughts, 4 talk steps; {os.cpu_count()} CPU cores; torch {torch.__version__}")
    print(f"{'L':>5s} {'s/step':>8s} {'ms/text token':>14s} {'x first':>8s} {'peak MB':>8s} {'MB/text token':>14s}")
    first = None
    for L in a.lengths:
        cmd = [sys.executable, __file__, "one", "--impl=ours", f"--length={L}", f"--preset={a.preset}",
               f"--n_thought_tokens={a.n_thought_tokens}", f"--device={a.device}", f"--dtype={a.dtype}",
               f"--batch_size={a.batch_size}", f"--repeat={a.repeat}", f"--vocab_size={a.vocab_size}"] + \
            ([f"--dim={a.dim}"] if a.dim else []) + ([f"--attention={a.attention}"] if a.attention else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"  L={L} failed: {done.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        per_token = r["seconds"] / (a.batch_size * L)
        first = first or per_token
        print(f"{L:5d} {r['seconds']:8.2f} {per_token * 1e3:14.2f} {per_token / first:7.2f}x "
              f"{r['peak_bytes'] / 2**20:8.0f} {r['peak_bytes'] / 2**20 / (a.batch_size * L):14.2f}", flush=True)


def resident_bytes():
    """This process's resident memory now (Linux), to see what a forward keeps for backward."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_attention(a):
    """One layer's thought attention at Mistral-7B's heads (32 query, 8 k/v, head 128), in
    this process: memory kept from forward to backward (resident growth while the graph is
    alive, q/k/v excluded) and time of forward + backward. Prints a JSON line."""
    qs = QuietStar(Transformer(ModelArgs(n_layers=1, dim=256, hidden_dim=256, vocab_size=32)),
                   QuietStarConfig(n_thought_tokens=a.n_thought_tokens))
    qs.attention_impl = a.impl
    L, P, M, H, Hkv, D = a.length, 2, qs.config.branch_len, 32, 8, 128
    S, dtype = L + P * L * M, getattr(torch, a.dtype)
    q = torch.randn(1, H, S, D, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(1, Hkv, S, D, dtype=dtype, requires_grad=True) for _ in range(2))
    attend = qs._joint_attention(torch.ones(1, L, dtype=torch.bool), P * L, M)
    before = resident_bytes()
    t0 = time.perf_counter()
    out = attend(q, k, v)
    kept = resident_bytes() - before - out.numel() * out.element_size()
    out.backward(torch.ones_like(out))
    seconds = time.perf_counter() - t0
    print(json.dumps(dict(impl=a.impl, L=L, kept_bytes=kept, seconds=seconds)))


def bench_attention(a):
    print(f"one layer's thought attention, Mistral-7B heads (32/8, head 128), {a.dtype}, L={a.length}, "
          f"N={a.n_thought_tokens}, 2 thoughts, 4 talk steps; forward + backward; "
          f"{os.cpu_count()} CPU cores; torch {torch.__version__}")
    rows = {}
    for impl in ("reference", "chunked"):
        cmd = [sys.executable, __file__, "one_attention", f"--impl={impl}", f"--length={a.length}",
               f"--n_thought_tokens={a.n_thought_tokens}", f"--dtype={a.dtype}"]
        # big blocks straight from and back to the OS, so that resident memory shows what is kept
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        rows[impl] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  {impl:9s} kept for backward {rows[impl]['kept_bytes'] / 2**20:8.0f} MiB, "
              f"forward + backward {rows[impl]['seconds']:.2f} s", flush=True)
    ratio = rows["reference"]["kept_bytes"] / max(rows["chunked"]["kept_bytes"], 1)
    print(f"  chunked keeps 1/{ratio:.0f} of the reference's memory")


@torch.no_grad()
def bench_generate(a):
    qs = build(a.preset, a.n_thought_tokens, a.device, getattr(torch, a.dtype)).eval()
    prompt = torch.randint(3, 32000, (a.length,)).tolist()
    print(f"generation, preset {a.preset}, prompt {a.length}, {a.new_tokens} new tokens, "
          f"n_thought_tokens {a.n_thought_tokens}, batch 1")
    results = {}
    for think in (False, True):
        qs.generate(prompt, 2, think=think, eos_id=-1)                  # warm-up
        t0 = time.perf_counter()
        qs.generate(prompt, a.new_tokens, think=think, eos_id=-1)
        results[think] = a.new_tokens / (time.perf_counter() - t0)
        print(f"  think={think!s:5s} {results[think]:8.1f} tokens/s")
    print(f"  thinking costs {results[False] / results[True]:.1f}x plain decoding "
          f"(a thought is {a.n_thought_tokens + 2} extra decode steps per token)")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["step", "scaling", "attention", "generate", "one", "one_attention"])
    p.add_argument("--impl", default="ours")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--n_thought_tokens", type=int, default=9)
    p.add_argument("--dim", type=int, default=None)            # override the preset's width
    p.add_argument("--attention", default=None)                # ours: reference, chunked, flex
    p.add_argument("--vocab_size", type=int, default=32002)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--thought_lengths", type=int, nargs="+", default=[4, 9, 16])
    a = p.parse_args()
    {"step": bench_step, "scaling": bench_scaling, "attention": bench_attention, "generate": bench_generate,
     "one": run_step, "one_attention": run_attention}[a.what](a)
