"""
Does thinking help on the held-out arithmetic problems, and is the help earned? The same
model, the same problems, with and without its thoughts, and the controls, all scored by
score() below; used at the end of `python train.py`, by `python evaluate.py --tasks arith`
and by data/arith/controls.py.

    python data/arith/report.py --ckpt out/ckpt            # with vs without thinking
    python data/arith/report.py --ckpt out/ckpt --random_thoughts   # control: thoughts of random symbols
    python data/arith/report.py --ckpt data/arith/base --force_mixing   # control: the base model, w = 1

For each problem "3+4*2-5=" the model reads BOS + question and predicts the answer digit:
  without thinking  from its plain next-token logits (the text pass);
  with thinking     it thinks one thought after "=" (<start>, n_thought_tokens sampled
                    symbols, <end>) and predicts through the mixing head, exactly what
                    QuietStar.generate(think=True) does for the first new token.
The answer is one digit, so every row predicts among the ten digits: a model that would
rather write "|" (start written steps, as half its pretraining text does) is scored on its
best digit, not marked wrong for the format.
Exact accuracy = the greedy answer equals the gold digit; NLL = -log p(gold digit).
Each problem's thought comes from its own seeded generator, so numbers do not depend on
batching. A thought "carries a step" when the digits it wrote, read in order, start with
the first intermediate result (3+4*2-5: 7; chance 1 in 10); it "spells the steps" when they
contain all three in order (7, 4, 9).
"""

import argparse
import contextlib
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


def training_examples(n=200):
    """The first n training problems (the questions of the text the run trains on, asked for
    the answer), for the report during training: the held-out problems stay unseen until the end."""
    from data.arith.prepare import splits
    if len(_TRAINING) < n:
        _TRAINING[:] = [{"question": q, "answer": str(solve(q)[1])} for q in splits()[1][:n]]
    return _TRAINING[:n]


_TRAINING = []


def mean_and_stderr(values):
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values))), len(values)


@contextlib.contextmanager
def forced_mixing(qs, w=1.0):
    """Control (a): the mixing head replaced by a constant w (1: the prediction is the
    thought's alone), so that an untrained model's thoughts count as much as they can."""
    def mix(h_base, h_thought):
        weight = torch.full(h_base.shape[:-1], w, dtype=h_base.dtype, device=h_base.device)
        return (1 - w) * h_base + w * h_thought, weight
    qs._mix = mix                        # an instance attribute hides the method
    try:
        yield qs
    finally:
        del qs._mix


def answer_mix_weight(out, valid):
    """The mixing weight of the prediction of each document's last real token (the answer)
    from the position before it, averaged over thoughts. out.mix_weight (R, L, T); valid
    (B, L), a prefix of each row (one document per row)."""
    P = out.mix_weight.shape[0] // valid.shape[0]
    position = (valid.sum(1) - 2).clamp(min=0).repeat_interleave(P)                 # (R,)
    return out.mix_weight[torch.arange(len(position), device=valid.device), position, 0].mean().item()


@torch.no_grad()
def answer_predictions(qs, tok, examples, think, seed=0, batch_size=250, random_thoughts=False):
    """-> (log-probabilities (n, V) of the answer token, thoughts (n, N) at the answer or None,
    mixing weights (n,) at the answer or None).
    random_thoughts: replace every sampled thought by symbols drawn uniformly (control)."""
    device = qs.model.output.weight.device
    not_digit = torch.ones(qs.model.output.weight.shape[0], dtype=torch.bool, device=device)   # (V,)
    not_digit[tok.encode("0123456789")] = False     # the answer is a digit: predicted among the ten
    out_logp, out_thoughts, out_w = [], [], []
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
                out_thoughts.append(thoughts[:, 0, -1].cpu())                # (B, N)
                out_w.append(out.mix_weight[:, -1, 0].float().cpu())         # (B,)
            logits[:, not_digit] = -torch.inf
            out_logp.append(logits.log_softmax(-1).cpu())
    finally:
        qs.config = saved
    cat = lambda parts: torch.cat(parts) if parts else None   # noqa: E731
    return torch.cat(out_logp), cat(out_thoughts), cat(out_w)


