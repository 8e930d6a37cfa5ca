"""A torchrun worker for tests/test_ddp.py: rank 1 raises while rank 0 waits for it in a collective."""
from pipeline.lib import distributed as ddp
from pipeline.lib.common import PipelineError, run_main


def main() -> None:
    ddp.init("cpu")
    if ddp.rank() == 1:
        raise PipelineError("rank 1 broke on purpose")
    ddp.barrier()  # never returns by itself: rank 1 is gone


if __name__ == "__main__":
    run_main(main)
