"""Bundled sample data (see LICENSES.md)."""

from pathlib import Path

DATA_DIR = Path(__file__).parent
SAMPLE_SLIDE = DATA_DIR / "CMU-1-Small-Region.svs"
