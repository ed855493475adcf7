"""The reference encoder's VAE: it learns on the tiny synthetic frames, the encoder built from its
checkpoint (or from a converted Wan2.2 VAE) gives T_ref = 2x2 patches of vae.encode, and missing or
mismatching weights are refused clearly."""
import json
import os
import shutil
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from data_pipelines import records
from im_anim_jax.convert import common, convert, wan_vae
from im_anim_jax.models.wan import vae
from im_anim_jax.training import checkpointing
from im_anim_jax.training import vae as vae_training
from im_anim_jax.training.metric_writer import read_metrics

STEPS, IMAGE_STEPS = 45, 30  # single frames up to step 30, then 5-frame clips
# The tiny preset with one residual block per level and one level fewer (8x instead of 16x in
# space; the time down/up sampling is kept): a third of the compile time. T_ref grid at 32x32: 2x2.
SMALL_VAE = dict(num_res_blocks=1, dim_mult=(1, 2, 2), temporal_downsample=(False, True))


def frames(path, n=4, t=1):
    """n fixed uint8 clips [n, t, H, W, 3] of the train split (the first t frames of the first
    clips); t=1: frames [n, H, W, 3]."""
    src = records.open_split(path, "train")
    clips = np.stack([src[i]["frames"][:t] for i in range(n)])
    return clips[:, 0] if t == 1 else clips


def to_video(images):  # uint8 [B, H, W, 3] -> [B, 1, H, W, 3], or clips as they are; in [-1, 1]
    x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
    return x[:, None] if x.ndim == 4 else x


@pytest.fixture(scope="module")
def config(tiny_config):
    config = tiny_config.copy_and_resolve_references()
    config.model.vae.update(SMALL_VAE)
    return config


@pytest.fixture(scope="module")
def roundtrip(config):
    """jit (params, video) -> (mean latents, reconstruction) by the public encode/decode."""
    model = vae.build_vae(config.model.vae)

    def run(params, video):
        latents = vae.encode(model, params, video)
        return latents, vae.decode(model, params, latents)
    return jax.jit(run)


@pytest.fixture(scope="module")
def run(tmp_path_factory, config, tiny_dataset):
    """A short VAE run on the tiny synthetic set (fixed seeds, bounded steps): its config,
    workdir, log lines, initial params and final (checkpointed) params."""
    config = config.copy_and_resolve_references()
    config.vae_training.update(dict(steps=STEPS, image_steps=IMAGE_STEPS, batch_size=4,
                                    clip_frames=5, clip_batch_size=2, lr=7e-3, log_every=5,
                                    checkpoint_every=IMAGE_STEPS))
    workdir = str(tmp_path_factory.mktemp("vae"))
    lines, initial = [], []

    def init_state(*args):  # keeps a host copy of the initial params (the state gets donated)
        state, *rest = real_init_state(*args)
        initial.append(jax.tree.map(lambda x: np.array(x, copy=True), state.params))
        return (state, *rest)

    real_init_state = vae_training.init_state
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vae_training, "init_state", init_state)
        vae_training.train(config, workdir, tiny_dataset, log=lines.append)
    params, step = checkpointing.restore_checked_params(
        os.path.join(workdir, "vae"), wan_vae.abstract_params(config.model.vae), "VAE", "")
    assert step == STEPS
    return types.SimpleNamespace(config=config, workdir=workdir, lines=lines, initial=initial[0],
                                 params=params)


def image_phase_params(run) -> dict:
    """The run's params at the end of its single-frame phase (checkpoint IMAGE_STEPS)."""
    params, step = checkpointing.restore_checked_params(
        os.path.join(run.workdir, "vae"), wan_vae.abstract_params(run.config.model.vae), "VAE",
        "", step=IMAGE_STEPS)
    assert step == IMAGE_STEPS
    return params


