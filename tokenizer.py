"""
Mistral-7B-v0.1's tokenizer, exact, on top of tiktoken.

Mistral ships a SentencePiece BPE model (`tokenizer.model`). We read that file ourselves
(it is a small protobuf) and build a tiktoken `Encoding` that produces the very same ids
as `sentencepiece.SentencePieceProcessor(model_file=...).encode(text)`, only faster.

    from tokenizer import Tokenizer
    tok = Tokenizer("assets/tokenizer.model")     # or a checkpoint directory holding one
    ids = tok.encode("Hello world", bos=True)      # [1, 22557, 1526]
    tok.decode(ids)                                # 'Hello world'

Why a translation is needed at all: SentencePiece BPE starts from Unicode characters and,
at each step, merges the adjacent pair whose concatenation is the piece with the highest
score. tiktoken starts from bytes and merges the pair with the lowest rank. So we
  1. give ranks in score order (best score = lowest rank),
  2. let every character that is a piece be assembled from its UTF-8 bytes before any
     merge between characters happens (its byte prefixes get the lowest ranks),
  3. keep a table rank -> Mistral id(s), since ranks are no longer ids; a byte sequence
     that is not a piece falls back to one `<0xNN>` id per byte, as SentencePiece does,
  4. write SentencePiece's '▁' (its visible space) as a real space, prepend the one space
     that SentencePiece's "dummy prefix" adds, and pre-split text the way SentencePiece
     splits on whitespace: a run of spaces, then the non-space characters after it.

Run this file to print a round trip: `python tokenizer.py "some text"`.
"""

import codecs
import itertools
import json
import os
import sys

import numpy as np
import tiktoken

SPACE = "\u2581"  # '▁', SentencePiece's stand-in for ' '
THOUGHT_TOKENS = {"<|startthought|>": 32000, "<|endthought|>": 32001}  # added by Quiet-STaR

# SentencePiece piece types (sentencepiece_model.proto)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


# sentencepiece shows every byte that is not part of a valid UTF-8 character as one '\ufffd'
# (Python's "replace" would show one per invalid run)
codecs.register_error("sentencepiece", lambda err: ("\ufffd", err.start + 1))


# -----------------------------------------------------------------------------
# reading tokenizer.model: a protobuf, parsed by hand

def _read_varint(buf, i):
    value, shift = 0, 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _read_fields(buf):
    """Yield (field_number, value) for one protobuf message; value is int or bytes."""
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:      # varint
            value, i = _read_varint(buf, i)
        elif wire_type == 1:    # 64-bit
            value, i = buf[i:i + 8], i + 8
        elif wire_type == 2:    # length-delimited: strings and sub-messages
            length, i = _read_varint(buf, i)
            value, i = buf[i:i + length], i + length
        elif wire_type == 5:    # 32-bit, e.g. float scores
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unknown protobuf wire type {wire_type}")
        if i > len(buf):
            raise ValueError("truncated field")
        yield field, value


