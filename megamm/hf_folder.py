"""Files of a Hugging Face model folder as megamm writes and reads them.

    <HF_DIR>/config.json, generation_config.json        (megamm.hf.hf_config)
             model-0000K-of-0000N.safetensors + model.safetensors.index.json
             tokenizer.json, tokenizer_config.json, special_tokens_map.json
             megamm_modalities.json                      id ranges, image/audio layout, grammar
             megamm_tokenizers/{text,image,audio}/       the tokenizers' own files, when known

The tokenizer's vocabulary covers every id of the padded vocabulary, in megamm's order:
text BPE ids (or `<text_N>` placeholders when the checkpoint knows no text tokenizer),
the specials (`<bos>`, ... `<reserved_K>`), one token per image code (`<img_123>`), one
per audio code (`<aud2_45>`: codebook 2, code 45) and `<vocab_pad_N>` for padding rows;
decoding an id sequence therefore shows its structure.

`staged_output` writes a folder under a temporary name next to its destination and
renames it into place only when complete: an interrupted or failed write (a full disk)
never leaves a half-written folder at the destination.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from megamm.config import ModelConfig
from megamm.hf import ConversionError, special_token_names
from megamm.vocab import SPECIAL_NAMES, State, Vocab

INDEX_FILE = "model.safetensors.index.json"
MODALITIES_FILE = "megamm_modalities.json"
TOKENIZERS_DIR = "megamm_tokenizers"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# ---- output folders ------------------------------------------------------------------
@contextlib.contextmanager
def staged_output(out: Path, force: bool):
    """Yield a fresh temporary folder; on success it replaces `out` (which must not
    exist unless `force`); on any error it is removed and `out` is untouched."""
    out = Path(out)
    if out.exists() and not force:
        raise ConversionError(f"output {out} already exists (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# ---- safetensors ---------------------------------------------------------------------
def save_sharded(sd: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> list[str]:
    """Write `sd` as safetensors shards of at most max_shard_bytes (a larger tensor gets
    a shard of its own) + the index; returns the shard file names."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, t in sd.items():
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    files, weight_map = [], {}
    for k, names in enumerate(groups, start=1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: sd[n].contiguous().clone() for n in names}, str(out / fname), metadata={"format": "pt"})
        files.append(fname)
        weight_map.update({n: fname for n in names})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    write_json(out / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return files


def load_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder (sharded with an index, or one model.safetensors)."""
    folder = Path(folder)
    if (folder / INDEX_FILE).is_file():
        files = sorted(set(json.loads((folder / INDEX_FILE).read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ConversionError(f"{folder}: no model.safetensors or {INDEX_FILE} "
                              f"(only safetensors HF folders are supported)")
    sd = {}
    for f in files:
        if not (folder / f).is_file():
            raise ConversionError(f"{folder}: the index names {f}, which is missing")
        sd.update(load_file(str(folder / f)))
    return sd


# ---- tokenizer -----------------------------------------------------------------------
def token_names(cfg: ModelConfig) -> list[str]:
    """Names of the ids after the text range: specials, image codes, audio codes, padding."""
    v = cfg.vocab
    names = special_token_names(cfg)
    names += [f"<img_{k}>" for k in range(v.image_codes)]
    names += [f"<aud{j}_{k}>" for j in range(v.audio_codebooks) for k in range(v.audio_codebook_size)]
    names += [f"<vocab_pad_{k}>" for k in range(v.padded_size - v.used_size)]
    return names


def build_tokenizer(cfg: ModelConfig, text_tokenizer_json: Path | None):
    """A `tokenizers.Tokenizer` whose ids are megamm's unified ids (see module doc)."""
    text_size = cfg.vocab.text_size
    if text_tokenizer_json is not None:
        tok = Tokenizer.from_file(str(text_tokenizer_json))
        used = tok.get_vocab_size(with_added_tokens=True)
        if used > text_size:
            raise ConversionError(f"{text_tokenizer_json}: {used} text ids, more than the model's "
                                  f"vocab.text_size={text_size}")
        filler = [f"<text_unused_{k}>" for k in range(used, text_size)]
    else:
        tok = Tokenizer(models.WordLevel({f"<text_{k}>": k for k in range(text_size)}, unk_token="<text_0>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        filler = []
    specials = special_token_names(cfg)
    tok.add_tokens([AddedToken(n, special=False, normalized=False) for n in filler])
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in specials])
    rest = token_names(cfg)[len(specials):]
    tok.add_tokens([AddedToken(n, special=False, normalized=False) for n in rest])
    names = filler + specials + rest
    first = text_size - len(filler)
    for i in (0, len(names) // 2, len(names) - 1):  # the ids landed where megamm has them
        if tok.token_to_id(names[i]) != first + i:
            raise ConversionError(f"tokenizer id of {names[i]} is {tok.token_to_id(names[i])}, "
                                  f"expected {first + i} (text tokenizer with overlapping added tokens?)")
    if tok.get_vocab_size(with_added_tokens=True) != cfg.vocab.padded_size:
        raise ConversionError(f"tokenizer covers {tok.get_vocab_size(with_added_tokens=True)} ids, "
                              f"the model has {cfg.vocab.padded_size}")
    return tok


def write_tokenizer(cfg: ModelConfig, out: Path, text_tokenizer_json: Path | None) -> None:
    build_tokenizer(cfg, text_tokenizer_json).save(str(out / "tokenizer.json"))
    specials = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
    write_json(out / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast",
                                               "model_max_length": cfg.max_seq_len, "add_bos_token": False,
                                               "add_eos_token": False, "clean_up_tokenization_spaces": False,
                                               **specials})
    write_json(out / "special_tokens_map.json", specials)


# ---- the modality map ----------------------------------------------------------------
def modalities(cfg: ModelConfig, tokenizers: dict[str, str | None]) -> dict:
    """megamm_modalities.json: everything a user of the HF folder needs to build prompts
    and decode image/audio ids without megamm's code."""
    vocab, v = Vocab(cfg.vocab), cfg.vocab
    states = {}
    for s in range(vocab.n_states):
        name = State(s).name if s < int(State.AUDIO) else f"AUDIO_{s - int(State.AUDIO)}"
        states[name] = {"id": s, "allowed_next": [list(r) for r in vocab.allowed_ranges(s)]}
    return {
        "format": 1,
        "vocab_size": v.padded_size, "used_size": v.used_size,
        "ranges": {"text": [0, vocab.special_start], "special": [vocab.special_start, vocab.image_start],
                   "image": [vocab.image_start, vocab.audio_start], "audio": [vocab.audio_start, v.used_size],
                   "padding": [v.used_size, v.padded_size]},
        "specials": {name: vocab.special(name) for name in SPECIAL_NAMES},
        "image": {"codebook_size": v.image_codes, "tokens_per_image": v.image_tokens,
                  "id_of_code": f"{vocab.image_start} + code", "token": "<img_{code}>",
                  "tokenizer": tokenizers.get("image")},
        "audio": {"codebooks": v.audio_codebooks, "codebook_size": v.audio_codebook_size,
                  "frame_layout": "frame-major: a frame is one code of each codebook, in codebook order",
                  "id_of_code": f"{vocab.audio_start} + codebook * {v.audio_codebook_size} + code",
                  "token": "<aud{codebook}_{code}>", "tokenizer": tokenizers.get("audio")},
        "text": {"tokenizer": tokenizers.get("text")},
        "grammar": {
            "document": "<bos> segment* <eos>",
            "segments": {"text": "<bot> text* <eot>",
                         "image": f"<boi> image_code{{{v.image_tokens}}} <eoi>",
                         "audio": f"<boa> (aud0 aud1 .. aud{v.audio_codebooks - 1})* <eoa>"},
            "states": states,
        },
        "model_config": cfg.to_dict(),
    }


def copy_tokenizers(tokenizers_dir: Path | None, out: Path) -> dict[str, str | None]:
    """Copy the checkpoint's tokenizer folders into out/megamm_tokenizers/; returns the
    copied ones' paths relative to `out` (None for each one not available)."""
    found: dict[str, str | None] = {}
    for kind in ("text", "image", "audio"):
        src = tokenizers_dir / kind if tokenizers_dir is not None else None
        if src is not None and src.is_dir():
            shutil.copytree(src, out / TOKENIZERS_DIR / kind)
            found[kind] = f"{TOKENIZERS_DIR}/{kind}"
        else:
            found[kind] = None
    return found