def test_training_learns_to_reconstruct(run, roundtrip, tiny_dataset):
    assert [line.split("; ")[1] for line in run.lines if "params on mesh" in line] == [
        f"up to step {IMAGE_STEPS} of {STEPS}: batches of 4 x 1 frame(s) 32x32",
        f"up to step {STEPS} of {STEPS}: batches of 2 x 5 frame(s) 32x32"]
    assert any(f"[vae] step {STEPS}/{STEPS} loss" in line and "psnr" in line for line in run.lines)
    rows = read_metrics(os.path.join(run.workdir, "vae"))
    assert [r["step"] for r in rows] == list(range(5, STEPS + 1, 5))
    assert all(np.isfinite(r[k]) for r in rows for k in ("loss", "l1", "mse", "kl", "psnr"))
    # The logged loss within the single-frame phase (the clip phase's loss is another objective).
    first, last = rows[0], next(r for r in rows if r["step"] == IMAGE_STEPS)
    # On fixed frames, the mean-latent round trip of the public encode/decode (same latent
    # normalisation as in training) after the single-frame phase beats the run's initial VAE by
    # a wide margin.
    video = to_video(frames(tiny_dataset))
    before, after = (float(jnp.mean(jnp.abs(roundtrip(p, video)[1] - video)))
                     for p in (run.initial, image_phase_params(run)))
    print(f"fixed-frame L1: {before:.4f} (init) -> {after:.4f} ({IMAGE_STEPS} steps); training "
          f"loss {first['loss']:.4f} -> {last['loss']:.4f}, psnr {first['psnr']:.2f} -> "
          f"{last['psnr']:.2f}")
    assert after < 0.7 * before, (before, after)  # measured 0.4371 -> 0.3021
    # The logged training loss (5-step means; batch content adds noise): measured 0.605 -> 0.482.
    assert last["loss"] < 0.85 * first["loss"], (first, last)
    assert last["psnr"] > first["psnr"] + 0.75, (first, last)


def temporal_parts(params) -> dict:
    """{path: array} of what only frames after frame 0 use: the earlier time taps of every 3D
    kernel and the time down/up-sampling convs."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        x = np.asarray(x)
        if "time_conv" in name:
            out[name] = x
        elif name.endswith("kernel") and x.ndim == 5 and x.shape[0] > 1:
            out[name] = x[:-1]
    return out


def test_the_clip_phase_trains_the_temporal_path(run, roundtrip, tiny_dataset):
    """Single frames never reach the causal convs' earlier time taps or the time down/up-
    sampling (what frames 1.. of a clip go through): the single-frame phase leaves them at their
    initial values, and the clip phase trains them and changes the clips' reconstructions."""
    image_params = image_phase_params(run)
    initial, image_only = temporal_parts(run.initial), temporal_parts(image_params)
    final = temporal_parts(run.params)
    assert len(initial) > 10 and any("time_conv" in k for k in initial)
    for name, x in initial.items():
        np.testing.assert_array_equal(image_only[name], x, err_msg=name)
        assert np.abs(final[name] - x).max() > 1e-4, name
    video = to_video(frames(tiny_dataset, n=4, t=5))
    recon = [roundtrip(p, video)[1] for p in (image_params, run.params)]
    assert float(jnp.abs(recon[1][:, 1:] - recon[0][:, 1:]).mean()) > 1e-3


def test_a_fresh_vae_is_its_image_model_inflated_to_clips():
    """At init the temporal path passes frames through: a causal 3x3x3 conv on a clip equals its
    single-frame (2D) conv on each frame, the time downsampling keeps the middle frame of each
    triple and the upsampling copies each frame onto both frames it makes. So the clip phase
    starts from what the image phase learned, not from random earlier time taps."""
    x = jax.random.normal(jax.random.key(1), (2, 5, 6, 6, 4))
    conv = vae.CausalConv3d(3)
    params = nn.unbox(conv.init(jax.random.key(2), x))
    clip = conv.apply(params, x)
    frames = jnp.concatenate([conv.apply(params, x[:, i:i + 1]) for i in range(5)], axis=1)
    np.testing.assert_allclose(clip, frames, atol=1e-6)
    assert float(jnp.abs(params["params"]["kernel"][-1]).min()) > 0  # the last tap is drawn
    down = vae.TimeConv(4, stride=2)
    np.testing.assert_array_equal(down.apply(down.init(jax.random.key(3), x), x), x[:, 1:4:2])
    up = vae.TimeConv(8, stride=1)
    y = up.apply(up.init(jax.random.key(4), x), x)  # [B, 3, H, W, 2C]: two output frames each
    np.testing.assert_array_equal(y[..., :4], x[:, 2:])
    np.testing.assert_array_equal(y[..., 4:], x[:, 2:])


