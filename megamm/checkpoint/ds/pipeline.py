"""DeepSpeed's pipeline module, as megamm builds it: `pipeline_module(specs, sizes, loss_fn,
topo)`.

Two of PipelineModule's private methods are overridden (DeepSpeed 0.19.8):
  - `_count_layer_params`: stages are balanced by the parameter counts the config gives
    (`sizes`, one per layer), instead of building every layer on every rank to count them;
  - `_build`: after DeepSpeed has built this rank's layers (each registered as child
    "<layer index>", its parameters named "<index>.<attribute>.<rest>"), each megamm stage's
    module is registered at its plain-model path (`stage.plain_path`: "embed",
    "layers.<i>", "norm", "head") instead, so the engine's parameter names — what ZeRO's
    optimizer files, universal checkpoints and --init-from use — are the plain model's.
    DeepSpeed still runs and checkpoints the stages through `forward_funcs`, so its
    per-layer files keep the stage's own keys ("<stage.PART>.<rest>").
"""
from __future__ import annotations

from deepspeed.pipe import PipelineModule
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import nn


def _register(root: nn.Module, path: str, module: nn.Module) -> None:
    """root.<path> = module, creating ModuleDicts for the dotted path's containers."""
    *parents, leaf = path.split(".")
    for part in parents:
        if part not in root._modules:
            root.add_module(part, nn.ModuleDict())
        root = root._modules[part]
    root.add_module(leaf, module)


class _PlainNamedPipeline(PipelineModule):
    def __init__(self, layer_sizes: list[int], **kwargs):
        object.__setattr__(self, "_megamm_layer_sizes", layer_sizes)
        super().__init__(**kwargs)

    def _count_layer_params(self):
        return list(self._megamm_layer_sizes)

    def _build(self):
        super()._build()
        for index, stage in enumerate(self.forward_funcs):
            name = str(self._local_start + index)
            if name in self._modules and hasattr(stage, "plain_path"):
                del self._modules[name]
                _register(self, stage.plain_path, stage.module)


def pipeline_module(specs, sizes: list[int], loss_fn, topo) -> PipelineModule:
    """This rank's stage of the pipeline made of `specs` (megamm.parallel.pipeline
    .pipeline_layers), balanced by `sizes`, on topology `topo` (megamm.parallel.Topology)."""
    grid = PipeModelDataParallelTopology(num_pp=topo.pp, num_mp=topo.tp, num_dp=topo.dp)
    return _PlainNamedPipeline(sizes, layers=specs, loss_fn=loss_fn, topology=grid, partition_method="parameters")
