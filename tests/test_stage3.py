"""Stage 3: zero-init identities of the control and expression branches, the flow-matching
inputs/loss, a tiny run that learns, generation in windows, the report and the animate CLI on
a real trained run."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import imageio.v3 as iio
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from im_anim_jax import generation, media, sampling
from im_anim_jax.models.wan import dit as dit_lib
from im_anim_jax.training import stage3
from im_anim_jax.training.metric_writer import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40  # conftest.TINY_STAGE3_STEPS


def _dit_inputs(cfg, key, frames=3, size=4, control=0, expression=None):
    k = jax.random.split(key, 5)
    b, pt, ph, pw = 2, *cfg.patch_size
    latents = jax.random.normal(k[0], (b, frames, size, size, cfg.in_dim))
    n = frames * (size // ph) * (size // pw)
    t = jax.random.uniform(k[1], (b, n)) * 1000
    context = jax.random.normal(k[2], (b, cfg.text_len, cfg.text_dim))
    ctrl = jax.random.normal(k[3], (b, n, pt * ph * pw * control)) if control else None
    expr = (jax.random.normal(k[4], (b, frames, *expression)) if expression else None)
    return latents, t, context, ctrl, expr


def _randomised_head(params, key):
    """Wan zero-initialises the head (every output 0 at init); random head weights make the
    identity checks below meaningful."""
    head = params["head"]["head"]
    kernel = 0.1 * jax.random.normal(key, head["kernel"].shape)
    return {**params, "head": {**params["head"], "head": {**head, "kernel": kernel}}}


def test_fresh_control_branch_is_bit_identical_to_the_base_dit(tiny_config):
    cfg = tiny_config.model.dit
    base = dit_lib.build_dit(cfg)
    wide = dit_lib.build_dit(cfg, control_dim=8)
    latents, t, context, control, _ = _dit_inputs(cfg, jax.random.key(0), control=8)
    params = _randomised_head(nn.unbox(base.init(jax.random.key(1), latents, t, context))[
        "params"], jax.random.key(3))
    want = base.apply({"params": params}, latents, t, context)
    assert float(jnp.std(want)) > 0.1
    widened = dit_lib.add_control_channels(params, 8)
    got = wide.apply({"params": widened}, latents, t, context, control)
    assert np.array_equal(np.asarray(got), np.asarray(want))  # bit for bit, fp32
    # A fresh init of the wide model also starts with a zero control slice.
    fresh = nn.unbox(wide.init(jax.random.key(2), latents, t, context, control))["params"]
    assert not np.any(np.asarray(fresh["patch_embedding"]["kernel"][..., cfg.in_dim:, :]))
    # ...and the control does act once its weights move.
    moved = jax.tree.map(lambda x: x, widened)
    moved["patch_embedding"]["kernel"] = widened["patch_embedding"]["kernel"].at[
        ..., cfg.in_dim:, :].set(0.1)
    assert not np.allclose(wide.apply({"params": moved}, latents, t, context, control), want)


def test_reference_control_puts_z_ref_on_every_generated_frame(tiny_config):
    from im_anim_jax.evaluation.stage3 import zero_control
    from im_anim_jax.models import stage3 as model_lib
    cfg = tiny_config.model
    motion, z = model_lib.motion_control_dim(cfg), cfg.dit.in_dim
    assert cfg.reference_control and model_lib.control_dim(cfg) == motion + z
    paper = cfg.copy_and_resolve_references()
    paper.reference_control = False
    assert model_lib.control_dim(paper) == motion
    b, f, h, w, c = 2, 3, 4, 6, 5
    k1, k2 = jax.random.split(jax.random.key(0))
    z_ref = jax.random.normal(k1, (b, 1, h, w, z))
    control = jax.random.normal(k2, (b, f * (h // 2) * (w // 2), 4 * c))
    out = model_lib.with_reference(control, z_ref, (1, 2, 2))
    assert out.shape == (b, control.shape[1], 4 * (c + z))
    # Token (f, row, column), then pixel (p, q) of the 2x2 patch, then channels (the DiT's order).
    pixels = np.asarray(out).reshape(b, f, h // 2, w // 2, 2, 2, c + z)
    np.testing.assert_array_equal(
        pixels[..., :c], np.asarray(control).reshape(b, f, h // 2, w // 2, 2, 2, c))
    assert not np.any(pixels[:, 0, ..., c:])  # latent frame 0 is the reference itself
    want = np.asarray(z_ref[:, 0]).reshape(b, h // 2, 2, w // 2, 2, z).transpose(0, 1, 3, 2, 4, 5)
    for frame in range(1, f):
        np.testing.assert_array_equal(pixels[:, frame, ..., c:], want)
    # control_zeroed removes M_ret's channels and keeps the reference's.
    kernel = jnp.ones((1, 2, 2, cfg.dit.in_dim + motion + z, 3))
    zeroed = zero_control({"dit": {"patch_embedding": {"kernel": kernel}}}, tiny_config)
    k = np.asarray(zeroed["dit"]["patch_embedding"]["kernel"])
    lo, hi = cfg.dit.in_dim, cfg.dit.in_dim + motion
    assert k[..., :lo, :].all() and not k[..., lo:hi, :].any() and k[..., hi:, :].all()


def test_x0_predictions_turn_the_same_dit_output_into_a_velocity(tiny_config):
    from im_anim_jax.models import stage3 as model_lib
    config = tiny_config.copy_and_resolve_references()
    (h, w), (_, ph, pw) = stage3.latent_size(config), config.model.dit.patch_size
    grid, f = (h // ph, w // pw), 1 + stage3.num_latent_frames(config.stage3.clip_frames)
    models = {}
    for prediction in ("velocity", "x0", "x0_residual"):
        config.model.dit_prediction = prediction
        models[prediction] = model_lib.build_stage3(config.model, grid)
    ref_dim = ph * pw * config.model.dit.in_dim
    params = nn.unbox(models["velocity"].init(
        jax.random.key(0), *stage3.dummy_inputs(config, ref_dim, grid))["params"])
    params["dit"] = _randomised_head(params["dit"], jax.random.key(1))
    k = jax.random.split(jax.random.key(2), 5)
    ex = config.model.expression
    latents = jax.random.normal(k[0], (2, f, h, w, config.model.dit.in_dim))
    t = jax.random.uniform(k[1], (2, f * grid[0] * grid[1])) * 1000
    t = t.at[:, :grid[0] * grid[1]].set(0.0)  # latent frame 0: the clean reference
    inputs = (latents, t, jax.random.normal(k[2], (2, config.model.dit.text_len,
                                                   config.model.dit.text_dim)),
              jax.random.normal(k[3], (2, t.shape[1], ph * pw * model_lib.motion_control_dim(
                  config.model))),
              jax.random.normal(k[4], (2, f, 4 * ex.num_tokens, ex.out_dim)))
    out = {p: np.asarray(m.apply({"params": params}, *inputs, method="velocity"))
           for p, m in models.items()}
    assert np.std(out["velocity"]) > 0.1  # the DiT's own output
    sigma = np.maximum(np.asarray(t) / 1000.0, model_lib.MIN_SIGMA).reshape(2, f, *grid)
    sigma = np.repeat(np.repeat(sigma, ph, axis=2), pw, axis=3)[..., None]
    np.testing.assert_allclose(out["x0"], (np.asarray(latents) - out["velocity"]) / sigma,
                               rtol=1e-5, atol=1e-5)
    x0 = out["velocity"] + np.asarray(latents)[:, :1]  # x0_residual: z_ref + the DiT's output
    np.testing.assert_allclose(out["x0_residual"], (np.asarray(latents) - x0) / sigma,
                               rtol=1e-5, atol=1e-5)
    # A sampler's exact noise levels (every other token above the floor, the rest under it)
    # are used as given above the floor (not t's integer rounding) and floored under it, as in
    # training: one call for both.
    level = jnp.where(jnp.arange(t.shape[1]) % 2, 0.3456, 0.02)
    exact = jnp.where(t > 0, level, 0.0)
    v = np.asarray(models["x0"].apply({"params": params}, *inputs, exact, method="velocity"))
    divisor = model_lib.token_sigma(jnp.broadcast_to(jnp.maximum(level, model_lib.MIN_SIGMA),
                                                     t.shape), latents.shape, (1, ph, pw))
    np.testing.assert_allclose(
        v[:, 1:], ((np.asarray(latents) - out["velocity"]) / np.asarray(divisor))[:, 1:],
        rtol=1e-4, atol=1e-4)


def test_fresh_expression_blocks_are_bit_identical_to_the_base_dit(tiny_config):
    cfg = tiny_config.model.dit.copy_and_resolve_references()
    cfg.num_layers = 4
    base = dit_lib.build_dit(cfg)
    grouped = dit_lib.build_dit(cfg, expression_every=2)
    latents, t, context, _, expr = _dit_inputs(cfg, jax.random.key(0), expression=(6, 12))
    params = _randomised_head(nn.unbox(base.init(jax.random.key(1), latents, t, context))[
        "params"], jax.random.key(3))
    want = base.apply({"params": params}, latents, t, context)
    assert float(jnp.std(want)) > 0.1
    fresh = nn.unbox(grouped.init(jax.random.key(2), latents, t, context, None, expr))["params"]
    assert fresh["blocks"]["layers"]["self_attn"]["q"]["kernel"].shape[:2] == (2, 2)
    params = dit_lib.group_layers(params, 2)
    params["blocks"]["expression"] = fresh["blocks"]["expression"]
    got = grouped.apply({"params": params}, latents, t, context, None, expr)
    assert np.array_equal(np.asarray(got), np.asarray(want))
    # The expression blocks act once their zero output projections move.
    moved = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 if "expression" in jax.tree_util.keystr(p) else x, params)
    assert not np.allclose(grouped.apply({"params": moved}, latents, t, context, None, expr),
                           want)
    # Every param carries logical axis names (the stacked layers included).
    boxed = grouped.init(jax.random.key(2), latents, t, context, None, expr)["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(x, nn.Partitioned) for x in leaves)


def test_dit_refuses_missing_or_misshapen_conditions(tiny_config):
    cfg = tiny_config.model.dit
    wide = dit_lib.build_dit(cfg, control_dim=8)
    latents, t, context, control, _ = _dit_inputs(cfg, jax.random.key(0), control=8)
    with pytest.raises(ValueError, match="control has shape None; expected"):
        wide.init(jax.random.key(1), latents, t, context)
    with pytest.raises(ValueError, match="control has shape"):
        wide.init(jax.random.key(1), latents, t, context, control[:, :-1])
    with pytest.raises(ValueError, match="not a multiple of expression_every"):
        dit_lib.build_dit(cfg, expression_every=3).init(jax.random.key(1), latents, t, context)


def test_flow_matching_inputs_and_loss_on_a_one_step_toy(tiny_config):
    cfg = tiny_config.stage3.copy_and_resolve_references()
    cfg.context_prob = 0.5
    x0 = jax.random.normal(jax.random.key(0), (64, 3, 2, 2, 4))
    z_ref = jnp.full((64, 1, 2, 2, 4), 7.0)
    latents, t, target, weight = stage3.flow_inputs(jax.random.key(1), x0, z_ref, cfg, 1)
    assert latents.shape == (64, 4, 2, 2, 4) and t.shape == (64, 4)
    assert np.all(np.asarray(latents[:, 0]) == 7.0) and np.all(np.asarray(t[:, 0]) == 0)
    held = np.asarray(weight[:, 0]) == 0
    assert 10 < held.sum() < 54 and np.all(np.asarray(weight[:, 1:]) == 1)  # only frame 0 held
    np.testing.assert_array_equal(np.asarray(latents[held, 1]), np.asarray(x0[held, 0]))
    assert np.all(np.asarray(t[held, 1]) == 0)
    # Noised frames lie on the line x_s = (1 - s) x0 + s eps with eps = target + x0.
    s = np.asarray(t[:, 2]) / 1000
    eps = np.asarray(target + x0)
    np.testing.assert_allclose(np.asarray(latents[:, 2]), (1 - s[:, None, None, None])
                               * np.asarray(x0[:, 1]) + s[:, None, None, None] * eps[:, 1],
                               atol=1e-5)
    # s is Wan's shifted timestep of the uniform draw (flow_inputs' first split key).
    u = jax.random.uniform(jax.random.split(jax.random.key(1), 3)[0], (64,))
    assert cfg.timestep_shift == 5.0
    np.testing.assert_allclose(np.asarray(t[:, 2]), 1000 * np.asarray(
        sampling.shift_timesteps(u, cfg.timestep_shift)), rtol=1e-5)
    # The loss: 0 at the true velocity, mean square of the target otherwise (held frames out).
    v_true = jnp.concatenate([jnp.zeros_like(z_ref), target], 1)
    assert float(stage3.flow_loss(v_true, target, weight)) == 0.0
    err = np.mean(np.square(np.asarray(target)), axis=(2, 3, 4))
    w = np.asarray(weight)
    np.testing.assert_allclose(float(stage3.flow_loss(jnp.zeros_like(latents), target, weight)),
                               (err * w).sum() / w.sum(), rtol=1e-5)
    # "x0" weighting: each frame's error times sigma^2 (that of the x0 the velocity implies).
    scale = stage3.loss_scale(t, "x0")
    np.testing.assert_allclose(np.asarray(scale), np.square(np.asarray(t[:, 1:]) / 1000),
                               rtol=1e-6)
    x0_weighted = float(stage3.flow_loss(jnp.zeros_like(latents), target, weight, scale))
    np.testing.assert_allclose(x0_weighted, (err * w * np.asarray(scale)).sum() / w.sum(),
                               rtol=1e-5)
    # ... which is the mean square error of the clean latent x_s - sigma v implies (here v = 0).
    x0_err = np.mean(np.square(np.asarray(latents[:, 1:] - x0)), axis=(2, 3, 4))
    np.testing.assert_allclose(x0_weighted, (x0_err * w).sum() / w.sum(), rtol=1e-4)
    assert np.all(np.asarray(stage3.loss_scale(t, "velocity")) == 1)
    with pytest.raises(ValueError, match="stage3.loss_weighting must be 'velocity'"):
        stage3.loss_scale(t, "snr")
    # One gradient step of a toy velocity model (v = a x) lowers the loss.
    def loss(a):
        return stage3.flow_loss(a * latents, target, weight)
    a = 0.0
    step = a - 0.5 * jax.grad(loss)(a)
    assert float(loss(step)) < float(loss(a))


def test_per_token_repeats_each_frame_value_over_its_tokens():
    """Training's t per DiT token: each latent frame's value on its consecutive tokens (f, h, w)."""
    t = stage3.per_token(jnp.asarray([[0.0, 10.0, 20.0], [1.0, 2.0, 3.0]]), 2)
    np.testing.assert_array_equal(np.asarray(t), [[0, 0, 10, 10, 20, 20], [1, 1, 2, 2, 3, 3]])


def test_sampling_window_gives_each_frame_value_to_its_tokens(tiny_config):
    """Generation's t and sigma per token: 0 on the held frames' tokens (reference and prefix),
    the step's value on each generated frame's consecutive tokens (several per frame)."""
    import types
    config = tiny_config.copy_and_resolve_references()
    config.sampling.update(dict(method="euler", steps=2, guidance=1.0))
    b, f, p = 1, 3, 2                            # latent frames, DiT tokens per frame
    calls = []

    def velocity(params, x, t, context, control, expression, sigma):
        calls.append((np.asarray(t), np.asarray(sigma)))
        return jnp.zeros_like(x)
    animator = types.SimpleNamespace(
        config=config, context=jnp.zeros((2, 4)), negative_context=jnp.zeros((2, 4)),
        _velocity=velocity, _expressions=lambda params, frames, kps: jnp.zeros((b, f, 5)))
    z_ref = jnp.ones((b, 1, 2, 2, 4))
    generation.Animator._sample_window(
        animator, None, [jax.random.key(0)], z_ref, jnp.zeros((b, f, p, 8)), None, None,
        jnp.ones((b, 1, 2, 2, 4)), False, "")  # prefix: latent frame 1 held
    sigmas, timesteps = sampling.schedule("euler", 2, config.sampling.shift)
    generated = np.array([0.0, 0.0, 1.0, 1.0])  # reference, prefix, then 2 generated frames
    assert len(calls) == 2
    for (t, sigma), s, ts in zip(calls, sigmas, timesteps):  # tokens [0 0 0 0 v v v v]
        np.testing.assert_allclose(t, [np.repeat(generated * ts, p)], rtol=1e-6)
        np.testing.assert_allclose(sigma, [np.repeat(generated * s, p)], rtol=1e-6)


def _frozen_step(config):
    """(state, jitted stage-3 step, batch of random pairs) on `config` with a fresh VAE."""
    from im_anim_jax import sharding, text
    from im_anim_jax.models.wan import vae
    from im_anim_jax.training import vae as vae_training
    config.stage3.batch_size = b = 2
    vae_model = vae.build_vae(config.model.vae, config.model.dtype, config.model.attention_impl)
    f = vae_model.space_factor
    encoder = vae_training.reference_encoder(config, vae_model, nn.unbox(vae_model.init(
        jax.random.key(1), jnp.zeros((1, 1, f, f, 3)))["params"]))
    model = stage3.build(config, encoder)
    tx = stage3.make_optimizer(config.stage3, stage3._trained(
        stage3.abstract_params(model, config, encoder.dim), config))
    mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
    state, _, state_sh = stage3.init_state(model, tx, config, mesh, encoder.dim)
    rng = np.random.default_rng(0)
    s, t, hm = (config.model.motion_tokenizer.image_size, config.stage3.clip_frames,
                config.model.joint_decoder.heatmap_size)
    batch = {"driving": rng.integers(0, 256, (b, t, s, s, 3), np.uint8),
             "driving_keypoints": np.concatenate([rng.uniform(0, s - 1, (b, t, 62, 2)),
                                                  np.ones((b, t, 62, 1))], -1).astype(np.float32),
             "heatmaps": rng.uniform(0, 1, (b, t, 62, hm, hm)).astype(np.float32),
             "joint_weights": np.ones((b, t, 62), np.float32),
             "reference": rng.integers(0, 256, (b, s, s, 3), np.uint8),
             "target": rng.integers(0, 256, (b, t, s, s, 3), np.uint8)}
    step = stage3.make_train_step(model, tx, config, mesh, rules, state_sh, encoder,
                                  jnp.asarray(text.context(config)))
    return state, step, batch


def test_frozen_groups_keep_their_params_and_get_no_optimizer_state(tiny_config):
    config = tiny_config.copy_and_resolve_references()
    config.stage3.frozen = ("motion_encoder", "joint_decoder")
    state, step, batch = _frozen_step(config)
    before = jax.tree.map(np.array, state.params)  # copies: the step donates the state
    for _ in range(2):  # the rate warms up from 0 over the first step
        state, _ = step(state, batch)
    for group in before:
        same = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)),
                                            before[group], jax.tree.map(np.asarray,
                                                                        state.params[group])))
        assert all(same) == (group in ("motion_encoder", "joint_decoder", "quantize")), group
    assert stage3.frozen(config) == ("quantize", "motion_encoder", "joint_decoder")
    assert set(stage3._trained(state.params, config)) == {
        "retargeter", "joint_head", "dit", "expression_encoder"}
    config.stage3.frozen = ("motion_encoders",)
    with pytest.raises(ValueError, match=r"unknown param groups \['motion_encoders'\]"):
        stage3.frozen(config)
    config.stage3.frozen = ("dit",)
    with pytest.raises(ValueError, match="may not hold 'dit'"):
        stage3.frozen(config)


def test_a_frozen_retarget_path_skips_its_loss_and_trains_the_same(tiny_config, monkeypatch):
    """With the whole stage-2 path frozen, L_retarget is a constant: the step leaves it out (and
    the heatmap decode) yet moves every trained param as the step that adds it does."""
    config = tiny_config.copy_and_resolve_references()
    config.stage3.frozen = stage3.RETARGET_PATH
    assert not stage3.retarget_loss_trains(config)
    runs = {}
    for with_loss in (False, True):
        monkeypatch.setattr(stage3, "retarget_loss_trains", lambda c, w=with_loss: w)
        state, step, batch = _frozen_step(config)
        for _ in range(2):  # the rate warms up from 0 over the first step
            state, metrics = step(state, batch)
        runs[with_loss] = jax.tree.map(np.array, stage3._trained(state.params, config)), metrics
    (skipped, m_skip), (full, m_full) = runs[False], runs[True]
    assert "retarget_loss" not in m_skip and float(m_full["retarget_loss"]) > 0
    assert float(m_full["loss"]) > float(m_skip["loss"])
    # fp32; measured max abs diff 0 here (the loss term's gradient is exactly zero)
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), skipped, full))
    assert max(diffs) <= 1e-6, max(diffs)
    monkeypatch.undo()
    config.stage3.frozen = stage3.RETARGET_PATH[1:]  # the motion encoder trains: the loss counts
    assert stage3.retarget_loss_trains(config)


def test_windows_cover_the_video_with_the_stated_overlap():
    assert generation.windows(5, 17, 5) == (5, [0])
    assert generation.windows(7, 17, 5) == (9, [0])
    assert generation.windows(17, 17, 5) == (17, [0])
    assert generation.windows(18, 17, 5) == (29, [0, 12])
    padded, starts = generation.windows(53, 17, 5)
    assert padded == 53 and starts == [0, 12, 24, 36]
    assert all(s % 4 == 0 for s in starts)
    with pytest.raises(ValueError, match="no frames"):
        generation.windows(0, 17, 5)


@pytest.fixture(scope="module")
def trained(tiny_stage3_copy):
    """conftest.tiny_stage3_copy: this module's copy of the tiny stage-3 run."""
    return tiny_stage3_copy


