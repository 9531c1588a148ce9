"""Train state, sharded creation, optimizer application and EMA with LDM's warm-up decay."""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh

from ldm_jax.sharding import logical_sharding


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue (see `ldm_jax.training.objective` for the fields' meaning)."""

    step: jax.Array
    params: dict[str, Any]
    opt_state: dict[str, Any]
    ema: dict[str, Any]
    frozen: dict[str, Any]
    extra: dict[str, Any]
    rng: jax.Array


def apply_gradients(
    state: TrainState, group: str, grads: Any, tx: optax.GradientTransformation
) -> tuple[TrainState, jax.Array]:
    """One optimizer update of parameter group `group`; returns the new state and the gradients' global norm."""
    params = state.params[group]
    updates, opt_state = tx.update(grads, state.opt_state[group], params)
    params = optax.apply_updates(params, updates)
    return (
        state.replace(params={**state.params, group: params}, opt_state={**state.opt_state, group: opt_state}),
        optax.global_norm(grads),
    )


def ema_decay(num_updates: jax.Array, decay: float, warmup: bool = True) -> jax.Array:
    """LitEma's decay: `min(decay, (1 + n) / (10 + n))` where n counts updates from 1 (LDM, ema.py)."""
    n = jnp.asarray(num_updates, jnp.float32)
    return jnp.minimum(decay, (1.0 + n) / (10.0 + n)) if warmup else jnp.asarray(decay, jnp.float32)


def update_ema(ema: Any, params: Any, decay: jax.Array) -> Any:
    """`ema <- ema - (1 - decay) * (ema - params)`, computed in float32."""
    return jax.tree_util.tree_map(
        lambda e, p: (e - (1.0 - decay) * (e - p.astype(e.dtype))).astype(e.dtype), ema, params
    )


def init_state_fn(objective: Any, seed: int) -> Callable[[], TrainState]:
    """A traceable function that returns the (boxed) initial state of `objective` (memoized: one compile per run)."""
    cache = objective.__dict__.setdefault("_ldm_jax_init_cache", {})
    if seed in cache:
        return cache[seed]

    def init() -> TrainState:
        key = jax.random.key(seed)
        init_key, run_key = jax.random.split(key)
        variables = objective.init(init_key)
        params = variables["params"]
        txs = objective.optimizers()
        if set(txs) != set(params):
            raise ValueError(f"objective {objective.name}: optimizers {sorted(txs)} != parameter groups {sorted(params)}")
        # optax maps over the boxed params, so its moments carry the same logical names (and shardings).
        opt_state = {g: txs[g].init(params[g]) for g in params}
        ema = {g: jax.tree_util.tree_map(lambda x: x, params[g]) for g in objective.ema_groups}
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=opt_state,
            ema=ema,
            frozen=variables.get("frozen", {}),
            extra=variables.get("extra", {}),
            rng=jax.random.key_data(run_key),
        )

    cache[seed] = init
    return init


def state_shardings(objective: Any, mesh: Mesh, seed: int = 0) -> tuple[TrainState, TrainState]:
    """(abstract unboxed state, NamedShardings) for `objective` on `mesh`, without allocating anything."""
    boxed = jax.eval_shape(init_state_fn(objective, seed))
    shardings = logical_sharding(boxed, mesh)
    return nn.meta.unbox(boxed), shardings


def create_state(objective: Any, mesh: Mesh, seed: int = 0) -> TrainState:
    """The initial state, created already sharded: eval_shape -> logical shardings -> jit(out_shardings)."""
    init = init_state_fn(objective, seed)
    _, shardings = state_shardings(objective, mesh, seed)
    cache = objective.__dict__["_ldm_jax_init_cache"]
    unboxed = cache.setdefault(("unboxed", seed), lambda: nn.meta.unbox(init()))  # same function -> jit cache hits
    return jax.jit(unboxed, out_shardings=shardings)()


def eval_params(state: TrainState, group: str, use_ema: bool = True) -> Any:
    """The weights to sample/evaluate with: the EMA copy of `group` when there is one."""
    return state.ema[group] if use_ema and group in state.ema else state.params[group]
