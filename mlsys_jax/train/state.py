"""The whole training state as one pytree, placed by the plan: optimizer state follows its params."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mlsys_jax.parallel.plan import Plan
from mlsys_jax.params import abstract_params, init_params


class TrainState(NamedTuple):
    """Step counter, parameters (fp32 master copy), optimizer state and the run's PRNG key."""

    step: Any
    params: Any
    opt_state: Any
    rng: Any


def state_shardings(plan: Plan, specs: Any, optimizer: optax.GradientTransformation) -> TrainState:
    """Shardings for every leaf of the state: param-shaped optimizer leaves (Adam's moments)
    take their parameter's sharding; counters and the key are replicated."""
    param_sh = plan.param_shardings(specs)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params(specs))
    rep = plan.replicated()
    opt_sh = optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        abstract_opt,
        param_sh,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
    )
    return TrainState(step=rep, params=param_sh, opt_state=opt_sh, rng=rep)


def abstract_state(plan: Plan, specs: Any, optimizer: optax.GradientTransformation) -> TrainState:
    """``ShapeDtypeStruct`` with sharding for each leaf: the target of a restore or an AOT compile."""
    shapes = jax.eval_shape(lambda: _fresh(specs, optimizer, jax.random.PRNGKey(0)))
    return jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        shapes,
        state_shardings(plan, specs, optimizer),
    )


def _fresh(specs: Any, optimizer: optax.GradientTransformation, key: jax.Array) -> TrainState:
    init_key, run_key = jax.random.split(key)
    params = init_params(specs, init_key)
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), run_key)


def make_init(plan: Plan, specs: Any, optimizer: optax.GradientTransformation) -> Any:
    """The jitted ``PRNGKey -> TrainState`` that creates every array directly in its sharding
    (lower it ahead of time to read the state's bytes per device)."""
    shardings = state_shardings(plan, specs, optimizer)
    return jax.jit(lambda k: _fresh(specs, optimizer, k), out_shardings=shardings)


def init_state(
    plan: Plan, specs: Any, optimizer: optax.GradientTransformation, seed: int = 0, params: Any = None
) -> TrainState:
    """A fresh state on the plan's mesh. The parameters equal
    ``plan.init(specs, split(PRNGKey(seed))[0])`` on any mesh, or are ``params`` when given
    (already placed, e.g. read from another format), with a fresh optimizer state for them."""
    if params is None:
        return make_init(plan, specs, optimizer)(jax.random.PRNGKey(seed))
    shardings = state_shardings(plan, specs, optimizer)

    def fresh(p: Any, key: jax.Array) -> TrainState:
        return TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p), jax.random.split(key)[1])

    return jax.jit(fresh, out_shardings=shardings, donate_argnums=0)(params, jax.random.PRNGKey(seed))
