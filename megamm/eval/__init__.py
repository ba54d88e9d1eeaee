"""Measures of a trained model that hold for any checkpoint and data: held-out losses
(losses.py), generation in batches (generation.py) and the run's training curve as
series (curve.py). The embedded demo's judged report is megamm.demo.report."""
