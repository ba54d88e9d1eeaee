"""The chunked grammar head (megamm.model.loss) against the head it replaced, kept in
benchmarks/head_reference.py: the same loss, per-modality statistics and gradients in
fp32 (relative error <= 1e-6), with chunks that cut a state's rows and a span's columns,
and no [rows, columns] block larger than one chunk."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_model import CFG, VOCAB, WIDE_GAP, packed_batch
from torch.utils._python_dispatch import TorchDispatchMode

from megamm.model import build_model
from megamm.model.loss import GrammarTables, HeadChunking, grammar_loss
from megamm.vocab import Vocab

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import head_reference  # noqa: E402

# 16-row chunks; spans wider than 7 columns in 7-column blocks (the last one shorter)
TINY = HeadChunking(elements=16 * 7, min_rows=16)
D = 24  # hidden width: no other dimension of the test's tensors is 24


def random_rows(v: Vocab, n: int, seed: int):
    """n positions in uniformly random grammar states; 70% of the targets are ids their
    state allows, the rest any id (mostly forbidden, so not counted) or <pad>."""
    g = torch.Generator().manual_seed(seed)
    states = torch.randint(0, v.n_states, (n,), generator=g)
    allowed_pick = torch.multinomial(v.allowed_table()[states].float(), 1, generator=g).squeeze(1)
    u = torch.rand(n, generator=g)
    targets = torch.where(u < 0.7, allowed_pick, torch.randint(0, v.used_size, (n,), generator=g))
    return states, torch.where(u > 0.95, torch.full_like(targets, v.pad), targets)


def run(loss_fn, tables, h0, w0, states, targets, scope, **kw):
    """(loss_sum, stats, d h, d w) of one forward + backward, under a loss scale of 0.37."""
    h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    loss, stats = loss_fn(h, w, 0, states, targets, tables, scope, 0.01, **kw)
    (loss * 0.37).backward()
    return loss.detach(), stats, h.grad, w.grad


def assert_rel(got, want, what, rel=1e-6):
    err = float((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30))
    assert err <= rel, f"{what}: relative error {err:.2e} > {rel:.0e}"


def assert_cuts(v: Vocab, states, targets, scope, chunking):
    """The chunks cut some state's rows and some span's columns."""
    counted = v.counted_targets(states, targets, scope != "full")
    groups = GrammarTables(v).groups(states, counted, scope != "full", chunking)
    assert any(g.rows.numel() > g.chunk_rows for g in groups)
    assert any(g.span.width > chunking.columns(g.chunk_rows, g.span.width) for g in groups)


@pytest.mark.parametrize("chunking", [HeadChunking(), TINY], ids=["default", "tiny"])
@pytest.mark.parametrize("scope", ["modality", "full"])
@pytest.mark.parametrize("vocab_cfg", [VOCAB, WIDE_GAP], ids=["bias", "gather"])
def test_chunked_head_equals_the_reference_over_random_states(vocab_cfg, scope, chunking):
    v = Vocab(vocab_cfg)
    states, targets = random_rows(v, 300, seed=1)
    if chunking is TINY:
        assert_cuts(v, states, targets, scope, chunking)
    g = torch.Generator().manual_seed(2)
    h0, w0 = torch.randn(300, D, generator=g), torch.randn(v.size, D, generator=g) * 0.5
    want = run(head_reference.grammar_loss, head_reference.GrammarTables(v), h0, w0, states, targets, scope)
    got = run(grammar_loss, GrammarTables(v), h0, w0, states, targets, scope, chunking=chunking)
    m = len(got[1]) // 2
    assert torch.equal(got[1][m:], want[1][m:])  # counts
    for what, a, b in zip(("loss", "modality sums", "d h", "d w"), (got[0], got[1][:m], *got[2:]),
                          (want[0], want[1][:m], *want[2:])):
        assert_rel(a, b, what)


def test_chunks_smaller_than_a_document_train_the_same_model():
    """The whole model (every parameter's gradient) under 16-row chunks, shorter than its
    documents, equals the one-chunk head; so does the loss without gradients."""
    x, y = packed_batch(Vocab(VOCAB), rows=3, length=61, seed=5)
    assert (y == Vocab(VOCAB).eos).sum() >= 2 and x.shape[1] > 2 * TINY.min_rows  # documents > a chunk
    runs = []
    for chunking in (HeadChunking(), TINY):
        m = build_model(CFG.replace(z_loss=1e-2), seed=4)
        m.head.chunking = chunking
        out = m(x, y)
        out.loss.backward()
        with torch.no_grad():
            eval_loss = m(x, y).loss
        runs.append((out.loss.detach(), eval_loss, out.modality_sum, {n: p.grad for n, p in m.named_parameters()}))
    (loss, eval_loss, sums, grads), (t_loss, t_eval, t_sums, t_grads) = runs
    torch.testing.assert_close(eval_loss, loss, rtol=0, atol=0)
    assert_rel(t_loss, loss, "loss")
    assert_rel(t_eval, eval_loss, "loss without gradients")
    assert_rel(t_sums, sums, "modality sums")
    for n in grads:
        assert_rel(t_grads[n], grads[n], n)


def test_chunked_head_in_bf16_follows_the_dense_masked_softmax():
    """bf16 h and table under column blocks (d h summed over blocks in fp32): loss and
    gradients match F.linear(h, w).float() with a -inf mask to bf16 precision."""
    v = Vocab(VOCAB)
    states, targets = random_rows(v, 200, seed=3)
    g = torch.Generator().manual_seed(3)
    h0, w0 = torch.randn(200, 32, generator=g).bfloat16(), (torch.randn(v.size, 32, generator=g) * 0.3).bfloat16()
    h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    loss, _ = grammar_loss(h, w, 0, states, targets, GrammarTables(v), "modality", 0.01, chunking=TINY)
    loss.backward()
    hr, wr = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    logits = F.linear(hr, wr).float().masked_fill(~v.allowed_table()[states], float("-inf"))
    counted = v.counted_targets(states, targets)
    want = (F.cross_entropy(logits, targets, reduction="none") + 0.01 * torch.logsumexp(logits, -1) ** 2)[counted].sum()
    want.backward()
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-3)
    for got, ref in ((h.grad, hr.grad), (w.grad, wr.grad)):
        assert (got.float() - ref.float()).abs().max() <= 2e-2 * ref.float().abs().max()


class _LargestBlock(TorchDispatchMode):
    """The most elements of any 2-D floating tensor an op makes that has no dimension D
    (so not h, the table, their gradients or slices of them): a logits-like block."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() == 2 and t.is_floating_point() and D not in t.shape:
                self.largest = max(self.largest, t.numel())
        return out


def test_no_logits_block_outlives_its_chunk():
    """Forward + backward never make a [rows, columns] block above one chunk's elements,
    where the reference makes the text rows x text span at once."""
    v = Vocab(VOCAB)
    states, targets = random_rows(v, 300, seed=4)
    counted = v.counted_targets(states, targets)
    text_rows = int((counted & (states == 2)).sum())  # State.TEXT: text ids + <eot>
    g = torch.Generator().manual_seed(4)
    h0, w0 = torch.randn(300, D, generator=g), torch.randn(v.size, D, generator=g)
    seen = []
    for loss_fn, tables, kw in ((head_reference.grammar_loss, head_reference.GrammarTables(v), {}),
                                (grammar_loss, GrammarTables(v), {"chunking": TINY})):
        with _LargestBlock() as mode:
            run(loss_fn, tables, h0, w0, states, targets, "modality", **kw)
        seen.append(mode.largest)
    assert seen[0] >= text_rows * (VOCAB.text_size + 1) > 4 * TINY.elements
    assert seen[1] <= TINY.elements


def test_head_chunking_refuses_impossible_sizes():
    with pytest.raises(ValueError, match="min_rows"):
        HeadChunking(min_rows=24)
    with pytest.raises(ValueError, match="elements"):
        HeadChunking(elements=0)
