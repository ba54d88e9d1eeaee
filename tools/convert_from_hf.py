#!/usr/bin/env python
"""Import a Llama-layout Hugging Face folder as a megamm checkpoint.

    python tools/convert_from_hf.py --hf HF_DIR --out DIR [--model-config PRESET_OR_JSON] [--force]

HF_DIR is a megamm export (its megamm_modalities.json records the model config) or a
text LLM in Llama layout (Llama, Mistral, ...). For a text LLM, --model-config (a preset
name or a JSON file of ModelConfig fields) supplies the image/audio part of the
vocabulary: text ids keep the LLM's rows, and every new row (specials, image and audio
codes, padding) starts as the mean of the existing rows. The architecture always
comes from config.json.

DIR is one megamm checkpoint directory (megamm.json + DeepSpeed's ZeRO-0 model file,
fp32) that megamm.load_model, tools/convert_to_hf.py and
`launch/train.py --init-from DIR` read. A megamm export round-trips bit for bit (with
the modality vectors folded into the rows). Bad input is one line, exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

from megamm.checkpoint import META_FILE, ds, manifest
from megamm.config import ConfigError, ModelConfig, get_preset
from megamm.hf import ConversionError, extend_vocab, from_hf, model_config_from_hf
from megamm.hf_folder import MODALITIES_FILE, TOKENIZERS_DIR, load_safetensors, staged_output, write_json


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: unreadable ({e})") from None


def base_config(spec: str | None, hf_dir: Path) -> tuple[ModelConfig, bool]:
    """(megamm config to start from, whether the folder is a megamm export)."""
    recorded = hf_dir / MODALITIES_FILE
    if spec is None:
        if not recorded.is_file():
            raise ConversionError(f"{hf_dir} is not a megamm export (no {MODALITIES_FILE}): pass "
                                  f"--model-config to define the image/audio vocabulary")
        return ModelConfig.from_dict(read_json(recorded)["model_config"]), True
    if spec.endswith(".json"):
        return ModelConfig.from_dict(read_json(Path(spec))), recorded.is_file()
    return get_preset(spec), recorded.is_file()


def convert(hf_dir: Path, out: Path, model_config: str | None = None, force: bool = False, log=print) -> Path:
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ConversionError(f"{hf_dir}: no config.json (not a Hugging Face model folder)")
    hf = read_json(hf_dir / "config.json")
    base, exported = base_config(model_config, hf_dir)
    if not exported:  # a text LLM: its vocabulary is the text range
        text = hf.get("vocab_size")
        if not isinstance(text, int) or text < 1:
            raise ConversionError(f"{hf_dir / 'config.json'}: vocab_size missing")
        base = base.replace(vocab=dataclasses.replace(base.vocab, text_size=text, padded_size=None))
    cfg = model_config_from_hf(hf, base)
    if Path(out).exists() and not force:
        raise ConversionError(f"output {out} already exists (pass --force to replace it)")
    hf_sd = load_safetensors(hf_dir)
    if not exported:
        hf_sd = extend_vocab(hf_sd, cfg.vocab.padded_size)
    sd = {k: v.float() for k, v in from_hf(hf_sd, cfg).items()}
    if cfg.tie_embeddings:
        sd["head.weight"] = sd["embed.weight"]
    tok = hf_dir / TOKENIZERS_DIR
    meta = {"model": cfg.to_dict(), "preset": None, "data": None,
            "tokenizers": "tokenizers" if tok.is_dir() else None,  # copied in: self-contained
            "zero_stage": 0, "precision": "fp32", "topology": {"tp": 1, "pp": 1, "dp": 1},
            "sequence_parallel": False, "source": {"hf": str(hf_dir.resolve()), "megamm_export": exported}}
    with staged_output(out, force) as tmp:
        ds.write_module_weights(tmp, sd)  # a ZeRO-0, tp = 1 checkpoint
        if tok.is_dir():
            shutil.copytree(tok, tmp / "tokenizers")
        write_json(tmp / META_FILE, meta)
        manifest.write(tmp, manifest.entries(tmp, manifest.list_files(tmp), fsync=True))  # verified on load
    grown = "" if exported else f", vocabulary grown from {hf['vocab_size']} to {cfg.vocab.padded_size} rows"
    log(f"wrote {out}: {len(sd)} tensors, {cfg.n_layers} layers, d_model {cfg.d_model}{grown}")
    return Path(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf", type=Path, required=True, help="Hugging Face model folder (Llama layout)")
    ap.add_argument("--out", type=Path, required=True, help="megamm checkpoint directory to write")
    ap.add_argument("--model-config", default=None,
                    help="preset name or ModelConfig JSON (needed for a text LLM; default: the export's own)")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)
    try:
        convert(args.hf, args.out, args.model_config, args.force)
    except ConfigError as e:
        print(f"convert_from_hf: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"convert_from_hf: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
