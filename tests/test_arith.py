"""The classroom arithmetic task: generator, vocabulary, and the whole pipeline for a few steps
(pretrain -> Quiet-STaR -> report -> evaluate/sample/HTML). No learning outcome is asserted."""
import json
import os
import subprocess
import sys

import pytest
import torch

from data.arith import controls, prepare, report
from model import ModelArgs, Transformer
from quietstar import QuietStar, QuietStarConfig, QuietStarOutput
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
    texts = prepare.texts(pretrain[:2000])
    n_steps = sum("|" in t for t in texts)
    assert 800 < n_steps < 1200                                        # about half show steps
    assert prepare.texts(train[:2000], seed=prepare.SEED + 10) != prepare.texts(train[:2000])


def test_filler_is_noise_and_held_out_questions_are_clean():
    """Without its spaces every text is a clean problem, with or without steps; about 1 symbol
    in 10 is followed by one; no text ends with one; the held-out questions have none."""
    _, train, pretrain = prepare.splits()
    for questions in (pretrain[:3000], train[:3000]):
        texts = prepare.texts(questions)
        for q, t in zip(questions, texts):
            assert t.replace(" ", "") in (prepare.with_steps(q), prepare.answer_only(q)) and not t.endswith(" ")
        spaces, symbols = sum(t.count(" ") for t in texts), sum(len(t.replace(" ", "")) - 1 for t in texts)
        assert 0.08 < spaces / symbols < 0.12
    assert not any(" " in ex["question"] for ex in report.load_test())


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


def test_thought_slot_starts_from_the_filler():
    """The delimiters start from the filler space (the toy's '---'), a symbol every kind of text
    scatters at random, not from the '|' that opens written steps; no text holds the slot's
    own symbols."""
    tok = load_tokenizer(os.path.join(ROOT, "data", "arith"))
    config = read_overrides([os.path.join(ROOT, "config", "arith.py")])
    assert tok.decode([config["delimiter_init_id"]]) == " "
    _, train, pretrain = prepare.splits()
    texts = prepare.texts(train[:500], prepare.SEED + 10) + prepare.texts(pretrain[:2000])
    used = {i for t in texts for i in tok.encode(t, bos=True, eos=True)}
    assert config["delimiter_init_id"] in used
    assert tok.thought_start_id not in used and tok.thought_end_id not in used


def tiny_arith_model(seed, w=0.3):
    torch.manual_seed(seed)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64,
                     vocab_size=len(prepare.SYMBOLS) + 2, rope_theta=1000.0, sliding_window=None)
    qs = QuietStar(Transformer(args), QuietStarConfig(n_thought_tokens=4, n_talk=1, delimiter_init_id=0))
    qs.init_thought_parameters()
    with torch.no_grad():
        qs.mixing_head[4].weight.normal_(std=w)
    return qs.eval()


def test_forced_mixing_predicts_from_the_thought_alone():
    qs = tiny_arith_model(0)
    tokens = torch.tensor([prepare.vocabulary().encode("3+4*2-5=9", bos=True)])
    thoughts = torch.randint(3, len(prepare.SYMBOLS), (1, 1, tokens.shape[1], 4))
    with report.forced_mixing(qs):
        out = qs(tokens, thoughts)
    assert torch.equal(out.mix_weight, torch.ones_like(out.mix_weight))
    torch.testing.assert_close(out.talk_hidden, out.branch_hidden[:, :, 5:])   # after <end>
    assert "_mix" not in vars(qs)                                 # the head is back
    assert not torch.equal(qs(tokens, thoughts).talk_hidden, out.talk_hidden)


def test_answer_mix_weight_is_read_where_the_answer_is_predicted():
    valid = torch.tensor([[1] * 10 + [0], [1] * 7 + [0] * 4]).bool()            # (B=2, L=11)
    w = torch.arange(11.0)[None, :, None].repeat(4, 1, 1)                          # (R=4, L, 1): w = position
    w[2:] += 100
    out = QuietStarOutput(None, None, None, w)
    assert report.answer_mix_weight(out, valid) == pytest.approx((8 + 8 + 105 + 105) / 4)


