"""Byte-level BPE for the bundled model, trained with Hugging Face `tokenizers`.

Special tokens come first, so their ids are fixed: <pad>=0, <s>=1, </s>=2, <mask>=3 (3 is TwoTower's mask
id). Byte-level pre-tokenizer (GPT-2 regex, no prefix space) and decoder: every string round-trips exactly.
`save` writes tokenizer.json and a tokenizer_config.json naming bos/eos/pad/mask.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from twotower.decoding import MASK_TOKEN_ID

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<mask>")
PAD_ID, BOS_ID, EOS_ID, MASK_ID = 0, 1, 2, MASK_TOKEN_ID


def train_bpe(texts: list[str], vocab_size: int = 4096, min_frequency: int = 2) -> Tokenizer:
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # the machine's cores are shared
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    for i, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:
            raise RuntimeError(f"special token {name} got id {tok.token_to_id(name)}, expected {i}")
    return tok


def save(tok: Tokenizer, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "mask_token": "<mask>",
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out / "tokenizer.json"


def load(path: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(path))


def encode_batch(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
