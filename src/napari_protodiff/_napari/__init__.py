"""napari front end: reader, sample data and dock widgets (thin; everything computes in ``core``)."""
