"""Tissue detection's shortcuts change nothing but time: the same values as skimage and scipy."""

from __future__ import annotations

import numpy as np
from PIL import Image
from skimage import color

from napari_protodiff.core.tissue import (_close_cross, _hue, _remove_small, _rgb2hsv, _saturation_value, _select_components,
                                          detect_tissue_rgb)


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


def _colours() -> np.ndarray:
    """1,000,000 random colours plus every grey and the ramps where channels tie or cross."""
    rng = np.random.default_rng(0)
    g = np.arange(256, dtype=np.uint8)
    z, f = np.zeros_like(g), np.full_like(g, 255)
    ramps = [np.stack(c, 1) for c in ((g, g, g), (g, g, 255 - g), (g, 255 - g, g), (255 - g, g, g), (g, g, z),
                                       (g, z, g), (z, g, g), (f, g, g), (g, f, g), (g, g, f))]
    return np.concatenate([rng.integers(0, 256, (1_000_000, 3), dtype=np.uint8), *ramps])


def test_saturation_value_and_hue_are_skimages_exactly(ink_jpeg):
    px = _colours()
    ref = color.rgb2hsv(px[None])[0]
    s, v = _saturation_value(px[None])
    np.testing.assert_array_equal(s[0], ref[:, 1])
    np.testing.assert_array_equal(v[0], ref[:, 2])
    np.testing.assert_array_equal(_hue(px), ref[:, 0])
    ink = np.asarray(Image.open(ink_jpeg).convert("RGB"))  # a real image, 2-D
    ref = color.rgb2hsv(ink)
    s, v = _saturation_value(ink)
    np.testing.assert_array_equal(s, ref[..., 1])
    np.testing.assert_array_equal(v, ref[..., 2])


def test_closing_with_a_cross_equals_scipys():
    from scipy import ndimage
    from skimage import morphology

    rng = np.random.default_rng(1)
    cross = morphology.disk(1).astype(bool)
    for shape in ((1, 7), (2, 2), (3, 3), (40, 65), (257, 130)):
        for p in (0.1, 0.5, 0.8, 0.95):
            m = rng.random(shape) < p
            np.testing.assert_array_equal(_close_cross(m), ndimage.binary_closing(m, cross, border_value=0))


def test_removing_specks_in_the_bounding_box_equals_labelling_everything():
    """Labelling only inside the pixels' bounding box, and not at all when there are fewer
    pixels than the size kept, removes exactly the components a full labelling does."""
    from skimage import measure

    def plain(m, n):
        lab = measure.label(m, connectivity=2)
        keep = np.bincount(lab.ravel()) >= n
        keep[0] = False
        return keep[lab]

    rng = np.random.default_rng(2)
    for shape in ((1, 9), (40, 65), (300, 200)):
        for p in (0.0005, 0.05, 0.3, 0.6):
            for box in ((slice(None), slice(None)), (slice(5, 20), slice(30, 60)), (slice(-3, None), slice(0, 4))):
                m = np.zeros(shape, bool)
                m[box] = rng.random(m[box].shape) < p
                for n in (2, 3, 8, 40, int(m.sum()), int(m.sum()) + 1):
                    out = _remove_small(m, n)
                    assert out.shape == m.shape and out.dtype == bool
                    np.testing.assert_array_equal(out, plain(m, n) if m.any() else m)


def test_components_labelled_in_bands_equal_one_labelling():
    """Labelling in bands (one a thread) and joining components across the seams gives the
    components, and sizes, of one labelling of the whole mask: 4- and 8-connectivity, seams
    crossed straight and only diagonally, components spanning every band."""
    from scipy import ndimage

    rng = np.random.default_rng(3)
    masks = [rng.random((257, 300)) < p for p in (0.3, 0.45, 0.55, 0.7)]
    diag = np.zeros((128, 128), bool)  # a staircase: one 8-connected component, 128 4-connected ones
    diag[np.arange(128), np.arange(128)] = True
    stripes = np.zeros((200, 50), bool)
    stripes[:, ::2] = True  # vertical lines through every band
    masks += [diag, stripes, np.zeros((130, 10), bool), np.ones((130, 10), bool)]
    for m in masks:
        for conn in (1, 2):
            lab, _ = ndimage.label(m, structure=ndimage.generate_binary_structure(2, conn))
            sizes = np.bincount(lab.ravel())
            for n in (2, 5, 9, int(np.median(sizes[1:])) if sizes.size > 1 else 1):
                want = sizes >= n
                want[0] = False
                for bands in (1, 2, 3, 4, 7):
                    got = _select_components(m, lambda s, n=n: s >= n, conn, n_bands=bands)
                    np.testing.assert_array_equal(got, want[lab], err_msg=f"{conn=} {n=} {bands=}")


