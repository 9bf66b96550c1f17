"""Keep triton out of a process that already holds another LLVM.

Mesa's software OpenGL (napari under Xvfb, or without a GPU driver) loads ``libLLVM``;
torch then imports triton (through ``torch._dynamo``, which diffusers imports), triton
loads its own LLVM, the symbols clash and the process dies with a segmentation fault.
Triton only compiles GPU kernels, which nothing here needs in such a process.

:func:`install` puts a finder on ``sys.meta_path`` that decides at the moment triton is
imported: if ``libLLVM`` is mapped then, ``import triton`` raises ModuleNotFoundError (torch
treats triton as absent); otherwise the import proceeds untouched.
"""

from __future__ import annotations

import importlib.abc
import sys


def llvm_loaded() -> bool:
    """Whether this process has a shared ``libLLVM`` mapped (Linux; False elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            return "/libLLVM" in f.read()
    except OSError:
        return False


class _TritonGuard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if (name == "triton" or name.startswith("triton.")) and llvm_loaded():
            # ModuleNotFoundError, as for a missing package: torch's optional-import checks catch that one.
            raise ModuleNotFoundError("triton is not imported in a process that holds another LLVM (software "
                                      "OpenGL).", name=name)
        return None


def install() -> None:
    """Install the guard once (cheap: it looks only when triton is being imported)."""
    if not any(isinstance(f, _TritonGuard) for f in sys.meta_path):
        sys.meta_path.insert(0, _TritonGuard())
