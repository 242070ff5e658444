"""dataloader.py on hand-made documents."""
import os

import numpy as np
import pytest
import torch

from dataloader import Batches, Documents, window, write_documents


def make(tmp_path, docs, name="docs"):
    prefix = str(tmp_path / name)
    write_documents(prefix, docs)
    return Documents(prefix)


def test_round_trip(tmp_path):
    docs = [[5, 6, 7], [], [8] * 10, [65535]]
    d = make(tmp_path, docs)
    assert len(d) == 4 and [d[i].tolist() for i in range(4)] == docs


def test_window_pads_short_and_cuts_long():
    rng = np.random.default_rng(0)
    short = window(np.array([5, 6]), 6, bos_id=1, eos_id=2, rng=rng)
    assert short.tolist() == [1, 5, 6, 2, 2, 2]
    long_doc = np.arange(10, 30)
    for _ in range(50):
        w = window(long_doc, 6, 1, 2, rng).tolist()
        full = [1] + long_doc.tolist()
        start = full.index(w[0])
        assert w == full[start:start + 6]          # a contiguous window of BOS + document
    starts = {window(long_doc, 6, 1, 2, np.random.default_rng(s))[0] for s in range(200)}
    assert 1 in starts and 15 in starts             # every start is possible, BOS included


def test_batches_masks_and_determinism(tmp_path):
    d = make(tmp_path, [[10 + i] * (3 + i) for i in range(6)])
    b = Batches(d, seq_len=5, docs_per_step=4, micro_batch_size=2, seed=0)
    tokens, mask, ids = b.micro_batch(0, 1)
    assert tokens.shape == (2, 5) and mask.dtype == torch.bool
    assert (mask == (tokens != 2)).all()
    short = Batches(make(tmp_path, [[7, 8]], "short"), seq_len=5, docs_per_step=1, micro_batch_size=1, seed=0)
    tokens_short, mask_short, _ = short.micro_batch(0, 0)
    assert tokens_short.tolist() == [[1, 7, 8, 2, 2]] and mask_short.tolist() == [[True] * 3 + [False] * 2]
    again = Batches(d, 5, 4, 2, seed=0).micro_batch(0, 1)
    assert (again[0] == tokens).all() and again[2] == ids
    # one epoch covers every document once; steps wrap into a new shuffle
    seen = b.document_ids(0) + b.document_ids(1)[:2]
    assert sorted(seen) == list(range(6))
    assert b.document_ids(1) != Batches(d, 5, 4, 2, seed=1).document_ids(1)


def test_micro_batches_split_the_step_whatever_the_processes(tmp_path):
    d = make(tmp_path, [[3] * 4] * 16)
    step_docs = Batches(d, 8, 8, 4, seed=3).document_ids(2)
    halves = [Batches(d, 8, 8, 4, seed=3).micro_batch(2, j)[2] for j in range(2)]
    quarters = [Batches(d, 8, 8, 2, seed=3).micro_batch(2, j)[2] for j in range(4)]
    assert sum(halves, []) == step_docs == sum(quarters, [])


def test_bad_data_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.bin: data file not found"):
        Documents(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no documents"):
        write_documents(str(tmp_path / "empty"), [])
    np.save(tmp_path / "empty.idx.npy", np.zeros(1, dtype=np.int64))
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.idx.npy: the dataset is empty"):
        Documents(str(tmp_path / "empty"))
    write_documents(str(tmp_path / "cut"), [[1, 2, 3], [4, 5]])
    data = (tmp_path / "cut.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-2])
    with pytest.raises(ValueError, match="cut.bin: holds 4 tokens, the index says 5"):
        Documents(str(tmp_path / "cut"))


def test_two_processes_writing_the_same_data_at_once(tmp_path, monkeypatch):
    """Two runs started at once both prepare data/arith (a real failure: one renamed the
    shared temporary file the other was about to rename). Replay that interleaving: a second
    process (another pid) writes the same files between this one's writes and its renames."""
    prefix, docs = str(tmp_path / "d"), [[1, 5, 2], [1, 7, 7, 2]]
    real_replace, interleaved = os.replace, []

    def replace(src, dst):
        if not interleaved:
            interleaved.append(True)
            with monkeypatch.context() as other:
                other.setattr(os, "getpid", lambda: 999_999)
                write_documents(prefix, docs)                   # the other process, whole
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    write_documents(prefix, docs)
    d = Documents(prefix)
    assert [d[i].tolist() for i in range(len(d))] == docs
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx.npy"]     # no temporary file left
