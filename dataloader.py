"""
Tokenized documents on disk, and batches served the way the official Quiet-STaR run made
them: every document gives one row of `seq_len` tokens, BOS first; a longer document is cut
to a random window, a shorter one is padded on the right with EOS; the attention mask is
False at the padding.

On disk (written by write_documents, read by Documents):
    NAME.bin       every document's tokens, one after another, uint16
    NAME.idx.npy   int64 offsets: document d is tokens[idx[d]:idx[d+1]]

Batches are a pure function of (seed, step, micro-batch): the documents are shuffled once
per epoch with the seed, and every document's window is drawn from its own seeded random
generator. So any number of processes, and a resumed run, see exactly the same data.
"""

import os

import numpy as np
import torch


def write_documents(path_prefix, documents):
    """Write token lists as PATH.bin + PATH.idx.npy (atomically: temporary names, then rename)."""
    documents = [np.asarray(d, dtype=np.int64) for d in documents]
    if not documents:
        raise ValueError(f"{path_prefix}: no documents to write")
    if any(len(d) and (d.min() < 0 or d.max() > np.iinfo(np.uint16).max) for d in documents):
        raise ValueError(f"{path_prefix}: token ids must fit in uint16")
    offsets = np.cumsum([0] + [len(d) for d in documents]).astype(np.int64)
    os.makedirs(os.path.dirname(os.path.abspath(path_prefix)), exist_ok=True)
    # temporary names of this process (ending in .tmp, as every temporary file here): two runs
    # started at once may both prepare the same data (identical bytes); each renames its own
    # complete files, neither loses the other's
    tmp = f".{os.getpid()}.tmp"
    with open(path_prefix + ".bin" + tmp, "wb") as f:
        np.concatenate(documents).astype(np.uint16).tofile(f)
    with open(path_prefix + ".idx.npy" + tmp, "wb") as f:
        np.save(f, offsets)
    os.replace(path_prefix + ".bin" + tmp, path_prefix + ".bin")
    os.replace(path_prefix + ".idx.npy" + tmp, path_prefix + ".idx.npy")


class Documents:
    """Read-only, memory-mapped view of PATH.bin + PATH.idx.npy."""

    def __init__(self, path_prefix):
        bin_file, idx_file = path_prefix + ".bin", path_prefix + ".idx.npy"
        for f in (bin_file, idx_file):
            if not os.path.isfile(f):
                raise FileNotFoundError(f"{f}: data file not found (run the dataset's prepare.py)")
        self.bin_file = bin_file
        try:
            self.offsets = np.load(idx_file, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"{idx_file}: not a document index (.idx.npy) file ({e})") from None
        if self.offsets.ndim != 1 or self.offsets.dtype.kind not in "iu" or \
                (len(self.offsets) and (self.offsets[0] != 0 or (np.diff(self.offsets) < 0).any())):
            raise ValueError(f"{idx_file}: expected increasing integer offsets starting at 0")
        self.tokens = np.memmap(bin_file, dtype=np.uint16, mode="r") if os.path.getsize(bin_file) else \
            np.zeros(0, dtype=np.uint16)
        if len(self.offsets) < 2:
            raise ValueError(f"{idx_file}: the dataset is empty (no documents)")
        if self.offsets[-1] != len(self.tokens):
            raise ValueError(f"{bin_file}: holds {len(self.tokens)} tokens, the index says "
                             f"{self.offsets[-1]} (truncated or mismatched files)")

    def __len__(self):
        return len(self.offsets) - 1

    def max_token_id(self):
        """The largest token id in the data (one pass over the file, in chunks)."""
        chunk = 1 << 24
        return max((int(self.tokens[i:i + chunk].max()) for i in range(0, len(self.tokens), chunk)),
                   default=0)

    def __getitem__(self, d):
        return self.tokens[self.offsets[d]:self.offsets[d + 1]]


def window(document, seq_len, bos_id, eos_id, rng):
    """One training row: BOS + document, cut to a random window or right-padded with EOS."""
    tokens = np.concatenate([[bos_id], document]).astype(np.int64)
    if len(tokens) > seq_len:
        start = rng.integers(0, len(tokens) - seq_len + 1)
        return tokens[start:start + seq_len]
    return np.concatenate([tokens, np.full(seq_len - len(tokens), eos_id, dtype=np.int64)])


class Batches:
    """
    Serves the documents of optimizer step `step` in micro-batches.
    Each step uses `docs_per_step` documents of the shuffled order (wrapping into a new
    shuffle per epoch); micro-batch j of the step holds documents [j*B, (j+1)*B) of them.
    With several processes, process `rank` of `world_size` takes micro-batches
    j = rank * n_micro + m for m in range(n_micro), so the step's documents are the same
    whatever the number of processes.
    """

    def __init__(self, documents, seq_len, docs_per_step, micro_batch_size, seed,
                 bos_id=1, eos_id=2, n_documents=None):
        if docs_per_step % micro_batch_size:
            raise ValueError(f"docs_per_step={docs_per_step} is not a multiple of "
                             f"micro_batch_size={micro_batch_size}")
        self.documents, self.seq_len, self.seed = documents, seq_len, seed
        self.docs_per_step, self.micro_batch_size = docs_per_step, micro_batch_size
        self.bos_id, self.eos_id = bos_id, eos_id
        self.n_documents = min(n_documents or len(documents), len(documents))

    def _epochs_and_ids(self, step):
        """(epoch, document id) of each of the step's documents, in order."""
        positions = np.arange(step * self.docs_per_step, (step + 1) * self.docs_per_step)
        epochs, within = np.divmod(positions, self.n_documents)
        orders = {e: np.random.default_rng([self.seed, int(e)]).permutation(self.n_documents)
                  for e in set(epochs.tolist())}
        return [(int(e), int(orders[int(e)][i])) for e, i in zip(epochs, within)]

    def document_ids(self, step):
        """The documents of one optimizer step, in order."""
        return [d for _, d in self._epochs_and_ids(step)]

    def micro_batch(self, step, j):
        """(tokens (B, seq_len) int64, attention_mask (B, seq_len) bool, document ids)."""
        B = self.micro_batch_size
        picked = self._epochs_and_ids(step)[j * B:(j + 1) * B]
        rows = [window(self.documents[d], self.seq_len, self.bos_id, self.eos_id,
                       np.random.default_rng([self.seed, epoch, d])) for epoch, d in picked]
        tokens = torch.from_numpy(np.stack(rows))
        # as the official loader: padding is EOS, and every EOS is masked
        return tokens, tokens != self.eos_id, [d for _, d in picked]


def check_token_ids(documents, vocab_size, tokenizer):
    """Every token id of the data is a text token of the tokenizer and a row of the model."""
    limit = min(vocab_size, tokenizer.n_words)
    largest = documents.max_token_id()
    if largest >= limit:
        raise ValueError(f"{documents.bin_file}: token id {largest} is out of range: the tokenizer "
                         f"{tokenizer.path} has {tokenizer.n_words} tokens, the model {vocab_size} "
                         f"(was the data made with another tokenizer?)")
