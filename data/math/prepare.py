"""
The small real math corpus that `python train.py` trains on out of the box: the 5,000
problems of the MATH test set with their worked LaTeX solutions (Hendrycks et al. 2021,
MIT license, see LICENSE beside this file), one document per problem:

    Problem: <problem>
    Solution: <solution>

    python data/math/prepare.py       # writes data/math/{train,val}.bin and .idx.npy

train.py runs this by itself the first time it needs the data. 250 documents, chosen with a
fixed seed, are held out as `val`.
"""

import gzip
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from dataloader import write_documents  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

SOURCE = os.path.join(HERE, "math_test.jsonl.gz")
N_VAL = 250


def prepare(out_dir=HERE, tokenizer_path=None):
    """Tokenize the corpus into out_dir/train.* and out_dir/val.*; returns out_dir."""
    tokenizer = Tokenizer(tokenizer_path or os.path.join(HERE, "..", "..", "assets", "tokenizer.model"))
    with gzip.open(SOURCE, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    texts = [f"Problem: {r['problem']}\nSolution: {r['solution']}" for r in records]
    ids = tokenizer.encode_batch(texts)
    order = np.random.default_rng(1234).permutation(len(ids))
    write_documents(os.path.join(out_dir, "val"), [ids[i] for i in order[:N_VAL]])
    write_documents(os.path.join(out_dir, "train"), [ids[i] for i in order[N_VAL:]])
    n_tokens = sum(len(i) for i in ids)
    print(f"data/math: {len(ids)} documents, {n_tokens:,} tokens -> {out_dir}/train.*, val.*")
    return out_dir


def ensure_prepared(*path_prefixes):
    """Prepare the corpus if any of these repo-relative paths under data/math/ is missing."""
    root = os.path.dirname(os.path.dirname(HERE))
    wanted = [p for p in path_prefixes if p.startswith("data/math/")]
    if any(not os.path.isfile(os.path.join(root, p + ".bin")) for p in wanted):
        prepare()


if __name__ == "__main__":
    prepare()
