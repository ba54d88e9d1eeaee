"""The uninterrupted reference run the fault tests compare with."""
from pathlib import Path

import pytest
from fault_runs import STEPS, Run


@pytest.fixture(scope="session")
def reference(tmp_path_factory, tiny_data) -> Path:
    """The uninterrupted run: STEPS steps, a checkpoint after each, the 3 newest kept."""
    save = tmp_path_factory.mktemp("reference") / "run"
    rc, out = Run(["--data", tiny_data, "--max-steps", STEPS, "--keep-last", 3, "--save-dir", save],
                  save.parent / "log.txt").wait()
    assert rc == 0, out[-5000:]
    return save
