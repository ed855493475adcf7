"""What the benchmarks share: the machine's measured float32 matmul peak (the FLOP/s reference)."""
import time

import jax
import jax.numpy as jnp


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """FLOP/s of a jitted [n, n] @ [n, n] float32 matmul on the default device."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        f(a).block_until_ready()
    return 2 * n ** 3 * reps / (time.perf_counter() - t)
