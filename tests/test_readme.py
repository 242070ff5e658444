"""The README's Python snippets run as written, on a tiny random checkpoint (CPU). The one
substitution: the tiny checkpoint's directory for "Mistral-7B-v0.1"."""
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
