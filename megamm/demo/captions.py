"""Captions of the embedded dataset as labels, and how close a transcript is to one.

    caption_fields("dark green eight on bright cyan")
        -> {"digit": 8, "foreground": "dark green", "background": "bright cyan"}
    word_accuracy(reference, hypothesis) -> float in [0, 1]

The vocabulary (digit words, shades, colours) is megamm.demo.digits'; a paint is
"<shade> <colour>" and PAINTS fixes the class index of each of the 12.
"""
from __future__ import annotations

from megamm.demo.digits import COLOURS, DIGIT_WORDS, SHADES

PAINTS = tuple(f"{shade} {colour}" for shade in SHADES for colour in COLOURS)
"""The 12 paints, "dark red" ... "bright magenta": the class order of the colour judges."""


def caption_fields(caption: str) -> dict:
    """Parse "<shade> <colour> <digit word> on <shade> <colour>" into
    {"digit": int, "foreground": "<shade> <colour>", "background": "<shade> <colour>"}.
    Raises ValueError naming the caption when it does not have that form."""
    words = caption.split()
    if (len(words) != 6 or words[3] != "on" or words[2] not in DIGIT_WORDS
            or " ".join(words[:2]) not in PAINTS or " ".join(words[4:]) not in PAINTS):
        raise ValueError(f"not a caption of the form '<shade> <colour> <digit> on <shade> <colour>': {caption!r}")
    return {"digit": DIGIT_WORDS.index(words[2]), "foreground": " ".join(words[:2]),
            "background": " ".join(words[4:])}


def word_accuracy(reference: str, hypothesis: str) -> float:
    """Words of `reference` recovered in order by `hypothesis`, aligned by edit distance
    without substitutions: the length of the longest common subsequence of the two word
    lists, divided by the longer list's length.

    So it is the fraction of reference words recovered when the hypothesis has no extra
    words, and extra words lower it (saying every word in the vocabulary does not score
    1). Two empty strings score 1.0; exactly one empty scores 0.0.
    """
    ref, hyp = reference.split(), hypothesis.split()
    if not ref or not hyp:
        return float(ref == hyp)
    prev = [0] * (len(hyp) + 1)  # LCS lengths of ref[:i] against every prefix of hyp
    for r in ref:
        row = [0]
        for j, h in enumerate(hyp):
            row.append(prev[j] + 1 if r == h else max(prev[j + 1], row[j]))
        prev = row
    return prev[-1] / max(len(ref), len(hyp))