def read_sentencepiece_model(path):
    """Return (pieces, options): pieces is a list of (text, score, type) in id order."""
    with open(path, "rb") as f:
        buf = f.read()
    pieces, trainer, normalizer = [], {}, {}
    try:
        for field, value in _read_fields(buf):
            if field == 1:      # ModelProto.pieces
                piece = {1: b"", 2: b"\0\0\0\0", 3: NORMAL}
                piece.update(_read_fields(value))
                score = float(np.frombuffer(piece[2], dtype="<f4")[0])
                pieces.append((piece[1].decode("utf-8"), score, piece[3]))
            elif field == 2:    # ModelProto.trainer_spec
                trainer = dict(_read_fields(value))
            elif field == 3:    # ModelProto.normalizer_spec
                normalizer = dict(_read_fields(value))
    except (ValueError, UnicodeDecodeError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: not a SentencePiece tokenizer.model ({e})") from None
    if not pieces:
        raise ValueError(f"{path}: not a SentencePiece tokenizer.model (no pieces found)")
    options = dict(
        model_type=trainer.get(3, 1),                # 1 unigram, 2 BPE
        byte_fallback=bool(trainer.get(35, 0)),
        add_dummy_prefix=bool(normalizer.get(3, 1)),
        remove_extra_whitespaces=bool(normalizer.get(4, 1)),
    )
    return pieces, options


# -----------------------------------------------------------------------------
# the translation into tiktoken ranks

def build_ranks(pieces):
    """
    Return (mergeable_ranks, rank_to_ids): tiktoken's bytes -> rank dict, and for every
    rank the Mistral ids it stands for (one id, or a few byte-fallback ids).
    """
    byte_id = {}                                        # byte value -> id of <0xNN>
    piece_id = {}                                       # piece bytes -> id
    for i, (text, score, kind) in enumerate(pieces):
        if kind == BYTE:
            byte_id[int(text[3:5], 16)] = i
        elif kind == NORMAL:
            piece_id[text.replace(SPACE, " ").encode("utf-8")] = i

    ranks, rank_to_ids = {}, []

    def add(token_bytes, ids):
        if token_bytes not in ranks:
            ranks[token_bytes] = len(rank_to_ids)
            rank_to_ids.append(ids)

    def fallback(token_bytes):                          # a piece if there is one, else bytes
        if token_bytes in piece_id:
            return [piece_id[token_bytes]]
        return [byte_id[b] for b in token_bytes]

    # 1. every single byte (tiktoken needs them all)
    for b in range(256):
        add(bytes([b]), fallback(bytes([b])))
    # 2. every character that is a piece, and its byte prefixes, before any real merge
    for i, (text, score, kind) in enumerate(pieces):
        if kind == NORMAL and len(text) == 1:
            token_bytes = text.replace(SPACE, " ").encode("utf-8")
            for end in range(2, len(token_bytes) + 1):
                add(token_bytes[:end], fallback(token_bytes[:end]))
    # 3. multi-character pieces, best score first (ties: lower id first)
    merges = [(-score, i) for i, (text, score, kind) in enumerate(pieces)
              if kind == NORMAL and len(text) > 1]
    for _, i in sorted(merges):
        add(pieces[i][0].replace(SPACE, " ").encode("utf-8"), [i])
    return ranks, rank_to_ids


class Tokenizer:
    """Mistral-7B-v0.1's SentencePiece tokenizer, reproduced exactly on tiktoken."""

    def __init__(self, path):
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.model")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        self.path = path
        pieces, options = read_sentencepiece_model(path)
        if options["model_type"] != 2 or not options["byte_fallback"]:
            raise ValueError(f"{path}: expected a BPE tokenizer with byte fallback (like "
                             f"Mistral-7B's), got model_type={options['model_type']}, "
                             f"byte_fallback={options['byte_fallback']}")
        if not options["add_dummy_prefix"] or options["remove_extra_whitespaces"]:
            raise ValueError(f"{path}: unsupported normalizer (expected add_dummy_prefix "
                             f"and no whitespace removal, as in Mistral-7B's tokenizer)")
        kinds = [kind for _, _, kind in pieces]
        self.n_words = len(pieces)
        self.unk_id = kinds.index(UNKNOWN)
        self.bos_id = next(i for i, p in enumerate(pieces) if p[0] == "<s>")
        self.eos_id = next(i for i, p in enumerate(pieces) if p[0] == "</s>")
        self.thought_start_id = THOUGHT_TOKENS["<|startthought|>"]
        self.thought_end_id = THOUGHT_TOKENS["<|endthought|>"]

        ranks, rank_to_ids = build_ranks(pieces)
        self.encoding = tiktoken.Encoding(
            name=f"sentencepiece:{os.path.basename(path)}",
            pat_str=r" +[^ ]*",                        # a run of spaces, then one word
            mergeable_ranks=ranks,
            special_tokens={},
        )
        # rank -> id as one flat array, plus the few ranks that stand for several ids
        self._rank_to_id = np.array([ids[0] if len(ids) == 1 else -1 for ids in rank_to_ids])
        self._rank_to_many = {r: ids for r, ids in enumerate(rank_to_ids) if len(ids) > 1}

        # decoding: the bytes each id stands for
        self._id_bytes = []
        self._is_byte = [kind == BYTE for _, _, kind in pieces] + [False, False]
        self._control_ids = {i for i, (_, _, kind) in enumerate(pieces) if kind == CONTROL}
        self._is_word_start = [kind == NORMAL and text.startswith(SPACE)
                               for text, _, kind in pieces] + [False, False]
        for text, _, kind in pieces:
            if kind == BYTE:
                self._id_bytes.append(bytes([int(text[3:5], 16)]))
            elif kind == NORMAL:
                self._id_bytes.append(text.replace(SPACE, " ").encode("utf-8"))
            elif kind == UNKNOWN:
                self._id_bytes.append(" \u2047 ".encode("utf-8"))  # what sentencepiece shows
            else:
                self._id_bytes.append(b"")             # control tokens: <s>, </s>
        for name in THOUGHT_TOKENS:                     # shown by name, for reading thoughts
            self._id_bytes.append(name.encode("utf-8"))

    @property
    def vocab_size(self):
        """Ids the tokenizer can decode: the 32000 pieces plus the 2 thought delimiters."""
        return len(self._id_bytes)

    def _ranks_to_ids(self, ranks):
        ranks = np.asarray(ranks, dtype=np.int64)
        ids = self._rank_to_id[ranks]
        if (ids >= 0).all():                            # the common case: one id per rank
            return ids.tolist()
        out = []
        for rank, i in zip(ranks.tolist(), ids.tolist()):
            out.extend(self._rank_to_many[rank] if i < 0 else [i])
        return out

    @staticmethod
    def _normalize(text):
        # SentencePiece cannot tell a literal '▁' from a space, and adds one leading space
        return " " + text.replace(SPACE, " ")

    def encode(self, text, bos=False, eos=False):
        """Text -> list of ids, equal to sentencepiece's encode (plus BOS/EOS if asked)."""
        ids = self._ranks_to_ids(self.encoding.encode_ordinary(self._normalize(text))) \
            if text else []
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_batch(self, texts, bos=False, eos=False, num_threads=8):
        """Many texts at once (tiktoken encodes them on several threads)."""
        batch = self.encoding.encode_ordinary_batch(
            [self._normalize(t) for t in texts], num_threads=num_threads)
        return [[self.bos_id] * bos + (self._ranks_to_ids(r) if t else []) + [self.eos_id] * eos
                for t, r in zip(texts, batch)]

    def decode(self, ids):
        """List of ids -> text, equal to sentencepiece's decode."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if ids and not (0 <= min(ids) and max(ids) < len(self._id_bytes)):
            bad = [i for i in ids if not 0 <= i < len(self._id_bytes)]
            raise ValueError(f"decode: ids {bad[:5]} are outside the vocabulary "
                             f"(0..{len(self._id_bytes) - 1})")
        # control ids (<s>, </s>) show nothing; strip them from both ends
        controls = self._control_ids.intersection(ids)
        first, last = 0, len(ids)
        while first < last and ids[first] in controls:
            first += 1
        while last > first and ids[last - 1] in controls:
            last -= 1
        if first == last:
            return ""
        ids = ids[first:last]
        if not any(c in ids for c in controls):         # the usual case: one join, one decode
            text = b"".join(map(self._id_bytes.__getitem__, ids)).decode("utf-8", "sentencepiece")
        else:
            # byte pieces join into characters only within a run of byte pieces, and a
            # control id between two byte pieces ends the run
            text = "".join(
                b"".join(map(self._id_bytes.__getitem__, run)).decode("utf-8", "sentencepiece")
                for _, run in itertools.groupby(ids, key=self._is_byte.__getitem__))
        # sentencepiece drops the dummy-prefix space only when the first piece that shows
        # anything is a word start like '▁the' (not a byte <0x20>, not <unk>)
        return text[1:] if self._is_word_start[ids[0]] else text

    def id_to_piece(self, i):
        """The text one id stands for, for display ('▁' shown as a space)."""
        return self._id_bytes[i].decode("utf-8", errors="replace")



# -----------------------------------------------------------------------------
# a compact vocabulary of single symbols (nanoGPT's shakespeare_char), stored as vocab.json

class CharTokenizer:
    """One id per symbol, read from a vocab.json {"symbols": [...]} that a dataset writes and
    every checkpoint trained on it carries. Ids 0, 1, 2 are <unk>, BOS, EOS, as in Mistral's;
    the two thought delimiters come after the symbols, so they stay the last two ids."""

    def __init__(self, symbols):
        if list(symbols[:3]) != ["<unk>", "<s>", "</s>"] or len(set(symbols)) != len(symbols) \
                or any(len(s) != 1 for s in symbols[3:]):
            raise ValueError("vocabulary: expected '<unk>', '<s>', '</s>', then distinct single "
                             f"characters, got {symbols[:8]}...")
        self.symbols = list(symbols)
        self.path = "vocab.json"
        self.n_words = len(symbols)
        self.unk_id, self.bos_id, self.eos_id = 0, 1, 2
        self.thought_start_id, self.thought_end_id = self.n_words, self.n_words + 1
        self._id_text = [""] * 3 + self.symbols[3:] + list(THOUGHT_TOKENS)
        self._ids = {s: i for i, s in enumerate(self.symbols) if i >= 3}

    @classmethod
    def from_file(cls, path):
        if os.path.isdir(path):
            path = os.path.join(path, "vocab.json")
        with open(path) as f:
            tok = cls(json.load(f)["symbols"])
        tok.path = path
        return tok

    def save(self, directory):
        """directory/vocab.json, whole or not at all (a run reading it meanwhile sees the old one)."""
        tmp = os.path.join(directory, f"vocab.json.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump({"symbols": self.symbols}, f)
        os.replace(tmp, os.path.join(directory, "vocab.json"))

    @property
    def vocab_size(self):
        """Ids the tokenizer can decode: the symbols plus the 2 thought delimiters."""
        return len(self._id_text)

    def encode(self, text, bos=False, eos=False):
        unknown = sorted(set(text) - set(self._ids))
        if unknown:
            raise ValueError(f"encode: {unknown[:5]} not in the vocabulary ({''.join(self.symbols[3:])})")
        return [self.bos_id] * bos + [self._ids[c] for c in text] + [self.eos_id] * eos

    def encode_batch(self, texts, bos=False, eos=False, num_threads=0):
        return [self.encode(t, bos, eos) for t in texts]

    def decode(self, ids):
        """Ids -> text; <unk>, BOS and EOS show nothing, the delimiters show their names."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        bad = [i for i in ids if not 0 <= i < len(self._id_text)]
        if bad:
            raise ValueError(f"decode: ids {bad[:5]} are outside the vocabulary (0..{len(self._id_text) - 1})")
        return "".join(self._id_text[i] for i in ids)

    def id_to_piece(self, i):
        return self._id_text[i] or self.symbols[i]


VENDORED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tokenizer.model")


def load_tokenizer(ckpt_dir=None):
    """The one place every tool gets its tokenizer: a checkpoint or data directory's
    vocab.json (a compact vocabulary, see CharTokenizer), else its own tokenizer.model
    (train.py copies the one it used into every checkpoint), else the Mistral-7B-v0.1
    tokenizer shipped in assets/ (also for ckpt_dir None). A path to a file is read as it is."""
    if ckpt_dir is None:
        return Tokenizer(VENDORED)
    if os.path.isfile(ckpt_dir):
        return CharTokenizer.from_file(ckpt_dir) if ckpt_dir.endswith(".json") else Tokenizer(ckpt_dir)
    if os.path.isfile(os.path.join(ckpt_dir, "vocab.json")):
        return CharTokenizer.from_file(ckpt_dir)
    own = os.path.join(ckpt_dir, "tokenizer.model")
    return Tokenizer(own if os.path.isfile(own) else VENDORED)


def check_vocabulary(tokenizer, model_vocab_size, ckpt):
    """A model must have a row for every id the tokenizer can produce."""
    if model_vocab_size < tokenizer.n_words:
        raise ValueError(f"{ckpt}: vocabulary mismatch: the model has {model_vocab_size} tokens, "
                         f"its tokenizer {tokenizer.path} has {tokenizer.n_words}")


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    tok = Tokenizer(os.path.join(here, "assets", "tokenizer.model"))
    text = " ".join(sys.argv[1:]) or "Quiet-STaR: language models can think before speaking."
    ids = tok.encode(text, bos=True)
    print(ids)
    print([tok.id_to_piece(i) for i in ids])
    print(repr(tok.decode(ids)))
