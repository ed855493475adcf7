"""Wan2.2 VAE: a PyTorch VAE with the official names and random weights (tests/parity/
torch_wan_vae.py, streaming as upstream), converted by the CLI, agrees with our Flax WanVAE in fp32,
block by block and end to end; our chunked (lax.scan) and whole-clip runs agree."""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from im_anim_jax.convert import common, wan_vae
from im_anim_jax.models.wan import vae
import torch_wan_vae as ref_vae  # tests/parity is on sys.path (rootdir-less test modules)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FRAMES, SIZE = 9, 32  # 3 latent frames: the time upsampling's first, second and later chunks


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_config):
    """(torch reference, flax model, converted params) for the `tiny` VAE sizes."""
    cfg = tiny_config.model.vae
    ref = ref_vae.WanVAE(cfg.dim, cfg.dec_dim, cfg.z_dim, cfg.dim_mult, cfg.num_res_blocks,
                         cfg.temporal_downsample).eval()
    ref_vae.randomise(ref, seed=0)
    tmp = tmp_path_factory.mktemp("wan_vae")
    torch.save(ref.state_dict(), tmp / "vae.pth")
    cmd = [sys.executable, "-m", "im_anim_jax.convert", "wan-vae", f"--src={tmp / 'vae.pth'}",
           f"--dst={tmp / 'out'}", f"--config={ROOT}/configs/im_animation.py:tiny"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    params, meta = common.load_converted(str(tmp / "out"))
    assert meta["dtypes"] == ["float32"] and meta["skipped_source_keys"] == 0
    return ref, vae.build_vae(cfg), params


def to_torch(x):  # [B, T, H, W, C] -> [B, C, T, H, W]
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1)))


def from_torch(t):
    return np.moveaxis(t.detach().numpy(), 1, -1)


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def stats():
    mean = torch.tensor(vae.LATENT_MEAN)
    return mean, 1.0 / torch.tensor(vae.LATENT_STD)


def test_single_blocks_match(converted):
    ref, _, params = converted
    rng = np.random.default_rng(1)
    cases = [  # (name, flax module, its params, torch module, input channels)
        ("causal conv3d (encoder.conv1)", vae.CausalConv3d(8), params["encoder"]["conv1"],
         ref.encoder.conv1, 12),
        ("residual block 8->16 (encoder.downsamples.1.downsamples.0)", vae.ResidualBlock(16),
         params["encoder"]["downsamples_1"]["downsamples_0"],
         ref.encoder.downsamples[1].downsamples[0], 8),
        ("attention block (decoder.middle.1)", vae.AttentionBlock(),
         params["decoder"]["middle_1"], ref.decoder.middle[1], 32),
    ]
    for name, module, p, torch_module, c in cases:
        x = rng.normal(size=(2, 5, 8, 8, c)).astype(np.float32)
        y = jax.jit(module.apply)({"params": p}, jnp.asarray(x))
        with torch.no_grad():
            y_ref = from_torch(torch_module(to_torch(x)))
        diff = max_diff(y, y_ref)
        print(f"{name}: fp32 max abs diff {diff:.2e} (|y| max {np.abs(y_ref).max():.2f})")
        assert diff <= 1e-5, f"{name}: max abs diff {diff:.2e} > 1e-5"


