"""Tokenizer wrappers, streaming detokenization (no split UTF-8 characters, no lost spaces) and stop strings.

The Hugging Face tokenizers are trained here on a few KB of mixed-script text, so nothing is downloaded."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from twotower.cluster.engine.tokenizer import (
    ByteTokenizer,
    IncrementalDetokenizer,
    Tokenizer,
    TokenizerLike,
    find_stop,
    stop_holdback,
)

FFFD = "\ufffd"

WORDS = ["the", "model", "serving", "token", "stream", "hello", "world", "of", "a", "block", "diffusion"]
ACCENTED = ["café", "naïve", "Ångström", "straße", "über", "déjà", "façade", "señor", "Øre"]
CJK = ["你好", "世界", "日本語", "中文字符", "한국어", "東京", "漢字"]
EMOJI = ["😀", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "🚀", "❤️", "🎉"]
COMBINING = ["e\u0301", "a\u0308\u0301", "n\u0303", "o\u0328\u0304"]
RARE = ["𝄞", "𓀀", "🦀", "ꙮ", "\u00a0", "€"]  # absent from the corpus: split into raw byte tokens
SPACES = [" ", " ", " ", "  ", "\n", "\n\n", "\t", " \n "]
PIECES = WORDS * 3 + ACCENTED + CJK + EMOJI + COMBINING + RARE + [",", ".", "!", "?"]


def _random_text(rng: random.Random, n: int) -> str:
    parts = []
    for _ in range(n):
        if rng.random() < 0.5:
            parts.append(rng.choice(SPACES))
        parts.append(rng.choice(PIECES))
    return "".join(parts)


def _corpus() -> list[str]:
    rng = random.Random(1)
    rare = set(RARE)
    lines = []
    for _ in range(120):
        words = [p for p in (rng.choice(PIECES) for _ in range(8)) if p not in rare]
        lines.append(" ".join(words))
    assert sum(len(x.encode()) for x in lines) > 4000
    return lines


def _texts(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    fixed = ["", " leading space", "  two leading", "\nnewline first", "trailing\n", "😀", "a😀b", "你好 世界"]
    return fixed + [_random_text(rng, rng.randint(1, 30)) for _ in range(count)]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Tokenizer:
    """GPT-2 style byte-level BPE: merges inside multi-byte characters make tokens end mid-character."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(_corpus(), trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    hf.save(str(path))
    return Tokenizer.from_file(path)


@pytest.fixture(scope="module")
def metaspace(tmp_path_factory) -> Tokenizer:
    """SentencePiece style: a lone "▁world" decodes to "world", losing its space without left context."""
    hf = HFTokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    hf.train_from_iterator(_corpus(), trainer)
    path = tmp_path_factory.mktemp("metaspace") / "tokenizer.json"
    hf.save(str(path))
    return Tokenizer.from_file(path)


def _stream(tok, ids, chunk_sizes=None, prompt=None) -> tuple[list[str], str]:
    det = IncrementalDetokenizer(tok, prompt)
    deltas, i = [], 0
    while i < len(ids):
        n = 1 if chunk_sizes is None else next(chunk_sizes)
        deltas.append(det.push(ids[i : i + n]))
        i += n
    tail = det.flush()
    assert det.text == "".join(deltas) + tail
    assert det.output_ids == list(ids)
    return deltas, tail


# --- Tokenizer / ByteTokenizer -------------------------------------------------------------------------------


def test_both_satisfy_the_protocol(bpe):
    assert isinstance(bpe, TokenizerLike) and isinstance(ByteTokenizer(), TokenizerLike)


def test_bpe_round_trip_and_special_ids(bpe):
    assert 300 <= bpe.vocab_size <= 360
    for text in _texts(seed=2, count=50):
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text
        assert bpe.bos_token_id not in ids  # the post-processor adds nothing by itself
    assert (bpe.pad_token_id, bpe.bos_token_id, bpe.eos_token_id) == (0, 1, 2)
    assert bpe.id_to_token(1) == "<s>" and bpe.token_to_id("</s>") == 2
    ids = bpe.encode("hello", add_bos=True)
    assert ids[0] == 1 and ids[1:] == bpe.encode("hello")
    assert bpe.decode(ids) == "hello"
    assert bpe.decode(ids, skip_special_tokens=False) == "<s>hello"


