"""Wan2.2 TI2V diffusion transformer: noisy latent video + text + timesteps -> flow velocity.

Latents are channels-last [B, F, H, W, C]; tokens [B, L, dim] walk the (f, h, w) patch grid with
f slowest, as upstream. Parameter names follow the official state dict (`patch_embedding`,
`text_embedding`, `time_embedding`, `time_projection`, `blocks`, `head`); the blocks are stacked
with nn.scan (a leading `layers` axis) and rematerialised by `remat_policy`.

Stage 3 (IM-Animation) widens the model in two ways, both an exact identity when fresh:
- `control_dim` > 0: the patch embedding gains that many input channels per latent pixel for the
  retargeted motion M_ret (channel concat with the noisy latent); their kernel slice starts at
  zero (`add_control_channels` widens a base checkpoint).
- `expression_every` = k > 0: an ExpressionBlock (zero-initialised output) after every k blocks.
  The blocks are then scanned in groups: `blocks/layers/*` [L/k, k, ...] and
  `blocks/expression/*` [L/k, ...] (`group_layers` regroups a base checkpoint's [L, ...]).

Numerics follow upstream: the timestep sinusoid and the RoPE tables to float64 accuracy, and the
time embedding, modulation, LayerNorms, residual stream and head in float32 whatever `dtype` is
(`dtype` is the compute dtype of the patch/text embeddings, q/k/v/o projections, attention, FFN).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from im_anim_jax.models import layers

F32 = jnp.float32
MASK_12_BITS = np.uint32(0xFFFFF000)  # keeps a float32's sign, exponent, top 12 significand bits
gelu_tanh = functools.partial(nn.gelu, approximate=True)


def sinusoid(t, dim: int):
    """Upstream's timestep embedding [cos(t f) | sin(t f)], f_k = 10000^(-k / (dim/2)), to
    float64 accuracy in float32 arithmetic. t [...] -> [..., dim] float32.

    t f reaches 1e3 rad, where a float32 product is off by 1e-4. In turns (f / 2 pi) the product
    is split into 12-bit halves: t_hi * g_hi is exact, its integer part is dropped exactly, and
    the small cross terms carry float32 relative error only.
    """
    half = dim // 2
    turns = 10000.0 ** (-np.arange(half) / half) / (2 * np.pi)  # float64
    g_hi = (turns.astype(np.float32).view(np.uint32) & MASK_12_BITS).view(np.float32)
    g_lo = (turns - g_hi).astype(np.float32)
    t = t.astype(F32)[..., None]
    t_hi = jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(t, jnp.uint32) & MASK_12_BITS, F32)
    t_lo = t - t_hi
    p = t_hi * g_hi
    phase = 2 * np.pi * ((p - jnp.floor(p)) + (t_hi * g_lo + t_lo * (g_hi + g_lo)))
    return jnp.concatenate([jnp.cos(phase), jnp.sin(phase)], -1)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """RoPE rotation pairs for (t, h, w): upstream's d - 4 (d // 6), 2 (d // 6), 2 (d // 6) dims."""
    if head_dim % 2:
        raise ValueError(f"head_dim {head_dim} must be even for RoPE")
    pairs = head_dim // 2
    return pairs - 2 * (pairs // 3), pairs // 3, pairs // 3


def rope_tables(grid: Sequence[int], head_dim: int, theta: float = 10000.0):
    """cos, sin [f*h*w, head_dim/2] float32 for the patch grid (f, h, w), computed in float64.

    Each axis rotates its own pairs with theta^(-2i / axis_dims) at its patch-grid index.
    """
    per_axis = []
    for axis, (pairs, size) in enumerate(zip(rope_split(head_dim), grid)):
        angle = np.outer(np.arange(size), theta ** (-np.arange(0, 2 * pairs, 2) / (2 * pairs)))
        shape = [1, 1, 1, pairs]
        shape[axis] = size
        per_axis.append(np.broadcast_to(angle.reshape(shape), (*grid, pairs)))
    angles = np.concatenate(per_axis, -1).reshape(math.prod(grid), -1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x, cos, sin):
    """Rotates adjacent pairs (x[2i], x[2i+1]) of x [B, L, H, D] by cos, sin [L, D/2]; float32."""
    b, n, h, d = x.shape
    x = x.astype(F32).reshape(b, n, h, d // 2, 2)
    x0, x1 = x[..., 0], x[..., 1]
    cos, sin = cos[:, None], sin[:, None]
    return jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).reshape(b, n, h, d)


def pad_context(embeddings: Sequence, text_len: int):
    """Upstream's text rule: prompt embeddings [L_i, D], each already cut to its own length, are
    zero-padded to [text_len, D] (before the text MLP) and stacked -> [B, text_len, D]."""
    out = []
    for i, e in enumerate(embeddings):
        if e.ndim != 2 or e.shape[0] > text_len:
            raise ValueError(f"prompt embedding {i} has shape {tuple(e.shape)}; expected "
                             f"[L <= text_len={text_len}, D]")
        out.append(jnp.pad(jnp.asarray(e), ((0, text_len - e.shape[0]), (0, 0))))
    return jnp.stack(out)


def _layer_norm(x, eps: float):
    """Non-affine LayerNorm over the last axis in float32 (PyTorch's biased variance)."""
    x = x.astype(F32)
    mu = jnp.mean(x, -1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(jnp.mean(jnp.square(x - mu), -1, keepdims=True) + eps)


def _modulate(x, shift, scale):
    return x * (1 + scale) + shift


def _precision(dtype):
    """Matmuls computed in float32 (the time MLP/projection and head always; every layer when
    `dtype` is float32) run at full precision, as upstream's fp32 maths does; TPU/GPU defaults
    would use bf16 passes or TF32."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == F32 else None


def _modulation_init(key, shape, dtype=F32):
    """Upstream's randn / sqrt(dim)."""
    return jax.random.normal(key, shape, dtype) / np.sqrt(shape[-1])


def _dense(features, in_axis, out_axis, name, dtype, init=nn.initializers.xavier_uniform()):
    return nn.Dense(features, dtype=dtype, name=name, precision=_precision(dtype),
                    kernel_init=layers.axes(init, in_axis, out_axis),
                    bias_init=layers.axes(nn.initializers.zeros, out_axis))


class Mlp(nn.Module):
    """fc2(activation(fc1(x))): [..., in] -> [..., hidden] -> [..., out]."""
    hidden: int
    out: int
    activation: Callable
    kernel_init: Callable
    dtype: layers.Dtype

    @nn.compact
    def __call__(self, x):
        x = self.activation(_dense(self.hidden, "embed", "mlp", "fc1", self.dtype,
                                   self.kernel_init)(x))
        return _dense(self.out, "mlp", "embed", "fc2", self.dtype, self.kernel_init)(x)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * scale over the full width (heads and head_dim together).
    x [B, L, H, D]; statistics in float32, result in `dtype`."""
    eps: float
    dtype: layers.Dtype

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", layers.axes(nn.initializers.ones, "heads", "head_dim"),
                           x.shape[-2:])
        xf = x.astype(F32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), (-2, -1), keepdims=True) + self.eps)
        return y.astype(self.dtype) * scale.astype(self.dtype)


class Attention(nn.Module):
    """q, k, v, o projections with RMS-normed q and k. Self-attention with RoPE on q, k when
    `context` is None; cross-attention to every context position (no mask) otherwise.

    The projections of one input run as one einsum over their stacked kernels (q, k, v of x in
    self-attention; k, v of the context in cross-attention), params kept apart as in Wan: with
    heads split over `tensor`, the backward pass then all-reduces one input gradient, not three
    (the paper stage 3 on fsdp=16,tensor=4: DiT tensor all-reduces 6.59 -> 4.88 GiB)."""
    num_heads: int
    eps: float
    dtype: layers.Dtype
    attention_impl: str

    @nn.compact
    def __call__(self, x, context=None, rope=None):  # x [B, L, dim] -> [B, L, dim]
        dim, h = x.shape[-1], self.num_heads
        d = dim // h

        def proj(name):
            return layers.Projection("bld,dhk->blhk", (dim, h, d), ("embed", "heads", "head_dim"),
                                     (h, d), ("heads", "head_dim"), fan_in=(0,), fan_out=(1, 2),
                                     dtype=self.dtype, precision=_precision(self.dtype), name=name)

        def fused(inputs, projections):  # -> one [B, L, h, d] per projection
            w = jnp.stack([p.kernel for p in projections], 1).astype(self.dtype)
            b = jnp.stack([p.bias for p in projections], 0).astype(self.dtype)
            y = jnp.einsum("bld,dthk->blthk", inputs.astype(self.dtype), w,
                           precision=_precision(self.dtype)) + b
            return [y[:, :, i] for i in range(len(projections))]

        if context is None:
            q, k, v = fused(x, [proj("q"), proj("k"), proj("v")])
        else:
            q = proj("q")(x)
            k, v = fused(context, [proj("k"), proj("v")])
        q = RMSNorm(self.eps, self.dtype, name="norm_q")(q)
        k = RMSNorm(self.eps, self.dtype, name="norm_k")(k)
        if rope is not None:
            q, k = (apply_rope(a, *rope).astype(self.dtype) for a in (q, k))
        q = nn.with_logical_constraint(q, ("act_batch", "act_length", "act_heads", None))
        k, v = (nn.with_logical_constraint(a, ("act_batch", None, "act_heads", None))
                for a in (k, v))
        out = layers.attention(q, k, v, self.attention_impl)
        return layers.Projection("blhk,hkd->bld", (h, d, dim), ("heads", "head_dim", "embed"),
                                 (dim,), ("embed",), fan_in=(0, 1), fan_out=(2,),
                                 dtype=self.dtype, precision=_precision(self.dtype), name="o")(out)


class WanBlock(nn.Module):
    """x += g1 * SA(LN(x) (1 + s1) + b1); x += CA(LN_affine(x), context);
    x += g2 * FFN(LN(x) (1 + s2) + b2), with (b1, s1, g1, b2, s2, g2) = modulation + e0 in
    float32 and a float32 residual stream."""
    ffn_dim: int
    num_heads: int
    eps: float
    cross_attn_norm: bool
    dtype: layers.Dtype
    attention_impl: str

    @nn.compact
    def __call__(self, x, e0, context, cos, sin):
        """x [B, L, dim] f32, e0 [B, L|1, 6, dim] f32, context [B, text_len, dim], cos/sin
        [L, head_dim/2] -> (x, None)."""
        dim = x.shape[-1]
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        mod = self.param("modulation", layers.axes(_modulation_init, None, "embed"), (6, dim))
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.moveaxis(mod + e0, -2, 0)
        attn = functools.partial(Attention, self.num_heads, self.eps, self.dtype,
                                 self.attention_impl)
        y = attn(name="self_attn")(_modulate(_layer_norm(x, self.eps), shift1, scale1),
                                   rope=(cos, sin))
        x = x + y.astype(F32) * gate1
        h = x
        if self.cross_attn_norm:
            h = nn.LayerNorm(self.eps, dtype=F32, use_fast_variance=False, name="norm3",
                             scale_init=layers.axes(nn.initializers.ones, "embed"),
                             bias_init=layers.axes(nn.initializers.zeros, "embed"))(x)
        x = x + attn(name="cross_attn")(h, context=context).astype(F32)
        y = Mlp(self.ffn_dim, dim, gelu_tanh, nn.initializers.xavier_uniform(), self.dtype,
                name="ffn")(_modulate(_layer_norm(x, self.eps), shift2, scale2))
        return x + y.astype(F32) * gate2, None


def _patch_kernel_init(in_dim: int):
    """Upstream's xavier-uniform over the flattened Conv3d kernel for the first `in_dim` input
    channels (fan-in pt ph pw in_dim); zeros for the control channels after them."""
    def init(key, shape, dtype=F32):
        base = (*shape[:3], in_dim, shape[4])
        w = nn.initializers.xavier_uniform(in_axis=(0, 1, 2, 3), out_axis=4)(key, base, dtype)
        return jnp.concatenate([w, jnp.zeros((*shape[:3], shape[3] - in_dim, shape[4]), dtype)], 3)
    return init


class PatchEmbed(nn.Module):
    """Upstream's Conv3d patch embedding (kernel = stride = patch) as an einsum over patches,
    kernel [pt, ph, pw, in_dim + control_dim, dim]. The control channels are applied as a second
    einsum added last, so a zero control slice leaves the output bit for bit the base model's."""
    in_dim: int
    control_dim: int
    dim: int
    dtype: layers.Dtype

    @nn.compact
    def __call__(self, patches, control=None):
        """patches [B, gf, pt, gh, ph, gw, pw, in_dim], control the same with control_dim
        channels (None iff control_dim == 0) -> [B, gf, gh, gw, dim]."""
        pt, ph, pw = patches.shape[2], patches.shape[4], patches.shape[6]
        kernel = self.param("kernel", layers.axes(_patch_kernel_init(self.in_dim), None, None,
                                                  None, "conv_in", "embed"),
                            (pt, ph, pw, self.in_dim + self.control_dim, self.dim))
        bias = self.param("bias", layers.axes(nn.initializers.zeros, "embed"), (self.dim,))
        kernel, bias = kernel.astype(self.dtype), bias.astype(self.dtype)
        eq = "bfthpwqc,tpqcd->bfhwd"
        y = jnp.einsum(eq, patches.astype(self.dtype), kernel[..., :self.in_dim, :],
                       precision=_precision(self.dtype)) + bias
        if self.control_dim:
            y = y + jnp.einsum(eq, control.astype(self.dtype), kernel[..., self.in_dim:, :],
                               precision=_precision(self.dtype))
        return y


def add_control_channels(params: dict, control_dim: int) -> dict:
    """Base DiT params -> the same with `control_dim` zero input channels appended to the patch
    embedding kernel (the stage-3 control branch, freshly added)."""
    kernel = params["patch_embedding"]["kernel"]
    pad = jnp.zeros((*kernel.shape[:3], control_dim, kernel.shape[4]), kernel.dtype)
    return {**params, "patch_embedding": {**params["patch_embedding"],
                                          "kernel": jnp.concatenate([kernel, pad], 3)}}


def group_layers(params: dict, every: int) -> dict:
    """Base DiT params (`blocks/*` [L, ...]) -> the grouped layout of a DiT with expression blocks
    (`blocks/layers/*` [L/every, every, ...]); the expression params are not added."""
    def regroup(x):
        if x.shape[0] % every:
            raise ValueError(f"{x.shape[0]} layers cannot be grouped by expression_every={every}")
        return x.reshape(x.shape[0] // every, every, *x.shape[1:])
    return {**params, "blocks": {"layers": jax.tree.map(regroup, params["blocks"])}}


class BlockGroup(nn.Module):
    """`every` scanned WanBlocks, then an ExpressionBlock (frame-wise cross-attention to that
    latent frame's expression tokens, zero-initialised output)."""
    block: Callable
    block_args: tuple
    every: int
    num_heads: int
    eps: float
    dtype: layers.Dtype
    attention_impl: str

    @nn.compact
    def __call__(self, x, e0, context, cos, sin, expression):
        """As WanBlock, plus expression [B, F, M, D_e] (F latent frames) -> (x, None)."""
        from im_anim_jax.models.expression import ExpressionBlock  # it imports this module
        x, _ = _scan_blocks(self.block, self.every)(*self.block_args, name="layers")(
            x, e0, context, cos, sin)
        return ExpressionBlock(self.num_heads, self.eps, self.dtype, self.attention_impl,
                               name="expression")(x, expression), None


def _scan_blocks(block, length: int, extra_inputs: int = 0, axis: str = "layers"):
    """nn.scan over `length` copies of `block`: params stacked on a leading logical `axis`, every
    input after the carry broadcast."""
    return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=(nn.broadcast,) * (4 + extra_inputs), length=length,
                   metadata_params={nn.PARTITION_NAME: axis})


class Head(nn.Module):
    """Linear(LN(x) (1 + scale) + shift), (shift, scale) = modulation + e, all in float32."""
    features: int
    eps: float

    @nn.compact
    def __call__(self, x, e):  # x [B, L, dim], e [B, L|1, dim] -> [B, L, features]
        mod = self.param("modulation", layers.axes(_modulation_init, None, "embed"),
                         (2, x.shape[-1]))
        shift, scale = jnp.moveaxis(mod + e[:, :, None], -2, 0)
        return _dense(self.features, "embed", None, "head", F32, nn.initializers.zeros)(
            _modulate(_layer_norm(x, self.eps), shift, scale))


class WanDiT(nn.Module):
    """Wan2.2 DiT. `__call__(latents [B, F, H, W, in_dim], t [B] or per token [B, L],
    context [B, text_len, text_dim] (see pad_context)) -> velocity [B, F, H, W, out_dim]`, with
    L = (F/pt)(H/ph)(W/pw) tokens in (f, h, w) order (TI2V: t = 0 on clean first-frame tokens)."""
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    text_dim: int
    text_len: int
    freq_dim: int
    patch_size: tuple = (1, 2, 2)
    in_dim: int = 48
    out_dim: int = 48
    eps: float = 1e-6
    cross_attn_norm: bool = True
    dtype: layers.Dtype = F32
    attention_impl: str = "xla"
    remat_policy: str = "none"
    control_dim: int = 0
    expression_every: int = 0

    def setup(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dit.dim {self.dim} is not divisible by num_heads {self.num_heads}")
        rope_split(self.dim // self.num_heads)
        if self.freq_dim % 2:
            raise ValueError(f"dit.freq_dim {self.freq_dim} must be even")
        if self.remat_policy not in layers.REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r} not in "
                             f"{sorted(layers.REMAT_POLICIES)}")
        if self.expression_every and self.num_layers % self.expression_every:
            raise ValueError(f"dit.num_layers {self.num_layers} is not a multiple of "
                             f"expression_every {self.expression_every}")
        self.patch_embedding = PatchEmbed(self.in_dim, self.control_dim, self.dim, self.dtype)
        normal = nn.initializers.normal(0.02)
        self.text_embedding = Mlp(self.dim, self.dim, gelu_tanh, normal, self.dtype)
        self.time_embedding = Mlp(self.dim, self.dim, nn.silu, normal, F32)
        self.time_projection = layers.Projection(
            "bld,dkm->blkm", (self.dim, 6, self.dim), ("embed", None, "mlp"), (6, self.dim),
            (None, "mlp"), fan_in=(0,), fan_out=(1, 2), dtype=F32, precision=_precision(F32))
        block = WanBlock
        policy = layers.REMAT_POLICIES[self.remat_policy]
        if policy is not None:
            block = nn.remat(block, prevent_cse=False, policy=None if policy == "full" else policy)
        args = (self.ffn_dim, self.num_heads, self.eps, self.cross_attn_norm, self.dtype,
                self.attention_impl)
        if self.expression_every:
            self.blocks = _scan_blocks(BlockGroup, self.num_layers // self.expression_every,
                                       extra_inputs=1, axis="layer_groups")(
                block, args, self.expression_every, self.num_heads, self.eps, self.dtype,
                self.attention_impl)
        else:
            self.blocks = _scan_blocks(block, self.num_layers)(*args)
        self.head = Head(math.prod(self.patch_size) * self.out_dim, self.eps)

    def embed_time(self, t):
        """t [B] or [B, L] -> e [B, L|1, dim], e0 [B, L|1, 6, dim], float32."""
        t = t[:, None] if t.ndim == 1 else t
        e = self.time_embedding(sinusoid(t, self.freq_dim))
        e0 = self.time_projection(nn.silu(e))
        length = "act_length" if t.shape[1] > 1 else None
        return e, nn.with_logical_constraint(e0, ("act_batch", length, None, "act_embed"))

    def embed_text(self, context):
        """context [B, text_len, text_dim] (zero-padded, see pad_context) -> [B, text_len, dim]."""
        if context.ndim != 3 or context.shape[1:] != (self.text_len, self.text_dim):
            raise ValueError(f"context has shape {tuple(context.shape)}; expected [B, text_len="
                             f"{self.text_len}, text_dim={self.text_dim}] (see pad_context)")
        context = self.text_embedding(context)
        return nn.with_logical_constraint(context, ("act_batch", None, "act_embed"))

    def __call__(self, latents, t, context, control=None, expression=None):
        """control [B, L, pt ph pw control_dim] (token (f, h, w) order; channels (t, p, q, c)),
        expression [B, F / pt, M, D_e]: required iff control_dim / expression_every are set."""
        grid = self._check_inputs(latents, t, context, control, expression)
        (b, *_, c), (pt, ph, pw), (gf, gh, gw) = latents.shape, self.patch_size, grid
        patches = latents.reshape(b, gf, pt, gh, ph, gw, pw, c)
        if control is not None:  # token (t, p, q, c) -> the latent pixels of its patch
            control = control.reshape(b, gf, gh, gw, pt, ph, pw, self.control_dim).transpose(
                0, 1, 4, 2, 5, 3, 6, 7)
        x = self.patch_embedding(patches, control).reshape(b, gf * gh * gw, self.dim).astype(F32)
        e, e0 = self.embed_time(t)
        cos, sin = rope_tables(grid, self.dim // self.num_heads)
        inputs = (x, e0, self.embed_text(context), jnp.asarray(cos), jnp.asarray(sin))
        x, _ = self.blocks(*inputs, *(() if expression is None else (expression,)))
        x = self.head(x, e).reshape(b, gf, gh, gw, pt, ph, pw, self.out_dim)
        x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(*latents.shape[:4], self.out_dim)
        return nn.with_logical_constraint(x, ("act_batch", "act_frames", None, None, None))

    def _check_inputs(self, latents, t, context, control, expression) -> tuple[int, int, int]:
        """The patch grid (f, h, w); ValueError naming what was expected otherwise."""
        if latents.ndim != 5 or latents.shape[-1] != self.in_dim:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; expected channels-last "
                             f"[B, F, H, W, in_dim={self.in_dim}]")
        sizes = latents.shape[1:4]
        if any(s % p for s, p in zip(sizes, self.patch_size)):
            raise ValueError(f"latent (F, H, W) = {tuple(sizes)} is not divisible by the patch "
                             f"size {tuple(self.patch_size)}")
        grid = tuple(s // p for s, p in zip(sizes, self.patch_size))
        b, n = latents.shape[0], math.prod(grid)
        if t.shape not in ((b,), (b, n)):
            raise ValueError(f"t has shape {tuple(t.shape)}; expected [B={b}] or per token "
                             f"[B={b}, L={n}]")
        if context.shape[0] != b:
            raise ValueError(f"context batch {context.shape[0]} != latent batch {b}")
        width = math.prod(self.patch_size) * self.control_dim
        if (control is None) != (self.control_dim == 0) or (
                control is not None and control.shape != (b, n, width)):
            got = None if control is None else tuple(control.shape)
            raise ValueError(f"control has shape {got}; expected " + (
                f"[B={b}, L={n}, {width}] (control_dim={self.control_dim} per latent pixel)"
                if self.control_dim else "None (this DiT has no control channels)"))
        if (expression is None) != (self.expression_every == 0) or (
                expression is not None and (expression.ndim != 4
                                            or expression.shape[:2] != (b, grid[0]))):
            got = None if expression is None else tuple(expression.shape)
            raise ValueError(f"expression has shape {got}; expected " + (
                f"[B={b}, F={grid[0]}, M, D]" if self.expression_every
                else "None (this DiT has no expression blocks)"))
        return grid


def build_dit(dit_cfg: ml_collections.ConfigDict, dtype="float32", attention_impl: str = "xla",
              remat_policy: str = "none", control_dim: int = 0,
              expression_every: int = 0) -> WanDiT:
    """WanDiT from `config.model.dit`; `dtype`, `attention_impl`, `remat_policy` come from
    `config.model` (build_dit(c.model.dit, c.model.dtype, c.model.attention_impl,
    c.model.remat_policy)); stage 3 adds `control_dim` and `expression_every`."""
    return WanDiT(
        dim=dit_cfg.dim, ffn_dim=dit_cfg.ffn_dim, num_heads=dit_cfg.num_heads,
        num_layers=dit_cfg.num_layers, text_dim=dit_cfg.text_dim, text_len=dit_cfg.text_len,
        freq_dim=dit_cfg.freq_dim, patch_size=tuple(dit_cfg.patch_size), in_dim=dit_cfg.in_dim,
        out_dim=dit_cfg.out_dim, eps=dit_cfg.eps, cross_attn_norm=dit_cfg.cross_attn_norm,
        dtype=jnp.dtype(dtype), attention_impl=attention_impl, remat_policy=remat_policy,
        control_dim=control_dim, expression_every=expression_every)


def init_inputs(dit_cfg: ml_collections.ConfigDict, batch: int = 1, frames: int = 1):
    """Smallest valid (latents, t, context) for init / eval_shape (float32 zeros)."""
    pt, ph, pw = dit_cfg.patch_size
    return (jnp.zeros((batch, frames * pt, ph, pw, dit_cfg.in_dim), F32),
            jnp.zeros((batch,), F32),
            jnp.zeros((batch, dit_cfg.text_len, dit_cfg.text_dim), F32))
