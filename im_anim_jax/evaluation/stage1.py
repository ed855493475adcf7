"""Stage-1 evaluation on held-out identities: PCK, heatmap MSE, codebook usage and perplexity.

Writes WORKDIR/eval/stage1.json and WORKDIR/eval/stage1.png (driving | GT | predicted heatmaps).
PCK is also broken down by joint group and, where the dataset's index gives each clip's `framing`
(the synthetic set: full / half body), by framing.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import pipeline, records
from im_anim_jax import keypoints as kp
from im_anim_jax import evaluation, skeleton, visualize
from im_anim_jax.models.quantizer import codebook_stats
from im_anim_jax.training import stage1 as stage1_training


GROUPS = {"body": slice(0, 14), "face": slice(14, 18), "feet": slice(18, 20),
          "hands": slice(skeleton.LEFT_HAND.start, skeleton.NUM_JOINTS)}


def evaluate(config, workdir: str, data_path: str) -> dict:
    model, params, step = stage1_training.load_params(config, workdir)
    targets = stage1_training.targets(config)
    ds = pipeline.eval_dataset(data_path, config.eval.split, clip_frames=None,
                               batch_size=config.eval.batch_size, targets=targets)
    size = targets.heatmap_size
    thresholds = tuple(config.eval.pck_thresholds)

    @jax.jit
    def forward(batch):
        heatmaps, aux = model.apply({"params": params}, batch["frames"])
        pred = kp.argmax_keypoints(heatmaps, subpixel=config.eval.subpixel)
        gt = kp.image_to_heatmap(batch["keypoints"][..., :2], targets.image_size, size)
        w = batch["joint_weights"]
        dist = jnp.linalg.norm((pred - gt) / size, axis=-1)
        hits = {a: jnp.sum((dist <= a) * w, axis=1) for a in thresholds}  # per clip and joint
        sq = jnp.mean((heatmaps - batch["heatmaps"]) ** 2, axis=(-2, -1))
        return heatmaps, aux["indices"], hits, jnp.sum(sq * w), jnp.sum(w, axis=1)

    clip_hits = {a: [] for a in thresholds}  # per clip: [J] hits and [J] visible weights
    clip_w, clip_records, sq_sum = [], [], 0.0
    indices, vis, identities, frames = [], None, set(), 0
    for batch in ds:
        jb = {k: batch[k] for k in ("frames", "keypoints", "heatmaps", "joint_weights")}
        heatmaps, idx, h, sq, w = jax.device_get(forward(jb))
        for a in thresholds:
            clip_hits[a].append(np.asarray(h[a]))
        clip_w.append(np.asarray(w))
        clip_records.extend(int(r) for r in batch["record"])
        sq_sum += float(sq)
        indices.append(np.asarray(idx).reshape(-1))
        identities.update(int(i) for i in batch["identity_id"])
        frames += int(np.prod(batch["frames"].shape[:2]))
        if vis is None:
            n = config.eval.num_vis_frames
            vis = visualize.frames_heatmaps_grid(batch["frames"][0][:n], batch["heatmaps"][0][:n],
                                                 np.asarray(heatmaps[0][:n]))
    clip_hits = {a: np.concatenate(v) for a, v in clip_hits.items()}
    clip_w = np.concatenate(clip_w)
    hits, joint_w = {a: v.sum(0) for a, v in clip_hits.items()}, clip_w.sum(0)
    stats = codebook_stats(jnp.asarray(np.concatenate(indices)), config.model.quantizer.codebook_size)
    w_sum = float(joint_w.sum())
    result = {f"pck@{a}": float(hits[a].sum()) / max(w_sum, 1.0) for a in thresholds}
    for a in thresholds:  # per joint group: which joints hold the overall figure down
        for group, idx in GROUPS.items():
            result[f"pck@{a}/{group}"] = (float(hits[a][idx].sum())
                                          / max(float(joint_w[idx].sum()), 1.0))
    index = records.read_index(data_path)["splits"][config.eval.split]
    framing = np.array([index[r].get("framing") for r in clip_records], dtype=object)
    for name in sorted({f for f in framing if f is not None}):  # e.g. half-body vs full-body
        sel = framing == name
        result.update({f"pck@{a}/framing_{name}": float(clip_hits[a][sel].sum())
                       / max(float(clip_w[sel].sum()), 1.0) for a in thresholds})
        result[f"clips/framing_{name}"] = int(sel.sum())
    result.update(heatmap_mse=sq_sum / max(w_sum, 1.0),
                  **{k: float(v) for k, v in stats.items()},
                  step=int(step), split=config.eval.split, num_frames=frames,
                  num_identities=len(identities), visible_joints=int(w_sum))
    evaluation.write_report(workdir, "stage1", result, vis)
    return result
