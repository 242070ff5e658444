r"""
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
import json
import math
import os
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import torch

import thinking_page
from checkpoint import read_quietstar_config
from cli import HelpFormatter, at_least, check_checkpoint_dir, check_device, run, short_errors
from dataloader import Documents, check_token_ids
from model import read_json, tensor_names
from quietstar import QuietStar, RELEASED_NAMES
from tasks import (DATA_FILES, download, extract_answer, gold, load_examples,  # noqa: F401 (re-exported)
                   normalize_number, parse_example, question_text, scored_prompt, shuffled)
from tokenizer import CharTokenizer, check_vocabulary, load_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ANSWER_MARKER = [13, 28741, 28747]      # "\nA:" in Mistral's tokenizer
DIGIT_TOKENS = [28740, 28750, 28770, 28781, 28782, 28784, 28787, 28783, 28774, 28734, 13]  # 1..9, 0, \n
LETTER_TOKENS = [330, 365, 334, 384, 413, 13]                                               # A..E, \n
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


def progress(label, total):
    """-> tick(done): one updating line on stderr with the count, elapsed time and ETA."""
    t0, last = time.time(), [0.0]

    def tick(done):
        now = time.time()
        if 0 < done < total and now - last[0] < 1.0:
            return
        last[0], elapsed = now, now - t0
        eta = f"{elapsed / done * (total - done):.0f}s" if done else "?"
        print(f"\r  {label}: {done}/{total} ({elapsed:.0f}s, eta {eta})   ", end="\n" if done >= total else "",
              file=sys.stderr, flush=True)
    tick(0)
    return tick


def paper_metric(qs, tok, task, examples, args, think, tick=None):
    probs = []
    for idx in batches(examples, args.batch_size):
        prompts = [scored_prompt(task, examples[i]) for i in idx]
        ids = [crop(tok.encode(p, bos=True), args.max_length, args.seed, i) for p, i in zip(prompts, idx)]
        logits, _ = teacher_forced(qs, ids, args.seed, idx, think)
        probs += [paper_answer_probability(x, lg, is_numeric_answer(tok.decode(x))) for x, lg in zip(ids, logits)]
        if tick:
            tick(len(probs))
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


def exact_match(qs, tok, task, examples, args, think, tick=None):
    correct = []
    for idx in batches(examples, args.batch_size):
        prompts = [tok.encode(question_text(task, examples[i]) + "\nA:", bos=True) for i in idx]
        outs = generate(qs, prompts, args.answer_tokens, think, 0.0, args.seed, idx)
        for i, out in zip(idx, outs):
            answer = extract_answer(task, tok.decode(out).split("\n")[0])
            correct.append(float(answer is not None and answer == gold(task, examples[i])))
        if tick:
            tick(len(correct))
    return mean_and_stderr(correct)


COT_STOPS = ("Q:", "\n\n\n")


def generate_until(qs, tok, ids, max_new_tokens, think, seed, index, stops=COT_STOPS, chunk=32):
    """Sample up to max_new_tokens at temperature 0.9, in chunks, stopping after the chunk in
    which a stop string (or EOS) appears; -> the text up to the first stop string."""
    new = []
    while len(new) < max_new_tokens:
        n = min(chunk, max_new_tokens - len(new))
        out = generate(qs, [ids + new], n, think, 0.9, seed + len(new), [index])[0]
        new += out
        text = continuation(tok, ids, new)
        if len(out) < n or tok.eos_id in out or any(stop in text for stop in stops):
            break
    text = continuation(tok, ids, new)
    for stop in stops:
        text = text.split(stop)[0]
    return text


def cot_majority(qs, tok, task, examples, args, think, tick=None):
    """Zero-shot CoT (the official zero-shotcot-eval.py's prompts), k samples, majority vote."""
    correct = []
    for i, ex in enumerate(examples):
        prompt = question_text(task, ex) + "\nA: Let's think step by step."
        votes = []
        ids = tok.encode(prompt, bos=True)
        for k in range(args.cot_samples):
            seed = args.seed + 7919 * k
            reasoning = generate_until(qs, tok, ids, args.cot_tokens, think, seed, i)
            follow = tok.encode(prompt + reasoning + "\nTherefore, the answer (arabic numerals) is", bos=True)
            answer = continuation(tok, follow, generate(qs, [follow], 12, think, 0.9, seed, [i])[0])
            votes.append(extract_answer(task, answer))
            if tick:
                tick(i * args.cot_samples + k + 1)
        votes = [v for v in votes if v is not None]
        majority = Counter(votes).most_common(1)[0][0] if votes else None
        correct.append(float(majority == gold(task, ex)))
    return mean_and_stderr(correct)


def continuation(tok, prompt_ids, new_ids):
    """The text new_ids add after the prompt (decoding them alone would drop a leading space)."""
    before, after = tok.decode(prompt_ids), tok.decode(prompt_ids + new_ids)
    return after[len(before):] if after.startswith(before) else tok.decode(new_ids)


DIFFICULTY_BINS = [(0.0, 1.0), (1.0, 2.0), (2.0, 4.0), (4.0, math.inf)]   # base NLL, nats


def held_out_perplexity(qs, args, tick=None):
    """Per-token NLL without and with thinking on held-out windows; the gain by difficulty."""
    from data.math.prepare import ensure_prepared
    ensure_prepared(args.ppl_data)                 # the default held-out text is made on first use
    docs = Documents(os.path.join(HERE, args.ppl_data) if not os.path.isabs(args.ppl_data) else args.ppl_data)
    check_token_ids(docs, qs.model.args.vocab_size, load_tokenizer(args.ckpt))
    n = min(len(docs), args.ppl_docs, args.limit or len(docs))
    base_nll, think_nll = [], []
    for idx in batches(list(range(n)), args.batch_size):
        ids = [[1] + docs[i][:args.max_length - 1].tolist() for i in idx]
        for think, store in ((False, base_nll), (True, think_nll)):
            logits, _ = teacher_forced(qs, ids, args.seed, idx, think)
            for x, lg in zip(ids, logits):
                targets = torch.tensor(x[1:], device=lg.device)
                store += torch.nn.functional.cross_entropy(lg[:-1].float(), targets, reduction="none").tolist()
        if tick:
            tick(idx[-1] + 1)
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
# where thinking helps: one self-contained HTML page (thinking_page.py)

def thinking_html(qs, tok, text, seed=0, note=""):
    rows = thinking_page.token_rows(qs, tok, text, seed, teacher_forced, continuation)
    return thinking_page.page(rows, note)


def model_note(qs, ckpt):
    """What produced the page: checkpoint, size, thought length, training step if known."""
    n_params = sum(p.numel() for p in qs.parameters())
    state_file = os.path.join(ckpt, "state.json")
    step = ""
    if os.path.isfile(state_file):
        state = read_json(state_file)
        step = f", trained {state.get('step', '?')} steps by train.py"
        init = state.get("config", {}).get("init_from", "")
        if init == "scratch":
            step += " from random weights (so its thoughts are noise: the page shows the machinery, not insight)"
    return (f"Model: {ckpt} ({n_params / 1e6:,.1f}M parameters, {qs.config.n_thought_tokens} thought "
            f"tokens, one sampled thought per token{step}).")


# -----------------------------------------------------------------------------

def load_for_eval(args):
    dtype = getattr(torch, args.dtype)
    has_parts = has_quietstar_parts(args.ckpt)
    think_modes = {"auto": [False, True] if has_parts else [False], "both": [False, True],
                   "yes": [True], "no": [False]}[args.think]
    if True in think_modes and not has_parts:
        raise SystemExit(f"{args.ckpt}: no Quiet-STaR parts (start_embedding, end_embedding, "
                         f"talk_head.*) in this checkpoint, so it cannot think; use --think=no")
    qs = QuietStar.from_pretrained(args.ckpt, read_quietstar_config(args.ckpt), device=args.device, dtype=dtype)
    if args.n_thought_tokens:
        qs.config = replace(qs.config, n_thought_tokens=args.n_thought_tokens)
    return qs.eval(), think_modes


def has_quietstar_parts(path):
    """Whether a checkpoint directory holds the released Quiet-STaR tensors."""
    return set(RELEASED_NAMES) <= tensor_names(path)


def parse_args():
    p = short_errors(argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter))
    p.add_argument("--ckpt", required=True, help="checkpoint directory (e.g. out/ckpt)")
    p.add_argument("--tasks", default="", help=f"comma-separated: {', '.join(TASKS)} "
                   f"(default: arith for a compact-vocabulary checkpoint, else gsm8k,csqa)")
    p.add_argument("--metrics", default="paper,exact,cot,ppl", help=f"comma-separated: {', '.join(METRICS)}")
    p.add_argument("--think", default="auto", choices=["auto", "both", "yes", "no"],
                   help="with and/or without thinking (auto: both where the checkpoint can think)")
    p.add_argument("--limit", type=at_least(0), default=0,
                   help="at most N examples (or held-out documents) for every metric (0: all)")
    p.add_argument("--batch_size", type=at_least(1), default=8, help="examples per forward pass")
    p.add_argument("--max_length", type=at_least(8), default=256,
                   help="prompts are cut to their last N tokens (the official eval: 256)")
    p.add_argument("--answer_tokens", type=at_least(1), default=16, help="exact: new tokens for the answer")
    p.add_argument("--cot_samples", type=at_least(1), default=8, help="cot: samples per question (majority vote)")
    p.add_argument("--cot_tokens", type=at_least(1), default=384, help="cot: new tokens per sample at most")
    p.add_argument("--cot_limit", type=at_least(1), default=128, help="cot: questions (the official script used 128)")
    p.add_argument("--ppl_data", default="data/math/val", help="ppl: held-out documents (path prefix)")
    p.add_argument("--ppl_docs", type=at_least(1), default=250, help="ppl: documents scored")
    p.add_argument("--n_thought_tokens", type=at_least(0), default=0,
                   help="thought length override (5 for quietstar-8-ahead; 0: the checkpoint's)")
    p.add_argument("--seed", type=int, default=42, help="example order and sampled thoughts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32",
                   choices=["float32", "bfloat16", "float16"], help="weights and compute")
    p.add_argument("--data_dir", default=os.path.join(HERE, "data"),
                   help="where gsm8k/ and csqa/ are (default: the repository's data/)")
    p.add_argument("--download", action="store_true", help="fetch GSM8K test and CSQA dev into --data_dir")
    p.add_argument("--json", default="", help="also write the results to this file")
    p.add_argument("--html", default="", help="write a page showing where thinking helps on --text")
    p.add_argument("--text", default="", help='for --html (default: a GSM8K-style problem, or an arith '
                   'one); "\\n" in it is a newline')
    args = p.parse_args()
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.metrics = [m for m in args.metrics.split(",") if m]
    for name, given, known in (("task", args.tasks, TASKS), ("metric", args.metrics, METRICS)):
        for x in given:
            if x not in known:
                p.error(f"unknown {name} {x!r}; {name}s: {', '.join(known)}")
    for name in ("json", "html"):                    # before any work, not after it
        path = getattr(args, name)
        folder = os.path.dirname(os.path.abspath(path)) if path else ""
        if path and (not os.path.isdir(folder) or not os.access(folder, os.W_OK)):
            p.error(f"--{name} {path}: cannot write there ({folder} is not a writable directory)")
    check_device(args.device)
    check_checkpoint_dir(args.ckpt)
    args.text = args.text.replace("\\n", "\n")
    return args


