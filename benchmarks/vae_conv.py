"""The Wan VAE's 3x3x3 causal convolution on CPU: XLA's 3D convolution vs the same conv as one 2D
conv with the time taps folded into channels (what models/wan/vae.py runs on CPU), forward and
forward+backward, at the demo VAE's shapes. Prints ms per call and the speed-up.

  python benchmarks/vae_conv.py [--reps 3]
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from im_anim_jax.models.wan import vae

SHAPES = [(8, 7, 32, 32, 16, 16), (8, 5, 16, 16, 32, 32), (4, 19, 32, 32, 16, 16)]  # B,T,H,W,C,F


def conv3d(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1, 1), ((0, 0), (1, 1), (1, 1)),
                                        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


def folded(x, k):
    return vae._conv3d_as_2d(x, k, (1, 1, 1), ((0, 0), (1, 1), (1, 1)))


def ms(fn, args, reps):
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    for _ in range(reps):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t) / reps * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    reps = parser.parse_args().reps
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s)")
    for b, t, h, w, c, f in SHAPES:
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((b, t, h, w, c)), jnp.float32)
        k = jnp.asarray(0.1 * rng.standard_normal((3, 3, 3, c, f)), jnp.float32)
        row = {}
        for name, fn in (("conv3d", conv3d), ("folded2d", folded)):
            grad = jax.jit(jax.grad(lambda x, k, fn=fn: jnp.sum(fn(x, k) ** 2), argnums=(0, 1)))
            row[name] = (ms(jax.jit(fn), (x, k), reps), ms(grad, (x, k), reps))
        (f3, g3), (f2, g2) = row["conv3d"], row["folded2d"]
        print(f"x {(b, t, h, w, c)} -> {f}: conv3d fwd {f3:.1f} ms, fwd+bwd {g3:.1f} ms | folded "
              f"fwd {f2:.1f} ms, fwd+bwd {g2:.1f} ms | speed-up {f3 / f2:.1f}x / {g3 / g2:.1f}x")


if __name__ == "__main__":
    main()
