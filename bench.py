"""
Benchmarks for the tokenizer and the model, each side by side with its reference in the
same process, printing the ratio and the hardware.

    python bench.py tokenizer            # ours vs sentencepiece (pip install sentencepiece)
    python bench.py model                # tiny preset, forward and decode tokens/s
    python bench.py model --preset mistral-7b --device cuda --dtype bfloat16 --reference
                                         # random-init 7B; --reference adds transformers

Results measured so far are in docs/benchmarks.md.
"""

import argparse
import glob
import os
import platform
import time

import torch

from model import PEAK_BF16_FLOPS, ModelArgs, Transformer
from tokenizer import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))


def hardware(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def timed(fn, repeat=3, device="cpu"):
    """Best wall time of `repeat` calls (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


# -----------------------------------------------------------------------------

def bench_tokenizer(args):
    import sentencepiece as spm
    path = os.path.join(HERE, "assets", "tokenizer.model")
    ours, ref = Tokenizer(path), spm.SentencePieceProcessor(model_file=path)
    files = sorted(glob.glob(os.path.join(HERE, "**", "*.py"), recursive=True) +
                   glob.glob(os.path.join(HERE, "**", "*.md"), recursive=True))
    docs = [open(f, encoding="utf-8").read() for f in files] * args.copies
    n_bytes = sum(len(d.encode()) for d in docs)
    ids = [ref.encode(d) for d in docs]
    assert [ours.encode(d) for d in docs] == ids, "ids differ from sentencepiece"
    assert ours.encode_batch(docs) == ids
    n_tokens = sum(len(i) for i in ids)
    print(f"tokenizer: {len(docs)} documents, {n_bytes / 1e6:.1f} MB, {n_tokens} tokens, "
          f"ids identical; {hardware('cpu')}")
    rows = [
        ("encode, one text at a time", lambda: [ours.encode(d) for d in docs],
         lambda: [ref.encode(d) for d in docs]),
        ("encode, batch (threads)", lambda: ours.encode_batch(docs),
         lambda: ref.encode(docs, num_threads=os.cpu_count())),
        ("decode, one text at a time", lambda: [ours.decode(i) for i in ids],
         lambda: [ref.decode(i) for i in ids]),
    ]
    print(f"{'':28s} {'ours tok/s':>12s} {'sentencepiece':>14s} {'ratio':>6s}")
    for name, ours_fn, ref_fn in rows:
        t_ours, t_ref = timed(ours_fn), timed(ref_fn)
        print(f"{name:28s} {n_tokens / t_ours:12,.0f} {n_tokens / t_ref:14,.0f} "
              f"{t_ref / t_ours:5.2f}x")


# -----------------------------------------------------------------------------

def reference_model(model):
    """transformers' MistralForCausalLM holding the same weights (for --reference)."""
    import tempfile
    from transformers import MistralForCausalLM
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        ref = MistralForCausalLM.from_pretrained(d, dtype=model.output.weight.dtype)
    return ref.to(model.output.weight.device).eval()


def bench_model(args):
    device, dtype = args.device, getattr(torch, args.dtype)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(ModelArgs.from_name(args.preset)).to(dtype).eval()
    B, T, n_new = args.batch_size, args.prompt_len, args.new_tokens
    tokens = torch.randint(0, model.args.vocab_size, (B, T), device=device)
    print(f"model: {args.preset} ({model.num_params() / 1e6:.1f}M params), {args.dtype}, "
          f"batch {B}, prompt {T}, {n_new} new tokens; {hardware(device)}")

    @torch.no_grad()
    def prefill_ours():
        model(tokens)

    @torch.no_grad()
    def decode_ours():
        model.generate(tokens.tolist(), n_new, temperature=0, eos_id=-1)

    results = {"ours": (timed(prefill_ours, device=device), timed(decode_ours, device=device))}
    if args.reference:
        ref = reference_model(model)

        @torch.no_grad()
        def prefill_ref():
            ref(tokens)

        @torch.no_grad()
        def decode_ref():
            ref.generate(tokens, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)

        results["transformers"] = (timed(prefill_ref, device=device), timed(decode_ref, device=device))

    flops = model.flops_per_token(T / 2) * B * T          # average context of a causal prefill
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in hardware(device)), None)
    print(f"{'':14s} {'prefill tok/s':>14s} {'MFU':>6s} {'decode tok/s':>13s}")
    for name, (t_prefill, t_decode) in results.items():
        mfu = f"{flops / t_prefill / peak:6.1%}" if peak and device.startswith("cuda") else "   n/a"
        print(f"{name:14s} {B * T / t_prefill:14,.0f} {mfu} {B * n_new / t_decode:13,.1f}")
    if args.reference:
        (p0, d0), (p1, d1) = results["ours"], results["transformers"]
        print(f"{'ours / ref':14s} {p1 / p0:13.2f}x {'':6s} {d1 / d0:12.2f}x")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["tokenizer", "model"])
    p.add_argument("--copies", type=int, default=5, help="tokenizer: repeat the text")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--prompt_len", type=int, default=256)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--reference", action="store_true", help="also time transformers' Mistral")
    args = p.parse_args()
    bench_tokenizer(args) if args.what == "tokenizer" else bench_model(args)
