"""Train state, optimizer application and EMA with LDM's warm-up decay (sharded creation: `training.trainer`)."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


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


def eval_params(state: TrainState, group: str, use_ema: bool = True) -> Any:
    """The weights to sample/evaluate with: the EMA copy of `group` when there is one."""
    return state.ema[group] if use_ema and group in state.ema else state.params[group]
