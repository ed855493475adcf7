"""Stage-1 training step: time, achieved FLOP/s vs the machine's matmul peak, compiled memory.

  python benchmarks/stage1_step.py [--variant demo] [--batch 16] [--steps 10]

FLOPs are the matmul and convolution FLOPs of the loss's forward + backward, counted from its
jaxpr (plan.step_flops: scanned layers times their number; XLA's cost analysis counts a scanned
stack once, which read 5.49 GFLOP for the demo step against 13.2 counted this way). The
optimizer update, the dead-code restart and elementwise work are not counted, so the figure
slightly understates the work. The peak is a measured full-precision float32 matmul
(benchmarks/common.py) on one device, times the devices the step runs on. Compiled memory is
XLA's memory analysis of the training step itself (params, optimizer state and batch as
arguments). Prints one line per figure and a JSON line.
"""
import argparse
import json
import os
import sys
import time

import flax.linen as nn
import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "configs")]
import im_animation  # noqa: E402

from im_anim_jax import sharding  # noqa: E402
from im_anim_jax.models.stage1 import build_stage1  # noqa: E402
from im_anim_jax.training import stage1  # noqa: E402
from benchmarks.common import matmul_peak  # noqa: E402
from im_anim_jax import plan  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="demo", choices=im_animation.VARIANTS)
    p.add_argument("--batch", type=int, default=None, help="clips per step (default: config)")
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    c = im_animation.get_config(args.variant)
    if args.batch:
        c.stage1.batch_size = args.batch
    mesh, rules = sharding.make_mesh(c.mesh), sharding.rules(c.mesh)
    model, tx = build_stage1(c.model), stage1.make_optimizer(c.stage1)
    state, _, state_sh = stage1.init_state(model, tx, c, mesh, rules)
    b, t, s = c.stage1.batch_size, c.stage1.clip_frames, c.model.motion_tokenizer.image_size
    h = c.model.joint_decoder.heatmap_size
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, s - 1, (b, t, 62, 2))
    batch = sharding.global_batch({
        "frames": rng.integers(0, 255, (b, t, s, s, 3), dtype=np.uint8),
        "keypoints": np.concatenate([xy, np.ones((b, t, 62, 1))], -1).astype(np.float32),
        "heatmaps": rng.uniform(0, 1, (b, t, 62, h, h)).astype(np.float32),
        "joint_weights": np.ones((b, t, 62), np.float32)}, mesh)

    step_fn = stage1.make_train_step(model, tx, c, mesh, rules, state_sh)
    def fwd_bwd(st, bt):  # forward + backward of the loss
        return jax.grad(
            lambda p: stage1.forward_metrics(model, p, bt, c.model, c.stage1.vq_loss_weight,
                                             c.stage1.patch_heatmap_weight,
                                             c.stage1.heatmap_ce_weight,
                                             c.stage1.heatmap_ce_temperature)[0]["loss"])(st.params)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        mem = plan.jitted_step(step_fn).lower(state, batch).compile().memory_analysis()
        flops, _ = plan.step_flops(fwd_bwd, state, batch)

    t0 = time.perf_counter()
    state, m = step_fn(state, batch)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, m = step_fn(state, batch)
        jax.block_until_ready(state)
    step_s = (time.perf_counter() - t0) / args.steps
    peak = matmul_peak() * jax.device_count()  # the step runs on every device (data=-1)
    out = {
        "variant": args.variant, "backend": jax.default_backend(), "devices": jax.device_count(),
        "frames_per_step": b * t, "step_s": step_s, "frames_per_s": b * t / step_s,
        "compile_s": compile_s, "fwd_bwd_gflop": flops / 1e9,
        "achieved_gflops": flops / step_s / 1e9, "matmul_peak_gflops": peak / 1e9,
        "fraction_of_peak": flops / step_s / peak,
        "temp_mib": getattr(mem, "temp_size_in_bytes", 0) / 2 ** 20,
        "argument_mib": getattr(mem, "argument_size_in_bytes", 0) / 2 ** 20,
    }
    for k, v in out.items():
        print(f"{k:>20}: {v:.4g}" if isinstance(v, float) else f"{k:>20}: {v}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
