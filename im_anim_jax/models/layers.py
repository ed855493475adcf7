"""Shared transformer building blocks: attention, pre-LN residual block, scanned/remat stacks.

Logical axes: params `embed`, `mlp`, `heads`, `head_dim`, `layers`; activations `act_batch`,
`act_length`, `act_embed`, `act_heads`.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
ATTENTION_IMPLS = ("xla", "cudnn", "auto")
# XLA attention takes its queries in blocks when Lq x Lk exceeds this (per batch element and head;
# 256 MiB of fp32 scores): the demo retargeter over a 601-frame driving video (21,664 tokens), the
# DiT at 704x1280 x 81 frames (19,360); not the 256 px training shapes (1,408 DiT tokens).
MAX_SCORES = 1 << 26
REMAT_POLICIES = {
    "none": None,
    "full": "full",
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def axes(init_fn, *names):
    """`init_fn` whose parameter carries the logical axis `names`."""
    return nn.with_logical_partitioning(init_fn, names)


def cudnn_supports(q, k) -> bool:
    """Whether cuDNN flash attention takes q [B, Lq, H, D], k [B, Lk, H, D], forward and backward:
    a GPU, bf16/fp16, D a multiple of 8 and <= 256 (Hopper and later; 128 before). Odd Lq or Lk
    (its backward rejects them) go through `even_length_attention`."""
    if jax.default_backend() != "gpu" or q.dtype not in (jnp.bfloat16, jnp.float16):
        return False
    capability = getattr(jax.devices()[0], "compute_capability", "0")
    max_dim = 256 if float(capability) >= 9.0 else 128
    return q.shape[-1] % 8 == 0 and q.shape[-1] <= max_dim


def even_length_attention(q, k, v, implementation: str):
    """jax.nn.dot_product_attention with an odd Lq / Lk padded by one to even (cuDNN's backward
    rejects odd lengths: "Unsupported sequence length Q 25, KV 25" on jax 0.11.2, H200; e.g.
    TiTok's 16x16 patches + 32 latents + 1 class token = 289): the padded key masked by
    key_value_seq_lengths, the padded query row dropped.
    q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D]."""
    (b, lq), lk = q.shape[:2], k.shape[1]
    if lq % 2 == 0 and lk % 2 == 0:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)

    def even(x):
        return jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, 0), (0, 0)))
    out = jax.nn.dot_product_attention(
        even(q), even(k), even(v), query_seq_lengths=jnp.full((b,), lq, jnp.int32),
        key_value_seq_lengths=jnp.full((b,), lk, jnp.int32), implementation=implementation)
    return out[:, :lq]


def attention(q, k, v, implementation: str = "xla"):
    """Softmax attention. q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D].

    `implementation`: "xla" everywhere; "cudnn": cuDNN flash wherever `cudnn_supports` the shapes
    (XLA for the rest, e.g. the VAE's single 640-wide head); ValueError off GPU or outside
    bf16/fp16; "auto": "cudnn" on GPU in half precision, else "xla".
    """
    if implementation not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation {implementation!r} not in {ATTENTION_IMPLS}")
    if implementation == "cudnn" and (jax.default_backend() != "gpu"
                                      or q.dtype not in (jnp.bfloat16, jnp.float16)):
        raise ValueError(f"attention_impl 'cudnn' needs a GPU and bfloat16/float16 activations; "
                         f"got backend {jax.default_backend()!r}, dtype {q.dtype} (use 'auto' or "
                         f"'xla', or model.dtype='bfloat16')")
    if implementation != "xla" and cudnn_supports(q, k):
        return even_length_attention(q, k, v, "cudnn")
    return query_blocked_attention(q, k, v)


def query_blocked_attention(q, k, v, max_scores: int = MAX_SCORES):
    """XLA attention whose scores hold at most `max_scores` elements per batch element and head
    at a time: above Lq x Lk = max_scores, blocks of queries in sequence (lax.map), each
    recomputed in the backward pass (jax.checkpoint), so memory is O(block x Lk), not
    O(Lq x Lk) (Rabe & Staats, 2021). Each query row's softmax is the unblocked one. The bound
    ignores B and H: under jit they are global shapes, not what one device holds.
    q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D]."""
    b, lq, h, d = q.shape
    if lq * k.shape[1] <= max_scores:
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")
    block = max(1, max_scores // k.shape[1])
    n = -(-lq // block)
    blocks = jnp.pad(q, ((0, 0), (0, n * block - lq), (0, 0), (0, 0)))
    blocks = blocks.reshape(b, n, block, h, d).swapaxes(0, 1)
    out = jax.lax.map(jax.checkpoint(
        lambda qb: jax.nn.dot_product_attention(qb, k, v, implementation="xla")), blocks)
    return out.swapaxes(0, 1).reshape(b, n * block, h, v.shape[-1])[:, :lq]


def layer_norm(name: str, dtype: Dtype, eps: float = 1e-5) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name,
                        scale_init=axes(nn.initializers.ones, "embed"),
                        bias_init=axes(nn.initializers.zeros, "embed"))


def dense(features: int, in_axis: str, out_axis: str, name: str, dtype: Dtype) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, name=name,
                    kernel_init=axes(nn.initializers.xavier_uniform(), in_axis, out_axis),
                    bias_init=axes(nn.initializers.zeros, out_axis))


class Projection(nn.Module):
    """y = einsum(equation, x, kernel) + bias with an explicitly shaped, logically named kernel.

    (nn.DenseGeneral initialises a flattened kernel, which breaks logical sharding constraints.)
    `.kernel` / `.bias` are readable from the parent, to fuse several projections of one input
    into one einsum (see wan.dit.Attention).
    """
    equation: str
    kernel_shape: tuple
    kernel_axes: tuple
    bias_shape: tuple
    bias_axes: tuple
    fan_in: tuple
    fan_out: tuple
    batch: tuple = ()
    dtype: Dtype = jnp.float32
    precision: Any = None  # jax.lax.Precision for the einsum (None: the backend default)

    def setup(self):
        init = nn.initializers.xavier_uniform(in_axis=self.fan_in, out_axis=self.fan_out,
                                              batch_axis=self.batch)
        self.kernel = self.param("kernel", axes(init, *self.kernel_axes), self.kernel_shape)
        self.bias = self.param("bias", axes(nn.initializers.zeros, *self.bias_axes),
                               self.bias_shape)

    def __call__(self, x):
        y = jnp.einsum(self.equation, x.astype(self.dtype), self.kernel.astype(self.dtype),
                       precision=self.precision)
        return y + self.bias.astype(self.dtype)


class MultiHeadAttention(nn.Module):
    """Self-attention with a fused q,k,v in-projection (PyTorch nn.MultiheadAttention maths).

    in_proj kernel [W, 3, H, D] (q, k, v order), out_proj kernel [H, D, W].
    """
    num_heads: int
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x):  # [B, L, W] -> [B, L, W]
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        head_dim = width // self.num_heads
        qkv = Projection("blw,wkhd->blkhd", (width, 3, self.num_heads, head_dim),
                         ("embed", None, "heads", "head_dim"), (3, self.num_heads, head_dim),
                         (None, "heads", "head_dim"),
                         fan_in=(0,), fan_out=(2, 3), batch=(1,), dtype=self.dtype,
                         name="in_proj")(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = nn.with_logical_constraint(q, ("act_batch", "act_length", "act_heads", None))
        out = attention(q, k, v, self.attention_impl)
        return Projection("blhd,hdw->blw", (self.num_heads, head_dim, width),
                          ("heads", "head_dim", "embed"), (width,), ("embed",),
                          fan_in=(0, 1), fan_out=(2,),
                          dtype=self.dtype, name="out_proj")(out)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x += MHA(ln_1(x)); x += MLP(ln_2(x)), MLP = W -> 4W, exact GELU, -> W."""
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, _=None):
        width = x.shape[-1]
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        x = x + MultiHeadAttention(self.num_heads, self.dtype, self.attention_impl, name="attn")(
            layer_norm("ln_1", self.dtype)(x))
        h = layer_norm("ln_2", self.dtype)(x)
        h = dense(int(width * self.mlp_ratio), "embed", "mlp", "c_fc", self.dtype)(h)
        h = nn.gelu(h, approximate=False)
        x = x + dense(width, "mlp", "embed", "c_proj", self.dtype)(h)
        return x, None


class Transformer(nn.Module):
    """`depth` ResidualAttentionBlocks stacked with nn.scan (params get a leading `layers` axis),
    each rematerialised by `remat_policy` (a key of REMAT_POLICIES). The residual stream is
    float32 whatever `dtype` computes in (as the DiT's, and PyTorch autocast's): its output is
    float32."""
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, x):  # [B, L, W]
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r} not in {sorted(REMAT_POLICIES)}")
        block = ResidualAttentionBlock
        policy = REMAT_POLICIES[self.remat_policy]
        if policy is not None:
            block = nn.remat(block, prevent_cse=False,
                             policy=None if policy == "full" else policy)
        stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=self.depth, metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = stack(self.num_heads, self.mlp_ratio, self.dtype, self.attention_impl,
                     name="blocks")(x.astype(jnp.float32), None)
        return x


def embedding_param(module: nn.Module, name: str, shape, scale: float, *names):
    """A learned embedding initialised as scale * N(0, 1) (TiTok's convention)."""
    init = functools.partial(_scaled_normal, scale=scale)
    return module.param(name, axes(init, *names), shape)


def _scaled_normal(key, shape, dtype=jnp.float32, scale=1.0):
    return scale * jax.random.normal(key, shape, dtype)
