"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90, without a GPU,
and the launches it compiles are the launches the model really makes.

The compile runs benchmarks/kernels_aot.py in a subprocess started without
TRITON_INTERPRET: this process imported Triton in interpreter mode (tests/conftest.py),
and such a Triton cannot compile (megamm.kernels.aot explains why).
"""
import json
import os
import subprocess
import sys

import torch

from megamm.config import ModelConfig, VocabConfig, get_preset
from megamm.kernels import aot, dispatch
from megamm.model import build_model

OPS = ("rms_norm_fwd", "rms_norm_bwd", "add_rms_norm_fwd", "add_rms_norm_bwd",
       "rope_fwd_q", "rope_fwd_k", "rope_bwd_q", "rope_bwd_k")


def _compile(root, tmp_path, *arg_lists) -> list[dict]:
    """benchmarks/kernels_aot.py once per argument list, side by side (the 2-core machine);
    each one's results, in order."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    outs = [tmp_path / f"aot{i}.json" for i in range(len(arg_lists))]
    procs = [subprocess.Popen([sys.executable, str(root / "benchmarks" / "kernels_aot.py"), *args, "--out", str(out)],
                              cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for args, out in zip(arg_lists, outs)]
    logs = [proc.communicate()[0] for proc in procs]
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-6000:]
    return [json.loads(out.read_text()) for out in outs]


def test_every_kernel_compiles_for_both_targets_and_every_dtype(root, tmp_path):
    # Every kernel x sm_80, sm_90 x bf16, fp16, fp32 at 8b's training shape: 8b has the
    # widest tiles (BLOCK_N 4096; RoPE 32 heads x 64), where registers peak. And tiny, the
    # narrowest tiles (BLOCK_N 128, BLOCK_D 16), in bf16 at its int64_args shape, where
    # Triton passes q's batch stride as i64. benchmarks/kernels_aot.py compiles the whole
    # matrix (every preset, shape and dtype: 306 kernels, 3-4 min here); this, ~35 s of CPU.
    *per_target, wide = _compile(root, tmp_path, *[("--presets", "8b", "--cases", "train", "--targets", t)
                                                  for t in aot.TARGETS],
                                 ("--presets", "tiny", "--dtypes", "bf16", "--cases", "int64_args"))
    train = {"kernels": [e for result in per_target for e in result["kernels"]]}
    entries = train["kernels"] + wide["kernels"]
    compiled = {(e["target"], label) for e in entries for label in e["launches"]}
    for target in aot.TARGETS:
        for op in OPS:
            assert (target, f"tiny int64_args {op} bf16") in compiled
            for dtype in aot.DTYPES:
                assert (target, f"8b train {op} {dtype}") in compiled
    for e in entries:
        assert e["cubin_bytes"] > 0 and e["n_regs"] > 0, e
        assert e["n_spills"] == 0, e  # the launch config promises no spills at these tiles
        assert e["scalar_offset_types"] == ["i64"], e  # row/token offsets never wrap at 2^31
    q = [e for e in wide["kernels"] if "tiny int64_args rope_fwd_q bf16" in e["launches"]]
    assert [e["scalar_args"]["x_stride_b"] for e in q] == ["i64%16", "i64%16"]  # one per target
    assert {e["scalar_args"]["x_stride_b"] for e in train["kernels"] if e["kernel"] == "_rope_kernel"} == {"i32%16"}


def test_8b_shapes_past_2_31_elements_take_the_int64_paths():
    cfg, target = get_preset("8b"), aot.TARGETS["sm_90"]
    cases = aot.model_cases(cfg)
    launches = {name: aot.model_launches(cfg, cases[name], torch.bfloat16, target.max_programs)
                for name in ("train", "int64", "int64_args")}
    for name in ("int64", "int64_args"):  # rows x d_model past 2^31: the kernels' int64 offsets matter
        assert launches[name]["rms_norm_fwd"].args[0].numel() >= 2**31
        assert launches[name]["rope_fwd_q"].args[0].numel() >= 2**31
    wide = aot.specialize(launches["int64_args"]["rope_fwd_q"], target).signature
    train = aot.specialize(launches["train"]["rope_fwd_q"], target).signature
    assert wide["x_stride_b"] == wide["out_stride_b"] == "i64"
    assert train["x_stride_b"] == train["out_stride_b"] == "i32"


def test_the_compiled_launches_are_the_models_launches(monkeypatch):
    # Run a small model's forward and backward through the Triton path (interpreted),
    # record every launch that reaches Triton, and compare with what aot derives for
    # the same shapes: the AOT matrix cannot drift from what the model launches.
    vocab = VocabConfig(text_size=20, n_special=10, image_codes=8, image_tokens=2, audio_codebooks=2,
                        audio_codebook_size=4, pad_multiple=8)
    cfg = ModelConfig(n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, vocab=vocab, kernels="triton")
    recorded = []
    real_getitem = dispatch._Kernel.__getitem__

    def spy(kernel, grid):
        launcher = real_getitem(kernel, grid)

        def record(*args, **kwargs):
            recorded.append(_describe(kernel, grid, args, kwargs))
            return launcher(*args, **kwargs)

        return record

    monkeypatch.setattr(dispatch._Kernel, "__getitem__", spy)
    model = build_model(cfg, seed=0)
    v = model.vocab
    doc = v.document([v.text_segment([1, 2, 3]), v.image_segment([1, 7])])
    ids = torch.tensor([doc + doc, doc[::-1] + doc])
    model(ids[:, :-1], ids[:, 1:]).loss.backward()

    batch, seq = ids[:, :-1].shape
    case = aot.Case("model", batch, seq, backward=True)
    derived = aot.model_launches(cfg, case, torch.float32, dispatch.program_count(torch.device("cpu")))
    assert list(derived) == list(OPS)
    expected = {_describe(la.kernel, la.grid, la.args, {**la.constexprs, "num_warps": la.num_warps})
                for la in derived.values()}
    assert set(recorded) == expected


def _describe(kernel, grid, args, kwargs) -> tuple:
    """A launch as Triton sees it: tensors by dtype, shape and strides, the rest by value
    (eps left out: the model's norm_eps is its own, and floats are not specialized)."""
    def arg(a):
        if isinstance(a, torch.Tensor):
            return ("tensor", a.dtype, tuple(a.shape), a.stride())
        return ("float",) if isinstance(a, float) else a

    return kernel.name, tuple(grid), tuple(arg(a) for a in args), tuple(sorted(kwargs.items()))
