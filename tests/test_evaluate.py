"""evaluate.py: the paper's metric on hand-made logits, answers, prompts, batching, HTML, errors."""
import json
import math
import os
import subprocess
import sys
from html.parser import HTMLParser
from types import SimpleNamespace

import pytest
import torch

import evaluate as ev
from model import ModelArgs, Transformer
from quietstar import QuietStar, QuietStarConfig
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
TOK = Tokenizer(os.path.join(ROOT, "assets", "tokenizer.model"))


def peaked_logits(ids, choice_probs):
    """Logits (T, 32002): at position j the distribution choice_probs[j] (dict token -> p),
    plus a large mass on token 500 (outside every answer alphabet) everywhere."""
    logits = torch.full((len(ids), 32002), -30.0)
    logits[:, 500] = 5.0
    for j, probs in choice_probs.items():
        for token, p in probs.items():
            logits[j, token] = math.log(p) + 10.0
    return logits


def test_paper_metric_gsm8k_by_hand():
    prompt = "Q: How many?\nA: 72\n"
    ids = TOK.encode(prompt, bos=True)
    i = ev.answer_start(ids)
    assert ids[i - 2:i + 1] == [13, 28741, 28747] and ids[i + 1] == 28705   # ':' then standalone '▁'
    seven, two, newline = 28787, 28750, 13
    # position i predicts the '▁' (skipped); i+1 predicts '7'; i+2 '2'; i+3 the newline
    logits = peaked_logits(ids, {i + 1: {seven: 0.6, two: 0.2}, i + 2: {two: 0.5, seven: 0.5},
                                 i + 3: {newline: 0.9, seven: 0.1}})
    expected = (0.6 / 0.8) * 0.5 * 0.9       # renormalised over digits + newline; token 500 ignored
    assert ev.paper_answer_probability(ids, logits, numeric=True) == pytest.approx(expected, rel=1e-4)


def test_paper_metric_skips_tokens_outside_the_alphabet_and_csqa():
    prompt = "Q: Big?\nA: 1,000\n"
    ids = TOK.encode(prompt, bos=True)
    i = ev.answer_start(ids)
    comma = ids.index(28725)
    logits = peaked_logits(ids, {j: {ids[j + 1]: 0.5, 28734 if ids[j + 1] != 28734 else 28740: 0.5}
                                 for j in range(i + 1, len(ids) - 1) if j + 1 != comma})
    # '1', '0', '0', '0', '\n' each at 1/2; the comma is not scored
    assert ev.paper_answer_probability(ids, logits, numeric=True) == pytest.approx(0.5 ** 5, rel=1e-4)
    csqa = "Q: Where?\n(A) bank\n(B) mall\nA: B\n"
    ids = TOK.encode(csqa, bos=True)
    i = ev.answer_start(ids)
    assert ids[i + 1] == 365                                                    # ' B', no skip
    logits = peaked_logits(ids, {i: {365: 0.3, 330: 0.7}, i + 1: {13: 1.0}})
    assert ev.paper_answer_probability(ids, logits, numeric=False) == pytest.approx(0.3, rel=1e-4)


def test_numeric_detection_keeps_the_official_quirk():
    assert ev.is_numeric_answer("Q: x\nA: 72\n") and not ev.is_numeric_answer("Q: x\nA: B\n")
    # the official code: a negative answer is not "numeric", so it is scored against the
    # letters A-E + newline, where only its closing newline is in the alphabet
    prompt = "Q: x\nA: -3\n"
    assert not ev.is_numeric_answer(prompt)
    ids = TOK.encode(prompt, bos=True)
    uniform = torch.zeros(len(ids), 32002)
    assert ev.paper_answer_probability(ids, uniform, numeric=False) == pytest.approx(1 / 6)


def test_answer_start_equals_the_official_decode_search():
    """The official search decodes shorter and shorter prefixes until the last '\\nA:' is gone."""
    for task in ("gsm8k", "csqa"):
        for ex in ev.load_examples(task, os.path.join(ROOT, "data"))[:25]:
            ids = TOK.encode(ev.scored_prompt(task, ex), bos=True)
            count = TOK.decode(ids).count("\nA:")
            i = next(i for i in range(len(ids) - 1, 0, -1) if TOK.decode(ids[:i]).count("\nA:") < count)
            assert ev.answer_start(ids) == i


def test_answer_extraction():
    n = ev.normalize_number
    assert n(" 1,000") == "1000" and n("-3 apples") == "-3" and n("18.00") == "18"
    assert n("3.5 hours") == "3.5" and n("$1,234.50") == "1234.5" and n("no number") is None
    assert ev.extract_answer("gsm8k", " The answer is 42.") == "42"
    assert ev.extract_answer("csqa", " (B) library") == "B" and ev.extract_answer("csqa", " none") is None


