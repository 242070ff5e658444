"""The tokenizer against ids and texts that sentencepiece produced (tests/make_fixtures.py)."""
import json
import os

import pytest

from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = json.load(open(os.path.join(ROOT, "tests", "fixtures", "tokenizer_cases.json")))


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(os.path.join(ROOT, "assets", "tokenizer.model"))


@pytest.mark.parametrize("case", CASES["encode"], ids=lambda c: repr(c["text"])[:30])
def test_encode_equals_sentencepiece(tok, case):
    assert tok.encode(case["text"]) == case["ids"]


def test_decode_equals_sentencepiece(tok):
    for case in CASES["decode"]:
        assert tok.decode(case["ids"]) == case["text"], case["ids"]


def test_round_trip(tok):
    for case in CASES["encode"]:
        text = case["text"].replace("\u2581", " ")  # sentencepiece cannot keep a literal '▁'
        assert tok.decode(tok.encode(text)) == text


def test_special_ids_and_batch(tok):
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.n_words) == (1, 2, 0, 32000)
    assert tok.encode("Hello", bos=True, eos=True) == [1] + tok.encode("Hello") + [2]
    assert tok.encode("", bos=True) == [1]
    texts = [c["text"] for c in CASES["encode"]]
    assert tok.encode_batch(texts, bos=True) == [tok.encode(t, bos=True) for t in texts]


def test_thought_delimiters_decode_by_name(tok):
    assert (tok.thought_start_id, tok.thought_end_id, tok.vocab_size) == (32000, 32001, 32002)
    ids = tok.encode("a b")
    assert tok.decode(ids + [32000, 28770, 32001]) == "a b<|startthought|>3<|endthought|>"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([32002])


def test_directory_path(tok):
    assert Tokenizer(os.path.join(ROOT, "assets")).encode("x y") == tok.encode("x y")


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        Tokenizer(str(tmp_path))
    not_a_model = tmp_path / "tokenizer.model"
    not_a_model.write_text('{"this is": "json, not a sentencepiece model"}')
    with pytest.raises(ValueError, match="not a SentencePiece tokenizer.model"):
        Tokenizer(str(not_a_model))
    not_a_model.write_bytes(b"")
    with pytest.raises(ValueError, match="tokenizer.model.*no pieces"):
        Tokenizer(str(not_a_model))
