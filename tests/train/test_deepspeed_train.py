"""Real `deepspeed` launches on CPU (gloo): ZeRO-3 offload across 2 ranks, resume
exactness, data-parallel layouts against the single process, loading the result."""
import shutil
from pathlib import Path

import pytest
import torch
from conftest import losses, run_many, run_train

import megamm

COMMON = ["--seq-len", 128, "--warmup", 2, "--seed", 7]


def check(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, tiny_data):
    """8 steps of tiny, ZeRO-3 with params + optimizer offloaded, bf16, 2 ranks; saves at 4 and 8."""
    save = tmp_path_factory.mktemp("zero3") / "run"
    proc = check(run_train(["--ds_config", "zero3_offload.json", "--data", tiny_data, *COMMON, "--micro-batch", 2,
                            "--grad-accum", 2, "--lr", 5e-3, "--max-steps", 8, "--save-interval", 4,
                            "--eval-interval", 4, "--eval-batches", 2, "--save-dir", save], ranks=2))
    (save.parent / "master_port").write_text(str(proc.master_port))
    return save


def test_ranks_leave_no_shared_memory_behind(zero3_run):
    """DeepSpeed's CPU allreduce op creates a ~70 MB /dev/shm file per rank and never
    removes it; megamm.parallel.distributed unlinks each rank's at exit."""
    port = (zero3_run.parent / "master_port").read_text()
    assert not sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def test_zero3_offload_two_ranks_trains_with_falling_loss(zero3_run):
    log = losses(zero3_run)
    assert sorted(log) == list(range(1, 9))
    assert log[8]["loss"] < 0.9 * log[1]["loss"]
    assert log[8]["val_loss"] < log[4]["val_loss"]
    for key in ("lr", "tokens_per_s", "loss_text", "loss_image", "loss_audio"):
        assert key in log[8]
    assert (zero3_run / "latest").read_text() == "step8"
    assert not list(zero3_run.glob(".partial-*"))


def test_resume_continues_the_same_loss_curve(zero3_run, tiny_data, tmp_path):
    """4 steps + resume + 4 steps == 8 straight (the checkpoint at step 4 of the same run)."""
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(zero3_run / "step4", resumed / "step4")
    (resumed / "latest").write_text("step4")
    check(run_train(["--ds_config", "zero3_offload.json", "--data", tiny_data, *COMMON, "--micro-batch", 2,
                     "--grad-accum", 2, "--lr", 5e-3, "--max-steps", 8, "--resume",
                     "--save-dir", resumed], ranks=2))
    straight, again = losses(zero3_run), losses(resumed)
    assert sorted(again) == [5, 6, 7, 8]
    for step in again:
        assert again[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-5)
        assert again[step]["lr"] == pytest.approx(straight[step]["lr"], rel=1e-9)


def test_load_model_gives_the_trained_weights(zero3_run, tiny_data):
    """The plain model loaded from the ZeRO-3 checkpoint reproduces the validation loss the
    trainer logged at that step (same rows: 2 ranks x 2 batches x 2 rows)."""
    from megamm.data.loader import open_split, validation_batches

    model = megamm.load_model(zero3_run)
    assert not model.training
    val = open_split(tiny_data, "val", model.vocab)
    total = count = 0.0
    with torch.no_grad():
        for rank in range(2):
            for x, y in validation_batches(val, model.vocab, 128, 2, rank, 2, 2):
                assert model(x).shape == (2, 128, model.vocab.size)
                out = model(x, y)
                n = float(out.modality_count.sum())
                total, count = total + float(out.loss) * n, count + n
    logged = losses(zero3_run)[8]["val_loss"]
    assert total / count == pytest.approx(logged, rel=2e-2)  # trainer ran bf16, this runs fp32
    early = megamm.load_model(zero3_run / "step4")
    assert not torch.equal(early.head.weight, model.head.weight)


def test_data_parallel_layouts_match_the_single_process(tiny_data, tmp_path):
    """fp32: DP=2 (ZeRO-1 and ZeRO-3) and DP=1 with accumulation give DP=1's losses and grad norms."""
    base = ["--data", tiny_data, *COMMON, "--lr", 3e-3, "--max-steps", 4, "--precision", "fp32"]
    runs = {
        "dp1": (["--ds_config", "zero1.json", "--micro-batch", 4, "--grad-accum", 1], 1),
        "dp1_accum2": (["--ds_config", "zero1.json", "--micro-batch", 2, "--grad-accum", 2], 1),
        "dp2_zero1": (["--ds_config", "zero1.json", "--micro-batch", 2, "--grad-accum", 1], 2),
        "dp2_zero3": (["--ds_config", "zero3_offload.json", "--micro-batch", 1, "--grad-accum", 2], 2),
    }
    run_many({name: (base + extra + ["--save-dir", tmp_path / name], ranks) for name, (extra, ranks) in runs.items()},
             tmp_path, side_by_side=True)
    logs = {name: losses(tmp_path / name) for name in runs}
    ref = logs.pop("dp1")
    for name, log in logs.items():
        for step in range(1, 5):
            assert log[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5), (name, step)
            assert log[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=1e-4), (name, step)