def test_prompts_on_vendored_examples():
    data = os.path.join(ROOT, "data")
    gsm = ev.load_examples("gsm8k", data)
    csqa = ev.load_examples("csqa", data)
    assert len(gsm) == 1319 and len(csqa) == 1221
    assert ev.scored_prompt("gsm8k", gsm[0]) == "Q: " + gsm[0]["question"] + "\nA: 18\n"
    assert ev.gold("gsm8k", gsm[0]) == "18"
    expected = ("Q: A revolving door is convenient for two direction travel, but it also serves as a "
                "security measure at a what?\n(A) bank\n(B) library\n(C) department store\n(D) mall\n"
                "(E) new york\nA: A\n")
    assert ev.scored_prompt("csqa", csqa[0]) == expected
    # the Hugging Face schema gives the same example
    hf = {"question": csqa[0]["question"], "answerKey": "A",
          "choices": {"label": [c[0] for c in csqa[0]["choices"]], "text": [c[1] for c in csqa[0]["choices"]]}}
    assert ev.parse_example("csqa", hf) == csqa[0]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A small random Quiet-STaR model over Mistral's vocabulary, saved as train.py would."""
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64, vocab_size=32002)
    qs = QuietStar(Transformer(args), QuietStarConfig(n_thought_tokens=2))
    qs.init_thought_parameters()
    with torch.no_grad():
        qs.mixing_head[4].weight.normal_(std=0.5)
    path = str(tmp_path_factory.mktemp("ckpt"))
    qs.save_pretrained(path)
    return path


def settings(ckpt, **kw):
    base = dict(ckpt=ckpt, think="auto", n_thought_tokens=0, device="cpu", dtype="float32", seed=42,
                batch_size=8, max_length=256, answer_tokens=6)
    return SimpleNamespace(**{**base, **kw})


def test_batch_size_does_not_change_results(tiny_checkpoint):
    qs, modes = ev.load_for_eval(settings(tiny_checkpoint))
    assert modes == [False, True]
    examples = ev.load_examples("gsm8k", os.path.join(ROOT, "data"))[:6]
    for think in (False, True):
        one = ev.paper_metric(qs, TOK, "gsm8k", examples, settings(tiny_checkpoint, batch_size=1), think)
        six = ev.paper_metric(qs, TOK, "gsm8k", examples, settings(tiny_checkpoint, batch_size=6), think)
        assert one[0] == pytest.approx(six[0], rel=1e-5) and one[2] == six[2] == 6
        a = ev.exact_match(qs, TOK, "csqa", ev.load_examples("csqa", os.path.join(ROOT, "data"))[:4],
                           settings(tiny_checkpoint, batch_size=1), think)
        b = ev.exact_match(qs, TOK, "csqa", ev.load_examples("csqa", os.path.join(ROOT, "data"))[:4],
                           settings(tiny_checkpoint, batch_size=4), think)
        assert a == b


class Checker(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.text, self.titles = [], "", []

    def handle_starttag(self, tag, attrs):
        if tag not in ("meta", "br"):
            self.stack.append(tag)
        self.titles += [v for k, v in attrs if k == "title"]

    def handle_endtag(self, tag):
        assert self.stack.pop() == tag

    def handle_data(self, data):
        self.text += data


def test_html_is_well_formed_and_holds_every_token(tiny_checkpoint):
    qs, _ = ev.load_for_eval(settings(tiny_checkpoint))
    text = "Q: 3 < 4 & 5 > 2?\nA: yes"
    page = ev.thinking_html(qs, TOK, text)
    checker = Checker()
    checker.feed(page)
    assert checker.stack == [] and "http" not in page.split("<body>")[1]      # no external assets
    assert text.replace("\n", "⏎") in checker.text
    ids = TOK.encode(text, bos=True)
    assert len(checker.titles) == len(ids) - 1 and all("thought:" in t for t in checker.titles)


def test_checkpoint_layouts_and_errors(tiny_checkpoint, tmp_path):
    assert ev.has_quietstar_parts(tiny_checkpoint)
    assert ev.has_quietstar_parts(os.path.join(FIXTURES, "quietstar_tiny"))           # released layout
    # plain Mistral checkpoints (Mistral's vocabulary) in both layouts
    torch.manual_seed(1)
    plain_model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8,
                                        hidden_dim=64, vocab_size=32000))
    plain_model.save_pretrained(str(tmp_path / "hf"))
    (tmp_path / "mistral").mkdir()
    from safetensors.torch import save_file
    save_file(plain_model.state_dict(), str(tmp_path / "mistral" / "consolidated.safetensors"))
    (tmp_path / "mistral" / "params.json").write_text(json.dumps(dict(
        dim=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64, vocab_size=32000,
        norm_eps=1e-5, sliding_window=4096)))
    for path in (str(tmp_path / "hf"), str(tmp_path / "mistral")):
        assert not ev.has_quietstar_parts(path)
        qs, modes = ev.load_for_eval(settings(path))
        assert modes == [False] and qs.model.args.vocab_size == 32002
        with pytest.raises(SystemExit, match="no Quiet-STaR parts"):
            ev.load_for_eval(settings(path, think="yes"))
    with pytest.raises(ValueError, match="delimiter_init_id=11940 is not a token of this model's 300"):
        ev.load_for_eval(settings(os.path.join(FIXTURES, "mistral_tiny_hf")))       # not Mistral's vocabulary
    with pytest.raises(FileNotFoundError, match="gsm8k/test.jsonl: gsm8k data file not found"):
        ev.load_examples("gsm8k", str(tmp_path))
    (tmp_path / "csqa").mkdir()
    (tmp_path / "csqa" / "dev_rand_split.jsonl").write_text('{"nothing": 1}\n')
    with pytest.raises(ValueError, match="dev_rand_split.jsonl:1: not a csqa record"):
        ev.load_examples("csqa", str(tmp_path))


