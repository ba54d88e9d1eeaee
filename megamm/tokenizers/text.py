"""Text tokenizer: byte-level BPE through Hugging Face `tokenizers`.

Ids are in [0, size): `size` is the id space the unified vocabulary reserves for text
(VocabConfig.text_size), at least the number of ids the BPE actually uses. No special
tokens: document structure (<bot>, <eot>, ...) belongs to megamm.vocab.

On disk a tokenizer directory holds `tokenizer.json` (the HF file) and
`megamm_tokenizer.json` ({"kind": "text", "size": ...}). `load` also accepts any
plain tokenizer.json (or a directory holding one), e.g. a pretrained model's.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megamm.tokenizers.io import read_info, write_info

HF_FILE = "tokenizer.json"


class TextTokenizer:
    kind = "text"

    def __init__(self, tokenizer: Tokenizer, size: int | None = None):
        self.tokenizer = tokenizer
        used = tokenizer.get_vocab_size(with_added_tokens=True)
        self.size = used if size is None else int(size)
        if self.size < used:
            raise ValueError(f"text tokenizer uses {used} ids, more than its declared size {self.size}")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 512, min_frequency: int = 2) -> "TextTokenizer":
        """Byte-level BPE over `texts` with at most `vocab_size` ids (>= 256: every
        byte has an id, so any string encodes). Deterministic for the same texts."""
        if vocab_size < 256:
            raise ValueError(f"byte-level BPE needs vocab_size >= 256, got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=[], show_progress=False)
        tok.train_from_iterator(list(texts), trainer=trainer)
        return cls(tok, size=vocab_size)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.size]
        if bad:
            raise ValueError(f"text id {bad[0]} outside [0, {self.size})")
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # sorted keys and no pretty-print variance: the same tokenizer gives the same bytes
        data = json.loads(self.tokenizer.to_str())
        (directory / HF_FILE).write_text(json.dumps(data, sort_keys=True, ensure_ascii=False))
        write_info(directory, self.kind, {"size": self.size})

    @classmethod
    def load(cls, path: str | Path) -> "TextTokenizer":
        """From a directory written by `save`, a directory with a tokenizer.json, or the
        tokenizer.json file itself."""
        path = Path(path)
        hf = path if path.is_file() else path / HF_FILE
        if not hf.is_file():
            raise FileNotFoundError(f"no {HF_FILE} at {path}")
        size = None
        if path.is_dir() and (path / "megamm_tokenizer.json").is_file():
            size = read_info(path, cls.kind)["size"]
        return cls(Tokenizer.from_file(str(hf)), size=size)

    def __repr__(self) -> str:
        used = self.tokenizer.get_vocab_size(with_added_tokens=True)
        return f"TextTokenizer(size={self.size}, used={used})"
