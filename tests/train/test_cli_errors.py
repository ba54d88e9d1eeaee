"""Bad input to launch/train.py: one clear line naming the culprit, non-zero exit, no traceback.

One launch, `python launch/train.py --model huge`, checks the whole process (the exit status
the shell sees); the other command lines run through the script's own `main(argv)` one after
another in a single process (tests/train/cli_runs.py), so the suite pays the imports once."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, run_train

from megamm.checkpoint import manifest
from megamm.config import VocabConfig, get_preset
from megamm.data.shards import ShardWriter
from megamm.data.synthetic import write_synthetic_dataset
from megamm.vocab import Vocab

OTHER_VOCAB = VocabConfig(text_size=300, n_special=12, image_codes=40, image_tokens=9, audio_codebooks=2,
                          audio_codebook_size=32)
OUT_OF_RANGE = [("--max-steps", "0"), ("--micro-batch", "-1"), ("--lr", "0")]
IMPOSSIBLE = [
    (["--tp", "2", "--pp", "2"], ["--pp 2 needs ZeRO stage 0 or 1", "zero1_3d.json"]),
    (["--model", "8b", "--tp", "3"], ["--tp 3 does not divide n_kv_heads=8"]),
    (["--ds_config", "zero1.json", "--sequence-parallel"], ["--sequence-parallel needs --tp > 1"]),
    (["--ds_config", "zero1.json", "--tp", "4", "--sequence-parallel", "--seq-len", "130"],
     ["--seq-len divisible by --tp 4"]),
    (["--ds_config", "zero1_3d.json", "--pp", "9"], ["--pp 9 is more stages than"]),
    (["--tp", "0"], ["--tp", "out of range"]),
]


@pytest.fixture(scope="module")
def cli(tmp_path_factory, tiny_data):
    """case name -> {"code", "stdout", "stderr"} of its command line."""
    tmp = tmp_path_factory.mktemp("cli")
    bad = tmp / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 3,}')
    v = Vocab(get_preset("tiny").vocab)
    (tmp / "out_of_range").mkdir()
    with ShardWriter(tmp / "out_of_range" / "train_00000", vocab_size=1 << 20) as w:
        w.add_document([v.bos, v.bot, 3, v.eot, v.eos])
        w.add_document([v.bos, v.bot, 70000, v.eot, v.eos])
    truncated = tmp / "truncated"
    shutil.copytree(tiny_data, truncated)
    b = truncated / "train_00000.bin"
    b.write_bytes(b.read_bytes()[:-10])
    # data prepared with other tokenizers: the vocabulary comes from it, the shape from --model
    other = tmp / "other_vocab"
    write_synthetic_dataset(other, OTHER_VOCAB, n_train=40, n_val=4, seed=1)
    (tmp / "model.json").write_text(json.dumps({"base": "tiny", "n_layers": 2, "d_model": 64}))
    (tmp / "model_bad.json").write_text('{"n_layers": 2,')
    (tmp / "model_typo.json").write_text('{"n_layayers": 2}')
    # an intact checkpoint (manifest and all) of a model on the tiny preset's vocabulary
    ck = tmp / "tiny_ck" / "step3"
    ck.mkdir(parents=True)
    (ck / "megamm.json").write_text(json.dumps({"model": get_preset("tiny").to_dict(), "preset": "tiny"}))
    manifest.write(ck, manifest.entries(ck, manifest.list_files(ck)))
    (tmp / "tiny_ck" / "latest").write_text("step3")
    no_env: dict[str, str] = {}
    cases = {
        "missing_ds_config": (["--ds_config", "nope.json", "--dry-run"], no_env),
        "malformed_ds_config": (["--ds_config", str(bad), "--dry-run"], no_env),
        "unknown_flag": (["--max-stepz", "3"], no_env),
        "missing_data": (["--ds_config", "cpu.json", "--data", str(tmp / "nowhere")], no_env),
        "out_of_range_ids": (["--ds_config", "cpu.json", "--data", str(tmp / "out_of_range")], no_env),
        "truncated_bin": (["--ds_config", "cpu.json", "--data", str(truncated)], no_env),
        "resume_without_checkpoint": (["--ds_config", "cpu.json", "--data", str(tiny_data), "--resume",
                                       "--save-dir", str(tmp / "ck")], no_env),
        "model_json": (["--model", str(tmp / "model.json"), "--data", str(other), "--dry-run"], no_env),
        "model_json_malformed": (["--model", str(tmp / "model_bad.json"), "--dry-run"], no_env),
        "model_json_typo": (["--model", str(tmp / "model_typo.json"), "--dry-run"], no_env),
        "resume_other_vocab": (["--ds_config", "cpu.json", "--data", str(other), "--resume",
                                "--save-dir", str(tmp / "tiny_ck")], no_env),
        "world_6": (["--ds_config", "zero1_3d.json", "--tp", "2", "--pp", "2", "--dry-run"], {"WORLD_SIZE": "6"}),
        "dry_run_8b": (["--model", "8b", "--dry-run"], no_env),
        "dry_run_3d": (["--model", "8b", "--ds_config", "zero1_3d.json", "--tp", "2", "--pp", "2", "--dry-run"],
                       no_env),
        **{f"range{flag}": ([flag, value, "--dry-run"], no_env) for flag, value in OUT_OF_RANGE},
        **{f"layout{i}": ([*flags, "--dry-run"], no_env) for i, (flags, _) in enumerate(IMPOSSIBLE)},
    }
    (tmp / "cases.json").write_text(json.dumps(cases))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "tests/train/cli_runs.py", str(tmp / "cases.json"), str(tmp / "out.json")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp / "out.json").read_text())


def assert_one_line_error(result, *fragments):
    assert result["code"] != 0, result["stdout"]
    assert "Traceback" not in result["stderr"], result["stderr"][-2000:]
    last = result["stderr"].strip().splitlines()[-1]
    for f in fragments:
        assert f in last, last


def test_unknown_preset_exits_non_zero_with_one_line():
    proc = run_train(["--model", "huge", "--dry-run"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == ("error: unknown model preset 'huge'; "
                                                    "choose one of: tiny, small, 1b, 8b, or give a JSON model config file")


def test_missing_ds_config(cli):
    assert_one_line_error(cli["missing_ds_config"], "DeepSpeed config not found: nope.json")


def test_malformed_ds_config(cli):
    assert_one_line_error(cli["malformed_ds_config"], "bad.json", "malformed JSON")


def test_unknown_flag_is_refused(cli):
    r = cli["unknown_flag"]
    assert r["code"] == 2 and "unrecognized arguments: --max-stepz" in r["stderr"]


def test_missing_data_dir(cli):
    assert_one_line_error(cli["missing_data"], "data directory not found", "nowhere")


def test_shard_with_out_of_range_ids(cli):
    assert_one_line_error(cli["out_of_range_ids"], "train_00000.bin", "token id 70000 outside the model vocabulary")


def test_truncated_bin(cli):
    assert_one_line_error(cli["truncated_bin"], "train_00000.bin: truncated")


def test_resume_without_a_checkpoint(cli):
    assert_one_line_error(cli["resume_without_checkpoint"], "no checkpoint to resume from")


@pytest.mark.parametrize("flag, value", OUT_OF_RANGE)
def test_out_of_range_numbers(cli, flag, value):
    assert_one_line_error(cli[f"range{flag}"], flag, "out of range")


def test_dry_run_prints_the_8b_parameter_count_without_allocating(cli):
    r = cli["dry_run_8b"]
    assert r["code"] == 0, r["stderr"]
    first = r["stdout"].splitlines()[0]
    n = int(first.removeprefix("parameters: ").replace(",", ""))
    assert 8.0e9 <= n <= 8.7e9 and first == f"parameters: {n:,}"
    assert "zero_stage=3" in r["stdout"] and "offload=param->cpu, optimizer->cpu" in r["stdout"]


@pytest.mark.parametrize("case", range(len(IMPOSSIBLE)))
def test_impossible_layouts_are_refused(cli, case):
    assert_one_line_error(cli[f"layout{case}"], *IMPOSSIBLE[case][1])


def test_world_size_that_tp_times_pp_does_not_divide(cli):
    assert_one_line_error(cli["world_6"], "world size 6 is not divisible by --tp x --pp = 2 x 2")


def test_dry_run_shows_the_3d_layout(cli):
    r = cli["dry_run_3d"]
    assert r["code"] == 0, r["stderr"]
    assert "layout: tp=2 pp=2 dp=1 (world 4)  zero_stage=1" in r["stdout"]
    assert "35 pipeline layers over 2 stages" in r["stdout"]


def test_the_vocabulary_comes_from_the_data_and_the_shape_from_a_json_model(cli):
    r = cli["model_json"]
    assert r["code"] == 0, r["stderr"]
    assert "layers=2 d_model=64 heads=4" in r["stdout"], r["stdout"]
    assert "(text 300, image 40x9/img, audio 2x32)" in r["stdout"], r["stdout"]
    assert f"vocab={VocabConfig(**OTHER_VOCAB.layout()).padded_size:,}" in r["stdout"]


def test_a_malformed_or_misspelt_json_model_is_refused_in_one_line(cli):
    assert_one_line_error(cli["model_json_malformed"], "model_bad.json", "malformed JSON")
    assert_one_line_error(cli["model_json_typo"], "model_typo.json", "unknown model config field(s): n_layayers")


def test_resuming_a_checkpoint_of_another_vocabulary_is_refused(cli):
    assert_one_line_error(cli["resume_other_vocab"], "cannot resume", "step3", "another vocabulary",
                          "text_size=512 vs data 300")
