"""napari front end: reader, sample data and dock widgets (thin; everything computes in ``core``)."""

from ..core.llvm_guard import install as _install_llvm_guard

_install_llvm_guard()  # a viewer on software OpenGL holds Mesa's LLVM; triton's must then stay out
