"""Session fixtures: the quick default build (tokenizers + shards) in a temporary
cache, so no test touches ~/.cache/megamm, and the held-out examples."""
from pathlib import Path

import pytest

from megamm.data.default import DefaultDatasetRecipe, ensure_default_dataset
from megamm.data.digits import make_split
from megamm.data.default import ensure_default_tokenizers
from megamm.tokenizers import Tokenizers


@pytest.fixture(scope="session")
def quick_cache(tmp_path_factory) -> Path:
    # the same path as tests/data/test_prepare_data.py uses: built once per session
    return tmp_path_factory.getbasetemp() / "megamm-cache"


@pytest.fixture(scope="session")
def quick_data_dir(quick_cache) -> Path:
    return ensure_default_dataset(quick_cache, DefaultDatasetRecipe.quick(), progress=False)


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
