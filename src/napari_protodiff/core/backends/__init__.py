"""Slide backends, one module per reader library (OpenSlide, tifffile, OME-Zarr, Pillow).

Each backend offers the same small surface used by :class:`..slide.Slide`:
``levels()``, ``metadata()``, ``read_region(level, x, y, w, h)``, ``level_dask(level)``,
``associated_image_names()``, ``associated_image(name)`` and ``close()``.
"""
