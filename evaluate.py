"""
Evaluate a checkpoint on GSM8K and CommonsenseQA, with and without thinking, and show where
thinking helps.

    python evaluate.py --ckpt out/ckpt --tasks gsm8k,csqa            # every metric, a table
    python evaluate.py --ckpt DIR --tasks gsm8k --metrics paper --limit 200 --json out.json
    python evaluate.py --ckpt DIR --html thinking.html --text "Q: What is 12 * 7?\nA: 84"
    python evaluate.py --ckpt out/ckpt --tasks arith --json r.json   # the classroom run's checkpoint

Metrics, each with and without thoughts on the same examples and seeds:
  paper   the paper's number, computed exactly as the official code does: the teacher-forced
          probability of the gold answer's tokens, renormalised over the answer alphabet
          (digits + newline for GSM8K, A-E + newline for CommonsenseQA), multiplied over the
          answer. It is an EXPECTED PROBABILITY of producing the exact answer, not an
          exact-match accuracy: the paper's 5.9% -> 10.9% (GSM8K) and 36.3% -> 47.2% (CSQA).
  exact   exact-match accuracy of the answer the model actually gives (greedy, direct).
  cot     zero-shot chain of thought ("Let's think step by step."), k samples, majority vote
          (the paper's cot-maj@8; GSM8K only).
  ppl     perplexity of held-out math text, and the per-token gain from thinking split by how
          hard the token was for the model without thinking.
Every number comes with n and a standard error.
The arith task (held-out data/arith/test.jsonl, for checkpoints with the compact arithmetic
vocabulary) reports exact accuracy and answer NLL, see data/arith/report.py.

Checkpoints: a plain Mistral (either layout; only "without thinking" is meaningful),
a checkpoint of train.py, or the authors' released layout (ezelikman/quietstar-8-ahead: pass
--n_thought_tokens 5, its thought length). Data: data/gsm8k and data/csqa in the repository
(the original formats; Hugging Face's schema is read too), or --data_dir with files of your own.
"""

import argparse
import html
import json
import math
import os
import re
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import torch

from dataloader import Documents
from quietstar import QuietStar, RELEASED_NAMES
from tokenizer import CharTokenizer, load_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ANSWER_MARKER = [13, 28741, 28747]      # "\nA:" in Mistral's tokenizer
DIGIT_TOKENS = [28740, 28750, 28770, 28781, 28782, 28784, 28787, 28783, 28774, 28734, 13]  # 1..9, 0, \n
LETTER_TOKENS = [330, 365, 334, 384, 413, 13]                                               # A..E, \n
DATA_FILES = {"gsm8k": "gsm8k/test.jsonl", "csqa": "csqa/dev_rand_split.jsonl"}
DOWNLOADS = {"gsm8k": "https://raw.githubusercontent.com/openai/grade-school-math/master/"
                      "grade_school_math/data/test.jsonl",
             "csqa": "https://s3.amazonaws.com/commensenseqa/dev_rand_split.jsonl"}


# -----------------------------------------------------------------------------
# data and prompts (the official eval_helpers.py's formats)

