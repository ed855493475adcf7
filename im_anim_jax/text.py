"""Text conditioning from precomputed prompt embeddings (no text encoder is run here).

File format (`config.text.embedding`): one prompt's embedding, float [L, text_dim] with
L <= dit.text_len, already cut to the prompt's token count (Wan's rule: padding comes later,
see wan.dit.pad_context), either a `.npy` array or a `.safetensors` file holding it under the
key "context". Without a file, `fixed_embedding` stands in for one fixed prompt.
"""
from __future__ import annotations

import os

import numpy as np

SAFETENSORS_KEY = "context"


def fixed_embedding(text_dim: int, length: int, seed: int) -> np.ndarray:
    """A fixed prompt embedding [length, text_dim] float32 (seeded unit normal)."""
    return np.random.default_rng(seed).standard_normal((length, text_dim)).astype(np.float32)


def load_embedding(path: str, text_len: int, text_dim: int,
                   key: str = "text.embedding") -> np.ndarray:
    """The prompt embedding at `path` (config key `key`) as float32 [L, text_dim]; ValueError
    naming what is wrong."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key}={path}: no such file (expected a .npy or "
                                f".safetensors prompt embedding [L, {text_dim}])")
    if path.endswith(".npy"):
        try:
            e = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise ValueError(f"{key}={path} is not a readable .npy array: {err}") from None
        if not isinstance(e, np.ndarray) or e.dtype.kind not in "fiu":
            raise ValueError(f"{key}={path} holds {type(e).__name__} "
                             f"{getattr(e, 'dtype', '')}, not a numeric array")
    elif path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{key}={path} is not a readable .safetensors file: "
                             f"{err}") from None
        if SAFETENSORS_KEY not in tensors:
            raise ValueError(f"{key}={path} has no tensor {SAFETENSORS_KEY!r} "
                             f"(found {sorted(tensors)})")
        e = tensors[SAFETENSORS_KEY]
    else:
        raise ValueError(f"{key}={path}: expected a .npy or .safetensors file")
    if e.ndim != 2 or e.shape[1] != text_dim or not 1 <= e.shape[0] <= text_len:
        raise ValueError(f"{key}={path} has shape {e.shape}; expected [L, {text_dim}] "
                         f"with 1 <= L <= dit.text_len={text_len}")
    if not np.all(np.isfinite(e)):
        raise ValueError(f"{key}={path} holds non-finite values")
    return e.astype(np.float32)


def _padded(e: np.ndarray, text_len: int) -> np.ndarray:
    return np.pad(e, ((0, text_len - e.shape[0]), (0, 0)))


def context(config) -> np.ndarray:
    """The run's padded prompt context [text_len, text_dim] float32 (zeros after the prompt)."""
    dit = config.model.dit
    if config.text.embedding:
        e = load_embedding(config.text.embedding, dit.text_len, dit.text_dim)
    else:
        e = fixed_embedding(dit.text_dim, min(config.text.fixed_length, dit.text_len),
                            config.text.fixed_seed)
    return _padded(e, dit.text_len)


def negative_context(config) -> np.ndarray:
    """The unconditional branch's context for classifier-free guidance [text_len, text_dim]:
    `config.text.negative_embedding` (same format; Wan2.2 samples with its encoded negative
    prompt) or, without one, zeros: the null context stage 3's text dropout trains."""
    dit = config.model.dit
    if not config.text.negative_embedding:
        return np.zeros((dit.text_len, dit.text_dim), np.float32)
    return _padded(load_embedding(config.text.negative_embedding, dit.text_len, dit.text_dim,
                                  "text.negative_embedding"), dit.text_len)
