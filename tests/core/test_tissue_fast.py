"""Tissue detection's shortcuts change nothing but time."""

from __future__ import annotations

import numpy as np
from PIL import Image
from skimage import color

from napari_protodiff.core.tissue import _rgb2hsv, detect_tissue_rgb


def test_rgb2hsv_lookup_equals_skimage(ink_jpeg, he_png):
    ink = np.asarray(Image.open(ink_jpeg).convert("RGB"))
    he = np.asarray(Image.open(he_png).convert("RGB"))
    big = np.concatenate([ink[:, :1000], he, ink[:, 1000:2000][::-1]], axis=1)  # 3000 x 1000 px: the lookup path
    assert big.shape[0] * big.shape[1] >= 1 << 20
    np.testing.assert_array_equal(_rgb2hsv(big), color.rgb2hsv(big))
    np.testing.assert_array_equal(_rgb2hsv(he), color.rgb2hsv(he))


def test_no_ink_means_an_empty_ink_mask(he_png):
    # A region without ink or dark debris: nothing to reject, not even near a corner.
    he = np.asarray(Image.open(he_png).convert("RGB"))
    tissue, ink = detect_tissue_rgb(he, mpp=0.5)
    assert not ink.any()
    assert tissue[:150, :150].mean() > 0.9