def test_special_ids_from_tokenizer_config(bpe, tmp_path):
    hf = HFTokenizer.from_file(bpe.path)
    hf.add_special_tokens(["<|endoftext|>", "<|im_end|>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    plain = Tokenizer.from_dir(tmp_path)
    assert plain.eos_token_id == bpe.eos_token_id  # "</s>" comes before "<|endoftext|>" among common names
    config = {"eos_token": {"content": "<|im_end|>", "special": True}, "bos_token": None, "pad_token": "<nope>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.eos_token_id == hf.token_to_id("<|im_end|>")
    assert tok.bos_token_id == 1 and tok.pad_token_id == 0  # null / unknown names fall back to common names


def test_unknown_special_ids_are_none(tmp_path):
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=260, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["plain text"], trainer)
    tok = Tokenizer(hf)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (None, None, None)
    with pytest.raises(ValueError, match="BOS"):
        tok.encode("x", add_bos=True)


def test_missing_or_bad_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Tokenizer.from_file(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_byte_tokenizer():
    tok = ByteTokenizer()
    assert tok.vocab_size == 260 and (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.encode("A") == [65 + 4] and tok.encode("😀") == [b + 4 for b in "😀".encode()]
    assert len(tok.encode("😀")) == 4
    ids = tok.encode("hé😀", add_bos=True) + [2]
    assert ids[0] == 1
    assert tok.decode(ids) == "hé😀"
    assert tok.decode(ids, skip_special_tokens=False) == "<s>hé😀</s>"
    assert tok.decode(tok.encode("😀")[:2]) == FFFD
    assert tok.id_to_token(3) == "<mask>" and tok.id_to_token(4 + 0x41) == "<0x41>" and tok.id_to_token(260) is None
    assert tok.token_to_id("<0x41>") == 4 + 0x41 and tok.token_to_id("</s>") == 2 and tok.token_to_id("x") is None
    big = ByteTokenizer(vocab_size=300)
    assert big.decode([300 - 1, 4 + 0x41]) == "A"
    assert big.decode([299], skip_special_tokens=False) == "<extra_299>" and big.token_to_id("<extra_299>") == 299
    with pytest.raises(ValueError):
        tok.decode([260])
    with pytest.raises(ValueError):
        ByteTokenizer(vocab_size=100)


# --- IncrementalDetokenizer --------------------------------------------------------------------------------


def test_bpe_stream_never_splits_a_character(bpe):
    rng = random.Random(3)
    split_seen = False
    for text in _texts(seed=4, count=150):
        ids = bpe.encode(text)
        split_seen |= any(FFFD in bpe.decode([i]) for i in ids)
        for chunks in (None, iter(lambda: rng.randint(1, 4), None)):
            deltas, tail = _stream(bpe, ids, chunks)
            assert not any(FFFD in d for d in deltas) and FFFD not in tail
            assert "".join(deltas) + tail == bpe.decode(ids) == text
            assert tail == ""  # valid text: everything was finalised by the last push
    assert split_seen  # the corpus does make tokens that end mid-character


def test_byte_tokenizer_stream_holds_partial_characters():
    tok = ByteTokenizer()
    det = IncrementalDetokenizer(tok)
    ids = tok.encode("a😀")
    assert det.push(ids[:1]) == "a"
    assert [det.push([i]) for i in ids[1:]] == ["", "", "", "😀"]
    for text in _texts(seed=5, count=100):
        ids = tok.encode(text)
        deltas, tail = _stream(tok, ids)
        assert not any(FFFD in d for d in deltas) and tail == ""
        assert "".join(deltas) == text


def test_flush_returns_an_incomplete_tail():
    tok = ByteTokenizer()
    det = IncrementalDetokenizer(tok)
    assert det.push(tok.encode("ok") + tok.encode("😀")[:2]) == ""  # the whole push waits for the character
    assert det.flush() == "ok" + FFFD
    assert det.flush() == ""


def test_random_bytes_stream_matches_full_decode():
    # Not valid UTF-8 (a random-weight model): deltas may contain U+FFFD, but the text is still decode(all).
    tok = ByteTokenizer()
    rng = random.Random(6)
    for _ in range(100):
        ids = [rng.randrange(4, 260) for _ in range(rng.randint(1, 40))]
        deltas, tail = _stream(tok, ids)
        assert "".join(deltas) + tail == tok.decode(ids)


def test_special_tokens_in_stream(bpe):
    ids = bpe.encode("hi 😀") + [bpe.eos_token_id]
    assert "".join(_stream(bpe, ids)[0]) == "hi 😀"
    det = IncrementalDetokenizer(bpe, skip_special_tokens=False)
    assert "".join(det.push([i]) for i in ids) + det.flush() == "hi 😀</s>"


def test_metaspace_keeps_spaces_between_tokens(metaspace):
    text = "hello world of the model"
    ids = metaspace.encode(text)
    assert "".join(metaspace.decode([i]) for i in ids) != text  # naive per-token decoding loses the spaces
    deltas, tail = _stream(metaspace, ids)
    assert "".join(deltas) + tail == metaspace.decode(ids) == text
    for t in _texts(seed=7, count=60):
        t = "".join(c for c in t if c.isascii())  # this tokenizer has no byte fallback; stay in its alphabet
        ids = metaspace.encode(t)
        assert "".join(_stream(metaspace, ids)[0]) == metaspace.decode(ids)


def test_prompt_is_left_context(metaspace, bpe):
    prompt, out = metaspace.encode("hello"), metaspace.encode("world of")
    det = IncrementalDetokenizer(metaspace, prompt)
    assert "".join(det.push([i]) for i in out) + det.flush() == " world of"  # the space belongs to the output
    rng = random.Random(8)
    for _ in range(40):
        p, o = _random_text(rng, 5), _random_text(rng, 10)
        pids, oids = bpe.encode(p), bpe.encode(o)
        deltas, tail = _stream(bpe, oids, prompt=pids)
        assert "".join(deltas) + tail == bpe.decode(pids + oids)[len(bpe.decode(pids)) :]


def test_prompt_ending_mid_character_resumes():
    tok = ByteTokenizer()
    ids = tok.encode("hi 😀!")
    det = IncrementalDetokenizer(tok, ids[:5])  # "hi " + two of the emoji's four bytes
    assert det.push(ids[5:6]) == ""
    assert det.push(ids[6:7]) == "😀"
    assert det.push(ids[7:]) == "!"


# --- stop strings --------------------------------------------------------------------------------------


def test_find_stop():
    assert find_stop("hello world", []) is None
    assert find_stop("hello world", ["", "xyz"]) is None  # empty stops are ignored
    assert find_stop("hello world", ["world", "o"]) == 4  # earliest start wins
    assert find_stop("hello world", ["lo w", "world"]) == 3
    # "###" spans the previous text (8 chars checked) and the new delta:
    assert find_stop("answer #" + "##", ["###"], start=8) == 7
    assert find_stop("a ### b ###", ["###"], start=9) == 8  # one entirely before `start` was already handled
    assert find_stop("abc", ["abc"], start=3) is None  # nothing new to check
    assert find_stop("abcabc", ["abc", "ca"], start=3) == 2  # "ca" at 2 overlaps the new text "abc"
    assert find_stop("abcabc", ["abc", "ca"], start=4) == 3  # ... but not "bc"


def test_stop_holdback():
    assert stop_holdback("hello", []) == 0
    assert stop_holdback("hello ##", ["###"]) == 2
    assert stop_holdback("hello #", ["###", "#END"]) == 1
    assert stop_holdback("hello #E", ["###", "#END"]) == 2
    assert stop_holdback("hello ###", ["####"]) == 3
    assert stop_holdback("hello ###", ["###"]) == 2  # "##" could start another "###"; the full one is find_stop's
    assert stop_holdback("hello #!", ["###"]) == 0
    assert stop_holdback("ab", ["abcdef"]) == 2  # the whole text may be held
    assert stop_holdback("xaab", ["aab!", "b?"]) == 3
    assert stop_holdback("", ["a"]) == 0
    assert stop_holdback("😀", ["😀!"]) == 1


def test_engine_style_stop_handling():
    tok = ByteTokenizer()
    stops = ["<END>", "😀😀"]
    for text, expect in [
        ("one two <EN no <END> after", "one two <EN no "),
        ("emoji 😀 then 😀😀 tail", "emoji 😀 then "),
        ("no stop at all <E", "no stop at all <E"),
    ]:
        det, streamed, result = IncrementalDetokenizer(tok), 0, None
        for i in tok.encode(text):
            start = len(det.text)
            det.push([i])
            cut = find_stop(det.text, stops, start)
            if cut is not None:
                result = det.text[:cut]
                break
            safe = len(det.text) - det.holdback(stops)
            assert safe >= streamed  # streamed text is never taken back
            streamed = safe
        if result is None:
            det.flush()
            result = det.text
        assert result == expect and streamed <= len(expect)  # nothing of a stop string was streamed
