"""
Synthetic multi-step arithmetic for the classroom run: problems a tiny model cannot solve
in one forward pass, but can solve one step at a time.

    python data/arith/prepare.py        # writes data/arith/{pretrain,train}.{bin,idx.npy}, test.jsonl

A problem chains three operations on digits, evaluated left to right, keeping only the
last digit of every intermediate result (arithmetic mod 10):

    3+4*2-5=9          3+4 = 7, 7*2 = 14 -> 4, 4-5 = -1 -> 9

Three splits of the 10^4 * 3^3 = 270,000 possible problems, disjoint by construction (one
seeded shuffle of all problems, cut in three):
  test.jsonl    1,000 held-out problems, {"question": "3+4*2-5=", "answer": "9"}
  pretrain      239,000 problems for the base model's plain next-token pretraining
  train         30,000 other problems: the Quiet-STaR text
Pretraining and Quiet-STaR text are the same kind of text, as Mistral's web text and the
paper's OpenWebMath are: half the problems show their steps between bars,
"3+4*2-5=|7,4,9|9", the other half only the answer, so a model has seen reasoning written
down but is not told when; and the text is noisy: after any symbol a space falls in 1 time
in 10 ("3+4 *2-5=|7,4, 9|9"), a symbol that means nothing, as a page break or a "---" means
nothing to the sum. Held-out questions are clean, and asked for the answer only.
Every document ends with EOS. The vocabulary (vocab.json, 20 symbols) is copied into every
checkpoint; ids 1 and 2 are BOS and EOS, as in Mistral's tokenizer.
"""

import itertools
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))   # the repository root

from dataloader import write_documents  # noqa: E402
from tokenizer import CharTokenizer  # noqa: E402

SEED = 1337
N_OPS = 3                 # operations per problem: the steps a thought has to carry
N_TEST, N_TRAIN = 1000, 30000
STEPS_FRACTION = 0.5      # documents that show their steps
FILLER = 0.1              # chance of a space after each symbol of a document
# <unk>, BOS, EOS first (Mistral's ids 0, 1, 2); "|" opens and closes the written-out steps;
# " " (id 19) is the filler, the symbol the thought delimiters start from (config/arith.py)
SYMBOLS = ["<unk>", "<s>", "</s>"] + list("0123456789+-*=|,") + [" "]
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def solve(question):
    """'3+4*2-5=' -> (intermediate results [7, 4, 9], answer 9), left to right, mod 10."""
    expression = question.rstrip("=")
    value, steps = int(expression[0]), []
    for op, digit in zip(expression[1::2], expression[2::2]):
        value = OPS[op](value, int(digit)) % 10
        steps.append(value)
    return steps, value


def all_questions():
    """Every problem, in a fixed order: '0+0+0+0=', '0+0+0-0=', ..."""
    for digits in itertools.product("0123456789", repeat=N_OPS + 1):
        for ops in itertools.product("+-*", repeat=N_OPS):
            yield digits[0] + "".join(o + d for o, d in zip(ops, digits[1:])) + "="


def with_steps(question):
    steps, answer = solve(question)
    return f"{question}|{','.join(map(str, steps))}|{answer}"


def answer_only(question):
    return f"{question}{solve(question)[1]}"


def splits(seed=SEED):
    """-> (test, train, pretrain) lists of questions, disjoint."""
    questions = list(all_questions())
    random.Random(seed).shuffle(questions)
    return questions[:N_TEST], questions[N_TEST:N_TEST + N_TRAIN], questions[N_TEST + N_TRAIN:]


def with_filler(text, rng):
    """'3+4*2-5=9' -> '3+4 *2-5=9': a space after each symbol with chance FILLER (none at the end)."""
    return "".join(ch + " " * (rng.random() < FILLER) for ch in text).rstrip(" ")


def texts(questions, seed=SEED):
    """The text of pretraining and of Quiet-STaR training: half with steps, all with filler."""
    rng, filler_rng = random.Random(seed + 1), random.Random(seed + 2)
    chosen = [with_steps(q) if rng.random() < STEPS_FRACTION else answer_only(q) for q in questions]
    return [with_filler(t, filler_rng) for t in chosen]


def vocabulary():
    return CharTokenizer(SYMBOLS)


def prepare(out_dir=HERE, seed=SEED):
    test, train, pretrain = splits(seed)
    tok = vocabulary()
    os.makedirs(out_dir, exist_ok=True)
    tok.save(out_dir)
    encode = lambda strings: [tok.encode(t, eos=True) for t in strings]   # noqa: E731
    # the training text draws its own steps-or-not and filler (seed + 10), not pretraining's
    write_documents(os.path.join(out_dir, "train"), encode(texts(train, seed + 10)))
    write_documents(os.path.join(out_dir, "pretrain"), encode(texts(pretrain, seed)))
    tmp = os.path.join(out_dir, f"test.jsonl.{os.getpid()}.tmp")   # see write_documents
    with open(tmp, "w") as f:
        for q in test:
            f.write(json.dumps({"question": q, "answer": str(solve(q)[1])}) + "\n")
    os.replace(tmp, os.path.join(out_dir, "test.jsonl"))
    print(f"{out_dir}: {len(test)} test, {len(train)} train, {len(pretrain)} pretraining "
          f"problems; vocabulary of {tok.n_words} symbols")


def ensure_prepared(*path_prefixes):
    """Prepare the data if any of these repo-relative paths under data/arith/ is missing."""
    root = os.path.dirname(os.path.dirname(HERE))
    wanted = [p for p in path_prefixes if p.startswith("data/arith/")]
    if any(not os.path.isfile(os.path.join(root, p + ".bin")) for p in wanted):
        prepare()


if __name__ == "__main__":
    prepare()
