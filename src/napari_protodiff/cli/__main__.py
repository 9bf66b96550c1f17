"""``python -m napari_protodiff.cli`` runs the ``protodiff`` command."""

import sys

from . import main

sys.exit(main())
