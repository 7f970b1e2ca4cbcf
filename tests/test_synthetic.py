import numpy as np
import pytest

from retina_dist.data.synthetic import FUNDUS_CLASSES, OCT_CLASSES, generate


@pytest.mark.parametrize("modality,n_cls", [("fundus", 5), ("oct", 4)])
def test_deterministic_from_seed_and_index(modality, n_cls):
    a = generate(modality, 7, 3, 96, 2)
    b = generate(modality, 7, 3, 96, 2)
    c = generate(modality, 7, 4, 96, 2)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert not np.array_equal(a.image, c.image)


def test_fundus_lesions_grow_with_grade_and_masks_mark_them():
    areas = []
    for grade in range(len(FUNDUS_CLASSES)):
        s = generate("fundus", 0, 10 + grade, 128, grade)
        assert s.image.shape == (128, 128, 3) and s.image.dtype == np.uint8
        assert s.image[0, 0].sum() == 0  # dark surround outside the field
        areas.append(int((s.mask > 0).sum()))
    assert areas[0] == 0  # grade 0 has no lesion
    assert all(a > 0 for a in areas[1:])
    assert areas[4] > areas[1]


def test_oct_classes_carry_their_lesion_mask():
    for label, name in enumerate(OCT_CLASSES):
        s = generate("oct", 0, label, 128, label)
        assert s.image.shape == (128, 128)
        assert ((s.mask > 0).sum() == 0) == (name == "NORMAL")


def test_lesion_pixels_differ_from_background():
    s = generate("fundus", 0, 1, 128, 3)
    inside = s.image[s.mask > 0].astype(float).mean(0)
    field = s.image[(s.mask == 0) & (s.image.sum(2) > 0)].astype(float).mean(0)
    assert np.abs(inside - field).max() > 15
