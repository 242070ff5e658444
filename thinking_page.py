"""
One self-contained HTML page showing where Quiet-STaR's thinking helps on a text (evaluate.py
--html): a summary (mean gain, share of tokens helped, mixing-weight range), a note on the
model, the text coloured token by token by how much the thought before it changed its log
probability, and beside it every token's thought, change and mixing weight, visible without
hovering.

    python evaluate.py --ckpt out/ckpt --html thinking.html --text "Q: What is 12 * 7?\\nA: 84"
"""

import html


def token_rows(qs, tok, text, seed, teacher_forced, continuation):
    """Per text token after the first: (shown text, thought text, gain in nats, mixing weight)."""
    ids = tok.encode(text, bos=True)
    _, (out, thoughts) = teacher_forced(qs, [ids], seed, [0], think=True)
    base = out.base_logits[0].float().log_softmax(-1)                 # (T, V)
    talk = out.talk_logits[0, :, 0].float().log_softmax(-1)          # (T, V), first talk step
    rows = []
    for t in range(1, len(ids)):
        gain = (talk[t - 1, ids[t]] - base[t - 1, ids[t]]).item()
        weight = out.mix_weight[0, t - 1, 0].item()
        thought = tok.decode(thoughts[0, 0, t - 1].tolist())
        shown = continuation(tok, ids[:t], ids[t:t + 1]) or tok.id_to_piece(ids[t])
        rows.append((shown, thought, gain, weight))
    return rows


def colour(gain):
    strength = min(abs(gain) / 2.0, 1.0)              # full colour at 2 nats
    return f"rgba(0,160,0,{strength:.2f})" if gain > 0 else f"rgba(220,0,0,{strength:.2f})"


def page(rows, note):
    gains = [g for _, _, g, _ in rows]
    weights = [w for _, _, _, w in rows]
    summary = (f"<b>{len(rows)}</b> tokens &middot; mean change from thinking <b>{sum(gains) / len(gains):+.3f}</b> "
               f"nats/token &middot; helped <b>{sum(g > 0 for g in gains) / len(gains):.0%}</b> of tokens "
               f"&middot; mixing weight w from <b>{min(weights):+.3f}</b> to <b>{max(weights):+.3f}</b>"
               if rows else "no tokens after the first")
    spans, table = [], []
    for i, (shown, thought, gain, weight) in enumerate(rows):
        tip = f"thought: {thought}\nΔ log p: {gain:+.3f}\nmixing weight w: {weight:+.3f}"
        spans.append(f'<a class="tok" href="#t{i}" style="background:{colour(gain)}" '
                     f'title="{html.escape(tip)}">{html.escape(shown)}</a>')
        table.append(f'<tr id="t{i}"><td class="n">{i + 1}</td><td><span class="tok" style="background:'
                     f'{colour(gain)}">{html.escape(shown.replace(chr(10), "⏎"))}</span></td>'
                     f'<td class="th">{html.escape(thought)}</td><td class="n">{gain:+.3f}</td>'
                     f'<td class="n">{weight:+.3f}</td></tr>')
    body = "".join(spans).replace("\n</a>", "⏎</a><br>")
    return PAGE.format(summary=summary, note=html.escape(note), text=body, rows="\n".join(table))


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Where Quiet-STaR thinking helps</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em 2em; line-height: 1.5; color: #222; }}
.summary {{ font-size: 1.1em; background: #f4f4f4; padding: .6em 1em; border-radius: 6px; }}
.note {{ color: #555; font-size: .9em; }}
.columns {{ display: flex; gap: 2em; align-items: flex-start; }}
.text {{ flex: 1; position: sticky; top: 1em; font-family: monospace; font-size: 15px;
         line-height: 2; border: 1px solid #ccc; padding: 1em; }}
.tok {{ white-space: pre-wrap; border-radius: 3px; padding: 1px 0; color: inherit; text-decoration: none; }}
.thoughts {{ flex: 1.3; }}
table {{ border-collapse: collapse; font-size: 14px; width: 100%; }}
th, td {{ border-bottom: 1px solid #e4e4e4; padding: 2px 6px; text-align: left; vertical-align: top; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }}
td.th {{ font-family: monospace; white-space: pre-wrap; color: #335; }}
tr:target {{ outline: 2px solid #36c; }}
</style></head><body>
<h1>Where thinking helps</h1>
<p class="summary">{summary}</p>
<p class="note">{note}</p>
<p>Quiet-STaR lets a language model think before every token: after each token it samples a
short thought between <code>&lt;|startthought|&gt;</code> and <code>&lt;|endthought|&gt;</code>,
then a mixing head decides how much the post-thought prediction (weight w) and the plain one
(weight 1&minus;w) count. Each token is coloured by how much the thought before it changed its
log probability: <span style="background:rgba(0,160,0,0.6)">green</span> likelier,
<span style="background:rgba(220,0,0,0.6)">red</span> less likely, full colour at 2 nats.
Every thought is listed on the right; click a token to find its row.</p>
<div class="columns">
<div class="text">{text}</div>
<div class="thoughts"><table>
<tr><th>#</th><th>token</th><th>thought before it</th><th>Δ log p</th><th>w</th></tr>
{rows}
</table></div>
</div>
</body></html>
"""
