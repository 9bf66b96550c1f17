"""Tissue detection rejects glass, pen ink, black marker and dust; its mask carries its scale."""

from __future__ import annotations

import numpy as np
import pytest

from napari_protodiff.core.slide import open_slide
from napari_protodiff.core.tissue import TissueParams, detect_tissue, detect_tissue_rgb


def test_mask_scale_on_svs(cmu_svs):
    with open_slide(cmu_svs) as s:
        m = detect_tissue(s)
    assert m.mpp == pytest.approx(m.downsample * 0.499)
    assert m.mpp == pytest.approx(8.0, rel=0.02)  # default mask resolution
    assert m.mask.shape[1] == round(2220 / m.downsample)
    assert abs(m.mask.shape[0] - 2967 / m.downsample) <= 0.5
    assert 0.25 < m.tissue_fraction < 0.5  # a skin section in the middle of glass
    # Corners are glass, the section's centre is tissue (level-0 px).
    assert m.fraction_in(0, 0, 300, 300) == 0
    assert m.fraction_in(1100, 1900, 400, 400) > 0.95


def test_blue_ink_is_rejected(ink_jpeg):
    with open_slide(ink_jpeg, mpp_override=0.5) as s:
        m = detect_tissue(s)
        rgb, _ = s.read_downsampled(m.downsample)
    rgb = rgb[: m.mask.shape[0], : m.mask.shape[1]]
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    blue = (b - r > 60) & (b - g > 40)  # the pen mark, by an independent rule
    assert blue.sum() > 50
    assert m.ink[blue].mean() > 0.95
    assert not (m.mask & blue).any()
    # Tissue is still found everywhere else along the strip.
    assert m.tissue_fraction > 0.2
    off = TissueParams(reject_ink=False)
    with open_slide(ink_jpeg, mpp_override=0.5) as s:
        m_off = detect_tissue(s, off)
    assert (m_off.mask & blue).sum() > 0.5 * blue.sum()  # the check can fail: without ink rejection, ink is "tissue"


def _glass_and_tissue(cmu_svs):
    with open_slide(cmu_svs) as s:
        glass = s.read_region(0, 0, 0, 400, 400)  # real glass background from the slide corner
        tissue = s.read_region(0, 1100, 1900, 400, 400)
    return glass, tissue


def test_dust_and_black_marker_are_rejected(cmu_svs):
    glass, tissue = _glass_and_tissue(cmu_svs)
    canvas = np.tile(glass, (2, 2, 1))  # 800 x 800 px at 1 µm/px
    canvas[200:600, 200:600] = tissue  # a 400 x 400 µm piece of tissue
    canvas[40:52, 700:712] = tissue[:12, :12]  # a 12 x 12 µm coloured speck (dust)
    canvas[650:760, 40:150] = 20  # a black marker blot
    mask, ink = detect_tissue_rgb(canvas, TissueParams(), mpp=1.0)
    assert mask[250:550, 250:550].mean() > 0.9
    assert not mask[40:52, 700:712].any()
    assert not mask[650:760, 40:150].any() and ink[650:760, 40:150].all()
    keep_dust, _ = detect_tissue_rgb(canvas, TissueParams(min_object_um2=0), mpp=1.0)
    assert keep_dust[40:52, 700:712].any()  # the speck is coloured: only the size filter removes it


def test_blank_glass_has_no_tissue(cmu_svs):
    glass, _ = _glass_and_tissue(cmu_svs)
    mask, _ = detect_tissue_rgb(np.tile(glass, (3, 3, 1)), TissueParams(), mpp=1.0)
    assert not mask.any()


def test_params_validate():
    with pytest.raises(ValueError):
        TissueParams(min_saturation=2)
    with pytest.raises(ValueError):
        TissueParams(bogus=1)
