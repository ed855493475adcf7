"""Stage-2 retargeter: shapes, token kinds, frame -> latent-frame mapping, whole-clip attention,
where reference information may reach the output (mask-token bottleneck vs self-attention)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from im_anim_jax.models import retargeter as rt

B, T, N, C, GRID, C_REF = 2, 5, 4, 3, (2, 3), 12
P = GRID[0] * GRID[1]


def _model(**kw):
    args = dict(width=16, depth=1, num_heads=2, out_dim=8)
    args.update(kw)
    return rt.Retargeter(**args)


def _inputs(seed=0):
    km, kr = jax.random.split(jax.random.key(seed))
    return jax.random.normal(km, (B, T, N, C)), jax.random.normal(kr, (B, P, C_REF))


@functools.cache
def _apply(mode="mask_token", output_frames="latent"):
    """One jitted apply per variant (params do not depend on `output_frames`)."""
    model = _model(mode=mode, output_frames=output_frames)
    return jax.jit(lambda p, m, r: model.apply(p, m, r, GRID))


@pytest.fixture(scope="module")
def params():
    """Unboxed params per mode, initialised once."""
    motion, ref = _inputs()
    return {mode: nn.unbox(jax.jit(lambda k, m, r, mode=mode: _model(mode=mode).init(
        k, m, r, GRID))(jax.random.key(1), motion, ref)) for mode in rt.MODES}


def test_frame_to_latent_frame_mapping_and_inverse():
    assert [rt.num_latent_frames(t) for t in (1, 5, 9, 81)] == [1, 2, 3, 21]
    for bad in (0, 2, 4, 80):
        with pytest.raises(ValueError, match="4n \\+ 1"):
            rt.num_latent_frames(bad)
    t = np.arange(81)
    k, s = rt.frames_to_latent_frames(t)
    assert (k[0], s[0]) == (0, 0)
    np.testing.assert_array_equal(k[1:5], 1)           # frames 1..4 -> latent frame 1
    np.testing.assert_array_equal(s[1:5], [0, 1, 2, 3])
    assert k[-1] == rt.num_latent_frames(81) - 1 and s[-1] == 3
    np.testing.assert_array_equal(rt.latent_frames_to_frames(k, s), t)
    with pytest.raises(ValueError, match="slot"):
        rt.latent_frames_to_frames(0, 1)
    with pytest.raises(ValueError, match=">= 0"):
        rt.frames_to_latent_frames(-1)
    layout = rt.frame_layout(9, "latent")
    np.testing.assert_allclose(layout.times, [0.0, 2.5, 6.5])  # mean video frame of each group
    video = rt.frame_layout(6, "video")
    assert video.slots == 1 and np.array_equal(video.output, np.arange(6))


@pytest.mark.parametrize("mode", rt.MODES)
def test_shapes_params_and_logical_axes(mode, params, tiny_config):
    motion, ref = _inputs()
    for output_frames, t_out in (("latent", 2), ("video", T)):
        out = _apply(mode, output_frames)(params[mode], motion, ref)
        assert out.shape == (B, t_out, P, 8) and out.dtype == jnp.float32
    boxed = jax.eval_shape(lambda k: _model(mode=mode).init(k, motion, ref, GRID),
                           jax.random.key(0))["params"]
    assert boxed["token_type_embedding"].value.shape == (2, 16)        # motion, reference
    assert boxed["motion_index_embedding"].value.shape == (N, 16)
    assert ("mask_token" in boxed) == (mode == "mask_token")
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)
    names = {n for x in leaves for n in x.names if n is not None}
    assert names <= set(dict(tiny_config.mesh.rules))
    assert boxed["transformer"]["blocks"]["attn"]["in_proj"]["kernel"].names[0] == "layers"


def test_bad_inputs_raise(params):
    motion, ref = _inputs()
    p = params["mask_token"]
    with pytest.raises(ValueError, match="Hp \\* Wp == P"):
        _model().apply(p, motion, ref, (2, 2))
    with pytest.raises(ValueError, match="4n \\+ 1"):
        _model().apply(p, motion[:, :4], ref, GRID)
    with pytest.raises(ValueError, match="mode"):
        _model(mode="cross").apply(p, motion, ref, GRID)
    with pytest.raises(ValueError, match="must be even"):
        _model(width=17, num_heads=1).init(jax.random.key(0), motion, ref, GRID)


def test_token_order_matters_within_each_kind(params):
    """Motion tokens carry their index, reference tokens their patch position."""
    motion, ref = _inputs()
    apply, p = _apply(), params["mask_token"]
    out = apply(p, motion, ref)
    assert not np.allclose(apply(p, motion[:, :, ::-1], ref), out, atol=1e-4)
    assert not np.allclose(apply(p, motion, ref[:, ::-1]), out, atol=1e-4)


@pytest.mark.parametrize("mode", rt.MODES)
def test_attention_spans_the_whole_clip(mode, params):
    """Changing the LAST frame's motion tokens changes the FIRST output frame."""
    motion, ref = _inputs()
    apply, p = _apply(mode), params[mode]
    diff = np.abs(np.asarray(apply(p, motion.at[:, -1].add(1.0), ref) - apply(p, motion, ref)))
    assert diff[:, 0].max() > 1e-4   # latent frame 0 = video frame 0 only


