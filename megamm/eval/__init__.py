"""Evaluation of the embedded dataset's generations: the judges (megamm.eval.judges)
that read generated images and speech back into digits, paints and words."""
