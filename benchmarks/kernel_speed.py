"""GPU benchmark and device check for the Triton kernels in ``megamm.kernels``.

Benchmark (default): forward and backward time and GB/s of rms_norm, add_rms_norm and
apply_rope at Llama-3-8B shapes (hidden 4096; 32 q / 8 kv heads of dim 128; 4k-32k
tokens), against the torch eager reference, ``torch.compile`` of the reference and
Liger-Kernel when it is importable, next to the measured device-to-device copy
bandwidth. Results go to ``benchmarks/results/kernels-<device>.json``.

    python benchmarks/kernel_speed.py
    python benchmarks/kernel_speed.py --tokens 4096 8192 --no-compile

Device check (``--check``): in bf16, the error of each Triton kernel (outputs and
gradients) against an fp32 reference must be at most 2x the error of a plain bf16
torch implementation against the same reference. Also checks fp32 parity on
non-contiguous inputs and int64 offsets (a tensor of more than 2^31 elements). Prints
PASS/FAIL per line and exits non-zero on any failure.

    python benchmarks/kernel_speed.py --check

GB/s counts the bytes each op must move at minimum (inputs read once, outputs written
once; weights, rstd and dW partials ignored), the same for every provider.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEVICE = "cuda"
HIDDEN, N_HEADS, N_KV_HEADS, HEAD_DIM, THETA, EPS = 4096, 32, 8, 128, 500000.0, 1e-5


def _require_cuda() -> None:
    if not torch.cuda.is_available():
        print("benchmarks/kernel_speed.py needs a CUDA GPU, and torch.cuda.is_available() is False.", file=sys.stderr)
        sys.exit(2)
    from megamm.kernels.dispatch import HAS_TRITON, interpreter_requested

    if not HAS_TRITON:
        print("benchmarks/kernel_speed.py needs Triton, which cannot be imported.", file=sys.stderr)
        sys.exit(2)
    if interpreter_requested():
        print("Unset TRITON_INTERPRET: it would run the kernels in Triton's CPU interpreter.", file=sys.stderr)
        sys.exit(2)


def _device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _environment() -> dict:
    import triton

    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def _write(payload: dict, prefix: str) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{prefix}-{_device_slug(payload['device'])}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


# --------------------------------------------------------------------------- benchmark


def _bench_ms(fn, grad_to_none=None) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def _copy_gbps() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = _bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def _liger():
    """Liger-Kernel's RMSNorm and RoPE autograd functions, or None when not installed."""
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
    except ImportError:
        return None
    return LigerRMSNormFunction, LigerRopeFunction


def _rms_cases(tokens: int, dtype: torch.dtype, providers: dict):
    """(op, provider, make) where make() -> (forward_fn, outputs, grads, leaves, bytes_fwd, bytes_bwd)."""
    es = torch.empty((), dtype=dtype).element_size()
    size = tokens * HIDDEN

    def rms_inputs():
        x = torch.randn(tokens, HIDDEN, device=DEVICE, dtype=dtype, requires_grad=True)
        w = torch.randn(HIDDEN, device=DEVICE, dtype=dtype, requires_grad=True)
        return x, w

    for name, fn in providers["rms_norm"].items():

        def make(fn=fn):
            x, w = rms_inputs()
            forward = lambda: fn(x, w, EPS)  # noqa: E731
            out = forward()
            return forward, (out,), (torch.randn_like(out),), [x, w], 2 * size * es, 3 * size * es

        yield "rms_norm", name, make

    for name, fn in providers["add_rms_norm"].items():

        def make(fn=fn):
            x, w = rms_inputs()
            r = torch.randn_like(x, requires_grad=True)
            forward = lambda: fn(x, r, w, EPS)  # noqa: E731
            outs = forward()
            grads = tuple(torch.randn_like(o) for o in outs)
            return forward, outs, grads, [x, r, w], 4 * size * es, 4 * size * es

        yield "add_rms_norm", name, make


