"""
Does thinking help on the held-out arithmetic problems? The same model, the same problems,
with and without its thoughts; used at the end of `python train.py` and by
`python evaluate.py --tasks arith`.

    python data/arith/report.py --ckpt out/ckpt            # the summary train.py prints
    python data/arith/report.py --ckpt out/ckpt --random_thoughts   # control: thoughts of random symbols

For each problem "3+4*2-5=" the model reads BOS + question and predicts the answer digit:
  without thinking  from its plain next-token logits (the text pass);
  with thinking     it thinks one thought after "=" (<start>, n_thought_tokens sampled
                    symbols, <end>) and predicts through the mixing head, exactly what
                    QuietStar.generate(think=True) does for the first new token.
Exact accuracy = the greedy answer equals the gold digit; NLL = -log p(gold digit).
Each problem's thought comes from its own seeded generator, so numbers do not depend on
batching.
"""

import argparse
import json
import math
import os
import sys
from dataclasses import replace

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))   # the repository root

from data.arith.prepare import solve  # noqa: E402

TEST_FILE = os.path.join(HERE, "test.jsonl")


def load_test(path=TEST_FILE, limit=0):
    with open(path) as f:
        examples = [json.loads(line) for line in f]
    return examples[:limit or None]


def mean_and_stderr(values):
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values))), len(values)


@torch.no_grad()
def answer_predictions(qs, tok, examples, think, seed=0, batch_size=250, random_thoughts=False):
    """-> (log-probabilities (n, V) of the answer token, thoughts (n, N) at the answer or None).
    random_thoughts: replace every sampled thought by symbols drawn uniformly (control)."""
    device = qs.model.output.weight.device
    out_logp, out_thoughts = [], []
    saved = qs.config
    qs.config = replace(saved, n_thoughts=1, n_talk=1)    # one thought, one talk step: the answer
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            ids = [tok.encode(ex["question"], bos=True) for ex in chunk]
            if len({len(x) for x in ids}) != 1:
                raise ValueError("arith report: questions of different lengths in one batch")
            tokens = torch.tensor(ids, device=device)                         # (B, L)
            valid = torch.ones_like(tokens, dtype=torch.bool)
            if not think:
                logits = qs.model(tokens)[:, -1].float()                      # (B, V)
                thought = None
            else:
                gens = [torch.Generator(device=device).manual_seed(seed * 1_000_003 + start + b)
                        for b in range(len(chunk))]
                thoughts = qs.sample_thoughts(tokens, valid, generator=gens)   # (B, 1, L, N)
                if random_thoughts:
                    symbols = torch.arange(3, tok.n_words, device=device)      # not <unk>, BOS, EOS
                    g = torch.Generator(device=device).manual_seed(seed + start)
                    pick = torch.randint(len(symbols), thoughts.shape, generator=g, device=device)
                    thoughts = symbols[pick]
                out = qs(tokens, thoughts, valid)
                logits = out.talk_logits[:, -1, 0].float()                   # (B, V)
                thought = thoughts[:, 0, -1]                                  # (B, N)
            logits[:, [qs.start_id, qs.end_id]] = -torch.inf                  # never an answer
            out_logp.append(logits.log_softmax(-1).cpu())
            if thought is not None:
                out_thoughts.append(thought.cpu())
    finally:
        qs.config = saved
    return torch.cat(out_logp), torch.cat(out_thoughts) if out_thoughts else None


def score(qs, tok, examples, think, seed=0, random_thoughts=False):
    """-> dict exact=(mean, stderr, n), nll=(mean, stderr, n), thoughts=(n, N) or None."""
    logp, thoughts = answer_predictions(qs, tok, examples, think, seed, random_thoughts=random_thoughts)
    gold = torch.tensor([tok.encode(ex["answer"])[0] for ex in examples])
    correct = (logp.argmax(-1) == gold).float()
    nll = -logp.gather(1, gold[:, None])[:, 0]
    return dict(exact=mean_and_stderr(correct.numpy()), nll=mean_and_stderr(nll.numpy()),
                thoughts=thoughts)


def thinking_summary(qs, tok, examples, seed=0, n_shown=3, random_thoughts=False, print_fn=print):
    """Print accuracy and NLL with and without thinking, a few thoughts, and the last line.
    Returns {"arith/exact/thinking": (mean, stderr, n), ...}."""
    was_training = qs.training
    qs.eval()
    plain = score(qs, tok, examples, False, seed)
    thinking = score(qs, tok, examples, True, seed, random_thoughts)
    qs.train(was_training)
    results = {}
    for name, r in (("no_thinking", plain), ("thinking", thinking)):
        results[f"arith/exact/{name}"] = r["exact"]
        results[f"arith/nll/{name}"] = r["nll"]
    label = "random thoughts" if random_thoughts else "thinking"
    print_fn(f"held-out arithmetic ({len(examples)} problems), the same model without / with {label}:")
    print_fn(f"  answer NLL      {plain['nll'][0]:.3f} ± {plain['nll'][1]:.3f} -> "
             f"{thinking['nll'][0]:.3f} ± {thinking['nll'][1]:.3f}")
    print_fn(f"  exact accuracy  {plain['exact'][0]:.1%} ± {plain['exact'][1]:.1%} -> "
             f"{thinking['exact'][0]:.1%} ± {thinking['exact'][1]:.1%}")
    steps = [",".join(map(str, solve(ex["question"])[0])) for ex in examples]
    spelled = [float(tok.decode(t) == s) for t, s in zip(thinking["thoughts"].tolist(), steps)]
    results["arith/thought_is_steps/thinking"] = mean_and_stderr(spelled)
    print_fn(f"  thoughts at the answer that spell the correct steps  {np.mean(spelled):.1%}")
    print_fn("thoughts at the answer:")
    for ex, thought in list(zip(examples, thinking["thoughts"].tolist()))[:n_shown]:
        print_fn(f"  {ex['question']}<|startthought|>{tok.decode(thought)}<|endthought|>{ex['answer']}")
    a, b = plain["exact"], thinking["exact"]
    print_fn(f"thinking helps: exact accuracy {100 * a[0]:.1f}% ± {100 * a[1]:.1f} without thinking -> "
             f"{100 * b[0]:.1f}% ± {100 * b[1]:.1f} with {label} (n={a[2]} held-out problems)")
    return results


def main():
    from quietstar import QuietStar
    from tokenizer import load_tokenizer
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--seed", type=int, default=42, help="as train.py and evaluate.py")
    p.add_argument("--random_thoughts", action="store_true")
    args = p.parse_args()
    qs = QuietStar.from_pretrained(args.ckpt).eval()
    thinking_summary(qs, load_tokenizer(args.ckpt), load_test(limit=args.limit), args.seed,
                     random_thoughts=args.random_thoughts)


if __name__ == "__main__":
    main()
