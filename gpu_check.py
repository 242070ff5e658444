"""
The GPU acceptance check: run once on a machine with CUDA (one H100/H200-class GPU: ~5-8
minutes) and it writes one report, gpu_check.json and gpu_check.md (--out PREFIX):

    python gpu_check.py                      # every check on GPU 0 (FSDP2 too with >= 2 GPUs)
    python gpu_check.py --device cpu --tiny  # the same code on a tiny CPU model (CI runs this)

usage: python gpu_check.py [--device cuda|cpu] [--tiny] [--out PREFIX] [--steps N]

Checks, each recorded as ok / failed / skipped with its figures (docs/gpu.md, "The GPU
acceptance check", describes every field):
  flex         compiled FlexAttention, forward and backward, against the reference attention
               (values and gradients of q, k, v; fp32 and bf16; sliding window and padding)
  compile      train.py with --compile=False and True: same losses, tokens/s of each
  mistral_step a few optimizer steps of a randomly initialised Mistral-7B at the paper's
               settings (no download): tokens/s, MFU, torch.cuda.max_memory_allocated beside
               estimate.py's peak for the same settings
  thinking     thinking generation speed (new tokens/s, thinking and not)
  fsdp         with >= 2 GPUs: FSDP2 on 2 processes against one process, small model
Without CUDA (and without --device cpu) it says so in one line and exits 0.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
GiB = 2 ** 30


def settings(argv):
    opts = {"device": "cuda", "tiny": False, "out": "gpu_check", "steps": 3}
    for arg in argv:
        name, _, value = arg[2:].partition("=")
        if arg in ("--tiny", "--tiny=True"):
            opts["tiny"] = True
        elif arg.startswith("--") and value and name in ("device", "out", "steps"):
            opts[name] = int(value) if name == "steps" else value
        else:
            raise SystemExit(f"{arg}: not understood; usage: " + __doc__.split("usage: ")[1].splitlines()[0])
    if opts["device"] not in ("cuda", "cpu"):
        raise SystemExit(f"--device={opts['device']}: expected cuda or cpu")
    return opts


# -----------------------------------------------------------------------------
# the checks: each returns a dict of figures, with "ok" (bool) or "skipped" (why)

def check_flex(device, tiny):
    """joint_flex_attention (compiled on CUDA) against thought_attention's reference path of
    _joint_attention, forward and backward, at Mistral's heads (tiny: 4 heads)."""
    from model import ModelArgs, Transformer
    from quietstar import QuietStar
    if device.type == "cpu":          # no flex backward on the CPU: its eager math, past the check
        import torch.nn.attention.flex_attention as flex
        flex._validate_device = lambda *args: None
        flex._warn_once = lambda *args, **kwargs: None                        # "unfused"
    H, Hkv, D, L = (4, 2, 16, 24) if tiny else (32, 8, 128, 256)
    M, P, results = 14, 2, {"ok": True}
    for dtype, tol in ((torch.float32, 2e-3), (torch.bfloat16, 5e-2)):
        for window in (None, L // 3):
            with torch.device("meta"):
                qs = QuietStar(Transformer(ModelArgs(n_layers=1, sliding_window=window)))
            g = torch.Generator(device=device).manual_seed(0)
            valid = torch.ones(2, L, dtype=torch.bool, device=device)
            valid[1, L * 2 // 3:] = False                                      # padding
            S = L + P * L * M
            inputs = [torch.randn(2, h, S, D, generator=g, device=device, dtype=dtype).requires_grad_()
                      for h in (H, Hkv, Hkv)]
            weights = torch.randn(2, H, S, D, generator=g, device=device, dtype=dtype)
            out = {}
            for impl in ("reference", "flex"):
                qs.attention_impl = impl
                y = qs._joint_attention(valid, P * L, M)(*inputs)
                out[impl] = [y] + list(torch.autograd.grad((y.float() * weights).sum(), inputs))
            name = f"{str(dtype)[6:]}_window{window or 'none'}"
            for what, a, b in zip(("out", "dq", "dk", "dv"), out["flex"], out["reference"]):
                error = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                results[f"{name}_{what}_rel_error"] = error
                results["ok"] &= error < tol
    return results


def check_compile(device, tiny):
    """train.py's default run (tiny model) for a few steps, eager and --compile=True."""
    if device.type != "cuda":
        return {"skipped": "torch.compile of the blocks is checked on CUDA only (minutes on a CPU)"}
    runs = {}
    for compiled in (False, True):
        with tempfile.TemporaryDirectory() as out:
            done = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--max_steps=6",
                                   f"--compile={compiled}", f"--out_dir={out}", "--thought_interval=0",
                                   "--save_interval=1000", "--device=cuda"],
                                  capture_output=True, text=True, cwd=HERE, timeout=600)
            if done.returncode:
                return {"ok": False, "error": done.stderr[-2000:]}
            rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]
        runs[compiled] = rows
    eager, compiled = runs[False], runs[True]
    error = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(eager[:2], compiled[:2]))
    speed = lambda rows: sum(r["tokens_per_s"] for r in rows[2:]) / len(rows[2:])    # after warm-up
    return {"ok": error < 1e-2, "loss_rel_error_steps_1_2": error, "eager_tokens_per_s": speed(eager),
            "compiled_tokens_per_s": speed(compiled), "speedup": speed(compiled) / speed(eager)}


