import cv2
import numpy as np
import pytest

from retina_dist.data.codec import CorruptImage, decode, encode


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    yy, xx = np.mgrid[0:96, 0:128]
    rng = np.random.default_rng(1)
    img = np.stack([xx * 2, yy * 2.5, (xx + yy)], axis=2) + rng.normal(0, 12, (96, 128, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def test_jpeg_decodes_to_opencvs_pixels_in_either_channel_order(photo):
    data = encode(photo, ".jpg")
    ref = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # BGR
    assert np.array_equal(decode(data, bgr=True), ref)
    assert np.array_equal(decode(data), ref[..., ::-1])
    assert np.abs(decode(data).astype(int) - photo).mean() < 10  # and it is the picture (noisy, 4:2:0)
    # padded for the four-channel warp: the same pixels, one filler channel after them
    for bgr, ref_order in ((True, ref), (False, ref[..., ::-1])):
        padded = decode(data, bgr=bgr, pad=True)
        assert padded.shape == (96, 128, 4) and np.array_equal(padded[..., :3], ref_order)
    assert decode(encode(photo, ".png"), pad=True).shape == (96, 128, 3)  # only JPEG pads


def test_grey_jpeg_and_png_stay_single_channel(photo):
    grey = np.ascontiguousarray(photo[..., 1])
    for ext in (".jpg", ".png"):
        out = decode(encode(grey, ext))
        assert out.shape == grey.shape and out.dtype == np.uint8
    assert np.array_equal(decode(encode(grey, ".png")), grey)
    assert np.array_equal(decode(encode(photo, ".png")), photo)


def test_truncated_and_garbage_bytes_name_the_file(photo):
    data = encode(photo, ".jpg")
    with pytest.raises(CorruptImage, match=r"a/b\.jpg: cannot be decoded .*Premature end"):
        decode(data[: len(data) // 2], "a/b.jpg")
    for junk in (data[:20], b"not an image", b""):
        with pytest.raises(CorruptImage, match=r"c\.png: cannot be decoded"):
            decode(junk, "c.png")
