"""Every mistake a user can make is explained in a line or two naming the setting or file:
one test per class of failure (settings out of range, bad config files, broken JSON, missing
keys, wrong types, files that are not weights-only, truncated weights, vocabulary mismatches,
token ids out of range, bad data files, a missing GPU), and the command lines print no
traceback."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint
from cli import check_device, read_overrides
from dataloader import Documents, check_token_ids, write_documents
from model import load_checkpoint, read_config, tensor_names
from tiny_ckpt import make_tiny
from tokenizer import check_vocabulary, load_tokenizer
from train import parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("arg, message", [
    ("--micro_batch_size=0", "micro_batch_size=0: must be a finite number >= 1"),
    ("--save_interval=0", "save_interval=0: must be a finite number >= 1"),
    ("--n_thought_tokens=0", "n_thought_tokens=0: must be a finite number >= 1"),
    ("--grad_clip=-1", "grad_clip=-1.0: must be a finite number > 0"),
    ("--learning_rate=inf", "learning_rate=inf: must be a finite number >= 0 and <= 1e+30"),
    ("--beta2=1.5", "beta2=1.5: must be a finite number >= 0 and <= 0.999999"),
    ("--seq_len=2", "seq_len=2: must be a finite number >= 3"),              # n_talk 2 + 1
    ("--dtype=foo", "dtype='foo': expected one of float32, bfloat16, float16"),
    ("--mode=foo", "mode='foo': expected 'quietstar' or 'lm'"),
    ("--preset=huge", "preset='huge': expected one of"),
    ("--docs_per_step=3", "docs_per_step=3 must be a multiple of micro_batch_size=2"),
    ("--device=tpu", "device='tpu': expected cpu, cuda, cuda:N or mps"),
])
def test_settings_out_of_range_name_the_allowed_range(arg, message):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace("+", r"\+")):
        parse_config([arg, "--device=cpu"] if not arg.startswith("--device") else [arg])


def test_space_separated_values_and_help(capsys):
    cfg = parse_config(["--max_steps", "10", "--learning_rate", "3e-4", "--mode", "lm", "--device=cpu"])
    assert (cfg.max_steps, cfg.learning_rate, cfg.mode) == (10, 3e-4, "lm")
    with pytest.raises(SystemExit, match="--max_steps: expected --name=value or --name value"):
        read_overrides(["--max_steps"])
    with pytest.raises(SystemExit) as done:
        parse_config(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "--n_thought_tokens=4" in text and "the paper: 9 thought tokens" in text
    assert "--overwrite=False" in text and "a fresh run may replace a checkpoint" in text


def test_config_file_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("max_steps = 10\nlearning_rate = = 3\n")
    with pytest.raises(SystemExit, match=rf"{bad}:2: syntax error in config file"):
        parse_config([str(bad)])
    bad.write_text("max_steps = undefined_name\n")
    with pytest.raises(SystemExit, match=rf"{bad}: config file failed: NameError"):
        parse_config([str(bad)])
    with pytest.raises(SystemExit, match="nothing.py: config file not found"):
        parse_config([str(tmp_path / "nothing.py")])


def test_cuda_without_a_gpu_is_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match="device=cuda: CUDA is not available .*; use --device=cpu"):
        check_device("cuda")


@pytest.mark.parametrize("file, text, message", [
    ("config.json", "{not json", "config.json: not valid JSON"),
    ("config.json", "[1, 2]", "config.json: expected a JSON object"),
    ("config.json", "DROP:hidden_size", "config.json: missing key 'hidden_size'"),
    ("config.json", "SET:hidden_size=\"abc\"", "config.json: dim should be an integer, got 'abc'"),
    ("config.json", "SET:num_key_value_heads=3", "n_heads 4 is not a multiple of n_kv_heads 3"),
    ("model.safetensors.index.json", "{oops", "model.safetensors.index.json: not valid JSON"),
    ("model.safetensors.index.json", "{}", "model.safetensors.index.json: missing key 'weight_map'"),
    ("quietstar.json", "{oops", "quietstar.json: not valid JSON"),
    ("quietstar.json", '{"n_thought_tokens": "9"}', "quietstar.json: n_thought_tokens should be int"),
    ("quietstar.json", '{"n_ahead": 9}', "quietstar.json: unknown setting 'n_ahead'"),
])
def test_broken_json_files_are_named(tmp_path, file, text, message):
    path = make_tiny(tmp_path / "ckpt", "quietstar")
    target = os.path.join(path, file)
    if text.startswith(("DROP:", "SET:")):
        config = json.load(open(target))
        if text.startswith("DROP:"):
            del config[text[5:]]
        else:
            key, value = text[4:].split("=")
            config[key] = json.loads(value)
        text = json.dumps(config)
    with open(target, "w") as f:
        f.write(text)
    with pytest.raises(ValueError, match=message):
        tensor_names(path)                               # config.json, the index, the weight files
        checkpoint.read_quietstar_config(path)


def test_state_json_errors_are_named(tmp_path):
    path = make_tiny(tmp_path / "out" / "ckpt", "quietstar")
    (tmp_path / "out" / "ckpt" / "state.json").write_text('{"config": {}}')
    checkpoint.write_manifest(path, 3)
    with pytest.raises(ValueError, match="state.json: missing key 'step'"):
        checkpoint.resume_state(str(tmp_path / "out"))


def test_files_that_are_not_weights_only_are_refused_without_running_them(tmp_path):
    path = make_tiny(tmp_path / "ckpt", "mistral_pth")
    ran = tmp_path / "ran"
    torch.save({"x": torch.zeros(1), "evil": Evil(str(ran))}, os.path.join(path, "consolidated.00.pth"))
    with pytest.raises(ValueError, match=r"consolidated.00.pth: not a weights-only file .*refused"):
        load_checkpoint(path)
    assert not ran.exists()                               # no code from the file ran
    model, optimizer = torch.nn.Linear(2, 2), None
    optimizer = torch.optim.AdamW(model.parameters())
    bad = tmp_path / "optimizer.rank0.pt"
    torch.save({"state": {}, "param_groups": [], "evil": Evil(str(ran))}, bad)
    with pytest.raises(SystemExit, match="optimizer.rank0.pt: not a readable weights-only optimizer file"):
        checkpoint.load_optimizer_state(optimizer, str(bad), "cpu")
    assert not ran.exists()


class Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.mark.parametrize("kind", ["quietstar", "mistral_pth"])
def test_truncated_weights_are_named(tmp_path, kind):
    path = make_tiny(tmp_path / "ckpt", kind)
    file = os.path.join(path, "consolidated.00.pth" if kind == "mistral_pth" else "model.safetensors")
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)
    with pytest.raises(ValueError, match=rf"{os.path.basename(file)}: cannot read this .*truncated"):
        tensor_names(path) if kind == "quietstar" else load_checkpoint(path)
    with pytest.raises(ValueError, match=rf"{os.path.basename(file)}: cannot read"):
        load_checkpoint(path)


def test_vocabulary_mismatch_and_token_ids_out_of_range(tmp_path):
    tokenizer = load_tokenizer(None)
    with pytest.raises(ValueError, match="ckpt: vocabulary mismatch: the model has 300 tokens, its tokenizer .* has 32000"):
        check_vocabulary(tokenizer, 300, "ckpt")
    check_vocabulary(tokenizer, 32002, "ckpt")
    write_documents(str(tmp_path / "docs"), [[5, 6, 7], [40000, 8]])
    with pytest.raises(ValueError, match=r"docs.bin: token id 40000 is out of range: the tokenizer .* 32000 tokens"):
        check_token_ids(Documents(str(tmp_path / "docs")), 32002, tokenizer)


def test_bad_data_files_are_named(tmp_path):
    write_documents(str(tmp_path / "docs"), [[5, 6, 7], [8]])
    np.save(tmp_path / "docs.idx.npy", np.array([0, 2, 9]))
    with pytest.raises(ValueError, match=r"docs.bin: holds 4 tokens, the index says 9"):
        Documents(str(tmp_path / "docs"))
    (tmp_path / "docs.idx.npy").write_text("garbage")
    with pytest.raises(ValueError, match=r"docs.idx.npy: not a document index"):
        Documents(str(tmp_path / "docs"))
    with pytest.raises(FileNotFoundError, match=r"nothing.bin: data file not found"):
        Documents(str(tmp_path / "nothing"))


def test_missing_checkpoint_and_config():
    with pytest.raises(FileNotFoundError, match="nowhere: checkpoint directory not found"):
        read_config("nowhere")


def run_tool(args, env=None):
    return subprocess.run([sys.executable] + args, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_command_lines_answer_in_two_lines_without_a_traceback(tmp_path):
    path = make_tiny(tmp_path / "ckpt", "quietstar")
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write("{broken")
    for args in (["train.py", "--micro_batch_size=0"],
                 ["sample.py", "--ckpt", path, "--prompt", "x", "--device", "cpu"],
                 ["evaluate.py", "--ckpt", path, "--limit", "-5"]):
        done = run_tool(args)
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
        lines = [line for line in done.stderr.splitlines() if not line.startswith("(")]
        assert 1 <= len(lines) <= 2, done.stderr
    assert "config.json: not valid JSON" in run_tool(["sample.py", "--ckpt", path, "--prompt", "x"]).stderr
    debug = run_tool(["sample.py", "--ckpt", path, "--prompt", "x", "--device", "cpu"], {"QUIETSTAR_DEBUG": "1"})
    assert "Traceback" in debug.stderr                    # kept for those who ask
