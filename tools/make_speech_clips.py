#!/usr/bin/env python
"""Synthesise every caption word of the embedded dataset once with espeak-ng and
write them, 16 kHz int16, into megamm/assets/digit_words.safetensors.

The shipped file is the output of this script, so a default run needs no speech
engine. Re-run it only to change the voice or the word list:

    apt-get install -y espeak-ng
    python tools/make_speech_clips.py [--voice en-us] [--speed 175] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import wave
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from megamm.demo.digits import SAMPLE_RATE, WORD_CLIPS_ASSET, WORDS, trim_silence
from megamm.tokenizers.dsp import resample

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "megamm" / "assets" / WORD_CLIPS_ASSET


def find_espeak() -> list[str]:
    exe = shutil.which("espeak-ng") or shutil.which("espeak")
    if not exe:
        raise SystemExit("make_speech_clips: error: espeak-ng not found; `apt-get install -y espeak-ng`")
    return [exe]


def synthesise(espeak: list[str], word: str, voice: str, speed: int, workdir: Path) -> np.ndarray:
    """One word -> float32 [T] at 16 kHz, silence trimmed."""
    path = workdir / f"{word}.wav"
    subprocess.run([*espeak, "-v", voice, "-s", str(speed), "-w", str(path), word],
                   check=True, capture_output=True)
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise SystemExit(f"make_speech_clips: error: unexpected espeak output format for {word!r}")
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
    return trim_silence(resample(pcm, rate, SAMPLE_RATE))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voice", default="en-us")
    ap.add_argument("--speed", type=int, default=175, help="words per minute")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    espeak = find_espeak()
    version = subprocess.run([*espeak, "--version"], capture_output=True, text=True).stdout
    version = version.split("Data at")[0].strip()  # drop the install path
    clips = {}
    with tempfile.TemporaryDirectory() as tmp:
        for word in WORDS:
            wave_f = synthesise(espeak, word, args.voice, args.speed, Path(tmp))
            peak = float(np.abs(wave_f).max())
            clips[word] = np.rint(wave_f * (0.9 / peak) * 32767).astype(np.int16)  # peak-normalised
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".tmp")
    info = {"sample_rate": SAMPLE_RATE, "voice": args.voice, "speed_wpm": args.speed,
            "engine": version, "made_by": "tools/make_speech_clips.py"}
    # one metadata key: safetensors does not keep the order of several, and the file
    # should be byte-identical across runs
    save_file(clips, str(tmp_out), metadata={"info": json.dumps(info, sort_keys=True)})
    os.chmod(tmp_out, 0o644)
    os.replace(tmp_out, args.out)
    seconds = sum(c.size for c in clips.values()) / SAMPLE_RATE
    print(f"wrote {len(clips)} word clips ({seconds:.1f} s, {args.out.stat().st_size / 1e3:.0f} kB) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
