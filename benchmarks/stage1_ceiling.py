"""Stage-1 accuracy ceilings: held-out PCK with the pose given, or read without the 1D tokens.

  python benchmarks/stage1_ceiling.py --workdir W [--variant demo] [--steps 400] [--read pose]

`--read pose` (the decode path's ceiling): an MLP maps each frame's ground-truth keypoints (x, y
in [-0.5, 0.5], visibility) to N_m l2-normalised motion tokens; the config's motion decoder and
joint decoder turn them into heatmaps. The gap between it and `evaluate.py --stage 1` is the
encoder's (reading the pose from pixels).
`--read pixels` (pixel reading without the 1D bottleneck): a ViT of the motion tokenizer's sizes
(patch embedding, positional embedding, the same transformer, no latent tokens) whose patch
tokens each predict their own heatmap cells with a linear head. If it reads no better than
stage 1, the 1D tokens are not what limits stage 1.
Both train on the stage-1 heatmap loss with the stage-1 optimizer and schedule. Uses (or
renders) the synthetic set in WORKDIR/data. Prints figures and a JSON line.
"""
import argparse
import json
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "configs")]
import im_animation  # noqa: E402

from data_pipelines import datasets, pipeline  # noqa: E402
from im_anim_jax import keypoints as kp  # noqa: E402
from im_anim_jax.evaluation import stage1 as stage1_eval  # noqa: E402
from im_anim_jax.models import layers  # noqa: E402
from im_anim_jax.models.stage1 import build_stage1, to_unit_range  # noqa: E402
from im_anim_jax.training import stage1  # noqa: E402


class PoseToHeatmaps(nn.Module):
    """keypoints [B, T, J, 3] (image pixels) -> heatmaps [B, T, J, Hh, Wh]."""
    model: nn.Module   # a Stage1Model: its decode() is used
    image_size: int
    num_tokens: int
    token_size: int

    @nn.compact
    def __call__(self, keypoints, conf_threshold):
        b, t = keypoints.shape[:2]
        x = jnp.concatenate([keypoints[..., :2] / self.image_size - 0.5,
                             (keypoints[..., 2:] >= conf_threshold).astype(jnp.float32)], -1)
        x = nn.gelu(nn.Dense(512, name="pose_in")(x.reshape(b, t, -1)))
        z = nn.Dense(self.num_tokens * self.token_size, name="pose_out")(x)
        z = z.reshape(b, t, self.num_tokens, self.token_size)
        return self.model.decode(z / jnp.linalg.norm(z, axis=-1, keepdims=True))


class PixelsToHeatmaps(nn.Module):
    """frames [B, T, H, W, 3] uint8 -> heatmaps [B, T, J, Hh, Wh]: ViT patch tokens, each
    predicting the (Hh / grid) x (Wh / grid) heatmap cells under its patch for every joint."""
    image_size: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    num_joints: int
    heatmap_size: int

    @nn.compact
    def __call__(self, frames):
        b, t = frames.shape[:2]
        grid = self.image_size // self.patch_size
        cell = self.heatmap_size // grid
        x = to_unit_range(frames).reshape((b * t,) + frames.shape[2:])
        x = nn.Conv(self.width, (self.patch_size,) * 2, strides=self.patch_size,
                    padding="VALID", name="patch_embed")(x).reshape(b * t, grid * grid, -1)
        x = x + self.param("positional_embedding", nn.initializers.normal(self.width ** -0.5),
                           (grid * grid, self.width))
        x = layers.Transformer(self.depth, self.num_heads, name="transformer")(
            nn.LayerNorm(name="ln_pre")(x))
        x = nn.Dense(self.num_joints * cell * cell, name="head")(nn.LayerNorm(name="ln_post")(x))
        x = x.reshape(b, t, grid, grid, self.num_joints, cell, cell)
        return x.transpose(0, 1, 4, 2, 5, 3, 6).reshape(
            b, t, self.num_joints, self.heatmap_size, self.heatmap_size)


