"""Flow-matching sampler for stage 3 (Wan2.2 TI2V conventions).

Convention (one place): x_s = (1 - s) * x0 + s * eps with s in [0, 1] (s = 1 is pure noise);
the model predicts the velocity v = eps - x0 = dx/ds and sampling integrates s from 1 down to 0.
The DiT's timestep is t = 1000 * s (rounded down to an integer when sampling, as Wan2.2 does:
`schedule`; the solver keeps the unrounded s). Solvers: Euler, and UniPC (order 2, "bh2",
data/x0-prediction form, as Wan2.2's `FlowUniPCMultistepScheduler`) with flow-matching
alpha = 1 - s, sigma = s.

In that form every UniPC update from s_a to s_b reads x_b = r * x_a + (1 - r) * D with
r = s_b / s_a and D a combination of x0-predictions m = x - s * v (alpha_b * (1 - e^{-h}) =
1 - r with h = lambda_b - lambda_a, lambda = log(alpha / sigma)), so the ends s = 1 and s = 0
(lambda = -inf, +inf) are exact: the first step is Euler, and the last (first-order) one is x = m.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

VelocityFn = Callable[[jax.Array, float], jax.Array]
METHODS = ("euler", "unipc")
NUM_TRAIN_TIMESTEPS = 1000  # the DiT's t = 1000 x sigma


def shift_timesteps(u, shift: float):
    """Wan's timestep shift s = shift * u / (1 + (shift - 1) * u) for u in [0, 1] (np or jnp array
    of any shape, or a float); shift = 1 is the identity, shift > 1 spends more time near noise."""
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * u / (1 + (shift - 1) * u)


def _check_steps(num_steps) -> int:
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps}")
    return int(num_steps)


def shifted_sigmas(num_steps: int, shift: float) -> np.ndarray:
    """[num_steps + 1] float64 noise levels from exactly 1 down to exactly 0 (shifted linspace;
    Wan2.2's `get_sampling_sigmas`, its dpm++ path, with the final 0)."""
    sigmas = shift_timesteps(np.linspace(1.0, 0.0, _check_steps(num_steps) + 1), shift)
    sigmas[0], sigmas[-1] = 1.0, 0.0
    return sigmas


def unipc_sigmas(num_steps: int, shift: float,
                 num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[np.ndarray, np.ndarray]:
    """Wan2.2's UniPC schedule (`FlowUniPCMultistepScheduler(shift=1).set_timesteps(N, shift)`):
    (sigmas [N + 1], float32 values as float64: the shifted linspace from the training schedule's
    largest sigma 1 - 1/num_train_timesteps (float32) down to 0, without its last point, then 0;
    timesteps [N] int64: the DiT's t, 1000 x the shifted float64 sigma rounded down)."""
    n = _check_steps(num_steps)
    sigma_max = float(np.float32(1.0 - 1.0 / num_train_timesteps))
    shifted = shift_timesteps(np.linspace(sigma_max, 0.0, n + 1)[:-1], shift)
    timesteps = (shifted * num_train_timesteps).astype(np.int64)
    sigmas = np.append(shifted, 0.0).astype(np.float32).astype(np.float64)
    return sigmas, timesteps


def schedule(method: str, num_steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas [N + 1] for `sample`, the DiT's integer timesteps [N]) as Wan2.2 makes them for
    `method`: UniPC's own schedule (`unipc_sigmas`), `shifted_sigmas` for Euler (Wan2.2's
    dpm++ path's); timesteps are 1000 x sigma rounded down, as Wan2.2 hands them to the DiT."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if method == "unipc":
        return unipc_sigmas(num_steps, shift)
    sigmas = shifted_sigmas(num_steps, shift)
    return sigmas, (sigmas[:-1] * NUM_TRAIN_TIMESTEPS).astype(np.int64)


def cfg(v_cond, v_uncond, scale: float):
    """Classifier-free guidance: v_uncond + scale * (v_cond - v_uncond) (scale 1 = conditional)."""
    return v_uncond + scale * (v_cond - v_uncond)


def guided(velocity_fn: Callable[[jax.Array, float, bool], jax.Array], scale: float) -> VelocityFn:
    """velocity_fn(x, sigma, cond) -> the guided velocity_fn(x, sigma) for `sample`; at scale 1
    the unconditional branch is never evaluated."""
    def fn(x, sigma):
        v_cond = velocity_fn(x, sigma, True)
        if scale == 1:
            return v_cond
        return cfg(v_cond, velocity_fn(x, sigma, False), scale)
    return fn


@jax.jit
def _mix(coefs: jax.Array, *arrays: jax.Array) -> jax.Array:
    """sum_k coefs[k] * arrays[k] in the dtype of arrays[0] (coefs [K], arrays of one shape)."""
    out = coefs[0] * arrays[0]
    for c, a in zip(coefs[1:], arrays[1:]):
        out = out + c * a
    return out.astype(arrays[0].dtype)


def _lam(sigma: float) -> float:
    """Flow-matching log-SNR log((1 - sigma) / sigma), +-inf at the ends."""
    if sigma <= 0:
        return math.inf
    if sigma >= 1:
        return -math.inf
    return math.log1p(-sigma) - math.log(sigma)


def _bh2_b(h: float) -> tuple[float, float]:
    """UniPC's right-hand side (b_1, b_2) for B(h) = expm1(-h) (bh2, data prediction), finite h."""
    hh = -h
    b_h = math.expm1(hh)
    k1 = b_h / hh - 1  # the h_phi_k recursion: k_{j+1} = k_j / hh - 1 / (j + 1)!
    k2 = k1 / hh - 0.5
    return k1 / b_h, 2 * k2 / b_h


def _predictor(sig: np.ndarray, i: int, order: int) -> list[float]:
    """UniP coefficients of x_{i+1} on (x_i, m_i[, m_{i-1}])."""
    r = sig[i + 1] / sig[i]
    if order == 1:
        return [r, 1 - r]
    rk = (_lam(sig[i - 1]) - _lam(sig[i])) / (_lam(sig[i + 1]) - _lam(sig[i]))
    c = 0.5 / rk  # rhos_p = [0.5] for order 2; 0 when s_{i-1} = 1 (rk = -inf)
    return [r, (1 - r) * (1 - c), (1 - r) * c]


def _corrector(sig: np.ndarray, i: int, order: int) -> list[float]:
    """UniC coefficients of the corrected x_i on (x_{i-1}, m_{i-1}, m_i[, m_{i-2}]); m_i is the
    x0-prediction at the predicted x_i, `order` that of the predictor that made it."""
    r = sig[i] / sig[i - 1]
    if order == 1:
        return [r, 0.5 * (1 - r), 0.5 * (1 - r)]
    h = _lam(sig[i]) - _lam(sig[i - 1])
    rk = (_lam(sig[i - 2]) - _lam(sig[i - 1])) / h
    b1, b2 = _bh2_b(h)
    rho_prev = (b1 - b2) / (1 - rk)  # solve [[1, 1], [rk, 1]] @ (rho_prev, rho_t) = (b1, b2)
    rho_t, c = b1 - rho_prev, rho_prev / rk
    return [r, (1 - r) * (1 - c - rho_t), (1 - r) * rho_t, (1 - r) * c]


def _check_sigmas(sigmas) -> np.ndarray:
    sig = np.asarray(sigmas, np.float64)
    if sig.ndim != 1 or sig.shape[0] < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 entries, got shape {sig.shape}")
    if not (np.all(np.isfinite(sig)) and sig[0] <= 1 and np.all(np.diff(sig) < 0)):
        raise ValueError(f"sigmas must be strictly decreasing within [0, 1], got {sig}")
    if sig[-1] != 0:
        raise ValueError(f"sigmas must end at exactly 0, got last = {sig[-1]}")
    return sig


def sample(velocity_fn: VelocityFn, noise: jax.Array, sigmas, method: str = "euler",
           clamp: Optional[Callable[[jax.Array], jax.Array]] = None, progress: bool = False,
           desc: str = "sampling") -> jax.Array:
    """Integrate dx/ds = velocity_fn(x, s) from noise (any shape, at sigmas[0]) down to s = 0.

    sigmas: [N + 1] strictly decreasing, last exactly 0 (e.g. `shifted_sigmas`); N model calls,
    each with s as a python float. clamp(x) -> x is applied to the noise and after every step
    (e.g. to hold the first latent frame at the clean reference, as TI2V does; for UniPC to each
    predictor output, as Wan, so every model input is clamped).
    method: "euler" (x += (s_next - s) * v) or "unipc" (2nd-order UniP-UniC, bh2, lower-order
    final step). Returns x at s = 0, dtype of `noise`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    sig = _check_sigmas(sigmas)
    n = len(sig) - 1
    clamp = clamp or (lambda x: x)
    x = clamp(jnp.asarray(noise))

    def coefs(values):  # at least float32 even for bf16 latents
        return np.asarray(values, np.result_type(x.dtype, np.float32))

    # UniPC: order 1 at the first and last step, 2 in between
    orders = [1 if i in (0, n - 1) else 2 for i in range(n)]
    x_last = ms = None  # corrector inputs: last corrected x, x0-predictions (newest last)
    for i in tqdm(range(n), desc=desc, unit="step", disable=not progress):
        v = velocity_fn(x, float(sig[i]))
        if method == "euler":
            x = clamp(_mix(coefs([1.0, sig[i + 1] - sig[i]]), x, v))
        else:
            m = _mix(coefs([1.0, -sig[i]]), x, v)
            if i > 0:  # UniC with the evaluation at the predicted x_i (no extra model call)
                x = _mix(coefs(_corrector(sig, i, orders[i - 1])), x_last, ms[-1], m, *ms[:-1])
            ms, x_last = (ms[-1:] if ms else []) + [m], x
            x = clamp(_mix(coefs(_predictor(sig, i, orders[i])), x, *ms[::-1][:orders[i]]))
        if progress:
            jax.block_until_ready(x)
    return x
