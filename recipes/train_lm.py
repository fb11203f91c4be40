"""Train a Llama-family model on text across a (simulated) device mesh.

The `make demo` default: the `small` model on `cpu-8` (data=2, fsdp=2, tensor=2) over the Python
standard library's source, with the plan printed first, a live progress bar, JSONL metrics,
checkpoints, validation loss and a few sampled lines at the end. Kill it and run the same
command again: it resumes from the last complete checkpoint.

    python recipes/train_lm.py --help
    python recipes/train_lm.py --strategy fsdp --steps 100
    python recipes/train_lm.py --mesh data=2,fsdp=4 --model tiny
"""

import sys

import tyro

from mlsys_jax.cli import explained
from mlsys_jax.train.loop import RunConfig, train


def main() -> int:
    def run() -> int:
        train(tyro.cli(RunConfig, description=__doc__))
        return 0

    return explained(run)


if __name__ == "__main__":
    sys.exit(main())
