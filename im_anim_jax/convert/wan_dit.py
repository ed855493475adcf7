"""Wan2.2 DiT (official `WanModel` state dict, e.g. the TI2V-5B sharded safetensors) -> WanDiT.

Linear [out, in] -> [in, out] (q, k, v -> [dim, heads, head_dim]; o -> [heads, head_dim, dim];
time_projection -> [dim, 6, dim]); Conv3d [O, I, t, h, w] -> [t, h, w, I, O]; RMSNorm scales
[dim] -> [heads, head_dim]; modulations lose their leading 1; blocks.N.* stack on the scan axis.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np

from im_anim_jax.convert import common
from im_anim_jax.models.wan import dit

MODEL = "dit"
STANDARD_FILES = ("diffusion_pytorch_model.safetensors.index.json",  # the TI2V-5B release
                  "diffusion_pytorch_model.safetensors")


def _table(cfg) -> list[tuple[str, str, tuple, object]]:
    """(torch key, flax path, torch shape, torch -> flax fn); block keys hold `{}` for N."""
    d, h, f = cfg.dim, cfg.num_heads, cfg.ffn_dim
    heads = (h, d // h)
    out = math.prod(cfg.patch_size) * cfg.out_dim

    def lin_to(*shape):
        return lambda w: common.linear(w).reshape(shape)

    def to(*shape):
        return lambda w: w.reshape(shape)

    rows = [("patch_embedding.weight", "patch_embedding/kernel",
             (d, cfg.in_dim, *cfg.patch_size), common.conv),
            ("patch_embedding.bias", "patch_embedding/bias", (d,), None)]
    for torch_name, name, n_in in (("text_embedding", "text_embedding", cfg.text_dim),
                                   ("time_embedding", "time_embedding", cfg.freq_dim)):
        rows += [(f"{torch_name}.0.weight", f"{name}/fc1/kernel", (d, n_in), common.linear),
                 (f"{torch_name}.0.bias", f"{name}/fc1/bias", (d,), None),
                 (f"{torch_name}.2.weight", f"{name}/fc2/kernel", (d, d), common.linear),
                 (f"{torch_name}.2.bias", f"{name}/fc2/bias", (d,), None)]
    rows += [("time_projection.1.weight", "time_projection/kernel", (6 * d, d), lin_to(d, 6, d)),
             ("time_projection.1.bias", "time_projection/bias", (6 * d,), to(6, d)),
             ("blocks.{}.modulation", "blocks/modulation", (1, 6, d), to(6, d)),
             ("blocks.{}.norm3.weight", "blocks/norm3/scale", (d,), None),
             ("blocks.{}.norm3.bias", "blocks/norm3/bias", (d,), None),
             ("blocks.{}.ffn.0.weight", "blocks/ffn/fc1/kernel", (f, d), common.linear),
             ("blocks.{}.ffn.0.bias", "blocks/ffn/fc1/bias", (f,), None),
             ("blocks.{}.ffn.2.weight", "blocks/ffn/fc2/kernel", (d, f), common.linear),
             ("blocks.{}.ffn.2.bias", "blocks/ffn/fc2/bias", (d,), None),
             ("head.modulation", "head/modulation", (1, 2, d), to(2, d)),
             ("head.head.weight", "head/head/kernel", (out, d), common.linear),
             ("head.head.bias", "head/head/bias", (out,), None)]
    if not cfg.cross_attn_norm:
        rows = [r for r in rows if ".norm3." not in r[0]]
    for attn in ("self_attn", "cross_attn"):
        p, a = f"blocks.{{}}.{attn}", f"blocks/{attn}"
        for x in "qkv":
            rows += [(f"{p}.{x}.weight", f"{a}/{x}/kernel", (d, d), lin_to(d, *heads)),
                     (f"{p}.{x}.bias", f"{a}/{x}/bias", (d,), to(*heads))]
        rows += [(f"{p}.o.weight", f"{a}/o/kernel", (d, d), lin_to(*heads, d)),
                 (f"{p}.o.bias", f"{a}/o/bias", (d,), None),
                 (f"{p}.norm_q.weight", f"{a}/norm_q/scale", (d,), to(*heads)),
                 (f"{p}.norm_k.weight", f"{a}/norm_k/scale", (d,), to(*heads))]
    return rows


def expected_shapes(model_cfg) -> dict[str, tuple]:
    """Every official state-dict key -> its shape."""
    out = {}
    for key, _, shape, _ in _table(model_cfg):
        keys = [key.format(i) for i in range(model_cfg.num_layers)] if "{}" in key else [key]
        out.update({k: tuple(shape) for k in keys})
    return out


def abstract_params(model_cfg):
    """ShapeDtypeStructs of WanDiT's (unboxed) params: eval_shape of init, nothing allocated."""
    model = dit.build_dit(model_cfg)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *dit.init_inputs(model_cfg)))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        nn.unbox(boxed["params"]))


def convert(sd: dict[str, np.ndarray], model_cfg) -> dict:
    """Checked state dict -> nested numpy params of WanDiT (source dtype kept)."""
    flat = {}
    for key, path, _, fn in _table(model_cfg):
        fn = fn or (lambda w: w)
        if "{}" in key:
            flat[path] = common.stack(sd, key, model_cfg.num_layers, fn)
        else:
            flat[path] = np.asarray(fn(sd[key]))
    return common.unflatten(flat)
