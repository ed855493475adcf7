"""Weak- and strong-scaling sweep of a stage's training step over mesh shapes: CSV + PNG of step
time, collective bytes and memory per device against the device count.

  python benchmarks/scaling.py --config configs/im_animation.py:tiny --stage 1 \\
      --devices 1,2,4,8 --axis fsdp --per_device_batch 2 --out runs/scaling
  python benchmarks/scaling.py --config configs/im_animation.py:paper --stage 3 --mfu   # GPU host

Each point builds the mesh {axis: n} over the first n devices, compiles the trainer's step
(im_anim_jax.plan: the same compiled executable gives XLA's memory analysis, FLOPs and the
collectives of its HLO) and times `--steps` calls on random parameters and inputs of the right
shapes (placed by the step's shardings). Weak scaling: global batch = per_device_batch x n;
strong scaling: global batch = per_device_batch x max(devices), fixed. Without accelerators the
devices are simulated CPU devices (this script sets jax_num_cpu_devices = max(devices)) sharing
the host's cores, so the step times show the partitioning's overhead, not a speed-up; collective
bytes and memory per device are the real per-device figures.

FLOPs are counted from the step's jaxpr (im_anim_jax.plan.step_flops: matmuls and convolutions,
each scanned layer counted). --mfu adds one row per device count on the real devices: the stage's
step in bfloat16 with cuDNN attention (GPU), its achieved TFLOP/s and MFU = model FLOPs (XLA
attention unblocked, no remat) / step time / (--peak_tflops per device; default by device kind:
H100/H200 989, H100 PCIe 756, H100 NVL 835, A100 312 dense bf16; on CPU a measured float32
matmul peak and XLA attention, which only exercises the code path; an unknown kind without
--peak_tflops is refused before the sweeps). --sweeps '' skips the float32 sweeps (a GPU host's MFU run alone).

Outputs OUT/scaling.csv (one row per point) and OUT/scaling.png; the last stdout line is JSON.
--profile also traces one step per point into OUT/profile/<sweep>_<n>/ (perfetto trace + the
step's HLO) and prints its top kernels and model scopes (benchmarks/profile_summary.py).
"""
import argparse
import csv
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "configs")]

# Dense bf16 per device, by device kind (the first name the kind contains: PCIe and NVL before
# the SXM H100 and H200).
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200 NVL": 835.0,
               "H200": 989.0, "A100": 312.0}
FIELDS = ("sweep", "devices", "mesh", "global_batch", "step_s", "flops_per_step",
          "achieved_tflops", "mfu", "collective_gib", "all_gather_gib", "reduce_scatter_gib",
          "all_reduce_gib", "all_to_all_gib", "collective_permute_gib", "peak_gib", "params_gib",
          "compile_s")


def synthetic_args(args):
    """Arrays of the ShapeDtypeStructs in `args`, made by one jitted program on their shardings:
    floats 0.02 sin(a hash of the element index and the leaf; params, moments, inputs), its
    absolute value for Adam's second moments (`nu`: a negative one made the first update NaN, so
    every timed step was a skipped one), integers in [0, 255] from the hash's top byte (pixels),
    step counters 0. No RNG: with a real model's leaf count it compiled for minutes (threefry)
    or 36 s for the tiny config (RBG)."""
    import jax
    import jax.numpy as jnp
    paths, tree = jax.tree_util.tree_flatten_with_path(args)
    leaves = [x for _, x in paths]
    second_moment = [any(getattr(k, "name", None) == "nu" for k in path) for path, _ in paths]

    def fill(i, x):
        if x.shape == ():
            return jnp.zeros((), x.dtype)
        n = jax.lax.broadcasted_iota(jnp.uint32, x.shape, 0)
        for d in range(1, len(x.shape)):
            n = n * jnp.uint32(x.shape[d]) + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d)
        h = (n ^ jnp.uint32(i * 0x9E3779B9 % 2 ** 32)) * jnp.uint32(2654435761)  # Knuth's hash
        h = h ^ (h >> 15)
        if jnp.issubdtype(x.dtype, jnp.floating):
            v = 0.02 * jnp.sin(h.astype(jnp.float32))
            return (jnp.abs(v) if second_moment[i] else v).astype(x.dtype)
        return (h >> 24).astype(x.dtype)

    made = jax.jit(lambda: [fill(i, x) for i, x in enumerate(leaves)],
                   out_shardings=[x.sharding for x in leaves])()
    return jax.tree.unflatten(tree, made)


def model_flops(config, stage: int, mesh) -> float:
    """Model FLOPs of one step (all devices): plan.step_flops of the step traced with XLA
    attention, unblocked, and no remat (a cuDNN attention call has no matmuls in the jaxpr;
    recomputation, including that of query-blocked attention, is not model work), the numerator
    of MFU."""
    import functools
    import sys
    from unittest import mock

    import flax.linen as nn
    import jax

    from im_anim_jax import plan, sharding
    from im_anim_jax.models import layers
    config = config.copy_and_resolve_references()
    config.model.attention_impl, config.model.remat_policy = "xla", "none"
    unblocked = functools.partial(layers.query_blocked_attention, max_scores=sys.maxsize)
    with mock.patch.object(layers, "query_blocked_attention", unblocked):
        step, args = plan.stage_step(config, stage, mesh)
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(config.mesh)):
            return plan.step_flops(step, *args)[0]