def paper_settings(tiny):
    """The paper's step (config/quietstar_mistral7b.py: pure bf16 as the official run, activation
    checkpointing); tiny: the same on the tiny preset, 32-token windows."""
    import estimate
    extra = ["--preset=tiny", "--seq_len=32", "--docs_per_step=2", "--dtype=float32"] if tiny else []
    return estimate.parse_args([os.path.join(HERE, "config", "quietstar_mistral7b.py"), "--pure_bf16=True",
                                "--activation_checkpointing=True"] + extra)[0]


def check_mistral_step(device, tiny, steps):
    """A few optimizer steps of train.py's pieces on random weights at the paper's settings."""
    import estimate
    import train
    from model import PEAK_BF16_FLOPS, ModelArgs, Transformer
    from quietstar import QuietStar, step_flops
    cfg = paper_settings(tiny)
    args = ModelArgs.from_name(cfg.preset, vocab_size=32002)
    torch.manual_seed(0)
    with torch.device(device):
        model = QuietStar(Transformer(args), train.quietstar_config(cfg)).to(torch.bfloat16)
    model.init_thought_parameters()
    train.enable_activation_checkpointing(model, cfg.ffn_chunks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, fused=device.type == "cuda")
    n_micro = cfg.docs_per_step // cfg.micro_batch_size
    B, L = cfg.micro_batch_size, cfg.seq_len
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 1):                  # step 0 warms up (allocator, kernels)
        t0 = time.time()
        for m in range(n_micro):
            tokens = torch.randint(3, 32000, (B, L), device=device)
            valid = torch.ones(B, L, dtype=torch.bool, device=device)
            loss, _, _ = train.micro_step(model, model, tokens, valid, list(range(m * B, (m + 1) * B)), cfg, step)
            (loss / n_micro).backward()
        train.clip_gradients(model, cfg.grad_clip, False)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - t0)
    dt = sum(times[1:]) / steps
    c = model.config
    tokens = cfg.docs_per_step * L * (2 + c.n_thoughts * (c.branch_len + c.n_thought_tokens))
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name()), None) \
        if device.type == "cuda" else None
    flops = step_flops(args, train.quietstar_config(cfg), cfg.docs_per_step, L)
    measured = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    estimated = estimate.estimate(cfg, 1, quick=not tiny)["total"]
    result = {"settings": f"{cfg.preset}, {cfg.docs_per_step} docs x {L} tokens, pure bf16, checkpointing",
              "step_s": dt, "tokens_per_s": tokens / dt, "mfu": flops / dt / peak if peak else None,
              "max_memory_allocated_gib": measured / GiB if measured else None,
              "estimated_peak_gib": estimated / GiB, "loss": loss.item()}
    result["estimate_error"] = measured / estimated - 1 if measured else None
    result["ok"] = bool(torch.isfinite(loss).item()) and (measured is None or measured < 1.15 * estimated)
    return result


