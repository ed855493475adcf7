"""Wan2.2 VAE (`Wan2.2_VAE.pth`, Wan-Video/Wan2.2 wan/modules/vae2_2.py) -> our WanVAE.

Sizes come from `config.model.vae` (the released VAE in the `paper` variant). Flax paths mirror
the state-dict keys, an index joined to the name before it (`encoder.middle.1.to_qkv.weight` ->
`encoder/middle_1/to_qkv/kernel`); conv weights [O, I, *k] -> kernels [*k, I, O]; RMS norm
gammas [C, 1, 1(, 1)] -> [C].
"""
from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from im_anim_jax.convert import common
from im_anim_jax.models.wan.vae import build_vae

MODEL = "vae"
STANDARD_FILES = ("Wan2.2_VAE.pth",)  # its name in the Wan2.2 release folders


def abstract_params(model_cfg) -> dict:
    model = build_vae(model_cfg)
    video = jax.ShapeDtypeStruct((1, 1 + model.time_factor, model.space_factor,
                                  model.space_factor, 3), np.float32)
    return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), video)["params"])


def expected_shapes(model_cfg) -> dict[str, tuple]:
    """{state-dict key: shape} of the official WanVAE_ with these sizes."""
    shapes: dict[str, tuple] = {}
    z, p, mult = model_cfg.z_dim, model_cfg.patch_size, tuple(model_cfg.dim_mult)
    last = len(mult) - 1

    def conv(key, cout, cin, kernel):
        shapes.update({f"{key}.weight": (cout, cin, *kernel), f"{key}.bias": (cout,)})

    def residual(key, cin, cout):
        shapes[f"{key}.residual.0.gamma"] = (cin, 1, 1, 1)
        conv(f"{key}.residual.2", cout, cin, (3, 3, 3))
        shapes[f"{key}.residual.3.gamma"] = (cout, 1, 1, 1)
        conv(f"{key}.residual.6", cout, cout, (3, 3, 3))
        if cin != cout:
            conv(f"{key}.shortcut", cout, cin, (1, 1, 1))

    def middle(key, dim):
        residual(f"{key}.middle.0", dim, dim)
        shapes[f"{key}.middle.1.norm.gamma"] = (dim, 1, 1)
        conv(f"{key}.middle.1.to_qkv", 3 * dim, dim, (1, 1))
        conv(f"{key}.middle.1.proj", dim, dim, (1, 1))
        residual(f"{key}.middle.2", dim, dim)

    def head(key, dim, cout):
        shapes[f"{key}.head.0.gamma"] = (dim, 1, 1, 1)
        conv(f"{key}.head.2", cout, dim, (3, 3, 3))

    def levels(key, dims, blocks, time_flags, time_out):
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            level = f"{key}.{i}.{key.rsplit('.', 1)[-1]}"
            for j in range(blocks):
                residual(f"{level}.{j}", cin if j == 0 else cout, cout)
            if i != last:
                conv(f"{level}.{blocks}.resample.1", cout, cout, (3, 3))
                if time_flags[i]:
                    conv(f"{level}.{blocks}.time_conv", time_out * cout, cout, (3, 1, 1))

    enc = [model_cfg.dim * m for m in (1,) + mult]
    conv("encoder.conv1", enc[0], 3 * p * p, (3, 3, 3))
    levels("encoder.downsamples", enc, model_cfg.num_res_blocks,
           tuple(model_cfg.temporal_downsample), time_out=1)
    middle("encoder", enc[-1])
    head("encoder", enc[-1], 2 * z)
    conv("conv1", 2 * z, 2 * z, (1, 1, 1))
    conv("conv2", z, z, (1, 1, 1))
    dec = [model_cfg.dec_dim * m for m in (mult[-1],) + mult[::-1]]
    conv("decoder.conv1", dec[0], z, (3, 3, 3))
    levels("decoder.upsamples", dec, model_cfg.num_res_blocks + 1,
           tuple(model_cfg.temporal_downsample)[::-1], time_out=2)
    middle("decoder", dec[0])
    head("decoder", dec[-1], 3 * p * p)
    return shapes


def flax_path(key: str) -> str:
    """'encoder.downsamples.0.downsamples.1.residual.2.weight' ->
    'encoder/downsamples_0/downsamples_1/residual_2/kernel'."""
    parts: list[str] = []
    for part in key.split("."):
        if part.isdigit():
            parts[-1] = f"{parts[-1]}_{part}"
        else:
            parts.append(part)
    if parts[-1] == "weight":
        parts[-1] = "kernel"
    return "/".join(parts)


def convert(sd: dict, model_cfg) -> dict:
    flat = {}
    for key, value in sd.items():
        if key.endswith(".weight"):
            value = common.conv(value)  # every weight of this VAE is a Conv2d/Conv3d kernel
        elif key.endswith(".gamma"):
            value = value.reshape(-1)
        flat[flax_path(key)] = value
    return common.unflatten(flat)
