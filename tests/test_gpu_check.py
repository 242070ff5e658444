"""gpu_check.py: without CUDA it says so and exits 0; its checks' code runs on a tiny CPU model
(so that it cannot rot before the day a GPU runs it)."""
import json
import os
import subprocess
import sys

import torch
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, tmp_path):
    return subprocess.run([sys.executable, os.path.join(ROOT, "gpu_check.py")] + args, capture_output=True,
                          text=True, cwd=tmp_path, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA runs the real check")
def test_without_cuda_one_line_and_exit_0(tmp_path):
    done = run([], tmp_path)
    assert done.returncode == 0 and done.stdout.count("\n") == 1 and "no CUDA device" in done.stdout
    assert not os.listdir(tmp_path)


def test_every_check_runs_on_a_tiny_cpu_model(tmp_path):
    done = run(["--device=cpu", "--tiny", "--steps=1", f"--out={tmp_path / 'report'}"], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    report = json.load(open(tmp_path / "report.json"))
    checks = report["checks"]
    assert set(checks) == {"flex", "compile", "mistral_step", "thinking", "fsdp"} and report["ok"]
    assert checks["flex"]["float32_window8_dq_rel_error"] < 1e-5        # the mask and autograd path
    assert "skipped" in checks["compile"]
    step = checks["mistral_step"]
    assert step["tokens_per_s"] > 0 and step["estimated_peak_gib"] > 0 and step["mfu"] is None
    assert checks["thinking"]["thinking_tokens_per_s"] < checks["thinking"]["plain_tokens_per_s"]
    assert checks["fsdp"]["grad_norm_rel_error"] < 1e-6
    table = open(tmp_path / "report.md").read()
    assert "| mistral_step | ok |" in table and "| compile | skipped |" in table


def test_bad_setting_is_named():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "gpu_check.py"), "--device=tpu"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1 and "--device=tpu: expected cuda or cpu" in done.stderr
