"""Tensor-parallel shards (and sequence parallelism) against the plain model, on 2 gloo
ranks in-process: same loss, same logits, and gradients that are the plain gradients'
slices."""
import pytest
import torch
from dist_util import run_ranks

from megamm.config import ModelConfig, VocabConfig
from megamm.model import build_model
from megamm.model.loss import GrammarTables, HeadChunking, grammar_loss
from megamm.parallel import TensorParallel, merge_shards, shard_dim
from megamm.parallel.build import build_transformer
from megamm.vocab import Vocab

# vocabulary rows 2 x 64: the tp=2 boundary (row 64) cuts the image code range [58, 82)
VOCAB = VocabConfig(text_size=40, n_special=10, image_codes=24, image_tokens=4, audio_codebooks=2,
                    audio_codebook_size=8, padded_size=128)
CFG = ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=40, vocab=VOCAB,
                  kernels="torch")


def batch(seed=0):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
    from test_model import packed_batch

    return packed_batch(Vocab(VOCAB), rows=2, length=41, seed=seed)


VARIANTS = [("modality", False), ("full", False), ("modality", True), ("target", True)]  # (loss_scope, sequence parallel)


def _tp_runs(rank, world):
    import torch.distributed as dist

    out = []
    for scope, sp in VARIANTS:
        cfg = CFG.replace(loss_scope=scope, z_loss=1e-3)
        tp = TensorParallel(dist.group.WORLD, rank, world, sequence_parallel=sp)
        model = build_transformer(cfg, "cpu", seed=3, tp=tp)
        x, y = batch()
        res = model(x, y)
        res.loss.backward()
        out.append((res.loss.item(), res.modality_count.tolist(), model(x).detach(),
                    {n: p.grad.clone() for n, p in model.named_parameters()}))
    return out


@pytest.fixture(scope="module")
def tp2_results():
    """One 2-rank launch computes every variant (process start-up dominates)."""
    return run_ranks(2, _tp_runs)


@pytest.mark.parametrize("variant", range(len(VARIANTS)), ids=[f"{s}-sp{int(p)}" for s, p in VARIANTS])
def test_tp2_matches_the_plain_model(tp2_results, variant):
    scope, _ = VARIANTS[variant]
    ref = build_model(CFG.replace(loss_scope=scope, z_loss=1e-3), seed=3)
    x, y = batch()
    out = ref(x, y)
    out.loss.backward()
    results = [r[variant] for r in tp2_results]
    for loss, counts, logits, _ in results:
        assert loss == pytest.approx(out.loss.item(), rel=1e-5)
        assert counts == out.modality_count.tolist()
        torch.testing.assert_close(logits, ref(x).detach(), rtol=1e-5, atol=1e-5)
    merged = merge_shards([r[3] for r in results])
    for n, p in ref.named_parameters():
        torch.testing.assert_close(merged[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
        if shard_dim(n) is None:  # replicated: the same full gradient on both ranks
            torch.testing.assert_close(results[0][3][n], results[1][3][n], rtol=1e-5, atol=1e-7, msg=n)


# 16-row chunks (shorter than a document), spans wider than 7 columns in 7-column blocks
LOSS_VARIANTS = [(scope, chunking) for scope in ("modality", "full")
                 for chunking in (HeadChunking(), HeadChunking(elements=16 * 7, min_rows=16))]


def _loss_shard(rank, world, h, w, states, targets):
    import torch.distributed as dist

    rows = w.shape[0] // world
    out = []
    for scope, chunking in LOSS_VARIANTS:
        hr = h.clone().requires_grad_(True)
        shard = w[rank * rows:(rank + 1) * rows].clone().requires_grad_(True)
        loss, stats, per_row = grammar_loss(hr, shard, rank * rows, states, targets, GrammarTables(Vocab(VOCAB)),
                                            scope, 0.01, dist.group.WORLD, chunking, rows=True)
        loss.backward()
        out.append((loss.item(), stats, hr.grad, shard.grad, per_row))
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_grammar_loss_equals_the_full_one(world):
    """Shard boundaries at 64 (world 2) and 32/64/96 (world 4) cut the text, image and
    audio id ranges; values, statistics (per modality and per row) and gradients equal the
    one-table loss, with one chunk and with chunks that cut the rows and columns."""
    torch.manual_seed(0)
    x, y = batch(seed=1)
    v = Vocab(VOCAB)
    h, w = torch.randn(x.numel(), 16), torch.randn(VOCAB.padded_size, 16) * 0.5
    per_rank = run_ranks(world, _loss_shard, h, w, v.states(x), y)
    for i, (scope, _) in enumerate(LOSS_VARIANTS):
        hr, wr = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss, stats, per_row = grammar_loss(hr, wr, 0, v.states(x), y, GrammarTables(v), scope, 0.01, rows=True)
        loss.backward()
        results = [r[i] for r in per_rank]
        for got, st, _, _, rows in results:  # every rank: the whole loss, statistics and row statistics
            assert got == pytest.approx(loss.item(), rel=1e-5)
            torch.testing.assert_close(st, stats)
            torch.testing.assert_close(rows, per_row)
        # each rank's gradient of h is its columns' part (the head's hook sums them)
        torch.testing.assert_close(sum(r[2] for r in results), hr.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.cat([r[3] for r in results]), wr.grad, rtol=1e-5, atol=1e-6)