def measure(config, stage: int, mesh, steps: int, flops: float | None = None,
            profile: str | None = None) -> dict:
    """Compiled step figures (plan) plus the mean time of `steps` calls after one warm-up;
    `flops` (all devices, per step; default plan.step_flops of this step) is the FLOP count.
    `profile`: a directory; one more step is traced there and its summary printed."""
    import flax.linen as nn
    import jax

    from im_anim_jax import plan, sharding
    rules = sharding.rules(config.mesh)
    t0 = time.perf_counter()
    step, args = plan.stage_step(config, stage, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):  # as the trainers' run_step
        compiled = step.lower(*args).compile()
        flops = flops or plan.step_flops(step, *args)[0]
    compile_s = time.perf_counter() - t0
    print(f"   compiled in {compile_s:.0f} s", flush=True)
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    coll = plan.collective_bytes(hlo, mesh.size)
    print(f"   HLO read after {time.perf_counter() - t0:.0f} s", flush=True)
    state, *rest = synthetic_args(args)
    print(f"   inputs made after {time.perf_counter() - t0:.0f} s", flush=True)
    state = compiled(state, *rest)[0]  # warm-up
    jax.block_until_ready(state)
    print(f"   warm-up step done after {time.perf_counter() - t0:.0f} s", flush=True)
    t0 = time.perf_counter()
    for _ in range(steps):
        state = compiled(state, *rest)[0]
    jax.block_until_ready(state)
    step_s = (time.perf_counter() - t0) / steps
    print(f"   {step_s:.3f} s per step", flush=True)
    if profile:
        from benchmarks import profile_summary
        with jax.profiler.trace(profile, create_perfetto_trace=True):
            state = compiled(state, *rest)[0]
            jax.block_until_ready(state)
        with open(os.path.join(profile, "step.hlo.txt"), "w") as f:
            f.write(hlo)
        print(profile_summary.report(profile_summary.summarize(profile, hlo)), flush=True)
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes)
    out = {"devices": mesh.size, "mesh": "x".join(f"{k}{v}" for k, v in mesh.shape.items()),
           "global_batch": config[f"stage{stage}"].batch_size, "step_s": step_s,
           "flops_per_step": flops, "achieved_tflops": flops / step_s / 1e12,
           "collective_gib": sum(coll[k]["bytes"] for k in plan.KINDS) / plan.GIB,
           "peak_gib": peak / plan.GIB,
           "params_gib": sum(plan._shard_bytes(x) for x in jax.tree.leaves(args[0].params))
           / plan.GIB, "compile_s": compile_s}
    for k in plan.KINDS:
        out[k.replace("-", "_") + "_gib"] = coll[k]["bytes"] / plan.GIB
    return out


def point(base, stage: int, axis: str, n: int, batch: int):
    """`base` with mesh {axis: n} and stage<stage>.batch_size = batch; and the mesh."""
    import jax

    from im_anim_jax import sharding
    config = base.copy_and_resolve_references()
    config.mesh.shape.update({a: (n if a == axis else 1) for a in sharding.MESH_AXES})
    config[f"stage{stage}"].batch_size = batch
    return config, sharding.make_mesh(config.mesh, jax.devices()[:n])