def _rope_cases(tokens: int, dtype: torch.dtype, providers: dict):
    es = torch.empty((), dtype=dtype).element_size()
    moved = 2 * tokens * (N_HEADS + N_KV_HEADS) * HEAD_DIM * es
    positions = torch.arange(tokens, device=DEVICE)[None]

    for name, fn in providers["apply_rope"].items():

        def make(fn=fn, name=name):
            if name == "liger":  # Liger wants [batch, heads, seq, dim] and precomputed cos/sin.
                from megamm.kernels.rope import rope_cos_sin

                q = torch.randn(1, N_HEADS, tokens, HEAD_DIM, device=DEVICE, dtype=dtype, requires_grad=True)
                k = torch.randn(1, N_KV_HEADS, tokens, HEAD_DIM, device=DEVICE, dtype=dtype, requires_grad=True)
                cos, sin = (t.to(dtype) for t in rope_cos_sin(positions, HEAD_DIM, THETA))
                forward = lambda: fn(q, k, cos, sin)  # noqa: E731
            else:
                q = torch.randn(1, tokens, N_HEADS, HEAD_DIM, device=DEVICE, dtype=dtype, requires_grad=True)
                k = torch.randn(1, tokens, N_KV_HEADS, HEAD_DIM, device=DEVICE, dtype=dtype, requires_grad=True)
                forward = lambda: fn(q, k, positions, THETA)  # noqa: E731
            outs = forward()
            grads = tuple(torch.randn_like(o) for o in outs)
            return forward, outs, grads, [q, k], moved, moved

        yield "apply_rope", name, make


def _providers(use_compile: bool) -> dict:
    import megamm.kernels as K

    providers = {
        "rms_norm": {"triton": K.rms_norm, "torch": K.rms_norm_reference},
        "add_rms_norm": {"triton": K.add_rms_norm, "torch": K.add_rms_norm_reference},
        "apply_rope": {"triton": K.apply_rope, "torch": K.apply_rope_reference},
    }
    if use_compile:
        providers["rms_norm"]["torch_compile"] = torch.compile(K.rms_norm_reference)
        providers["add_rms_norm"]["torch_compile"] = torch.compile(K.add_rms_norm_reference)
        providers["apply_rope"]["torch_compile"] = torch.compile(K.apply_rope_reference)
    liger = _liger()
    if liger is not None:
        rms_fn, rope_fn = liger
        providers["rms_norm"]["liger"] = lambda x, w, eps: rms_fn.apply(x, w, eps)
        providers["apply_rope"]["liger"] = lambda q, k, cos, sin: rope_fn.apply(q, k, cos, sin)
    return providers


def run_benchmark(args) -> int:
    dtype = getattr(torch, args.dtype)
    env = _environment()
    copy_gbps = _copy_gbps()
    print(f"{env['device']}: device-to-device copy {copy_gbps:.0f} GB/s")
    providers = _providers(not args.no_compile)
    rows = []
    print(f"{'op':<13}{'tokens':>7} {'provider':<14}{'fwd ms':>9}{'GB/s':>7}{'bwd ms':>9}{'GB/s':>7}")
    for tokens in args.tokens:
        cases = [*_rms_cases(tokens, dtype, providers), *_rope_cases(tokens, dtype, providers)]
        for op, provider, make in cases:
            row = {"op": op, "tokens": tokens, "provider": provider}
            try:
                forward, outs, grads, leaves, bytes_fwd, bytes_bwd = make()
                fwd_ms = _bench_ms(forward)
                bwd_ms = _bench_ms(
                    lambda: torch.autograd.backward(outs, grads, retain_graph=True), grad_to_none=leaves
                )
            except Exception as e:  # one failing provider (e.g. a Liger API change) must not stop the run
                row["error"] = f"{type(e).__name__}: {e}"
                print(f"{op:<13}{tokens:>7} {provider:<14} error: {row['error']}")
                rows.append(row)
                continue
            for pass_name, ms, moved in (("fwd", fwd_ms, bytes_fwd), ("bwd", bwd_ms, bytes_bwd)):
                gbps = moved / (ms * 1e-3) / 1e9
                row[pass_name] = {"ms": ms, "bytes": moved, "gbps": gbps, "fraction_of_copy": gbps / copy_gbps}
            rows.append(row)
            print(
                f"{op:<13}{tokens:>7} {provider:<14}{fwd_ms:>9.3f}{row['fwd']['gbps']:>7.0f}"
                f"{bwd_ms:>9.3f}{row['bwd']['gbps']:>7.0f}"
            )
            del outs, grads, leaves
            torch.cuda.empty_cache()

    payload = {
        **env,
        "dtype": args.dtype,
        "shapes": {"hidden": HIDDEN, "n_heads": N_HEADS, "n_kv_heads": N_KV_HEADS, "head_dim": HEAD_DIM},
        "copy_gbps": copy_gbps,
        "results": rows,
    }
    print(f"wrote {_write(payload, 'kernels')}")
    return 0


# --------------------------------------------------------------------------- device check


