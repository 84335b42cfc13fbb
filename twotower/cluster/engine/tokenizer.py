"""Tokenizers and streaming detokenization for the serving engine.

`Tokenizer` wraps a Hugging Face `tokenizers.Tokenizer` read from a `tokenizer.json`; `ByteTokenizer` is a
file-less byte-level fallback with the same interface (tests, random-weight models). `IncrementalDetokenizer`
turns a token stream into text deltas that never split a UTF-8 character, and `find_stop` / `stop_holdback`
let an engine cut output at stop strings without streaming text that may turn out to be part of one.

Streaming with stop strings, per step:

    start = len(det.text)
    det.push(new_ids)
    cut = find_stop(det.text, stops, start)
    if cut is not None:             # finished: the output is det.text[:cut]
        ...
    else:                           # safe to stream up to len(det.text) - det.holdback(stops)
        ...
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tokenizers import Tokenizer as HFTokenizer

REPLACEMENT_CHAR = "\ufffd"

# Common spellings of the special tokens, tried in order when tokenizer_config.json does not name them.
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")


@runtime_checkable
class TokenizerLike(Protocol):
    """What the engine and `IncrementalDetokenizer` need from a tokenizer."""

    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def id_to_token(self, i: int) -> str | None: ...

    def token_to_id(self, token: str) -> int | None: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_token_id(self) -> int | None: ...

    @property
    def eos_token_id(self) -> int | None: ...

    @property
    def pad_token_id(self) -> int | None: ...


def _token_content(v: Any) -> str | None:
    """A special-token field of tokenizer_config.json: a string, or a serialised AddedToken dict."""
    if isinstance(v, str):
        return v
    if isinstance(v, Mapping) and isinstance(v.get("content"), str):
        return v["content"]
    return None


class Tokenizer:
    """A Hugging Face `tokenizers.Tokenizer` with the engine's interface.

    `encode` never lets the post-processor add special tokens; `add_bos=True` prepends `bos_token_id` (and
    raises ValueError when the tokenizer has none). Special-token ids come from `bos_token`/`eos_token`/
    `pad_token` of a `tokenizer_config.json` next to the file when present and known to the vocabulary,
    otherwise from common names (`<s>`, `</s>`, `<|endoftext|>`, `<pad>`, ...), otherwise None.
    """

    def __init__(self, hf: HFTokenizer, config: Mapping[str, Any] | None = None, path: str | None = None) -> None:
        self._hf = hf
        self.path = path
        config = config or {}
        self._bos = self._lookup(config.get("bos_token"), _BOS_NAMES)
        self._eos = self._lookup(config.get("eos_token"), _EOS_NAMES)
        self._pad = self._lookup(config.get("pad_token"), _PAD_NAMES)
        template = config.get("chat_template")  # a Jinja template string (tokenizer_config.json), or None
        self.chat_template = template if isinstance(template, str) and template else None

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a `tokenizer.json`. FileNotFoundError if absent, ValueError if unreadable; both name the path."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception
            raise ValueError(f"cannot load tokenizer from {path}: {e}") from e
        config: dict[str, Any] = {}
        config_path = path.parent / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot read {config_path}: {e}") from e
            if not isinstance(config, dict):
                raise ValueError(f"{config_path}: expected a JSON object")
        return cls(hf, config, str(path))

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Load `model_dir/tokenizer.json` (FileNotFoundError naming that path when absent)."""
        return cls.from_file(Path(model_dir) / "tokenizer.json")

    def _lookup(self, configured: Any, names: Sequence[str]) -> int | None:
        content = _token_content(configured)
        if content is not None and (i := self._hf.token_to_id(content)) is not None:
            return i
        for name in names:
            if (i := self._hf.token_to_id(name)) is not None:
                return i
        return None

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`, with `bos_token_id` first iff `add_bos`."""
        ids = self._hf.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self._bos is None:
                raise ValueError(f"add_bos=True but tokenizer {self.path or ''} has no BOS token")
            ids.insert(0, self._bos)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; incomplete UTF-8 sequences decode to U+FFFD."""
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._hf.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos

    @property
    def eos_token_id(self) -> int | None:
        return self._eos

    @property
    def pad_token_id(self) -> int | None:
        return self._pad


class ByteTokenizer:
    """UTF-8 bytes as tokens; no file needed.

    Ids 0..3 are `<pad>`, `<s>`, `</s>`, `<mask>`; byte b is id b + 4 (so 4..259). With `vocab_size` > 260
    the extra ids are specials named `<extra_i>`, so a random-weight model with any vocab >= 260 can be
    decoded. Special tokens are dropped by `decode` unless `skip_special_tokens=False`; `encode` never
    parses special-token names out of the text. Ids outside [0, vocab_size) raise ValueError.
    """

    SPECIALS = ("<pad>", "<s>", "</s>", "<mask>")
    OFFSET = len(SPECIALS)

    def __init__(self, vocab_size: int = 260) -> None:
        if vocab_size < 256 + self.OFFSET:
            raise ValueError(f"ByteTokenizer needs vocab_size >= {256 + self.OFFSET}, got {vocab_size}")
        self._vocab_size = vocab_size

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = [b + self.OFFSET for b in text.encode("utf-8")]
        return [self.bos_token_id, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out: list[str] = []
        run = bytearray()  # bytes are decoded in runs so multi-byte characters survive
        for i in ids:
            if not 0 <= i < self._vocab_size:
                raise ValueError(f"token id {i} outside [0, {self._vocab_size})")
            if self.OFFSET <= i < 256 + self.OFFSET:
                run.append(i - self.OFFSET)
                continue
            if not skip_special_tokens:
                out.append(run.decode("utf-8", errors="replace"))
                run.clear()
                out.append(self._special_name(i))
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def _special_name(self, i: int) -> str:
        return self.SPECIALS[i] if i < self.OFFSET else f"<extra_{i}>"

    def id_to_token(self, i: int) -> str | None:
        """Specials by name, bytes as `<0xHH>`; None outside the vocabulary."""
        if not 0 <= i < self._vocab_size:
            return None
        if self.OFFSET <= i < 256 + self.OFFSET:
            return f"<0x{i - self.OFFSET:02X}>"
        return self._special_name(i)

    def token_to_id(self, token: str) -> int | None:
        if token in self.SPECIALS:
            return self.SPECIALS.index(token)
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            try:
                return int(token[3:5], 16) + self.OFFSET
            except ValueError:
                return None
        if token.startswith("<extra_") and token.endswith(">") and token[7:-1].isdigit():
            i = int(token[7:-1])
            return i if 256 + self.OFFSET <= i < self._vocab_size else None
        return None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_token_id(self) -> int:
        return 1

    @property
    def eos_token_id(self) -> int:
        return 2

    @property
    def pad_token_id(self) -> int:
        return 0


class IncrementalDetokenizer:
    """Streams the text of a growing token sequence.

    `push(ids)` returns the text those tokens finalise. Pending tokens whose text ends in U+FFFD (an
    incomplete UTF-8 sequence, e.g. part of an emoji under byte-level BPE) are held back until a later token
    completes them, so no delta splits a character. Each decode covers the last finalised tokens as left
    context plus the pending ones, and the delta is the difference of the two texts: decoders that drop a
    leading space of the first token (SentencePiece/Metaspace) or that merge bytes across tokens then give
    the same text as decoding everything at once. `flush()` returns what is still pending (possibly ending
    in U+FFFD when the stream stopped mid-character).

    Contract: with no prompt ids, the deltas plus `flush()` concatenate to `tokenizer.decode(pushed ids)`
    for valid UTF-8 output. With prompt ids, the prompt is left context only: `text` is what the output adds
    after the prompt (e.g. " world" rather than "world" for a SentencePiece token "▁world").
    """

    # Prompt tokens decoded as left context for the first output tokens; a few suffice for space handling.
    PROMPT_CONTEXT = 5

    def __init__(
        self, tokenizer: TokenizerLike, prompt_ids: Sequence[int] | None = None, skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_ids or ())
        self._num_prompt = len(self._ids)
        # _ids[_prefix:_read] is finalised left context; _ids[_read:] is pending.
        self._read = len(self._ids)
        self._prefix = max(self._read - self.PROMPT_CONTEXT, 0)
        # A prompt ending mid-character (a resumed generation) would make the context text end in U+FFFD and
        # shift every later difference; treat those last prompt tokens as pending output instead.
        for _ in range(3):  # a UTF-8 character has at most 3 bytes after its first
            if self._read <= self._prefix or not self._decode(self._prefix, self._read).endswith(REPLACEMENT_CHAR):
                break
            self._read -= 1
            self._prefix = max(self._prefix - 1, 0)
        self._text = ""

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self._ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def push(self, new_ids: Sequence[int]) -> str:
        """Append `new_ids`; return the newly finalised text ("" while a character is incomplete)."""
        self._ids.extend(new_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Return all pending text, complete or not (end of stream)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read >= len(self._ids):
            return ""
        context = self._decode(self._prefix, self._read)
        full = self._decode(self._prefix)
        if not final and (len(full) <= len(context) or full.endswith(REPLACEMENT_CHAR)):
            return ""  # nothing visible yet, or the last character is incomplete: wait for more tokens
        delta = full[len(context) :]
        # The pending tokens become the next context: short, and ending on a character boundary.
        self._prefix, self._read = self._read, len(self._ids)
        self._text += delta
        return delta

    @property
    def text(self) -> str:
        """All text finalised so far (prompt excluded)."""
        return self._text

    @property
    def output_ids(self) -> list[int]:
        """Every id pushed so far (prompt excluded), pending ones included."""
        return self._ids[self._num_prompt :]

    def holdback(self, stops: Sequence[str]) -> int:
        """Characters at the end of `text` that may begin a stop string and must not be streamed yet."""
        return stop_holdback(self.text, stops)


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Index in `text` where the earliest stop string begins, among occurrences that end after `start`.

    `start` is the length of the text already checked (the previous `text`), so a stop string spanning
    the boundary of two deltas is found: each stop is searched from `start - len(stop) + 1`. Empty stop
    strings are ignored. None when no stop string occurs.
    """
    best: int | None = None
    for stop in stops:
        if not stop:
            continue
        i = text.find(stop, max(start - len(stop) + 1, 0))
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def stop_holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string (0 if none)."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best
