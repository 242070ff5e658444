"""The README's Python snippets run as written, on a tiny random checkpoint (CPU). The one
substitution: the tiny checkpoint's directory for "Mistral-7B-v0.1". And its shell commands
run top to bottom, as written, with a cap on steps appended."""
import os
import re
import shutil

import pytest

from tiny_ckpt import make_tiny
from tokenizer import VENDORED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_the_readme_has_python_snippets():
    assert len(BLOCKS) >= 2 and all("Mistral-7B-v0.1" in b for b in BLOCKS)


@pytest.mark.parametrize("n", range(len(BLOCKS)))
def test_readme_snippet_runs(n, tmp_path, capsys):
    path = make_tiny(tmp_path / "Mistral-7B-v0.1", "hf")
    shutil.copyfile(VENDORED, os.path.join(path, "tokenizer.model"))
    code = BLOCKS[n].replace('"Mistral-7B-v0.1"', repr(path))
    exec(compile(code, f"README.md python block {n + 1}", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip()                   # each ends by printing something


# -----------------------------------------------------------------------------
# The README's shell commands, top to bottom, as written, in a fresh folder: each must
# succeed without editing. The only change: a cap the test appends (fewer steps, examples,
# tokens), so that the whole sequence fits in CI. Commands that need a GPU, Mistral-7B's
# weights, a download or minutes of CPU are skipped, each with its reason (printed with -s).

CAPS = {   # script: arguments appended (the last value of a setting wins)
    "train.py": ["--max_steps=1", "--final_eval_problems=100"],
    "evaluate.py": ["--limit=2", "--cot_limit=1", "--cot_samples=1", "--cot_tokens=8", "--ppl_docs=2"],
    "sample.py": ["--max_new_tokens=4"],
    "plot_run.py": [],
}
SKIP = {   # the start of a command: why it is not run here
    "pip install": "installs packages (CI installs them first)",
    "python -m pytest": "the test suite itself",
    "torchrun": "several GPUs",
    "huggingface-cli": "downloads Mistral-7B (14.5 GB)",
    "python train.py config/quietstar_mistral7b.py": "Mistral-7B on a GPU",
    "python train.py config/lm_mistral7b.py": "Mistral-7B on a GPU",
    "python train.py --init_from=resume --out_dir=out-quietstar-mistral7b": "resumes the Mistral-7B run",
    "python sample.py --ckpt Mistral-7B-v0.1": "Mistral-7B's weights",
    "python estimate.py": "minutes of CPU (tests/test_estimate.py runs it on one block)",
}


def shell_commands(text):
    """The commands of every ```bash block: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_the_readme_commands_run_in_order(tmp_path):
    import shlex
    import subprocess
    import sys
    import time
    for name in os.listdir(ROOT):                       # the repository, without its runs
        if not name.startswith(("out", ".")):
            os.symlink(os.path.join(ROOT, name), tmp_path / name)
    ran, skipped = [], []
    for command in shell_commands(README):
        reason = next((why for start, why in SKIP.items() if command.startswith(start)), None)
        if reason:
            skipped.append(f"{command}  ({reason})")
            continue
        words = shlex.split(command)
        assert words[0] == "python" and words[1] in CAPS, \
            f"README command not known to this test: {command!r}; give it a cap in CAPS or a reason in SKIP"
        t0 = time.time()
        done = subprocess.run([sys.executable] + words[1:] + CAPS[words[1]], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, f"{command}\n{done.stdout[-1500:]}\n{done.stderr[-1500:]}"
        ran.append(f"{command}  ({time.time() - t0:.0f}s)")
    print("ran:\n  " + "\n  ".join(ran) + "\nskipped:\n  " + "\n  ".join(skipped))
    assert any(c.startswith("python train.py") for c in ran) and len(ran) >= 6
    assert os.path.isfile(tmp_path / "out" / "run.html") and os.path.isfile(tmp_path / "thinking.html")