def load_examples(task, data_dir):
    """-> list of dicts with question, choices (csqa), gold answer string."""
    path = os.path.join(data_dir, DATA_FILES[task])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: {task} data file not found (use --download, or --data_dir)")
    examples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            try:
                examples.append(parse_example(task, r))
            except (KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a {task} record ({e!r})") from None
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def parse_example(task, r):
    if task == "gsm8k":
        return {"question": r["question"], "answer": r["answer"].split("####")[-1]}   # " 72"
    q = r["question"]
    if isinstance(q, dict):                          # the original release
        stem, choices = q["stem"], [(c["label"], c["text"]) for c in q["choices"]]
    else:                                            # Hugging Face's commonsense_qa
        stem, choices = q, list(zip(r["choices"]["label"], r["choices"]["text"]))
    return {"question": stem, "choices": choices, "answer": r["answerKey"]}


def question_text(task, ex):
    if task == "gsm8k":
        return "Q: " + ex["question"]
    return "Q: " + ex["question"] + "\n" + "\n".join(f"({label}) {text}" for label, text in ex["choices"])


def scored_prompt(task, ex):
    """The official eval prompt: question, "\\nA:", the gold answer, newline."""
    answer = ex["answer"] if task == "gsm8k" else " " + ex["answer"]
    return question_text(task, ex) + "\nA:" + answer + "\n"


def gold(task, ex):
    return normalize_number(ex["answer"]) if task == "gsm8k" else ex["answer"]


# -----------------------------------------------------------------------------
# the paper's metric

def answer_start(ids):
    """Index of the token that completes the last "\\nA:" (the official search, on tokens).
    A prompt cropped so that no marker is left is scored from index 1, as the official
    search then ends there."""
    for i in range(len(ids) - 1, 1, -1):
        if ids[i - 2:i + 1] == ANSWER_MARKER:
            return i
    return 1


def is_numeric_answer(prompt):
    """As the official code: the character after "\\nA: " is a digit. (So a negative GSM8K
    answer is scored against the letters A-E + newline: only its closing newline counts.)"""
    after = prompt.split("\nA:")[-1]
    return len(after) > 1 and after[1].isdigit()


def paper_answer_probability(ids, logits, numeric, pad_id=2):
    """
    ids: the prompt's tokens (list); logits (T, V): predictions at each position.
    The product over the answer's tokens of p(token), with p renormalised over the answer
    alphabet; tokens outside the alphabet are skipped; for numbers the standalone space token
    after the colon is skipped.
    """
    allowed = DIGIT_TOKENS if numeric else LETTER_TOKENS
    i = answer_start(ids)
    probability = 1.0
    for j in range(i + (1 if numeric else 0), len(ids) - 1):
        true = ids[j + 1]
        if true == pad_id:
            break
        if true not in allowed:
            continue
        p = logits[j, allowed].float().softmax(-1)
        probability *= p[allowed.index(true)].item()
    return probability


# -----------------------------------------------------------------------------
# answers the model gives

def normalize_number(text):
    """'1,000' -> '1000', ' 18.00' -> '18', '-3' -> '-3'; None if there is no number."""
    match = re.search(r"-?[\d,]*\.?\d+", text)
    if not match:
        return None
    number = match.group().replace(",", "")
    try:
        value = float(number)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else str(value)


def extract_answer(task, text):
    """The answer in a generated continuation: the first number (GSM8K) or letter (CSQA)."""
    if task == "gsm8k":
        return normalize_number(text)
    match = re.search(r"\b([A-E])\b", text)
    return match.group(1) if match else None


# -----------------------------------------------------------------------------
# running the model

@contextmanager
def one_thought_one_talk_step(qs):
    """The official eval forward: one thought per position, one talk step."""
    saved = qs.config
    qs.config = replace(saved, n_thoughts=1, n_talk=1)
    try:
        yield
    finally:
        qs.config = saved


def generators(seed, indices, device):
    """One generator per example: results do not depend on the batch it is in."""
    return [torch.Generator(device=device).manual_seed(seed * 1_000_003 + i) for i in indices]


@torch.no_grad()
def teacher_forced(qs, batch_ids, seed, indices, think):
    """Right-padded batch -> per example the logits (T, V) without or with thinking, and the
    per-position mixing weight and sampled thought (for the HTML view)."""
    device = qs.model.output.weight.device
    T = max(len(x) for x in batch_ids)
    tokens = torch.full((len(batch_ids), T), 2, dtype=torch.long, device=device)
    for b, x in enumerate(batch_ids):
        tokens[b, :len(x)] = torch.tensor(x)
    valid = tokens != 2                        # as the official eval: EOS is padding
    if not think:
        logits = qs.model(tokens, key_valid=valid)
        return [logits[b, :len(x)] for b, x in enumerate(batch_ids)], None
    with one_thought_one_talk_step(qs):
        thoughts = qs.sample_thoughts(tokens, valid, generator=generators(seed, indices, device))
        out = qs(tokens, thoughts, valid)
    logits = out.talk_logits[:, :, 0]
    return [logits[b, :len(x)] for b, x in enumerate(batch_ids)], (out, thoughts)


def batches(items, size):
    for start in range(0, len(items), size):
        yield list(range(start, min(start + size, len(items))))


def mean_and_stderr(values):
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"), n


def paper_metric(qs, tok, task, examples, args, think):
    probs = []
    for idx in batches(examples, args.batch_size):
        prompts = [scored_prompt(task, examples[i]) for i in idx]
        ids = [crop(tok.encode(p, bos=True), args.max_length, args.seed, i) for p, i in zip(prompts, idx)]
        logits, _ = teacher_forced(qs, ids, args.seed, idx, think)
        probs += [paper_answer_probability(x, lg, is_numeric_answer(tok.decode(x))) for x, lg in zip(ids, logits)]
    return mean_and_stderr(probs)


def crop(ids, max_length, seed, index):
    """The official loader's rule: a prompt longer than max_length is cut to a random window."""
    if len(ids) <= max_length:
        return ids
    start = np.random.default_rng([seed, index]).integers(0, len(ids) - max_length + 1)
    return ids[start:start + max_length]


def generate(qs, prompts_ids, max_new_tokens, think, temperature, seed, indices):
    device = qs.model.output.weight.device
    return qs.generate(prompts_ids, max_new_tokens, think=think, temperature=temperature,
                       generator=generators(seed, indices, device))


def exact_match(qs, tok, task, examples, args, think):
    correct = []
    for idx in batches(examples, args.batch_size):
        prompts = [tok.encode(question_text(task, examples[i]) + "\nA:", bos=True) for i in idx]
        outs = generate(qs, prompts, args.answer_tokens, think, 0.0, args.seed, idx)
        for i, out in zip(idx, outs):
            answer = extract_answer(task, tok.decode(out).split("\n")[0])
            correct.append(float(answer is not None and answer == gold(task, examples[i])))
    return mean_and_stderr(correct)


def cot_majority(qs, tok, task, examples, args, think):
    """Zero-shot CoT (the official zero-shotcot-eval.py's prompts), k samples, majority vote."""
    correct = []
    for i, ex in enumerate(examples):
        prompt = question_text(task, ex) + "\nA: Let's think step by step."
        votes = []
        ids = tok.encode(prompt, bos=True)
        for k in range(args.cot_samples):
            seed = args.seed + 7919 * k
            reasoning = continuation(tok, ids, generate(qs, [ids], args.cot_tokens, think, 0.9, seed, [i])[0])
            for stop in ("Q:", "\n\n\n"):
                reasoning = reasoning.split(stop)[0]
            follow = tok.encode(prompt + reasoning + "\nTherefore, the answer (arabic numerals) is", bos=True)
            answer = continuation(tok, follow, generate(qs, [follow], 12, think, 0.9, seed, [i])[0])
            votes.append(extract_answer(task, answer))
        votes = [v for v in votes if v is not None]
        majority = Counter(votes).most_common(1)[0][0] if votes else None
        correct.append(float(majority == gold(task, ex)))
    return mean_and_stderr(correct)


def continuation(tok, prompt_ids, new_ids):
    """The text new_ids add after the prompt (decoding them alone would drop a leading space)."""
    before, after = tok.decode(prompt_ids), tok.decode(prompt_ids + new_ids)
    return after[len(before):] if after.startswith(before) else tok.decode(new_ids)


DIFFICULTY_BINS = [(0.0, 1.0), (1.0, 2.0), (2.0, 4.0), (4.0, math.inf)]   # base NLL, nats


def held_out_perplexity(qs, args):
    """Per-token NLL without and with thinking on held-out windows; the gain by difficulty."""
    from data.math.prepare import ensure_prepared
    ensure_prepared(args.ppl_data)                 # the default held-out text is made on first use
    docs = Documents(os.path.join(HERE, args.ppl_data) if not os.path.isabs(args.ppl_data) else args.ppl_data)
    n = min(len(docs), args.ppl_docs)
    base_nll, think_nll = [], []
    for idx in batches(list(range(n)), args.batch_size):
        ids = [[1] + docs[i][:args.max_length - 1].tolist() for i in idx]
        for think, store in ((False, base_nll), (True, think_nll)):
            logits, _ = teacher_forced(qs, ids, args.seed, idx, think)
            for x, lg in zip(ids, logits):
                targets = torch.tensor(x[1:], device=lg.device)
                store += torch.nn.functional.cross_entropy(lg[:-1].float(), targets, reduction="none").tolist()
    base_nll, think_nll = np.array(base_nll), np.array(think_nll)
    gain = base_nll - think_nll                       # > 0: thinking made the token likelier
    result = {"ppl_base": float(np.exp(base_nll.mean())), "ppl_thinking": float(np.exp(think_nll.mean())),
              "gain_all": mean_and_stderr(gain)}
    for lo, hi in DIFFICULTY_BINS:
        chosen = (base_nll >= lo) & (base_nll < hi)
        if chosen.sum() > 1:
            result[f"gain_base_nll_{lo:g}-{hi:g}"] = mean_and_stderr(gain[chosen])
    return result


# -----------------------------------------------------------------------------
# where thinking helps: one self-contained HTML page

def thinking_html(qs, tok, text, seed=0):
    ids = tok.encode(text, bos=True)
    _, (out, thoughts) = teacher_forced(qs, [ids], seed, [0], think=True)
    base = out.base_logits[0].float().log_softmax(-1)
    talk = out.talk_logits[0, :, 0].float().log_softmax(-1)
    spans = []
    for t in range(1, len(ids)):
        gain = (talk[t - 1, ids[t]] - base[t - 1, ids[t]]).item()
        weight = out.mix_weight[0, t - 1, 0].item()
        thought = tok.decode(thoughts[0, 0, t - 1].tolist())
        strength = min(abs(gain) / 2.0, 1.0)
        color = f"rgba(0,160,0,{strength:.2f})" if gain > 0 else f"rgba(220,0,0,{strength:.2f})"
        tip = f"thought: {thought}\nΔ log p: {gain:+.3f}\nmixing weight w: {weight:+.3f}"
        shown = continuation(tok, ids[:t], ids[t:t + 1]) or tok.id_to_piece(ids[t])
        spans.append(f'<span class="tok" style="background:{color}" title="{html.escape(tip)}">'
                     f'{html.escape(shown)}</span>')
    return HTML_PAGE.format(body="".join(spans).replace("\n</span>", "⏎</span><br>"))


HTML_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Where Quiet-STaR thinking helps</title>
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; line-height: 1.9; }}
.tok {{ white-space: pre-wrap; border-radius: 3px; padding: 1px 0; cursor: help; }}
.text {{ font-family: monospace; font-size: 15px; border: 1px solid #ccc; padding: 1em; }}
</style></head><body>
<h1>Where thinking helps</h1>
<p>Quiet-STaR lets a language model think before every token: after each token it samples
a short thought between <code>&lt;|startthought|&gt;</code> and <code>&lt;|endthought|&gt;</code>,
then a small mixing head decides how much the post-thought prediction (weight w) and the
plain prediction (weight 1&minus;w) count for the next token. Training rewards thoughts that
make the following true tokens likelier.</p>
<p>Each token of the text below is coloured by how much thinking changed the model's log
probability of it: <span style="background:rgba(0,160,0,0.6)">green</span> when the thought
made it likelier, <span style="background:rgba(220,0,0,0.6)">red</span> when less likely,
stronger for larger changes (full colour at 2 nats). Hover a token to see the thought the
model sampled just before it, the change, and the mixing weight w.</p>
<div class="text">{body}</div>
</body></html>
"""


# -----------------------------------------------------------------------------

def load_for_eval(args):
    dtype = getattr(torch, args.dtype)
    has_parts = has_quietstar_parts(args.ckpt)
    think_modes = {"auto": [False, True] if has_parts else [False], "both": [False, True],
                   "yes": [True], "no": [False]}[args.think]
    if True in think_modes and not has_parts:
        raise SystemExit(f"{args.ckpt}: no Quiet-STaR parts (start_embedding, end_embedding, "
                         f"talk_head.*) in this checkpoint, so it cannot think; use --think=no")
    qs = QuietStar.from_pretrained(args.ckpt, device=args.device, dtype=dtype)
    if args.n_thought_tokens:
        qs.config = replace(qs.config, n_thought_tokens=args.n_thought_tokens)
    return qs.eval(), think_modes


def has_quietstar_parts(path):
    """Whether a checkpoint directory holds the released Quiet-STaR tensors."""
    from safetensors import safe_open
    names = set()
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), framework="pt") as st:
                names |= set(st.keys())
    return set(RELEASED_NAMES) <= names


def download(data_dir):
    import urllib.request
    for task, url in DOWNLOADS.items():
        path = os.path.join(data_dir, DATA_FILES[task])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        print(f"downloading {url} -> {path}")
        urllib.request.urlretrieve(url, path + ".tmp")
        os.replace(path + ".tmp", path)


def shuffled(examples, seed, limit):
    """The fixed order the official CoT script used (GSM8K test shuffled with seed 42), cut to limit."""
    order = np.random.default_rng(seed).permutation(len(examples))
    return [examples[i] for i in order[:limit or None]]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--tasks", default="", help="default: arith for a compact-vocabulary checkpoint, else gsm8k,csqa")
    p.add_argument("--metrics", default="paper,exact,cot,ppl")
    p.add_argument("--think", default="auto", choices=["auto", "both", "yes", "no"])
    p.add_argument("--limit", type=int, default=0, help="first N examples of the seed-42 order (0: all)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--answer_tokens", type=int, default=16)
    p.add_argument("--cot_samples", type=int, default=8)
    p.add_argument("--cot_tokens", type=int, default=384)
    p.add_argument("--cot_limit", type=int, default=128, help="the official script used 128 questions")
    p.add_argument("--ppl_data", default="data/math/val")
    p.add_argument("--ppl_docs", type=int, default=250)
    p.add_argument("--n_thought_tokens", type=int, default=0, help="override (5 for quietstar-8-ahead)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    p.add_argument("--data_dir", default=os.path.join(HERE, "data"))
    p.add_argument("--download", action="store_true", help="fetch GSM8K test and CSQA dev into --data_dir")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--html", default="", help="write a page showing where thinking helps on --text")
    p.add_argument("--text", default="", help="default: a GSM8K-style problem, or an arith one")
    args = p.parse_args()
    if args.download:
        download(args.data_dir)
    tok = load_tokenizer(args.ckpt)
    compact = isinstance(tok, CharTokenizer)
    args.tasks = args.tasks or ("arith" if compact else "gsm8k,csqa")
    args.text = args.text or ("3+4*2-5=9" if compact else
                              "Q: A baker makes 12 trays of 24 cookies and sells 250. How many are left?\nA: 38")
    qs, think_modes = load_for_eval(args)
    if args.html:
        with open(args.html, "w", encoding="utf-8") as f:
            f.write(thinking_html(qs, tok, args.text, args.seed))
        print(f"wrote {args.html}")
        return

    results, metrics = {}, args.metrics.split(",")
    for task in [t for t in args.tasks.split(",") if t]:
        if task == "arith":
            from data.arith.report import load_test, thinking_summary
            if not compact:
                raise SystemExit(f"{args.ckpt}: the arith task needs a checkpoint with the arithmetic vocabulary (vocab.json)")
            if think_modes != [False, True]:
                raise SystemExit("the arith task compares thinking with not thinking: use --think=auto or both")
            results.update(thinking_summary(qs, tok, load_test(limit=args.limit), args.seed))
            continue
        if compact:
            raise SystemExit(f"{args.ckpt}: task {task} needs Mistral's tokenizer; this checkpoint has a compact vocabulary")
        if task not in DATA_FILES:
            raise SystemExit(f"unknown task {task!r}; tasks: {', '.join(DATA_FILES)}")
        examples = shuffled(load_examples(task, args.data_dir), args.seed, args.limit)
        for metric in metrics:
            if metric == "ppl" or (metric == "cot" and task != "gsm8k"):
                continue
            for think in think_modes:
                t0 = time.time()
                if metric == "paper":
                    value = paper_metric(qs, tok, task, examples, args, think)
                elif metric == "exact":
                    value = exact_match(qs, tok, task, examples, args, think)
                elif metric == "cot":
                    value = cot_majority(qs, tok, task, examples[:args.cot_limit], args, think)
                else:
                    raise SystemExit(f"unknown metric {metric!r}; metrics: paper, exact, cot, ppl")
                results[f"{task}/{metric}/{'thinking' if think else 'no_thinking'}"] = value
                print(f"  {task} {metric} {'thinking' if think else 'no thinking'}: "
                      f"{value[0]:.4f} ± {value[1]:.4f} (n={value[2]}, {time.time() - t0:.1f}s)", flush=True)
    if "ppl" in metrics and True in think_modes and not compact:
        for name, value in held_out_perplexity(qs, args).items():
            results[f"math/{name}"] = value

    print(f"\n{'metric':44s} {'value':>9s} {'stderr':>8s} {'n':>7s}")
    for name, value in results.items():
        if isinstance(value, tuple):
            print(f"{name:44s} {value[0]:9.4f} {value[1]:8.4f} {value[2]:7d}")
        else:
            print(f"{name:44s} {value:9.4f}")
    if not compact:
        print("paper = expected probability of the exact gold answer (the paper's metric), "
              "not exact-match accuracy; exact and cot are accuracies.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": args.ckpt, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
