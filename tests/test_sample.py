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
        assert "thinking)" in out
    else:
        with pytest.raises(SystemExit, match="cannot think; drop --think"):
            run_sample(monkeypatch, capsys, "--ckpt", path, "--prompt", "x", "--think")
