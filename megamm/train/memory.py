"""Peak memory of one training rank, predicted from the config objects training reads.

    estimate(model_cfg, ds_cfg, Topology.for_world(gpus, tp, pp), micro_batch, seq_len, checkpointing)
        -> MemoryEstimate: items (name, where, bytes, note), totals per place

A layout is estimated only if training would run it: the one layout check is
`megamm.train.layout.check_layout` (without sequence parallelism, which is not modelled).

`where` is "gpu" (the accelerator), "host" (CPU RAM of the rank's process) or "nvme".
On a CPU-only run the accelerator *is* host memory, so there gpu + host together
predict the process's peak resident set.

The parameters are `ModelConfig.parameter_counts()` (the one counter); this module only
splits its parts into per-rank shards: tensor parallelism splits the attention/MLP
matrices and the vocabulary tables (embedding, head) across tp ranks, norms are
replicated; pipeline parallelism splits blocks across pp stages (the largest stage is
the peak); ZeRO splits what its stage partitions across the dp ranks.

What each item counts (bytes per rank; P = parameters of the rank, dp = data parallel):

    parameters          16-bit (or fp32) model weights: P (ZeRO-3: P/dp, offloaded or not)
    gradients           ZeRO-0/1: P model-dtype grads (+ a full fp32 accumulation buffer
                        under bf16 with fp32 grad_accum_dtype); ZeRO-2: P/dp partition
                        + the contiguous reduce bucket; ZeRO-3: the P/dp partition buffer
                        (+ the optimizer's own P/dp gradient when the optimizer is offloaded)
    master weights      P/dp in fp32 (bf16 with bf16_master_weights_and_grads); none
                        under fp32 without ZeRO
    optimizer states    Adam's two moments, P/dp each, fp32 (bf16 with bf16_optimizer_states)
    offload buffers     NVMe swap buffers (pinned host memory) of offloaded params/states
    gathered ZeRO-3     the largest gathered module + the prefetch bucket, and its full
                        gradient before the reduce-scatter
    activations         saved tensors of every layer (with checkpointing: each layer's input
                        plus one layer recomputed)
    logits and loss     the head's largest chunk of logits (megamm.model.loss.HeadChunking:
                        rows x columns of the widest span, bounded whatever the micro-batch)
    model construction  CPU only: the whole model as first built, freed but kept resident by
                        the allocator (4 B/param under ZeRO 0-2, 3 B/param under ZeRO-3)
    baseline            the process before any tensor: interpreter + torch + DeepSpeed (+ its
                        C++ ops); on a GPU also the CUDA context

The CPU constants are calibrated against measured peaks (benchmarks/results/
memory_baseline-cpu.json, estimate_memory_vs_rss-cpu.json); the GPU-machine baselines
are assumptions, marked so in their notes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megamm.config import ConfigError, ModelConfig
from megamm.model.loss import DEFAULT_CHUNKING, PAD_ROWS
from megamm.parallel.topology import Topology
from megamm.train import ds_config
from megamm.train.layout import check_layout

# What every one-rank CPU run pays whatever the model: the peak RSS of `launch/train.py`
# training a ~20k-parameter model (torch, DeepSpeed with its Adam op, gloo, megamm's
# loader, kernels and tokenizers, the threads and code pages a real step touches) less the
# estimator's items for that model. Measured by benchmarks/memory_baseline.py on the
# 2-core CPU machine (benchmarks/results/memory_baseline-cpu.json, with versions); other
# machines differ by some tens of MB (file-backed pages), hence `estimate(baseline=...)`.
CPU_PROCESS_BASELINE = 0.548e9
# Assumptions until benchmarks/gpu_suite.sh measures them: host RSS of a CUDA torch +
# DeepSpeed rank (CUDA libraries mapped and touched) and the CUDA context + cuBLAS
# workspace on the device.
GPU_HOST_PROCESS_BASELINE = 3.0e9
GPU_CONTEXT = 0.6e9

ADAM_MOMENTS = 2
PLACES = ("gpu", "host", "nvme")
DTYPE_BYTES = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2}


def peak_rss_bytes() -> int:
    """This process's own peak resident set in bytes: VmHWM of /proc/self/status, the
    high-water mark of this address space only. Not getrusage's ru_maxrss: Linux carries the
    peak of the address space a process replaced at exec into it, so a child that a large
    process spawns (vfork + exec, as subprocess does) reports at least its parent's peak.
    Off Linux, ru_maxrss is the fallback (bytes on macOS, KiB elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass(frozen=True)
class MemoryItem:
    name: str
    where: str
    bytes: float
    note: str = ""


@dataclass(frozen=True)
class MemoryEstimate:
    items: tuple[MemoryItem, ...]

    def total(self, where: str) -> float:
        return sum(i.bytes for i in self.items if i.where == where)

    def report(self) -> str:
        """The per-item breakdown, ending in the two lines `GPU: N GB` and `host: N GB`."""
        width = max(len(i.name) for i in self.items)
        lines = [f"{'item':<{width}}  {'where':<5}  {'GB':>8}  note"]
        for i in self.items:
            lines.append(f"{i.name:<{width}}  {i.where:<5}  {i.bytes / 1e9:8.3f}  {i.note}".rstrip())
        if self.total("nvme"):
            lines.append(f"NVMe: {_gb(self.total('nvme'))} GB")
        lines.append(f"GPU: {_gb(self.total('gpu'))} GB")
        lines.append(f"host: {_gb(self.total('host'))} GB")
        return "\n".join(lines)


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f}" if n >= 1e9 else f"{n / 1e9:.2f}"