def write_atomically(path, text):
    """Write text to path whole or not at all (a temporary file, then a rename)."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


METRICS = ("paper", "exact", "cot", "ppl")
TASKS = (*DATA_FILES, "arith")


def main():
    args = parse_args()
    if args.download:
        download(args.data_dir)
    tok = load_tokenizer(args.ckpt)
    compact = isinstance(tok, CharTokenizer)
    args.tasks = args.tasks or (["arith"] if compact else ["gsm8k", "csqa"])
    args.text = args.text or ("3+4*2-5=9" if compact else
                              "Q: A baker makes 12 trays of 24 cookies and sells 250. How many are left?\nA: 38")
    qs, think_modes = load_for_eval(args)
    check_vocabulary(tok, qs.model.args.vocab_size, args.ckpt)
    if args.html:                 # made first, so that a failure leaves no empty file
        page = thinking_html(qs, tok, args.text, args.seed, model_note(qs, args.ckpt))
        write_atomically(args.html, page)
        print(f"wrote {args.html}")
        return

    results = {}
    for task in args.tasks:
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
        examples = shuffled(load_examples(task, args.data_dir), args.seed, args.limit)
        for metric in args.metrics:
            if metric == "ppl" or (metric == "cot" and task != "gsm8k"):
                continue
            for think in think_modes:
                t0 = time.time()
                label = f"{task} {metric} {'thinking' if think else 'no thinking'}"
                if metric == "paper":
                    value = paper_metric(qs, tok, task, examples, args, think, progress(label, len(examples)))
                elif metric == "exact":
                    value = exact_match(qs, tok, task, examples, args, think, progress(label, len(examples)))
                else:
                    cot = examples[:args.cot_limit]
                    value = cot_majority(qs, tok, task, cot, args, think, progress(label, len(cot) * args.cot_samples))
                results[f"{task}/{metric}/{'thinking' if think else 'no_thinking'}"] = value
                print(f"  {label}: {value[0]:.4f} ± {value[1]:.4f} (n={value[2]}, {time.time() - t0:.1f}s)",
                      flush=True)
    if "ppl" in args.metrics and True in think_modes and not compact:
        n_docs = min(args.ppl_docs, args.limit or args.ppl_docs)
        for name, value in held_out_perplexity(qs, args, progress("held-out perplexity", n_docs)).items():
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
        write_atomically(args.json, json.dumps({"checkpoint": args.ckpt, "results": results}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    run(main)