def test_encode_decode_match_torch_and_streaming(converted):
    ref, model, params = converted
    rng = np.random.default_rng(2)
    video = rng.uniform(-1, 1, size=(1, FRAMES, SIZE, SIZE, 3)).astype(np.float32)
    encode = jax.jit(lambda p, v: vae.encode(model, p, v))
    encode_chunked = jax.jit(lambda p, v: vae.encode(model, p, v, chunked=True))
    z = encode(params, jnp.asarray(video))
    z_chunked = encode_chunked(params, jnp.asarray(video))
    with torch.no_grad():
        z_ref = from_torch(ref.encode(to_torch(video), *stats()))
    assert z.shape == z_ref.shape == (1, 1 + (FRAMES - 1) // 4, SIZE // 16, SIZE // 16, 48)
    z_image = encode(params, jnp.asarray(video[:, :1]))  # T = 1: the single-frame 2D-conv path
    with torch.no_grad():
        z_image_ref = from_torch(ref.encode(to_torch(video[:, :1]), *stats()))

    latents = rng.normal(size=z_ref.shape).astype(np.float32)
    decode = jax.jit(lambda p, z: vae.decode(model, p, z, clip=False))
    decode_chunked = jax.jit(lambda p, z: vae.decode(model, p, z, chunked=True, clip=False))
    x = decode(params, jnp.asarray(latents))
    x_chunked = decode_chunked(params, jnp.asarray(latents))
    with torch.no_grad():
        x_ref = from_torch(ref.decode(to_torch(latents), *stats()))
    assert x.shape == x_ref.shape == video.shape

    diffs = {"encode vs torch": (max_diff(z, z_ref), 1e-4, np.abs(z_ref).max()),
             "image (T=1) encode vs torch": (max_diff(z_image, z_image_ref), 1e-4,
                                             np.abs(z_image_ref).max()),
             "decode vs torch": (max_diff(x, x_ref), 1e-4, np.abs(x_ref).max()),
             "chunked vs whole encode": (max_diff(z_chunked, z), 1e-5, np.abs(z_ref).max()),
             "chunked vs whole decode": (max_diff(x_chunked, x), 1e-5, np.abs(x_ref).max())}
    for name, (diff, bound, scale) in diffs.items():
        print(f"{name}: fp32 max abs diff {diff:.2e} (bound {bound:.0e}, |out| max {scale:.2f})")
    for name, (diff, bound, _) in diffs.items():
        assert diff <= bound, f"{name}: max abs diff {diff:.2e} > {bound:.0e}"
    clipped = vae.decode(model, params, jnp.asarray(latents[:, :1]))
    assert float(jnp.max(jnp.abs(clipped))) <= 1.0


def test_bad_shapes_are_clear_errors(converted, tiny_config):
    _, model, params = converted
    bad_videos = {(1, 6, 32, 32, 3): "T = 1 + 4k frames, got T=6",
                  (1, 5, 24, 32, 3): "multiples of 16, got 24x32",
                  (1, 5, 32, 32, 4): "video [B, T, H, W, 3], got shape (1, 5, 32, 32, 4)"}
    for shape, message in bad_videos.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            vae.encode(model, params, jnp.zeros(shape))
    with pytest.raises(ValueError, match=r"latents \[B, T' >= 1, h, w, 48\], got shape"):
        vae.decode(model, params, jnp.zeros((1, 2, 2, 2, 16)))

    sd = {k: np.zeros(s, np.float32) for k, s in
          wan_vae.expected_shapes(tiny_config.model.vae).items()}
    sd["decoder.head.0.gamma"] = np.zeros((9, 1, 1, 1), np.float32)
    del sd["encoder.middle.1.proj.bias"]
    with pytest.raises(common.ConversionError,
                       match=r"decoder.head.0.gamma: expected \(8, 1, 1, 1\), found \(9, 1, 1, 1\)"
                             r".*missing: encoder.middle.1.proj.bias"):
        common.check_state_dict(sd, wan_vae.expected_shapes(tiny_config.model.vae), "vae.pth")


@pytest.mark.parametrize("strides,padding,frames", [
    ((1, 1, 1), ((0, 0), (1, 1), (1, 1)), 5),   # CausalConv3d (time padding done by the caller)
    ((2, 1, 1), ((0, 0), (0, 0), (0, 0)), 6),   # TimeConv, stride 2
    ((1, 2, 2), ((2, 0), (0, 1), (0, 1)), 4),   # time padding and a spatial stride
    ((1, 1, 1), ((0, 0), (1, 1), (1, 1)), 2),   # fewer frames than taps: no output frames
])
def test_conv3d_as_folded_2d_equals_the_3d_conv(strides, padding, frames):
    k = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k[0], (2, frames, 6, 6, 5))
    kernel = jax.random.normal(k[1], (3, 3, 3, 5, 7))
    want = jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    got = vae._conv3d_as_2d(x, kernel, strides, padding)
    assert got.shape == want.shape
    # fp32, only the summation order differs: max abs diff measured ~5e-6 at |y| ~ 15.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=3e-5, rtol=0)
