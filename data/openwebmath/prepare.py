"""
OpenWebMath, the paper's training data, tokenized for train.py.

The official run trained on the first 1,000 documents of open-web-math/open-web-math
(Paster et al. 2023; ODC-By 1.0; about 14.7B tokens in all) and shuffled them with seed 42.

    pip install datasets                                   # only for the download
    python data/openwebmath/prepare.py --n_docs 1000       # first 1,000 documents from the Hub

or, from files you already have (no extra package needed for .jsonl and .txt):

    python data/openwebmath/prepare.py --files shard-*.parquet   # needs pyarrow
    python data/openwebmath/prepare.py --files docs.jsonl         # one {"text": ...} per line
    python data/openwebmath/prepare.py --files texts/*.txt        # one document per file

Writes data/openwebmath/train.bin + train.idx.npy (see dataloader.py for the format).
The document order inside the files is the source order; train.py shuffles with its seed
(the official order came from the Hugging Face Trainer's sampler and is not reproduced).
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from dataloader import write_documents  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402


def read_local(files, n_docs):
    """Document texts from local .parquet / .jsonl / .txt files, in order, at most n_docs."""
    texts = []
    for path in files:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq
            texts += pq.read_table(path, columns=["text"]).column("text").to_pylist()
        elif path.endswith((".jsonl", ".json")):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        record = json.loads(line)
                        if "text" not in record:
                            raise ValueError(f"{path}:{n}: no 'text' field")
                        texts.append(record["text"])
        elif path.endswith(".txt"):
            texts.append(open(path, encoding="utf-8").read())
        else:
            raise ValueError(f"{path}: expected .parquet, .jsonl or .txt")
        if len(texts) >= n_docs:
            break
    return texts[:n_docs]


def read_hub(n_docs):
    from datasets import load_dataset   # only this path needs it
    return load_dataset("open-web-math/open-web-math", split=f"train[:{n_docs}]")["text"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_docs", type=int, default=1000)
    p.add_argument("--files", nargs="*", help="local files instead of the download")
    p.add_argument("--out", default=os.path.join(HERE, "train"), help="output path prefix")
    args = p.parse_args()
    texts = read_local(args.files, args.n_docs) if args.files else read_hub(args.n_docs)
    if not texts:
        raise SystemExit("no documents found")
    tokenizer = Tokenizer(os.path.join(HERE, "..", "..", "assets", "tokenizer.model"))
    ids = tokenizer.encode_batch(texts)
    write_documents(args.out, ids)
    print(f"{len(ids)} documents, {sum(map(len, ids)):,} tokens -> {args.out}.bin, .idx.npy")


if __name__ == "__main__":
    main()
