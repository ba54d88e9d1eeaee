"""megamm.demo.report.write_samples_from_model: the training run's samples from a model
in memory, with its train/eval modes left as they were."""
import dataclasses

import pytest

from megamm.config import ModelConfig
from megamm.demo.report import write_samples_from_model
from megamm.media import read_image
from megamm.model import build_model
from megamm.tokenizers import Tokenizers


def _model(tokenizers_dir, **vocab_changes):
    vocab = dataclasses.replace(Tokenizers.load(tokenizers_dir).vocab_config(), **vocab_changes)
    return build_model(ModelConfig(n_layers=1, d_model=64, n_heads=2, max_seq_len=512, vocab=vocab,
                                   kernels="torch", attention="sdpa"))


def test_samples_from_a_live_model_leave_its_modes_alone(quick_tokenizers_dir, tmp_path):
    model = _model(quick_tokenizers_dir)
    model.train()
    model.layers[0].eval()  # a mixed state, as a caller may leave it
    modes = [m.training for m in model.modules()]
    written = write_samples_from_model(model, quick_tokenizers_dir, tmp_path / "samples", 7)
    assert sorted(p.name for p in written) == ["step7.png", "step7.txt", "step7_audio_0.wav", "step7_audio_1.wav"]
    assert all(p.is_file() for p in written)
    assert read_image(tmp_path / "samples" / "step7.png").shape[1] > 8 * 28  # 8 images in a row
    lines = (tmp_path / "samples" / "step7.txt").read_text().splitlines()
    assert lines[0] == "step 7" and sum(line.startswith("  ") and " | " in line for line in lines) == 16
    assert [m.training for m in model.modules()] == modes


def test_tokenizers_of_another_vocabulary_are_refused(quick_tokenizers_dir, tmp_path):
    model = _model(quick_tokenizers_dir, text_size=500)
    model.train()
    with pytest.raises(ValueError, match="do not match the model's vocabulary"):
        write_samples_from_model(model, quick_tokenizers_dir, tmp_path, 1)
    assert model.training
