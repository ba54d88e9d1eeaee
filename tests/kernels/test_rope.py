"""RoPE Triton kernel vs the torch reference and Hugging Face Llama, on CPU via TRITON_INTERPRET=1."""
import importlib

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

import megamm.kernels as K

rope_mod = importlib.import_module("megamm.kernels.rope")

FP32 = dict(atol=1e-5, rtol=1e-5)
PACKED = [0, 1, 2, 0, 1, 0, 1, 2, 3]  # three documents packed in one row


def _qk(batch, seq, n_heads, n_kv_heads, head_dim, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, n_heads, head_dim, generator=g).to(dtype).requires_grad_()
    k = torch.randn(batch, seq, n_kv_heads, head_dim, generator=g).to(dtype).requires_grad_()
    dq = torch.randn(q.shape, generator=g).to(dtype)
    dk = torch.randn(k.shape, generator=g).to(dtype)
    return q, k, dq, dk


def _check_against_reference(q, k, positions, theta, dq, dk, tol=FP32):
    q_rot, k_rot = K.apply_rope(q, k, positions, theta)
    q_ref, k_ref = K.apply_rope_reference(q, k, positions, theta)
    assert q_rot.shape == q.shape and k_rot.shape == k.shape
    assert q_rot.dtype == q.dtype and k_rot.dtype == k.dtype
    torch.testing.assert_close(q_rot, q_ref, **tol)
    torch.testing.assert_close(k_rot, k_ref, **tol)
    got = torch.autograd.grad((q_rot, k_rot), (q, k), (dq, dk))
    want = torch.autograd.grad((q_ref, k_ref), (q, k), (dq, dk))
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1], **tol)


@pytest.mark.parametrize("head_dim", [64, 128, 96, 10])
@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("theta", [10000.0, 1e6])
def test_apply_rope_matches_reference(head_dim, n_heads, n_kv_heads, theta):
    q, k, dq, dk = _qk(2, 9, n_heads, n_kv_heads, head_dim)
    positions = torch.tensor([PACKED, list(range(100, 109))])
    _check_against_reference(q, k, positions, theta, dq, dk)


def test_apply_rope_many_heads_loop_over_head_tiles():
    # 40 heads of dim 256: more than one head tile per program.
    q, k, dq, dk = _qk(1, 3, 40, 8, 256)
    _check_against_reference(q, k, torch.tensor([[0, 7, 4095]]), 500000.0, dq, dk)


def test_apply_rope_large_positions():
    q, k, dq, dk = _qk(1, 4, 2, 1, 128)
    positions = torch.tensor([[8191, 16384, 30000, 32767]])
    _check_against_reference(q, k, positions, 500000.0, dq, dk, tol=dict(atol=1e-4, rtol=1e-4))


def test_packed_positions_restart_each_document():
    q, k, _, _ = _qk(1, len(PACKED), 4, 2, 64)
    q_rot, k_rot = K.apply_rope(q, k, torch.tensor([PACKED]))
    start = 0
    for length in (3, 2, 4):
        doc = slice(start, start + length)
        q_doc, k_doc = K.apply_rope_reference(q[:, doc], k[:, doc], torch.arange(length)[None])
        torch.testing.assert_close(q_rot[:, doc], q_doc, **FP32)
        torch.testing.assert_close(k_rot[:, doc], k_doc, **FP32)
        start += length


def test_position_zero_is_identity():
    q, k, _, _ = _qk(2, 3, 4, 2, 64)
    q_rot, k_rot = K.apply_rope(q, k, torch.zeros(2, 3, dtype=torch.long))
    torch.testing.assert_close(q_rot, q, **FP32)
    torch.testing.assert_close(k_rot, k, **FP32)


def test_apply_rope_non_contiguous_views():
    g = torch.Generator().manual_seed(5)
    batch, seq, n_heads, n_kv, head_dim = 2, 6, 4, 2, 64
    # q and k as views of one fused qkv projection output.
    qkv = torch.randn(batch, seq, n_heads + 2 * n_kv, head_dim, generator=g).requires_grad_()
    q, k = qkv[:, :, :n_heads], qkv[:, :, n_heads : n_heads + n_kv]
    assert not q.is_contiguous() and not k.is_contiguous()
    positions = torch.tensor([[0, 1, 2, 0, 1, 2], [3, 4, 5, 6, 7, 8]])
    dq = torch.randn(q.shape, generator=g)
    dk = torch.randn(batch, n_kv, seq, head_dim, generator=g).transpose(1, 2)  # strided gradient
    _check_against_reference(q, k, positions, 10000.0, dq, dk)

    # A [batch, heads, seq, dim] tensor seen as [batch, seq, heads, dim]; last dim strided too.
    q_t = torch.randn(batch, n_heads, seq, head_dim, generator=g).transpose(1, 2).detach().requires_grad_()
    k_s = torch.randn(batch, seq, n_kv, 2 * head_dim, generator=g)[..., ::2].detach().requires_grad_()
    positions_t = torch.randn(seq, batch).argsort(dim=0).t()  # non-contiguous positions
    _check_against_reference(q_t, k_s, positions_t, 10000.0, torch.ones(q_t.shape), dk)


