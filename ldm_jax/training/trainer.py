"""`Trainer.of(objective)`: the compiled pieces of one objective — sharded state creation and the train step.

The step is the objective's `train_step`, then step += 1 and the EMA update, jitted with explicit in/out
shardings and the state donated except its frozen weights (`SplitStep`). A `Trainer` caches the functions it
hands to `jax.jit` (per seed, EMA setting and mesh), so several runs of one objective in a process (tests,
two-stage jobs, resumes) share compilations; `Trainer.of` keeps one trainer per live objective.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn
from jax.sharding import Mesh

from ldm_jax import sharding as shd
from ldm_jax.training.objective import Objective
from ldm_jax.training.state import TrainState, ema_decay, update_ema

_TRAINERS: "weakref.WeakKeyDictionary[Objective, Trainer]" = weakref.WeakKeyDictionary()


def step_key(rng: jax.Array, step: int) -> jax.Array:
    """The key of update `step`: fold_in(run key, step), so a resumed run draws what the original drew."""
    return jax.random.fold_in(jax.random.wrap_key_data(rng), step)


class Trainer:
    """State creation and the jitted train step of one objective (see the module docstring)."""

    def __init__(self, objective: Objective):
        self.objective = objective
        self._init: dict[Any, Callable] = {}
        self._steps: dict[tuple[float, bool], Callable] = {}
        self._in_mesh: dict[tuple[Callable, Mesh], Callable] = {}

    @classmethod
    def of(cls, objective: Objective) -> "Trainer":
        """The trainer of `objective` (one per objective object, so its compilations are reused)."""
        if objective not in _TRAINERS:
            _TRAINERS[objective] = cls(objective)
        return _TRAINERS[objective]

    # ------------------------------------------------------------------------------------------- state
    def init_fn(self, seed: int, boxed: bool = True) -> Callable[[], TrainState]:
        """A traceable function returning the initial state (flax-boxed leaves unless `boxed=False`)."""
        if (seed, boxed) in self._init:
            return self._init[(seed, boxed)]
        obj = self.objective

        def init() -> TrainState:
            init_key, run_key = jax.random.split(jax.random.key(seed))
            variables = obj.init(init_key)
            params = variables["params"]
            txs = obj.optimizers()
            if set(txs) != set(params):
                raise ValueError(f"objective {obj.name}: optimizers {sorted(txs)} != parameter groups {sorted(params)}")
            # optax maps over the boxed params, so its moments carry the same logical names (and shardings).
            return TrainState(
                step=jnp.zeros((), jnp.int32), params=params, opt_state={g: txs[g].init(params[g]) for g in params},
                ema={g: jax.tree_util.tree_map(lambda x: x, params[g]) for g in obj.ema_groups},
                frozen=variables.get("frozen", {}), extra=variables.get("extra", {}), rng=jax.random.key_data(run_key),
            )

        fn = init if boxed else (lambda: nn.meta.unbox(self.init_fn(seed)()))
        self._init[(seed, boxed)] = fn
        return fn

    def state_shardings(self, mesh: Mesh, seed: int = 0) -> tuple[TrainState, TrainState]:
        """(abstract unboxed state, NamedShardings) on `mesh`, without allocating anything."""
        boxed = jax.eval_shape(self.init_fn(seed))
        return nn.meta.unbox(boxed), shd.logical_sharding(boxed, mesh)

    def create_state(self, mesh: Mesh, seed: int = 0) -> TrainState:
        """The initial state, born sharded: eval_shape -> logical shardings -> jit(out_shardings)."""
        _, shardings = self.state_shardings(mesh, seed)
        return jax.jit(self.init_fn(seed, boxed=False), out_shardings=shardings)()

    def prepare(self, state: TrainState, batch: dict[str, jax.Array], state_sh: TrainState) -> TrainState:
        """`objective.prepare` on the first batch, jitted with the state's shardings."""
        return jax.jit(self.objective.prepare, out_shardings=state_sh)(state, batch)

    # -------------------------------------------------------------------------------------------- step
    def step_fn(self, ema_cfg: ml_collections.ConfigDict) -> Callable:
        """`step(state, batch, key) -> (state, metrics)`: the objective's update, then step += 1 and EMA."""
        cfg = (float(ema_cfg.decay), bool(ema_cfg.warmup))
        if cfg in self._steps:
            return self._steps[cfg]
        obj = self.objective

        def step(state: TrainState, batch: dict[str, jax.Array], key: jax.Array) -> tuple[TrainState, dict]:
            new, metrics = obj.train_step(state, batch, key)
            n = state.step + 1
            decay = ema_decay(n, *cfg)
            ema = {g: update_ema(state.ema[g], new.params[g], decay) for g in state.ema}
            return new.replace(step=n, ema=ema), {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

        self._steps[cfg] = step
        return step

    def jit_step(self, ema_cfg: ml_collections.ConfigDict, mesh: Mesh, state_sh: Any, batch_spec: Any) -> "SplitStep":
        """The train step jitted with explicit in/out shardings; the state is donated except `state.frozen`, which
        goes in as its own argument and is handed back unchanged (a LoRA's base, a frozen VAE: never donated, so
        whoever else holds those arrays keeps them, and never copied)."""
        batch_sh = jax.tree_util.tree_map(lambda x: shd.batch_sharding(mesh, len(x.shape)), batch_spec)
        rep = shd.replicated(mesh)
        step = self.step_fn(ema_cfg)
        # The objective sees the mesh while it is traced (jax.sharding.get_abstract_mesh()): optim.accumulate needs
        # it to run its shard_map. One wrapper per (step, mesh), so that runs in one process share compilations.
        if (step, mesh) not in self._in_mesh:
            abstract = mesh.abstract_mesh

            def step_in_mesh(rest, frozen, batch, key):
                with jax.sharding.use_abstract_mesh(abstract):
                    new, metrics = step(rest.replace(frozen=frozen), batch, key)
                leaves = jax.tree_util.tree_leaves
                if any(a is not b for a, b in zip(leaves(new.frozen), leaves(frozen))):
                    raise ValueError(f"objective {self.objective.name}: train_step changed state.frozen")
                return new.replace(frozen={}), metrics

            self._in_mesh[(step, mesh)] = step_in_mesh
        rest_sh = state_sh.replace(frozen={})
        return SplitStep(jax.jit(self._in_mesh[(step, mesh)], in_shardings=(rest_sh, state_sh.frozen, batch_sh, rep),
                                 out_shardings=(rest_sh, rep), donate_argnums=(0,)))

    @staticmethod
    def keygen(mesh: Mesh) -> Callable[[jax.Array, int], jax.Array]:
        """jit(step_key), replicated over `mesh`."""
        return jax.jit(step_key, out_shardings=shd.replicated(mesh))


class SplitStep:
    """`step(state, batch, key)` over a jitted `fn(state without frozen, frozen, batch, key)`; `lower(...)` and its
    `compile()` take (state, batch, key) too (anything else is the jitted / lowered / compiled object's)."""

    def __init__(self, fn: Any):
        self._fn = fn

    def __call__(self, state: TrainState, batch: Any, key: jax.Array) -> tuple[TrainState, dict]:
        new, metrics = self._fn(state.replace(frozen={}), state.frozen, batch, key)
        return new.replace(frozen=state.frozen), metrics

    def lower(self, state: TrainState, batch: Any, key: jax.Array) -> "SplitStep":
        return SplitStep(self._fn.lower(state.replace(frozen={}), state.frozen, batch, key))

    def compile(self, *args, **kwargs) -> "SplitStep":
        return SplitStep(self._fn.compile(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fn, name)


# Functional forms (tests, benchmarks).
def state_shardings(objective: Objective, mesh: Mesh, seed: int = 0) -> tuple[TrainState, TrainState]:
    return Trainer.of(objective).state_shardings(mesh, seed)


def create_state(objective: Objective, mesh: Mesh, seed: int = 0) -> TrainState:
    return Trainer.of(objective).create_state(mesh, seed)


def jit_train_step(objective: Objective, config: ml_collections.ConfigDict, mesh: Mesh, state_sh: Any,
                   batch_spec: Any) -> Callable:
    return Trainer.of(objective).jit_step(config.ema, mesh, state_sh, batch_spec)
