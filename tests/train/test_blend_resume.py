"""A blend of two data sets (`--data 0.6 A 0.4 B`) under a real 2-rank `deepspeed` launch:
stopped mid-epoch and resumed with a larger --max-steps, it continues the uninterrupted loss
curve, and metrics.jsonl has each source's tokens and validation loss. Bad blends on the
command line end in one line (through tests/train/cli_runs.py, one process)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, losses, run_many

from megamm.config import VocabConfig, get_preset
from megamm.data.synthetic import write_synthetic_dataset

# a constant learning rate after one warm-up step: the schedule does not depend on --max-steps
FLAGS = ["--ds_config", "cpu.json", "--precision", "fp32", "--seq-len", 64, "--micro-batch", 2, "--grad-accum", 1,
         "--warmup", 1, "--min-lr-ratio", 1.0, "--lr", 3e-3, "--seed", 11, "--eval-interval", 3, "--eval-batches", 1]
OTHER_VOCAB = VocabConfig(text_size=300, n_special=12, image_codes=40, image_tokens=9, audio_codebooks=2,
                          audio_codebook_size=32)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Source a (120 documents) and b (9: it goes round its epochs); straight 6 steps, 3
    steps then a resume to 6, and 3 steps of a 2-stage pipeline, all in one 2-rank launch."""
    tmp = tmp_path_factory.mktemp("blend")
    tiny = get_preset("tiny").vocab
    a = write_synthetic_dataset(tmp / "a", tiny, n_train=120, n_val=8, seed=0)
    b = write_synthetic_dataset(tmp / "b", tiny, n_train=9, n_val=8, seed=1)
    data = ["--data", 0.6, a, 0.4, b]
    pipeline = [*data, *FLAGS, "--pp", 2]  # cpu.json is ZeRO-1: the pipeline engine takes it
    run_many({"straight": ([*data, *FLAGS, "--max-steps", 6, "--save-dir", tmp / "straight"], 2),
              "pipeline": ([*pipeline, "--max-steps", 3, "--save-dir", tmp / "pipeline"], 2),
              "first": ([*data, *FLAGS, "--max-steps", 3, "--save-dir", tmp / "resumed"], 2),
              "resumed": ([*data, *FLAGS, "--max-steps", 6, "--resume", "--save-dir", tmp / "resumed"], 2)}, tmp)
    return tmp


def test_a_resumed_blend_continues_the_uninterrupted_loss_curve(runs):
    straight, resumed = losses(runs / "straight"), losses(runs / "resumed")
    assert sorted(straight) == sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in straight:
        for key in ("loss", "tokens_a", "tokens_b"):
            assert resumed[step][key] == pytest.approx(straight[step][key], rel=1e-5), (step, key)
    for step in (3, 6):
        for key in ("val_loss", "val_loss_a", "val_loss_b"):
            assert resumed[step][key] == pytest.approx(straight[step][key], rel=1e-5), (step, key)


@pytest.mark.parametrize("run", ["straight", "pipeline"])
def test_each_sources_training_loss_is_its_share_of_the_step_loss(runs, run):
    """loss_a, loss_b are token means over each source's rows: weighted by tokens_a,
    tokens_b (the same rows' counted targets, every replica) they give back the step's
    loss, which the head sums per modality, not per row,
    under data parallelism (2 replicas) and a 2-stage pipeline alike."""
    records = losses(runs / run)
    assert sorted(records) == list(range(1, 7 if run == "straight" else 4))
    both = 0
    for step, r in records.items():
        present = [k for k in "ab" if r[f"tokens_{k}"] > 0]
        assert sorted(k[-1] for k in r if k in ("loss_a", "loss_b")) == present, (run, step)  # no rows: no loss
        mixed = sum(r[f"loss_{k}"] * r[f"tokens_{k}"] for k in present) / sum(r[f"tokens_{k}"] for k in present)
        assert mixed == pytest.approx(r["loss"], rel=1e-6), (run, step)
        if len(present) == 2:
            both += 1
            assert r["loss_a"] != r["loss_b"], (run, step)
    assert both >= 2


def test_metrics_report_each_sources_tokens_and_validation_loss(runs):
    records = losses(runs / "straight")
    total_a = sum(r["tokens_a"] for r in records.values())
    total_b = sum(r["tokens_b"] for r in records.values())
    assert total_a > 0 and total_b > 0 and total_a > total_b  # 0.6 vs 0.4 of the rows
    r = records[6]
    assert r["val_loss"] == pytest.approx(0.6 * r["val_loss_a"] + 0.4 * r["val_loss_b"], rel=1e-9)
    saved = json.loads((runs / "straight" / "step6" / "megamm.json").read_text())
    assert saved["data"].startswith("0.6 ") and saved["data"].endswith("/b")


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("blend_cli")
    tiny = get_preset("tiny").vocab
    a = write_synthetic_dataset(tmp / "a", tiny, n_train=8, n_val=2, seed=0)
    other = write_synthetic_dataset(tmp / "other", OTHER_VOCAB, n_train=8, n_val=2, seed=1)
    base = ["--ds_config", "cpu.json", "--max-steps", "1"]
    cases = {
        "odd": ([*base, "--data", "0.7", str(a), "0.3"], {}),
        "weight": ([*base, "--data", "0.7", str(a), "-1", str(a)], {}),
        "not_a_number": ([*base, "--data", str(a), str(a)], {}),
        "missing": ([*base, "--data", "0.7", str(a), "0.3", str(tmp / "nowhere")], {}),
        "vocab": ([*base, "--data", "0.7", str(a), "0.3", str(other)], {}),
        "vocab_dry": (["--data", "0.7", str(a), "0.3", str(other), "--dry-run"], {}),
    }
    (tmp / "cases.json").write_text(json.dumps(cases))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "tests/train/cli_runs.py", str(tmp / "cases.json"), str(tmp / "out.json")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.rmtree(tmp / "a" / ".cache", ignore_errors=True)
    return json.loads((tmp / "out.json").read_text())


@pytest.mark.parametrize("case, fragments", [
    ("odd", ["--data takes one directory or WEIGHT DIR pairs", "the last weight has no directory"]),
    ("weight", ["--data weight -1", "must be a positive number"]),
    ("not_a_number", ["--data weight", "is not a number"]),
    ("missing", ["--data directory not found", "nowhere"]),
    ("vocab", ["cannot blend", "other", "different vocabularies", "text_size=512 vs other 300"]),
    ("vocab_dry", ["cannot blend", "text_size=512 vs other 300"]),
])
def test_bad_blends_are_refused_in_one_line(cli, case, fragments):
    r = cli[case]
    assert r["code"] == 2, (r["code"], r["stderr"][-2000:])
    assert "Traceback" not in r["stderr"], r["stderr"][-2000:]
    last = r["stderr"].strip().splitlines()[-1]
    for f in fragments:
        assert f in last, last