def _reference_detect(rgb, p, mpp):
    """The tissue and ink masks computed the plain way: skimage's float HSV of every pixel,
    its Otsu on the pixels, scipy's closing, skimage's labels."""
    from scipy import ndimage
    from skimage import filters, measure, morphology

    from napari_protodiff.core.tissue import _px_area

    def remove_small(m, n):
        if n <= 1 or not m.any():
            return m
        lab = measure.label(m, connectivity=2)
        keep = np.bincount(lab.ravel()) >= n
        keep[0] = False
        return keep[lab]

    hsv = color.rgb2hsv(rgb)
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    glass, dark = v > p.max_brightness, v < p.min_brightness
    cand = ~glass & ~dark
    vals, thr = s[cand], p.min_saturation
    if vals.size > 64 and np.ptp(vals) > 1e-3:
        thr = max(thr, float(filters.threshold_otsu(vals)) * 0.5)
    tissue = cand & (s > thr)
    lo, hi = p.ink_hue_range
    ink = ((s >= p.ink_min_saturation) & ~glass & (h >= lo) & (h <= hi)) | dark
    ink = remove_small(ink, _px_area(2000.0, mpp, 16))
    r = int(round(p.ink_margin_um / mpp))
    if r > 0 and ink.any():
        ink = ndimage.distance_transform_edt(~ink) <= r
    tissue &= ~ink
    tissue = ndimage.binary_closing(tissue, morphology.disk(1).astype(bool), border_value=0)
    lab = measure.label(~tissue, connectivity=1)
    small = np.bincount(lab.ravel()) < _px_area(p.max_hole_um2, mpp, 4)
    small[0] = False
    tissue = (tissue | small[lab]) & ~ink
    return remove_small(tissue, _px_area(p.min_object_um2, mpp, 16)), ink


def test_tissue_and_ink_masks_equal_the_plain_skimage_computation(ink_jpeg, he_png):
    """The (max, min) lookups, the Otsu threshold from colour counts and the red-is-largest
    shortcut for the ink hue give the masks of the plain per-pixel computation, exactly."""
    from napari_protodiff.core.tissue import TissueParams

    ink_img = np.asarray(Image.open(ink_jpeg).convert("RGB"))
    he = np.asarray(Image.open(he_png).convert("RGB"))
    px = _colours()
    side = int(np.sqrt(len(px)))
    colours = px[: side * side].reshape(side, side, 3)  # every kind of colour, ties and ramps
    cases = [(ink_img, TissueParams(), 4.0), (he, TissueParams(), 8.0), (colours, TissueParams(ink_margin_um=0, min_object_um2=0, max_hole_um2=0), 1.0),
             (ink_img, TissueParams(ink_hue_range=(0.05, 0.95), min_brightness=0.3), 4.0),  # no shortcut
             (ink_img[::2, ::2], TissueParams(min_saturation=0.2, max_brightness=0.8, ink_margin_um=0), 8.0)]
    for rgb, p, mpp in cases:
        tissue, ink = detect_tissue_rgb(rgb, p, mpp)
        ref_tissue, ref_ink = _reference_detect(rgb, p, mpp)
        assert ref_tissue.any() and (~ref_tissue).any()
        np.testing.assert_array_equal(ink, ref_ink)
        np.testing.assert_array_equal(tissue, ref_tissue)
    assert _reference_detect(ink_img, TissueParams(), 4.0)[1].any()  # the ink case has ink
