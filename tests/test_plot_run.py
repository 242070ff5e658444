"""plot_run.py: a run's curves as one self-contained page, from metrics.jsonl as train.py
writes it (cut lines and non-finite values included); the mixing weight at the answer when
logged, else the mean over all positions, named as such."""
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser

import pytest

import plot_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_run(folder, with_answer_weight):
    rows = []
    for step in range(1, 21):
        row = dict(step=step, loss=2.0 - step / 20, nll_base=2.0 - step / 40, nll_talk=2.0 - step / 20,
                   reward_mean=step / 100, mix_weight_mean=step / 200, grad_norm=1.0)
        if with_answer_weight:
            row["mix_weight_answer"] = step / 30
        rows.append(row)
    rows[5]["nll_talk"] = float("nan")                        # json writes NaN: skipped
    rows.append({"step": 20, "arith/exact/no_thinking": [0.24, 0.014, 1000],
                 "arith/exact/thinking": [0.95, 0.007, 1000], "arith/nll/thinking": [0.2, 0.01, 1000]})
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 21, "lo'   # cut by a kill
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.write(text)


class Tags(HTMLParser):
    """Counts tags and checks that every opened svg element is closed."""
    def __init__(self):
        super().__init__()
        self.open, self.count = [], {}

    def handle_starttag(self, tag, attrs):
        self.count[tag] = self.count.get(tag, 0) + 1
        if tag in ("svg", "div", "p", "html", "body"):
            self.open.append(tag)

    def handle_endtag(self, tag):
        if tag in ("svg", "div", "p", "html", "body"):
            assert self.open.pop() == tag


@pytest.mark.parametrize("with_answer_weight", [True, False])
def test_the_page_has_every_panel(tmp_path, with_answer_weight):
    write_run(tmp_path, with_answer_weight)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "plot_run.py"), str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    page = open(tmp_path / "run.html", encoding="utf-8").read()
    tags = Tags()
    tags.feed(page)
    assert tags.open == [] and tags.count["svg"] == 4
    assert "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")   # nothing fetched
    assert "nll_base (no thought)" in page and "nll_talk (thinking)" in page
    assert "arith exact, thinking" in page and "arith exact, no thinking" in page and "arith nll" not in page
    if with_answer_weight:
        assert "Mixing weight w at the answer" in page and "0.6667" in page          # its last value, 20/30
    else:
        assert "mean over all positions" in page and "logged no mix_weight_answer" in page
    # every point of a curve inside its plot area
    for points in re.findall(r'points="([^"]+)"', page):
        for x, y in (p.split(",") for p in points.split()):
            assert 60 <= float(x) <= 370 and 30 <= float(y) <= 240, (x, y)


def test_missing_metrics_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "plot_run.py"), str(tmp_path / "nowhere")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "metrics.jsonl: not found" in done.stderr


def test_ticks_are_round_and_cover_the_range():
    for low, high in ((0.0, 1.0), (5.37, 10.45), (-13.2, 0.4), (1.0, 1.0), (0.0, 69000.0)):
        ticks = plot_run.nice_ticks(low, high)
        assert ticks[0] <= low and ticks[-1] >= high and 3 <= len(ticks) <= 12
