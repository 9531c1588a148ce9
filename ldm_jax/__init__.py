"""ldm_jax: Latent Diffusion Models (Stable Diffusion family) in JAX/Flax."""

__version__ = "0.1.0"
