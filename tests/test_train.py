"""train.py end to end on the CPU: learning, token counts, resume, DDP/FSDP2, failures."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from dataloader import write_documents
from train import parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the math run's settings (config/math.py: a tiny model from scratch, Mistral's vocabulary)
# with short sequences, so that a step takes a fraction of a second
FAST = ["--seq_len=16", "--n_thought_tokens=2", "--n_talk=2", "--docs_per_step=4",
        "--micro_batch_size=2", "--log_interval=1", "--thought_interval=0", "--device=cpu",
        "--dtype=float32"]


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory):
    """Eight documents shorter than seq_len: every batch is a fixed set of rows (no windows)."""
    prefix = str(tmp_path_factory.mktemp("data") / "docs")
    write_documents(prefix, [[100 + 7 * d + (i * d) % 11 for i in range(9)] for d in range(8)])
    return prefix


def train(args, out_dir, processes=1, check=True, timeout=300):
    launcher = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    config = [] if "--init_from=resume" in args else [os.path.join(ROOT, "config", "math.py")]  # saved on resume
    cmd = launcher + [os.path.join(ROOT, "train.py")] + config + FAST + args + [f"--out_dir={out_dir}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"loss"' in line]


def test_loss_goes_down_and_token_counts(short_docs, tmp_path):
    train([f"--data={short_docs}", "--n_documents=4", "--max_steps=8", "--learning_rate=3e-3",
           "--warmup_steps=1"], tmp_path)
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 9))       # as the console counts
    assert rows[-1]["nll_base"] < rows[0]["nll_base"] - 0.5     # the same 4 documents every step
    assert rows[-1]["nll_talk"] < rows[0]["nll_talk"] - 0.5
    # every token through the model counts: sampling (text + N steps per thought) and the
    # training forward (text + every branch token), 4 documents x 16 tokens
    N, T, P = 2, 2, 2
    per_position = 2 + P * ((N + T + 1) + N)
    for r in rows:
        assert r["tokens_per_s"] * r["step_time_s"] == pytest.approx(4 * 16 * per_position, rel=1e-6)


def test_resume_equals_uninterrupted(short_docs, tmp_path):
    common = [f"--data={short_docs}", "--warmup_steps=2", "--save_interval=100"]
    train(common + ["--max_steps=4"], tmp_path / "straight")
    train(common + ["--max_steps=2"], tmp_path / "split")
    train(["--init_from=resume", "--max_steps=4"], tmp_path / "split")
    straight, split = metrics(tmp_path / "straight"), metrics(tmp_path / "split")
    assert [r["step"] for r in split] == [1, 2, 3, 4]
    for a, b in zip(straight, split):
        for key in ("loss", "nll_base", "nll_talk", "policy_loss", "grad_norm"):
            assert a[key] == b[key], (a["step"], key)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_equal_one(short_docs, tmp_path, fsdp):
    """Same global batch (8 documents a step), on 1 process with 4 micro-batches and on 2
    processes (gloo) with 2 each, so that gradients are accumulated without sync and then
    reduced: the losses and the gradient norm agree to 1e-6 relative. (One step: after an
    update the sampled thoughts may flip where rounding differs, and the policy term, x 1e6,
    makes this tiny run chaotic: measured 1e-3 apart at step 2 with correct sync.)"""
    common = [f"--data={short_docs}", "--max_steps=1", "--warmup_steps=1", f"--fsdp={fsdp}",
              "--docs_per_step=8"]
    train(common, tmp_path / "one")
    train(common, tmp_path / "two", processes=2)
    (a,), (b,) = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for key in ("loss", "nll_base", "nll_talk", "policy_loss", "grad_norm"):
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), key
    assert os.path.isfile(tmp_path / "two" / "ckpt" / "model.safetensors")


def test_default_run_finishes(tmp_path):
    """`python train.py` as the README says, shortened to 2 steps: --max_steps changes only
    that (the arithmetic run, its final evaluation included, on 100 of its problems)."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--max_steps=2", "--final_eval_problems=100",
                           f"--out_dir={tmp_path}", "--device=cpu", "--dtype=float32"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step 2/2" in done.stdout and "<|startthought|>" in done.stdout
    assert "thinking earned: " in done.stdout                               # the arithmetic run's end
    assert {"model.safetensors", "config.json", "quietstar.json", "state.json", "optimizer.rank0.pt",
            "vocab.json", "manifest.json"} <= set(os.listdir(tmp_path / "ckpt"))
    # the first hour goes on: sample from it, thinking, with the thoughts shown
    done = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", str(tmp_path / "ckpt"),
                           "--prompt", "3+4*2-5=", "--show_thoughts", "--device=cpu"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3+4*2-5=" in done.stdout and "\n  <|startthought|>" in done.stdout     # one thought a line
    # and a second fresh run into the same out_dir is refused, in one line
    again = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--max_steps=2",
                            f"--out_dir={tmp_path}", "--device=cpu"], capture_output=True, text=True,
                           timeout=300, cwd=ROOT)
    assert again.returncode == 1 and "already holds a checkpoint (step 2)" in again.stderr


def test_nan_stops_and_keeps_the_last_checkpoint(short_docs, tmp_path):
    done = train([f"--data={short_docs}", "--max_steps=6", "--save_interval=1", "--warmup_steps=1",
                  "--learning_rate=1e30", "--grad_clip=1e30"], tmp_path, check=False)
    assert done.returncode == 1 and "stopping without saving" in done.stdout
    bad_step = int(re.search(r"step (\d+): non-finite", done.stdout).group(1))
    state = json.load(open(tmp_path / "ckpt" / "state.json"))
    assert state["step"] == bad_step - 1              # the step before the bad one
    assert f"(step {bad_step - 1}), is untouched" in done.stdout


