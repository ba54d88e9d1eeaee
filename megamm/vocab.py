"""The unified vocabulary and its modality grammar.

Layout of ids (this module is the only place that knows the offsets):

    [ text BPE ids | specials | image codes | audio codebook 0 | ... | audio codebook C-1 | padding ]

padded to `cfg.padded_size` (fixed with the model, independent of the parallel layout;
a vocab-parallel table splits it into contiguous row ranges).

A document is `<bos> segment* <eos>`; a segment is one of

    <bot> text* <eot>                 text, any length
    <boi> code{N} <eoi>               an image: exactly N image codes
    <boa> (c_0 c_1 .. c_{C-1})* <eoa> audio: whole frames, code j from codebook j

The grammar state at a position says which ids may come next; the model's loss
("modality" scope) and the sampler both use it, so training and generation agree.
States are computed from the ids alone (the last special token and the distance to
it), vectorised, so no extra tensor has to travel with a batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch

from megamm.config import VocabConfig

SPECIAL_NAMES = ("pad", "bos", "eos", "bot", "eot", "boi", "eoi", "boa", "eoa")


class Modality(IntEnum):
    TEXT = 0
    IMAGE = 1
    AUDIO = 2
    SPECIAL = 3  # structural markers, padding


MODALITY_NAMES = ("text", "image", "audio", "special")


class State(IntEnum):
    """Grammar state of a position = the set of ids allowed at the next position."""

    UNKNOWN = 0  # no marker seen yet in this row: anything goes
    OUTSIDE = 1  # after <bos> or a segment end: open a segment or end the document
    TEXT = 2  # inside text: text ids or <eot>
    IMAGE = 3  # inside an image before its N-th code: image codes
    IMAGE_END = 4  # after the N-th image code: only <eoi>
    DONE = 5  # after <eos> or <pad>: <bos> or <pad> (never a loss target)
    AUDIO = 6  # AUDIO + j: next is a code of codebook j (j == 0 also allows <eoa>)


@dataclass(frozen=True)
class Vocab:
    cfg: VocabConfig

    # ---- offsets -------------------------------------------------------------------
    @property
    def special_start(self) -> int:
        return self.cfg.text_size

    @property
    def image_start(self) -> int:
        return self.special_start + self.cfg.n_special

    @property
    def audio_start(self) -> int:
        return self.image_start + self.cfg.image_codes

    @property
    def used_size(self) -> int:
        """Ids that mean something (the rest is padding)."""
        return self.cfg.used_size

    @property
    def size(self) -> int:
        """Rows of the embedding and head tables (used ids + padding)."""
        return self.cfg.padded_size

    def special(self, name: str) -> int:
        return self.special_start + SPECIAL_NAMES.index(name)

    pad = property(lambda self: self.special("pad"))
    bos = property(lambda self: self.special("bos"))
    eos = property(lambda self: self.special("eos"))
    bot = property(lambda self: self.special("bot"))
    eot = property(lambda self: self.special("eot"))
    boi = property(lambda self: self.special("boi"))
    eoi = property(lambda self: self.special("eoi"))
    boa = property(lambda self: self.special("boa"))
    eoa = property(lambda self: self.special("eoa"))

    @property
    def n_states(self) -> int:
        return int(State.AUDIO) + self.cfg.audio_codebooks

    # ---- id <-> modality codes ---------------------------------------------------------
    def image_ids(self, codes):
        """Image codebook indices (any int array) -> unified ids."""
        return np.asarray(codes, dtype=np.int64) + self.image_start

    def image_codes(self, ids):
        return np.asarray(ids, dtype=np.int64) - self.image_start

    def audio_ids(self, codes):
        """Audio codes `[frames, C]` -> flat unified ids `[frames * C]` (frame-major)."""
        codes = np.asarray(codes, dtype=np.int64)
        C, K = self.cfg.audio_codebooks, self.cfg.audio_codebook_size
        if codes.ndim != 2 or codes.shape[1] != C:
            raise ValueError(f"audio codes must be [frames, {C}], got {list(codes.shape)}")
        return (codes + self.audio_start + np.arange(C) * K).reshape(-1)

    def audio_codes(self, ids):
        """Flat unified audio ids -> codes `[frames, C]`."""
        C, K = self.cfg.audio_codebooks, self.cfg.audio_codebook_size
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size % C:
            raise ValueError(f"{ids.size} audio ids is not a whole number of {C}-code frames")
        return ids.reshape(-1, C) - self.audio_start - np.arange(C) * K

    def modality_table(self) -> torch.Tensor:
        """`[size]` int64: the Modality of every id (padding ids count as SPECIAL)."""
        t = torch.full((self.size,), int(Modality.SPECIAL), dtype=torch.long)
        t[: self.special_start] = int(Modality.TEXT)
        t[self.image_start: self.audio_start] = int(Modality.IMAGE)
        t[self.audio_start: self.used_size] = int(Modality.AUDIO)
        return t

    # ---- segments ---------------------------------------------------------------------
    def text_segment(self, text_ids) -> list[int]:
        text_ids = [int(i) for i in text_ids]
        if any(i < 0 or i >= self.cfg.text_size for i in text_ids):
            raise ValueError(f"text id out of range [0, {self.cfg.text_size})")
        return [self.bot, *text_ids, self.eot]

    def image_segment(self, codes) -> list[int]:
        codes = np.asarray(codes, dtype=np.int64).reshape(-1)
        if codes.size != self.cfg.image_tokens:
            raise ValueError(f"an image has {self.cfg.image_tokens} codes, got {codes.size}")
        if codes.min() < 0 or codes.max() >= self.cfg.image_codes:
            raise ValueError(f"image code out of range [0, {self.cfg.image_codes})")
        return [self.boi, *self.image_ids(codes).tolist(), self.eoi]

    def audio_segment(self, codes) -> list[int]:
        codes = np.asarray(codes, dtype=np.int64)
        if codes.size and (codes.min() < 0 or codes.max() >= self.cfg.audio_codebook_size):
            raise ValueError(f"audio code out of range [0, {self.cfg.audio_codebook_size})")
        return [self.boa, *self.audio_ids(codes).tolist(), self.eoa]

    def document(self, segments: list[list[int]]) -> list[int]:
        return [self.bos, *[i for s in segments for i in s], self.eos]

    # ---- grammar ----------------------------------------------------------------------
    def allowed_ranges(self, state: int) -> list[tuple[int, int]]:
        """Half-open id ranges allowed after a position in `state` (ascending, disjoint)."""
        s = int(state)
        C, K = self.cfg.audio_codebooks, self.cfg.audio_codebook_size
        if s == State.UNKNOWN:
            return [(0, self.used_size)]
        if s == State.OUTSIDE:
            ids = sorted([self.eos, self.bot, self.boi, self.boa])
            return _runs(ids)
        if s == State.TEXT:
            return [(0, self.cfg.text_size), (self.eot, self.eot + 1)]
        if s == State.IMAGE:
            return [(self.image_start, self.audio_start)]
        if s == State.IMAGE_END:
            return [(self.eoi, self.eoi + 1)]
        if s == State.DONE:
            return _runs(sorted([self.pad, self.bos]))
        j = s - int(State.AUDIO)
        if 0 <= j < C:
            lo = self.audio_start + j * K
            r = [(lo, lo + K)]
            return [(self.eoa, self.eoa + 1)] + r if j == 0 else r
        raise ValueError(f"no grammar state {state} (vocabulary has {self.n_states})")

    def allowed_mask(self, state: int) -> torch.Tensor:
        """`[size]` bool mask of the ids allowed after `state`."""
        m = torch.zeros(self.size, dtype=torch.bool)
        for lo, hi in self.allowed_ranges(state):
            m[lo:hi] = True
        return m

    def allowed_table(self) -> torch.Tensor:
        """`[n_states, size]` bool: row s is allowed_mask(s). Sliced by columns, it serves
        any contiguous vocabulary shard."""
        return torch.stack([self.allowed_mask(s) for s in range(self.n_states)])

    def states(self, ids: torch.Tensor) -> torch.Tensor:
        """Grammar state of every position of `ids` `[..., seq]` -> int64 `[..., seq]`.

        Position i's state constrains ids[i+1]. Each row is read on its own; a row that
        starts mid-document has UNKNOWN states until its first special token.
        """
        return self.state_of(*self.markers(ids))

    def markers(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For every position: (the last special token up to it, tokens since that marker,
        whether there is one) — all a grammar state depends on. A sampler keeps the last
        column and advances it with `advance_markers`, instead of re-reading the row."""
        ids = torch.as_tensor(ids)
        seq = ids.shape[-1]
        pos = torch.arange(seq, device=ids.device).expand_as(ids)
        is_special = (ids >= self.special_start) & (ids < self.image_start)
        marker_pos = torch.where(is_special, pos, torch.full_like(pos, -1)).cummax(dim=-1).values
        marker = torch.gather(ids, -1, marker_pos.clamp(min=0))
        return marker, pos - marker_pos, marker_pos >= 0

    def advance_markers(self, markers, next_ids: torch.Tensor):
        """`markers` of a position -> those of the position after it, holding `next_ids`."""
        marker, dist, has = markers
        special = (next_ids >= self.special_start) & (next_ids < self.image_start)
        return (torch.where(special, next_ids, marker), torch.where(special, torch.zeros_like(dist), dist + 1),
                has | special)

    def state_of(self, marker: torch.Tensor, dist: torch.Tensor, has_marker: torch.Tensor) -> torch.Tensor:
        """Grammar state from (last marker, distance to it, whether there is one)."""
        state = torch.full_like(marker, int(State.UNKNOWN), dtype=torch.long)
        outside = (marker == self.bos) | (marker == self.eot) | (marker == self.eoi) | (marker == self.eoa)
        state = torch.where(outside, int(State.OUTSIDE), state)
        state = torch.where((marker == self.eos) | (marker == self.pad), int(State.DONE), state)
        state = torch.where(marker == self.bot, int(State.TEXT), state)
        n_img = self.cfg.image_tokens
        state = torch.where((marker == self.boi) & (dist < n_img), int(State.IMAGE), state)
        state = torch.where((marker == self.boi) & (dist >= n_img), int(State.IMAGE_END), state)
        audio_state = int(State.AUDIO) + dist % self.cfg.audio_codebooks
        state = torch.where(marker == self.boa, audio_state, state)
        return torch.where(has_marker, state, int(State.UNKNOWN))

    def prompt_targets(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """`ids`, `targets` `[B, S]` (targets = ids shifted by one) -> bool `[B, S]`: whether
        each target belongs to a prompt, i.e. to a segment of its document that another
        segment follows (the caption of a caption->image document, the image of an
        image->caption one), including the first segment's opening marker. A document's
        last segment and its `<eos>` are not prompt. Each row is read on its own: a
        document cut off by the row's end counts its last visible segment as final."""
        full = torch.cat([ids[:, :1], targets], dim=1)  # the row's tokens, [B, S+1]
        starts = (full == self.bot) | (full == self.boi) | (full == self.boa)
        seen = starts.long().cumsum(1)  # segment starts up to and including each token
        doc = (full == self.bos).long().cumsum(1)
        # one id per (row, document); `last`: the segment starts its document holds in all
        key = (doc + torch.arange(doc.shape[0], device=doc.device)[:, None] * (doc.shape[1] + 1)).reshape(-1)
        last = torch.zeros(int(key.max()) + 1, dtype=torch.long, device=full.device)
        last = last.scatter_reduce(0, key, seen.reshape(-1), "amax")[key].view_as(seen)
        return ((seen < last) & (full != self.bos))[:, 1:]

    def loss_targets(self, ids: torch.Tensor, targets: torch.Tensor, loss_scope: str) -> torch.Tensor:
        """The targets a loss of `loss_scope` sees: under "target", prompt targets
        (`prompt_targets`) become <pad>, which no loss counts; otherwise `targets`."""
        if loss_scope != "target":
            return targets
        return torch.where(self.prompt_targets(ids, targets), torch.full_like(targets, self.pad), targets)

    def column_table(self) -> torch.Tensor:
        """`[n_states, size]` int64: column of each id inside its state's allowed list, -1 if
        the id is not allowed there. Turns a target id into a class index for the loss."""
        table = torch.full((self.n_states, self.size), -1, dtype=torch.long)
        for s in range(self.n_states):
            col = 0
            for lo, hi in self.allowed_ranges(s):
                table[s, lo:hi] = torch.arange(col, col + hi - lo)
                col += hi - lo
        return table

    def counted_targets(self, states: torch.Tensor, targets: torch.Tensor, grammar: bool = True,
                        allowed: torch.Tensor | None = None) -> torch.Tensor:
        """Bool mask of the targets a loss counts: not <pad>, not after a document's end,
        and (with grammar=True) allowed by the grammar state of their position.
        `allowed`: a cached `allowed_table()` on the tensors' device."""
        counted = (targets != self.pad) & (states != int(State.DONE))
        if grammar:
            table = self.allowed_table().to(states.device) if allowed is None else allowed
            counted = counted & table[states, targets]
        return counted

    def check_ids(self, ids, where: str = "ids") -> None:
        """Raise ValueError if any id is outside the used vocabulary."""
        arr = np.asarray(ids)
        if arr.size == 0:
            return
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.used_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{where}: token id {bad} outside the vocabulary [0, {self.used_size})")

    def grammar_violations(self, ids: torch.Tensor) -> torch.Tensor:
        """Positions j (of `ids` `[seq]`) whose id the grammar does not allow after j-1."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        self.check_ids(ids)
        st = self.states(ids)
        table = self.column_table()
        cols = table[st[:-1], ids[1:]]
        return torch.nonzero(cols < 0).flatten() + 1


def _runs(sorted_ids: list[int]) -> list[tuple[int, int]]:
    """[3, 4, 7] -> [(3, 5), (7, 8)]"""
    runs: list[tuple[int, int]] = []
    for i in sorted_ids:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs
