"""Model configuration: one validated dataclass and the named presets.

Config is data: nothing here touches a device, a process group or a file system.
Every impossible combination fails in `__post_init__` with one line naming the field.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the culprit."""


VOCAB_PADDING_FIELDS = ("pad_multiple", "padded_size")
"""VocabConfig fields that are the model's choice (table rows), not the tokenizers'."""


@dataclass(frozen=True)
class VocabConfig:
    """Sizes of the unified vocabulary `[text | specials | image codes | audio codes]`."""

    text_size: int = 512
    """Number of text (BPE) ids."""
    n_special: int = 16
    """Reserved special ids (the named specials of megamm.vocab come first)."""
    image_codes: int = 64
    """Codebook size of the image tokenizer (the embedded data's: 48 shape + 16 palette codes)."""
    image_tokens: int = 51
    """Fixed number of code tokens per image (the embedded data's: two palette codes and
    a 7x7 grid)."""
    audio_codebooks: int = 4
    """Residual-VQ codebooks of the audio codec; one frame = one code of each."""
    audio_codebook_size: int = 256
    """Entries per audio codebook."""
    pad_multiple: int = 1024
    """padded_size defaults to the used size rounded up to a multiple of this (1024 =
    128 x 8: every tensor-parallel degree up to 8 splits it evenly)."""
    padded_size: int | None = None
    """Rows of the embedding and head tables, fixed when a model is created, so the
    parallel layout never changes a checkpoint's shapes. None: derived from pad_multiple."""

    def __post_init__(self):
        for name in ("text_size", "image_codes", "image_tokens", "audio_codebooks",
                     "audio_codebook_size", "pad_multiple"):
            if getattr(self, name) < 1:
                raise ConfigError(f"vocab.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_special < 9:
            raise ConfigError(f"vocab.n_special must be >= 9 (the named specials), got {self.n_special}")
        if self.padded_size is None:
            m = self.pad_multiple
            object.__setattr__(self, "padded_size", -(-self.used_size // m) * m)
        if self.padded_size < self.used_size:
            raise ConfigError(f"vocab.padded_size={self.padded_size} is smaller than the "
                              f"{self.used_size} ids the vocabulary uses")

    @property
    def used_size(self) -> int:
        """Ids that mean something: text + specials + image codes + audio codes."""
        return (self.text_size + self.n_special + self.image_codes
                + self.audio_codebooks * self.audio_codebook_size)

    def layout(self) -> dict[str, int]:
        """The fields the tokenizers fix (every field but the padding): two vocabularies
        with the same layout give every id the same meaning."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in VOCAB_PADDING_FIELDS}

    def layout_difference(self, other: "VocabConfig", other_name: str) -> str | None:
        """None when `other` has the same layout, else 'field=mine vs OTHER_NAME theirs, ...'
        for each field that differs."""
        a, b = self.layout(), other.layout()
        diff = [k for k in a if a[k] != b[k]]
        if not diff:
            return None
        return ", ".join(f"{k}={a[k]} vs {other_name} {b[k]}" for k in diff)


LOSS_SCOPES = ("modality", "full", "target")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and behaviour of the unified decoder-only transformer."""

    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means n_heads (plain MHA)."""
    ffn_dim: int | None = None
    """SwiGLU hidden size; None means the Llama rule (8/3 d rounded up to 64)."""
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 512
    vocab: VocabConfig = field(default_factory=VocabConfig)
    tie_embeddings: bool = False
    loss_scope: str = "modality"
    """"modality": softmax over the ids the grammar allows next; "full": over all ids;
    "target": as "modality", counting only the targets of each document's last segment
    (the output of a caption->image or speech->caption document, not its prompt)."""
    z_loss: float = 0.0
    """Coefficient of the z-loss (logsumexp^2) that keeps output logits small; 0 = off."""
    activation_checkpointing: bool = False
    attention: str = "auto"
    """"auto" (flash-attn when installed, else SDPA), "sdpa" or "flash"."""
    kernels: str = "auto"
    """RMSNorm/RoPE implementation: "auto" (Triton where it can run), "triton" or "torch"."""
    init_std: float = 0.02

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.ffn_dim is None:
            object.__setattr__(self, "ffn_dim", _llama_ffn_dim(self.d_model))
        for name in ("n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"n_heads={self.n_heads} does not divide d_model={self.d_model}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.loss_scope not in LOSS_SCOPES:
            raise ConfigError(f"loss_scope must be one of {', '.join(LOSS_SCOPES)}, got {self.loss_scope!r}")
        if self.attention not in ("auto", "sdpa", "flash"):
            raise ConfigError(f"attention must be auto|sdpa|flash, got {self.attention!r}")
        if self.kernels not in ("auto", "triton", "torch"):
            raise ConfigError(f"kernels must be auto|triton|torch, got {self.kernels!r}")
        if self.z_loss < 0:
            raise ConfigError(f"z_loss must be >= 0, got {self.z_loss}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config field(s): {', '.join(unknown)}")
        vocab = d.pop("vocab", {})
        vknown = {f.name for f in dataclasses.fields(VocabConfig)}
        vunknown = sorted(set(vocab) - vknown)
        if vunknown:
            raise ConfigError(f"unknown vocab config field(s): {', '.join(vunknown)}")
        return cls(vocab=VocabConfig(**vocab), **d)

    def parameter_counts(self) -> dict[str, int]:
        """Exact parameters of the model this config builds, per part (no allocation):
        `embedding` (table + one vector per modality), `block` (one of n_layers) =
        `block_matrices` (attention + SwiGLU weights) + `block_norms` (its two RMSNorm
        weights), `blocks`, `final_norm`, `head` (0 when tied) and `total`. The one place
        that counts parameters: the dry run, FLOPs/MFU and the memory estimator use it."""
        v, d, hd = self.vocab.padded_size, self.d_model, self.head_dim
        matrices = d * hd * (self.n_heads * 2 + self.n_kv_heads * 2) + 3 * d * self.ffn_dim  # attn + SwiGLU
        block = matrices + 2 * d
        counts = {"embedding": v * d + 4 * d, "block": block, "block_matrices": matrices,
                  "block_norms": 2 * d, "blocks": self.n_layers * block,
                  "final_norm": d, "head": 0 if self.tie_embeddings else v * d}
        counts["total"] = counts["embedding"] + counts["blocks"] + d + counts["head"]
        return counts

    def num_parameters(self) -> int:
        """Exact parameter count of the model this config builds (no allocation)."""
        return self.parameter_counts()["total"]

    def check_tensor_parallel(self, tp: int) -> None:
        """Refuse, in one line, a tensor-parallel degree this model cannot be split by."""
        if tp < 1:
            raise ConfigError(f"--tp must be >= 1, got {tp}")
        for name, value in (("n_kv_heads", self.n_kv_heads), ("n_heads", self.n_heads),
                            ("ffn_dim", self.ffn_dim), ("vocab.padded_size", self.vocab.padded_size)):
            if value % tp:
                raise ConfigError(f"--tp {tp} does not divide {name}={value} "
                                  f"(tensor parallelism splits whole kv-head groups, FFN columns and "
                                  f"vocabulary rows evenly)")


def _llama_ffn_dim(d_model: int, multiple: int = 64) -> int:
    hidden = int(8 * d_model / 3)
    return multiple * ((hidden + multiple - 1) // multiple)


# Emu3-sized vocabulary: Qwen-style BPE text (151,643) + 211 specials + 32,768 image codes,
# plus 4 x 1,024 audio codes.
_VOCAB_8B = VocabConfig(text_size=151643, n_special=211, image_codes=32768, image_tokens=1024,
                        audio_codebooks=4, audio_codebook_size=1024)

PRESETS: dict[str, ModelConfig] = {
    # The small reference model of seed 001: 4 layers, d=128, 4 heads; vocabulary sized
    # for the embedded "spoken coloured digits" data set.
    "tiny": ModelConfig(n_layers=4, d_model=128, n_heads=4, max_seq_len=512),
    "small": ModelConfig(n_layers=12, d_model=768, n_heads=12, n_kv_heads=4, max_seq_len=2048,
                         vocab=VocabConfig(text_size=32000, n_special=64, image_codes=8192,
                                           image_tokens=256, audio_codebooks=4,
                                           audio_codebook_size=1024)),
    "1b": ModelConfig(n_layers=16, d_model=2048, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                      rope_theta=5e5, max_seq_len=4096, vocab=_VOCAB_8B),
    "8b": ModelConfig(n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                      rope_theta=1e6, max_seq_len=8192, vocab=_VOCAB_8B,
                      activation_checkpointing=True),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def resolve_model(spec: str) -> ModelConfig:
    """`--model`: a preset name, or a JSON file of ModelConfig fields. The file's fields
    override its optional `"base"` preset's (or the dataclass defaults without one); its
    `"vocab"`, if any, is only a starting point: training takes the vocabulary from the
    data (megamm.train.loop). Every problem is a one-line ConfigError naming the file."""
    import json
    from pathlib import Path

    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if not (spec.endswith(".json") or path.is_file()):
        raise ConfigError(f"unknown model preset {spec!r}; choose one of: {', '.join(PRESETS)}, "
                          f"or give a JSON model config file")
    try:
        fields = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"--model {spec}: cannot read ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--model {spec}: malformed JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(fields, dict):
        raise ConfigError(f"--model {spec}: a model config is a JSON object of ModelConfig fields")
    base = fields.pop("base", None)
    start = get_preset(base).to_dict() if base is not None else {}
    start_vocab = {k: v for k, v in start.pop("vocab", {}).items() if k != "padded_size"}  # re-derived
    vocab = {**start_vocab, **fields.pop("vocab", {})}
    try:
        return ModelConfig.from_dict({**start, **fields, "vocab": vocab})
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"--model {spec}: {e}") from None
