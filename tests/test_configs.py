"""Every config in configs/ builds: its objective's whole train state under jax.eval_shape (nothing allocated).

Variants that only change numbers of an architecture another case already traces (ldm_f8:finetune,
ldm_sd2:v, ...) build their objective without tracing, to stay inside the CI budget.
"""
import functools
import pathlib

import jax
import numpy as np
import pytest

from ldm_jax import sharding as shd
from ldm_jax.training import registry
from ldm_jax.training import trainer as tr
from training_utils import load_config

CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.py"))
# ldm_sdxl: the full-size base is traced by tests/test_memory.py (its counts); here the tiny one
TRACED = {"ldm_tiny": ["", "test,class", "test,none"], "ldm_uncond": ["churches", "celebahq"], "ldm_sdxl": ["tiny"]}
BUILT_ONLY = {"ldm_f8": ["finetune"], "ldm_sd2": ["v"], "ldm_uncond": ["ffhq", "bedrooms"], "ldm_tiny": ["test", "class", "none"],
              "ldm_sdxl": ["", "finetune", "refiner", "tiny,refiner"]}
CASES = [(name, arg) for name in CONFIGS for arg in TRACED.get(name, [""])]
BUILT = [(name, arg) for name, args in BUILT_ONLY.items() for arg in args]


def _count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


@functools.lru_cache(maxsize=None)
def _abstract_state(name, arg, first_stage=False):
    config = load_config(name, arg)
    if first_stage:
        config = config.first_stage_train
    objective = registry.make_objective(config)
    abstract, shardings = tr.state_shardings(objective, shd.make_mesh((-1, 1, 1)), int(config.seed))
    return objective, abstract, shardings


@pytest.mark.parametrize("name,arg", CASES)
def test_config_builds(name, arg):
    config = load_config(name, arg)
    assert config.is_locked, "get_config must return a locked ConfigDict"
    with pytest.raises(AttributeError):
        config.no_such_key = 1
    if config.get("first_stage_train") is not None:
        _abstract_state(name, arg, first_stage=True)
    objective, abstract, shardings = _abstract_state(name, arg)
    assert _count(abstract.params) > 0
    assert set(abstract.opt_state) == set(abstract.params)
    assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(shardings)


@pytest.mark.parametrize("name,arg", BUILT)
def test_config_variant_builds(name, arg):
    config = load_config(name, arg)
    assert config.is_locked
    registry.make_objective(config)


def test_ldm_f8_is_stable_diffusion_v1():
    _, abstract, _ = _abstract_state("ldm_f8", "")
    assert _count(abstract.params["model"]["unet"]) == 859_520_964
    assert _count(abstract.frozen["first_stage"]) == 83_653_863
    assert _count(abstract.frozen["text"]) == 123_060_480
    assert set(abstract.params["model"]) == {"unet"}  # CLIP and VAE are frozen
