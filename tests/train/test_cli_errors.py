"""Bad input to launch/train.py: one clear line naming the culprit, non-zero exit, no traceback."""
import shutil

import pytest
from conftest import run_train

from megamm.config import get_preset
from megamm.data.shards import ShardWriter
from megamm.vocab import Vocab


def assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    for f in fragments:
        assert f in last, last


def test_unknown_preset():
    assert_one_line_error(run_train(["--model", "huge", "--dry-run"]), "unknown model preset 'huge'")


def test_missing_ds_config():
    assert_one_line_error(run_train(["--ds_config", "nope.json", "--dry-run"]),
                          "DeepSpeed config not found: nope.json")


def test_malformed_ds_config(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 3,}')
    assert_one_line_error(run_train(["--ds_config", bad, "--dry-run"]), str(bad), "malformed JSON")


def test_unknown_flag_is_refused():
    proc = run_train(["--max-stepz", "3"])
    assert proc.returncode == 2 and "unrecognized arguments: --max-stepz" in proc.stderr


def test_missing_data_dir(tmp_path):
    assert_one_line_error(run_train(["--ds_config", "cpu.json", "--data", tmp_path / "nowhere"]),
                          "data directory not found", "nowhere")


def test_shard_with_out_of_range_ids(tmp_path, tiny_data):
    v = Vocab(get_preset("tiny").vocab)
    with ShardWriter(tmp_path / "train_00000", vocab_size=1 << 20) as w:
        w.add_document([v.bos, v.bot, 3, v.eot, v.eos])
        w.add_document([v.bos, v.bot, 70000, v.eot, v.eos])
    assert_one_line_error(run_train(["--ds_config", "cpu.json", "--data", tmp_path]),
                          "train_00000.bin", "token id 70000 outside the model vocabulary")


def test_truncated_bin(tmp_path, tiny_data):
    for f in tiny_data.iterdir():
        shutil.copy(f, tmp_path / f.name)
    b = tmp_path / "train_00000.bin"
    b.write_bytes(b.read_bytes()[:-10])
    assert_one_line_error(run_train(["--ds_config", "cpu.json", "--data", tmp_path]),
                          "train_00000.bin: truncated")


def test_resume_without_a_checkpoint(tmp_path, tiny_data):
    assert_one_line_error(run_train(["--ds_config", "cpu.json", "--data", tiny_data, "--resume",
                                     "--save-dir", tmp_path / "ck"]),
                          "no checkpoint to resume from")


@pytest.mark.parametrize("flag, value", [("--max-steps", "0"), ("--micro-batch", "-1"), ("--lr", "0")])
def test_out_of_range_numbers(flag, value):
    assert_one_line_error(run_train([flag, value, "--dry-run"]), flag, "out of range")


def test_dry_run_prints_the_8b_parameter_count_without_allocating():
    proc = run_train(["--model", "8b", "--dry-run"])
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    n = int(first.removeprefix("parameters: ").replace(",", ""))
    assert 8.0e9 <= n <= 8.7e9 and first == f"parameters: {n:,}"
    assert "zero_stage=3" in proc.stdout and "offload=param->cpu, optimizer->cpu" in proc.stdout


@pytest.mark.parametrize("flags, fragments", [
    (["--tp", "2", "--pp", "2"], ["--pp 2 needs ZeRO stage 0 or 1", "zero1_3d.json"]),
    (["--model", "8b", "--tp", "3"], ["--tp 3 does not divide n_kv_heads=8"]),
    (["--ds_config", "zero1.json", "--sequence-parallel"], ["--sequence-parallel needs --tp > 1"]),
    (["--ds_config", "zero1.json", "--tp", "4", "--sequence-parallel", "--seq-len", "130"],
     ["--seq-len divisible by --tp 4"]),
    (["--ds_config", "zero1_3d.json", "--pp", "9"], ["--pp 9 is more stages than"]),
    (["--tp", "0"], ["--tp", "out of range"]),
])
def test_impossible_layouts_are_refused(flags, fragments):
    assert_one_line_error(run_train([*flags, "--dry-run"]), *fragments)


def test_world_size_that_tp_times_pp_does_not_divide(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "6")
    assert_one_line_error(run_train(["--ds_config", "zero1_3d.json", "--tp", "2", "--pp", "2", "--dry-run"]),
                          "world size 6 is not divisible by --tp x --pp = 2 x 2")


def test_dry_run_shows_the_3d_layout():
    proc = run_train(["--model", "8b", "--ds_config", "zero1_3d.json", "--tp", "2", "--pp", "2", "--dry-run"])
    assert proc.returncode == 0, proc.stderr
    assert "layout: tp=2 pp=2 dp=1 (world 4)  zero_stage=1" in proc.stdout
    assert "35 pipeline layers over 2 stages" in proc.stdout
