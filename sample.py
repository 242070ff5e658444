"""
Sample a continuation from any checkpoint and print it with its speed.

    python sample.py --ckpt /path/to/Mistral-7B-v0.1 --prompt "The capital of France is"
    python sample.py --ckpt DIR --prompt "..." --temperature 0 --max_new_tokens 50
    python sample.py --ckpt DIR --prompt "a" --prompt "b"     # a batch of prompts
    python sample.py --ckpt out/ckpt --prompt "3+4*2-5=" --show_thoughts     # the default run's model
    python sample.py --ckpt DIR --prompt "Q: 2+3=?\\nA:" --stop "\\n"          # stop at the line's end

Checkpoints: a plain Mistral in Hugging Face layout (config.json + *.safetensors) or Mistral's
(params.json + consolidated.*), a checkpoint of train.py (out/ckpt), or the authors' released
Quiet-STaR layout (ezelikman/quietstar-8-ahead; pass --n_thought_tokens 5). With --think a
Quiet-STaR checkpoint thinks before every token (--show_thoughts prints the continuation,
then each thought on a line of its own with the token it led to); without, it decodes
plainly. A continuation ends at EOS, at the first --stop string (kept), or after
--max_new_tokens. The arithmetic model (a compact vocabulary) gets one new token by
default: its answer is one symbol, and it never learned to write EOS after it (the data
loader masks EOS as a target, as the official one does). Greedy, it writes its steps out
first, as half its text does: --temperature 0 --max_new_tokens 8 gives "3+4*2-5=|7,4,9|9".
The tokenizer is the checkpoint's own vocab.json (a compact vocabulary) or
tokenizer.model, else the Mistral-7B-v0.1 one in assets/ (tokenizer.load_tokenizer). "\\n"
in a prompt or a stop string is a newline.
"""

import argparse
import time
from dataclasses import replace

import torch

from checkpoint import read_quietstar_config
from cli import HelpFormatter, at_least, check_checkpoint_dir, check_device, run, short_errors
from model import Transformer, read_config, tensor_names
from quietstar import RELEASED_NAMES, QuietStar
from tokenizer import CharTokenizer, check_vocabulary, load_tokenizer


def load(args):
    """-> (model, is_quietstar) for any kind of checkpoint."""
    dtype = getattr(torch, args.dtype)
    is_quietstar = set(RELEASED_NAMES) <= tensor_names(args.ckpt)
    if (args.think or args.show_thoughts) and not is_quietstar:
        raise SystemExit(f"{args.ckpt}: a plain language model without Quiet-STaR parts "
                         f"(start_embedding, end_embedding, talk_head.*) cannot think; drop --think")
    if not is_quietstar:
        return Transformer.from_pretrained(args.ckpt, device=args.device, dtype=dtype), False
    qs = QuietStar.from_pretrained(args.ckpt, read_quietstar_config(args.ckpt), device=args.device, dtype=dtype)
    if args.n_thought_tokens:
        qs.config = replace(qs.config, n_thought_tokens=args.n_thought_tokens)
    return qs.eval(), True


def thought_lines(tokenizer, prompt_ids, new_ids, thoughts):
    """One line per new token: its thought, then the token it led to (quoted, so that spaces
    and newlines show)."""
    lines, ids = [], list(prompt_ids)
    for token, thought in zip(new_ids, thoughts):
        before = tokenizer.decode(ids)
        ids.append(token)
        shown = tokenizer.decode(ids)[len(before):]
        lines.append(f"  <|startthought|>{tokenizer.decode(thought)}<|endthought|> -> {shown!r}")
    return lines


def cut_at_stop(tokenizer, prompt_ids, new_ids, stops):
    """The new tokens up to the one that completes the first stop string (all, if none does)."""
    start = len(tokenizer.decode(prompt_ids))
    if not any(stop in tokenizer.decode(prompt_ids + new_ids)[start:] for stop in stops):
        return new_ids
    for n in range(1, len(new_ids) + 1):
        if any(stop in tokenizer.decode(prompt_ids + new_ids[:n])[start:] for stop in stops):
            return new_ids[:n]


