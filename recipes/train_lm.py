"""Train a Llama-family model on text across a (simulated) device mesh.

The `make demo` default: the `small` model on `cpu-8` (data=2, fsdp=2, tensor=2) over the Python
standard library's source, with the plan printed first, a live progress bar, JSONL metrics,
checkpoints, validation loss and a few sampled lines at the end. Stop it (Ctrl-C, or SIGTERM as
a scheduler sends) and it saves the step it is on; kill it outright and it keeps the last
complete checkpoint. Either way, the same command again resumes exactly.

    python recipes/train_lm.py --help
    python recipes/train_lm.py --strategy fsdp --steps 100
    python recipes/train_lm.py --mesh data=2,fsdp=4 --model tiny
"""

import sys

import tyro

from mlsys_jax.cli import FLAT, explained
from mlsys_jax.train.config import RunConfig
from mlsys_jax.train.run import train


def main() -> int:
    def run() -> int:
        train(tyro.cli(RunConfig, description=__doc__, config=FLAT))
        return 0

    return explained(run)


if __name__ == "__main__":
    sys.exit(main())
