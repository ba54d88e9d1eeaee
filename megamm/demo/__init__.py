"""The embedded demo, "spoken coloured digits": a data set, its recipe, its judges and
its report, built on the library and never imported by it.

    digits.py       the examples: scikit-learn's 8x8 digits painted and captioned, the
                    captions spoken from shipped word clips
    recipe.py       the default tokenizers and data directory, trained/written once
                    and cached (`ensure_default_dataset`, `load_default`)
    captions.py     a caption as labels; word accuracy of a transcript
    image_judge.py  the classifier that reads digit and paints from an image
    audio_judge.py  the classifier that hears the words of a spoken caption
    judge_files.py  a judge on disk
    judges.py       both judges, trained once per tokenizers and cached (`load_judges`)
    report.py       tools/evaluate.py's report (`evaluate`) and the training run's
                    sample grids and clips (`write_samples`, `write_samples_from_model`)
    pictures.py     captioned image grids (Pillow) and line plots (matplotlib)

Entry points (launch/, tools/, benchmarks/, tests/) import it; everything else under
megamm/ does not (tests/test_layering.py).
"""
