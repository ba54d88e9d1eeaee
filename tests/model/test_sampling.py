"""The KV cache and the grammar-constrained sampler (megamm/model/kv_cache.py, megamm/generate.py)."""
import dataclasses

import pytest
import torch

from megamm.config import VocabConfig, get_preset
from megamm.generate import Sampling, sample
from megamm.model import build_model
from megamm.model.kv_cache import KVCache
from megamm.vocab import State


def small_model(seed=0, n_kv_heads=2, image_tokens=6, codebooks=3):
    vocab = VocabConfig(text_size=40, n_special=16, image_codes=24, image_tokens=image_tokens,
                        audio_codebooks=codebooks, audio_codebook_size=8, pad_multiple=64)
    cfg = dataclasses.replace(get_preset("tiny"), n_layers=2, d_model=32, n_heads=4, n_kv_heads=n_kv_heads,
                              ffn_dim=64, max_seq_len=96, vocab=vocab, kernels="torch")
    return build_model(cfg, seed=seed).eval()


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_kv_cache_logits_equal_the_full_forward(n_kv_heads):
    model = small_model(n_kv_heads=n_kv_heads)
    v = model.vocab
    img = [v.image_start + i for i in (3, 1, 4, 1, 5, 9)]
    rows = [[v.bos, v.bot, 5, 6, 7, v.eot, v.boi, *img, v.eoi, v.eos, v.bos, v.bot, 1, 2],  # two documents
            [v.bos, v.boi, *img[:4]]]
    width = max(map(len, rows))
    ids = torch.tensor([[v.pad] * (width - len(r)) + r for r in rows])  # left padding
    with torch.no_grad():
        cache = KVCache(model.config, 2, width)
        chunks = [model(ids[:, :5], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(5, 9)]
        chunks.append(model(ids[:, 9:], cache=cache))  # a multi-token chunk after single steps
        incremental = torch.cat(chunks, 1)
        for b, r in enumerate(rows):
            full = model(torch.tensor([r]))[0]
            assert torch.allclose(incremental[b, width - len(r):], full, atol=1e-5), b
    assert cache.layers[0].k.shape[2] == n_kv_heads  # only the kv heads are cached


def naive_greedy(model, prompt, stop, n):
    """Recompute the whole prefix every step (the reference the cache must equal)."""
    v, ids = model.vocab, list(prompt)
    allowed = v.allowed_table()
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1]
            state = v.states(torch.tensor(ids))[-1]
            nxt = int(logits.masked_fill(~allowed[state], float("-inf")).argmax())
            ids.append(nxt)
            out.append(nxt)
            if nxt in stop:
                break
    return out


def test_greedy_is_deterministic_and_equals_recomputing_the_prefix():
    model = small_model(seed=3)
    v = model.vocab
    prompts = [[v.bos, v.bot, 7, 8, v.eot, v.boi], [v.bos, v.boi]]
    got = sample(model, prompts, [v.eoi], 20, Sampling(temperature=0))
    assert got == sample(model, prompts, [v.eoi], 20, Sampling(temperature=0, seed=99))
    for p, g in zip(prompts, got):
        assert g == naive_greedy(model, p, {v.eoi}, 20)
        assert len(g) == 7 and g[-1] == v.eoi  # exactly N codes, then <eoi>
    assert sample(model, prompts, [v.eoi], 20, Sampling(temperature=1.0, top_k=1, seed=5)) == got


