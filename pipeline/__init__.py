"""Malaria cell classification: the DVC stages, one module each (this folder), the library they share (lib/) and the
tools around them (tools/)."""
import os
from pathlib import Path

# albumentations asks PyPI for a newer version at import time unless told not to; the pipeline must run offline.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# The tools' earlier names still answer (`python -m pipeline.bench` runs pipeline/tools/bench.py); the code imports
# them as pipeline.tools.<name> only (tests/test_house.py).
__path__.append(str(Path(__file__).parent / "tools"))
