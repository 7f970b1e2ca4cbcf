"""Scores of gathered predictions: generic classification metrics and the challenges' own."""

from retina_dist.metrics.challenges import challenge_scores, odir, riadd
from retina_dist.metrics.classification import expected_calibration_error, multiclass, multilabel

__all__ = ["challenge_scores", "expected_calibration_error", "multiclass", "multilabel", "odir", "riadd"]
