"""Malaria cell classification pipeline: one module per DVC stage plus a few shared modules."""
import os

# albumentations asks PyPI for a newer version at import time unless told not to; the pipeline must run offline.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