def random_prompt(v, gen: torch.Generator) -> list[int]:
    """A grammar-valid document prefix that stops in a random state."""
    ids = [v.bos]
    for _ in range(int(torch.randint(0, 3, (1,), generator=gen))):
        kind = int(torch.randint(0, 3, (1,), generator=gen))
        if kind == 0:
            ids += v.text_segment(torch.randint(0, v.cfg.text_size, (3,), generator=gen).tolist())
        elif kind == 1:
            ids += v.image_segment(torch.randint(0, v.cfg.image_codes, (v.cfg.image_tokens,), generator=gen))
        else:
            ids += v.audio_segment(torch.randint(0, v.cfg.audio_codebook_size, (2, v.cfg.audio_codebooks),
                                                 generator=gen))
    opener = [v.bot, v.boi, v.boa, None][int(torch.randint(0, 4, (1,), generator=gen))]
    if opener is not None:
        ids.append(opener)
        cut = int(torch.randint(0, 5, (1,), generator=gen))  # stop part-way into the segment
        if opener == v.boi:
            cut = min(cut, v.cfg.image_tokens)
            ids += (v.image_start + torch.randint(0, v.cfg.image_codes, (cut,), generator=gen)).tolist()
        elif opener == v.boa:
            ids += v.audio_ids(torch.randint(0, v.cfg.audio_codebook_size, (cut // 2, v.cfg.audio_codebooks),
                                             generator=gen)).tolist()
        else:
            ids += torch.randint(0, v.cfg.text_size, (cut,), generator=gen).tolist()
    return ids


def test_sampling_never_violates_the_grammar():
    gen = torch.Generator().manual_seed(0)
    for trial in range(6):
        model = small_model(seed=trial, image_tokens=int(torch.randint(2, 7, (1,), generator=gen)),
                            codebooks=int(torch.randint(1, 4, (1,), generator=gen)))
        v = model.vocab
        # push the logits toward ids the grammar forbids, so the mask has work to do
        with torch.no_grad():
            model.head.weight[v.used_size:] += 5.0 * model.head.weight[v.used_size:].sign()
        prompts = [random_prompt(v, gen) for _ in range(5)]
        for sampling in (Sampling(temperature=1.5, seed=trial), Sampling(temperature=0.8, top_k=3, seed=trial),
                         Sampling(temperature=1.0, top_p=0.5, seed=trial)):
            outs = sample(model, prompts, [v.eos], 40, sampling)
            for p, o in zip(prompts, outs):
                assert v.grammar_violations(torch.tensor(p)).numel() == 0, p
                doc = torch.tensor(p + o)
                assert v.grammar_violations(doc).numel() == 0, (p, o)
                states = v.states(doc)
                # every image segment that closed has exactly N codes; audio closes on frames
                for i in torch.nonzero(doc == v.eoi).flatten().tolist():
                    assert int(states[i - 1]) == State.IMAGE_END
                for i in torch.nonzero(doc == v.eoa).flatten().tolist():
                    assert int(states[i - 1]) == State.AUDIO


def test_cfg_scale_one_equals_plain_sampling_and_other_scales_change_it():
    model = small_model(seed=1)
    v = model.vocab
    prompt = [v.bos, v.bot, 3, 4, 5, 6, v.eot, v.boi]
    uncond = [v.bos, v.boi]
    plain = sample(model, [prompt] * 3, [v.eoi], 10, Sampling(temperature=1.0, seed=7))
    one = sample(model, [prompt] * 3, [v.eoi], 10, Sampling(temperature=1.0, seed=7, cfg_scale=1.0), [uncond] * 3)
    assert one == plain
    guided = sample(model, [prompt] * 3, [v.eoi], 10, Sampling(temperature=1.0, seed=7, cfg_scale=8.0),
                    [uncond] * 3)
    assert guided != plain
    for g in guided:
        assert len(g) == v.cfg.image_tokens + 1 and g[-1] == v.eoi


def test_bad_sampling_settings_are_refused():
    for kwargs in ({"temperature": -1}, {"top_k": -2}, {"top_p": 0}, {"top_p": 1.5}, {"cfg_scale": -1}):
        with pytest.raises(ValueError):
            Sampling(**kwargs)
    model = small_model()
    with pytest.raises(ValueError, match="<bos>"):
        sample(model, [[5, 6]], [model.vocab.eos], 3)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sample(model, [[model.vocab.bos, 10**6]], [model.vocab.eos], 3)