def test_sigterm_saves_a_checkpoint(short_docs, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), os.path.join(ROOT, "config", "math.py")] + FAST + \
        [f"--data={short_docs}", "--max_steps=10000", "--save_interval=100000", f"--out_dir={tmp_path}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and not os.path.exists(tmp_path / "metrics.jsonl"):
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by signal" in out
    state = json.load(open(tmp_path / "ckpt" / "state.json"))
    assert 0 < state["step"] < 10000


def test_ctrl_c_is_acknowledged_at_once_and_a_second_one_stops_at_once(short_docs, tmp_path):
    log = tmp_path / "log.txt"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), os.path.join(ROOT, "config", "math.py")] + FAST + \
        [f"--data={short_docs}", "--max_steps=10000", "--save_interval=100000", "--seq_len=256",
         "--n_thought_tokens=8", f"--out_dir={tmp_path / 'out'}"]                  # slow steps
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.time() + 120
        while time.time() < deadline and "training QuietStar" not in log.read_text():
            time.sleep(0.1)
        time.sleep(1.0)                              # the handlers are installed; step 1 is under way
        proc.send_signal(signal.SIGINT)
        t0 = time.time()
        while time.time() - t0 < 10 and "press Ctrl-C again" not in log.read_text():
            time.sleep(0.01)
        acknowledged = time.time() - t0
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    text = log.read_text()
    assert acknowledged < 2.0, text                  # at once, not at the end of the step
    assert re.search(r"SIGINT: finishing step \d+, then saving; press Ctrl-C again to stop without saving", text)
    assert proc.returncode == 130 and "stopped at once, without saving" in text, text
    assert "Traceback" not in text


def test_settings_are_type_checked(tmp_path):
    assert parse_config(["--max_steps=7", "--learning_rate=1"]).learning_rate == 1.0
    with pytest.raises(SystemExit, match="max_steps='abc': expected int"):
        parse_config(["--max_steps=abc"])
    with pytest.raises(SystemExit, match="unknown setting 'max_step'"):
        parse_config(["--max_step=3"])
    config = tmp_path / "c.py"
    config.write_text("seq_len = 128\nmode = 'lm'\n")
    cfg = parse_config([str(config), "--seq_len=32"])
    assert (cfg.seq_len, cfg.mode) == (32, "lm")


def test_missing_data_is_a_clear_error(tmp_path):
    done = train([f"--data={tmp_path / 'nothing'}", "--max_steps=1"], tmp_path / "out", check=False)
    assert done.returncode != 0 and "nothing.bin: data file not found" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()   # no empty out_dir left


@pytest.mark.parametrize("ffn_chunks", [1, 3])
def test_activation_checkpointing_gives_the_same_gradients(ffn_chunks):
    """The thought branches read each block's text keys/values from outside the block; the
    recomputation must still give the same gradients (also with the feed-forward sublayer
    recomputed again in chunks of tokens inside it, 3 uneven chunks of the joint sequence,
    and the attention's norm checkpointed), and the same state dict keys."""
    import copy

    import torch

    from model import ModelArgs, Transformer
    from quietstar import QuietStar, QuietStarConfig
    from train import enable_activation_checkpointing
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64, vocab_size=52)
    plain = QuietStar(Transformer(args), QuietStarConfig(n_thought_tokens=2, n_talk=2, delimiter_init_id=5))
    plain.init_thought_parameters()
    with torch.no_grad():
        plain.mixing_head[4].weight.normal_(std=0.3)
    checkpointed = copy.deepcopy(plain)
    enable_activation_checkpointing(checkpointed, ffn_chunks)
    tokens = torch.randint(3, 50, (2, 10))
    thoughts = plain.sample_thoughts(tokens)
    for qs in (plain, checkpointed):
        loss, _ = qs.loss(tokens, thoughts)
        loss.backward()
    assert plain.state_dict().keys() == checkpointed.state_dict().keys()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        # chunks sum a weight's gradient in another order: float32 rounding, 1e-7 of its largest entry
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-8 + 1e-6 * a.grad.abs().max()), name


def test_periodic_evaluation(short_docs, tmp_path):
    """Validation loss and the paper's in-training metric every eval_interval steps."""
    done = train([f"--data={short_docs}", "--max_steps=2", "--eval_interval=2", "--eval_batches=1",
                  "--eval_paper_examples=2", "--thought_interval=2"], tmp_path)
    assert done.stdout.count("<|startthought|>") == 1      # the final thought, not also a periodic one
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert any("val_loss" in r for r in rows)
    scores = next(r for r in rows if "eval_gsm8k_paper" in r)
    assert 0 <= scores["eval_gsm8k_paper"] <= 1 and 0 <= scores["eval_csqa_paper"] <= 1


def test_clip_gradients_equals_torch():
    """clip_gradients against torch.nn.utils.clip_grad_norm_: the same norm and the same
    gradients, scaled when the norm is above max_norm and untouched below it."""
    import copy
    import math

    import torch

    from train import clip_gradients
    torch.manual_seed(0)
    for max_norm in (0.5, 1e3):
        ours = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
        ours[2].bias.requires_grad_(False)                  # a parameter without a gradient
        reference = copy.deepcopy(ours)
        x = torch.randn(4, 7)
        for model in (ours, reference):
            model(x).square().sum().backward()
        norm = clip_gradients(ours, max_norm, fsdp=False)
        expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
        assert math.isclose(norm, expected.item(), rel_tol=1e-6)
        assert (norm > max_norm) == (max_norm == 0.5)       # one case clips, the other does not
        for a, b in zip(ours.parameters(), reference.parameters()):
            assert (a.grad is None) == (b.grad is None)
            assert a.grad is None or torch.allclose(a.grad, b.grad, rtol=1e-6, atol=0)
