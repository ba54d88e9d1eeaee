"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90, without a GPU.

Each preset's launches (megamm.kernels.aot.model_launches: RMSNorm and add+RMSNorm
forward and backward, RoPE forward and backward for q and for k) at its launch shapes
(``train``, ``int64``, ``int64_args``, ``decode``: see aot.model_cases), in bf16, fp16
and fp32, are specialized the way Triton's JIT would specialize them on that GPU,
deduplicated by Triton's own cache key and compiled down to a cubin with ptxas, in a
fresh Triton cache. Per compiled kernel it records registers, spills, local and shared
memory, and the offset type of every scalar pointer addition, to
``benchmarks/results/kernels_aot-ptxas.json``.

    python benchmarks/kernels_aot.py
    python benchmarks/kernels_aot.py --presets 8b --targets sm_90 --cases train --out /tmp/x.json

Exits 1 when a kernel does not compile (the JSON still lists it, with its error) and 2
on bad input.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton
from triton.backends.nvidia.compiler import get_ptxas

from megamm.config import PRESETS, get_preset
from megamm.kernels import aot
from megamm.kernels.dispatch import PROGRAMS_PER_SM

RESULT = Path(__file__).resolve().parent / "results" / "kernels_aot-ptxas.json"


def _parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--targets", nargs="+", default=list(aot.TARGETS), choices=list(aot.TARGETS))
    p.add_argument("--dtypes", nargs="+", default=list(aot.DTYPES), choices=list(aot.DTYPES))
    p.add_argument("--cases", nargs="+", default=list(aot.CASES), choices=list(aot.CASES))
    p.add_argument("--out", type=Path, default=RESULT)
    return p.parse_args(argv)


def _signature_facts(launch, spec) -> dict:
    """How Triton specialized the runtime arguments: each scalar's type, with ``%16`` when
    it is marked 16-divisible and ``=1`` when it became a constant; whether every pointer
    is taken 16-byte aligned."""
    names = list(spec.signature)
    divisible = {names[path[0]] for path, attr in spec.source.attrs.items() if attr}
    scalars, aligned = {}, True
    for name, ty in list(spec.signature.items())[: len(launch.args)]:
        if ty.startswith("*"):
            aligned = aligned and name in divisible
        else:
            scalars[name] = "=1" if ty == "constexpr" else f"{ty}%16" if name in divisible else ty
    return {"scalar_args": scalars, "pointers_16_aligned": aligned}