def step_shares(tok, examples, thoughts):
    """-> (carries the first step, spells all steps) per thought, as float lists (see the top)."""
    first, spelled = [], []
    for ex, thought in zip(examples, thoughts.tolist()):
        digits = "".join(ch for ch in tok.decode(thought) if ch.isdigit())
        steps = "".join(map(str, solve(ex["question"])[0]))
        first.append(float(digits[:1] == steps[:1]))
        spelled.append(float(steps in digits))
    return first, spelled


def score(qs, tok, examples, think, seed=0, random_thoughts=False):
    """-> dict exact=(mean, stderr, n), nll=(mean, stderr, n), and with thinking also
    thoughts=(n, N), mix_weight, first_step, steps=(mean, stderr, n)."""
    was_training = qs.training
    qs.eval()
    try:
        logp, thoughts, w = answer_predictions(qs, tok, examples, think, seed, random_thoughts=random_thoughts)
    finally:
        qs.train(was_training)
    gold = torch.tensor([tok.encode(ex["answer"])[0] for ex in examples])
    correct = (logp.argmax(-1) == gold).float()
    nll = -logp.gather(1, gold[:, None])[:, 0]
    result = dict(exact=mean_and_stderr(correct.numpy()), nll=mean_and_stderr(nll.numpy()), thoughts=thoughts)
    if think:
        first, spelled = step_shares(tok, examples, thoughts)
        result.update(mix_weight=mean_and_stderr(w.numpy()), first_step=mean_and_stderr(first),
                      steps=mean_and_stderr(spelled))
    return result


def pct(r):
    """(mean, stderr, n) -> '23.8% ± 1.3'"""
    return f"{100 * r[0]:.1f}% ± {100 * r[1]:.1f}"


def score_line(name, r):
    """One line of the report: accuracy, NLL, and for thinking what the thoughts carry."""
    line = f"  {name:<44} exact {pct(r['exact']):>13}  NLL {r['nll'][0]:.3f} ± {r['nll'][1]:.3f}"
    if "mix_weight" in r:
        line += (f"  w at '=' {r['mix_weight'][0]:+.2f}  thoughts: first step {r['first_step'][0]:.0%},"
                 f" all steps {r['steps'][0]:.0%}")
    return line


def thought_report(qs, tok, examples, seed, step, print_fn=print):
    """The every-N-steps line of the default run: what the thoughts at the answer carry now."""
    r = score(qs, tok, examples, True, seed)
    print_fn(f"  thoughts at '=' ({len(examples)} training problems, step {step}): carry the first step "
             f"{r['first_step'][0]:.0%}, spell all steps {r['steps'][0]:.0%}; mixing weight at '=' "
             f"{r['mix_weight'][0]:+.3f}; accuracy with thinking {r['exact'][0]:.0%}")
    return r


def thinking_summary(qs, tok, examples, seed=0, n_shown=3, random_thoughts=False, print_fn=print):
    """Print accuracy and NLL with and without thinking, a few thoughts, and the last line.
    Returns {"arith/exact/thinking": (mean, stderr, n), ...}."""
    plain = score(qs, tok, examples, False, seed)
    thinking = score(qs, tok, examples, True, seed, random_thoughts)
    results = {}
    for name, r in (("no_thinking", plain), ("thinking", thinking)):
        results[f"arith/exact/{name}"] = r["exact"]
        results[f"arith/nll/{name}"] = r["nll"]
    results["arith/thought_is_steps/thinking"] = thinking["steps"]
    label = "random thoughts" if random_thoughts else "thinking"
    print_fn(f"held-out arithmetic ({len(examples)} problems), the same model without / with {label}:")
    print_fn(score_line("without thinking", plain))
    print_fn(score_line(f"with {label}", thinking))
    show_thoughts(tok, examples, thinking["thoughts"], n_shown, print_fn)
    a, b = plain["exact"], thinking["exact"]
    print_fn(f"without vs with thinking: exact accuracy {pct(a)} without thinking -> "
             f"{pct(b)} with {label} (n={a[2]} held-out problems)")
    return results


