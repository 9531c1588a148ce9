"""LoRAs in the pipeline: several at once with their own scales, no recompile when a scale changes,
merge equals on-the-fly, unmerge restores the base exactly; the peft-made golden gives diffusers' UNet."""
from __future__ import annotations

import numpy as np
import pytest

from ldm_jax.pipeline import load_pretrained

ARGS = dict(sampler="euler", schedule="karras", steps=2, guidance_scale=3.0, height=32, width=32, seed=1, output="float")


@pytest.fixture(scope="module")
def pipe(goldens_dir):
    return load_pretrained(goldens_dir / "tiny_sd")


def test_scales_merge_unmerge(pipe, goldens_dir, tmp_path):
    from ldm_jax.interop import lora as lora_io

    golden = goldens_dir / "lora_peft.safetensors"
    base = pipe.generate(["a red circle"], **ARGS)
    name = pipe.load_lora(golden, scale=1.0)
    loras, _ = lora_io.load(golden, {"unet": pipe.lora_kwargs()["unet"], "text": pipe.lora_kwargs()["text"]})
    # a second LoRA: the same file with its text part only, as another adapter
    second = tmp_path / "text_only.safetensors"
    lora_io.save(second, {"text": loras["text"]}, pipe.lora_kwargs(), format="kohya")
    pipe.load_lora(second, name="text_only", scale=0.0)
    one = pipe.generate(["a red circle"], **ARGS)
    traces = pipe.trace_count
    pipe.set_lora_scale(name, 0.5)
    half = pipe.generate(["a red circle"], **ARGS)
    pipe.set_lora_scale("text_only", -1.0)
    mixed = pipe.generate(["a red circle"], **ARGS)
    assert pipe.trace_count == traces  # scales are traced arguments
    assert np.abs(one - base).max() > 1e-2 and np.abs(half - one).max() > 1e-3 and np.abs(mixed - half).max() > 1e-3
    pipe.set_lora_scale(name, 0.0)
    pipe.set_lora_scale("text_only", 0.0)
    np.testing.assert_allclose(pipe.generate(["a red circle"], **ARGS), base, atol=1e-6)  # scale 0 = the base
    pipe.set_lora_scale(name, 0.5)
    pipe.set_lora_scale("text_only", -1.0)
    before = {k: np.asarray(v).copy() for k, v in _leaves(pipe.params).items()}
    pipe.merge_loras()
    np.testing.assert_allclose(pipe.generate(["a red circle"], **ARGS), mixed, atol=1e-5)
    pipe.unmerge_loras()
    after = _leaves(pipe.params)
    assert all(np.array_equal(before[k], np.asarray(after[k])) for k in before)  # bit for bit
    np.testing.assert_array_equal(pipe.generate(["a red circle"], **ARGS), mixed)
    pipe.remove_lora(name)
    pipe.remove_lora("text_only")
    np.testing.assert_array_equal(pipe.generate(["a red circle"], **ARGS), base)


def _leaves(tree):
    from ldm_jax.interop.common import flatten

    return flatten({k: v for k, v in tree.items() if k in ("unet", "text")})
