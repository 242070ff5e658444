"""checkpoint.py: a save interrupted at any file-system operation never loses the checkpoint,
a failed save (disk full) says where and why and keeps the previous one, non-finite weights
are caught, a fresh run refuses an out_dir holding a checkpoint. In-process and fast; the
kill -9 version of the first test is tests/crash_test.py (too slow for CI)."""
import json
import os
import resource
import shutil

import pytest
import torch

import checkpoint
from model import ModelArgs, Transformer
from tokenizer import VENDORED


class Interrupted(BaseException):
    """Stands for a kill: nothing after it runs (not even `except Exception` handlers)."""


def tiny():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8,
                                  hidden_dim=32, vocab_size=32000))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    optimizer.step()
    return model, optimizer


def save(model, optimizer, out_dir, step):
    checkpoint.save_checkpoint(model, optimizer, {"out_dir": str(out_dir)}, step, 0, 1, False, VENDORED)


def count_operations(monkeypatch, stop_at):
    """Make the stop_at-th file-system change (rename, remove, mkdir, rmtree) the last one
    before a 'kill'; a stopped rmtree deletes half of the directory first."""
    calls = {"n": 0}

    def wrap(real, name):
        def changed(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == stop_at:
                if name == "rmtree" and os.path.isdir(args[0]):
                    files = sorted(os.listdir(args[0]))
                    for f in files[:len(files) // 2]:
                        os.remove(os.path.join(args[0], f))
                raise Interrupted
            return real(*args, **kwargs)
        return changed
    for module, name in ((os, "replace"), (os, "remove"), (os, "makedirs"), (shutil, "rmtree")):
        monkeypatch.setattr(module, name, wrap(getattr(module, name), name))
    return calls


def test_a_save_interrupted_anywhere_loses_nothing(tmp_path, monkeypatch):
    model, optimizer = tiny()
    save(model, optimizer, tmp_path / "clean", 1)
    with monkeypatch.context() as m:                  # how many operations a rotation makes
        calls = count_operations(m, stop_at=-1)
        save(model, optimizer, tmp_path / "clean", 2)
    n_operations = calls["n"]
    assert n_operations >= 8
    seen = set()
    for stop_at in range(1, n_operations + 1):
        out_dir = tmp_path / f"kill{stop_at}"
        save(model, optimizer, out_dir, 1)
        with monkeypatch.context() as m:
            count_operations(m, stop_at)
            with pytest.raises(Interrupted):
                save(model, optimizer, out_dir, 2)
        seen.add(tuple(sorted(os.listdir(out_dir))))
        path, step = checkpoint.newest(out_dir)          # a complete one, step 1 or 2
        assert step in (1, 2) and checkpoint.complete_step(path) == step
        assert checkpoint.tidy(out_dir) == (str(out_dir / "ckpt"), step)
        assert sorted(os.listdir(out_dir)) == ["ckpt"]   # leftovers removed
        assert Transformer.from_pretrained(str(out_dir / "ckpt")).state_dict().keys() == model.state_dict().keys()
        save(model, optimizer, out_dir, 3)               # and the run can save again
        assert checkpoint.newest(out_dir) == (str(out_dir / "ckpt"), 3)
    # the kills left every kind of interrupted rotation behind, among them the two of the audit:
    assert ("ckpt", "ckpt.old") in seen                  # a partly deleted ckpt.old (Errno 39 before)
    assert ("ckpt.old", "ckpt.tmp") in seen              # between the two renames (no ckpt before)


def test_resume_takes_the_newest_complete_checkpoint(tmp_path):
    model, optimizer = tiny()
    save(model, optimizer, tmp_path, 1)
    os.replace(tmp_path / "ckpt", tmp_path / "ckpt.old")
    save(model, optimizer, tmp_path / "other", 2)
    os.replace(tmp_path / "other" / "ckpt", tmp_path / "ckpt.tmp")
    assert checkpoint.resume_state(str(tmp_path))["step"] == 2
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "other"]
    # a directory whose files do not match its manifest is not complete
    with open(tmp_path / "ckpt" / "state.json", "a") as f:
        f.write(" ")
    assert checkpoint.newest(str(tmp_path)) is None
    with pytest.raises(SystemExit, match="no complete checkpoint to resume from"):
        checkpoint.resume_state(str(tmp_path))


def test_disk_full_names_the_path_and_keeps_the_previous_checkpoint(tmp_path):
    model, optimizer = tiny()
    save(model, optimizer, tmp_path, 1)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))   # writes beyond 20 kB fail (EFBIG)
    try:
        with pytest.raises(SystemExit) as failed:
            save(model, optimizer, tmp_path, 2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = str(failed.value)
    assert f"{tmp_path / 'ckpt.tmp'}" in message and "File too large" in message
    assert f"the previous checkpoint {tmp_path / 'ckpt'} is kept" in message
    assert len(message.splitlines()) == 2
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]                 # no partial files left
    assert checkpoint.newest(str(tmp_path)) == (str(tmp_path / "ckpt"), 1)


