"""The classroom arithmetic task: generator, vocabulary, and the whole pipeline for a few steps
(pretrain -> Quiet-STaR -> report -> evaluate/sample/HTML). No learning outcome is asserted."""
import json
import os
import subprocess
import sys

import pytest

from data.arith import prepare
from tokenizer import CharTokenizer, load_tokenizer
from train import read_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def left_to_right_mod10(question):
    """An independent solver: Python evaluates '((3+4)%10*2)%10...' with explicit brackets."""
    expression = question.rstrip("=")
    text = expression[0]
    for op, digit in zip(expression[1::2], expression[2::2]):
        text = f"(({text}){op}{digit})%10"
    return eval(text)


def test_solve_by_hand():
    assert prepare.solve("3+4*2-5=") == ([7, 4, 9], 9)
    assert prepare.with_steps("3+4*2-5=") == "3+4*2-5=|7,4,9|9"
    assert prepare.answer_only("0-8-4+5=") == "0-8-4+5=3"


def test_splits_seeded_disjoint_and_correct():
    test, train, pretrain = prepare.splits()
    assert (test, train, pretrain) == prepare.splits()                   # seeded
    assert prepare.splits(seed=1)[0] != test
    assert len(test) == prepare.N_TEST and len(train) == prepare.N_TRAIN
    assert len(set(test)) + len(set(train)) + len(set(pretrain)) == 10 ** 4 * 3 ** 3
    assert not set(test) & set(train) and not set(test) & set(pretrain) and not set(train) & set(pretrain)
    for q in test + train[:2000] + pretrain[:2000]:
        steps, answer = prepare.solve(q)
        assert answer == left_to_right_mod10(q) == steps[-1]
    texts = prepare.pretraining_texts(pretrain[:2000])
    n_steps = sum("|" in t for t in texts)
    assert 800 < n_steps < 1200                                        # about half show steps


def test_committed_test_file_is_the_generators():
    with open(os.path.join(ROOT, "data", "arith", "test.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["question"] for r in rows] == prepare.splits()[0]
    assert all(r["answer"] == str(left_to_right_mod10(r["question"])) for r in rows)


def test_vocabulary_round_trip():
    tok = load_tokenizer(os.path.join(ROOT, "data", "arith"))
    assert isinstance(tok, CharTokenizer) and tok.symbols == prepare.SYMBOLS
    text = "3+4*2-5=|7,4,9|9"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id == 1 and ids[-1] == tok.eos_id == 2 and len(ids) == len(text) + 2
    assert tok.decode(ids) == text
    assert (tok.thought_start_id, tok.thought_end_id) == (tok.n_words, tok.n_words + 1)   # the last two
    assert tok.decode([tok.thought_start_id, 3, tok.thought_end_id]) == "<|startthought|>0<|endthought|>"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.encode("3/4")
    # the classroom config starts the thought delimiters from '|'
    config = read_overrides([os.path.join(ROOT, "config", "arith.py")])
    assert tok.decode([config["delimiter_init_id"]]) == "|"


def run(args, timeout=600):
    done = subprocess.run([sys.executable] + args, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_pipeline_end_to_end(tmp_path):
    data = tmp_path / "data"
    prepare.prepare(str(data))
    fast = ["--device=cpu", "--dtype=float32", "--log_interval=1", "--docs_per_step=8",
            "--micro_batch_size=8", "--warmup_steps=1"]
    run(["train.py", "config/arith_pretrain.py", f"--data={data}/pretrain", "--max_steps=2",
         f"--out_dir={tmp_path}/base"] + fast)
    assert os.path.isfile(tmp_path / "base" / "ckpt" / "vocab.json")     # the vocabulary travels
    out = run(["train.py", "config/arith.py", f"--init_from={tmp_path}/base/ckpt", f"--data={data}/train",
               "--max_steps=2", "--thought_interval=1", f"--out_dir={tmp_path}/qs"] + fast)
    ckpt = tmp_path / "qs" / "ckpt"
    last = out.strip().splitlines()[-1]
    assert last.startswith("thinking helps: exact accuracy ") and last.endswith("(n=1000 held-out problems)")
    assert out.count("<|startthought|>") >= 5                  # during training + 3 at the answers
    run(["evaluate.py", "--ckpt", str(ckpt), "--limit", "40", "--json", f"{tmp_path}/r.json"])
    results = json.load(open(tmp_path / "r.json"))["results"]
    assert set(results) == {f"arith/{m}/{t}" for m in ("exact", "nll") for t in ("thinking", "no_thinking")} | \
        {"arith/thought_is_steps/thinking"}
    assert all(v[2] == 40 for v in results.values())
    run(["evaluate.py", "--ckpt", str(ckpt), "--html", f"{tmp_path}/t.html"])
    assert "startthought" in open(tmp_path / "t.html").read()
    out = run(["sample.py", "--ckpt", str(ckpt), "--prompt", "3+4*2-5=", "--max_new_tokens", "4"])
    assert "3+4*2-5=" in out
