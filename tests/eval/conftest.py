"""Session fixture of the judges' tests: the judges trained for the quick default
tokenizers (tests/conftest.py's quick_tokenizers) in the session's cache."""
import pytest

from megamm.demo.judges import load_judges


@pytest.fixture(scope="session")
def judges(quick_tokenizers, quick_cache):
    """(ImageJudge, AudioJudge) of the default JudgeRecipe for the quick tokenizers."""
    return load_judges(quick_tokenizers, cache_dir=quick_cache, progress=False)
