"""
Sample a continuation from a Mistral checkpoint and print it with its speed.

    python sample.py --ckpt /path/to/Mistral-7B-v0.1 --prompt "The capital of France is"
    python sample.py --ckpt DIR --prompt "..." --temperature 0 --max_new_tokens 50
    python sample.py --ckpt DIR --prompt "a" --prompt "b"     # a batch of prompts

The checkpoint directory may be in Hugging Face layout (config.json + *.safetensors) or
Mistral's (params.json + consolidated.safetensors). The tokenizer is the directory's
vocab.json (a compact vocabulary) or tokenizer.model when it has one, else the
Mistral-7B-v0.1 tokenizer in assets/.
"""

import argparse
import os
import time

import torch

from evaluate import has_quietstar_parts
from model import Transformer
from quietstar import QuietStar
from tokenizer import load_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32",
                   choices=["float32", "bfloat16", "float16"])
    args = p.parse_args()

    tokenizer = load_tokenizer(args.ckpt)
    t0 = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    if has_quietstar_parts(args.ckpt):     # a Quiet-STaR checkpoint: sample from its language model
        model = QuietStar.from_pretrained(args.ckpt, device=args.device, dtype=dtype).model.eval()
    else:
        model = Transformer.from_pretrained(args.ckpt, device=args.device, dtype=dtype)
    print(f"loaded {model.num_params() / 1e9:.2f}B parameters in {time.perf_counter() - t0:.1f}s")
    if model.args.vocab_size < tokenizer.n_words:
        raise SystemExit(f"vocabulary mismatch: {tokenizer.path} has {tokenizer.n_words} "
                         f"tokens, the model in {args.ckpt} only {model.args.vocab_size}")

    prompts = [tokenizer.encode(text, bos=True) for text in args.prompt]
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    t0 = time.perf_counter()
    outputs = model.generate(prompts, args.max_new_tokens, args.temperature, args.top_k,
                             args.top_p, tokenizer.eos_id, generator)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    for text, new_tokens in zip(args.prompt, outputs):
        print("-" * 80)
        print(text + tokenizer.decode(new_tokens))
    n_new = sum(len(o) for o in outputs)
    print("-" * 80)
    print(f"{n_new} new tokens in {elapsed:.2f}s: {n_new / elapsed:.1f} tokens/s "
          f"(batch {len(prompts)}, {args.device}, {args.dtype})")


if __name__ == "__main__":
    main()