def test_command_line_end_to_end(tiny_checkpoint, tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--ckpt", tiny_checkpoint,
                           "--tasks", "gsm8k,csqa", "--limit", "3", "--cot_samples", "2", "--cot_tokens", "6",
                           "--cot_limit", "2", "--ppl_docs", "3", "--max_length", "64", "--device", "cpu",
                           "--dtype", "float32", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.load(open(out))["results"]
    for key in ("gsm8k/paper/thinking", "gsm8k/paper/no_thinking", "csqa/exact/thinking",
                "gsm8k/cot/no_thinking", "math/gain_all", "math/ppl_base"):
        assert key in results, key
    assert results["gsm8k/paper/thinking"][2] == 3 and "expected probability" in done.stdout
    assert results["gsm8k/cot/thinking"][2] == 2                                 # --cot_limit 2
    for label in ("gsm8k paper thinking: 3/3", "csqa exact no thinking: 3/3", "gsm8k cot thinking: 4/4",
                  "held-out perplexity: 3/3"):                                    # progress with ETA
        assert label in done.stderr, done.stderr[-2000:]
    assert "eta" in done.stderr


def test_html_page_shows_a_summary_a_note_and_every_thought_without_hovering(tiny_checkpoint):
    qs, _ = ev.load_for_eval(settings(tiny_checkpoint))
    text = "Q: What is 12 * 7?\nA: 84"
    page = ev.thinking_html(qs, TOK, text, note=ev.model_note(qs, tiny_checkpoint))
    n = len(TOK.encode(text, bos=True)) - 1
    assert f"<b>{n}</b> tokens" in page and "mean change from thinking" in page and "helped" in page
    assert "mixing weight w from" in page and f"Model: {tiny_checkpoint}" in page
    assert page.count('<td class="th">') == n                  # every thought in the page's text


def test_cot_stops_at_its_stop_strings(tiny_checkpoint):
    qs, _ = ev.load_for_eval(settings(tiny_checkpoint))
    ids = TOK.encode("Q: 2+3?\nA: Let's think step by step.", bos=True)
    first = ev.generate_until(qs, TOK, ids, 8, False, 5, 0, stops=(), chunk=8)
    stop = first.strip()[:3]
    assert len(stop) == 3
    chunks, real = [], qs.generate
    qs.generate = lambda prompts, n, **kw: chunks.append(n) or real(prompts, n, **kw)
    try:
        text = ev.generate_until(qs, TOK, ids, 64, False, 5, 0, stops=(stop,), chunk=8)
    finally:
        del qs.generate
    assert chunks == [8] and stop not in text                  # one chunk, not 64 tokens


def test_arguments_are_checked_before_any_work(monkeypatch, tmp_path):
    for argv, message in ((["--json", str(tmp_path / "no" / "r.json")], "--json .*: cannot write there"),
                          (["--limit", "-5"], "--limit: must be >= 0, got -5"),
                          (["--tasks", "gsm8k,mmlu"], "unknown task 'mmlu'"),
                          (["--metrics", "paper,bleu"], "unknown metric 'bleu'")):
        monkeypatch.setattr(sys, "argv", ["evaluate.py", "--ckpt", "anything"] + argv)
        with pytest.raises(SystemExit, match=message):
            ev.parse_args()