def peak_tflops(device, given: float | None) -> float:
    """Per-device peak: --peak_tflops, the table by device kind, or (CPU) a measured matmul."""
    if given:
        return given
    for name, tflops in PEAK_TFLOPS.items():
        if name in device.device_kind:
            return tflops
    if device.platform == "cpu":
        from benchmarks.common import matmul_peak
        return matmul_peak() / 1e12
    raise ValueError(f"unknown peak for {device.device_kind!r}: pass --peak_tflops")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for sweep in sorted({r["sweep"] for r in rows}):  # "mfu": the bf16 (+cuDNN on GPU) rows
        pts = sorted((r for r in rows if r["sweep"] == sweep), key=lambda r: r["devices"])
        x = [r["devices"] for r in pts]
        for ax, key, label in zip(axes, ("step_s", "collective_gib", "peak_gib"),
                                  ("step time (s)", "collective GiB sent per device per step",
                                   "peak memory per device (GiB)")):
            ax.plot(x, [r[key] for r in pts], "o-", label=sweep)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("devices")
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.suptitle("training-step scaling (weak: batch per device fixed; strong: global batch "
                 "fixed)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def trace_dir(args, sweep: str, n: int) -> str | None:
    return os.path.join(args.out, "profile", f"{sweep}_{n}") if args.profile else None


def main():
    from im_anim_jax.models import layers
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/im_animation.py:tiny", help="file.py:variant")
    p.add_argument("--stage", type=int, default=1, choices=(1, 2, 3))
    p.add_argument("--devices", default="1,2,4,8", help="device counts of the sweep")
    p.add_argument("--axis", default="fsdp", choices=("data", "fsdp", "context", "tensor"),
                   help="the mesh axis that grows (the others stay 1)")
    p.add_argument("--per_device_batch", type=int, default=2)
    p.add_argument("--frames", type=int, default=None, help="clip frames (default the stage's)")
    p.add_argument("--size", type=int, default=None, help="stages 2-3: height = width of the "
                   "reference and generated video (model.video_size; default the config's). "
                   "Stage 1's frames are model.motion_tokenizer.image_size")
    p.add_argument("--steps", type=int, default=3, help="timed steps per point")
    p.add_argument("--out", default="runs/scaling")
    p.add_argument("--remat", default=None, choices=tuple(layers.REMAT_POLICIES),
                   help="model.remat_policy (default the config's)")
    p.add_argument("--sweeps", default="weak,strong", help="scaling sweeps to run: weak, strong, "
                   "both or '' (e.g. only the --mfu rows on a GPU host)")
    p.add_argument("--mfu", action="store_true", help="bf16 + cuDNN MFU rows (see the doc)")
    p.add_argument("--peak_tflops", type=float, default=None)
    p.add_argument("--profile", action="store_true", help="trace one more step of each point "
                   "into OUT/profile/<sweep>_<devices> and print where its device time goes")
    p.add_argument("--model_flops", type=float, default=None, help="the --mfu rows' model "
                   "FLOPs per step per device, when already counted (skips that trace)")
    args = p.parse_args()
    counts = sorted({int(c) for c in args.devices.split(",")})
    import jax
    jax.config.update("jax_num_cpu_devices", max(counts))  # the CPU backend only
    if jax.device_count() < max(counts):
        raise SystemExit(f"{jax.device_count()} devices; the sweep needs {max(counts)}")
    import importlib.util
    path, _, variant = args.config.partition(":")
    spec = importlib.util.spec_from_file_location("config_module", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    base = module.get_config(variant) if variant else module.get_config()
    from im_anim_jax import plan as planner
    if args.remat:
        base.model.remat_policy = args.remat
    if args.stage == 1 and args.size is not None:
        raise SystemExit("error: --size sets model.video_size, which stage 1 does not read; its "
                         "frames are model.motion_tokenizer.image_size")
    try:
        base, _ = planner.configure(base, args.stage, "data=1", args.frames, args.size, args.size,
                                    None)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None

    os.makedirs(args.out, exist_ok=True)
    rows = []
    sweeps = [w for w in args.sweeps.split(",") if w]
    if not set(sweeps) <= {"weak", "strong"}:
        raise SystemExit(f"--sweeps {args.sweeps!r}: expected a comma list of weak, strong")
    if args.mfu:  # before the sweeps: an unknown device kind must not cost their results
        try:
            peak = peak_tflops(jax.devices()[0], args.peak_tflops)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    for sweep in sweeps:
        for n in counts:
            batch = args.per_device_batch * (n if sweep == "weak" else max(counts))
            config, mesh = point(base, args.stage, args.axis, n, batch)
            row = dict(sweep=sweep, mfu="", **measure(config, args.stage, mesh, args.steps,
                                                      profile=trace_dir(args, sweep, n)))
            rows.append(row)
            print(f"{sweep:>6} {n:3d} devices ({row['mesh']}), batch {batch}: "
                  f"{row['step_s']:.3f} s/step, {row['collective_gib']:.4f} GiB collectives, "
                  f"{row['peak_gib']:.4f} GiB peak per device", flush=True)
    if args.mfu:
        gpu = jax.devices()[0].platform == "gpu"
        mfu_base = base.copy_and_resolve_references()
        mfu_base.model.dtype = "bfloat16" if gpu else mfu_base.model.dtype
        mfu_base.model.attention_impl = "cudnn" if gpu else "xla"
        for n in counts:
            config, mesh = point(mfu_base, args.stage, args.axis, n, args.per_device_batch * n)
            flops = (args.model_flops * n if args.model_flops
                     else model_flops(config, args.stage, mesh))
            row = dict(sweep="mfu", **measure(config, args.stage, mesh, args.steps, flops,
                                              trace_dir(args, "mfu", n)))
            row["mfu"] = row["achieved_tflops"] / (peak * n)
            rows.append(row)
            print(f"   mfu {n:3d} devices: {row['achieved_tflops']:.3f} TFLOP/s achieved, MFU "
                  f"{row['mfu']:.1%} of {peak:.4g} TFLOP/s per device "
                  f"({config.model.dtype}, {config.model.attention_impl} attention)", flush=True)
    with open(os.path.join(args.out, "scaling.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in FIELDS} for r in rows)
    plot(rows, os.path.join(args.out, "scaling.png"))
    print(json.dumps({"csv": os.path.join(args.out, "scaling.csv"),
                      "png": os.path.join(args.out, "scaling.png"), "rows": rows}))


if __name__ == "__main__":
    main()
