"""The headless core never imports napari or Qt; napari's start-up never pays for torch."""

import subprocess
import sys
import textwrap

GUI = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt", "vispy")


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_core_and_cli_import_no_gui():
    loaded = _run(
        """
        import importlib, pkgutil, sys
        import napari_protodiff.core as core
        import napari_protodiff.cli
        for m in pkgutil.walk_packages(core.__path__, core.__name__ + "."):
            importlib.import_module(m.name)
        gui = %r
        print(",".join(sorted(m for m in sys.modules if m.split(".")[0] in gui)))
        """
        % (GUI,)
    )
    assert loaded == "", f"the headless core imported GUI modules: {loaded}"


def test_napari_entry_points_do_not_import_heavy_ml():
    loaded = _run(
        """
        import sys
        import napari_protodiff, napari_protodiff._napari
        import napari_protodiff._napari.reader, napari_protodiff._napari.sample_data
        print(",".join(sorted(m for m in ("torch", "diffusers", "timm", "dask.distributed", "distributed") if m in sys.modules)))
        """
    )
    assert loaded == "", f"napari start-up would import heavy modules: {loaded}"


def test_the_contract_check_detects_a_gui_import(tmp_path):
    # The check above must be able to fail: a module importing napari is caught.
    (tmp_path / "bad_core_mod.py").write_text("import napari\n")
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import bad_core_mod; print('napari' in sys.modules)"
    assert _run(code) == "True"