def _network(config, read: str):
    """(module, batch key it reads, extra apply args) for `read` ("pose" or "pixels")."""
    enc, jd = config.model.motion_tokenizer, config.model.joint_decoder
    if read == "pose":
        return (PoseToHeatmaps(build_stage1(config.model), enc.image_size, enc.num_latent_tokens,
                               enc.token_size), "keypoints", (config.data.conf_threshold,))
    if read != "pixels":
        raise ValueError(f"read must be 'pose' or 'pixels', got {read!r}")
    grid = enc.image_size // enc.patch_size
    if jd.heatmap_size % grid:
        raise ValueError(f"--read pixels needs the heatmap size ({jd.heatmap_size}) to be a "
                         f"multiple of the patch grid ({grid})")
    return (PixelsToHeatmaps(enc.image_size, enc.patch_size, enc.width, enc.depth, enc.num_heads,
                             jd.num_joints, jd.heatmap_size), "frames", ())


def ceiling(config, workdir: str, read: str = "pose", log=print) -> dict:
    """Trains the `read` network (see the module docstring) for config.stage1.steps; held-out PCK
    by framing."""
    cfg = config.stage1
    net, key, extra = _network(config, read)
    data_path = datasets.resolve(config, workdir)
    t = stage1.targets(config)
    it = iter(pipeline.train_dataset(data_path, "train", clip_frames=cfg.clip_frames,
                                     batch_size=cfg.batch_size, targets=t, seed=config.seed))
    keys = (key, "heatmaps", "joint_weights")
    params = net.init(jax.random.key(config.seed), next(it)[key], *extra)["params"]
    tx = stage1.make_optimizer(cfg)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, batch):
        def loss(p):
            h = net.apply({"params": p}, batch[key], *extra)
            return stage1.heatmap_loss(h, batch["heatmaps"], batch["joint_weights"])
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, value

    t0 = time.perf_counter()
    for i in range(cfg.steps):
        batch = next(it)
        params, opt, value = step(params, opt, {k: batch[k] for k in keys})
        if (i + 1) % cfg.log_every == 0 or i + 1 == cfg.steps:
            log(f"step {i + 1}/{cfg.steps} heatmap_loss {float(value):.4g} "
                f"({time.perf_counter() - t0:.0f} s)")

    predict = jax.jit(lambda x: kp.argmax_keypoints(
        net.apply({"params": params}, x, *extra), subpixel=config.eval.subpixel))
    thresholds = tuple(config.eval.pck_thresholds)
    hits, weights, clip_records = {a: [] for a in thresholds}, [], []
    for batch in pipeline.eval_dataset(data_path, config.eval.split, clip_frames=None,
                                       batch_size=config.eval.batch_size, targets=t):
        h = stage1_eval.clip_hits(np.asarray(predict(batch[key])), batch["keypoints"],
                                  batch["joint_weights"], t, thresholds)
        for a in thresholds:
            hits[a].append(h[a])
        weights.append(batch["joint_weights"].sum(1))
        clip_records.extend(int(r) for r in batch["record"])
    result = stage1_eval.pck_figures({a: np.concatenate(v) for a, v in hits.items()},
                                     np.concatenate(weights), data_path, config.eval.split,
                                     clip_records)
    return dict(result, read=read, steps=cfg.steps, seconds=round(time.perf_counter() - t0, 1))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="its data/ holds (or receives) the data set")
    p.add_argument("--variant", default="demo", choices=im_animation.VARIANTS)
    p.add_argument("--steps", type=int, default=None, help="default: config.stage1.steps")
    p.add_argument("--read", default="pose", choices=("pose", "pixels"),
                   help="pose: the decode path given the true pose; pixels: a ViT without the "
                        "1D tokens reading heatmaps from the frames")
    args = p.parse_args()
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    config = im_animation.get_config(args.variant)
    if args.steps is not None:
        config.stage1.steps = args.steps
    try:
        result = ceiling(config, args.workdir, args.read, log=lambda m: print(m, flush=True))
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    what = "decode path, pose given" if args.read == "pose" else "pixels read without 1D tokens"
    pck = result["pck@0.1"]  # a "not computed: ..." string when no joint was visible
    print(f"stage-1 ceiling after {config.stage1.steps} steps ({what}): held-out pck@0.1 "
          f"{pck if isinstance(pck, str) else f'{pck:.3f}'}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
