"""Session fixtures of the judges' tests: the quick default tokenizers in the session's
cache (tests/conftest.py's quick_cache, where tests/tokenizers builds them too), the
judges trained for them there, and the held-out examples."""
import pytest

from megamm.data.default import DefaultTokenizerRecipe, load_default
from megamm.data.digits import make_split
from megamm.eval.judges import load_judges
from megamm.tokenizers import Tokenizers


@pytest.fixture(scope="session")
def quick_tokenizers(quick_cache) -> Tokenizers:
    return load_default(quick_cache, DefaultTokenizerRecipe.quick(), progress=False)


@pytest.fixture(scope="session")
def judges(quick_tokenizers, quick_cache):
    """(ImageJudge, AudioJudge) of the default JudgeRecipe for the quick tokenizers."""
    return load_judges(quick_tokenizers, cache_dir=quick_cache, progress=False)


@pytest.fixture(scope="session")
def val():
    """The 180 held-out digits, one colouring each, with spoken captions."""
    return make_split("val", colourings=1, seed=0)
