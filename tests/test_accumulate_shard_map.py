"""The shard_map'd gradient accumulation (optim.accumulate_shard_map): same numbers as the lax.scan path and
the one-device step, the mesh-independent draws of sharding.block_key, and the compiled HLO showing the
data-parallel gradient reduction moved out of the micro-batch loop (once per step instead of per micro-batch).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ldm_jax import sharding as shd
from ldm_jax.training import optim
from training_utils import batches, host, max_diff, shared_objective, tiny_config

COLLECTIVES = ("all-reduce", "reduce-scatter", "all-gather", "collective-permute", "all-to-all")


# ------------------------------------------------------------------------------------ HLO reading
def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    comps, cur, entry = {}, None, None
    for line in hlo.splitlines():
        m = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if m:
            cur, comps[m.group(2)] = m.group(2), []
            entry = cur if m.group(1) else entry
        elif line.startswith("}"):
            cur = None
        elif cur:
            comps[cur].append(line)
    return comps, entry


_CALLEES = re.compile(
    r"(?:calls|to_apply|body|condition|branch_computations|called_computations)=(\{[^}]*\}|%?[\w.\-]+)")
_OP = re.compile(r"(?<![%\w.\-])(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


def _reachable(comps, roots):
    seen, todo = set(), list(roots)
    while todo:
        c = todo.pop()
        if c in seen or c not in comps:
            continue
        seen.add(c)
        for line in comps[c]:
            for m in _CALLEES.finditer(line):
                todo += [x.strip().lstrip("%") for x in m.group(1).strip("{}").split(",") if x.strip()]
    return seen


def collectives(hlo: str) -> dict[str, list[tuple[str, str]]]:
    """{"in_loop": [(op, instruction)], "outside": [...]}: collectives inside any while body (or what it calls)."""
    comps, entry = _computations(hlo)
    bodies = {m.group(1) for lines in comps.values() for line in lines
              for m in [re.search(r"\swhile\(.*body=%?([\w.\-]+)", line)] if m}
    in_loop = _reachable(comps, bodies)
    out = {"in_loop": [], "outside": []}
    for c in _reachable(comps, [entry]):
        for line in comps[c]:
            m = _OP.search(line.split("=", 1)[-1])
            if m:
                out["in_loop" if c in in_loop else "outside"].append((m.group(1), line))
    return out


def _groups(instr: str) -> list[list[int]]:
    """Replica groups of a collective, as lists of device ids (explicit or iota form)."""
    m = re.search(r"replica_groups=\{(\{[\d,{} ]*\})\}", instr)
    if m:
        return [[int(d) for d in g.split(",") if d] for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", instr)
    assert m, instr[-300:]
    n, size = int(m.group(1)), int(m.group(2))
    dims = [int(d) for d in m.group(3).split(",")]
    ids = np.arange(int(np.prod(dims))).reshape(dims)
    if m.group(4):
        ids = ids.transpose([int(d) for d in m.group(4).split(",")])
    return ids.reshape(n, size).tolist()


def _operands(instr: str) -> int:
    return instr.split("=", 1)[-1].split("all-reduce(", 1)[1].split(")", 1)[0].count("%")


# ------------------------------------------------------------------------------- block-key draws
def test_block_key_draws_are_slices_of_the_global_draw():
    key = jax.random.key(7)
    draws = {
        "normal": lambda k, s: jax.random.normal(k, s),
        "randint": lambda k, s: jax.random.randint(k, s, 0, 1000),
        "bernoulli": lambda k, s: jax.random.bernoulli(k, 0.3, s),
        "split+fold_in": lambda k, s: jax.random.uniform(jax.random.split(jax.random.fold_in(k, 5), 3)[2], s),
        "bits16": lambda k, s: jax.random.bits(k, s, jnp.uint16),
    }
    shapes = [(8,), (8, 3, 5)]

    @jax.jit
    def all_draws(key):  # one compilation for every case
        return {(name, s): (draw(key, s), [draw(shd.block_key(key, i, 2), (2, *s[1:])) for i in range(4)])
                for name, draw in draws.items() for s in shapes}

    for (name, shape), (whole, blocks) in all_draws(key).items():
        np.testing.assert_array_equal(np.concatenate([np.asarray(b) for b in blocks]), np.asarray(whole),
                                      err_msg=f"{name} {shape}")
    # the 64-bit position arithmetic (a block past 2**32 elements) against Python integers
    a = jnp.asarray([0, 1, 65535, 65536, 2**31 + 12345, 2**32 - 1], jnp.uint32)
    for c in [1, 3, 65536, 123456789, 2**32 - 1]:
        hi, lo = shd._mul_u32_const(a, c)
        got = [(int(h) << 32) + int(x) for h, x in zip(np.asarray(hi), np.asarray(lo))]
        assert got == [int(x) * c for x in np.asarray(a)], c


def test_block_key_rejects_draws_that_are_not_per_sample():
    k = shd.block_key(jax.random.key(0), 1, 4)
    assert jax.random.normal(k, (4, 2)).shape == (4, 2)
    for shape in [(), (3,), (2, 4)]:
        with pytest.raises(ValueError, match="not per-sample"):
            jax.random.normal(k, shape)


# --------------------------------------------------------------------------- toy objective, all meshes
def _toy():
    """A 2-layer MLP with the LDM loss's kinds of draws: per-sample noise, timesteps, dropout masks."""
    rng = np.random.default_rng(0)
    params = {"w1": rng.normal(size=(6, 16)).astype(np.float32) * 0.3, "b1": np.zeros(16, np.float32),
              "w2": rng.normal(size=(16, 4)).astype(np.float32) * 0.3}
    batch = {"x": rng.normal(size=(32, 6)).astype(np.float32), "y": rng.normal(size=(32, 4)).astype(np.float32)}

    def loss_fn(p, b, key):
        k_noise, k_t, k_drop = jax.random.split(key, 3)
        n = b["x"].shape[0]
        t = jax.random.randint(k_t, (n,), 0, 10).astype(jnp.float32)
        x = b["x"] + 0.1 * jax.random.normal(k_noise, b["x"].shape)
        h = jnp.tanh(x @ p["w1"] + p["b1"] + 0.01 * t[:, None])
        h = jnp.where(jax.random.bernoulli(k_drop, 0.8, h.shape), h / 0.8, 0.0)
        err = jnp.mean((h @ p["w2"] - b["y"]) ** 2, axis=1)
        return jnp.mean(err), {"err_max_mean": jnp.mean(jnp.max(h, axis=1)), "t": jnp.mean(t)}

    return params, batch, loss_fn