def _zero_attention(params):
    """Params with every attention output projection zeroed: tokens no longer exchange anything."""
    blocks = params["params"]["transformer"]["blocks"]
    out_proj = {k: jnp.zeros_like(v) for k, v in blocks["attn"]["out_proj"].items()}
    blocks = dict(blocks, attn=dict(blocks["attn"], out_proj=out_proj))
    return {"params": dict(params["params"], transformer={"blocks": blocks})}


@pytest.mark.parametrize("mode", rt.MODES)
def test_reference_reaches_mask_tokens_only_through_attention(mode, params):
    """Mask-token mode: without attention the output ignores the reference entirely (no residual
    path from T_ref to M_ret). Self-attention baseline: each output patch still carries its own
    reference patch (and only that one) straight through the residual stream."""
    motion, ref = _inputs()
    moved = ref.at[:, 0].add(3.0)                 # change reference patch 0 only
    apply, p = _apply(mode), _zero_attention(params[mode])
    diff = np.abs(np.asarray(apply(p, motion, moved) - apply(p, motion, ref)))
    if mode == "mask_token":
        assert diff.max() == 0.0
    else:
        assert diff[:, :, 0].min() > 0 and diff[:, :, 1:].max() == 0.0


@pytest.mark.parametrize("mode", rt.MODES)
def test_each_output_depends_only_on_its_own_reference(mode, params):
    """References shuffled across the batch: every example's output equals running it alone
    with its own (motion, reference) pair; no information crosses examples."""
    motion, ref = _inputs()
    apply, p = _apply(mode), params[mode]
    perm = np.array([1, 0])
    batched = apply(p, motion, ref[perm])
    for i in range(B):
        alone = apply(p, motion[i:i + 1], ref[perm[i]:perm[i] + 1])
        np.testing.assert_allclose(batched[i:i + 1], alone, atol=1e-5)
    assert not np.allclose(batched, apply(p, motion, ref), atol=1e-4)


def test_joint_head_reads_each_video_frame_from_its_latent_frame():
    head = rt.JointHead(num_joints=3, width=16, depth=1, num_heads=2, joint_dim=6)
    m_ret = jax.random.normal(jax.random.key(2), (B, 3, P, 8))           # 9 frames -> 3 latent
    run = jax.jit(lambda p, x: head.apply(p, x, GRID, 9))
    params = nn.unbox(jax.jit(lambda k, x: head.init(k, x, GRID, 9))(jax.random.key(0), m_ret))
    out = run(params, m_ret)
    assert out.shape == (B, 9, 3, 6)
    diff = np.abs(np.asarray(run(params, m_ret.at[:, 1].add(1.0)) - out)).max(axis=(0, 2, 3))
    assert diff[0] == 0 and np.all(diff[1:5] > 0) and np.all(diff[5:] == 0)
    assert not np.allclose(out[:, 1], out[:, 2], atol=1e-4)   # frames of one group differ (slots)
    with pytest.raises(ValueError, match="output frames"):
        head.apply(params, m_ret, GRID, 5)


def test_positions_do_not_drown_the_content():
    """The regression behind stage 2 ignoring the motion (docs/experiments.md, stage 2): at the
    demo's width, fixed sinusoids of norm ~8 against ~3 for a motion token's content made every
    token at a position look alike, and every mask query alike across the 2x2 grid. After
    ln_pre, at init:
    two different motion-token sets at the same positions have mean cosine 0.55 (0.94 with the
    old positions) and mask queries of different patches 0.47 (0.98 before); both must stay
    below 0.75."""
    t, n, c, grid = 5, 32, 12, (2, 2)
    model = rt.Retargeter(width=128, depth=1, num_heads=4, out_dim=128)
    keys = jax.random.split(jax.random.key(0), 4)
    unit = lambda k: jax.random.normal(k, (1, t, n, c)) / np.sqrt(c)  # noqa: E731  (VQ: l2 ~1)
    m1, m2, ref = unit(keys[0]), unit(keys[1]), jax.random.normal(keys[2], (1, 4, 192))
    variables = model.init(keys[3], m1, ref, grid)

    def ln_pre(m):
        _, state = model.apply(variables, m, ref, grid,
                               capture_intermediates=lambda mdl, _: mdl.name == "ln_pre")
        return np.asarray(state["intermediates"]["ln_pre"]["__call__"][0][0])

    def cos(x, y):
        return np.sum(x * y, -1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))

    a, b = ln_pre(m1), ln_pre(m2)
    motion_cos = cos(a[:t * n], b[:t * n]).mean()
    queries = a[t * n + 4:].reshape(2, 4, -1)                  # 2 latent frames x 4 patches
    patch_cos = np.mean([cos(queries[f, i], queries[f, j])
                         for f in range(2) for i in range(4) for j in range(i + 1, 4)])
    assert motion_cos < 0.75, f"motion tokens at one position look alike: cosine {motion_cos:.3f}"
    assert patch_cos < 0.75, f"mask queries of different patches look alike: {patch_cos:.3f}"
