"""Face crops, expression encoder, latent-frame grouping and expression blocks."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import synthetic as syn
from im_anim_jax import skeleton as sk
from im_anim_jax.models import expression as ex

HEAD = [sk.JOINT_INDEX[n] for n in ("nose", "r_eye", "l_eye", "r_ear", "l_ear")]


def _head_radius(ident, size):
    return ident["scale"] * size * syn._HEAD_R * ident["shape_params"][syn._SP["head_size"]]


def _skin_fraction(crops, skin):
    return np.mean(np.abs(np.asarray(crops) - skin).max(-1) < 0.1)


@pytest.mark.parametrize("framing,size", [("half", 64), ("full", 96)])
def test_face_boxes_and_crops_on_rendered_faces(framing, size):
    ident = syn.sample_identity(np.random.default_rng([5, size]), framing=framing, image_size=size)
    frames, kpts = syn.render_clip(ident, syn.make_motion(0, 3), 5, size)
    center, half = jax.jit(ex.face_boxes, static_argnums=1)(kpts, size)
    assert center.shape == (5, 2) and half.shape == (5,)
    r_head = _head_radius(ident, size)
    assert np.all((half > 1.0 * r_head) & (half < 2.5 * r_head)), (half, r_head)
    inside = np.abs(kpts[:, HEAD, :2] - np.asarray(center)[:, None]) < np.asarray(half)[:, None,
                                                                                          None]
    assert inside.all()
    video = jnp.asarray(frames[None], jnp.float32) / 255
    crop = jax.jit(ex.crop_faces, static_argnums=2)
    crops = crop(video, kpts[None], 32)
    assert crops.shape == (1, 5, 32, 32, 3)
    skin = ident["colors"]["skin"]
    # the face crop shows skin; the same measure on a crop beside the face finds little
    away = kpts.copy()
    away[..., 0] += 3 * np.asarray(half)[:, None]
    near, far = _skin_fraction(crops, skin), _skin_fraction(crop(video, away[None], 32), skin)
    assert near > 0.1 and far < 0.3 * near, (near, far)


def test_face_boxes_fallbacks():
    kp = np.zeros((3, sk.NUM_JOINTS, 3), np.float32)
    kp[:, sk.JOINT_INDEX["neck"]] = (20.0, 30.0, 1.0)
    kp[0, HEAD] = [(18, 10, 1), (16, 8, 1), (20, 8, 1), (14, 9, 0.1), (22, 9, 1)]
    kp[2, sk.JOINT_INDEX["neck"], 2] = 0.0                       # no face, no neck
    center, half = jax.jit(ex.face_boxes, static_argnums=1)(kp, (40, 50))
    present = np.array([(18, 10), (16, 8), (20, 8), (22, 9)], np.float32)
    np.testing.assert_allclose(center[0], present.mean(0), atol=1e-5)
    assert half[0] >= 1.3 * np.linalg.norm(present - present.mean(0), axis=-1).max() - 1e-4
    np.testing.assert_allclose(center[1], (20.0, 30.0 - 0.12 * 40), atol=1e-5)
    np.testing.assert_allclose(half[1], 0.12 * 40, atol=1e-5)
    np.testing.assert_allclose(center[2], (24.5, 19.5))
    np.testing.assert_allclose(half[2], 25.0)
    with pytest.raises(ValueError, match="keypoints"):
        ex.face_boxes(kp[..., :2], 40)


def test_crop_faces_exact_resampling_and_gradient():
    rng = np.random.default_rng(0)
    frames = jnp.asarray(rng.random((2, 3, 16, 16, 3)), jnp.float32)
    kp = np.zeros((2, 3, sk.NUM_JOINTS, 3), np.float32)          # nothing found: whole image
    crop = jax.jit(ex.crop_faces, static_argnums=2)
    np.testing.assert_allclose(crop(frames, kp, 16), frames, atol=1e-6)
    kp[..., 0, :] = (8.0, 8.0, 1.0)                              # a nose alone: a small box
    weights = jnp.asarray(rng.random((2, 3, 8, 8, 3)), jnp.float32)
    grad = jax.jit(jax.grad(lambda f: jnp.sum(ex.crop_faces(f, kp, 8) * weights)))(frames)
    assert grad.shape == frames.shape and np.all(np.isfinite(grad))
    g = np.abs(np.asarray(grad)).sum(-1)
    assert np.all(g[:, :, 7:10, 7:10] > 0) and np.all(g[:, :, :4] == 0)
    with pytest.raises(ValueError, match="keypoints"):
        ex.crop_faces(frames, kp[:, :2], 8)


def _param_specs_complete(variables):
    specs = nn.get_partition_spec(variables)
    leaves = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(v, nn.Partitioned) for v in leaves)
    for spec, v in zip(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.P)), leaves):
        assert len(spec) == v.value.ndim
    return leaves


def test_expression_encoder_shapes_frames_independent_and_named():
    enc = ex.ExpressionEncoder(num_tokens=4, width=32, depth=2, num_heads=4, patch_size=8,
                               out_dim=24)
    crops = jax.random.uniform(jax.random.key(0), (2, 3, 32, 32, 3))
    variables = jax.jit(enc.init)(jax.random.key(1), crops)
    leaves = _param_specs_complete(variables)
    assert any("layers" in v.names for v in leaves)              # the scanned stack
    params, apply = nn.unbox(variables), jax.jit(enc.apply)
    z = apply(params, crops)
    assert z.shape == (2, 3, 4, 24) and z.dtype == jnp.float32
    z2 = apply(params, crops.at[1, 2].set(0.0))
    changed = np.abs(np.asarray(z2 - z)).max((2, 3)) > 1e-6
    np.testing.assert_array_equal(changed, [[False] * 3, [False, False, True]])
    with pytest.raises(ValueError, match="patch_size"):
        enc.apply(params, crops[:, :, :30, :30])


def test_latent_frame_tokens_grouping():
    b, t, n, d = 2, 9, 3, 2
    # token value = 100 * frame + 10 * token index + batch
    tok = (100 * np.arange(t)[None, :, None, None] + 10 * np.arange(n)[None, None, :, None]
           + np.arange(b)[:, None, None, None]) * np.ones((b, t, n, d))
    out = np.asarray(ex.latent_frame_tokens(jnp.asarray(tok)))
    assert out.shape == (b, 3, 4 * n, d)
    frame_of = out[..., 0] // 100
    np.testing.assert_array_equal(frame_of[0], [[0] * 12, [1] * 3 + [2] * 3 + [3] * 3 + [4] * 3,
                                                [5] * 3 + [6] * 3 + [7] * 3 + [8] * 3])
    np.testing.assert_array_equal(out[1, 2, 3:6], tok[1, 6])
    np.testing.assert_array_equal(out[:, 0, 9:], tok[:, 0])
    assert ex.latent_frame_tokens(jnp.asarray(tok[:, :1])).shape == (b, 1, 4 * n, d)
    for bad in (8, 6):
        with pytest.raises(ValueError, match="1 \\+ 4\\*m"):
            ex.latent_frame_tokens(jnp.asarray(tok[:, :bad]))


@pytest.fixture(scope="module")
def block_setup():
    """(jitted apply, boxed variables, x, expr, tokens per frame) of a small ExpressionBlock."""
    b, f, hw, dim, m, dim_e = 2, 3, 4, 32, 5, 24
    kx, ke, ki = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (b, f * hw, dim))
    expr = jax.random.normal(ke, (b, f, m, dim_e))
    block = ex.ExpressionBlock(num_heads=4)
    variables = jax.jit(block.init)(ki, x, expr)
    return jax.jit(block.apply), variables, x, expr, hw


def test_expression_block_identity_at_init_and_named(block_setup):
    apply, variables, x, expr, _ = block_setup
    _param_specs_complete(variables)
    params = nn.unbox(variables)
    assert set(params["params"]) == {"norm", "q", "k", "v", "norm_q", "norm_k", "o"}
    assert jnp.array_equal(apply(params, x, expr), x)
    o = params["params"]["o"]
    assert not np.any(o["kernel"]) and not np.any(o["bias"])
    perturbed = jax.tree.map(lambda a: a, params)
    perturbed["params"]["o"]["kernel"] = 0.1 * jax.random.normal(jax.random.key(3),
                                                                 o["kernel"].shape)
    assert not jnp.array_equal(apply(perturbed, x, expr), x)
    with pytest.raises(ValueError, match="latent frames"):
        apply(params, x[:, :-1], expr)


def test_expression_block_is_frame_local(block_setup):
    apply, variables, x, expr, hw = block_setup
    params = nn.unbox(variables)
    params["params"]["o"]["kernel"] = 0.1 * jax.random.normal(
        jax.random.key(4), params["params"]["o"]["kernel"].shape)
    y = apply(params, x, expr)
    y2 = apply(params, x, expr.at[:, 1].add(1.0))
    per_token = np.abs(np.asarray(y2 - y)).max(-1)               # [B, L]
    frame = np.arange(x.shape[1]) // hw
    assert np.all(per_token[:, frame == 1] > 1e-5)
    assert np.all(per_token[:, frame != 1] == 0)


def test_a_frame_without_expression_is_left_unchanged_by_a_trained_block(block_setup):
    """The reference latent frame gets all-zero expression tokens. With `o` (and the biases)
    trained, attending to keys and values that are only biases added the same learned offset to
    every token of that frame (max change 2.07 in a review); now it passes through untouched."""
    apply, variables, x, expr, hw = block_setup
    params = nn.unbox(variables)
    for name in ("o", "v"):
        params["params"][name] = jax.tree.map(
            lambda a, n=name: 0.1 * jax.random.normal(jax.random.key(len(n)), a.shape),
            params["params"][name])
    y = apply(params, x, expr.at[:, 0].set(0.0))
    frame = np.arange(x.shape[1]) // hw
    np.testing.assert_array_equal(np.asarray(y)[:, frame == 0], np.asarray(x)[:, frame == 0])
    assert np.all(np.abs(np.asarray(y - x))[:, frame != 0].max(-1) > 1e-5)
