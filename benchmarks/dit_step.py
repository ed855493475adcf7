"""Wan2.2 DiT forward + backward: JAX (jit) vs PyTorch (eager, and torch.compile on request)
on this machine's CPU cores, with JAX's achieved FLOP/s against a measured matmul peak.

  python benchmarks/dit_step.py [--preset demo] [--batch 1] [--latent 5,16,16] [--steps 5]
      [--torch-compile]

Both run the same sizes from configs/im_animation.py `wan_dit(preset)` in float32 with the same
random weights (the PyTorch model is tests/parity/torch_wan_dit.py, loaded from the converted
state dict), per-token timesteps and loss = mean(velocity^2). FLOPs are the matmul and
convolution FLOPs of the jitted step counted from its jaxpr (plan.step_flops; XLA's cost analysis
counts the scanned blocks once: it read 0.82 GFLOP for the demo step, against 2.24); the same
count is used for the PyTorch rates. The peak is a float32 2048 x 2048 matmul in JAX. Prints one
line per figure and a final JSON line.

Measured on an idle 2-core machine (demo, 320 tokens, 2.24 GFLOP per step, one run): JAX
0.148 s/step (15.1 GFLOP/s, 12.7% of a 119 GFLOP/s matmul peak; 9 s to compile), PyTorch eager
0.089 s (0.60x JAX's time). Earlier runs on shared cores: torch.compile 0.43 s, its inductor
compile ~3 min, hence opt-in.
"""
import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "configs")]
import im_animation  # noqa: E402

from im_anim_jax.convert import wan_dit  # noqa: E402
from im_anim_jax.models.wan import dit  # noqa: E402
from tests.parity.torch_wan_dit import WanModel  # noqa: E402
from benchmarks.common import matmul_peak  # noqa: E402
from im_anim_jax import plan  # noqa: E402


def timed(step, steps: int) -> tuple[float, float]:
    """(first call s, mean s of the next `steps` calls)."""
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return first, (time.perf_counter() - t0) / steps


def torch_step(model, x, t, prompts):
    def step():
        model.zero_grad(set_to_none=True)
        loss = model(x, t, prompts).pow(2).mean()
        loss.backward()
        return loss
    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo", choices=("tiny", "demo"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--latent", default="5,16,16", help="latent frames,height,width")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--torch-compile", action="store_true", help="also time torch.compile "
                   "(inductor; minutes of compiling on a few cores)")
    args = p.parse_args()
    cfg = im_animation.wan_dit(args.preset)
    f, h, w = map(int, args.latent.split(","))
    n = f * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    torch.set_num_threads(os.cpu_count())

    ref = WanModel(cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.num_layers, cfg.text_dim,
                   cfg.text_len, cfg.freq_dim)
    params = jax.tree.map(jnp.asarray, wan_dit.convert(
        {k: v.detach().numpy() for k, v in ref.state_dict().items()}, cfg))
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((args.batch, f, h, w, cfg.in_dim)).astype(np.float32)
    t = np.full((args.batch, n), 500.0, np.float32)
    t[:, :n // f] = 0  # TI2V: the clean first frame
    prompts = [rng.standard_normal((cfg.text_len // 2, cfg.text_dim)).astype(np.float32)
               for _ in range(args.batch)]

    model = dit.build_dit(cfg)
    context = dit.pad_context(prompts, cfg.text_len)
    grad = jax.jit(jax.value_and_grad(
        lambda p: jnp.mean(model.apply({"params": p}, latents, t, context) ** 2)))
    t0 = time.perf_counter()
    compiled = grad.lower(params).compile()
    jax_compile_s = time.perf_counter() - t0
    # Matmul/conv FLOPs from the jaxpr: XLA's cost analysis counts the scanned blocks once.
    flops, _ = plan.step_flops(grad, params)
    _, jax_s = timed(lambda: jax.block_until_ready(compiled(params)), args.steps)

    x_t = torch.from_numpy(latents).permute(0, 4, 1, 2, 3).contiguous()
    t_t, prompts_t = torch.from_numpy(t), [torch.from_numpy(u) for u in prompts]
    _, eager_s = timed(torch_step(ref, x_t, t_t, prompts_t), args.steps)
    compiled_s, compile_note = float("nan"), "skipped"
    if args.torch_compile:
        try:
            _, compiled_s = timed(torch_step(torch.compile(ref), x_t, t_t, prompts_t), args.steps)
            compile_note = "ok"
        except Exception as e:  # inductor needs a working C++ toolchain; report, don't fail
            compile_note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"

    peak = matmul_peak()
    out = {
        "preset": args.preset, "tokens": n * args.batch, "threads": os.cpu_count(),
        # PyTorch takes every core: other work on the machine slows it far more than XLA
        "load_average_1min": os.getloadavg()[0],
        "fwd_bwd_gflop": flops / 1e9, "jax_compile_s": jax_compile_s,
        "jax_step_s": jax_s, "torch_eager_step_s": eager_s, "torch_compile_step_s": compiled_s,
        "torch_compile": compile_note, "eager_over_jax": eager_s / jax_s,
        "compiled_over_jax": compiled_s / jax_s, "jax_gflops": flops / jax_s / 1e9,
        "torch_eager_gflops": flops / eager_s / 1e9, "matmul_peak_gflops": peak / 1e9,
        "jax_fraction_of_peak": flops / jax_s / peak,
    }
    for k, v in out.items():
        print(f"{k:>24}: {v:.4g}" if isinstance(v, float) else f"{k:>24}: {v}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
