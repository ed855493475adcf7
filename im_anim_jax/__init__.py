"""IM-Animation in JAX/Flax: 1D motion tokens, mask-token retargeting, Wan2.2 generation."""
__version__ = "0.1.0"
