"""Shards verify their checksums when first opened, and block by block when read: a
flipped bit stops training with the shard's path, also one flipped after the shard's
verification stamp was written; tools/prepare_data.py --verify checks a directory."""
import shutil
import subprocess
import sys

import numpy as np
import pytest
from fault_runs import ROOT, clean_env

from megamm.config import VocabConfig
from megamm.data import shards
from megamm.data.loader import PackedLoader, open_split
from megamm.data.plan import DataCache
from megamm.data.shards import ShardError, ShardReader, ShardWriter
from megamm.vocab import Vocab


def flip(path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def damaged(tiny_data, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(tiny_data, d)
    flip(d / "train_00000.bin", at=(d / "train_00000.bin").stat().st_size // 2)
    return d


def test_a_bit_flipped_shard_stops_training_naming_it(damaged):
    proc = subprocess.run([sys.executable, "launch/train.py", "--ds_config", "cpu.json", "--data", str(damaged),
                           "--seq-len", "128", "--max-steps", "1", "--no-progress"],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {damaged / 'train_00000.bin'}: checksum mismatch in bytes [0, "), last


def test_prepare_data_verify_names_the_damaged_shard(damaged, tiny_data):
    tool = [sys.executable, "tools/prepare_data.py", "--verify"]
    ok = subprocess.run([*tool, str(tiny_data)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "2 of 2 shard(s)" in ok.stdout, ok.stdout + ok.stderr
    bad = subprocess.run([*tool, str(damaged)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "1 of 2 shard(s)" in bad.stdout, bad.stdout + bad.stderr
    assert bad.stderr.strip().splitlines() == [
        f"damaged: {damaged / 'train_00000.bin'}: checksum mismatch in bytes "
        f"[0, {(damaged / 'train_00000.bin').stat().st_size}) (1 bad block(s)); the shard is corrupt, prepare it again"]


def test_checksums_are_per_block_and_cover_the_index(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "BLOCK_BYTES", 64)  # 16 tokens per checksum
    with ShardWriter(tmp_path / "a", vocab_size=1000) as w:
        for i in range(10):
            w.add_document(np.arange(i, i + 7))
    reader = ShardReader(tmp_path / "a")
    assert len(reader.checksums) == 5 and reader.n_tokens == 70  # 280 bytes in blocks of 64
    flip(tmp_path / "a.bin", at=150)
    with pytest.raises(ShardError, match=r"a\.bin: checksum mismatch in bytes \[128, 192\) \(1 bad block"):
        ShardReader(tmp_path / "a")
    ShardReader(tmp_path / "a", verify=False)  # sizes and the index still check out
    flip(tmp_path / "a.idx", at=40)
    with pytest.raises(ShardError, match=r"a\.idx: checksum mismatch"):
        ShardReader(tmp_path / "a", verify=False)


def test_format_1_indexes_are_refused_with_one_line(tmp_path):
    with ShardWriter(tmp_path / "a", vocab_size=10) as w:
        w.add_document([1, 2, 3])
    offsets = np.array([1, 10, 0, 3], dtype="<i8").tobytes()  # D, vocab size, offsets
    (tmp_path / "a.idx").write_bytes(b"MEGAMMI1" + offsets)
    with pytest.raises(ShardError, match=r"a\.idx: shard format 1 has no checksums; prepare the data again"):
        ShardReader(tmp_path / "a")


def test_a_bit_flipped_after_the_verification_stamp_is_named_on_read(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "BLOCK_BYTES", 64)  # 16 tokens per checksum
    with ShardWriter(tmp_path / "train_0", vocab_size=1000) as w:
        for i in range(10):
            w.add_document(np.arange(i, i + 7))  # document i: bytes [28 i, 28 i + 28)
    cache = DataCache.for_data(tmp_path)
    (reader,) = cache.open_shards([tmp_path / "train_0"])  # read in full, stamped
    assert reader.max_token == 15 and len(list((tmp_path / ".cache" / "verified").glob("*.json"))) == 1
    flip(tmp_path / "train_0.bin", at=150)
    (reader,) = cache.open_shards([tmp_path / "train_0"])  # the stamp holds: the .bin is not read now
    assert reader[0].tolist() == list(range(7))  # block 0 is intact
    named = r"train_0\.bin: checksum mismatch in bytes \[128, 192\) \(block 2 of 5, found on read\)"
    with pytest.raises(ShardError, match=named):
        reader[5]
    vocab = Vocab(VocabConfig(text_size=40, n_special=10, image_codes=16, image_tokens=4, audio_codebooks=2,
                              audio_codebook_size=8, pad_multiple=8))
    loader = PackedLoader(open_split(tmp_path, "train", vocab), vocab, seq_len=15, micro_batch=5, shuffle=False)
    with pytest.raises(ShardError, match=named):  # before the batch holding it is returned
        loader.next_batch()


def test_an_index_bit_flipped_after_the_stamp_is_named_on_read(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "INDEX_BLOCK_BYTES", 64)  # the stamp's .idx blocks: 8 offsets each
    with ShardWriter(tmp_path / "train_0", vocab_size=1000) as w:
        for i in range(30):
            w.add_document(np.arange(i, i + 3))
    cache = DataCache.for_data(tmp_path)
    cache.open_shards([tmp_path / "train_0"])
    flip(tmp_path / "train_0.idx", at=150)  # offset 14, in block [128, 192); the trailing CRC still reads
    (reader,) = cache.open_shards([tmp_path / "train_0"])  # the stamp still holds: the offsets are not read now
    assert reader[0].tolist() == [0, 1, 2]
    with pytest.raises(ShardError, match=r"train_0\.idx: checksum mismatch in bytes \[128, 192\) \(block 2 of"):
        reader[13]
    with pytest.raises(ShardError, match=r"train_0\.idx: checksum mismatch"):
        ShardReader(tmp_path / "train_0", verify=False)  # without the stamp: the whole .idx, at open
