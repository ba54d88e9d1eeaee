"""Shared test set-up.

TRITON_INTERPRET=1 is set here and triton imported at once, so the kernel tests
(tests/kernels) run Triton's CPU interpreter. megamm.kernels reads the variable at call
time, so every other test removes it and the model runs its torch path at full speed.
"""
import os
import sys
from pathlib import Path

import pytest

from megamm.config import get_preset
from megamm.data.synthetic import write_synthetic_dataset

os.environ["TRITON_INTERPRET"] = "1"
import triton  # noqa: E402,F401  imported now, in interpreter mode, whatever test runs first

ROOT = Path(__file__).resolve().parents[1]
KERNEL_TESTS = ROOT / "tests" / "kernels"


@pytest.fixture(autouse=True)
def _triton_interpreter_only_for_kernel_tests(request, monkeypatch):
    if KERNEL_TESTS not in Path(str(request.node.fspath)).parents:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Synthetic shards for the tiny preset (400 train / 40 val documents), shared by the
    launch tests of tests/train and tests/faults."""
    d = tmp_path_factory.mktemp("tiny_synthetic")
    write_synthetic_dataset(d, get_preset("tiny").vocab, n_train=400, n_val=40, seed=0)
    return d


@pytest.fixture(scope="session")
def quick_cache(tmp_path_factory) -> Path:
    """A megamm cache for the session (the quick default build, the judges), so no test
    touches ~/.cache/megamm; the same path tests/data/test_prepare_data.py uses."""
    return tmp_path_factory.getbasetemp() / "megamm-cache"


@pytest.fixture(scope="session")
def quick_data_dir(quick_cache) -> Path:
    """The embedded dataset built with the quick recipe (small tokenizers, one document per digit)."""
    from megamm.demo.recipe import DefaultDatasetRecipe, ensure_default_dataset

    return ensure_default_dataset(quick_cache, DefaultDatasetRecipe.quick(), progress=False)


@pytest.fixture(scope="session")
def quick_tokenizers_dir(quick_cache) -> Path:
    """Directory of the quick default tokenizers in the session's cache."""
    from megamm.demo.recipe import DefaultTokenizerRecipe, ensure_default_tokenizers

    return ensure_default_tokenizers(quick_cache, DefaultTokenizerRecipe.quick(), progress=False)


@pytest.fixture(scope="session")
def quick_tokenizers(quick_tokenizers_dir):
    from megamm.tokenizers import Tokenizers

    return Tokenizers.load(quick_tokenizers_dir)


@pytest.fixture(scope="session")
def heldout():
    """The 180 held-out digits, one colouring each, with spoken captions."""
    from megamm.demo.digits import make_split

    return make_split("val", colourings=1, seed=0)


# ---- DeepSpeed's NVMe op, compiled in the background (tests/ds_ops.py) ----------------
_ds_ops_build = []


def pytest_collection_finish(session):
    """Start the build when the selected tests (after -k/deselection) include an NVMe one
    that will run (not under --collect-only)."""
    if session.config.option.collectonly:
        return
    if any("nvme" in item.nodeid for item in session.items) and not _ds_ops_build:
        from ds_ops import start_background_build

        _ds_ops_build.append(start_background_build())


def pytest_sessionfinish(session, exitstatus):
    for proc in _ds_ops_build:  # never leave it orphaned mid-build, never kill it (see ds_ops.py)
        proc.wait()

