"""Session fixtures: the quick default tokenizers (tests/conftest.py holds the quick
cache and data set) and the held-out examples."""
from pathlib import Path

import pytest

from megamm.data.default import DefaultDatasetRecipe
from megamm.data.digits import make_split
from megamm.data.default import ensure_default_tokenizers
from megamm.tokenizers import Tokenizers


@pytest.fixture(scope="session")
def quick_tokenizers_dir(quick_cache) -> Path:
    return ensure_default_tokenizers(quick_cache, DefaultDatasetRecipe.quick().tokenizers, progress=False)


@pytest.fixture(scope="session")
def quick_tokenizers(quick_tokenizers_dir) -> Tokenizers:
    return Tokenizers.load(quick_tokenizers_dir)


@pytest.fixture(scope="session")
def heldout():
    """The 180 held-out digits, one colouring each, with spoken captions."""
    return make_split("val", colourings=1, seed=0)
