"""Self-supervised pretraining (DINO) of vision transformers on real, synthetic and hybrid patch stores.

* :mod:`.config`  -- :class:`PretrainConfig` and its presets (shared by API, CLI and widget)
* :mod:`.augment` -- H&E multi-crop augmentations (flips, 90° rotations, colour/stain jitter, blur)
* :mod:`.data`    -- zarr patch sources, the hybrid real/synthetic sampler, the multi-crop dataset
* :mod:`.dino`    -- student/teacher model, lightly's DINO head and loss, schedules
* :mod:`.train`   -- the training job (checkpoints, resume, DDP) writing a run directory
* :mod:`.export`  -- the teacher backbone as safetensors + config, and loading it back

Nothing here imports torch at module import time except :mod:`.dino`, :mod:`.train`,
:mod:`.augment` and :mod:`.export` (import them lazily from GUI code).
"""

from .config import PRESETS, PretrainConfig

__all__ = ["PRESETS", "PretrainConfig"]
