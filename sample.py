"""
Sample a continuation from any checkpoint and print it with its speed.

    python sample.py --ckpt /path/to/Mistral-7B-v0.1 --prompt "The capital of France is"
    python sample.py --ckpt DIR --prompt "..." --temperature 0 --max_new_tokens 50
    python sample.py --ckpt DIR --prompt "a" --prompt "b"     # a batch of prompts
    python sample.py --ckpt out/ckpt --prompt "Problem: 2+3=?\\nSolution:" --think --show_thoughts

Checkpoints: a plain Mistral in Hugging Face layout (config.json + *.safetensors) or Mistral's
(params.json + consolidated.*), a checkpoint of train.py (out/ckpt), or the authors' released
Quiet-STaR layout (ezelikman/quietstar-8-ahead; pass --n_thought_tokens 5). With --think a
Quiet-STaR checkpoint thinks before every token (--show_thoughts prints each thought inline,
between <|startthought|> and <|endthought|>, before the token it led to); without, it decodes
plainly. The tokenizer is the checkpoint's own vocab.json (a compact vocabulary) or
tokenizer.model, else the Mistral-7B-v0.1 one in assets/ (tokenizer.load_tokenizer). "\\n" in a prompt is a newline.
"""

import argparse
import time
from dataclasses import replace

import torch

from checkpoint import read_quietstar_config
from cli import at_least, check_device, run, short_errors
from model import Transformer, read_config, tensor_names
from quietstar import RELEASED_NAMES, QuietStar
from tokenizer import check_vocabulary, load_tokenizer


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


def with_thoughts(tokenizer, prompt_ids, new_ids, thoughts):
    """The continuation with each token's thought shown before it."""
    parts, ids = [], list(prompt_ids)
    for token, thought in zip(new_ids, thoughts):
        before = tokenizer.decode(ids)
        ids.append(token)
        shown = tokenizer.decode(ids)[len(before):]
        parts.append(f"<|startthought|>{tokenizer.decode(thought)}<|endthought|>{shown}")
    return "".join(parts)


def main():
    p = short_errors(argparse.ArgumentParser(description=__doc__,
                                             formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--ckpt", required=True, help="checkpoint directory")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--max_new_tokens", type=at_least(1), default=100)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top_k", type=at_least(1), default=None)
    p.add_argument("--top_p", type=float, default=0.9, help="in (0, 1]")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--think", action="store_true", help="Quiet-STaR checkpoints: think before every token")
    p.add_argument("--show_thoughts", action="store_true", help="print each thought inline (implies --think)")
    p.add_argument("--n_thought_tokens", type=at_least(1), default=None,
                   help="thought length override (5 for ezelikman/quietstar-8-ahead)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32",
                   choices=["float32", "bfloat16", "float16"])
    args = p.parse_args()
    if not (args.temperature >= 0 and args.temperature != float("inf")):
        p.error(f"--temperature {args.temperature}: must be a finite number >= 0")
    if not 0 < args.top_p <= 1:
        p.error(f"--top_p {args.top_p}: must be in (0, 1]")
    check_device(args.device)
    args.think = args.think or args.show_thoughts

    read_config(args.ckpt)                          # a clear error before anything else
    tokenizer = load_tokenizer(args.ckpt)
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
    if is_quietstar:
        outputs, thoughts = model.generate(prompts, args.max_new_tokens, think=args.think,
                                           return_thoughts=True, **sampling)
    else:
        outputs = model.generate(prompts, args.max_new_tokens, **sampling)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    for b, (text, new_tokens) in enumerate(zip(texts, outputs)):
        print("-" * 80)
        shown = with_thoughts(tokenizer, prompts[b], new_tokens, thoughts[b]) if args.show_thoughts \
            else tokenizer.decode(prompts[b] + new_tokens)[len(tokenizer.decode(prompts[b])):]
        print(text + shown)
    n_new = sum(len(o) for o in outputs)
    print("-" * 80)
    print(f"{n_new} new tokens in {elapsed:.2f}s: {n_new / elapsed:.1f} tokens/s "
          f"(batch {len(prompts)}, {args.device}, {args.dtype}{', thinking' if args.think else ''})")


if __name__ == "__main__":
    run(main)
