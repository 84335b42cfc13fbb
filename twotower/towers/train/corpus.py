"""The training corpus: the CPython standard library source of the running interpreter.

File list (fixed and sorted by relative POSIX path), from `sysconfig.get_paths()["stdlib"]`:
    every `*.py` file, except under these directories (any depth):
        site-packages/   third-party packages (differ per machine)
        __pycache__/     bytecode
        encodings/       codec tables (long literal maps), not code anyone writes
        pydoc_data/      one 750 KB string literal of generated documentation
        config-*/        build configuration of the interpreter
    and files over 256 KB (a handful of huge test modules, e.g. test_typing.py, datetimetester.py).
Files that are not valid UTF-8 are skipped (listed by `skipped`; a few deliberately mis-encoded test inputs).

`test/` (the regression suite, ~14 MB of the ~24 MB kept) IS included: it is ordinary Python written by the
same authors, and without it the ~2.7M-token remainder would be read ~5 times in the AR budget (the
tiny model trains at ~3.5k tokens/s on one core); with it, about two epochs.

Corpus hash: sha256 over, for every kept file in order, `relpath \\0 content \\0`. It names the exact text
trained on (the stdlib differs between patch versions; the hash and file count go into MODEL.md).

Held-out split: whole files, deterministic by path: a file is held out when the first 8 bytes of
sha256(relpath) read as an integer modulo 10000 are below `heldout_per_10000` (default 300, i.e. ~3%).
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

EXCLUDED_DIRS = frozenset({"site-packages", "__pycache__", "encodings", "pydoc_data"})
EXCLUDED_DIR_PREFIXES = ("config-",)
MAX_FILE_BYTES = 256 * 1024
HELDOUT_PER_10000 = 300


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _excluded(rel: Path) -> bool:
    for part in rel.parts[:-1]:
        if part in EXCLUDED_DIRS or part.startswith(EXCLUDED_DIR_PREFIXES):
            return True
    return False


def is_heldout(relpath: str, per_10000: int = HELDOUT_PER_10000) -> bool:
    h = int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big")
    return h % 10000 < per_10000


@dataclass
class Corpus:
    root: Path
    files: list[str]  # relative POSIX paths, sorted
    texts: list[str]
    skipped: list[str] = field(default_factory=list)
    heldout_per_10000: int = HELDOUT_PER_10000

    @classmethod
    def load(cls, root: str | Path | None = None, heldout_per_10000: int = HELDOUT_PER_10000) -> Corpus:
        root = Path(root) if root is not None else stdlib_root()
        rels = sorted(
            p.relative_to(root).as_posix()
            for p in root.rglob("*.py")
            if p.is_file() and not _excluded(p.relative_to(root))
        )
        files, texts, skipped = [], [], []
        for rel in rels:
            data = (root / rel).read_bytes()
            if len(data) > MAX_FILE_BYTES:
                skipped.append(rel)
                continue
            try:
                texts.append(data.decode("utf-8"))
            except UnicodeDecodeError:
                skipped.append(rel)
                continue
            files.append(rel)
        return cls(root, files, texts, skipped, heldout_per_10000)

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for rel, text in zip(self.files, self.texts, strict=True):
            h.update(rel.encode("utf-8") + b"\0" + text.encode("utf-8") + b"\0")
        return h.hexdigest()

    def split(self) -> tuple[list[int], list[int]]:
        """(train file indices, held-out file indices)."""
        held = [i for i, f in enumerate(self.files) if is_heldout(f, self.heldout_per_10000)]
        hs = set(held)
        return [i for i in range(len(self.files)) if i not in hs], held

    def num_bytes(self, idx: list[int] | None = None) -> int:
        idx = range(len(self.files)) if idx is None else idx
        return sum(len(self.texts[i].encode("utf-8")) for i in idx)


def token_stream(encode_batch, texts: list[str], eos_id: int) -> Tensor:
    """All texts tokenized and concatenated, each followed by EOS -> int64 [n]."""
    out: list[int] = []
    for ids in encode_batch(texts):
        out.extend(ids)
        out.append(eos_id)
    return torch.tensor(out, dtype=torch.long)


def random_windows(stream: Tensor, batch: int, length: int, generator: torch.Generator) -> Tensor:
    """`batch` windows of `length` tokens at uniformly random offsets -> [batch, length]."""
    if stream.numel() < length:
        raise ValueError(f"token stream of {stream.numel()} tokens is shorter than one window of {length}")
    starts = torch.randint(0, stream.numel() - length + 1, (batch,), generator=generator)
    return torch.stack([stream[s : s + length] for s in starts.tolist()])


def sequential_windows(stream: Tensor, batch: int, length: int, max_windows: int | None = None) -> Iterator[Tensor]:
    """Non-overlapping windows from the start of the stream (deterministic evaluation), in batches."""
    n = stream.numel() // length
    if max_windows is not None:
        n = min(n, max_windows)
    wins = stream[: n * length].view(n, length)
    for i in range(0, n, batch):
        yield wins[i : i + batch]
