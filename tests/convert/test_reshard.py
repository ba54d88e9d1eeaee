"""tools/reshard.py on checkpoints of real launches (CPU, gloo, fp32): a checkpoint
resharded to another tensor/pipeline/data-parallel layout resumes there on the loss
curve the unresharded run continues on; bad input is one line and exit status 2.

One module fixture makes every run, in three launches (the runs of one world size that do
not depend on each other share one: tests/checkpoint/many_runs.py):
  tp2 (2 ranks) --step2--> reshard --tp 1  --> tp1 (1 rank, saves steps 3, 4)
  tp1 --step3--> reshard --pp 2 --> pp2 (2 ranks)
  dp2 (2 ranks, ZeRO-1, micro batch 2) --step2--> reshard --> dp1 (1 rank, micro batch 2 x grad accum 2)
"""
import importlib.util
import json
import shutil

import pytest
import torch
from checkpoints import ROOT, run_many, run_train, tool

import megamm
from megamm.checkpoint import ds, manifest
from megamm.checkpoint.ds import universal
from megamm.config import ConfigError

BASE = ["--seq-len", 32, "--warmup", 2, "--seed", 7, "--lr", 3e-3, "--max-steps", 4, "--precision", "fp32",
        "--micro-batch", 2]
STATES = ("fp32", "exp_avg", "exp_avg_sq")