def show_thoughts(tok, examples, thoughts, n_shown, print_fn):
    print_fn("thoughts at the answer:")
    for ex, thought in list(zip(examples, thoughts.tolist()))[:n_shown]:
        print_fn(f"  {ex['question']}<|startthought|>{tok.decode(thought)}<|endthought|>{ex['answer']}")


def final_report(qs, base, tok, examples, seed, extra=(), n_shown=3, print_fn=print):
    """
    The end of the default run: the trained model with and without thinking, and the
    controls that need no training run, every one scored by score() on the same problems
    with the same seed: (a) the base model before training with the mixing weight forced
    to 1, (c) the trained model with random thoughts, and the base model without thinking.
    base: the QuietStar model as training started (the same delimiters and head).
    extra: (name, score dict) of controls scored elsewhere (data/arith/controls.py).
    The last line names the gain over the best control. Returns {name: score dict}.
    """
    rows = {"trained, with thinking": score(qs, tok, examples, True, seed),
            "trained, without thinking": score(qs, tok, examples, False, seed)}
    with forced_mixing(base):
        rows["(a) base model, mixing weight forced to 1"] = score(base, tok, examples, True, seed)
    rows["base model, without thinking"] = score(base, tok, examples, False, seed)
    rows["(c) trained, random thoughts"] = score(qs, tok, examples, True, seed, random_thoughts=True)
    rows.update(extra)
    print_fn(f"held-out arithmetic, {len(examples)} problems, exact accuracy ± standard error, one "
             f"thought per problem (seed {seed}):")
    for name, r in rows.items():
        print_fn(score_line(name, r))
    show_thoughts(tok, examples, rows["trained, with thinking"]["thoughts"], n_shown, print_fn)
    print_fn(headline(rows))
    return rows


def headline(rows):
    """'thinking earned: ... over the best control (name ...)'"""
    ours = rows["trained, with thinking"]["exact"]
    controls = {k: v["exact"] for k, v in rows.items() if k != "trained, with thinking"}
    best = max(controls, key=lambda k: controls[k][0])
    gain, se = ours[0] - controls[best][0], math.hypot(ours[1], controls[best][1])
    return (f"thinking earned: {pct(ours)} with thinking, {100 * gain:+.1f} ± {100 * se:.1f} points over "
            f"the best control ({best}: {pct(controls[best])}; n={ours[2]} held-out problems)")


def main():
    from quietstar import QuietStar
    from tokenizer import load_tokenizer
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--seed", type=int, default=42, help="as train.py and evaluate.py")
    p.add_argument("--random_thoughts", action="store_true")
    p.add_argument("--force_mixing", action="store_true", help="control (a): mixing weight 1")
    args = p.parse_args()
    if os.path.isfile(os.path.join(args.ckpt, "quietstar.json")):
        qs = QuietStar.from_pretrained(args.ckpt).eval()
    else:    # a plain model (data/arith/base): its thought slot set up as the default run sets it up
        import train
        cfg = train.parse_config([os.path.join(HERE, "..", "..", "config", "arith.py"), f"--seed={args.seed}"])
        qs = train.load_model(cfg, args.ckpt, 0, "cpu", False, load_tokenizer(args.ckpt)).eval()
    with forced_mixing(qs) if args.force_mixing else contextlib.nullcontext():
        thinking_summary(qs, load_tokenizer(args.ckpt), load_test(limit=args.limit), args.seed,
                         random_thoughts=args.random_thoughts)


if __name__ == "__main__":
    main()