def test_non_finite_weights_are_caught():
    model, _ = tiny()
    assert checkpoint.weights_are_finite(model, 1)
    with torch.no_grad():
        model.layers[0].attention.wq.weight[0, 0] = float("inf")
    assert not checkpoint.weights_are_finite(model, 1)


def test_fresh_run_refuses_an_out_dir_with_a_checkpoint(tmp_path):
    model, optimizer = tiny()
    save(model, optimizer, tmp_path, 3)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\n')
    with pytest.raises(SystemExit, match=r"already holds a checkpoint \(step 3\).*--init_from=resume.*--overwrite=True"):
        checkpoint.prepare_out_dir(str(tmp_path), False, False, 0, True)
    # overwrite: nothing goes yet; the new run logs beside the old metrics until its first save
    before = {n: open(tmp_path / n, "rb").read() for n in ("metrics.jsonl", "ckpt/state.json")}
    path = checkpoint.prepare_out_dir(str(tmp_path), False, True, 0, True, run_id="ab12")
    assert path == str(tmp_path / "metrics.jsonl.new-ab12")
    assert before == {n: open(tmp_path / n, "rb").read() for n in before}
    with open(path, "w") as f:
        f.write('{"step": 1, "loss": 2}\n')
    save(model, optimizer, tmp_path, 1)                      # the new run's first save
    checkpoint.finish_replacing(str(tmp_path), "ab12")
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "metrics.jsonl"]
    assert open(tmp_path / "metrics.jsonl").read() == '{"step": 1, "loss": 2}\n'


def test_a_replacement_killed_around_its_first_save(tmp_path):
    """Killed after its first save but before its metrics replaced the old ones: resuming adopts
    the metrics of the run the checkpoint belongs to; a leftover of another run is dropped."""
    model, optimizer = tiny()
    checkpoint.save_checkpoint(model, optimizer, {"out_dir": str(tmp_path)}, 2, 0, 1, False, VENDORED, "new1")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 9}\n{"step": 5, "loss": 9}\n')   # the old run's
    (tmp_path / "metrics.jsonl.new-new1").write_text('{"step": 1, "loss": 1}\n{"step": 2, "loss": 1}\n')
    (tmp_path / "metrics.jsonl.new-old0").write_text('{"step": 1, "loss": 5}\n')
    state = checkpoint.resume_state(str(tmp_path))
    assert state["run_id"] == "new1"
    checkpoint.prepare_out_dir(str(tmp_path), True, False, state["step"], True, state["run_id"])
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "metrics.jsonl"]
    assert [json.loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl")] == [1, 1]


def test_resume_drops_metrics_of_unsaved_steps(tmp_path):
    rows = [{"step": s, "loss": 1.0} for s in (1, 2, 3, 4)] + [{"step": 2, "val_loss": 1.0}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo'     # cut by a kill
    (tmp_path / "metrics.jsonl").write_text(text)
    checkpoint.prepare_out_dir(str(tmp_path), True, False, 2, True)
    kept = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in kept] == [1, 2, 2]


def test_an_empty_out_dir_is_removed(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.jsonl").write_text("")
    checkpoint.remove_if_empty(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "metrics.jsonl").write_text("{}\n")
    checkpoint.remove_if_empty(str(tmp_path / "kept"))
    assert (tmp_path / "kept").exists()


def run_train(args, out_dir):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, os.path.join(root, "train.py"), "--docs_per_step=4", "--micro_batch_size=4",
                           "--thought_interval=0", "--device=cpu", f"--out_dir={out_dir}"] + args,
                          capture_output=True, text=True, timeout=300, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_stopped_run_skips_the_final_evaluation_and_a_finished_one_says_so(tmp_path):
    """SIGINT during the arithmetic run: it saves, says that it skips the final evaluation and
    does not print one; resumed to its end it evaluates once; resumed again it says it is finished."""
    import signal
    import subprocess
    import sys
    import time
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, os.path.join(root, "train.py"), "--docs_per_step=4",
                                 "--micro_batch_size=4", "--thought_interval=0", "--device=cpu",
                                 "--max_steps=100000", f"--out_dir={tmp_path / 'out'}"], stdout=out,
                                stderr=subprocess.STDOUT, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 240
        while time.time() < deadline and "step 1/" not in log.read_text():
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=240)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "so no final evaluation" in text and "thinking earned" not in text
    step = json.load(open(tmp_path / "out" / "ckpt" / "state.json"))["step"]
    done = run_train(["--init_from=resume", f"--max_steps={step + 1}", "--final_eval_problems=100"], tmp_path / "out")
    assert done.returncode == 0 and done.stdout.count("thinking earned: ") == 1, done.stderr
    again = run_train(["--init_from=resume", f"--max_steps={step + 1}"], tmp_path / "out")
    assert again.returncode == 0, again.stderr
    assert f"this run is finished (its checkpoint is at step {step + 1}, max_steps={step + 1})" in again.stdout
    assert "thinking earned" not in again.stdout and "steps" not in again.stdout.split("finished")[0]
