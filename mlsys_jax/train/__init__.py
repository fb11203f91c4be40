"""Training: optimizer, state, the train step. Data and checkpoints live in their own modules
(``mlsys_jax.train.data``, ``mlsys_jax.train.checkpoint``) so the step imports nothing heavy."""

from mlsys_jax.train.optim import OptimConfig, adamw, schedule
from mlsys_jax.train.state import TrainState, abstract_state, init_state, make_init, state_shardings
from mlsys_jax.train.step import TrainStep, make_eval_step, make_train_step

__all__ = [
    "OptimConfig",
    "TrainState",
    "TrainStep",
    "abstract_state",
    "adamw",
    "init_state",
    "make_eval_step",
    "make_init",
    "make_train_step",
    "schedule",
    "state_shardings",
]
