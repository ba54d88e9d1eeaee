import numpy as np
import pytest
import torch

from megamm.config import VocabConfig
from megamm.vocab import Modality, State, Vocab

CFG = VocabConfig(text_size=50, n_special=12, image_codes=20, image_tokens=4, audio_codebooks=3,
                  audio_codebook_size=8, pad_multiple=16)


@pytest.fixture
def v():
    return Vocab(CFG)


def test_layout_and_padding(v):
    assert (v.special_start, v.image_start, v.audio_start, v.used_size) == (50, 62, 82, 106)
    assert v.size == 112 == CFG.padded_size
    mod = v.modality_table()
    assert mod[49] == Modality.TEXT and mod[50] == Modality.SPECIAL
    assert mod[62] == Modality.IMAGE and mod[82] == Modality.AUDIO and mod[110] == Modality.SPECIAL


def test_padded_size_is_fixed_with_the_model():
    from megamm.config import ConfigError

    default = VocabConfig(text_size=50, n_special=12, image_codes=20, image_tokens=4, audio_codebooks=3,
                          audio_codebook_size=8)
    assert default.padded_size == 1024 and Vocab(default).size == 1024
    assert VocabConfig(text_size=50, padded_size=4096).padded_size == 4096
    with pytest.raises(ConfigError, match="padded_size=100 is smaller"):
        VocabConfig(text_size=50, padded_size=100)


def test_audio_codes_round_trip_with_per_codebook_offsets(v):
    codes = np.array([[0, 1, 7], [3, 3, 3]])
    ids = v.audio_ids(codes)
    assert ids.tolist() == [82, 91, 105, 85, 93, 101]
    np.testing.assert_array_equal(v.audio_codes(ids), codes)


def _doc(v):
    return v.document([v.text_segment([1, 2]), v.image_segment([0, 1, 2, 19]),
                       v.audio_segment([[1, 2, 3], [4, 5, 6]])])


def test_states_follow_the_grammar(v):
    doc = _doc(v)
    st = v.states(torch.tensor(doc)).tolist()
    S = State
    want = [S.OUTSIDE, S.TEXT, S.TEXT, S.TEXT,  # bos bot t t
            S.OUTSIDE, S.IMAGE, S.IMAGE, S.IMAGE, S.IMAGE, S.IMAGE_END,  # eot boi c c c c
            S.OUTSIDE, S.AUDIO, S.AUDIO + 1, S.AUDIO + 2, S.AUDIO, S.AUDIO + 1, S.AUDIO + 2, S.AUDIO,  # eoi boa frames
            S.OUTSIDE, S.DONE]  # eoa eos
    assert st == [int(s) for s in want]
    assert v.grammar_violations(torch.tensor(doc)).numel() == 0


def test_violations_are_found(v):
    doc = _doc(v)
    short_image = doc[:8] + doc[9:]  # 3 image codes then <eoi>
    assert v.grammar_violations(torch.tensor(short_image)).tolist() == [9]  # <eoi> after 3 codes
    bad = list(doc)
    bad[2] = v.image_start  # an image code inside text
    assert v.grammar_violations(torch.tensor(bad)).tolist() == [2]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        v.grammar_violations(torch.tensor(doc + [v.used_size]))


def test_column_table_maps_allowed_ids_to_softmax_classes(v):
    table = v.column_table()
    for s in range(v.n_states):
        mask = v.allowed_mask(s)
        cols = table[s][mask]
        assert sorted(cols.tolist()) == list(range(int(mask.sum())))
        assert (table[s][~mask] == -1).all()
    assert v.allowed_mask(State.AUDIO)[v.eoa] and not v.allowed_mask(State.AUDIO + 1)[v.eoa]
    assert v.allowed_mask(State.IMAGE_END).sum() == 1


def test_segment_builders_reject_bad_content(v):
    with pytest.raises(ValueError, match="an image has 4 codes"):
        v.image_segment([1, 2, 3])
    with pytest.raises(ValueError, match="image code out of range"):
        v.image_segment([1, 2, 3, 20])
    with pytest.raises(ValueError, match="text id out of range"):
        v.text_segment([50])
    with pytest.raises(ValueError, match="frames"):
        v.audio_ids(np.zeros((2, 2)))


def test_a_row_that_starts_mid_document_is_unknown_until_a_marker(v):
    doc = _doc(v)
    st = v.states(torch.tensor(doc[2:]))
    assert st[0] == State.UNKNOWN and st[2] == State.OUTSIDE  # doc[4] is <eot>


def test_prompt_targets_are_every_segment_but_a_documents_last(v):
    """Built token by token with the expected flag of each: a two-segment document, a
    one-segment one, a three-segment one, then a document the row's end cuts off."""
    text, image = v.text_segment([3, 4]), v.image_segment([1, 2, 3, 4])
    audio = v.audio_segment(np.arange(6).reshape(2, 3) % 8)
    tokens, prompt = [], []

    def doc(segments):
        tokens.append(v.bos)
        prompt.append(False)  # <bos> itself is never a target a loss counts
        for n, seg in enumerate(segments):
            tokens.extend(seg)
            prompt.extend([n < len(segments) - 1] * len(seg))
        tokens.append(v.eos)
        prompt.append(False)

    doc([text, image])
    doc([image])
    doc([audio, text, image])
    doc([image, text])
    cut = len(tokens) - len(text) - 1  # the row ends before the last document's caption
    tokens, prompt = tokens[:cut], prompt[:cut]
    prompt[-len(image):] = [False] * len(image)  # ...so its image is the last segment seen
    row = torch.tensor([tokens])
    got = v.prompt_targets(row[:, :-1], row[:, 1:])[0].tolist()
    assert got == prompt[1:]
    # rows are read on their own: the same row twice gives the same flags twice
    two = torch.tensor([tokens, tokens])
    assert v.prompt_targets(two[:, :-1], two[:, 1:]).tolist() == [prompt[1:]] * 2
    assert v.loss_targets(row[:, :-1], row[:, 1:], "modality").equal(row[:, 1:])
    masked = v.loss_targets(row[:, :-1], row[:, 1:], "target")[0]
    assert masked.tolist() == [v.pad if p else t for t, p in zip(tokens[1:], prompt[1:])]
