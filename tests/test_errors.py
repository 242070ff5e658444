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
    ("--seq_len=1", "seq_len=1: must be a finite number >= 2"),              # n_talk 1 + 1
    ("--dtype=foo", "dtype='foo': expected one of float32, bfloat16, float16"),
    ("--mode=foo", "mode='foo': expected 'quietstar' or 'lm'"),
    ("--preset=huge", "preset='huge': expected one of"),
    ("--docs_per_step=3", "docs_per_step=3 must be a multiple of micro_batch_size=32"),
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
    assert "--n_thought_tokens=7" in text and "the paper: 9 thought tokens" in text
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


# -----------------------------------------------------------------------------
# a failed start never touches the checkpoint on disk

# the default (arithmetic) run, cut to a few small steps
QUICK = ["--docs_per_step=4", "--micro_batch_size=4", "--thought_interval=0", "--final_eval=",
         "--device=cpu", "--dtype=float32"]


def snapshot(folder):
    """Every file under folder and its bytes."""
    found = {}
    for where, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(where, name)
            found[os.path.relpath(path, folder)] = open(path, "rb").read()
    return found


def train_run(args, out_dir):
    return run_tool(["train.py"] + QUICK + args + [f"--out_dir={out_dir}"])


def short_error(done):
    """The error lines of a failed command: one or two, no traceback."""
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stdout[-1000:] + done.stderr
    lines = [line for line in done.stderr.splitlines() if line and not line.startswith("(run with")]
    assert 1 <= len(lines) <= 2, done.stderr
    return done.stderr


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    """out/ with a 1-step run's checkpoint and metrics, to be kept whole by failed starts."""
    out = tmp_path_factory.mktemp("earlier") / "out"
    done = train_run(["--max_steps=1"], out)
    assert done.returncode == 0, done.stderr
    return out


def test_overwrite_keeps_the_earlier_run_until_the_new_one_saves(earlier_run, tmp_path):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(earlier_run, out)
    before = snapshot(out)
    empty = tmp_path / "empty"
    write_documents(str(empty), [[], []])                 # two documents, zero tokens
    # a bad setting, a data file without tokens, and a run that fails at its second step
    # (before its first save): each ends in a line or two, and the earlier run stays whole
    assert "seq_len=1: must be a finite number >= 2" in short_error(
        train_run(["--overwrite=True", "--seq_len=1"], out))
    assert f"{empty}.bin: holds 0 tokens (2 empty document(s)); nothing to train on" in short_error(
        train_run(["--overwrite=True", f"--data={empty}"], out))
    done = train_run(["--overwrite=True", "--max_steps=4", "--learning_rate=1e30", "--grad_clip=1e30",
                      "--warmup_steps=1"], out)
    assert done.returncode == 1 and "non-finite" in done.stdout, done.stdout + done.stderr
    assert snapshot(out) == before
    # a run that saves replaces both the checkpoint and the metrics
    done = train_run(["--overwrite=True", "--max_steps=2", "--seed=7"], out)
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(out)) == ["ckpt", "metrics.jsonl"]
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2]
    assert json.load(open(out / "ckpt" / "state.json"))["config"]["seed"] == 7


def damage(path, how):
    """Damage one file of the checkpoint directory path; 'sealed' ones get a matching manifest
    (the sizes agree, the contents do not)."""
    if how == "state.json not JSON":
        (path / "state.json").write_text("{this is not JSON")
    elif how == "state.json not JSON, sealed":
        size = os.path.getsize(path / "state.json")
        (path / "state.json").write_text("{" * size)
    elif how == "optimizer truncated":
        with open(path / "optimizer.rank0.pt", "r+b") as f:
            f.truncate(100)
    elif how == "optimizer missing":
        os.remove(path / "optimizer.rank0.pt")
    elif how == "manifest not JSON":
        (path / "manifest.json").write_text("{oops")
    elif how == "optimizer runs code, sealed":
        torch.save({"state": {}, "param_groups": [], "evil": Evil(str(path.parent / "ran"))},
                   path / "optimizer.rank0.pt")
    if how.endswith("sealed"):
        step = json.load(open(path / "manifest.json"))["step"]
        checkpoint.write_manifest(str(path), step)


