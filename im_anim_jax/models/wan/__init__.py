"""Wan2.2 models in Flax Linen, parameter names following the official PyTorch state dicts so the
released checkpoints convert one to one (`im_anim_jax.convert`)."""
