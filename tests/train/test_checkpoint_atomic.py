"""A save that dies part-way never replaces the last good checkpoint."""
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, free_port, losses, run_train

import megamm
from megamm.train import checkpoint


class FakeEngine:
    """Writes DeepSpeed-like files into the tag directory; can die half-way."""

    def __init__(self, die=False):
        self.die = die

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False
        d = os.path.join(save_dir, tag)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "model_states.pt"), "w") as f:
            f.write(str(client_state))
        if self.die:
            raise KeyboardInterrupt("killed while saving")


def test_a_failed_save_keeps_latest_and_the_next_save_cleans_up(tmp_path):
    checkpoint.save(FakeEngine(), tmp_path, 1, {"step": 1}, {"model": {}}, rank=0)
    assert (tmp_path / "latest").read_text() == "step1"
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(FakeEngine(die=True), tmp_path, 2, {"step": 2}, {"model": {}}, rank=0)
    assert (tmp_path / "latest").read_text() == "step1"
    assert (tmp_path / "step1" / "model_states.pt").read_text() == "{'step': 1}"
    assert not (tmp_path / "step2").exists() and (tmp_path / ".partial-step2").exists()
    checkpoint.save(FakeEngine(), tmp_path, 2, {"step": 2}, {"model": {}}, rank=0)
    assert (tmp_path / "latest").read_text() == "step2"
    assert not (tmp_path / ".partial-step2").exists()


def test_re_saving_a_step_replaces_it_only_once_complete(tmp_path):
    checkpoint.save(FakeEngine(), tmp_path, 3, {"v": "old"}, {"model": {}}, rank=0)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(FakeEngine(die=True), tmp_path, 3, {"v": "new"}, {"model": {}}, rank=0)
    assert "old" in (tmp_path / "step3" / "model_states.pt").read_text()
    checkpoint.save(FakeEngine(), tmp_path, 3, {"v": "new"}, {"model": {}}, rank=0)
    assert "new" in (tmp_path / "step3" / "model_states.pt").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step3"]


def test_latest_naming_a_missing_directory_is_a_clear_error(tmp_path):
    (tmp_path / "latest").write_text("step9")
    with pytest.raises(checkpoint.CheckpointError, match="names 'step9' but .* is missing"):
        megamm.load_model(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint not found"):
        megamm.load_model(tmp_path / "nope")


def test_killing_a_real_run_mid_training_leaves_a_resumable_checkpoint(tmp_path, tiny_data):
    save = tmp_path / "run"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           str(free_port()), "launch/train.py", "--ds_config", "zero2.json", "--data", str(tiny_data),
           "--seq-len", "128", "--micro-batch", "2", "--max-steps", "200", "--save-interval", "1",
           "--save-dir", str(save), "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            latest = save / "latest"
            if latest.is_file() and int(latest.read_text().removeprefix("step")) >= 3:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the run never saved 3 checkpoints")
        time.sleep(0.7)  # somewhere inside a later step or save
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    model = megamm.load_model(save)  # latest names a complete checkpoint
    assert model.config.max_seq_len == 128
    step = int((save / "latest").read_text().removeprefix("step"))
    proc = run_train(["--ds_config", "zero2.json", "--data", tiny_data, "--seq-len", 128, "--micro-batch", 2,
                      "--max-steps", step + 1, "--save-dir", save, "--resume"], ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (save / "latest").read_text() == f"step{step + 1}"
    assert step + 1 in losses(save)