def _resident_by_regs(n_regs: int, num_warps: int) -> int:
    """Programs an SM holds at once as far as its 64K registers and 64 warps allow
    (sm_80 and sm_90; registers are allocated per warp in units of 256)."""
    per_warp = -(-n_regs * 32 // 256) * 256
    return min(65536 // (per_warp * num_warps), 64 // num_warps)


def _compile_one(target, planned, spec) -> dict:
    launch = planned.launch
    entry = {
        "kernel": spec.kernel, "target": target.name, "dtype": planned.dtype,
        "constexprs": dict(launch.constexprs), "num_warps": launch.num_warps, **_signature_facts(launch, spec),
    }
    t0 = time.perf_counter()
    try:
        c = aot.compile_for(target, launch)
    except Exception as e:  # recorded per kernel; the run fails at the end
        entry["error"] = f"{type(e).__name__}: {str(e).strip()}"[-4000:]
        return entry
    entry.update(
        n_regs=c.n_regs, n_spills=c.n_spills, local_bytes=c.local_bytes, stack_bytes=c.stack_bytes,
        shared_bytes=c.shared_bytes, cubin_bytes=c.cubin_bytes,
        resident_per_sm_by_regs=_resident_by_regs(c.n_regs, launch.num_warps),
        scalar_offset_types=sorted(set(aot.scalar_offset_types(c.ttir))),
        compile_s=round(time.perf_counter() - t0, 3),
    )
    return entry


def compile_matrix(models: dict, targets: list, dtypes: tuple, cases: tuple) -> tuple[list[dict], int]:
    """Compile every distinct specialization; -> (entries, number of launches planned)."""
    entries, n_launches = [], 0
    for target in targets:
        groups: dict[str, tuple] = {}
        for planned in aot.launch_plan(models, target, dtypes, cases):
            n_launches += 1
            spec = aot.specialize(planned.launch, target)
            groups.setdefault(spec.key, (planned, spec, []))[2].append(planned.label)
        for planned, spec, labels in groups.values():
            entry = _compile_one(target, planned, spec)
            entry["launches"] = labels
            entries.append(entry)
            usage = f"{entry['n_regs']} regs, {entry['n_spills']} spills" if "error" not in entry else "FAILED"
            print(f"{target.name} {labels[0]} (+{len(labels) - 1} launches) {entry['constexprs']} "
                  f"warps={entry['num_warps']}: {usage}", flush=True)
    return entries, n_launches


def _summary(entries: list[dict], n_launches: int, seconds: float) -> dict:
    ok = [e for e in entries if "error" not in e]
    max_regs: dict = {}
    for e in ok:
        per_target = max_regs.setdefault(e["kernel"], {})
        per_target[e["target"]] = max(per_target.get(e["target"], 0), e["n_regs"])
    return {
        "launches": n_launches, "compiled": len(ok), "failed": len(entries) - len(ok),
        "spilling": sorted({f"{e['target']} {lbl}" for e in ok if e["n_spills"] for lbl in e["launches"]}),
        "max_regs": max_regs, "max_shared_bytes": max((e["shared_bytes"] for e in ok), default=0),
        "bwd_8b_resident_by_regs": sorted({
            e["resident_per_sm_by_regs"] for e in ok
            if e["kernel"] == "_rms_norm_bwd_kernel" and any(label.startswith("8b ") for label in e["launches"])
        }),
        "non_int64_scalar_offsets": [e["launches"][0] for e in ok if e["scalar_offset_types"] != ["i64"]],
        "compile_seconds": round(seconds, 1),
    }


def _notes(summary: dict) -> list[str]:
    spills, narrow = summary["spilling"], summary["non_int64_scalar_offsets"]
    resident = summary["bwd_8b_resident_by_regs"]
    offsets = (
        "Row, token and program offsets are int64 in every kernel (the program id is widened "
        "before it meets a stride): scalar_offset_types lists the offset type of each scalar "
        "pointer addition in the TTIR." if not narrow else f"Scalar offsets not all int64 in: {', '.join(narrow)}."
    )
    notes = [
        offsets + " Scalar arguments stay i32 unless a value passes 2^31 (int64_args: RoPE's q "
        "batch stride), which Triton then passes as i64.",
        "No kernel spills at any shape compiled." if not spills else f"Spilling: {', '.join(spills)}.",
        "n_spills is Triton's CompiledKernel.n_spills (local memory bytes / 4), read with "
        "cuobjdump from the cubin; shared_bytes is the shared memory Triton requests per program "
        "(the reductions' scratch).",
    ]
    if resident:
        notes.append(
            f"The persistent RMSNorm backward launches {PROGRAMS_PER_SM} programs per SM; at 8b, {resident} "
            "fit an SM at once by registers (resident_per_sm_by_regs), so the grid runs in equal waves of "
            "programs that each walk the same number of rows."
        )
    return notes


def _dumps(payload: dict) -> str:
    """Indented JSON with one line per compiled kernel."""
    head = json.dumps({**payload, "kernels": []}, indent=1)
    rows = ",\n  ".join(json.dumps(e) for e in payload["kernels"])
    return head.replace('"kernels": []', f'"kernels": [\n  {rows}\n ]') + "\n"


def _versions(targets: list) -> dict:
    ptxas = {t.name: get_ptxas(t.capability).version for t in targets}
    return {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "ptxas": ptxas}


def main(argv=None) -> int:
    args = _parse(argv)
    try:
        aot.require_compiling_triton()
    except RuntimeError as e:
        print(f"benchmarks/kernels_aot.py: {e}", file=sys.stderr)
        return 2
    targets = [aot.TARGETS[t] for t in args.targets]
    models = {name: get_preset(name) for name in args.presets}
    with tempfile.TemporaryDirectory() as cache:  # every compile is real, and timed
        os.environ["TRITON_CACHE_DIR"] = cache
        t0 = time.perf_counter()
        entries, n_launches = compile_matrix(models, targets, tuple(args.dtypes), tuple(args.cases))
        seconds = time.perf_counter() - t0
    summary = _summary(entries, n_launches, seconds)
    payload = {
        "benchmark": "kernels_aot",
        "device": "none (ahead-of-time, ptxas)",
        **_versions(targets),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "targets": {t.name: {"gpu": t.gpu, "sms": t.sms, "backward_programs": t.max_programs} for t in targets},
        "cases": {name: {c: [s.batch, s.seq] for c, s in aot.model_cases(m).items() if c in args.cases}
                  for name, m in models.items()},
        "summary": summary,
        "notes": _notes(summary),
        "kernels": entries,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(_dumps(payload))
    print(f"{summary['compiled']} kernels compiled for {n_launches} launches in {summary['compile_seconds']} s; "
          f"wrote {args.out}")
    for e in entries:
        if "error" in e:
            last = e["error"].strip().splitlines()[-1]
            print(f"kernels_aot: {e['target']} {e['launches'][0]} does not compile: {last}", file=sys.stderr)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
