"""Evaluation of a trained checkpoint: held-out losses, generation judged by small
classifiers (judges.py), sample grids and the training curve (report.py)."""
