"""tools/prepare_data.py split into slices (--num-shards / --shard-index) and resumed:
three slices, one SIGKILLed in the middle of a shard and run again, merge into shards
byte-identical to a one-process run; the killed slice keeps the shard it had finished
(the very file) and redoes the partial one; --merge before every slice is done, other
options on a resume, and a bad --shard-index each fail in one line.

The kill is a real SIGKILL of the tool's process, at a chosen point: the tool runs
under a wrapper that patches megamm.data.slices.UnitWriter.add to kill its own process
after the third document of the chosen shard (its partial files then exist).
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megamm.data import slices
from megamm.demo import digits

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "prepare_data.py"
SHARD = 4  # records per shard: 22 records -> 6 shards; slice 1 of 3 owns shards 1 and 4
KILL_IN = 4
spec = importlib.util.spec_from_file_location("prepare_data_slices_tool", TOOL)
tool = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = tool  # dataclasses look the module up
spec.loader.exec_module(tool)
KILLING_RUN = (
    "import os, runpy, signal, sys\n"
    "from megamm.data import slices\n"
    "add = slices.UnitWriter.add\n"
    "def killing_add(self, split, ids, template=None):\n"
    "    add(self, split, ids, template)\n"
    f"    if self.k == {KILL_IN} and sum(self.counts.documents.values()) == 3:\n"
    "        for w in self.writers.values(): w._bin.flush()\n"
    "        os.kill(os.getpid(), signal.SIGKILL)\n"
    "slices.UnitWriter.add = killing_add\n"
    "sys.argv = ['tools/prepare_data.py', *sys.argv[1:]]\n"
    "runpy.run_path('tools/prepare_data.py', run_name='__main__')\n")


def _tool(*args, wrapper=None, env=None):
    cmd = [sys.executable, *(["-c", wrapper] if wrapper else [str(TOOL)]), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """22 records: digits with image + audio, a text-only line (no default template fits it) and a line whose image is missing: both skipped."""
    m = digits.export_manifest(tmp_path_factory.mktemp("sliced-input"), split="val", limit=20)
    lines = m.read_text().splitlines()
    lines.insert(5, json.dumps({"text": "a caption on its own"}))
    lines.insert(13, json.dumps({"text": "a missing image", "image": "images/nope.npy"}))
    m.write_text("\n".join(lines) + "\n")
    return m


def test_three_slices_one_killed_and_resumed_equal_one_process(manifest, quick_tokenizers_dir, tmp_path):
    common = ["--tokenizers", quick_tokenizers_dir, "--shard-size", SHARD, "--val-fraction", 0.3, "--seed", 3,
              "--quiet"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    one = _tool(manifest, "--out", ref, *common)
    assert one.returncode == 0, one.stderr
    assert "skipped 2 line(s)" in one.stdout and "line 14: missing image file" in one.stdout

    work = out / slices.WORK
    killed = _tool(manifest, "--out", out, *common, "--num-shards", 3, "--shard-index", 1, wrapper=KILLING_RUN)
    assert killed.returncode == -9, killed.stderr
    assert (work / "unit-00001.json").is_file() and not (work / f"unit-{KILL_IN:05d}.json").exists()
    partial = [work / f"{split}-{KILL_IN:05d}.bin.tmp" for split in ("train", "val")]
    assert sum(p.stat().st_size for p in partial) > 0  # the shard it was writing
    finished = (work / "train-00001.bin").stat().st_ino

    for index, waiting in ((0, "1, 2"), (2, "1")):
        run = _tool(manifest, "--out", out, *common, "--num-shards", 3, "--shard-index", index)
        assert run.returncode == 0, run.stderr
        assert run.stdout == (f"slice {index} of 3: wrote 2 shard(s); slice(s) {waiting} of 3 not finished: the last "
                              f"one to finish merges (or: prepare_data.py --merge OUT)\n"), run.stdout
    assert not (out / "meta.json").exists()

    early = _tool("--merge", out)
    assert early.returncode == 2 and early.stderr.count("\n") == 1, early.stderr
    assert "cannot merge yet: slice(s) 1 of 3 not finished (units 4 not done)" in early.stderr, early.stderr

    other = _tool(manifest, "--out", out, *common[:-3], "--seed", 4, "--quiet", "--num-shards", 3, "--shard-index", 1)
    assert other.returncode == 2 and other.stderr.count("\n") == 1, other.stderr
    assert "unfinished run with other 'seed' (3, here 4)" in other.stderr, other.stderr

    resumed = _tool(manifest, "--out", out, *common, "--num-shards", 3, "--shard-index", 1)
    assert resumed.returncode == 0, resumed.stderr
    assert "skipped 2 line(s)" in resumed.stdout  # the merged report covers every slice
    assert not work.exists()
    assert (out / "train-00001.bin").stat().st_ino == finished  # kept, not rewritten

    a, b = _files(ref), _files(out)
    assert sorted(a) == sorted(b)
    assert sum(name.startswith("train-") for name in a) >= 10  # 6 shards, some without val documents
    for name in a:
        assert a[name] == b[name], name


def test_a_shard_index_not_below_the_count_is_one_line(manifest, quick_tokenizers_dir, tmp_path, capsys):
    assert tool.main([str(manifest), "--out", str(tmp_path / "o"), "--tokenizers", str(quick_tokenizers_dir),
                      "--num-shards", "3", "--shard-index", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--shard-index 3 is not below --num-shards 3" in err, err
    assert not (tmp_path / "o" / slices.WORK).exists()


def test_slurm_array_variables_are_the_defaults():
    env = {"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5"}
    assert slices.slice_of(None, None, env) == (4, 2)
    assert slices.slice_of(2, 1, env) == (2, 1)  # the flags win
    assert slices.slice_of(None, None, {}) == (1, 0)
    with pytest.raises(slices.SliceError, match="--shard-index 4 is not below --num-shards 4"):
        slices.slice_of(None, None, {**env, "SLURM_ARRAY_TASK_ID": "9"})


def test_merge_without_a_work_area_is_one_line(tmp_path, capsys):
    assert tool.main(["--merge", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing to merge" in err, err