def test_stage3_learns(trained):
    _, workdir = trained
    rows = read_metrics(stage3.stage_dir(workdir))
    assert [r["step"] for r in rows] == list(range(10, STEPS + 1, 10))
    first, last = rows[0], rows[-1]
    # Measured (fixed seeds): flow loss 1.52 -> 1.12, retarget loss 0.0138 -> 0.0105.
    assert last["flow_loss"] < 0.9 * first["flow_loss"], (first, last)
    assert all(np.isfinite(r["loss"]) for r in rows)


def test_resuming_with_other_frozen_groups_is_refused_and_writes_nothing(trained, tiny_dataset,
                                                                         tree_digest):
    config, workdir = trained
    config = config.copy_and_resolve_references()
    config.stage3.steps = STEPS + 5
    config.stage3.frozen = ("motion_encoder",)
    before = tree_digest(stage3.stage_dir(workdir))
    with pytest.raises(ValueError, match=r"trained the param groups \[.*'motion_encoder'.*\], "
                       r"the config trains \[.*\] \(e\.g\. stage3\.frozen"):
        stage3.train(config, workdir, tiny_dataset, log=lambda _: None)
    assert tree_digest(stage3.stage_dir(workdir)) == before


def test_generation_in_windows_and_the_ema(trained):
    config, workdir = trained
    animator = generation.Animator.from_workdir(config, workdir)
    s = config.model.motion_tokenizer.image_size
    rng = np.random.default_rng(0)
    driving = rng.integers(0, 255, (11, s, s, 3), np.uint8)  # 3 windows of 5 with overlap 1
    reference = rng.random((s, s, 3), np.float32)
    calls, dit = [], animator._velocity
    animator._velocity = lambda p, x, t, ctx, *rest: calls.append(
        (np.asarray(t), np.asarray(ctx), np.asarray(rest[-1]))) or dit(p, x, t, ctx, *rest)
    video = animator(reference, driving, progress=False)
    assert video.shape == (11, s, s, 3) and video.min() >= 0 and video.max() <= 1
    # Wan2.2's schedule: the DiT gets integer timesteps (0 on held frames), the x0 conversion
    # the solver's exact sigmas; one call per step and window at guidance 1.
    sampling_cfg = config.sampling
    sigmas, timesteps = sampling.schedule(sampling_cfg.method, sampling_cfg.steps,
                                          sampling_cfg.shift)
    assert len(calls) == 3 * sampling_cfg.steps
    for i, (t, ctx, sigma) in enumerate(calls):
        k = i % sampling_cfg.steps
        assert set(np.unique(t)) == {0.0, float(timesteps[k])}
        np.testing.assert_allclose(np.unique(sigma), [0.0, sigmas[k]], rtol=1e-6)
        np.testing.assert_array_equal(ctx[0], np.asarray(animator.context))
    # Guidance: the unconditional pass gets the negative context (zeros without a file).
    calls.clear()
    animator.config = config.copy_and_resolve_references()
    animator.config.sampling.guidance = 2.0
    animator(reference, driving[:5], progress=False)
    assert len(calls) == 2 * sampling_cfg.steps
    assert not np.any(calls[1][1]) and np.array_equal(calls[0][1][0], animator.context)
    # Inputs it cannot read are refused before any DiT call, naming what was wrong.
    calls.clear()
    for bad, message in ((driving.astype(np.uint16), "driving video has dtype uint16"),
                         (driving.astype(np.float32), r"float frames must lie in \[0, 1\]"),
                         (driving[None], r"driving video has shape \(1, 11, .*; expected "
                                         r"\(T >= 1,")):
        with pytest.raises(ValueError, match=message):
            animator(reference, bad, progress=False)
    with pytest.raises(ValueError, match=r"driving keypoints have shape \(10, 62, 3\); "
                                         r"expected \(11, 62, 3\)"):
        animator(reference, driving, progress=False, keypoints=np.zeros((10, 62, 3)))
    assert not calls
    animator.config, animator._velocity = config, dit
    again = animator(reference, driving, progress=False)
    np.testing.assert_array_equal(video, again)  # seeded
    other = animator(reference, driving, progress=False, seed=1)
    assert not np.array_equal(video, other)
    # Element i of a batch samples with seed + i: a clip's video does not depend on its batch
    # (before, the batch's noise was one draw, so eval.batch_size changed the evaluated videos).
    refs, drvs = np.stack([reference, reference[::-1]]), np.stack([driving[:5], driving[5:10]])
    batched = animator.generate(refs, drvs, seed=3)
    alone = [animator.generate(refs[i:i + 1], drvs[i:i + 1], seed=3 + i)[0] for i in range(2)]
    np.testing.assert_allclose(batched, np.stack(alone), atol=1e-4)
    # The EMA (ema_decay 0.9) is what generation uses, and it differs from the raw params.
    # Generation follows the checkpoint: its EMA under a config without one too.
    from im_anim_jax.training import checkpointing
    raw = stage3.load_params(config.copy_and_resolve_references(), workdir,
                             animator.encoder)[1]
    config_no_ema = config.copy_and_resolve_references()
    config_no_ema.stage3.ema_decay = 0.0
    jax.tree.map(np.testing.assert_array_equal, raw,
                 stage3.load_params(config_no_ema, workdir, animator.encoder)[1])
    abstract = stage3.abstract_params(animator.model, config, animator.encoder.dim)
    plain = checkpointing.restore_checked_params(stage3.stage_dir(workdir), abstract, "stage-3",
                                                 "")[0]
    diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), raw["dit"], plain["dit"])
    assert max(jax.tree.leaves(diff)) > 0
    # Read alone (not the Adam moments beside it), the EMA is the one in the whole train state.
    from im_anim_jax.training import state as train_state
    trained = stage3._trained(abstract, config)
    tx = stage3.make_optimizer(config.stage3, trained)
    whole = train_state.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract,
                                   opt_state=jax.eval_shape(tx.init, trained),
                                   rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    ckpt = checkpointing.Checkpointer(stage3.stage_dir(workdir), async_save=False)
    restored = ckpt.restore(ckpt.latest_step(), checkpointing.abstract_like(
        whole, jax.tree.map(lambda _: device, whole)))
    ckpt.close()
    jax.tree.map(np.testing.assert_array_equal, {k: raw[k] for k in trained},
                 stage3.ema_params(restored.opt_state))
    with pytest.raises(ValueError, match="driving video has shape"):
        animator(reference, driving[:, :4])
    with pytest.raises(ValueError, match=rf"driving videos have shape \(1, 11, {s}, 4, 3\); "
                                         rf"expected \(B, T >= 1, {s}, {s}, 3\)"):
        animator.generate(reference[None], driving[None, :, :, :4])