def check_thinking(device, tiny):
    """New tokens per second of generate_ids, with and without thinking, 8 prompts."""
    from model import ModelArgs, Transformer
    from quietstar import QuietStar
    args = ModelArgs.from_name("tiny" if tiny else "mistral-7b", vocab_size=32002)
    torch.manual_seed(0)
    with torch.device(device):
        qs = QuietStar(Transformer(args)).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    qs.init_thought_parameters()
    prompts = [[1] + list(range(100 + i, 140 + i)) for i in range(8)]
    n = 8 if tiny else 32
    result = {"ok": True}
    for think in (True, False):
        qs.generate_ids(prompts, 2, think=think)                          # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        new, _ = qs.generate_ids(prompts, n, think=think)
        if device.type == "cuda":
            torch.cuda.synchronize()
        result[f"{'thinking' if think else 'plain'}_tokens_per_s"] = new.numel() / (time.time() - t0)
    return result


def check_fsdp(device, tiny):
    """train.py on 2 processes with FSDP2 against 1 process, one step of 8 documents."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and gpus < 2:
        return {"skipped": f"needs >= 2 GPUs ({gpus} here)"}
    runs = {}
    for processes in (1, 2):
        with tempfile.TemporaryDirectory() as out:
            launcher = [sys.executable] if processes == 1 else \
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
            done = subprocess.run(launcher + [os.path.join(HERE, "train.py"), "--max_steps=1", "--docs_per_step=8",
                                              "--micro_batch_size=4", "--final_eval=", "--seq_len=32",
                                              f"--device={device.type}", "--dtype=float32",
                                              f"--out_dir={out}", "--thought_interval=0", "--save_interval=1000"],
                                  capture_output=True, text=True, cwd=HERE, timeout=600,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
            if done.returncode:
                return {"ok": False, "error": done.stderr[-2000:]}
            runs[processes] = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))
                               if '"loss"' in line][0]
    one, two = runs[1], runs[2]
    errors = {f"{k}_rel_error": abs(two[k] - one[k]) / abs(one[k]) for k in ("loss", "grad_norm")}
    return {"ok": max(errors.values()) < 1e-4, **errors}


CHECKS = {"flex": check_flex, "compile": check_compile, "mistral_step": check_mistral_step,
          "thinking": check_thinking, "fsdp": check_fsdp}


# -----------------------------------------------------------------------------

def markdown(report):
    lines = [f"# GPU check: {report['device_name']}", "",
             f"torch {report['torch']}, {report['gpus']} GPU(s), {report['seconds']:.0f} s, "
             f"{'tiny model' if report['tiny'] else 'full size'}", "",
             "| check | result | figures |", "|---|---|---|"]
    for name, r in report["checks"].items():
        result = "skipped" if "skipped" in r else "ok" if r.get("ok") else "**FAILED**"
        figures = r.get("skipped") or ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
            if k not in ("ok", "error") and v is not None)
        if "error" in r:
            figures += f" error: {r['error'].strip().splitlines()[-1] if r['error'].strip() else '?'}"
        lines.append(f"| {name} | {result} | {figures} |")
    return "\n".join(lines) + "\n"


def main(argv):
    opts = settings(argv)
    if opts["device"] == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here, nothing to check (--device cpu --tiny runs the code on the CPU)")
        return 0
    device = torch.device("cuda:0" if opts["device"] == "cuda" else "cpu")
    report = {"device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "gpus": torch.cuda.device_count() if device.type == "cuda" else 0,
              "tiny": opts["tiny"], "checks": {}}
    t_start = time.time()
    for name, check in CHECKS.items():
        t0 = time.time()
        try:
            extra = (opts["steps"],) if name == "mistral_step" else ()
            result = check(device, opts["tiny"], *extra)
        except Exception:                       # one failed check does not stop the others
            result = {"ok": False, "error": traceback.format_exc()}
        result["seconds"] = time.time() - t0
        report["checks"][name] = result
        print(f"{name}: {'skipped' if 'skipped' in result else 'ok' if result.get('ok') else 'FAILED'} "
              f"({result['seconds']:.0f} s)", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["seconds"] = time.time() - t_start
    report["ok"] = all(r.get("ok", True) for r in report["checks"].values())
    with open(opts["out"] + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(opts["out"] + ".md", "w") as f:
        f.write(markdown(report))
    print(f"{'all checks passed' if report['ok'] else 'SOME CHECKS FAILED'}; report: {opts['out']}.json, {opts['out']}.md")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