def test_apply_rope_position_forms():
    q, k, dq, dk = _qk(2, 5, 2, 1, 32)
    full = torch.arange(5).expand(2, 5)
    want = K.apply_rope_reference(q, k, full)
    for positions in (torch.arange(5), torch.arange(5, dtype=torch.int32)[None], full.to(torch.int32)):
        got = K.apply_rope(q, k, positions)
        torch.testing.assert_close(got[0], want[0], **FP32)
        torch.testing.assert_close(got[1], want[1], **FP32)


def test_apply_rope_gradient_of_one_output_only():
    q, k, dq, _ = _qk(1, 4, 2, 1, 16)
    positions = torch.tensor([[3, 1, 4, 1]])
    q_rot, _ = K.apply_rope(q, k, positions)
    dq_got, dk_got = torch.autograd.grad(q_rot, (q, k), dq, allow_unused=True)
    dq_want = torch.autograd.grad(K.apply_rope_reference(q, k, positions)[0], q, dq)[0]
    torch.testing.assert_close(dq_got, dq_want, **FP32)
    assert dk_got is None
    # y.sum() gives a stride-0 upstream gradient.
    dk_sum = torch.autograd.grad(K.apply_rope(q, k, positions)[1].sum(), k)[0]
    torch.testing.assert_close(dk_sum, torch.autograd.grad(K.apply_rope_reference(q, k, positions)[1].sum(), k)[0])


def test_apply_rope_fp16():
    q, k, dq, dk = _qk(2, 7, 4, 2, 64, dtype=torch.float16)
    positions = torch.tensor([PACKED[:7], list(range(50, 57))])
    _check_against_reference(q, k, positions, 10000.0, dq, dk, tol=dict(atol=2e-3, rtol=2e-3))


@pytest.mark.parametrize("head_dim,theta", [(64, 10000.0), (128, 500000.0)])
def test_apply_rope_matches_transformers_llama(head_dim, theta):
    n_heads, n_kv_heads = 4, 2
    config = LlamaConfig(
        hidden_size=n_heads * head_dim,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        max_position_embeddings=4096,
    )
    rotary = LlamaRotaryEmbedding(config)
    q, k, _, _ = _qk(2, 9, n_heads, n_kv_heads, head_dim)
    positions = torch.tensor([PACKED, list(range(1000, 1009))])
    cos, sin = rotary(q, positions)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)  # q is [batch, seq, heads, dim]
    q_rot, k_rot = K.apply_rope(q, k, positions, theta)
    torch.testing.assert_close(q_rot, q_hf, **FP32)
    torch.testing.assert_close(k_rot, k_hf, **FP32)


def test_triton_path_is_taken_under_interpreter(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch reference called instead of the Triton kernel")

    monkeypatch.setattr(rope_mod, "apply_rope_reference", refuse)
    q, k, dq, dk = _qk(1, 3, 2, 1, 16)
    assert K.kernels_available(q)
    q_rot, k_rot = K.apply_rope(q, k, torch.tensor([[0, 1, 2]]))
    assert type(q_rot.grad_fn).__name__.startswith("_RoPEFunction")
    torch.autograd.grad((q_rot, k_rot), (q, k), (dq, dk))


def test_reference_is_used_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")

    def refuse(*args, **kwargs):
        raise AssertionError("Triton kernel launched without the interpreter on CPU")

    monkeypatch.setattr(rope_mod, "_rotate", refuse)
    q, k, dq, dk = _qk(1, 3, 2, 1, 16)
    assert not K.kernels_available(q)
    positions = torch.tensor([[0, 1, 2]])
    q_rot, k_rot = K.apply_rope(q, k, positions)
    torch.testing.assert_close(q_rot, K.apply_rope_reference(q, k, positions)[0])
    torch.autograd.grad((q_rot, k_rot), (q, k), (dq, dk))


def test_input_errors():
    q, k, _, _ = _qk(1, 3, 2, 1, 16)
    with pytest.raises(ValueError):
        K.apply_rope(q[..., :15], k[..., :15], torch.tensor([[0, 1, 2]]))  # odd head_dim
    with pytest.raises(ValueError):
        K.apply_rope(q, k[:, :2], torch.tensor([[0, 1, 2]]))  # seq mismatch
    with pytest.raises(ValueError):
        K.apply_rope(q, k, torch.tensor([[0, 1]]))  # positions do not cover seq
    with pytest.raises(TypeError):
        K.apply_rope(q, k, torch.tensor([[0.0, 1.0, 2.0]]))