def generate(model, is_quietstar, tokenizer, prompts, args, sampling):
    """-> (new tokens, their thoughts) per prompt. With stop strings, in chunks of 16 tokens,
    so that sampling ends soon after every continuation has met one."""
    new, thoughts = [[] for _ in prompts], [[] for _ in prompts]
    active = list(range(len(prompts)))            # still going; all have len(new[b]) tokens
    while active:
        n = min(16 if args.stop else args.max_new_tokens, args.max_new_tokens - len(new[active[0]]))
        batch = [prompts[b] + new[b] for b in active]
        if is_quietstar:
            outs, rows = model.generate(batch, n, think=args.think, return_thoughts=True, **sampling)
        else:
            outs, rows = model.generate(batch, n, **sampling), [[] for _ in batch]
        still = []
        for b, out, row in zip(active, outs, rows):
            new[b], thoughts[b] = new[b] + out, thoughts[b] + row
            cut = cut_at_stop(tokenizer, prompts[b], new[b], args.stop)
            if len(out) == n and len(cut) == len(new[b]) and len(cut) < args.max_new_tokens:
                still.append(b)                   # no EOS, no stop string, room left
            new[b], thoughts[b] = cut, thoughts[b][:len(cut)]
        active = still
    return new, thoughts


def main():
    p = short_errors(argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter))
    p.add_argument("--ckpt", required=True, help="checkpoint directory (e.g. out/ckpt)")
    p.add_argument("--prompt", action="append", required=True, help="the text to continue; repeat for a batch")
    p.add_argument("--max_new_tokens", type=at_least(1), default=None,
                   help="at most this many new tokens (default: 1 for the arithmetic model, whose answer "
                        "is one symbol; else 100)")
    p.add_argument("--stop", action="append", default=[],
                   help="end a continuation at this string, kept (repeatable; EOS always ends one)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top_k", type=at_least(1), default=None, help="sample among the k likeliest tokens (None: all)")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling, in (0, 1]")
    p.add_argument("--seed", type=int, default=1337, help="sampling seed")
    p.add_argument("--think", action="store_true", help="Quiet-STaR checkpoints: think before every token")
    p.add_argument("--show_thoughts", action="store_true",
                   help="print each token's thought, one per line (implies --think)")
    p.add_argument("--n_thought_tokens", type=at_least(1), default=None,
                   help="thought length override (5 for ezelikman/quietstar-8-ahead; None: the checkpoint's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32",
                   choices=["float32", "bfloat16", "float16"], help="weights and compute")
    args = p.parse_args()
    if not (args.temperature >= 0 and args.temperature != float("inf")):
        p.error(f"--temperature {args.temperature}: must be a finite number >= 0")
    if not 0 < args.top_p <= 1:
        p.error(f"--top_p {args.top_p}: must be in (0, 1]")
    check_device(args.device)
    check_checkpoint_dir(args.ckpt)
    args.think = args.think or args.show_thoughts
    args.stop = [stop.replace("\\n", "\n") for stop in args.stop]

    read_config(args.ckpt)                          # a clear error before anything else
    tokenizer = load_tokenizer(args.ckpt)
    args.max_new_tokens = args.max_new_tokens or (1 if isinstance(tokenizer, CharTokenizer) else 100)
    t0 = time.perf_counter()
    model, is_quietstar = load(args)
    plain = model.model if is_quietstar else model
    print(f"loaded {plain.num_params() / 1e6:,.1f}M parameters in {time.perf_counter() - t0:.1f}s"
          f"{' (Quiet-STaR, thinking)' if args.think else ''}")
    check_vocabulary(tokenizer, plain.args.vocab_size, args.ckpt)

    texts = [text.replace("\\n", "\n") for text in args.prompt]
    prompts = [tokenizer.encode(text, bos=True) for text in texts]
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    eos_id=tokenizer.eos_id, generator=generator)
    t0 = time.perf_counter()
    outputs, thoughts = generate(model, is_quietstar, tokenizer, prompts, args, sampling)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    for b, (text, new_tokens) in enumerate(zip(texts, outputs)):
        print("-" * 80)
        print(text + tokenizer.decode(prompts[b] + new_tokens)[len(tokenizer.decode(prompts[b])):])
        if args.show_thoughts:
            print("thoughts, one per new token (the thought, then the token it led to):")
            print("\n".join(thought_lines(tokenizer, prompts[b], new_tokens, thoughts[b])))
    n_new = sum(len(o) for o in outputs)
    print("-" * 80)
    print(f"{n_new} new tokens in {elapsed:.2f}s: {n_new / elapsed:.1f} tokens/s "
          f"(batch {len(prompts)}, {args.device}, {args.dtype}{', thinking' if args.think else ''})")


if __name__ == "__main__":
    run(main)
