"""
A picture of a training run: its curves from out_dir/metrics.jsonl, as one self-contained
HTML page (inline SVG; no plotting package, no network), to open in any browser.

    python plot_run.py out                  # writes out/run.html
    python plot_run.py out-math --html math.html

Four panels, each drawn when the run logged its metrics:
  loss parts      nll_base (the text alone) vs nll_talk (through the thoughts and the mixing
                  head), per step, and the validation loss when one was logged;
  reward          the REINFORCE reward (talk log-probability gain of a thought over the mean
                  of its position's thoughts; mean over positions);
  mixing weight   w at the answer position (mix_weight_answer) when logged, else the mean
                  over all positions (mix_weight_mean), named as such;
  accuracy        with and without thinking, at the steps where the run was evaluated
                  (e.g. the final held-out evaluation), with standard errors.
"""

import argparse
import html
import json
import math
import os

from cli import run, short_errors

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def read_metrics(path):
    """The rows of a metrics.jsonl; a line cut short by a kill is skipped."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: not found (give a training run's out_dir, which holds metrics.jsonl)")
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
                rows.append(row)
    if not rows:
        raise SystemExit(f"{path}: no metrics logged yet")
    return rows


def series(rows, key):
    """(steps, values, stderrs) of a metric: a number, or [mean, stderr, n] (evaluations)."""
    xs, ys, es = [], [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, list) and value:
            value, err = value[0], value[1] if len(value) > 1 else 0.0
        else:
            err = 0.0
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(row["step"])
            ys.append(float(value))
            es.append(float(err))
    return xs, ys, es


def nice_ticks(low, high, n=5):
    """About n round numbers spanning [low, high]."""
    if high <= low:
        low, high = low - 0.5, high + 0.5
    raw = (high - low) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if raw <= m * step)
    first, last = math.floor(low / step), math.ceil(high / step)
    return [i * step for i in range(first, last + 1)]


def chart(title, lines, note="", steps=None, width=560, height=280):
    """An SVG line chart. lines: [(label, xs, ys, errs)]; error bars where errs > 0; steps:
    the x range (first, last step) when it should be the whole run's."""
    lines = [line for line in lines if line[1]]
    left, right, top, bottom = 60, 190, 30, 40
    w, h = width - left - right, height - top - bottom
    xs = [x for line in lines for x in line[1]]
    lows = [y - e for line in lines for y, e in zip(line[2], line[3])]
    highs = [y + e for line in lines for y, e in zip(line[2], line[3])]
    x0, x1 = steps or (min(xs), max(xs))
    x1 = x1 if x1 > x0 else x0 + 1
    yt = nice_ticks(min(lows), max(highs))
    y0, y1 = yt[0], yt[-1]
    X = lambda x: left + (x - x0) / (x1 - x0) * w          # noqa: E731
    Y = lambda y: top + h - (y - y0) / (y1 - y0) * h        # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<text x="{left}" y="18" font-size="13" font-weight="bold">{html.escape(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#999"/>']
    for y in yt:
        out.append(f'<line x1="{left}" x2="{left + w}" y1="{Y(y):.1f}" y2="{Y(y):.1f}" stroke="#eee"/>'
                   f'<text x="{left - 5}" y="{Y(y) + 4:.1f}" text-anchor="end">{y:.4g}</text>')
    for x in nice_ticks(x0, x1):
        if x0 <= x <= x1:
            out.append(f'<text x="{X(x):.1f}" y="{top + h + 15}" text-anchor="middle">{x:.4g}</text>')
    out.append(f'<text x="{left + w / 2}" y="{height - 5}" text-anchor="middle">step</text>')
    for i, (label, lx, ly, le) in enumerate(lines):
        color = COLORS[i % len(COLORS)]
        points = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in zip(lx, ly))
        if len(lx) > 1:
            out.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        for x, y, e in zip(lx, ly, le):
            if len(lx) == 1 or e > 0:
                out.append(f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="3" fill="{color}"/>')
            if e > 0:
                out.append(f'<line x1="{X(x):.1f}" x2="{X(x):.1f}" y1="{Y(y - e):.1f}" y2="{Y(y + e):.1f}" '
                           f'stroke="{color}"/>')
        ly_text = top + 12 + 16 * i
        value = f" {ly[-1]:.4g}" if ly else ""
        out.append(f'<line x1="{left + w + 10}" x2="{left + w + 25}" y1="{ly_text - 4}" y2="{ly_text - 4}" '
                   f'stroke="{color}" stroke-width="2"/><text x="{left + w + 29}" y="{ly_text}">'
                   f'{html.escape(label)}{value}</text>')
    out.append("</svg>")
    caption = f'<p class="note">{html.escape(note)}</p>' if note else ""
    return f'<div class="panel">{"".join(out)}{caption}</div>'


def eval_label(key):
    """'arith/exact/thinking' -> 'arith exact, thinking'."""
    *what, mode = key.split("/")
    return f"{' '.join(what)}, {mode.replace('_', ' ')}"


def panels(rows):
    """The charts this run's metrics allow, in reading order."""
    found = []
    nll = [("nll_base (no thought)", *series(rows, "nll_base")), ("nll_talk (thinking)", *series(rows, "nll_talk")),
           ("validation loss", *series(rows, "val_loss"))]
    if nll[0][1]:
        found.append(chart("Loss parts: the text alone vs through the thoughts", nll,
                           "Thinking helps the next tokens where nll_talk is below nll_base."))
    if series(rows, "reward_mean")[0]:
        found.append(chart("REINFORCE reward (mean)", [("reward_mean", *series(rows, "reward_mean"))],
                           "Talk log-probability gain of a thought over its position's mean."))
    if series(rows, "mix_weight_answer")[0]:
        found.append(chart("Mixing weight w at the answer", [("w at the answer", *series(rows, "mix_weight_answer"))],
                           "0: the thought is ignored; 1: the prediction is the thought's."))
    elif series(rows, "mix_weight_mean")[0]:
        found.append(chart("Mixing weight w (mean over all positions)",
                           [("w, all positions", *series(rows, "mix_weight_mean"))],
                           "This run logged no mix_weight_answer, so this is the mean over every position."))
    keys = sorted({k for row in rows for k in row if k.endswith("/thinking") or k.endswith("/no_thinking")})
    accuracy = [k for k in keys if "/exact/" in k or "accuracy" in k] or \
        [k for k in keys if "/nll/" not in k and "thought_is" not in k]
    evals = [(eval_label(k), *series(rows, k)) for k in accuracy]
    evals += [(k, *series(rows, k)) for k in ("eval_gsm8k_paper", "eval_csqa_paper")]
    if any(line[1] for line in evals):
        steps = [row["step"] for row in rows]
        found.append(chart("Accuracy with and without thinking", evals,
                           "Where the run was evaluated (± one standard error).", (min(steps), max(steps))))
    return found


def page(out_dir, rows):
    settings = ""
    state_file = os.path.join(out_dir, "ckpt", "state.json")
    if os.path.isfile(state_file):
        try:
            config = json.load(open(state_file)).get("config", {})
            shown = ("init_from", "data", "max_steps", "n_thought_tokens", "n_talk", "policy_weight", "learning_rate")
            settings = ", ".join(f"{k}={config[k]}" for k in shown if k in config)
        except (ValueError, AttributeError):
            settings = ""
    steps = [r for r in rows if "loss" in r]
    last = steps[-1] if steps else rows[-1]
    summary = f"{len(steps)} step(s) logged, the last is step {last['step']}" + \
        (f"; loss {last['loss']:.4g}" if "loss" in last else "")
    body = "\n".join(panels(rows)) or "<p>No curves: the run logged none of the metrics drawn here.</p>"
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(out_dir)}: a Quiet-STaR run</title>
<style>body {{ font-family: sans-serif; margin: 20px; color: #222; }}
.panel {{ display: inline-block; vertical-align: top; margin: 0 16px 16px 0; }}
.note {{ color: #666; font-size: 12px; max-width: 500px; margin: 2px 0 0 0; }}</style></head>
<body><h2>{html.escape(out_dir)}</h2>
<p>{html.escape(summary)}{('<br>' + html.escape(settings)) if settings else ''}</p>
{body}
</body></html>
"""


def main():
    p = short_errors(argparse.ArgumentParser(description=__doc__,
                                             formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("out_dir", help="a training run's folder (holds metrics.jsonl)")
    p.add_argument("--html", default="", help="where to write the page (default: OUT_DIR/run.html)")
    args = p.parse_args()
    rows = read_metrics(os.path.join(args.out_dir, "metrics.jsonl"))
    path = args.html or os.path.join(args.out_dir, "run.html")
    text = page(args.out_dir, rows)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    print(f"wrote {path} ({len(rows)} metrics rows); open it in a browser")


if __name__ == "__main__":
    run(main)
