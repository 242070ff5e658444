"""sample.py generates from every kind of checkpoint: plain Mistral in both layouts (and the
.pth of the v0.1 tarball), train.py's Quiet-STaR checkpoints and the released layout; with
--think and --show_thoughts where the checkpoint can think."""
import sys

import pytest

import sample
from tiny_ckpt import make_tiny


def run_sample(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["sample.py", "--device", "cpu", "--max_new_tokens", "4"] + list(args))
    sample.main()
    return capsys.readouterr().out


@pytest.mark.parametrize("kind", ["hf", "mistral", "mistral_pth", "quietstar", "released"])
def test_every_checkpoint_kind(kind, tmp_path, monkeypatch, capsys):
    path = make_tiny(tmp_path / kind, kind)
    out = run_sample(monkeypatch, capsys, "--ckpt", path, "--prompt", "Q: 2+3?\\nA:", "--prompt", "Once",
                     "--temperature", "0")
    assert "Q: 2+3?\nA:" in out and "new tokens in" in out and "(batch 2, cpu, float32)" in out
    if kind in ("quietstar", "released"):
        out = run_sample(monkeypatch, capsys, "--ckpt", path, "--prompt", "Q: 2+3?", "--show_thoughts",
                         "--n_thought_tokens", "3")
        assert out.count("<|startthought|>") == 4 and out.count("<|endthought|>") == 4
        lines = [line for line in out.splitlines() if "<|startthought|>" in line]
        assert len(lines) == 4 and all(line.startswith("  <|startthought|>") for line in lines)  # one a line
        assert "thinking)" in out
    else:
        with pytest.raises(SystemExit, match="cannot think; drop --think"):
            run_sample(monkeypatch, capsys, "--ckpt", path, "--prompt", "x", "--think")


def test_a_stop_string_ends_the_continuation(tmp_path, monkeypatch, capsys):
    path = make_tiny(tmp_path / "hf", "hf")
    full = run_sample(monkeypatch, capsys, "--ckpt", path, "--prompt", "Once", "--temperature", "0",
                      "--max_new_tokens", "40")
    text = full.split("-" * 80)[1].strip()[len("Once"):]     # the greedy continuation
    stop = text[len(text) // 2:len(text) // 2 + 3]
    out = run_sample(monkeypatch, capsys, "--ckpt", path, "--prompt", "Once", "--temperature", "0",
                     "--max_new_tokens", "40", "--stop", stop)
    cut = out.split("-" * 80)[1].strip()[len("Once"):]
    assert cut.endswith(stop) or cut.rstrip().endswith(stop.rstrip())
    assert text.startswith(cut) and len(cut) < len(text)


def test_the_arithmetic_model_answers_in_one_symbol(monkeypatch, capsys):
    """The default run's base model (a compact vocabulary): one new token by default, its answer."""
    import os
    base = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "arith", "base")
    for extra, n in (([], 1), (["--max_new_tokens", "3"], 3)):
        monkeypatch.setattr(sys, "argv", ["sample.py", "--device", "cpu", "--ckpt", base,
                                          "--prompt", "3+4*2-5=", "--temperature", "0"] + extra)
        sample.main()
        assert f"{n} new tokens" in capsys.readouterr().out
