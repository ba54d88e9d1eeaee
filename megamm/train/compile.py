"""`--compile`: torch.compile of each transformer block, applied from outside the model
(torchtitan's `apply_compile`), in the build order

    plain model -> tensor parallel shards -> compile -> activation checkpointing -> ZeRO / engine

Each `megamm.model.layers.Block` gets `block.forward = torch.compile(block.forward)`; the
module's `__call__`, and so every hook registered on the block itself, stays eager.
Parameter names, state dicts and checkpoints are unchanged (no `_orig_mod.` wrapper), and
the blocks share one compiled code object (same code, same shapes), so a deeper model
compiles no longer than a shallower one.

How it composes with the rest of a run:
  attention                 the packed-document path (megamm.model.attention) reads the
                            batch's segment lengths on the host: dynamo breaks the graph
                            there and runs that bookkeeping eagerly; the projections,
                            RoPE, norms, MLP and the SDPA calls around it are compiled.
  activation checkpointing  wraps the compiled forward (torch's non-reentrant checkpoint,
                            eager; the recomputation runs the compiled code again). Not
                            torchtitan's compile-around-checkpoint: dynamo cannot trace a
                            checkpointed region that has a graph break, and would then run
                            the whole block eagerly. So the engine builds compiled models
                            without checkpointing and `apply_compile` adds it.
  ZeRO-3                    DeepSpeed puts gather/release hooks on every submodule; under
                            compile each block is made a ZeRO-3 leaf module instead
                            (`deepspeed.utils.set_z3_leaf_modules`), so the block's own
                            hooks, outside the compiled region, gather its parameters for
                            its forward, recomputation and backward (per-block gathers,
                            like FSDP units).
  tensor parallelism        the region hooks and collectives inside a block
                            (megamm.parallel.tensor_parallel, sequence parallelism too)
                            are traced with it.
  pipeline stages           the Block inside each BlockStage is compiled the same way.
  Triton kernels            not composed: megamm.kernels launches its Triton kernels from
                            autograd Functions through its own dispatch (`_Kernel`); dynamo
                            traces into it and fails inside Triton's CPU interpreter, and
                            on CUDA it is unchecked. Compiled blocks run the torch norm and
                            RoPE, which inductor fuses into kernels it generates (Triton on
                            CUDA, C++ on the CPU): kernels="auto" means that under compile,
                            and `--compile --kernels triton` is refused in one line.
                            Registering the kernels as torch custom ops
                            (torch.library.triton_op) would let a compiled block call them.
Every composed case above (and ZeRO-3 + tp2) trains the eager curve on the CPU (fp32, gloo, tiny:
losses within 2e-7 relative over 3 steps; tests/train/test_compile.py keeps ZeRO-3 with
offload and checkpointing). Not checked on a GPU yet, nor with the flash-attn backend.
Compilation is lazy: the first forward and backward of each shape pay it (tens of seconds
on a CPU), which the first step's time shows.
"""
from __future__ import annotations

import torch
from deepspeed.utils import set_z3_leaf_modules
from torch import nn

from megamm.config import ConfigError, ModelConfig
from megamm.model.layers import Block
from megamm.parallel.build import apply_activation_checkpointing


def compile_config(cfg: ModelConfig) -> ModelConfig:
    """The config to build a model that `apply_compile` then compiles: without activation
    checkpointing (apply_compile adds it around the compiled region) and with the torch
    norm and RoPE, which inductor fuses (dynamo cannot trace the Triton kernels' launches)."""
    if cfg.kernels == "triton":
        raise ConfigError("--compile cannot trace the hand-written Triton kernels (kernels='triton'); "
                          "use kernels 'auto' or 'torch'")
    return cfg.replace(activation_checkpointing=False, kernels="torch")


def apply_compile(model: nn.Module, activation_checkpointing: bool = False, zero3: bool = False) -> int:
    """Compile the forward of every Block in `model` (a Transformer or a pipeline module,
    built without activation checkpointing) in place, then checkpoint each compiled block
    when asked; with `zero3`, also mark each Block a ZeRO-3 leaf (call it before
    deepspeed.initialize registers its hooks). Returns the number of blocks compiled."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.forward = torch.compile(block.forward)
    if activation_checkpointing:
        apply_activation_checkpointing(blocks)
    if zero3 and blocks:
        set_z3_leaf_modules(model, [Block])
    return len(blocks)
