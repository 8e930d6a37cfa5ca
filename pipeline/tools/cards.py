"""The visible CUDA cards and whether this torch runs on each (`python -m pipeline.tools.cards [--require-gpu]`; the
check itself is the library's, pipeline/lib/cards.py, which the training stages run too)."""
from pipeline.lib.cards import main
from pipeline.lib.common import run_main

if __name__ == "__main__":
    run_main(main)