def test_stage3_report(trained, tiny_dataset):
    from im_anim_jax.evaluation import stage3 as stage3_eval
    config, workdir = trained
    config = config.copy_and_resolve_references()
    config.data.path = tiny_dataset
    result = stage3_eval.evaluate(config, workdir, tiny_dataset)
    with open(os.path.join(workdir, "eval", "stage3.json")) as f:
        assert json.load(f) == json.loads(json.dumps(result))
    for key in ("psnr_star", "ssim", "motion_pck@0.05", "motion_pck@0.1"):
        assert np.isfinite(result[key])
        for b in ("reference_repeated", "control_zeroed"):
            assert np.isfinite(result["baselines"][b][key])
        assert np.isfinite(result["ceilings"]["vae_reconstruction"][key])
    assert result["pairs"] == config.eval.stage3_pairs
    drift = result["drift"]
    assert len(drift["window_psnr_star"]) == len(drift["window_starts"]) == 4
    assert os.path.isfile(os.path.join(workdir, "eval", "stage3.png"))
    videos = os.listdir(os.path.join(workdir, "eval", "stage3_videos"))
    assert "long_clip.mp4" in videos and "pair000.mp4" in videos


def test_drift_scores_each_window_on_the_frames_it_adds(tiny_config, tiny_dataset, tmp_path,
                                                        monkeypatch):
    """The frames a later window shares with the one before are that one's output: spoiling them
    must lower the earlier window's figure, not the later one's. The long clip's held-out
    identities and motion are those of the evaluated data, whatever config.data.synthetic says."""
    from im_anim_jax.evaluation import stage3 as stage3_eval
    from im_anim_jax.metrics import image as image_metrics
    config = tiny_config.copy_and_resolve_references()
    _, reference, truth, _ = stage3_eval.long_clip(config, tiny_dataset)
    other = config.copy_and_resolve_references()
    other.data.synthetic.update(dict(num_train_identities=1, num_train_motions=1, seed=7))
    np.testing.assert_array_equal(stage3_eval.long_clip(other, tiny_dataset)[2], truth)
    clip, overlap = config.stage3.clip_frames, config.sampling.overlap_frames
    _, starts = generation.windows(len(truth), clip, overlap)
    video = truth.astype(np.float32) / 255.0
    shared = slice(starts[1], starts[1] + overlap)  # window 0's output, inside window 1's span
    video[shared] = 1.0 - video[shared]

    class Made:
        def generate(self, *args, **kwargs):
            return video[None]
    monkeypatch.setattr(stage3_eval, "motion_hits", lambda *a: ({0.1: 1.0}, 1.0))
    drift = stage3_eval.drift_figures(config, Made(), tiny_dataset, str(tmp_path))
    identical = float(image_metrics.psnr_star(video[:1], video[:1])[0])
    assert drift["window_psnr_star"][0] < identical
    assert drift["window_psnr_star"][1:] == [identical] * (len(starts) - 1)


