"""
The controls of the default run that need their own training runs, and the seeds: for each
seed, three runs of `train.py config/arith.py` (the default run; (b) the same without
REINFORCE, --policy_weight=0; (d) plain fine-tuning on the same text for the same steps,
--mode=lm), then every model scored by data/arith/report.py's score(), the code that scores
the default run's headline, on the same 1,000 held-out problems with the run's seed.

    python data/arith/controls.py                      # seeds 42, 1, 2; runs under out-controls/
    python data/arith/controls.py --seeds 42 --skip_training   # score runs already there

Prints one block per seed (the rows of the default run's final report plus (b) and (d))
and a last block with the means over seeds of the issue's two targets: thinking minus the
best of (a), the base model without thinking and the trained model without thinking; and
thinking minus (b). The default run and (b) take about as long as `python train.py` each
(230-280 s of CPU at one thread, AMD EPYC), (d) about 13 s; each run's output goes to
out_root/seedS/NAME.log.
"""

import argparse
import os
import resource
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

CONFIG = os.path.join(ROOT, "config", "arith.py")
RUNS = {"full": [], "b": ["--policy_weight=0"], "d": ["--mode=lm"]}


def train(seed, name, out_root, extra=()):
    out_dir = os.path.join(out_root, f"seed{seed}", name)
    if os.path.isdir(os.path.join(out_dir, "ckpt")):
        print(f"  {out_dir}: already trained, kept", flush=True)
        return out_dir
    args = [sys.executable, os.path.join(ROOT, "train.py"), CONFIG, f"--seed={seed}", f"--out_dir={out_dir}"]
    quiet = [] if name == "full" else ["--final_eval=", "--thought_interval=0"]   # the full run: as train.py
    log = out_dir + ".log"
    print(f"  {' '.join(args[1:] + RUNS[name] + quiet + list(extra))}  > {log}", flush=True)
    os.makedirs(os.path.dirname(log), exist_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as f:
        subprocess.run(args + RUNS[name] + quiet + list(extra), check=True, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    print(f"  {cpu:.0f} s of CPU time; peak resident memory of any run so far {after.ru_maxrss / 2**20:.2f} GB",
          flush=True)
    return out_dir


def score_seed(seed, out_root, extra_settings=(), print_fn=print):
    """Every row for one seed, scored by report.score. -> {row name: score dict}"""
    import torch
    import train as trainer
    from quietstar import QuietStar
    from tokenizer import load_tokenizer
    from data.arith.report import final_report, load_test, score
    cfg = trainer.parse_config([CONFIG, f"--seed={seed}", *extra_settings])
    source = os.path.join(ROOT, cfg.init_from)
    tok = load_tokenizer(source)
    examples = load_test()
    base = trainer.load_model(cfg, source, 0, "cpu", False, tok)        # as every run started
    full = QuietStar.from_pretrained(os.path.join(out_root, f"seed{seed}", "full", "ckpt"))
    no_reinforce = QuietStar.from_pretrained(os.path.join(out_root, f"seed{seed}", "b", "ckpt"))
    torch.manual_seed(seed)
    lm = QuietStar.from_pretrained(os.path.join(out_root, f"seed{seed}", "d", "ckpt"),
                                   trainer.quietstar_config(cfg))   # a plain model: scored without thinking
    extra = {"(b) run without REINFORCE, with thinking": score(no_reinforce, tok, examples, True, seed),
             "(b) run without REINFORCE, without thinking": score(no_reinforce, tok, examples, False, seed),
             "(d) plain fine-tuning (--mode=lm)": score(lm, tok, examples, False, seed)}
    return final_report(full, base, tok, examples, seed, extra=extra, print_fn=print_fn)


def targets(per_seed, print_fn=print):
    """The issue's targets, per seed and as means: -> (earned gains, gains over (b)) lists."""
    earned, over_b = [], []
    for seed, rows in per_seed.items():
        ours = rows["trained, with thinking"]["exact"][0]
        floor = max(rows[k]["exact"][0] for k in ("(a) base model, mixing weight forced to 1",
                                                  "base model, without thinking", "trained, without thinking"))
        earned.append(100 * (ours - floor))
        over_b.append(100 * (ours - rows["(b) run without REINFORCE, with thinking"]["exact"][0]))
        print_fn(f"seed {seed}: thinking minus the best of (a), base and trained without thinking "
                 f"{earned[-1]:+.1f} points; minus (b) {over_b[-1]:+.1f} points")
    print_fn(f"mean over {len(earned)} seeds: {np.mean(earned):+.1f} points earned (target >= 20, each >= 15); "
             f"{np.mean(over_b):+.1f} points over the run without REINFORCE (target >= 10)")
    return earned, over_b


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="42,1,2")
    p.add_argument("--out_root", default=os.path.join(ROOT, "out-controls"))
    p.add_argument("--skip_training", action="store_true", help="score the runs under out_root only")
    args, extra = p.parse_known_args()     # the rest: train.py settings for every run (--max_steps=200)
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed = {}
    for seed in seeds:
        if not args.skip_training:
            for name in RUNS:
                train(seed, name, args.out_root, extra)
        print(f"seed {seed}:")
        per_seed[seed] = score_seed(seed, args.out_root, extra)
    targets(per_seed)


if __name__ == "__main__":
    main()
