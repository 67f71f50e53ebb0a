"""The train state and its creation directly in its sharded layout."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from aff_jax.training import mesh as mesh_lib


@flax.struct.dataclass
class TrainState:
    """Everything a training step changes; all leaves are arrays, so Orbax saves it as is.

    ``step``: int32 scalar, the number of train steps taken. ``params``: the model parameters
    (unboxed, float32). ``batch_stats``: BatchNorm running statistics. ``opt_state``: optax state.
    ``nonfinite_step``: int32 scalar, the first step whose loss or gradients were not finite
    and whose update was applied (0: none), the divergence flag the host reads at log and
    checkpoint time. ``skipped_updates``: int32 scalar, the steps whose non-finite update was
    skipped (``config.skip_nonfinite_updates``).
    """
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    nonfinite_step: jax.Array
    skipped_updates: jax.Array


def state_layout(model: nn.Module, tx: optax.GradientTransformation, input_shape: tuple[int, ...],
                 mesh: Mesh, rules: list[tuple[str, str | None]]
                 ) -> tuple[Callable[[jax.Array], TrainState], TrainState, TrainState]:
    """``(init_fn, abstract_state, shardings)`` for ``model`` on NHWC inputs ``input_shape``.

    ``init_fn(rng)`` builds a fresh TrainState; ``abstract_state`` has its shapes and dtypes
    (no computation); ``shardings`` is the matching tree of NamedShardings: parameters and their
    optimizer slots by ``rules``, everything else replicated.
    """
    # Jitted so that both functions below reuse its trace: the model is traced once here.
    @jax.jit
    def init_variables(rng):
        return model.init(rng, jnp.zeros((1, *input_shape[1:]), jnp.float32), train=False)

    def state_of(boxed_variables):
        variables = nn.meta.unbox(boxed_variables)
        params = variables['params']
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
                          nonfinite_step=jnp.zeros((), jnp.int32),
                          skipped_updates=jnp.zeros((), jnp.int32))

    def init_fn(rng):
        return state_of(init_variables(rng))

    def boxed_and_state(rng):
        variables = init_variables(rng)
        return variables, state_of(variables)

    # The boxed variables carry the partitioning metadata the shardings are made from.
    boxed, abstract_state = jax.eval_shape(boxed_and_state, jax.random.key(0))
    params_sharding = mesh_lib.param_shardings(boxed['params'], mesh, rules)
    replicated = mesh_lib.replicated(mesh)
    shardings = TrainState(
        step=replicated,
        params=params_sharding,
        batch_stats=jax.tree.map(lambda _: replicated, abstract_state.batch_stats),
        opt_state=optax.tree_map_params(tx, lambda _, sharding: sharding,
                                        abstract_state.opt_state, params_sharding,
                                        transform_non_params=lambda _: replicated),
        nonfinite_step=replicated,
        skipped_updates=replicated)
    return init_fn, abstract_state, shardings


def create_state(init_fn: Callable[[jax.Array], TrainState], shardings: TrainState,
                 rng: jax.Array) -> TrainState:
    """Run ``init_fn`` under jit so that every leaf is created directly with its sharding."""
    return jax.jit(init_fn, out_shardings=shardings)(rng)


def with_shardings(abstract_state: TrainState, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs carrying ``shardings``: the restore target on the current mesh."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_state, shardings)
