"""`--compile` (megamm.train.compile): a compiled run trains the eager run's loss curve.

One launch runs tiny eagerly and compiled (inductor, fp32) under the default
zero3_offload.json, so the compiled blocks compose with ZeRO-3 (leaf blocks), CPU offload
and activation checkpointing. Inductor writes into a cache directory of the test's own:
no earlier run's compiled code is reused, and the compiled run can be seen to have compiled.
(Tensor and pipeline parallelism under --compile were checked the same way by hand; a
launch per world size costs minutes of CPU: see megamm/train/compile.py.)
"""
import pytest
from conftest import losses, run_many

from megamm.config import ConfigError
from megamm.train.args import parse

BASE = ["--ds_config", "zero3_offload.json", "--precision", "fp32", "--seq-len", 64, "--micro-batch", 2,
        "--grad-accum", 1, "--warmup", 1, "--lr", 3e-3, "--seed", 7, "--max-steps", 3]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    root = tmp_path_factory.mktemp("compile")
    cache = root / "inductor-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
        run_many({name: (["--data", tiny_data, *BASE, *extra, "--save-dir", root / name], 1)
                  for name, extra in (("eager", []), ("compiled", ["--compile"]))}, root)
    return root, cache


def test_compiled_run_trains_the_eager_loss_curve(runs):
    root, cache = runs
    eager, compiled = losses(root / "eager"), losses(root / "compiled")
    assert sorted(compiled) == sorted(eager) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("loss", "loss_text", "loss_image", "loss_audio"):
            assert compiled[step][key] == pytest.approx(eager[step][key], rel=1e-5), (step, key)
        # the gradient norm sums squares in another order: fp32 agrees to ~1e-5 here
        assert compiled[step]["grad_norm"] == pytest.approx(eager[step]["grad_norm"], rel=1e-4), step
    assert sorted(cache.rglob("*.py")), "inductor generated no code: the compiled run ran eagerly"


def test_compile_refuses_the_triton_kernels():
    with pytest.raises(ConfigError, match=r"--compile cannot trace .* \(--kernels triton\)"):
        parse(["--compile", "--kernels", "triton"])
