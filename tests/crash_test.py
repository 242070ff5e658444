"""
Kill training with SIGKILL at random instants, again and again, and check that nothing is
lost: after every kill a complete checkpoint exists, the next run resumes (and saves) from it,
and the final weights, optimizer state and per-step losses equal an uninterrupted run's bit
for bit. Too slow for CI (minutes); run it by hand after touching checkpoint.py or train.py:

    python tests/crash_test.py                 # 50 kills, a checkpoint every step
    python tests/crash_test.py --kills 200 --seed 3

Each run is train.py on the tiny preset with short sequences; the kill comes a random time
after the run prints its first line, uniformly over about three steps, so kills land in
every phase: computing, writing ckpt.tmp, the renames, deleting ckpt.old, tidying at start.
"""

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
from dataloader import write_documents  # noqa: E402

SETTINGS = ["config/math.py", "--seq_len=16", "--n_thought_tokens=2", "--n_talk=2", "--docs_per_step=4",
            "--micro_batch_size=2", "--thought_interval=0", "--device=cpu", "--dtype=float32",
            "--warmup_steps=2", "--save_interval=1"]


def launch(out_dir, data, extra, log):
    cmd = [sys.executable, os.path.join(ROOT, "train.py")] + SETTINGS + \
        [f"--data={data}", f"--out_dir={out_dir}"] + extra
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for_start(proc, log_file, timeout=900):
    """Seconds until the run printed its first line (its imports done), or None if it ended."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            return None
        with open(log_file) as f:
            if "training " in f.read():
                return time.time() - t0
        time.sleep(0.02)
    raise RuntimeError("train.py did not start within 120 s")


def state_after_kill(out_dir):
    """Which of ckpt, ckpt.old, ckpt.tmp exist, and which are complete: e.g. 'ckpt+ old- tmp+'."""
    parts = []
    for name in checkpoint.NAMES:
        path = os.path.join(out_dir, name)
        if os.path.lexists(path):
            parts.append(name.replace("ckpt.", "") + ("+" if checkpoint.complete_step(path) is not None else "-"))
    return " ".join(parts) or "none"


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()[:16]


def losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, f) if "loss" in r]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args()
    rng = random.Random(args.seed)
    work = tempfile.mkdtemp(prefix="crash_test_")
    data = os.path.join(work, "docs")
    write_documents(data, [[100 + 7 * d + (i * d) % 11 for i in range(9)] for d in range(8)])
    out_dir, log_file = os.path.join(work, "out"), os.path.join(work, "log.txt")

    # how long a step takes here (with its save), to spread the kills over about three steps
    t0 = time.time()
    with open(log_file, "w") as log:
        proc = launch(os.path.join(work, "timing"), data, ["--max_steps=4"], log)
        start = wait_for_start(proc, log_file)
        proc.wait()
    step_time = (time.time() - t0 - start) / 4
    print(f"start-up {start:.1f}s, one step with its checkpoint {step_time:.2f}s; killing "
          f"{args.kills} times within 0..{3 * step_time:.1f}s after start-up")

    states, failures, runs, kills = {}, [], 0, 0
    while kills < args.kills:
        resume = checkpoint.newest(out_dir) is not None if os.path.isdir(out_dir) else False
        extra = ["--max_steps=100000"] + (["--init_from=resume"] if resume else ["--overwrite=True"])
        with open(log_file, "w") as log:
            proc = launch(out_dir, data, extra, log)
            runs += 1
            try:
                started = wait_for_start(proc, log_file)
                if started is not None:
                    time.sleep(rng.uniform(0, 3 * step_time))
            finally:                                  # never leave a run behind
                if proc.poll() is None:
                    proc.kill()
                    kills += 1
                proc.wait()
        output = open(log_file).read()
        if proc.returncode not in (-9, 0):
            failures.append(f"run {runs} exited with {proc.returncode}: {output[-500:]}")
        state = state_after_kill(out_dir) if os.path.isdir(out_dir) else "no out_dir"
        states[state] = states.get(state, 0) + 1
        found = checkpoint.newest(out_dir) if os.path.isdir(out_dir) else None
        if resume and found is None:
            failures.append(f"run {runs}: no complete checkpoint after the kill ({state})")
        print(f"kill {kills:3d}: after {output.count('saved')} save(s) in this run; newest complete "
              f"checkpoint: step {found[1] if found else '-'}; left: {state}", flush=True)

    # finish without a kill, and compare with one uninterrupted run of the same length
    final_step = checkpoint.newest(out_dir)[1] + 2
    with open(log_file, "w") as log:
        done = launch(out_dir, data, ["--init_from=resume", f"--max_steps={final_step}"], log).wait()
        straight = launch(os.path.join(work, "straight"), data, [f"--max_steps={final_step}"], log).wait()
    if done or straight:
        failures.append(f"final runs exited with {done}, {straight}: {open(log_file).read()[-800:]}")
    else:
        for name in ("model.safetensors", "optimizer.rank0.pt"):
            a, b = (digest(os.path.join(d, "ckpt", name)) for d in (out_dir, os.path.join(work, "straight")))
            if a != b:
                failures.append(f"{name} differs from the uninterrupted run's ({a} vs {b})")
        if losses(out_dir) != losses(os.path.join(work, "straight")):
            failures.append("metrics.jsonl losses differ from the uninterrupted run's")

    print(f"\n{kills} kills over {runs} runs, {final_step} steps in the end; what the kills left "
          f"(+ complete, - partial):")
    for state, n in sorted(states.items(), key=lambda x: -x[1]):
        print(f"  {n:4d}  {state}")
    print(f"final weights, optimizer state and losses equal the uninterrupted run's: "
          f"{'no' if any('differ' in f for f in failures) else 'yes'}")
    print(f"{len(failures)} failure(s)" + "".join(f"\n  {f}" for f in failures))
    if not args.keep:
        import shutil
        shutil.rmtree(work)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