def test_step_shares_by_hand():
    tok = prepare.vocabulary()
    examples = [{"question": "3+4*2-5=", "answer": "9"}] * 4              # steps 7, 4, 9
    thoughts = torch.tensor([tok.encode(t) for t in ("7,4,9|", "|7,4,9", "1,7,4,", "749,,,")])
    first, spelled = report.step_shares(tok, examples, thoughts)
    assert first == [1, 1, 0, 1] and spelled == [1, 1, 0, 1]


def test_controls_are_scored_by_the_headline_code():
    """Every row of the final report is report.score on the same problems and seed, and the
    last line names the best control."""
    tok = prepare.vocabulary()
    examples = report.load_test(limit=30)
    qs, base = tiny_arith_model(1), tiny_arith_model(2)
    lines = []
    rows = report.final_report(qs, base, tok, examples, seed=5, print_fn=lines.append)
    same = lambda a, b: a["exact"] == b["exact"] and a["nll"] == b["nll"]   # noqa: E731
    assert same(rows["trained, with thinking"], report.score(qs, tok, examples, True, 5))
    assert same(rows["trained, without thinking"], report.score(qs, tok, examples, False, 5))
    assert same(rows["base model, without thinking"], report.score(base, tok, examples, False, 5))
    assert same(rows["(c) trained, random thoughts"], report.score(qs, tok, examples, True, 5, random_thoughts=True))
    with report.forced_mixing(base):
        assert same(rows["(a) base model, mixing weight forced to 1"], report.score(base, tok, examples, True, 5))
    controls = {k: v["exact"][0] for k, v in rows.items() if k != "trained, with thinking"}
    best = max(controls, key=controls.get)
    assert lines[-1].startswith("thinking earned: ") and f"best control ({best}: " in lines[-1]
    assert all(r["exact"][2] == 30 for r in rows.values())


def test_targets_of_the_controls_script():
    row = lambda x: {"exact": (x, 0.01, 1000)}   # noqa: E731
    rows = {"trained, with thinking": row(0.6), "trained, without thinking": row(0.3),
            "(a) base model, mixing weight forced to 1": row(0.1), "base model, without thinking": row(0.25),
            "(b) run without REINFORCE, with thinking": row(0.45)}
    earned, over_b = controls.targets({42: rows}, print_fn=lambda *_: None)
    assert earned == [pytest.approx(30)] and over_b == [pytest.approx(15)]


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
               "--max_steps=2", "--thought_interval=1", "--final_eval_problems=200", f"--out_dir={tmp_path}/qs"] + fast)
    ckpt = tmp_path / "qs" / "ckpt"
    last = out.strip().splitlines()[-1]
    assert last.startswith("thinking earned: ") and last.endswith("n=200 held-out problems)")
    assert out.count("<|startthought|>") >= 5                  # during training + 3 at the answers
    for row in ("trained, with thinking", "trained, without thinking", "(a) base model, mixing weight forced to 1",
                "base model, without thinking", "(c) trained, random thoughts"):
        assert f"  {row} " in out
    assert out.count("thoughts at '=' (200 training problems, step ") == 1      # step 1 of 2
    records = [json.loads(line) for line in open(tmp_path / "qs" / "metrics.jsonl")]
    assert [r["step"] for r in records if "mix_weight_answer" in r] == [1, 2]
    run(["evaluate.py", "--ckpt", str(ckpt), "--limit", "40", "--json", f"{tmp_path}/r.json"])
    results = json.load(open(tmp_path / "r.json"))["results"]
    assert set(results) == {f"arith/{m}/{t}" for m in ("exact", "nll") for t in ("thinking", "no_thinking")} | \
        {"arith/thought_is_steps/thinking"}
    assert all(v[2] == 40 for v in results.values())
    run(["evaluate.py", "--ckpt", str(ckpt), "--html", f"{tmp_path}/t.html"])
    assert "startthought" in open(tmp_path / "t.html").read()
    out = run(["sample.py", "--ckpt", str(ckpt), "--prompt", "3+4*2-5=", "--max_new_tokens", "4"])
    assert "3+4*2-5=" in out
