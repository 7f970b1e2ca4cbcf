"""Synthetic retinas: images drawn from (seed, index) (``images``), and datasets' real on-disk
layouts filled with them (``layouts``), the tests' fixture factory and every preset's default."""

from retina_dist.data.synthetic.images import FUNDUS_CLASSES, OCT_CLASSES, generate

__all__ = ["FUNDUS_CLASSES", "OCT_CLASSES", "generate"]
