"""Every bundled ds_config, at dp 1 and dp 2, trains two steps in its own precision, and its
checkpoint goes through everything that reads one: megamm.load_model, tools/reshard.py
(load_model's weights equal the fp32 master weights reshard writes, tensor for tensor),
tools/convert_to_hf.py (stock transformers computes the same logits), tools/generate.py
and tools/evaluate.py. The parallel layouts the suite trains elsewhere (tp2, pp2,
tp2 x pp2, ZeRO-3 + tp2, ZeRO-0) are checked the same way. Samples come from the live
weights, which equal the checkpoint's.

The runs share three launches (1, 2 and 4 ranks: tests/checkpoint/many_runs.py), so the
suite pays DeepSpeed's start-up once per world size, not once per layout.
"""
from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch
from conftest import ROOT, run_many
from transformers import LlamaForCausalLM

import megamm
from megamm.checkpoint import CheckpointError, ds, manifest
from megamm.checkpoint.ds import universal
from megamm.config import ConfigError

SHORT = ["--model", "tiny", "--seq-len", 512, "--warmup", 1, "--lr", 3e-3, "--max-steps", 2, "--micro-batch", 1,
         "--grad-accum", 1, "--seed", 5, "--sample-interval", 2]
PIPELINE = ["--ds_config", "zero1_3d.json", "--pp", 2]
# run name -> (flags, world size); the precision is each config's own
CONFIGS = ("cpu.json", "zero1.json", "zero1_3d.json", "zero2.json", "zero3_offload.json", "NVME")
RUNS = {
    **{f"{c.removesuffix('.json').lower()}_dp{dp}": (["--ds_config", c], dp) for c in CONFIGS for dp in (1, 2)},
    "zero1_3d_pp2_dp1": (PIPELINE, 2),
    "zero1_3d_pp2_dp2": (PIPELINE, 4),
    "tp2_zero1": (["--ds_config", "zero1.json", "--tp", 2], 2),
    "tp2_pp2": (PIPELINE + ["--tp", 2], 4),
    "tp2_zero3": (["--ds_config", "zero3_offload.json", "--tp", 2], 2),
    "zero0_bf16": (["--ds_config", "ZERO0"], 1),
}


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(quick_data_dir, tmp_path_factory):
    """run name -> its save dir, trained on the quick embedded data (which carries tokenizers)."""
    root = tmp_path_factory.mktemp("every_config")
    nvme = json.loads((ROOT / "ds_configs" / "zero3_offload_nvme.json").read_text())
    for section in ("offload_param", "offload_optimizer"):
        nvme["zero_optimization"][section]["nvme_path"] = str(root / "nvme")
    (root / "nvme.json").write_text(json.dumps(nvme))
    zero0 = json.loads((ROOT / "ds_configs" / "zero1.json").read_text())
    zero0["zero_optimization"] = {"stage": 0}
    zero0.pop("data_types", None)  # DeepSpeed accumulates bf16 gradients in fp32 only under ZeRO
    (root / "zero0.json").write_text(json.dumps(zero0))
    swap = {"NVME": str(root / "nvme.json"), "ZERO0": str(root / "zero0.json")}
    run_many({name: (["--data", quick_data_dir, *SHORT, *[swap.get(str(f), f) for f in flags],
                      "--save-dir", root / name], world) for name, (flags, world) in RUNS.items()}, root)
    return {name: root / name for name in RUNS}


@pytest.fixture(autouse=True)
def _torch_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.parametrize("name", list(RUNS))
def test_load_model_equals_the_master_weights_reshard_writes(runs, name, tmp_path):
    save = runs[name]
    model = megamm.load_model(save)
    mine = model.state_dict()
    if name == "zero0_bf16":  # no fp32 copy: load_model gives the 16-bit module weights, reshard refuses
        state = ds.read(save / "step2")
        assert not state.has_optimizer_state
        for param in state.names:
            assert torch.equal(mine[param], state.module_weight(param).float()), param
        with pytest.raises(CheckpointError, match="no ZeRO optimizer partitions"):
            _tool("reshard").reshard(save, tmp_path / "universal", 1, 1, log=lambda m: None)
        return
    out = _tool("reshard").reshard(save, tmp_path / "universal", 1, 1, log=lambda m: None)
    resharded = out / "step2"
    stored = universal.param_names(resharded)
    assert stored and set(stored) <= set(mine)
    for param in stored:
        assert torch.equal(mine[param], universal.read_state(resharded, param, "fp32")), (name, param)
    assert torch.equal(megamm.load_model(out).state_dict()["head.weight"], mine["head.weight"])


