import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megamm.config import ModelConfig, VocabConfig
from megamm.model import Transformer, build_model, materialize
from megamm.model.layers import Block
from megamm.vocab import State, Vocab

VOCAB = VocabConfig(text_size=40, n_special=10, image_codes=16, image_tokens=4, audio_codebooks=2,
                    audio_codebook_size=8, pad_multiple=8)
CFG = ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=64, vocab=VOCAB,
                  kernels="torch")


def random_doc(v: Vocab, rng) -> list[int]:
    segs = [v.text_segment(rng.integers(0, VOCAB.text_size, int(rng.integers(1, 5)))),
            v.image_segment(rng.integers(0, VOCAB.image_codes, VOCAB.image_tokens)),
            v.audio_segment(rng.integers(0, VOCAB.audio_codebook_size, (int(rng.integers(1, 3)), 2)))]
    order = rng.permutation(3)
    return v.document([segs[i] for i in order])


def packed_batch(v: Vocab, rows=2, length=41, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(rows):
        row = []
        while len(row) < length:
            row += random_doc(v, rng)
        row = row[:length - 3] + [v.pad] * 3
        out.append(row)
    t = torch.tensor(out)
    return t[:, :-1], t[:, 1:]


def test_logits_shape_and_loss_is_finite():
    m = build_model(CFG, seed=0)
    x, y = packed_batch(m.vocab)
    assert m(x).shape == (2, 40, m.vocab.size)
    out = m(x, y)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert set(out.modality_losses()) == {"text", "image", "audio", "special"}


def reference_losses(m: Transformer, x, y, scope):
    """Cross-entropy from full logits with the grammar applied as a mask."""
    v = m.vocab
    logits = m(x).float()
    states = v.states(x)
    if scope != "full":
        allowed = torch.stack([v.allowed_mask(s) for s in range(v.n_states)])[states]
        logits = logits.masked_fill(~allowed, float("-inf"))
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
    counted = (y != v.pad) & (states != State.DONE)
    if scope == "target":
        counted &= ~v.prompt_targets(x, y)
    return ce[counted.reshape(-1)].mean()


@pytest.mark.parametrize("scope", ["modality", "full", "target"])
def test_loss_equals_masked_cross_entropy_of_the_logits(scope):
    m = build_model(CFG.replace(loss_scope=scope), seed=1)
    x, y = packed_batch(m.vocab, seed=3)
    got = m(x, y).loss
    torch.testing.assert_close(got, reference_losses(m, x, y, scope), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scope,z", [("modality", 0.0), ("modality", 1e-2), ("full", 1e-2), ("target", 1e-2)])
def test_loss_gradients_equal_those_of_the_masked_cross_entropy(scope, z):
    """The head's loss and every parameter's gradient equal those of the dense masked
    softmax over the full logits, z-loss included."""
    x, y = packed_batch(Vocab(VOCAB), seed=4)
    grads = []
    for dense in (False, True):
        m = build_model(CFG.replace(loss_scope=scope, z_loss=z), seed=2)
        if dense:
            v = m.vocab
            logits = m(x).float()
            states = v.states(x)
            if scope != "full":
                logits = logits.masked_fill(~v.allowed_table()[states], float("-inf"))
            logits = logits.reshape(-1, logits.shape[-1])
            counted = (y != v.pad) & (states != State.DONE)
            if scope == "target":
                counted &= ~v.prompt_targets(x, y)
            counted = counted.reshape(-1)
            ce = F.cross_entropy(logits, y.reshape(-1), reduction="none")
            loss = (ce + z * torch.logsumexp(logits, -1) ** 2)[counted].mean()
        else:
            loss = m(x, y).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    (got, g_got), (want, g_want) = grads
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for n in g_want:
        torch.testing.assert_close(g_got[n], g_want[n], rtol=1e-4, atol=1e-6, msg=n)


# audio codebook 0's ids sit 97 ids after <eoa> (9 unnamed specials + 96 image codes): the
# head gathers that state's rows instead of spanning the gap (VOCAB spans it with a bias)
WIDE_GAP = VocabConfig(text_size=40, n_special=10, image_codes=96, image_tokens=4, audio_codebooks=2,
                       audio_codebook_size=8, pad_multiple=8)


@pytest.mark.parametrize("vocab_cfg", [VOCAB, WIDE_GAP], ids=["bias", "gather"])
@pytest.mark.parametrize("scope", ["modality", "full"])
def test_one_table_loss_equals_the_sharded_function_on_one_rank(scope, vocab_cfg):
    """grammar_loss without a group (counted rows only, each over its state's columns)
    against the vocabulary-parallel Function run with the whole table, a -inf mask and no
    group: same loss, stats, z-loss and gradients, on rows whose targets are random ids
    (many forbidden by the grammar, so not counted) and <pad> targets at the rows' ends."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from head_reference import _ShardedCrossEntropy  # the dense vocabulary-parallel softmax of before

    from megamm.model.loss import GrammarTables, grammar_loss

    v = Vocab(vocab_cfg)
    x, y = packed_batch(v, seed=9)
    y = torch.where(torch.rand(y.shape, generator=torch.Generator().manual_seed(0)) < 0.3,
                    torch.randint(0, v.used_size, y.shape, generator=torch.Generator().manual_seed(1)), y)
    states = v.states(x)
    h0, w0 = torch.randn(x.numel(), 16), torch.randn(v.size, 16) * 0.5
    tables = GrammarTables(v)
    h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    loss, stats = grammar_loss(h, w, 0, states, y, tables, scope, 0.01)
    loss.backward()
    hr, wr = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    counted = v.counted_targets(states.reshape(-1), y.reshape(-1), scope != "full")
    assert 0 < int(counted.sum()) < y.numel() - 6  # some targets dropped beyond the 6 pads
    bias = None
    if scope != "full":
        bias = torch.zeros(v.n_states, v.size).masked_fill_(~v.allowed_table(), float("-inf"))[states.reshape(-1)]
    ce, lse = _ShardedCrossEntropy.apply(F.linear(hr, wr), bias, y.reshape(-1), None)
    want = (ce[counted] + 0.01 * lse[counted] ** 2).sum()
    want.backward()
    assert torch.isfinite(loss) and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats[len(stats) // 2:].sum(), counted.float().sum())
    torch.testing.assert_close(stats[:len(stats) // 2].sum(), ce[counted].sum().detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, hr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-5, atol=1e-6)
    assert (h.grad.reshape(counted.shape[0], -1)[~counted] == 0).all()  # uncounted rows: untouched
    # row statistics (a blend's per-source loss): each row's summed ce and counted targets
    _, same, per_row = grammar_loss(h0, w0, 0, states, y, tables, scope, 0.01, rows=True)
    torch.testing.assert_close(same, stats)
    assert per_row.shape == (2, y.shape[0])
    torch.testing.assert_close(per_row[0], torch.where(counted, ce.detach(), 0).view(y.shape[0], -1).sum(1),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_row[1], counted.view(y.shape[0], -1).float().sum(1))


def test_head_columns_are_exactly_each_states_allowed_ids():
    """The one-table head computes, per grammar state, a set of columns whose unbiased
    ones are exactly the ids the state allows; forbidden columns inside a span carry
    FORBIDDEN. Both layouts occur: a biased span (text + <eot>) and gathered rows."""
    from megamm.config import get_preset
    from megamm.model.loss import FORBIDDEN, GrammarTables

    for cfg, want_kinds in ((VOCAB, {"slice", "bias"}), (WIDE_GAP, {"slice", "bias", "gather"}),
                            (get_preset("small").vocab, {"slice", "bias", "gather"})):
        v = Vocab(cfg)
        kinds = set()
        for s, (lo, hi, ids, bias) in enumerate(GrammarTables(v).spans("cpu")):
            cols = torch.arange(lo, hi) if ids is None else ids
            if bias is not None:
                assert set(bias.unique().tolist()) == {0.0, torch.tensor(FORBIDDEN).item()}
                cols = cols[bias == 0]
            assert torch.equal(cols, v.allowed_mask(s).nonzero().flatten()), (cfg, s)
            kinds.add("gather" if ids is not None else "bias" if bias is not None else "slice")
        assert kinds == want_kinds, cfg


def test_one_table_loss_in_bf16_follows_the_dense_masked_softmax():
    """bf16 activations and table (what training under bf16 runs): the fused head's loss
    and gradients match F.linear(h, w).float() with a -inf mask to bf16 precision."""
    from megamm.model.loss import GrammarTables, grammar_loss

    v = Vocab(VOCAB)
    x, y = packed_batch(v, rows=4, seed=11)
    states = v.states(x)
    g = torch.Generator().manual_seed(3)
    h0, w0 = torch.randn(x.numel(), 32, generator=g).bfloat16(), (torch.randn(v.size, 32, generator=g) * 0.3).bfloat16()
    h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    loss, _ = grammar_loss(h, w, 0, states, y, GrammarTables(v), "modality", 0.01)
    loss.backward()
    hr, wr = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    logits = F.linear(hr, wr).float().masked_fill(~v.allowed_table()[states.reshape(-1)], float("-inf"))
    counted = v.counted_targets(states.reshape(-1), y.reshape(-1))
    want = (F.cross_entropy(logits, y.reshape(-1), reduction="none") + 0.01 * torch.logsumexp(logits, -1) ** 2)[counted].sum()
    want.backward()
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-3)
    for got, ref in ((h.grad, hr.grad), (w.grad, wr.grad)):
        scale = ref.float().abs().max()
        assert (got.float() - ref.float()).abs().max() <= 2e-2 * scale


def test_one_table_head_backward_runs_once():
    """The head's backward turns its saved softmax into the gradient in place: a second
    backward through a retained graph is refused, not silently wrong."""
    from megamm.model.loss import GrammarTables, grammar_loss

    v = Vocab(VOCAB)
    x, y = packed_batch(v, seed=2)
    h = torch.randn(x.numel(), 8, requires_grad=True)
    w = torch.randn(v.size, 8, requires_grad=True)
    loss, _ = grammar_loss(h, w, 0, v.states(x), y, GrammarTables(v), "modality")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        loss.backward()


def test_target_scope_counts_only_the_output_segments():
    """Same per-token losses as the modality scope, fewer of them: none of a prompt."""
    v = Vocab(VOCAB)
    x, y = packed_batch(v, seed=3)
    mod = build_model(CFG, seed=1)(x, y)
    tgt = build_model(CFG.replace(loss_scope="target"), seed=1)(x, y)
    n_prompt = int((v.prompt_targets(x, y) & (y != v.pad)).sum())
    assert n_prompt > 0
    assert tgt.modality_count.sum() < mod.modality_count.sum()
    assert mod.modality_count.sum() - tgt.modality_count.sum() <= n_prompt


def test_pipeline_stages_chained_give_the_plain_models_loss():
    """The stages deepspeed.pipe runs, chained in one process, under every loss scope:
    the embedding stage applies the scope's targets as the plain model does."""
    from megamm.parallel.pipeline import BlockStage, EmbeddingStage, HeadStage, NormStage

    x, y = packed_batch(Vocab(VOCAB), seed=5)
    for scope in ("modality", "full", "target"):
        cfg = CFG.replace(loss_scope=scope)
        stages = [EmbeddingStage(cfg, None, "cpu", 7), *(BlockStage(cfg, i, None, "cpu", 7) for i in range(cfg.n_layers)),
                  NormStage(cfg, None, "cpu", 7), HeadStage(cfg, None, "cpu", 7)]
        acts = (x, y)
        for stage in stages:
            acts = stage(acts)
        loss_sum, stats = acts
        want = build_model(cfg, seed=7)(x, y)
        torch.testing.assert_close(loss_sum, want.loss_sum, rtol=1e-5, atol=1e-5, msg=scope)
        torch.testing.assert_close(stats, torch.cat([want.modality_sum, want.modality_count]), rtol=1e-5,
                                   atol=1e-5, msg=scope)


def test_modality_scope_is_lower_than_full_at_init():
    m = build_model(CFG, seed=1)
    x, y = packed_batch(m.vocab, seed=3)
    full = build_model(CFG.replace(loss_scope="full"), seed=1)(x, y).loss
    assert m(x, y).loss < full


def test_per_modality_sums_partition_the_loss():
    m = build_model(CFG, seed=2)
    x, y = packed_batch(m.vocab, seed=4)
    out = m(x, y)
    total = out.modality_sum.sum() / out.modality_count.sum()
    torch.testing.assert_close(total, out.loss.detach(), rtol=1e-5, atol=1e-6)
    # image targets are exactly the image codes of the batch
    n_img = ((y >= m.vocab.image_start) & (y < m.vocab.audio_start)).sum()
    assert int(out.modality_count[1]) == int(n_img)


def test_packed_documents_do_not_see_each_other_and_positions_restart():
    m = build_model(CFG, seed=0)
    v, rng = m.vocab, np.random.default_rng(7)
    a, b = random_doc(v, rng), random_doc(v, rng)
    packed = m(torch.tensor([a + b]))
    alone_a, alone_b = m(torch.tensor([a])), m(torch.tensor([b]))
    torch.testing.assert_close(packed[:, : len(a)], alone_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:, len(a):], alone_b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attention_packed_by_document_equals_the_masked_dense_one(kv_heads, monkeypatch):
    """The sdpa path's document packing (each document a row of its own, rows bucketed by
    length, is_causal) against one masked attention over the packed rows: same output and
    gradients, on rows with several documents, one document, and a row starting mid-document
    (doc id 0 before its first <bos>); and an answer cached per batch is not reused once the
    doc ids change in place."""
    import megamm.model.attention as A

    doc = torch.tensor([[1] * 5 + [2] * 20 + [3] * 3 + [4] * 12 + [5] * 8,
                        [1] * 48,
                        [0] * 7 + [1] * 30 + [2] * 11])
    g = torch.Generator().manual_seed(0)
    q0 = torch.randn(3, 48, 4, 8, generator=g)
    k0, v0 = torch.randn(3, 48, kv_heads, 8, generator=g), torch.randn(3, 48, kv_heads, 8, generator=g)
    runs = {}
    for name, share in (("dense", -1.0), ("packed", 10.0)):
        monkeypatch.setattr(A, "PACK_BELOW", share)
        d = doc.clone()  # a new tensor: no cached answer
        packed = A._segments(d)
        assert (packed is None) == (name == "dense")
        if packed:
            assert len(packed[2]) >= 3 and sum(n for n, _ in packed[2]) == 9  # 9 segments, several buckets
        q, k, v = (t.clone().requires_grad_(True) for t in (q0, k0, v0))
        out = A.attend(q, k, v, d)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        runs[name] = (out.detach(), q.grad, k.grad, v.grad)
    for got, want in zip(runs["packed"], runs["dense"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    d = doc.clone()
    first = A._segments(d)
    d[1, 24:] = 2  # the one-document row now holds two: the cached answer must not be reused
    assert A._segments(d)[1].shape == first[1].shape and sum(n for n, _ in A._segments(d)[2]) == 10


def test_attention_is_causal():
    m = build_model(CFG, seed=0)
    x, _ = packed_batch(m.vocab, rows=1)
    full = m(x)
    changed = x.clone()
    changed[0, 30:] = m.vocab.image_start
    torch.testing.assert_close(m(changed)[:, :30], full[:, :30])


def test_init_depends_only_on_the_seed_and_each_parameters_name():
    a, b, c = build_model(CFG, seed=11), build_model(CFG, seed=11), build_model(CFG, seed=12)
    for (n, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), n
        if p.std() > 0:  # norms (ones) and modality vectors (zeros) do not depend on the seed
            assert not torch.equal(p, r), n
    # a block built on its own (as a pipeline stage builds it) under its plain-model name
    with torch.device("meta"):
        block = Block(CFG, device="meta")
    materialize(block, "cpu", seed=11, prefix="layers.1.")
    for (n, p), q in zip(block.named_parameters(), a.layers[1].parameters()):
        assert torch.equal(p, q), n
    # the residual-branch outputs start smaller than the other projections
    assert a.layers[0].attn.o_proj.weight.std() < 0.75 * a.layers[0].attn.q_proj.weight.std()


def test_activation_checkpointing_gives_the_same_gradients():
    x, y = packed_batch(Vocab(VOCAB), seed=5)
    grads = []
    for ac in (False, True):
        m = build_model(CFG.replace(activation_checkpointing=ac), seed=0).train()
        m(x, y).loss.backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1)


def test_z_loss_adds_the_squared_log_normaliser():
    x, y = packed_batch(Vocab(VOCAB), seed=6)
    plain = build_model(CFG, seed=0)(x, y).loss
    with_z = build_model(CFG.replace(z_loss=1e-2), seed=0)(x, y).loss
    assert with_z > plain


def test_loss_falls_when_overfitting_a_small_batch():
    m = build_model(CFG, seed=0)
    x, y = packed_batch(m.vocab, seed=8)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    first = m(x, y).loss.item()
    for _ in range(60):
        loss = m(x, y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first


def test_embedding_folds_modality_vectors_for_export():
    m = build_model(CFG, seed=0)
    with torch.no_grad():
        m.embed.modality.normal_()
    ids = torch.tensor([[m.vocab.bos, 3, m.vocab.image_start + 1]])
    folded = m.embed.folded_table()
    torch.testing.assert_close(F.embedding(ids, folded), m.embed(ids))


def test_kernels_triton_refuses_when_triton_cannot_run():
    m = build_model(CFG.replace(kernels="triton"), seed=0)
    x, _ = packed_batch(m.vocab, rows=1)
    with pytest.raises(RuntimeError, match="cannot run here"):
        m(x)


@pytest.mark.parametrize("rows,length", [(3, 65), (4, 513)])
def test_one_table_head_is_bitwise_the_same_with_one_or_two_threads(rows, length):
    """Launchers that leave a rank different thread counts (srun, mpirun) must train the same
    curve: the head's GEMMs on a state's few rows (the CPU rounds 5-11-row products
    differently per thread count) are padded, and its gradient GEMMs reduce over fixed
    blocks (MKL splits reductions over >= 1024 rows or columns between threads), so loss and
    gradients are bitwise equal. 4 x 512 positions put 2,048 rows in the text state's chunk."""
    from megamm.config import get_preset
    from megamm.data.synthetic import synthetic_document
    from megamm.model.loss import GrammarTables, grammar_loss

    v = Vocab(get_preset("tiny").vocab)
    rng = np.random.default_rng(0)
    ids = []
    while len(ids) < rows * length:
        ids += synthetic_document(v, rng)
    batch = torch.tensor(ids[:rows * length]).view(rows, length)
    x, y = batch[:, :-1], batch[:, 1:]
    states = v.states(x)
    sizes = torch.bincount(states.flatten(), minlength=v.n_states)
    assert ((sizes >= 5) & (sizes <= 11)).any() or sizes.max() >= 1024  # a sensitive size
    g = torch.Generator().manual_seed(0)
    h0, w0 = torch.randn(x.numel(), 128, generator=g), torch.randn(v.size, 128, generator=g) * 0.02
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
            loss, _ = grammar_loss(h, w, 0, states, y, GrammarTables(v), "modality", 0.01)
            loss.backward()
            runs.append((loss.detach(), h.grad, w.grad))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