# ---- per-rank shards --------------------------------------------------------------------
def rank_parameters(cfg: ModelConfig, topo: Topology) -> int:
    """Parameters held by one rank of the largest pipeline stage (before ZeRO)."""
    c, tp = cfg.parameter_counts(), topo.tp
    layers = math.ceil(cfg.n_layers / topo.pp)
    body = layers * (c["block_matrices"] // tp + c["block_norms"])
    if topo.pp == 1:
        return body + (c["embedding"] + c["head"]) // tp + c["final_norm"]
    first = body + c["embedding"] // tp
    last = body + (c["head"] or c["embedding"]) // tp + c["final_norm"]  # a tied head holds the table
    return max(first, last)


def largest_tensor(cfg: ModelConfig, topo: Topology) -> int:
    """Elements of the largest single weight of a rank: a vocabulary table or an FFN matrix."""
    return max(cfg.vocab.padded_size * cfg.d_model // topo.tp, cfg.ffn_dim * cfg.d_model // topo.tp)


# ---- the estimate ------------------------------------------------------------------------
@dataclass(frozen=True)
class _Precision:
    model: int  # bytes of a model weight / activation
    grad_accum: int
    master: int  # 0: the model weights are the master (fp32 without ZeRO)
    state: int

    @classmethod
    def of(cls, ds_cfg: dict) -> "_Precision":
        prec = ds_config.precision(ds_cfg)
        model = DTYPE_BYTES[prec]
        accum = ds_cfg.get("data_types", {}).get("grad_accum_dtype")
        bf16 = ds_cfg.get("bf16", {}) if prec == "bf16" else {}
        master = 2 if bf16.get("bf16_master_weights_and_grads") else 4
        state = 2 if bf16.get("bf16_optimizer_states") else 4
        if prec == "fp32" and ds_config.zero_stage(ds_cfg) == 0:
            master = 0
        return cls(model=model, grad_accum=DTYPE_BYTES[accum] if accum else model, master=master, state=state)


def _offload_device(ds_cfg: dict, what: str) -> str:
    return ds_cfg.get("zero_optimization", {}).get(f"offload_{what}", {}).get("device", "none") or "none"


def estimate(cfg: ModelConfig, ds_cfg: dict, topo: Topology, micro_batch: int, seq_len: int,
             activation_checkpointing: bool, accelerator: str = "cuda",
             baseline: float | None = None) -> MemoryEstimate:
    """Predicted peak memory per rank. `accelerator` is "cuda" or "cpu" (where the
    accelerator's memory is host memory and there is no CUDA context). `baseline` replaces
    the CPU process baseline (bytes) with one measured on the machine at hand
    (benchmarks/memory_baseline.measure); it is ignored for "cuda". Raises ConfigError
    (one line) for a layout training refuses and for inputs the estimate cannot model."""

    if micro_batch < 1 or seq_len < 1:
        raise ConfigError(f"--micro-batch and --seq-len must be >= 1, got {micro_batch} and {seq_len}")
    if accelerator not in ("cuda", "cpu"):
        raise ConfigError(f"accelerator must be cuda or cpu, got {accelerator!r}")
    check_layout(cfg, ds_cfg, topo, sequence_parallel=False)
    stage, prec, dp = ds_config.zero_stage(ds_cfg), _Precision.of(ds_cfg), topo.dp
    if stage < 3 and _offload_device(ds_cfg, "param") != "none":  # DeepSpeed ignores it: nothing to count
        raise ds_config.DSConfigError(f"offload_param needs ZeRO stage 3, the config has stage {stage}")
    P = rank_parameters(cfg, topo)
    z = ds_cfg.get("zero_optimization", {})
    param_dev = {"none": "gpu", "cpu": "host", "nvme": "nvme"}[_offload_device(ds_cfg, "param")]
    opt_dev = {"none": "gpu", "cpu": "host", "nvme": "nvme"}[_offload_device(ds_cfg, "optimizer")]
    items: list[MemoryItem] = []

    def add(name, where, n, note=""):
        items.append(MemoryItem(name, where, float(n), note))

    part = P / dp if stage >= 1 else P  # what ZeRO partitions
    held = P / dp if stage == 3 else P
    note = f"{P:,} params/rank x {prec.model} B" + (f" / dp {dp}" if stage == 3 else "")
    if param_dev == "nvme":  # DeepSpeed keeps up to max_in_cpu elements in host memory
        in_cpu = min(held, float(z["offload_param"].get("max_in_cpu", 1e9)))
        add("parameters (in CPU)", "host", in_cpu * prec.model, "offload_param.max_in_cpu")
        held -= in_cpu
    add("parameters", param_dev, held * prec.model, note)
    _gradients(add, stage, prec, P, part, z, opt_dev, touched_only=accelerator == "cpu")
    if prec.master:
        add("master weights", opt_dev, part * prec.master, f"{prec.master} B/param")
    add("optimizer states", opt_dev, part * ADAM_MOMENTS * prec.state, f"Adam 2 x {prec.state} B/param")
    _offload_buffers(add, ds_cfg, prec, part)
    if stage == 3:
        big = largest_tensor(cfg, topo)
        prefetch = min(float(z.get("stage3_prefetch_bucket_size", 5e7)),
                       float(z.get("stage3_max_live_parameters", 1e9)), P)  # never more than the model
        add("gathered ZeRO-3 layers", "gpu", (2 * big + prefetch) * prec.model,
            "largest module + its full grad + prefetch bucket")
    _activations(add, cfg, topo, micro_batch, seq_len, activation_checkpointing, prec.model)
    _logits(add, cfg, topo, micro_batch, seq_len, prec.model)
    if accelerator == "cpu":
        # The model is first built whole (fp32 under ZeRO 0-2, converted by DeepSpeed; in the
        # model dtype module by module under zero.Init) and freed; glibc keeps freed heap
        # pages of the (< 32 MB) tensors resident, so on CPU that copy stays in the peak RSS.
        # Under ZeRO-3 the resident part varies between identical runs; 3 bytes a parameter is
        # calibrated to the measured spread (benchmarks/results/estimate_memory_vs_rss-cpu.json).
        built = P * (4 if stage < 3 else 3)
        add("model construction copy", "host", built, "freed, kept resident by the CPU allocator")
        add("baseline", "host", CPU_PROCESS_BASELINE if baseline is None else baseline,
            "a micro-model launch/train.py run, measured" + ("" if baseline is None else " here"))
    else:
        add("baseline (CUDA context)", "gpu", GPU_CONTEXT, "assumed, unmeasured")
        add("baseline (process)", "host", GPU_HOST_PROCESS_BASELINE, "assumed, unmeasured")
    return MemoryEstimate(tuple(items))


def _gradients(add, stage, prec, P, part, z, opt_dev, touched_only):
    # a CPU tensor's untouched pages are not resident: only what the grads fill counts
    bucket = float(z.get("reduce_bucket_size", 5e8))
    if touched_only:
        bucket = min(bucket, part)
    if stage <= 1:
        add("gradients", "gpu", P * prec.model, "full model-dtype grads")
        if prec.model == 2 and prec.grad_accum == 4:
            add("gradients (fp32 accumulation)", "gpu", P * 4, "bf16 optimizer's flat fp32 buffer")
        elif stage == 1 and prec.master:
            add("gradients (master partition)", opt_dev, part * prec.master, "optimizer's flat grad")
    elif stage == 2:
        add("gradients", "gpu", part * prec.model + bucket * prec.model,
            "partition + contiguous reduce bucket")
        add("gradients (master partition)", opt_dev, part * prec.master, "optimizer's flat grad")
    else:
        grad_dev = "host" if opt_dev != "gpu" else "gpu"
        add("gradients", grad_dev, part * prec.grad_accum, "partition buffer")
        if opt_dev != "gpu":
            add("gradients (optimizer copy)", opt_dev, part * prec.master, "offloaded optimizer's grad")
        add("reduce bucket", "gpu", bucket * prec.model, "reduce_bucket_size")


def _offload_buffers(add, ds_cfg, prec, part):
    """Pinned host buffers the NVMe swappers stage through."""
    z = ds_cfg.get("zero_optimization", {})
    if _offload_device(ds_cfg, "param") == "nvme":
        p = z["offload_param"]
        n = int(p.get("buffer_count", 5)) * float(p.get("buffer_size", 1e8))
        add("offload buffers (params)", "host", n * prec.model, "buffer_count x buffer_size, pinned")
    if _offload_device(ds_cfg, "optimizer") == "nvme":
        o = z["offload_optimizer"]
        n = int(o.get("buffer_count", 4)) * min(float(z.get("sub_group_size", 1e9)), part)
        add("offload buffers (optimizer)", "host", n * prec.master, "buffer_count x sub-group, pinned")


def _activations(add, cfg, topo, B, S, checkpointing, a):
    """Saved tensors of the forward pass (elements per token, x a bytes)."""
    d, f, tp = cfg.d_model, cfg.ffn_dim, topo.tp
    kv = 2 * cfg.n_kv_heads * cfg.head_dim
    expanded = 2 * d if cfg.n_kv_heads != cfg.n_heads else 0  # GQA k/v repeated for SDPA
    # replicated: block input, attn-norm out, residual sum, mlp-norm out; split across
    # tp: q + k + v, expanded k/v, attention out, gate, up, silu(gate), gate*up
    per_layer = 4 * d + (d + kv + expanded + d + 4 * f) // tp
    tokens = B * S
    layers = math.ceil(cfg.n_layers / topo.pp)
    in_flight = topo.pp if topo.pp > 1 else 1  # 1F1B: the first stage keeps pp micro-batches
    if checkpointing:
        saved = layers * d + per_layer  # each layer's input + one layer recomputed
        note = "checkpointed: layer inputs + one recomputed layer"
    else:
        saved = layers * per_layer
        note = "every layer's saved tensors"
    add("activations", "gpu", tokens * saved * a * in_flight, f"{note}, {B}x{S} tokens")


def _logits(add, cfg, topo, B, S, a):
    """The head's largest live logits block (megamm.model.loss): one chunk of rows over
    one column block of the widest span it computes, under the default HeadChunking.
    Without the grammar ("full") the span is the whole padded vocabulary, otherwise the
    widest state's (text ids + <eot>); with tp a rank holds at most its shard's columns.
    The block lives in fp32, beside the 16-bit copy it is made from or cast to for the
    gradient's matmuls (none in fp32); the gradient is computed in the forward, chunk by
    chunk, so nothing else of the logits' size is held."""
    v = cfg.vocab
    if cfg.loss_scope != "full":
        width = max(v.text_size + 1, v.image_codes, v.audio_codebook_size + 1)
    else:
        width = v.padded_size
    chunking = DEFAULT_CHUNKING
    rows = min(-(-B * S // PAD_ROWS) * PAD_ROWS, chunking.rows(width))
    cols = chunking.columns(chunking.rows(width), min(width, math.ceil(v.padded_size / topo.tp)))
    per = 4 + (a if a < 4 else 0)
    add("logits and loss", "gpu", rows * cols * per,
        f"{rows:,} rows x {cols:,} columns: one fp32 chunk (+ its {a}-byte copy)")