@pytest.mark.parametrize("how, message", [
    ("state.json not JSON", r"ckpt/state.json: 17 bytes, manifest.json says [\d,]+ \(truncated, or changed after saving\)"),
    ("state.json not JSON, sealed", r"ckpt/state.json: not valid JSON"),
    ("optimizer truncated", r"ckpt/optimizer.rank0.pt: 100 bytes, manifest.json says [\d,]+ \(truncated"),
    ("optimizer missing", r"ckpt/optimizer.rank0.pt: missing \(listed in manifest.json\)"),
    ("manifest not JSON", r"ckpt/manifest.json: not a valid manifest"),
])
def test_a_damaged_checkpoint_file_is_named_and_nothing_changes(earlier_run, tmp_path, how, message):
    import re
    import shutil
    out = tmp_path / "out"
    shutil.copytree(earlier_run, out)
    damage(out / "ckpt", how)
    before = snapshot(out)
    with pytest.raises((SystemExit, ValueError)) as failed:
        checkpoint.resume_state(str(out))
    assert re.search(message, str(failed.value)), str(failed.value)
    assert snapshot(out) == before


def test_a_fresh_run_keeps_a_damaged_checkpoint(earlier_run, tmp_path):
    """Refused without --overwrite (its owner may repair it); with it, kept until the first save."""
    import shutil
    out = tmp_path / "out"
    shutil.copytree(earlier_run, out)
    damage(out / "ckpt", "optimizer truncated")
    before = snapshot(out)
    assert "holds a damaged checkpoint" in short_error(train_run(["--max_steps=1"], out))
    done = train_run(["--overwrite=True", "--max_steps=4", "--learning_rate=1e30", "--grad_clip=1e30",
                      "--warmup_steps=1"], out)
    assert done.returncode == 1 and "non-finite" in done.stdout
    assert snapshot(out) == before


def test_resuming_a_damaged_checkpoint_from_the_command_line(earlier_run, tmp_path):
    """Through train.py: two lines naming the file, no code from a pickle runs, nothing changes."""
    import shutil
    for how, message in (("state.json not JSON", "ckpt/state.json: 17 bytes, manifest.json says"),
                         ("optimizer runs code, sealed",
                          "ckpt/optimizer.rank0.pt: not a readable weights-only optimizer file")):
        out = tmp_path / how.replace(" ", "_").replace(",", "") / "out"
        shutil.copytree(earlier_run, out)
        damage(out / "ckpt", how)
        before = snapshot(out)
        error = short_error(train_run(["--init_from=resume", "--max_steps=3"], out))
        assert message in error.splitlines()[0]
        assert snapshot(out) == before and not (out.parent / "ran").exists()


def test_quietstar_json_errors_name_the_file(tmp_path):
    from quietstar import QuietStar
    path = make_tiny(tmp_path / "ckpt", "quietstar")
    for text, message in (("{oops", "quietstar.json: not valid JSON"),
                          ('{"n_ahead": 9}', "quietstar.json: unknown setting 'n_ahead'")):
        with open(os.path.join(path, "quietstar.json"), "w") as f:
            f.write(text)
        with pytest.raises(ValueError, match=message) as failed:
            QuietStar.from_pretrained(path)
        assert len(str(failed.value).splitlines()) <= 2
    done = run_tool(["sample.py", "--ckpt", path, "--prompt", "x", "--device", "cpu"])
    assert "quietstar.json: unknown setting 'n_ahead'" in short_error(done)


def test_a_run_folder_given_for_its_checkpoint(earlier_run):
    for tool in (["evaluate.py"], ["sample.py", "--prompt", "1+1="]):
        error = short_error(run_tool(tool + ["--ckpt", str(earlier_run), "--device", "cpu"]))
        assert f"--ckpt {earlier_run}: a training run's folder, not a checkpoint; did you mean " \
               f"--ckpt {earlier_run / 'ckpt'}?" in error


def test_a_failed_html_page_leaves_no_file(earlier_run, tmp_path):
    page = tmp_path / "page.html"
    error = short_error(run_tool(["evaluate.py", "--ckpt", str(earlier_run / "ckpt"), "--html", str(page),
                                 "--text", "3/4=", "--device", "cpu"]))
    assert "not in the vocabulary" in error
    assert os.listdir(tmp_path) == []


def test_the_defaults_are_the_arithmetic_run_and_one_argument_changes_one_setting():
    """A bare `python train.py` runs TrainConfig's defaults; they restate config/arith.py (so
    `python train.py config/arith.py` is the same run), and --max_steps changes only that."""
    from dataclasses import asdict
    bare = asdict(parse_config([]))
    assert bare == asdict(parse_config([os.path.join(ROOT, "config", "arith.py")]))
    longer = asdict(parse_config(["--max_steps=200"]))
    assert {k for k in bare if bare[k] != longer[k]} == {"max_steps"}
    assert bare["init_from"] == "data/arith/base" and bare["final_eval"] == "arith"
    math_run = asdict(parse_config([os.path.join(ROOT, "config", "math.py")]))
    assert math_run["init_from"] == "scratch" and math_run["data"] == "data/math/train"