def test_a_fresh_vae_posterior_starts_at_the_configured_log_variance(config):
    model = vae.build_vae(config.model.vae)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 1, 32, 32, 3))))["params"]
    bias, z = np.asarray(params["conv1"]["bias"]), config.model.vae.z_dim
    assert config.model.vae.initial_logvar == -8.0
    np.testing.assert_array_equal(bias[:z], 0.0)  # the mean half
    np.testing.assert_array_equal(bias[z:], -8.0)  # the log-variance half


def test_resume_at_the_phase_switch_continues_the_data_order(run, config, tiny_dataset,
                                                             tmp_path):
    """A run stopped at the end of the single-frame phase resumes into the clip phase at the same
    data position: the same batches (data_log.txt) and, on CPU, the same params as the run that
    did not stop."""
    src, dst = os.path.join(run.workdir, "vae"), str(tmp_path / "vae")
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(str(STEPS)))
    with open(os.path.join(src, "data_log.txt")) as f:
        log = f.readlines()
    assert len(log) == STEPS
    with open(os.path.join(dst, "data_log.txt"), "w") as f:
        f.writelines(log[:IMAGE_STEPS])
    lines = []
    vae_training.train(run.config, str(tmp_path), tiny_dataset, log=lines.append)
    assert not any("batches of 4 x 1 frame(s)" in line for line in lines)  # phase 1 skipped
    assert any(f"resuming from the checkpoint at step {IMAGE_STEPS}" in line for line in lines)
    with open(os.path.join(dst, "data_log.txt")) as f:
        assert f.readlines() == log
    resumed, _ = checkpointing.restore_checked_params(
        dst, wan_vae.abstract_params(run.config.model.vae), "VAE", "")
    for a, b in zip(jax.tree.leaves(run.params), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_reference_encoder_is_patchified_vae_encode(run, roundtrip, tiny_dataset):
    enc = vae_training.load_reference_encoder(run.config, run.workdir)
    assert enc.grid == (2, 2) and enc.dim == 4 * run.config.model.vae.z_dim == 192
    images = frames(tiny_dataset)
    tokens = enc(images)
    assert tokens.shape == (4, 4, 192) and tokens.dtype == jnp.float32
    np.testing.assert_array_equal(tokens, enc(images))  # deterministic (mean latents)
    latents = roundtrip(run.params, to_video(images))[0]  # [4, 1, 4, 4, z]
    np.testing.assert_allclose(tokens, vae_training.reference_tokens(latents), atol=1e-5)
    # Usable inside a jitted step (closed over; it is also a pytree argument of its own jit);
    # floats in [0, 1] give the same tokens.
    np.testing.assert_allclose(jax.jit(lambda x: enc(x))(images / np.float32(255)), tokens,
                               atol=1e-5)
    with pytest.raises(ValueError, match=r"must be \[B, 32, 32, 3\]"):
        enc(np.zeros((1, 64, 64, 3), np.uint8))
    fine = run.config.copy_and_resolve_references()
    fine.model.retargeter.reference_patch = 1  # one token per latent pixel
    enc1 = vae_training.load_reference_encoder(fine, run.workdir)
    assert enc1.grid == (4, 4) and enc1.dim == run.config.model.vae.z_dim
    np.testing.assert_allclose(enc1(images), np.asarray(latents).reshape(4, 16, -1), atol=1e-5)


def test_reference_tokens_layout():
    z = 3
    latents = np.arange(2 * 4 * 6 * z, dtype=np.float32).reshape(2, 1, 4, 6, z)
    tokens = np.asarray(vae_training.reference_tokens(jnp.asarray(latents)))
    assert tokens.shape == (2, 2 * 3, 4 * z)
    for r, q, i, j, c in [(0, 0, 0, 0, 0), (1, 2, 1, 0, 2), (0, 1, 1, 1, 1), (1, 0, 0, 1, 0)]:
        assert tokens[1, r * 3 + q, (2 * i + j) * z + c] == latents[1, 0, 2 * r + i, 2 * q + j, c]
    with pytest.raises(ValueError, match="divisible by 2"):
        vae_training.reference_tokens(jnp.zeros((1, 1, 3, 4, z)))
    ones = np.asarray(vae_training.reference_tokens(jnp.asarray(latents), patch=1))
    np.testing.assert_array_equal(ones, latents.reshape(2, 4 * 6, z))  # one token per pixel


def test_missing_or_mismatching_checkpoint_is_refused(run, config, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no VAE checkpoint.*--stages 2.*init_from"):
        vae_training.load_reference_encoder(config, str(tmp_path))
    wider = config.copy_and_resolve_references()
    wider.model.vae.dim = 16
    with pytest.raises(ValueError, match="VAE checkpoint .* different architecture"):
        vae_training.load_reference_encoder(wider, run.workdir)
    odd = config.copy_and_resolve_references()
    odd.model.motion_tokenizer.image_size = 40
    with pytest.raises(ValueError, match="40x40 .* multiples of 16"):
        vae_training.load_reference_encoder(odd, run.workdir)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, config, run):
    """A converted Wan2.2 VAE checkpoint holding the run's initial params: written as an official
    state dict, then converted as `python -m im_anim_jax.convert wan-vae` does."""
    flat = {"/".join(k.key for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(run.initial)[0]}
    sd = {}
    for key, shape in wan_vae.expected_shapes(config.model.vae).items():  # Flax -> PyTorch
        value = flat[wan_vae.flax_path(key)]
        value = np.moveaxis(value, (-1, -2), (0, 1)) if key.endswith(".weight") else value
        sd[key] = np.ascontiguousarray(value.reshape(shape))
    tmp = tmp_path_factory.mktemp("converted")
    save_file(sd, str(tmp / "vae.safetensors"))
    meta = convert("wan-vae", str(tmp / "vae.safetensors"), str(tmp / "out"), config.model)
    assert meta["kind"] == "wan-vae"
    return str(tmp / "out")


def test_init_from_a_converted_vae(converted, config, run, roundtrip, tmp_path, tiny_dataset):
    config = config.copy_and_resolve_references()
    config.model.vae.init_from = converted
    lines = []
    assert vae_training.train(config, str(tmp_path), tiny_dataset, log=lines.append) == {}
    assert len(lines) == 1 and converted in lines[0] and not os.path.exists(tmp_path / "vae")
    enc = vae_training.load_reference_encoder(config, str(tmp_path))
    images = frames(tiny_dataset)
    latents = roundtrip(run.initial, to_video(images))[0]
    np.testing.assert_allclose(enc(images), vae_training.reference_tokens(latents), atol=1e-5)


def test_init_from_of_wrong_kind_or_shape_is_refused(converted, config, tmp_path):
    other = str(tmp_path / "titok")
    shutil.copytree(converted, other)
    with open(os.path.join(other, "meta.json")) as f:
        meta = json.load(f)
    with open(os.path.join(other, "meta.json"), "w") as f:
        json.dump(dict(meta, kind="titok"), f)
    config = config.copy_and_resolve_references()
    config.model.vae.init_from = other
    with pytest.raises(ValueError, match="holds a 'titok' checkpoint.*convert wan-vae"):
        vae_training.load_reference_encoder(config, str(tmp_path))
    config.model.vae.update(dict(init_from=converted, dim=16))
    with pytest.raises(ValueError, match=r"does not fit config.model.vae.*encoder/conv1/kernel"):
        vae_training.load_reference_encoder(config, str(tmp_path))
    config.model.vae.init_from = str(tmp_path / "nothing")
    with pytest.raises(common.ConversionError, match="not a converted checkpoint"):
        vae_training.load_reference_encoder(config, str(tmp_path))
