"""Conv motion-encoder baseline: token grid shape/order, logical axes, config wiring, errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from im_anim_jax.models.conv_motion_encoder import (
    ConvMotionEncoder,
    build_conv_motion_encoder,
    num_groups,
)


def _init_apply(model, pixels):
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), pixels))
    return params, jax.jit(model.apply)(params, pixels)


def _grid_response(model, params, base, bumped):
    """Per-token L1 change of the tokens when `base` frames become `bumped` (one jitted call)."""
    both = jax.jit(model.apply)(params, jnp.concatenate([base, bumped]))
    return np.abs(np.asarray(both[1] - both[0])).sum(-1)


def test_tiny_config_shapes_and_dtype(tiny_config):
    m = tiny_config.model
    model = build_conv_motion_encoder(m)
    assert model.channels == tuple(m.conv_motion_encoder.channels) and model.stride == 4
    pixels = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
    _, tokens = _init_apply(model, pixels)
    assert tokens.shape == (2, 8 * 8, m.conv_motion_encoder.features)
    assert tokens.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(tokens)))


def test_bfloat16_compute_returns_float32():
    model = ConvMotionEncoder(channels=(8,), features=4, dtype=jnp.bfloat16)
    _, tokens = _init_apply(model, jnp.zeros((1, 8, 8, 3)))
    assert tokens.shape == (1, 16, 4) and tokens.dtype == jnp.float32


def test_tokens_are_the_grid_flattened_row_major():
    """Non-square frames (grid 8 x 16): a bright patch in the top-right corner moves the tokens
    of the top-right grid cells most, read with index = row * 16 + col. (GroupNorm statistics are
    per frame, so every token moves a little; the local change dominates.)"""
    model = ConvMotionEncoder(channels=(8, 16), features=8)
    h, w, s = 32, 64, 4
    base = jax.random.uniform(jax.random.key(2), (1, h, w, 3)) * 0.1
    bumped = base.at[:, :4, -4:, :].set(1.0)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), base))
    delta = _grid_response(model, params, base, bumped)
    assert delta.shape == ((h // s) * (w // s),)
    row, col = divmod(int(np.argmax(delta)), w // s)
    assert row <= 1 and col >= w // s - 2, (row, col)
    grid = delta.reshape(h // s, w // s)
    assert grid[:2, -2:].mean() > 3 * grid[-2:, :2].mean()


def test_every_param_has_logical_axes(tiny_config):
    model = build_conv_motion_encoder(tiny_config.model)
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for x in leaves:
        assert len(x.names) == x.value.ndim
    names = {n for x in leaves for n in x.names if n is not None}
    rules = dict(tiny_config.mesh.rules)
    assert names <= set(rules), f"logical axes without a mesh rule: {names - set(rules)}"
    # 2 levels x (down conv + norm, conv + norm) + the 1x1 projection.
    assert set(boxed) == {"level_0_down", "level_0_down_norm", "level_0_conv", "level_0_conv_norm",
                          "level_1_down", "level_1_down_norm", "level_1_conv", "level_1_conv_norm",
                          "proj"}
    assert boxed["proj"]["kernel"].names == (None, None, "conv_in", "embed")
    assert boxed["level_0_down_norm"]["scale"].names == ("conv_out",)


def test_frames_not_divisible_by_stride_raise():
    model = ConvMotionEncoder(channels=(8, 16), features=8)
    with pytest.raises(ValueError, match="divisible by 4"):
        model.init(jax.random.key(0), jnp.zeros((1, 30, 32, 3)))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))


def test_num_groups_divides_width():
    assert [num_groups(w) for w in (3, 8, 16, 48, 64, 512)] == [3, 8, 16, 24, 32, 32]
    with pytest.raises(ValueError):
        num_groups(0)
