#!/usr/bin/env python
"""Export a megamm checkpoint of any layout as a Hugging Face Llama folder.

    python tools/convert_to_hf.py --checkpoint DIR --out HF_DIR [--dtype bf16|fp16|fp32]
        [--max-shard-size 5GB] [--force]

DIR is a save dir (its `latest` checkpoint is taken) or one step dir, written under
any ZeRO stage and tensor/pipeline layout. HF_DIR loads in stock
`transformers.LlamaForCausalLM` and `AutoTokenizer` with no remote code; its logits
equal megamm's. The folder's files are listed in megamm/hf_folder.py. Bad input
(a missing or partial checkpoint, an existing HF_DIR without --force, a full disk)
is one line on stderr and exit status 2; nothing is left half-written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megamm.checkpoint import checkpoint_dir, consolidated_state_dict, read_meta, tokenizers_dir
from megamm.config import ConfigError, ModelConfig
from megamm.hf import exports_tied, generation_config, hf_config, to_hf
from megamm.hf_folder import (DTYPES, HF_DTYPE_NAMES, MODALITIES_FILE, copy_tokenizers, modalities,
                              save_sharded, staged_output, write_json, write_tokenizer)

UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}


def parse_size(text: str) -> int:
    t = text.strip().upper()
    for unit, mult in UNITS.items():
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * mult)
    if t.isdigit():
        return int(t)
    raise ConfigError(f"--max-shard-size {text!r}: expected e.g. 5GB, 500MB or a byte count")


def convert(checkpoint: Path, out: Path, dtype: str = "fp32", max_shard_bytes: int = 5 * 10**9,
            force: bool = False, log=print) -> Path:
    """The conversion behind the command line; returns the folder written."""
    ckpt = checkpoint_dir(checkpoint)
    meta = read_meta(ckpt)
    if "model" not in meta:
        raise ConfigError(f"{ckpt}: megamm.json records no model config")
    cfg = ModelConfig.from_dict(meta["model"])
    if Path(out).exists() and not force:  # refuse before the (slow) consolidation
        raise ConfigError(f"output {out} already exists (pass --force to replace it)")
    try:
        sd = consolidated_state_dict(ckpt)
    except ConfigError:
        raise
    except Exception as e:  # a partial or corrupt checkpoint: torch/DeepSpeed raise many kinds
        raise ConfigError(f"{ckpt}: unreadable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    tied = exports_tied(sd, cfg)
    hf_sd = {k: v.to(DTYPES[dtype]) for k, v in to_hf(sd, cfg).items()}
    tok_dir = tokenizers_dir(ckpt, meta)
    text_json = tok_dir / "text" / "tokenizer.json" if tok_dir is not None else None
    if text_json is not None and not text_json.is_file():
        log(f"note: {text_json} not found; the tokenizer's text ids are <text_N> placeholders")
        text_json = None
    elif text_json is None:
        log("note: the checkpoint names no tokenizers (synthetic data): tokenizer.json holds the "
            "specials, image and audio tokens and <text_N> placeholders for text ids")
    with staged_output(out, force) as tmp:
        files = save_sharded(hf_sd, tmp, max_shard_bytes)
        write_json(tmp / "config.json", hf_config(cfg, tied, HF_DTYPE_NAMES[dtype]))
        write_json(tmp / "generation_config.json", generation_config(cfg))
        write_tokenizer(cfg, tmp, text_json)
        copied = copy_tokenizers(tok_dir, tmp)
        write_json(tmp / MODALITIES_FILE, {**modalities(cfg, copied), "source": {
            "checkpoint": str(ckpt.resolve()), "topology": meta.get("topology"),
            "zero_stage": meta.get("zero_stage"), "precision": meta.get("precision")}})
    log(f"wrote {out}: {len(hf_sd)} tensors in {len(files)} safetensors shard(s), {dtype}, "
        f"vocab {cfg.vocab.padded_size}, tied={tied}")
    return Path(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="save dir or one step dir")
    ap.add_argument("--out", type=Path, required=True, help="HF folder to write")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (e.g. 5GB, 500MB)")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)
    try:
        convert(args.checkpoint, args.out, args.dtype, parse_size(args.max_shard_size), args.force)
    except ConfigError as e:
        print(f"convert_to_hf: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"convert_to_hf: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