def launch(data, save_dir, flags, ranks, *extra):
    proc = run_train(["--data", data, *BASE, *flags, *extra, "--save-dir", save_dir],
                     ranks=ranks if ranks > 1 else None)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _load_tool():
    spec = importlib.util.spec_from_file_location("reshard_tool", ROOT / "tools" / "reshard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOOL = _load_tool()


def reshard(*args) -> int:
    """tools/reshard.py's main in this process (a subprocess would import DeepSpeed again)."""
    return TOOL.main([str(a) for a in args])


def losses(save_dir) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (save_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    root = tmp_path_factory.mktemp("reshard")
    zero1 = ["--ds_config", "zero1.json"]

    def args(name, flags, *extra):
        return ["--data", tiny_data, *BASE, *flags, *extra, "--save-dir", root / name]

    run_many({"tp2": (args("tp2", [*zero1, "--tp", 2, "--grad-accum", 1, "--save-interval", 2]), 2),
              "dp2": (args("dp2", [*zero1, "--grad-accum", 1, "--save-interval", 2]), 2)}, root)
    proc = tool("reshard.py", "--checkpoint", root / "tp2" / "step2", "--out", root / "tp1", "--tp", 1, "--pp", 1)
    assert proc.returncode == 0 and "wrote" in proc.stdout, proc.stderr[-3000:]
    assert reshard("--checkpoint", root / "dp2", "--out", root / "dp1", "--tp", 1, "--pp", 1) == 0  # its latest
    assert (root / "dp1" / "latest").read_text() == "step4"
    assert reshard("--checkpoint", root / "dp2" / "step2", "--out", root / "dp1", "--tp", 1, "--pp", 1,
                   "--force") == 0
    assert sorted(p.name for p in (root / "dp1").iterdir()) == ["latest", "step2"]  # replaced whole
    run_many({"tp1": (args("tp1", [*zero1, "--grad-accum", 1, "--save-interval", 1], "--resume"), 1),
              "dp1": (args("dp1", [*zero1, "--grad-accum", 2], "--resume"), 1)}, root)
    assert reshard("--checkpoint", root / "tp1" / "step3", "--out", root / "pp2", "--tp", 1, "--pp", 2) == 0
    launch(tiny_data, root / "pp2", ["--ds_config", "zero1_3d.json", "--pp", 2, "--grad-accum", 1], 2, "--resume")
    return root


def assert_same_curve(resumed: dict, reference: dict, steps) -> None:
    assert sorted(resumed) == list(steps)
    for step in steps:
        keys = [k for k in reference[step] if k.startswith("loss")] + ["grad_norm", "lr"]
        assert len(keys) > 3 and set(keys) <= set(resumed[step]), resumed[step]
        for key in keys:
            assert resumed[step][key] == pytest.approx(reference[step][key], rel=1e-4), (step, key)


def test_tp2_to_tp1_resumes_on_the_tp2_curve(runs):
    assert_same_curve(losses(runs / "tp1"), losses(runs / "tp2"), [3, 4])


def test_tp1_to_pp2_resumes_on_the_tp1_curve(runs):
    assert_same_curve(losses(runs / "pp2"), losses(runs / "tp1"), [4])
    assert sorted(p.name for p in (runs / "pp2" / "step3").glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]


def test_dp2_zero1_to_dp1_resumes_on_the_dp2_curve(runs):
    """Same global batch (2 x 1 x dp2 = 2 x 2 x dp1): the loader continues at the same row."""
    assert_same_curve(losses(runs / "dp1"), losses(runs / "dp2"), [3, 4])


def test_resharded_checkpoint_holds_the_source_state(runs):
    """Weights load as the same plain model; moments and step are the source's, whole."""
    source, out = runs / "tp2" / "step2", runs / "tp1" / "step2"
    a, b = megamm.load_model(source).state_dict(), megamm.load_model(out).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    s, u = ds.read(source), ds.read(out)
    assert s.names == u.names and s.step == u.step == 2
    for name in ("embed.weight", "layers.1.attn.o_proj.weight", "layers.0.mlp.up_proj.weight", "norm.weight"):
        for key in STATES:
            assert torch.equal(s.tensor(name, key), u.tensor(name, key)), (name, key)
    assert s.tensor("head.weight", "exp_avg_sq").abs().sum() > 0
    assert json.loads((out / "megamm.json").read_text())["topology"] == {"tp": 1, "pp": 1, "dp": 1}


def one_line_error(capsys, *args, words=()):
    assert reshard(*args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    for w in words:
        assert w in lines[0], lines[0]


def test_bad_input_is_one_line_and_writes_nothing(runs, tmp_path, capsys):
    source, out = runs / "tp2" / "step2", tmp_path / "o"
    one_line_error(capsys, "--checkpoint", tmp_path / "nope", "--out", out, "--tp", 1, "--pp", 1, words=["nope"])
    one_line_error(capsys, "--checkpoint", source, "--out", runs / "tp1", "--tp", 1, "--pp", 1, words=["--force"])
    one_line_error(capsys, "--checkpoint", source, "--out", out, "--tp", 3, "--pp", 1,
                   words=["--tp 3 does not divide"])
    partial = tmp_path / "partial"
    shutil.copytree(source, partial)
    next(partial.glob("*optim_states.pt")).unlink()  # lost a ZeRO partition
    one_line_error(capsys, "--checkpoint", partial, "--out", out, "--tp", 1, "--pp", 1,
                   words=["optim_states.pt is missing"])
    mismatched = tmp_path / "mismatched"
    shutil.copytree(runs / "dp2" / "step2", mismatched)
    meta = json.loads((mismatched / "megamm.json").read_text())
    (mismatched / "megamm.json").write_text(json.dumps({**meta, "topology": {"tp": 1, "pp": 1, "dp": 4}}))
    manifest.write(mismatched, manifest.entries(mismatched, manifest.list_files(mismatched)))
    one_line_error(capsys, "--checkpoint", mismatched, "--out", out, "--tp", 1, "--pp", 1, words=["needs 4"])
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".o")]


def test_a_resharded_checkpoint_resumes_only_where_deepspeed_can_load_it(tmp_path):
    meta = {"format": "universal", "topology": {"tp": 2, "pp": 1, "dp": 1}}
    zero1, zero3, zero0 = ({"zero_optimization": {"stage": s}} for s in (1, 3, 0))
    cfg = universal.resume_config(meta, 2, 1, zero1, tmp_path)
    assert cfg["checkpoint"] == {"load_universal": True} and "checkpoint" not in zero1
    with pytest.raises(ConfigError, match="resharded for --tp 2 --pp 1, this run has --tp 1 --pp 2"):
        universal.resume_config(meta, 1, 2, zero1, tmp_path)
    with pytest.raises(ConfigError, match="stage 1-3"):
        universal.resume_config(meta, 2, 1, zero0, tmp_path)
    with pytest.raises(ConfigError, match="ZeRO-3 loads one only with --tp 1"):
        universal.resume_config(meta, 2, 1, zero3, tmp_path)
    assert universal.resume_config({**meta, "topology": {"tp": 1, "pp": 1}}, 1, 1, zero3, tmp_path)
