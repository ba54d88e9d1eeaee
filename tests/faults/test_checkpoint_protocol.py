"""The save / verify / fall-back protocol in one process, with a stand-in engine."""
import errno
import os

import pytest

from megamm.checkpoint import manifest, verified_checkpoint_dir
from megamm.train import checkpoint


class CheckpointEngine:
    def __init__(self, fail_on=None):
        self.fail_on = fail_on

    def save(self, state_dict, path):
        if self.fail_on and self.fail_on in str(path):
            raise OSError(errno.EFBIG, "File too large", str(path))
        with open(path, "w") as f:
            f.write(repr(state_dict))


class FakeEngine:
    """Writes two DeepSpeed-like files through its checkpoint engine, then reaches a
    'barrier' that every rank must reach."""

    def __init__(self, fail_on=None):
        self.checkpoint_engine = CheckpointEngine(fail_on)
        self.reached_barrier = False

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        d = os.path.join(save_dir, tag)
        self.checkpoint_engine.save({"module": client_state}, path=os.path.join(d, "mp_rank_00_model_states.pt"))
        self.checkpoint_engine.save({"optim": 1}, os.path.join(d, "zero_pp_rank_0_optim_states.pt"))
        self.reached_barrier = True


def save(tmp_path, step, **kw):
    return checkpoint.save(FakeEngine(**kw), tmp_path, step, {"step": step}, {"model": {}}, rank=0)


def test_a_failed_write_is_agreed_on_after_the_barrier_and_keeps_latest(tmp_path):
    save(tmp_path, 1)
    engine = FakeEngine(fail_on="optim_states")
    with pytest.raises(checkpoint.CheckpointSaveError) as e:
        checkpoint.save(engine, tmp_path, 2, {"step": 2}, {"model": {}}, rank=0)
    assert engine.reached_barrier  # the write error did not cut DeepSpeed's save short
    assert str(e.value).startswith(f"could not save checkpoint step2 to {tmp_path / '.partial-step2'}: "
                                   f"{tmp_path / '.partial-step2' / 'zero_pp_rank_0_optim_states.pt'}: File too large")
    assert str(e.value).endswith("(step1 is still the latest checkpoint)")
    assert (tmp_path / "latest").read_text() == "step1" and not (tmp_path / ".partial-step2").exists()
    assert "save" not in vars(engine.checkpoint_engine)  # the engine's own save is back
    assert checkpoint.pick_intact(tmp_path, rank=0) == ("step1", [])


def test_the_manifest_lists_every_file_and_finds_damage(tmp_path):
    ckpt = save(tmp_path, 1)
    assert set(manifest.read(ckpt)) == {"mp_rank_00_model_states.pt", "zero_pp_rank_0_optim_states.pt",
                                        "megamm.json", "rng_rank0.pt"}
    assert manifest.verify(ckpt) is None
    f = ckpt / "zero_pp_rank_0_optim_states.pt"
    good = f.read_bytes()
    f.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    assert manifest.verify(ckpt) == "zero_pp_rank_0_optim_states.pt fails its checksum"
    f.write_bytes(good[:-3])
    assert manifest.verify(ckpt) == (f"zero_pp_rank_0_optim_states.pt has {len(good) - 3} bytes, "
                                     f"manifest.json says {len(good)}")
    f.write_bytes(good)
    (ckpt / "extra.pt").write_bytes(b"x")
    assert manifest.verify(ckpt) == "extra.pt is not in manifest.json"
    (ckpt / "extra.pt").unlink()
    (ckpt / "rng_rank0.pt").unlink()
    assert manifest.verify(ckpt) == "rng_rank0.pt is missing"
    (ckpt / "manifest.json").write_text("{")
    assert manifest.verify(ckpt) == "manifest.json is unreadable"


def test_fallback_order_and_keep_last(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step)
    size = manifest.read(tmp_path / "step4")["megamm.json"]["size"]
    (tmp_path / "step4" / "megamm.json").write_text("{}")
    (tmp_path / "step3" / "manifest.json").unlink()
    tag, skipped = checkpoint.pick_intact(tmp_path, rank=0)
    assert tag == "step2"
    assert skipped == [f"step4 (megamm.json has 2 bytes, manifest.json says {size})", "step3 (no manifest.json)"]
    (tmp_path / "latest").write_text("step9")  # names a missing directory: every step<N> is a candidate
    assert checkpoint.pick_intact(tmp_path, rank=0)[1][0] == "step9 (directory missing)"
    with pytest.raises(checkpoint.CheckpointError, match="damaged checkpoint .*step4: megamm.json has 2 bytes"):
        verified_checkpoint_dir(tmp_path / "step4")

    keep = tmp_path / "keep"
    for step in (1, 2, 3):
        checkpoint.save(FakeEngine(), keep, step, {}, {"model": {}}, rank=0, keep_last=2)
    assert [p.name for _, p in checkpoint.step_dirs(keep)] == ["step2", "step3"]
