"""A skipped step changes nothing (one-rank engine probe); a checkpoint file holding a
pickle that would run code is refused by resume and by load_model, and the code does
not run."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from fault_runs import ROOT, STEPS, clean_env

import megamm
from megamm.checkpoint import manifest
from megamm.checkpoint import CheckpointError
from megamm.checkpoint.ds import UnsafeCheckpointError


@pytest.fixture(scope="module")
def probe(tiny_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("probe")
    proc = subprocess.run([sys.executable, "tests/faults/engine_probe.py", str(tiny_data), str(work), "zero2.json"],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")), None)
    assert proc.returncode == 0 and line, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(line.removeprefix("PROBE "))


def test_a_skipped_step_changes_no_weight_no_moment_and_not_the_lr(probe):
    """Step 2: injected NaN gradients; step 3: an infinite loss; steps 1 and 4 clean."""
    steps = {s["step"]: s for s in probe["steps"]}
    assert [steps[s]["applied"] for s in (1, 2, 3, 4)] == [True, False, False, True]
    assert [steps[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 1, 2, 2]
    assert [steps[s]["consecutive"] for s in (1, 2, 3, 4)] == [0, 1, 2, 0]
    assert steps[2]["changed"] == [] and steps[3]["changed"] == []  # fp32, bf16, exp_avg(_sq), Adam step, lr
    kinds = {name.split(":")[0] for name in steps[4]["changed"]}
    assert kinds >= {"fp32", "bf16", "exp_avg", "exp_avg_sq", "adam_step"}  # a clean step does change them


def test_resume_refuses_a_pickle_that_would_run_code(probe):
    assert probe["resume"].startswith("UnsafeCheckpointError: "), probe["resume"]
    assert "mp_rank_00_model_states.pt: names io.open" in probe["resume"]
    assert probe["marker_exists"] is False


class CreatesMarker:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_model_refuses_a_pickle_that_would_run_code(reference, tmp_path):
    ckpt = tmp_path / f"step{STEPS}"
    shutil.copytree(reference / f"step{STEPS}", ckpt)
    assert megamm.load_model(ckpt).config.max_seq_len == 128  # intact: loads
    marker, states = tmp_path / "marker", ckpt / "mp_rank_00_model_states.pt"
    sd = torch.load(states, weights_only=True)
    sd["args"] = CreatesMarker(marker)
    torch.save(sd, states)
    with pytest.raises(CheckpointError, match="damaged checkpoint .*mp_rank_00_model_states"):
        megamm.load_model(ckpt)  # the manifest notices the changed file first
    manifest.write(ckpt, manifest.entries(ckpt, manifest.list_files(ckpt)))  # a tamperer can rewrite it
    with pytest.raises(UnsafeCheckpointError, match=r"mp_rank_00_model_states\.pt: names io\.open"):
        megamm.load_model(ckpt)
    assert not marker.exists()
    torch.load(states, weights_only=False)  # what a plain load would have done
    assert marker.exists()
