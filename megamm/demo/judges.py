"""The judges of the evaluation: small classifiers that read generated images and speech
of the embedded dataset back into what a caption asked for.

    image_judge, audio_judge = load_judges()          # trained once, then cached
    image_judge.predict(uint8 [N, 28, 28, 3])   -> [{"digit": 8, "foreground": "dark green",
                                                     "background": "bright cyan"}, ...]
    audio_judge.transcribe([float32 [T] 16 kHz]) -> ["dark green eight on bright cyan", ...]
    caption_fields(caption) -> {"digit", "foreground", "background"}
    word_accuracy(reference, hypothesis) -> float

Both judges are trained on the train split only (megamm.demo.digits), on the original
examples and on their round trips through the tokenizers (decode(encode(x))), because
what they will judge comes out of those decoders: ImageJudge in image_judge.py,
AudioJudge in audio_judge.py. `load_judges` trains them with a `JudgeRecipe`, measures
them on the held-out split (originals and round trips; in each judge's `report`) and
caches them like the default tokenizers (megamm.demo.recipe):

    $MEGAMM_CACHE/judges-<key>/{image,audio}/{megamm_judge.json,model.safetensors}

`<key>` hashes the recipe, CACHE_VERSION and the content (configs and weights) of the
image and audio tokenizers, so other tokenizers or a changed recipe build a new entry.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from megamm.cache import build_once, cache_root
from megamm.demo.audio_judge import (AudioJudge, AudioJudgeConfig, AudioJudgeTrainConfig, audio_training_set,
                                     roundtrip_audio)
from megamm.demo.captions import PAINTS, caption_fields, word_accuracy
from megamm.demo.digits import make_split
from megamm.demo.image_judge import (ImageJudge, ImageJudgeConfig, ImageJudgeTrainConfig, image_training_set,
                                     roundtrip_images)
from megamm.demo.recipe import load_default
from megamm.runtime import torch_threads, usable_cores
from megamm.tokenizers import Tokenizers

CACHE_VERSION = 2
"""Bump when a change to the code makes previously cached judges wrong."""


@dataclass(frozen=True)
class JudgeRecipe:
    """How the judges are trained and measured; part of their cache key."""

    image: ImageJudgeConfig = field(default_factory=ImageJudgeConfig)
    image_train: ImageJudgeTrainConfig = field(default_factory=ImageJudgeTrainConfig)
    audio: AudioJudgeConfig = field(default_factory=AudioJudgeConfig)
    audio_train: AudioJudgeTrainConfig = field(default_factory=AudioJudgeTrainConfig)
    val_colourings: int = 2
    """Paintings per held-out digit in the accuracy report."""

    def key(self, tokenizers: Tokenizers) -> str:
        """Short hash of the recipe, CACHE_VERSION and the tokenizers' content."""
        blob = json.dumps({"v": CACHE_VERSION, "recipe": asdict(self),
                           "tokenizers": tokenizer_fingerprint(tokenizers)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def load_judges(tokenizers: Tokenizers | None = None, cache: bool = True, cache_dir: str | Path | None = None,
                recipe: JudgeRecipe | None = None, progress: bool = True) -> tuple[ImageJudge, AudioJudge]:
    """(ImageJudge, AudioJudge) for decoder outputs of `tokenizers` (default: the
    default tokenizers, `load_default`). With `cache`, loaded from the cache under
    `cache_dir` (default $MEGAMM_CACHE), trained and saved there first if missing (safe
    when several processes ask at once); without, trained in memory (a minute or two)."""
    recipe = recipe or JudgeRecipe()
    tokenizers = tokenizers if tokenizers is not None else load_default(cache_dir, progress=progress)
    if not cache:
        return train_judges(recipe, tokenizers, progress)
    target = cache_root(cache_dir) / f"judges-{recipe.key(tokenizers)}"
    build_once(target, lambda tmp: save_judges(train_judges(recipe, tokenizers, progress), tmp),
               what="the evaluation judges", progress=progress)
    return ImageJudge.load(target / "image"), AudioJudge.load(target / "audio")


def save_judges(judges: tuple[ImageJudge, AudioJudge], directory: str | Path) -> None:
    """`directory/{image,audio}/`."""
    judges[0].save(Path(directory) / "image")
    judges[1].save(Path(directory) / "audio")


def train_judges(recipe: JudgeRecipe, tokenizers: Tokenizers, progress: bool = True) -> tuple[ImageJudge, AudioJudge]:
    """Train both judges on the train split (originals + tokenizer round trips) and add
    their held-out accuracies to their reports. With two usable cores the image judge
    trains in a second process while this one trains the audio judge (each single-
    threaded, so the result is the same either way)."""
    if progress:
        print("megamm: training the evaluation judges on the train split", file=sys.stderr)
    if usable_cores() >= 2:
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            image_job = pool.submit(_train_image_judge, recipe, tokenizers.image, progress)
            audio_judge = _train_audio_judge(recipe, tokenizers.audio, progress)
            image_judge = image_job.result()
    else:
        image_judge = _train_image_judge(recipe, tokenizers.image, progress)
        audio_judge = _train_audio_judge(recipe, tokenizers.audio, progress)
    heldout = heldout_accuracy(image_judge, audio_judge, tokenizers, recipe.val_colourings)
    image_judge.report["heldout"] = heldout["image"]
    audio_judge.report["heldout"] = heldout["audio"]
    return image_judge, audio_judge


def heldout_accuracy(image_judge: ImageJudge, audio_judge: AudioJudge, tokenizers: Tokenizers | None,
                     colourings: int = 2, seed: int = 0) -> dict:
    """Accuracies on the held-out split (`colourings` paintings per digit), on the
    originals and, given `tokenizers`, on their round trips:

        image: {"original"|"roundtrip": {"digit", "foreground", "background", "all"}}
        audio: {"original"|"roundtrip": {"word_accuracy": mean, "exact": fraction of
                clips transcribed exactly}}
    """
    val = make_split("val", colourings=colourings, seed=seed)
    images, clips = {"original": val.images}, {"original": val.audio}
    if tokenizers is not None:
        with torch_threads(1):
            images["roundtrip"] = roundtrip_images(tokenizers.image, val.images)
            clips["roundtrip"] = roundtrip_audio(tokenizers.audio, val.audio)
    out = {"examples": len(val), "image": {}, "audio": {}}
    for name in images:
        out["image"][name] = {k: round(v, 4) for k, v in image_judge.accuracy(images[name], val.captions).items()}
        acc = [word_accuracy(ref, hyp) for ref, hyp in zip(val.captions, audio_judge.transcribe(clips[name]))]
        out["audio"][name] = {"word_accuracy": round(float(np.mean(acc)), 4),
                              "exact": round(float(np.mean([a == 1.0 for a in acc])), 4)}
    return out


def tokenizer_fingerprint(tokenizers: Tokenizers) -> str:
    """sha256 of the image and audio tokenizers' configs and weights (the text tokenizer
    plays no part in the judges)."""
    h = hashlib.sha256()
    for tok in (tokenizers.image, tokenizers.audio):
        config = asdict(tok.cfg) if hasattr(tok, "cfg") else repr(tok)  # a pretrained backend: class and settings
        h.update(json.dumps({"kind": tok.kind, "config": config}, sort_keys=True).encode())
        for name, tensor in sorted(tok.model.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def _train_image_judge(recipe: JudgeRecipe, image_tokenizer, progress: bool) -> ImageJudge:
    start, cpu = time.perf_counter(), time.process_time()
    images, captions = image_training_set(image_tokenizer, recipe.image_train)
    judge = ImageJudge.train(images, captions, recipe.image, recipe.image_train, progress=progress)
    judge.report["train_s"] = round(time.perf_counter() - start, 1)
    judge.report["train_cpu_s"] = round(time.process_time() - cpu, 1)
    return judge


def _train_audio_judge(recipe: JudgeRecipe, audio_tokenizer, progress: bool) -> AudioJudge:
    start, cpu = time.perf_counter(), time.process_time()
    clips, labels = audio_training_set(audio_tokenizer, recipe.audio_train)
    judge = AudioJudge.train(clips, labels, recipe.audio, recipe.audio_train, progress=progress)
    judge.report["train_s"] = round(time.perf_counter() - start, 1)
    judge.report["train_cpu_s"] = round(time.process_time() - cpu, 1)
    return judge


__all__ = ["ImageJudge", "AudioJudge", "JudgeRecipe", "load_judges", "train_judges", "save_judges",
           "heldout_accuracy", "caption_fields", "word_accuracy", "tokenizer_fingerprint", "PAINTS",
           "ImageJudgeConfig", "ImageJudgeTrainConfig", "AudioJudgeConfig", "AudioJudgeTrainConfig"]
