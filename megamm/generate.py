"""Sampling from a trained model: batched, KV-cached, constrained by the modality grammar.

Two layers:

    sample(model, prompts, stop_ids, max_new_tokens, sampling)    ids in, ids out
    MultimodalGenerator(model, tokenizers).generate(segments, to)  captions/images/clips in and out

Every step masks the logits with the grammar state of the row (megamm.vocab — the same
tables the loss uses), so an image is always exactly its N codes followed by <eoi> and
audio is whole frames (codebook 0, 1, .., C-1, then <eoa> only at a frame boundary).

Classifier-free guidance: with `cfg_scale != 1` and `uncond_prompts`, each row has a
second, unconditional stream (its prompt without the caption, as caption dropout
showed the model in training) with its own KV-cache rows. At steps whose state is
inside an image or audio segment the next-token log-probabilities become
    log p_u + s * (log p_c - log p_u)     (s = cfg_scale; s = 1 gives log p_c exactly)
and both streams take the sampled token. Elsewhere (text, markers) the conditional
stream decides alone.

Rows of different prompt lengths are left-padded with <pad>: pad tokens sit before the
row's <bos>, in document 0, so they are invisible to the row's tokens (the cache's
document mask) and its RoPE positions start at 0 at <bos>.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megamm.checkpoint import CheckpointError, load_model, read_meta, tokenizers_dir, verified_checkpoint_dir
from megamm.model.kv_cache import KVCache
from megamm.tokenizers import Tokenizers
from megamm.vocab import State, Vocab


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    """0 = greedy (argmax)."""
    top_k: int = 0
    """Keep the k most likely allowed ids (0 = all)."""
    top_p: float = 1.0
    """Keep the smallest set of ids whose probability reaches top_p (1 = all)."""
    cfg_scale: float = 1.0
    """Classifier-free guidance scale for image and audio tokens (1 = off)."""
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")
        if not self.cfg_scale >= 0:
            raise ValueError(f"cfg scale must be >= 0, got {self.cfg_scale}")


def left_pad(rows: list[list[int]], pad: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], dtype=torch.long)


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [B,V] with -inf for disallowed ids -> the same with top-k/top-p cut to -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop an id when the ids before it already reach top_p (the first always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """One id per row from masked logits [B,V]."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = _filter(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    probs = logits.float().softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def sample(model, prompts: list[list[int]], stop_ids, max_new_tokens: int, sampling: Sampling = Sampling(),
           uncond_prompts: list[list[int]] | None = None) -> list[list[int]]:
    """Continue each prompt (ids, starting with <bos>) until it emits one of `stop_ids`
    (kept as its last id) or `max_new_tokens` ids. Returns the new ids of each row."""
    vocab: Vocab = model.vocab
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    n = len(prompts)
    guided = sampling.cfg_scale != 1.0 and uncond_prompts is not None
    if guided and len(uncond_prompts) != n:
        raise ValueError(f"{len(uncond_prompts)} unconditional prompts for {n} prompts")
    for p in prompts + (uncond_prompts or []):
        vocab.check_ids(p, "prompt")
        if not p or p[0] != vocab.bos:
            raise ValueError("a prompt must start with <bos>")
    rows = prompts + (uncond_prompts if guided else [])
    ids = left_pad(rows, vocab.pad).to(device)
    cache = KVCache(model.config, len(rows), ids.shape[1] + max_new_tokens, dtype=dtype, device=device)
    allowed = vocab.allowed_table().to(device)
    guided_states = torch.zeros(vocab.n_states, dtype=torch.bool, device=device)
    guided_states[int(State.IMAGE)] = True
    guided_states[int(State.AUDIO):] = True
    stops = torch.tensor(sorted(set(int(s) for s in stop_ids)), device=device)
    generator = torch.Generator(device=device).manual_seed(sampling.seed)

    # the conditional rows' grammar position (their states decide), advanced token by token
    markers = tuple(t[:, -1] for t in vocab.markers(ids[:n]))
    logits = model(ids, cache=cache)[:, -1].float()
    out = torch.zeros(n, 0, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        state = vocab.state_of(*markers)
        mask = allowed[state]  # [n, V]
        logp = logits[:n].masked_fill(~mask, float("-inf")).log_softmax(-1)
        if guided:
            logp_u = logits[n:].masked_fill(~mask, float("-inf")).log_softmax(-1)
            mix = logp + (sampling.cfg_scale - 1.0) * torch.where(mask, logp - logp_u, torch.zeros_like(logp))
            logp = torch.where(guided_states[state][:, None], mix.masked_fill(~mask, float("-inf")), logp)
        nxt = choose(logp, sampling, generator)
        nxt = torch.where(done, torch.full_like(nxt, vocab.pad), nxt)
        out = torch.cat([out, nxt[:, None]], 1)
        markers = vocab.advance_markers(markers, nxt)
        done |= torch.isin(nxt, stops)
        if bool(done.all()):
            break
        step_ids = torch.cat([nxt, nxt]) if guided else nxt
        logits = model(step_ids[:, None], cache=cache)[:, -1].float()
    result = []
    for row in out.tolist():
        hit = [i for i, t in enumerate(row) if t in set(stops.tolist())]
        result.append(row[: hit[0] + 1] if hit else row)
    return result


# ---- modalities in, modalities out --------------------------------------------------------
OPENERS = {"text": "bot", "image": "boi", "audio": "boa"}
CLOSERS = {"text": "eot", "image": "eoi", "audio": "eoa"}


class MultimodalGenerator:
    """Captions, images and clips in; captions, images and clips out.

    `segments`: a list of (modality, value) in document order — ("text", str),
    ("image", uint8 [H,W,3]), ("audio", float32 [T] at the codec's sample rate) — any
    order the grammar allows, then `to` names the modality to generate.
    """

    def __init__(self, model, tokenizers, max_text_tokens: int = 64):
        self.model, self.tok = model.eval(), tokenizers
        self.vocab: Vocab = model.vocab
        self.max_text_tokens = max_text_tokens

    def segment_ids(self, modality: str, value) -> list[int]:
        v = self.vocab
        if modality == "text":
            if not str(value).strip():
                raise ValueError("empty caption")
            return v.text_segment(self.tok.text.encode(str(value)))
        if modality == "image":
            img = np.asarray(value)
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(f"an image must be uint8 [H, W, 3], got {img.dtype} {list(img.shape)}")
            return v.image_segment(self.tok.image.encode(img[None])[0])
        if modality == "audio":
            wave = np.asarray(value, np.float32).reshape(-1)
            if wave.size == 0:
                raise ValueError("empty audio clip")
            codes = self.tok.audio.encode(wave[None])[0].reshape(-1, self.tok.audio.n_codebooks)
            return v.audio_segment(codes)
        raise ValueError(f"unknown modality {modality!r}")

    def prompt(self, segments, to: str, conditional: bool = True) -> list[int]:
        """<bos> segments.. <opener of `to`>; without the text segments if not conditional."""
        if to not in OPENERS:
            raise ValueError(f"--to must be one of {', '.join(OPENERS)}, got {to!r}")
        ids = [self.vocab.bos]
        for modality, value in segments:
            if conditional or modality != "text":
                ids += self.segment_ids(modality, value)
        return ids + [self.vocab.special(OPENERS[to])]

    def max_new_tokens(self, to: str, prompt_len: int) -> int:
        room = self.model.config.max_seq_len - prompt_len
        if to == "image":
            return self.vocab.cfg.image_tokens + 1
        if to == "text":
            return max(1, min(self.max_text_tokens, room))
        C = self.vocab.cfg.audio_codebooks
        return max(C + 1, room - (room - 1) % C)  # whole frames, then <eoa>

    @torch.no_grad()
    def generate_ids(self, segments, to: str, num_samples: int = 1, sampling: Sampling = Sampling()):
        """-> list of num_samples lists of the generated segment's ids (content only)."""
        return self.generate_batch_ids([segments] * num_samples, to, sampling)

    @torch.no_grad()
    def generate_batch_ids(self, prompts: list, to: str, sampling: Sampling = Sampling()):
        """One generation per prompt (a list of segments each), in one batch -> the
        generated segments' ids (content only)."""
        if to == "image" and not getattr(self.tok.image, "can_decode", True):
            raise ValueError(f"--to image: the image tokenizer ({self.tok.image!r}) encodes only, so generated "
                             f"codes cannot become pixels; prepare the data with a decoding one (Emu3VQVAE, JanusVQVAE)")
        ids = [self.prompt(p, to) for p in prompts]
        uncond = None
        if sampling.cfg_scale != 1.0 and to in ("image", "audio"):
            uncond = [self.prompt(p, to, conditional=False) for p in prompts]
        shortest = min(map(len, ids))  # the longest budget any row may need
        limit = self.max_new_tokens(to, shortest)
        if limit < (self.vocab.cfg.image_tokens + 1 if to == "image" else 2):
            raise ValueError(f"the prompt ({shortest} tokens) leaves no room in the model's "
                             f"{self.model.config.max_seq_len}-token context")
        closer = self.vocab.special(CLOSERS[to])
        outs = sample(self.model, ids, [closer, self.vocab.eos], limit, sampling, uncond)
        return [row[:-1] if row and row[-1] in (closer, self.vocab.eos) else row for row in outs]

    def decode(self, to: str, ids: list[int]):
        v = self.vocab
        if to == "text":  # one printable line (an untrained model's bytes may hold control characters)
            text = self.tok.text.decode([i for i in ids if 0 <= i < v.cfg.text_size])
            return "".join(ch if ch.isprintable() else " " for ch in text).strip()
        if to == "image":
            codes = v.image_codes(ids)
            return self.tok.image.decode(codes[None])[0]
        C = v.cfg.audio_codebooks
        whole = ids[: len(ids) // C * C]
        if not whole:
            return np.zeros(0, np.float32)
        return self.tok.audio.decode(v.audio_codes(whole).reshape(1, -1))[0]

    def generate(self, segments, to: str, num_samples: int = 1, sampling: Sampling = Sampling()):
        """-> num_samples outputs: str (text), uint8 [S,S,3] (image) or float32 [T] (audio)."""
        return [self.decode(to, ids) for ids in self.generate_ids(segments, to, num_samples, sampling)]


def tokenizers_misfit(model_vocab, tokenizers: Tokenizers) -> str | None:
    """How the vocabulary `tokenizers` make differs from `model_vocab` (a VocabConfig),
    e.g. "image_codes=64 vs model 32768"; None when they make the same layout."""
    theirs = tokenizers.vocab_config(model_vocab.n_special, model_vocab.pad_multiple)
    return theirs.layout_difference(model_vocab, "model")


def tokenizers_fit(model_vocab, tokenizers: Tokenizers) -> bool:
    """Whether `tokenizers` make the vocabulary `model_vocab` (a VocabConfig) was built for."""
    return tokenizers_misfit(model_vocab, tokenizers) is None


def load_generator(checkpoint, device="cpu") -> MultimodalGenerator:
    """A MultimodalGenerator from a checkpoint directory alone (save dir or step dir):
    the weights of any layout, consolidated, and the tokenizers the checkpoint carries."""
    ckpt = verified_checkpoint_dir(checkpoint)
    tok_dir = tokenizers_dir(ckpt, read_meta(ckpt))
    if tok_dir is None:
        raise CheckpointError(f"{ckpt} carries no tokenizers (trained on token shards without them); "
                              "generation needs the text, image and audio tokenizers")
    try:
        tokenizers = Tokenizers.load(tok_dir)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{ckpt}: its tokenizers at {tok_dir} are unreadable ({e})") from None
    model = load_model(ckpt).to(device)
    misfit = tokenizers_misfit(model.config.vocab, tokenizers)
    if misfit:
        raise CheckpointError(f"{ckpt}: its tokenizers do not match the model's vocabulary ({misfit})")
    return MultimodalGenerator(model, tokenizers)
