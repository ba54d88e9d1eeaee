"""Stock `transformers` generation under megamm's modality grammar.

A Hugging Face export (tools/convert_to_hf.py) is a plain `LlamaForCausalLM`: no remote
code, so stock `generate()` knows nothing of images or audio. A model trained with the
default loss scope ("modality") has its softmax normalised only over the ids the grammar
allows at each position; its logits outside that set were never trained and mean
nothing, so unconstrained argmax or sampling drifts out of the image range mid-image.
`ModalityGrammarLogitsProcessor` is the missing piece, a stock `LogitsProcessor`:

    from megamm.hf_generation import ModalityGrammarLogitsProcessor
    proc = ModalityGrammarLogitsProcessor.from_folder(HF_DIR)       # reads megamm_modalities.json
    model.generate(ids, attention_mask=mask, logits_processor=[proc], ...)

Contract of `proc(input_ids, scores)`:

- `input_ids` `[B, L]` are each row's whole sequence so far (prompt + generated), as
  `generate()` passes them; `scores` `[B, V]` the next position's logits. It returns
  `scores` with every id the grammar forbids at the next position set to -inf (a new
  tensor; the allowed entries are unchanged), so greedy, sampling, top-k/top-p and beam
  search all pick only allowed ids.
- The grammar is megamm's own (megamm.vocab.Vocab: `markers` / `state_of` /
  `allowed_table`, the tables the loss and megamm.generate.sample use), rebuilt from the
  folder's vocabulary layout and checked against the file's declared states, so stock
  greedy `generate()` equals megamm's greedy sampler token for token (given equal logits):
    after `<bos>` or a segment's closer: `<bot>`, `<boi>`, `<boa>` or `<eos>`;
    text after `<bot>`: text ids or `<eot>`;
    after `<boi>`: exactly N image codes (N = tokens_per_image), then only `<eoi>`;
    after `<boa>`: whole frames, codebook j's ids at frame position j, and `<eoa>` only at
    a frame boundary (where codebook 0 is also allowed);
    after `<eos>` or `<pad>`: `<pad>` or `<bos>`;
    a row with no special id yet: any used id (never a padding row of the table).
- Each row is read on its own from its last special id and the distance to it, so a
  batch may hold rows at different states, and left padding with `<pad>` (HF's
  pad_token_id for an export) before a row's `<bos>` is harmless. No state is kept
  between calls: one processor serves any number of `generate()` calls, batch sizes and
  beam reorderings. The cost per call is one cumulative max over `[B, L]` and a gather
  of `[B, V]` table rows.
- Stopping is not its job: the export's generation_config stops at `<eos>`; to stop
  after one image or clip pass `eos_token_id=[<eoi> or <eoa>, <eos>]` or, for an image,
  `max_new_tokens=N + 1`. megamm's classifier-free guidance (tools/generate.py --cfg)
  has no counterpart here.
- `scores` wider than the vocabulary (a padded lm_head) get -inf in the extra columns.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LogitsProcessor

from megamm.config import VocabConfig
from megamm.vocab import SPECIAL_NAMES, Vocab

MODALITIES_FILE = "megamm_modalities.json"  # megamm.hf_folder.MODALITIES_FILE


def vocab_from_modalities(info: dict) -> Vocab:
    """The megamm Vocab an export's megamm_modalities.json describes; raises ValueError
    when the file's ranges, specials or grammar states are not that vocabulary's."""
    try:
        r, image, audio = info["ranges"], info["image"], info["audio"]
        cfg = VocabConfig(text_size=r["text"][1], n_special=r["special"][1] - r["special"][0],
                          image_codes=image["codebook_size"], image_tokens=image["tokens_per_image"],
                          audio_codebooks=audio["codebooks"], audio_codebook_size=audio["codebook_size"],
                          padded_size=info["vocab_size"])
        states = info["grammar"]["states"]
        specials = info["specials"]
    except (KeyError, TypeError, IndexError) as e:
        raise ValueError(f"{MODALITIES_FILE}: missing or malformed field {e}") from None
    vocab = Vocab(cfg)
    expected = {"text": [0, vocab.special_start], "special": [vocab.special_start, vocab.image_start],
                "image": [vocab.image_start, vocab.audio_start], "audio": [vocab.audio_start, vocab.used_size],
                "padding": [vocab.used_size, vocab.size]}
    for name, want in expected.items():
        if name in r and list(r[name]) != want:
            raise ValueError(f"{MODALITIES_FILE}: ranges.{name} is {r[name]}, megamm's layout gives {want}")
    for name in SPECIAL_NAMES:
        if specials.get(name) != vocab.special(name):
            raise ValueError(f"{MODALITIES_FILE}: specials.{name} is {specials.get(name)}, "
                             f"megamm's layout gives {vocab.special(name)}")
    by_id = {int(s["id"]): s["allowed_next"] for s in states.values()}
    if sorted(by_id) != list(range(vocab.n_states)):
        raise ValueError(f"{MODALITIES_FILE}: grammar states {sorted(by_id)}, megamm has {vocab.n_states}")
    for s in range(vocab.n_states):
        if [list(x) for x in by_id[s]] != [list(x) for x in vocab.allowed_ranges(s)]:
            raise ValueError(f"{MODALITIES_FILE}: grammar state {s} allows {by_id[s]}, megamm's grammar "
                             f"allows {[list(x) for x in vocab.allowed_ranges(s)]} (exported by another "
                             f"megamm version?)")
    return vocab


class ModalityGrammarLogitsProcessor(LogitsProcessor):
    """Masks each row's next-token scores to what megamm's modality grammar allows
    (module docstring: the contract)."""

    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self._table = vocab.allowed_table()  # [n_states, V] bool, moved to the scores' device once
        self._tables: dict[tuple[str, int], torch.Tensor] = {}

    @classmethod
    def from_modalities(cls, info: dict) -> ModalityGrammarLogitsProcessor:
        """From the parsed megamm_modalities.json of an export."""
        return cls(vocab_from_modalities(info))

    @classmethod
    def from_folder(cls, hf_dir: str | Path) -> ModalityGrammarLogitsProcessor:
        """From an HF folder written by tools/convert_to_hf.py."""
        path = Path(hf_dir) / MODALITIES_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (not a megamm export?)")
        return cls.from_modalities(json.loads(path.read_text()))

    def states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`[B, L]` ids -> int64 `[B]`: the grammar state (megamm.vocab.State) of each
        row's last position, which constrains the next id."""
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, length >= 1], got {list(input_ids.shape)}")
        marker, dist, has = self.vocab.markers(input_ids.long())
        return self.vocab.state_of(marker[:, -1], dist[:, -1], has[:, -1])

    def allowed(self, input_ids: torch.Tensor, width: int | None = None, device=None) -> torch.Tensor:
        """bool `[B, width]` on `device` (defaults: the vocabulary's size, input_ids'
        device): the ids allowed next."""
        width = self.vocab.size if width is None else width
        device = input_ids.device if device is None else torch.device(device)
        key = (str(device), width)
        table = self._tables.get(key)
        if table is None:
            table = torch.zeros(self.vocab.n_states, width, dtype=torch.bool)
            n = min(width, self.vocab.size)
            table[:, :n] = self._table[:, :n]
            table = self._tables[key] = table.to(device)
        return table[self.states(input_ids).to(device)]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != input_ids.shape[0]:
            raise ValueError(f"scores for {scores.shape[0]} rows, input_ids has {input_ids.shape[0]}")
        return scores.masked_fill(~self.allowed(input_ids, scores.shape[-1], scores.device), float("-inf"))


__all__ = ["ModalityGrammarLogitsProcessor", "vocab_from_modalities"]
