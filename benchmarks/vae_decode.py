"""Wan2.2 VAE decode: JAX (jit; whole clip and chunked) vs PyTorch (eager, optionally
torch.compile) on this machine's cores, same random weights.

  python benchmarks/vae_decode.py [--variant demo] [--latent-frames 3] [--size 64] [--reps 3]
      [--torch-compile]
  python benchmarks/vae_decode.py --memory-only --variant paper --size 256 --latent-frames 5 13

`--memory-only` compiles encode and decode (whole clip and chunked) abstractly, nothing allocated,
and prints XLA's temp bytes per latent-frame count: chunked memory must stay flat in clip length.

The PyTorch side is the parity tests' reference VAE (tests/parity/torch_wan_vae.py), which decodes
one latent frame at a time with feature caches, as upstream. FLOPs are the matmul and
convolution FLOPs of each decode's jaxpr (plan.step_flops, as the other benchmarks count; the
chunked decode's causal caches make it cheaper than the whole clip), each divided by its own
time; the peak is a measured full-precision float32 matmul (benchmarks/common.py). Prints one line per figure and a final JSON line.
torch.compile is opt-in: on 2 cores its first call took 325 s for the demo decoder.
"""
import argparse
import functools
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

from im_anim_jax import plan  # noqa: E402
from im_anim_jax.convert import wan_vae  # noqa: E402
from im_anim_jax.models.wan import vae  # noqa: E402
from tests.parity import torch_wan_vae  # noqa: E402
from benchmarks.common import matmul_peak  # noqa: E402


def best_time(fn, reps: int) -> float:
    """Fastest of `reps` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def memory_table(cfg, size: int, latent_frames):
    """Compiled temp GiB of encode/decode, whole clip vs chunked, per latent-frame count."""
    model, params = vae.build_vae(cfg), wan_vae.abstract_params(cfg)
    print(json.dumps({"params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))}))
    rows = []
    for n in latent_frames:
        video = jax.ShapeDtypeStruct((1, 1 + 4 * (n - 1), size, size, 3), jnp.float32)
        s = size // model.space_factor
        lat = jax.ShapeDtypeStruct((1, n, s, s, cfg.z_dim), jnp.float32)
        row = {"latent_frames": n}
        for name, fn, x in (("encode", vae.encode, video), ("decode", vae.decode, lat)):
            for mode, chunked in (("whole", False), ("chunked", True)):
                mem = jax.jit(functools.partial(fn, model, chunked=chunked)).lower(
                    params, x).compile().memory_analysis()
                row[f"{name}_{mode}_temp_gib"] = round(mem.temp_size_in_bytes / 2 ** 30, 3)
        print(json.dumps(row))
        rows.append(row)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="demo", choices=im_animation.VARIANTS)
    p.add_argument("--latent-frames", type=int, nargs="+", default=[3],
                   help="video frames: 1 + 4 (n - 1); several only with --memory-only")
    p.add_argument("--size", type=int, default=64, help="video height and width (pixels)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--torch-compile", action="store_true",
                   help="also time torch.compile (inductor; slow to compile on a few cores)")
    p.add_argument("--memory-only", action="store_true",
                   help="only the compiled temp memory of encode/decode, whole vs chunked")
    args = p.parse_args()
    cfg = im_animation.get_config(args.variant).model.vae
    if args.memory_only:
        return memory_table(cfg, args.size, args.latent_frames)
    if len(args.latent_frames) != 1:
        p.error("several --latent-frames values need --memory-only")
    args.latent_frames = args.latent_frames[0]
    torch.set_num_threads(os.cpu_count())

    ref = torch_wan_vae.WanVAE(cfg.dim, cfg.dec_dim, cfg.z_dim, cfg.dim_mult, cfg.num_res_blocks,
                               cfg.temporal_downsample).eval()
    torch_wan_vae.randomise(ref, seed=0)
    params = jax.tree.map(jnp.asarray, wan_vae.convert(
        {k: v.numpy() for k, v in ref.state_dict().items()}, cfg))
    model = vae.build_vae(cfg)
    s = args.size // model.space_factor
    shape = (1, args.latent_frames, s, s, cfg.z_dim)
    latents = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    mean, inv_std = (torch.from_numpy(a) for a in vae.latent_stats(cfg.z_dim))
    z_torch = torch.from_numpy(np.moveaxis(latents, -1, 1).copy())

    # PyTorch takes every core: other work on the machine slows it far more than XLA
    out = {"variant": args.variant, "backend": jax.default_backend(), "cores": os.cpu_count(),
           "load_average_1min": os.getloadavg()[0],
           "video_shape": [1, 1 + 4 * (args.latent_frames - 1), args.size, args.size, 3]}
    for mode, chunked in (("whole", False), ("chunked", True)):
        t = time.perf_counter()
        compiled = jax.jit(functools.partial(vae.decode, model, chunked=chunked, clip=False)) \
            .lower(params, latents).compile()
        out[f"jax_{mode}_compile_s"] = time.perf_counter() - t
        out[f"jax_{mode}_s"] = best_time(
            lambda f=compiled: f(params, latents).block_until_ready(), args.reps)
        out[f"jax_{mode}_gflop"] = plan.step_flops(functools.partial(
            vae.decode, model, chunked=chunked, clip=False), params, latents)[0] / 1e9
        if not chunked:
            y = np.asarray(compiled(params, latents))
        mem = compiled.memory_analysis()
        out[f"jax_{mode}_temp_mib"] = getattr(mem, "temp_size_in_bytes", 0) / 2 ** 20
    out["argument_mib"] = getattr(mem, "argument_size_in_bytes", 0) / 2 ** 20
    out["output_mib"] = getattr(mem, "output_size_in_bytes", 0) / 2 ** 20

    with torch.no_grad():
        out["torch_eager_s"] = best_time(lambda: ref.decode(z_torch, mean, inv_std), args.reps)
        y_ref = np.moveaxis(ref.decode(z_torch, mean, inv_std).numpy(), 1, -1)
        out["max_abs_diff_jax_vs_torch"] = float(np.max(np.abs(y - y_ref)))
        if args.torch_compile:
            try:
                ref.decoder = torch.compile(ref.decoder)
                t = time.perf_counter()
                ref.decode(z_torch, mean, inv_std)
                out["torch_compile_first_call_s"] = time.perf_counter() - t
                out["torch_compile_s"] = best_time(lambda: ref.decode(z_torch, mean, inv_std),
                                                   args.reps)
            except Exception as e:  # inductor needs a working C++ toolchain on CPU
                out["torch_compile_error"] = f"{type(e).__name__}: {str(e)[:200]}"

    peak = matmul_peak()
    out["matmul_peak_gflops"] = peak / 1e9
    for mode in ("whole", "chunked"):
        achieved = out[f"jax_{mode}_gflop"] * 1e9 / out[f"jax_{mode}_s"]
        out[f"jax_{mode}_achieved_gflops"] = achieved / 1e9
        out[f"jax_{mode}_fraction_of_peak"] = achieved / peak
        for name in ("eager", "compile"):
            if f"torch_{name}_s" in out:
                out[f"torch_{name}_over_jax_{mode}"] = out[f"torch_{name}_s"] / out[f"jax_{mode}_s"]
    for k, v in out.items():
        print(f"{k:>32}: {v:.4g}" if isinstance(v, float) else f"{k:>32}: {v}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