def _toy_step(mesh, shard_map, num_micro=4):
    params, batch, loss_fn = _toy()
    tensor = mesh.shape["tensor"] > 1  # hidden units split over `tensor`: the partitioner does TP inside
    p_sh = {"w1": NamedSharding(mesh, P(None, "tensor" if tensor else None)),
            "b1": NamedSharding(mesh, P("tensor" if tensor else None)),
            "w2": NamedSharding(mesh, P("tensor" if tensor else None, None))}
    f = jax.jit(lambda p, b, k: optim.accumulate(loss_fn, p, b, k, num_micro, shard_map=shard_map),
                in_shardings=(p_sh, shd.batch_sharding(mesh, 2), shd.replicated(mesh)))
    with jax.set_mesh(mesh):
        compiled = f.lower(params, batch, jax.random.key(3)).compile()
    return host(compiled(params, batch, jax.random.key(3))), collectives(compiled.as_text())


@pytest.fixture(scope="module")
def toy_reference():
    params, batch, loss_fn = _toy()
    return host(jax.jit(lambda p, b, k: optim.accumulate_scan(loss_fn, p, b, k, 4))(params, batch, jax.random.key(3)))


@pytest.mark.parametrize("shape", [(8, 1, 1), (4, 2, 1), (2, 1, 4)])
def test_toy_accumulation_equal_and_reduced_once(shape, toy_reference):
    mesh = shd.make_mesh(shape)
    data = shape[0]
    new, new_c = _toy_step(mesh, shard_map=True)
    assert optim.shard_map_plan(mesh, {"x": jnp.zeros((32, 6))}, 4) is None
    assert max_diff(new, toy_reference) < 1e-5, shape
    assert abs(float(new[0]) - float(toy_reference[0])) < 1e-6 * abs(float(toy_reference[0])) + 1e-7
    # after the loop: exactly one all-reduce over the data axis (all of loss, metrics and gradients in one
    # variadic op), i.e. groups that span `data`; inside the loop nothing ever crosses data replicas
    stride = mesh.devices.size // data  # device ids of one data replica: [r*stride, (r+1)*stride)
    replica = lambda d: d // stride  # noqa: E731
    outside_data = [i for op, i in new_c["outside"] if op == "all-reduce"
                    and len({replica(d) for d in _groups(i)[0]}) == data]
    assert len(outside_data) == 1, new_c["outside"]
    assert _operands(outside_data[0]) == 1 + 2 + 3  # loss, 2 metrics, 3 gradients
    for op, instr in new_c["in_loop"]:
        for g in _groups(instr):
            assert len({replica(d) for d in g}) == 1, (shape, op, instr[-200:])
    if shape == (8, 1, 1):
        assert not new_c["in_loop"], new_c["in_loop"]
        old, old_c = _toy_step(mesh, shard_map=False)
        assert max_diff(old, toy_reference) < 1e-5
        reduce_in_loop = [i for op, i in old_c["in_loop"] if op == "all-reduce"]
        assert len(reduce_in_loop) == 1 and _operands(reduce_in_loop[0]) == 6, old_c  # once per micro-batch
        assert not [op for op, _ in old_c["outside"] if op == "all-reduce"]


def test_plan_falls_back_where_it_does_not_apply():
    x = {"x": jnp.zeros((32, 6))}
    assert "no mesh" in optim.shard_map_plan(jax.sharding.get_abstract_mesh(), x, 4)
    assert "size 1" in optim.shard_map_plan(shd.make_mesh((1, 8, 1)), x, 4)
    assert "not divisible" in optim.shard_map_plan(shd.make_mesh((8, 1, 1)), {"x": jnp.zeros((16, 6))}, 4)
