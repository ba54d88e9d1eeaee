"""Real `deepspeed` launches on CPU (gloo): every parallel layout trains the single
process's loss curve (fp32), its checkpoints load as the same plain model, and a
3D run resumes on its own curve. One launch per world size, shared by the layouts and the
assertions."""
import shutil

import pytest
import torch
from conftest import losses, run_many, run_train

import megamm

BASE = ["--seq-len", 128, "--warmup", 2, "--seed", 7, "--lr", 3e-3, "--max-steps", 4, "--save-interval", 2,
        "--precision", "fp32", "--micro-batch", 2, "--grad-accum", 2]

# name -> (extra flags, ranks). The reference is one process: tp = pp = dp = 1.
LAYOUTS = {
    "single": (["--ds_config", "zero1.json"], 1),
    "tp2": (["--ds_config", "zero1.json", "--tp", 2], 2),
    "pp2": (["--ds_config", "zero1_3d.json", "--pp", 2], 2),
    "tp2_pp2": (["--ds_config", "zero1_3d.json", "--tp", 2, "--pp", 2], 4),
    "zero3_tp2": (["--ds_config", "zero3_offload.json", "--tp", 2], 2),
    "tp2_sequence_parallel": (["--ds_config", "zero1.json", "--tp", 2, "--sequence-parallel"], 2),
}


def check(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    root = tmp_path_factory.mktemp("layouts")
    run_many({name: (["--data", tiny_data, *BASE, *extra, "--save-dir", root / name], ranks)
              for name, (extra, ranks) in LAYOUTS.items()}, root, side_by_side=True)
    return root


@pytest.mark.parametrize("layout", [k for k in LAYOUTS if k != "single"])
def test_layout_follows_the_single_process_loss_curve(runs, layout):
    ref, got = losses(runs / "single"), losses(runs / layout)
    assert sorted(got) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-4), step
        for modality in ("text", "image", "audio"):
            key = f"loss_{modality}"
            assert got[step][key] == pytest.approx(ref[step][key], rel=1e-4), (step, key)
        assert got[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=1e-4), step
    assert ref[4]["loss"] < ref[1]["loss"]  # the curve being matched is a learning one


@pytest.mark.parametrize("layout", [k for k in LAYOUTS if k != "single"])
def test_checkpoint_of_any_layout_loads_as_the_single_process_model(runs, layout, tiny_data):
    from megamm.data.loader import open_split, validation_batches

    ref = megamm.load_model(runs / "single" / "step2")
    model = megamm.load_model(runs / layout / "step2")
    assert not model.training
    assert model.config.replace(activation_checkpointing=False) == ref.config.replace(activation_checkpointing=False)
    x, _ = validation_batches(open_split(tiny_data, "val", ref.vocab), ref.vocab, 128, 2, 0, 1, 1)[0]
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-3)
    for name, p in ref.state_dict().items():
        assert model.state_dict()[name].shape == p.shape, name


def test_3d_layout_resumes_on_its_own_curve(runs, tiny_data, tmp_path):
    """tp2 x pp2: 2 steps + resume + 2 steps == 4 straight."""
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(runs / "tp2_pp2" / "step2", resumed / "step2")
    (resumed / "latest").write_text("step2")
    extra, ranks = LAYOUTS["tp2_pp2"]
    check(run_train(["--data", tiny_data, *BASE, *extra, "--resume", "--save-dir", resumed], ranks=ranks))
    straight, again = losses(runs / "tp2_pp2"), losses(resumed)
    assert sorted(again) == [3, 4]
    for step in (3, 4):
        assert again[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-6)
