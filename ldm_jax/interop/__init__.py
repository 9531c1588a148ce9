"""ldm_jax.interop."""
