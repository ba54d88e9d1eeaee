"""Checkpoints under faults, on real 2-rank runs: kill -9 at random moments (inside
saves too) and damaged checkpoints resume to the uninterrupted curve; a save that hits
a file-size limit stops the run cleanly and keeps the previous checkpoint."""
import random
import shutil
import time

import pytest
from fault_runs import STEPS, Run, curve, error_lines, latest_step

from megamm.train import checkpoint


def flip_bit(path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x10
    path.write_bytes(bytes(data))


def test_kill_9_at_random_moments_then_damage_resumes_to_the_same_curve(reference, tiny_data, tmp_path):
    seed = time.time_ns() % 10**6
    rng = random.Random(seed)
    save = tmp_path / "run"
    args = ["--data", tiny_data, "--max-steps", STEPS, "--keep-last", 3, "--save-dir", save]

    def inside_a_save():
        return any(save.glob(".partial-step*")) and latest_step(save) >= 1

    def after(min_step):
        def ready():
            if latest_step(save) < min_step:
                return False
            # a random moment inside a step or a save, cut short once a second checkpoint
            # lands, so a fast machine cannot finish the run (or leave kill 3 no room) first
            deadline = time.monotonic() + rng.uniform(0.0, 0.8)
            while time.monotonic() < deadline and latest_step(save) <= min_step:
                time.sleep(0.005)
            return True
        return ready

    Run(args, tmp_path / "kill1.txt").kill_when(inside_a_save)
    for n, at_least in ((2, 1), (3, 5)):  # kill 3 once 3 checkpoints exist
        target = max(at_least, latest_step(save) + 1)
        Run([*args, "--resume"], tmp_path / f"kill{n}.txt").kill_when(after(target))
        assert latest_step(save) < STEPS, f"seed {seed}: the run finished before kill {n}"
    kept = [p for s, p in checkpoint.step_dirs(save) if s <= latest_step(save)]
    assert len(kept) >= 3, (seed, kept)
    newest, second, third = kept[-1], kept[-2], kept[-3]
    flip_bit(newest / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")
    states = second / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:-100])

    rc, out = Run([*args, "--resume"], tmp_path / "final.txt").wait()
    assert rc == 0, f"seed {seed}: {out[-5000:]}"
    warnings = [line for line in out.splitlines() if line.startswith("warning: skipped damaged")]
    assert len(warnings) == 1, (seed, out[-3000:])
    assert f"{newest.name} (bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt fails its checksum)" in warnings[0]
    assert f"{second.name} (mp_rank_00_model_states.pt has" in warnings[0]
    assert warnings[0].endswith(f"resuming from {third}")
    straight, resumed = curve(reference), curve(save)
    assert sorted(resumed) == list(range(1, STEPS + 1)), seed
    for step in straight:
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-5), (seed, step)
        assert resumed[step]["lr"] == pytest.approx(straight[step]["lr"], rel=1e-9), (seed, step)
    assert [s for s, _ in checkpoint.step_dirs(save)] == [STEPS - 2, STEPS - 1, STEPS]  # --keep-last 3
    assert not list(save.glob(".partial-*")) and not list(save.glob(".old-*"))


@pytest.fixture(scope="module")
def full_disk(reference, tiny_data, tmp_path_factory):
    """The reference run resumed for one more step with files limited to 1 MiB (each
    rank's optimizer file is ~8 MB): its save fails."""
    save = tmp_path_factory.mktemp("full_disk") / "run"
    shutil.copytree(reference, save)
    rc, out = Run(["--data", tiny_data, "--max-steps", STEPS + 1, "--save-dir", save, "--resume"],
                  save.parent / "log.txt", file_limit=1 << 20).wait()
    return save, rc, out


def test_a_save_past_the_file_size_limit_stops_with_one_line_and_keeps_latest(full_disk):
    save, rc, out = full_disk
    assert rc == 3, out[-5000:]
    assert "Traceback" not in out, out[-5000:]
    errors = error_lines(out)
    assert len(errors) == 1, out[-3000:]
    assert f"could not save checkpoint step{STEPS + 1} to {save / f'.partial-step{STEPS + 1}'}" in errors[0]
    assert f"step{STEPS} is still the latest checkpoint" in errors[0]
    assert latest_step(save) == STEPS
    assert not (save / f"step{STEPS + 1}").exists() and not list(save.glob(".partial-*"))
    assert checkpoint.pick_intact(save, rank=0) == (f"step{STEPS}", [])


def test_bad_steps_are_skipped_counted_and_stop_the_run(full_disk, tiny_data):
    """Resumed after the failed save (so the kept checkpoint is resumable): NaN gradients
    injected at steps +2 and +4..+6, --max-bad-steps 3."""
    save, _, _ = full_disk
    s = STEPS
    rc, out = Run(["--data", tiny_data, "--max-steps", s + 8, "--save-dir", save, "--resume", "--max-bad-steps", 3],
                  save.parent / "nan.txt", env={"MEGAMM_FAULT_NAN_STEPS": f"{s + 2},{s + 4}-{s + 6}"}).wait()
    assert rc == 3, out[-5000:]
    assert "Traceback" not in out, out[-5000:]
    assert f"fault injection: NaN gradients at step(s) {s + 2},{s + 4},{s + 5},{s + 6}" in out
    errors = error_lines(out)
    assert len(errors) == 1, out[-3000:]
    assert f"stopping: 3 consecutive steps ({s + 4}-{s + 6})" in errors[0] and "--max-bad-steps 3" in errors[0]
    log = curve(save)
    assert max(log) == s + 6
    skipped = {step: log[step]["skipped_steps"] for step in range(s + 1, s + 7)}
    assert skipped == {s + 1: 0, s + 2: 1, s + 3: 1, s + 4: 2, s + 5: 3, s + 6: 4}
    for step in (s + 2, s + 4, s + 5, s + 6):
        assert log[step]["grad_norm"] == float("inf") and log[step]["loss"] < 10  # forward was fine
    assert log[s + 3]["grad_norm"] < 100
    assert latest_step(save) == s + 3  # the last good step; no checkpoint after a skipped one
    assert {p.name for _, p in checkpoint.step_dirs(save)} >= {f"step{s + 1}", f"step{s + 3}"}
    assert not any((save / f"step{s + k}").exists() for k in (2, 4, 5, 6))
