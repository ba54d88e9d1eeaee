"""RMSNorm / add+RMSNorm Triton kernels vs the torch reference, on CPU via TRITON_INTERPRET=1.

fp32 throughout (the interpreter's bf16 arithmetic is wrong); fp16 is checked loosely.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

import megamm.kernels as K

# The package exports the function `rms_norm`, which shadows the submodule's name.
rms_mod = importlib.import_module("megamm.kernels.rms_norm")

FP32 = dict(atol=1e-5, rtol=1e-5)

SHAPES = [
    (1, 77),
    (64, 1000),
    (3, 5, 128),  # 3-D
    (2, 3, 4, 96),  # 4-D
    (3, 4096),
    (2, 5120),
    (2, 8192),
    (61, 33),  # more rows than backward programs, uneven split
]


def _inputs(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    w = (1.0 + 0.3 * torch.randn(shape[-1], generator=g)).to(dtype).requires_grad_()
    dy = torch.randn(shape, generator=g).to(dtype)
    return x, w, dy


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_forward_and_backward_match_reference(shape):
    x, w, dy = _inputs(shape)
    y = K.rms_norm(x, w)
    y_ref = K.rms_norm_reference(x, w)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, y_ref, **FP32)
    dx, dw = _grads(y, (x, w), dy)
    dx_ref, dw_ref = _grads(y_ref, (x, w), dy)
    torch.testing.assert_close(dx, dx_ref, **FP32)
    torch.testing.assert_close(dw, dw_ref, atol=1e-4, rtol=1e-5)  # dW sums over rows


@pytest.mark.parametrize("eps", [1e-6, 1e-5, 0.1])
def test_rms_norm_matches_torch_functional(eps):
    x, w, dy = _inputs((6, 7, 200))
    y = K.rms_norm(x, w, eps=eps)
    y_torch = F.rms_norm(x, (200,), w, eps=eps)
    torch.testing.assert_close(y, y_torch, **FP32)
    torch.testing.assert_close(_grads(y, (x, w), dy), _grads(y_torch, (x, w), dy), atol=1e-4, rtol=1e-5)


def test_rms_norm_non_contiguous_inputs():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(5, 7, 96, generator=g)
    w_base = torch.randn(192, generator=g)
    cases = [
        base.transpose(0, 1),  # rows not evenly strided: reshape copies
        base[:, 2:6],  # sliced rows: a strided view, no copy
        torch.randn(4, 192, generator=g)[:, ::2],  # last dim strided
    ]
    for x in cases:
        x = x.detach().requires_grad_()
        w = w_base[::2].detach().requires_grad_()  # strided weight
        dy = torch.randn(x.shape, generator=g).transpose(0, 1).contiguous().transpose(0, 1)
        assert not x.is_contiguous() and not dy.is_contiguous()
        y = K.rms_norm(x, w)
        y_ref = K.rms_norm_reference(x, w)
        torch.testing.assert_close(y, y_ref, **FP32)
        torch.testing.assert_close(_grads(y, (x, w), dy), _grads(y_ref, (x, w), dy), atol=1e-4, rtol=1e-5)


def test_rms_norm_expanded_upstream_gradient():
    # y.sum() hands backward a stride-0 gradient.
    x, w, _ = _inputs((9, 100))
    gx, gw = torch.autograd.grad(K.rms_norm(x, w).sum(), (x, w))
    rx, rw = torch.autograd.grad(K.rms_norm_reference(x, w).sum(), (x, w))
    torch.testing.assert_close(gx, rx, **FP32)
    torch.testing.assert_close(gw, rw, atol=1e-4, rtol=1e-5)


def test_rms_norm_fp16_and_mixed_weight_dtype():
    x, w, dy = _inputs((16, 300), dtype=torch.float16)
    y = K.rms_norm(x, w)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, K.rms_norm_reference(x, w), atol=2e-3, rtol=2e-3)
    dx, dw = _grads(y, (x, w), dy)
    assert dx.dtype == torch.float16 and dw.dtype == torch.float16
    dx_ref, dw_ref = _grads(K.rms_norm_reference(x, w), (x, w), dy)
    torch.testing.assert_close(dx, dx_ref, atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(dw, dw_ref, atol=2e-2, rtol=5e-3)

    # fp16 activations, fp32 weight: output keeps x's dtype, dW keeps the weight's.
    w32 = w.detach().float().requires_grad_()
    y = K.rms_norm(x, w32)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, K.rms_norm_reference(x, w32), atol=2e-3, rtol=2e-3)
    assert _grads(y, (w32,), dy)[0].dtype == torch.float32


@pytest.mark.parametrize("shape", [(1, 77), (4, 9, 1000), (2, 3, 2, 96), (2, 4096)])
def test_add_rms_norm_matches_reference(shape):
    x, w, dy = _inputs(shape)
    residual = torch.randn(shape, generator=torch.Generator().manual_seed(7)).requires_grad_()
    d_res = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    y, new_res = K.add_rms_norm(x, residual, w)
    y_ref, new_res_ref = K.add_rms_norm_reference(x, residual, w)
    torch.testing.assert_close(y, y_ref, **FP32)
    torch.testing.assert_close(new_res, new_res_ref, **FP32)

    inputs = (x, residual, w)
    got = torch.autograd.grad((y, new_res), inputs, (dy, d_res))
    want = torch.autograd.grad((y_ref, new_res_ref), inputs, (dy, d_res))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-5)


def test_add_rms_norm_only_one_output_used():
    x, w, dy = _inputs((5, 130))
    residual = torch.randn(5, 130).requires_grad_()
    inputs = (x, residual, w)

    # Only y feeds the loss: new_residual gets no gradient.
    got = torch.autograd.grad(K.add_rms_norm(x, residual, w)[0], inputs, dy)
    want = torch.autograd.grad(K.add_rms_norm_reference(x, residual, w)[0], inputs, dy)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-5)

    # Only new_residual feeds the loss: the norm contributes nothing, weight gets no gradient.
    got = torch.autograd.grad(K.add_rms_norm(x, residual, w)[1], inputs, dy, allow_unused=True)
    torch.testing.assert_close(got[0], dy)
    torch.testing.assert_close(got[1], dy)
    assert got[2] is None


def test_add_rms_norm_chained_blocks_leave_gradients_untouched():
    # Two blocks in a row, as in a transformer: the residual gradient of the second
    # feeds the first. Nothing may be overwritten in place along the way.
    g = torch.Generator().manual_seed(3)
    shape = (3, 4, 64)
    h0 = torch.randn(shape, generator=g).requires_grad_()
    branch1 = torch.randn(shape, generator=g).requires_grad_()
    branch2 = torch.randn(shape, generator=g).requires_grad_()
    w1 = torch.randn(64, generator=g).requires_grad_()
    w2 = torch.randn(64, generator=g).requires_grad_()
    dy1, dy2, dr = (torch.randn(shape, generator=g) for _ in range(3))
    upstream = [t.clone() for t in (dy1, dy2, dr)]

    def run(fn):
        y1, r1 = fn(branch1, h0, w1)
        y2, r2 = fn(branch2 + y1 * 0.5, r1, w2)
        return torch.autograd.grad((y1, y2, r2), (h0, branch1, branch2, w1, w2), (dy1, dy2, dr))

    for got, want in zip(run(K.add_rms_norm), run(K.add_rms_norm_reference)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    for before, after in zip(upstream, (dy1, dy2, dr)):
        assert torch.equal(before, after)


def test_add_rms_norm_promotes_dtypes_like_torch():
    x = torch.randn(4, 50, dtype=torch.float16, requires_grad=True)
    residual = torch.randn(4, 50, dtype=torch.float32, requires_grad=True)
    w = torch.randn(50, requires_grad=True)
    y, new_res = K.add_rms_norm(x, residual, w)
    y_ref, new_res_ref = K.add_rms_norm_reference(x, residual, w)
    assert y.dtype == new_res.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, **FP32)
    torch.testing.assert_close(new_res, new_res_ref, **FP32)
    gx, gr, _ = torch.autograd.grad(y.sum(), (x, residual, w))
    assert gx.dtype == torch.float16 and gr.dtype == torch.float32


def test_backward_dw_partials_cover_every_row(monkeypatch):
    # Force the persistent backward grid to few programs so each walks many rows,
    # including a ragged last block; and to more programs than rows.
    for programs in (3, 100):
        monkeypatch.setattr(rms_mod, "program_count", lambda device, programs=programs: programs)
        x, w, dy = _inputs((37, 90), seed=programs)
        dx, dw = _grads(K.rms_norm(x, w), (x, w), dy)
        dx_ref, dw_ref = _grads(K.rms_norm_reference(x, w), (x, w), dy)
        torch.testing.assert_close(dx, dx_ref, **FP32)
        torch.testing.assert_close(dw, dw_ref, atol=1e-4, rtol=1e-5)


def test_triton_path_is_taken_under_interpreter(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch reference called instead of the Triton kernel")

    monkeypatch.setattr(rms_mod, "rms_norm_reference", refuse)
    monkeypatch.setattr(rms_mod, "add_rms_norm_reference", refuse)
    x, w, dy = _inputs((4, 48))
    assert K.kernels_available(x)
    y = K.rms_norm(x, w)
    assert type(y.grad_fn).__name__.startswith("_RMSNormFunction")
    _grads(y, (x, w), dy)
    y, r = K.add_rms_norm(x, x.detach() * 2, w)
    assert type(y.grad_fn).__name__.startswith("_AddRMSNormFunction")
    _grads(y, (x, w), dy)


def test_reference_is_used_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")

    def refuse(*args, **kwargs):
        raise AssertionError("Triton kernel launched without the interpreter on CPU")

    monkeypatch.setattr(rms_mod, "_forward", refuse)
    monkeypatch.setattr(rms_mod, "_backward", refuse)
    x, w, dy = _inputs((4, 48))
    assert not K.kernels_available(x)
    y = K.rms_norm(x, w)
    torch.testing.assert_close(y, K.rms_norm_reference(x, w))
    _grads(y, (x, w), dy)
    y, r = K.add_rms_norm(x, x.detach(), w)
    torch.testing.assert_close(y, K.add_rms_norm_reference(x, x.detach(), w)[0])


def test_shape_errors():
    x = torch.randn(3, 10)
    with pytest.raises(ValueError):
        K.rms_norm(x, torch.ones(11))
    with pytest.raises(ValueError):
        K.add_rms_norm(x, torch.randn(3, 11), torch.ones(10))
