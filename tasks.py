"""
The evaluation tasks of evaluate.py: GSM8K (test) and CommonsenseQA (dev) files, their
records, the official prompts, gold answers and how an answer is read from generated text.

    from tasks import load_examples, scored_prompt
    examples = load_examples("gsm8k", "data")       # [{"question", "answer"}, ...]
"""

import json
import os
import re

import numpy as np

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
            try:
                r = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
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