# --check shapes: (rows, hidden) and (batch, seq, q heads, kv heads, head_dim, document length, theta).
RMS_CHECK_SHAPES = [(4096, 4096), (1000, 5120), (333, 8192), (77, 1000), (5, 77)]
ROPE_CHECK_CASES = [
    (2, 4096, 32, 8, 128, 4096, 500000.0),
    (1, 8192, 32, 8, 128, 3000, 10000.0),
    (3, 777, 12, 4, 96, 100, 10000.0),
    (1, 1000, 4, 1, 64, 1000, 1e6),
]


def _rms_norm_torch_bf16(x, w, eps):
    """The usual torch bf16 RMSNorm (Hugging Face Llama): normalise in fp32, cast, then scale."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return w * normed


def _add_rms_norm_torch_bf16(x, r, w, eps):
    s = x + r
    return _rms_norm_torch_bf16(s, w, eps), s


def _apply_rope_torch_bf16(q, k, positions, theta):
    """The usual torch bf16 RoPE (Hugging Face Llama): cos/sin cast to bf16, bf16 arithmetic."""
    from megamm.kernels.rope import _rotate_half, rope_cos_sin

    cos, sin = (t.to(q.dtype)[:, :, None, :] for t in rope_cos_sin(positions, q.shape[-1], theta))
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _outputs_and_grads(fn, inputs, grads):
    leaves = [t.detach().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    got = torch.autograd.grad(outs, leaves, grads[: len(outs)])
    return [o.float() for o in outs] + [g.float() for g in got]


def _accuracy_cases():
    import megamm.kernels as K

    def rms(rows, hidden):
        x = torch.randn(rows, hidden, device=DEVICE)
        w = 1 + 0.2 * torch.randn(hidden, device=DEVICE)
        return [x, w], [torch.randn_like(x)]

    def add(rows, hidden):
        (x, w), (dy,) = rms(rows, hidden)
        return [x, torch.randn_like(x) * 4, w], [dy, torch.randn_like(x)]

    def rope(batch, seq, hq, hk, d, doc_len):
        q = torch.randn(batch, seq, hq, d, device=DEVICE)
        k = torch.randn(batch, seq, hk, d, device=DEVICE)
        return [q, k], [torch.randn_like(q), torch.randn_like(k)], torch.arange(seq, device=DEVICE).remainder(doc_len)

    for rows, hidden in RMS_CHECK_SHAPES:
        inputs, grads = rms(rows, hidden)
        yield f"rms_norm {rows}x{hidden}", K.rms_norm, K.rms_norm_reference, _rms_norm_torch_bf16, inputs, grads, (EPS,)
        inputs, grads = add(rows, hidden)
        yield (
            f"add_rms_norm {rows}x{hidden}", K.add_rms_norm, K.add_rms_norm_reference,
            _add_rms_norm_torch_bf16, inputs, grads, (EPS,),
        )
    for batch, seq, hq, hk, d, doc_len, theta in ROPE_CHECK_CASES:
        inputs, grads, positions = rope(batch, seq, hq, hk, d, doc_len)
        positions = positions[None].expand(batch, seq)
        yield (
            f"apply_rope b{batch} s{seq} {hq}/{hk}x{d} theta {theta:g}", K.apply_rope, K.apply_rope_reference,
            _apply_rope_torch_bf16, inputs, grads, (positions, theta),
        )


def _check_accuracy() -> list[dict]:
    rows = []
    for name, kernel, reference, torch_bf16, inputs, grads, extra in _accuracy_cases():
        # All three see the same bf16 values; the fp32 reference just computes exactly-ish.
        bf16_inputs = [t.bfloat16() for t in inputs]
        bf16_grads = [g.bfloat16() for g in grads]
        ref = _outputs_and_grads(
            lambda *t: reference(*t, *extra), [t.float() for t in bf16_inputs], [g.float() for g in bf16_grads]
        )
        tri = _outputs_and_grads(lambda *t: kernel(*t, *extra), bf16_inputs, bf16_grads)
        base = _outputs_and_grads(lambda *t: torch_bf16(*t, *extra), bf16_inputs, bf16_grads)
        labels = [f"out{i}" for i in range(len(ref) - len(inputs))] + [f"d_in{i}" for i in range(len(inputs))]
        for label, r, t, b in zip(labels, ref, tri, base):
            err_t = (t - r).abs().max().item()
            err_b = (b - r).abs().max().item()
            ok = err_t <= 2 * err_b
            rows.append({"case": f"{name} {label}", "err_triton": err_t, "err_torch_bf16": err_b, "pass": ok})
            print(f"{'PASS' if ok else 'FAIL'}  {name} {label}: triton {err_t:.3e}  torch-bf16 {err_b:.3e}")
    return rows


def _check_fp32_parity() -> list[dict]:
    """Compiled kernels on awkward layouts, fp32, against the reference."""
    import megamm.kernels as K

    rows = []

    def compare(name, got, want, atol=1e-5, rtol=1e-5):
        ok = all(torch.allclose(g, w, atol=atol, rtol=rtol) for g, w in zip(got, want))
        err = max((g - w).abs().max().item() for g, w in zip(got, want))
        rows.append({"case": name, "max_abs_err": err, "pass": ok})
        print(f"{'PASS' if ok else 'FAIL'}  fp32 parity {name}: max abs err {err:.3e}")

    x = torch.randn(7, 33, 1000, device=DEVICE).transpose(0, 1)
    w = torch.randn(2000, device=DEVICE)[::2]
    dy = torch.randn_like(x)
    compare("rms_norm transposed", _outputs_and_grads(lambda a, b: K.rms_norm(a, b), [x, w], [dy]),
            _outputs_and_grads(lambda a, b: K.rms_norm_reference(a, b), [x, w], [dy]), atol=1e-4)
    qkv = torch.randn(2, 300, 32 + 16, 128, device=DEVICE)
    q, k = qkv[:, :, :32], qkv[:, :, 32:40]
    positions = torch.arange(300, device=DEVICE).remainder(77)[None].expand(2, 300)
    grads = [torch.randn_like(q), torch.randn_like(k)]
    compare("apply_rope qkv views", _outputs_and_grads(lambda a, b: K.apply_rope(a, b, positions), [q, k], grads),
            _outputs_and_grads(lambda a, b: K.apply_rope_reference(a, b, positions), [q, k], grads))
    return rows


def _check_int64_offsets() -> list[dict]:
    """Tensors past 2^31 elements: the last rows / tokens must still be right."""
    import megamm.kernels as K

    rows = []
    n_rows = (1 << 31) // HIDDEN + 64
    x = torch.randn(n_rows, HIDDEN, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(HIDDEN, device=DEVICE, dtype=torch.bfloat16)
    y = K.rms_norm(x, w)
    (dx,) = torch.autograd.grad(y, x, y)
    tail = slice(n_rows - 64, n_rows)
    x_tail = x.detach()[tail].clone().requires_grad_()
    y_ref = K.rms_norm_reference(x_tail, w)
    (dx_ref,) = torch.autograd.grad(y_ref, x_tail, y[tail])
    ok = torch.allclose(y[tail].float(), y_ref.float(), atol=2e-2, rtol=2e-2) and torch.allclose(
        dx[tail].float(), dx_ref.float(), atol=5e-2, rtol=5e-2
    )
    rows.append({"case": f"rms_norm {n_rows}x{HIDDEN} tail rows", "pass": ok})
    print(f"{'PASS' if ok else 'FAIL'}  int64 offsets: rms_norm {n_rows}x{HIDDEN}, last 64 rows")
    del x, y, dx
    torch.cuda.empty_cache()

    tokens = (1 << 31) // (N_HEADS * HEAD_DIM) + 64
    q = torch.randn(1, tokens, N_HEADS, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(1, tokens, N_KV_HEADS, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
    positions = torch.arange(tokens, device=DEVICE).remainder(8192)[None]
    q_rot, k_rot = K.apply_rope(q, k, positions)
    tail = slice(tokens - 64, tokens)
    q_ref, k_ref = K.apply_rope_reference(q[:, tail], k[:, tail], positions[:, tail])
    ok = torch.allclose(q_rot[:, tail].float(), q_ref.float(), atol=2e-2, rtol=2e-2) and torch.allclose(
        k_rot[:, tail].float(), k_ref.float(), atol=2e-2, rtol=2e-2
    )
    rows.append({"case": f"apply_rope {tokens} tokens tail", "pass": ok})
    print(f"{'PASS' if ok else 'FAIL'}  int64 offsets: apply_rope {tokens} tokens x {N_HEADS} heads, last 64 tokens")
    return rows


def run_check(args) -> int:
    torch.manual_seed(0)
    env = _environment()
    print(f"device check on {env['device']} (torch {env['torch']}, triton {env['triton']})")
    rows = _check_accuracy() + _check_fp32_parity()
    if not args.skip_large:
        rows += _check_int64_offsets()
    passed = all(r["pass"] for r in rows)
    print(f"wrote {_write({**env, 'passed': passed, 'checks': rows}, 'kernels-check')}")
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="run the device accuracy check instead of timing")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile of the references")
    parser.add_argument("--skip-large", action="store_true", help="--check without the >2^31-element tensors")
    args = parser.parse_args(argv)
    _require_cuda()
    return run_check(args) if args.check else run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
