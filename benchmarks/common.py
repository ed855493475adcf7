"""What the benchmarks share: the machine's measured float32 matmul peak (the FLOP/s reference)."""
import time

import jax
import jax.numpy as jnp


def matmul_peak(n: int | None = None, reps: int = 10) -> float:
    """FLOP/s of one device on a jitted [n, n] @ [n, n] float32 matmul at full precision
    (Precision.HIGHEST: no TF32 or bf16 passes). n defaults to 2048 on CPU and 8192 on an
    accelerator, where a smaller matmul mostly times its launch; the reps are dispatched
    together and waited for once."""
    if n is None:
        n = 2048 if jax.default_backend() == "cpu" else 8192
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: jnp.matmul(a, a, precision=jax.lax.Precision.HIGHEST))
    f(a).block_until_ready()
    t = time.perf_counter()
    jax.block_until_ready([f(a) for _ in range(reps)])
    return 2 * n ** 3 * reps / (time.perf_counter() - t)
