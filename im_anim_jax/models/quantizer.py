"""Vector quantizer with an l2-normalised codebook (TiTok's VQ), straight-through estimator."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from im_anim_jax.models import layers


def _l2_normalize(x, eps=1e-12):
    # Matches torch.nn.functional.normalize: x / max(||x||, eps).
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class VectorQuantizer(nn.Module):
    codebook_size: int
    token_size: int
    commitment_cost: float = 0.25
    use_l2_norm: bool = True

    @nn.compact
    def __call__(self, z):
        """z [..., C] -> (z_q [..., C] straight-through, aux dict).

        aux: indices [...] (int32), z (the inputs as searched, l2-normalised if so configured),
        commitment_loss = cost * mean((sg(z_q) - z)^2),
        codebook_loss = mean((z_q - sg(z))^2), loss = their sum. With use_l2_norm both z and the
        codes are l2-normalised before the nearest-code search (argmin squared distance).
        """
        if z.shape[-1] != self.token_size:
            raise ValueError(f"quantizer expects token size {self.token_size}, got {z.shape}")
        k = self.codebook_size
        codebook = self.param(
            "embedding",
            layers.axes(lambda key, s, d=jnp.float32: jax.random.uniform(key, s, d, -1 / k, 1 / k),
                        "codebook", None),
            (k, self.token_size))
        z = z.astype(jnp.float32)
        if self.use_l2_norm:
            z, codebook = _l2_normalize(z), _l2_normalize(codebook)
        dist = (jnp.sum(z ** 2, -1, keepdims=True) + jnp.sum(codebook ** 2, -1)
                - 2 * jnp.einsum("...c,kc->...k", z, codebook))
        indices = jnp.argmin(dist, axis=-1).astype(jnp.int32)
        z_q = codebook[indices]
        commitment = self.commitment_cost * jnp.mean((jax.lax.stop_gradient(z_q) - z) ** 2)
        codebook_loss = jnp.mean((z_q - jax.lax.stop_gradient(z)) ** 2)
        z_st = z + jax.lax.stop_gradient(z_q - z)
        return z_st, {"indices": indices, "commitment_loss": commitment, "z": z,
                      "codebook_loss": codebook_loss, "loss": commitment + codebook_loss}


def code_vectors(embedding, indices, use_l2_norm: bool = True):
    """The codes `indices` [...] name, exactly: [..., C] rows of the codebook `embedding` [K, C]
    (l2-normalised as the quantizer compares them). The quantizer's straight-through output
    z + sg(z_q - z) equals them only up to float32 rounding of the continuous z."""
    codebook = _l2_normalize(embedding) if use_l2_norm else embedding
    return codebook[indices]


def codebook_stats(indices, codebook_size: int):
    """Usage (fraction of codes hit) and perplexity (exp entropy of code frequencies)."""
    counts = jnp.bincount(indices.reshape(-1), length=codebook_size).astype(jnp.float32)
    p = counts / jnp.maximum(counts.sum(), 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return {"codebook_usage": jnp.mean(counts > 0), "codebook_perplexity": jnp.exp(entropy)}


def restart_dead_codes(codebook, usage, indices, z, key, *, decay: float, threshold: float):
    """Jukebox/SoundStream-style dead-code restart (a training-time remedy for codebook collapse).

    usage [K] is an EMA of how often each code is picked per batch; codes whose EMA falls below
    `threshold` are replaced by encoder outputs z [..., C] of this batch, each by a different one
    (drawn without replacement), and their EMA reset to 1. With more dead codes than the batch's
    N outputs, the first N (by index) restart now and the rest at the next steps: two codes on one
    output would tie, and argmin would never pick the second. Returns (codebook, usage, number
    restarted).
    """
    k = codebook.shape[0]
    counts = jnp.bincount(indices.reshape(-1), length=k).astype(jnp.float32)
    usage = decay * usage + (1 - decay) * counts
    dead = usage < threshold
    flat = jax.lax.stop_gradient(z).reshape(-1, z.shape[-1])
    n = flat.shape[0]
    rank = jnp.cumsum(dead) - 1                                   # [K] place among the dead
    restart = dead & (rank < n)
    pick = jax.random.permutation(key, n)[jnp.clip(rank, 0, n - 1)]
    codebook = jnp.where(restart[:, None], flat[pick].astype(codebook.dtype), codebook)
    return codebook, jnp.where(restart, 1.0, usage), jnp.sum(restart)