@pytest.mark.parametrize("name", list(RUNS))
def test_samples_come_from_the_live_weights_the_checkpoint_holds(runs, name):
    live = torch.load(runs[name] / "samples" / "live_step2.pt", weights_only=True)
    saved = megamm.load_model(runs[name]).state_dict()
    assert live.keys() == saved.keys()
    for key in live:
        assert torch.equal(live[key], saved[key]), (name, key)


@pytest.mark.parametrize("name", list(RUNS))
def test_converts_generates_and_evaluates(runs, name, tmp_path, quick_cache, monkeypatch):
    save = runs[name]
    ours = megamm.load_model(save)
    hf = _tool("convert_to_hf").convert(save, tmp_path / "hf", dtype="fp32", log=lambda m: None)
    theirs = LlamaForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab.text_size, (2, 32), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = ours.vocab.bos
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() <= 1e-4

    monkeypatch.setenv("MEGAMM_CACHE", str(quick_cache))  # the judges, trained once per session
    assert _tool("generate").main(["--checkpoint", str(save), "--text", "dark green eight on bright cyan",
                                   "--to", "image", "--out", str(tmp_path / "img.png")]) == 0
    assert (tmp_path / "img.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _tool("evaluate").main(["--checkpoint", str(save), "--out", str(tmp_path / "report.json"),
                                   "--examples", "1", "--loss-examples", "2"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert 0.0 <= report["image_to_text_exact"] <= 1.0 and report["test_nll_nats_per_dim"] > 0


def _legacy_pipeline_name(name: str, n_layers: int) -> str:
    """A plain name as pipeline checkpoints written before stages kept plain names spelled it."""
    if name.startswith("layers."):
        _, index, rest = name.split(".", 2)
        return f"{int(index) + 1}.block.{rest}"
    layer = {"embed": 0, "norm": n_layers + 1, "head": n_layers + 2}[name.split(".", 1)[0]]
    return f"{layer}.{name}"


def test_an_old_pipeline_resharded_checkpoint_still_loads_and_is_refused_for_resume(runs, tmp_path):
    """Universal checkpoints resharded for --pp 2 before stages kept plain names hold
    zero/<layer>.<attribute>.<rest>/: they load as the same model; resuming one is refused in
    one line that says to reshard it again."""
    out = _tool("reshard").reshard(runs["zero1_3d_pp2_dp1"], tmp_path / "new", 1, 2, log=lambda m: None)
    old = tmp_path / "old"
    shutil.copytree(out, old)
    step = old / "step2"
    n_layers = json.loads((step / "megamm.json").read_text())["model"]["n_layers"]
    for d in sorted((step / universal.ZERO_DIR).iterdir()):
        if d.is_dir():
            d.rename(d.with_name(_legacy_pipeline_name(d.name, n_layers)))
    manifest.write(step, manifest.entries(step, manifest.list_files(step)))
    assert any(p.name.startswith("1.block.") for p in (step / universal.ZERO_DIR).iterdir())
    a, b = megamm.load_model(out).state_dict(), megamm.load_model(old).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((step / "megamm.json").read_text())
    with pytest.raises(ConfigError, match="run tools/reshard.py on it again"):
        universal.resume_config(meta, 1, 2, {"zero_optimization": {"stage": 1}}, step)
    assert universal.resume_config(json.loads((out / "step2" / "megamm.json").read_text()), 1, 2,
                                   {"zero_optimization": {"stage": 1}}, out / "step2")