def test_animate_cli_on_a_trained_run(trained, tmp_path):
    config, workdir = trained
    s = config.model.motion_tokenizer.image_size
    rng = np.random.default_rng(0)
    iio.imwrite(tmp_path / "ref.png", rng.integers(0, 255, (2 * s, 3 * s, 3), np.uint8))
    media.write_video(str(tmp_path / "drv.mp4"), rng.integers(0, 255, (7, s, s, 3), np.uint8),
                      fps=10)
    out = tmp_path / "out.mp4"
    args = [sys.executable, "-m", "im_anim_jax.animate", "--config=configs/im_animation.py:tiny",
            f"--workdir={workdir}", f"--image={tmp_path / 'ref.png'}",
            f"--driving={tmp_path / 'drv.mp4'}", f"--out={out}"]
    overrides = [f"--config.stage3.ema_decay={config.stage3.ema_decay}"]
    res = subprocess.run(args + overrides, capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    frames, fps = media.read_video(str(out), s)
    assert frames.shape == (7, s, s, 3) and abs(fps - 10) < 0.5
    assert os.path.isfile(tmp_path / "out_preview.mp4")
    # A checkpoint of another architecture: one clear line, exit 2, nothing written.
    out2 = tmp_path / "out2.mp4"
    res = subprocess.run(args[:-1] + [f"--out={out2}", "--config.model.dit.num_layers=4"]
                         + overrides, capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and "different architecture" in res.stderr, res.stderr
    assert not out2.exists() and not (tmp_path / "out2_preview.mp4").exists()


def test_converted_dit_loads_as_float32_and_a_missing_param_is_named(tmp_path, tiny_config):
    """model.dit.init_from: a bf16 checkpoint (as `convert` keeps a bf16 source) becomes fp32
    master params with the same values; one lacking a param is refused, not silently left at init."""
    import flax
    import ml_dtypes
    import orbax.checkpoint as ocp

    from im_anim_jax.convert import wan_dit
    config = tiny_config.copy_and_resolve_references()  # it sets dit.init_from: not the shared one
    rng = np.random.default_rng(0)
    base = jax.tree.map(lambda x: (0.1 * rng.normal(size=x.shape)).astype(ml_dtypes.bfloat16),
                        wan_dit.abstract_params(config.model.dit))

    def write(name, params):
        dst = tmp_path / name
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(dst / "params", params)
        (dst / "meta.json").write_text(json.dumps({"kind": "wan-dit"}))
        return str(dst)

    h, w = stage3.latent_size(config)
    model = stage3.stage3_model.build_stage3(config.model, (h // 2, w // 2))
    abstract = stage3.abstract_params(model, config, 4 * config.model.vae.z_dim)["dit"]
    config.model.dit.init_from = write("full", base)
    loaded = flax.traverse_util.flatten_dict(stage3.load_converted_dit(config, abstract))
    assert {str(v.dtype) for v in loaded.values()} == {"float32"}
    head = ("head", "head", "kernel")
    np.testing.assert_array_equal(loaded[head], np.asarray(base["head"]["head"]["kernel"],
                                                           np.float32))
    config.model.dit.init_from = write("headless", {k: v for k, v in base.items() if k != "head"})
    with pytest.raises(ValueError, match="lacks .* params of config.model.dit, e.g. head/"):
        stage3.load_converted_dit(config, abstract)


@pytest.mark.parametrize("layout", ["guarded", "before_the_guard"])
def test_ema_is_read_alone_from_either_optimizer_state_layout(tmp_path, layout):
    """The EMA comes out of a checkpoint by itself (a partial restore), from the optimizer state
    inside the non-finite guard or, as written before the guard existed, bare."""
    import ml_collections

    from im_anim_jax.training import checkpointing
    from im_anim_jax.training import state as train_state
    cfg = ml_collections.ConfigDict(dict(lr_dit=1e-3, lr_other=1e-3, schedule="constant",
                                         warmup_steps=0, steps=10, weight_decay=0.01,
                                         grad_clip=1.0, ema_decay=0.9))
    params = {"dit": {"a": {"kernel": jnp.arange(12.0).reshape(3, 4)}},
              "other": {"b": {"bias": jnp.full((4,), 2.0)}}}
    tx = stage3.make_optimizer(cfg, params)
    opt = tx.init(params)
    state = train_state.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                   opt_state=opt if layout == "guarded" else opt.inner_state,
                                   rng=jnp.zeros((2,), jnp.uint32))
    ckpt = checkpointing.Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(1, state, None, {})
    ckpt.wait()
    ckpt.close()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    got = stage3._restore_ema(str(tmp_path), 1, abstract, abstract, tx)
    jax.tree.map(np.testing.assert_array_equal, got, stage3.ema_params(opt))


def test_generation_loads_under_the_maths_and_the_ema_that_trained(tiny_config, tmp_path):
    """A checkpoint of dit_prediction="x0" is refused under "velocity" (its output would be read
    as a velocity), and its EMA is what generation uses whatever this config's ema_decay (before,
    ema_decay=0 silently gave the raw params, and an EMA asked of a run without one a TypeError
    traceback)."""
    import types

    from im_anim_jax.training import checkpointing
    from im_anim_jax.training import state as train_state

    def save(config, workdir, ema_value):
        h, w = stage3.latent_size(config)
        ref = types.SimpleNamespace(grid=(h // 2, w // 2), dim=4 * config.model.vae.z_dim)
        abstract = stage3.abstract_params(stage3.build(config, ref), config, ref.dim)
        params = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), abstract)
        trained = stage3._trained(params, config)
        opt = stage3.make_optimizer(config.stage3, trained).init(trained)
        if config.stage3.ema_decay:
            inner = list(opt.inner_state)
            at = [i for i, s in enumerate(inner) if isinstance(s, stage3.EmaState)][0]
            inner[at] = stage3.EmaState(jax.tree.map(lambda x: x * 0 + ema_value, inner[at].ema))
            opt = opt._replace(inner_state=tuple(inner))
        ckpt = checkpointing.Checkpointer(stage3.stage_dir(str(workdir)), async_save=False)
        ckpt.save(5, train_state.TrainState(step=jnp.asarray(5), params=params, opt_state=opt,
                                            rng=jax.random.key_data(jax.random.key(0))),
                  None, checkpointing.meta_for(config, 3, params, trained))
        ckpt.close()
        return ref

    config = tiny_config.copy_and_resolve_references()
    config.model.dit_prediction, config.stage3.ema_decay = "x0", 0.9
    ref = save(config, tmp_path / "a", 7.0)
    other = tiny_config.copy_and_resolve_references()
    other.model.dit_prediction, other.stage3.ema_decay = "velocity", 0.0
    with pytest.raises(ValueError, match=r"another model config \(1 keys differ: "
                                         r'model.dit_prediction: "x0" -> "velocity"\)'):
        stage3.load_params(other, str(tmp_path / "a"), ref)
    other.model.dit_prediction = "x0"
    _, params, _ = stage3.load_params(other, str(tmp_path / "a"), ref)
    assert {float(np.max(x)) for x in jax.tree.leaves(params["dit"])} == {7.0}  # the EMA
    config.stage3.ema_decay = 0.0
    save(config, tmp_path / "b", 0.0)
    other.stage3.ema_decay = 0.9
    _, params, _ = stage3.load_params(other, str(tmp_path / "b"), ref)
    assert {float(np.max(x)) for x in jax.tree.leaves(params["dit"])} == {1.0}  # no EMA kept


def test_keypoint_reader_decodes_as_configured(tiny_config):
    """Stage 3's motion PCK reads keypoints as stages 1-2 do (eval.subpixel); it was always
    subpixel, so with eval.subpixel=False its PCK was not comparable with theirs."""
    hm_size = tiny_config.model.joint_decoder.heatmap_size
    heatmaps = np.zeros((1, 1, 1, hm_size, hm_size), np.float32)
    heatmaps[..., 3, 3], heatmaps[..., 3, 4] = 1.0, 0.5   # the peak's right neighbour is higher

    class Model:
        def apply(self, variables, frames):
            return jnp.asarray(heatmaps), None
    scale = tiny_config.model.motion_tokenizer.image_size / hm_size
    xs = {}
    for subpixel in (False, True):
        config = tiny_config.copy_and_resolve_references()
        config.eval.subpixel = subpixel
        read = generation.keypoint_reader(Model(), {}, config)
        xs[subpixel] = read(np.zeros((1, 1, 4, 4, 3), np.float32))[0, 0, 0, 0]
    np.testing.assert_allclose(xs[True] - xs[False], 0.25 * scale, rtol=1e-6)
