"""retina-dist: distributed training of retinal-disease classifiers on WebDataset shards."""

import os

# albumentations phones home for a version check on import; compute nodes are offline.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
