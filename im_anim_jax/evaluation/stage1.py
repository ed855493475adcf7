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
    thresholds = tuple(config.eval.pck_thresholds)

    @jax.jit
    def forward(batch):
        heatmaps, aux = model.apply({"params": params}, batch["frames"])
        pred = kp.argmax_keypoints(heatmaps, subpixel=config.eval.subpixel)
        w = batch["joint_weights"]
        hits = clip_hits(pred, batch["keypoints"], w, targets, thresholds)
        sq = jnp.mean((heatmaps - batch["heatmaps"]) ** 2, axis=(-2, -1))
        return heatmaps, aux["indices"], hits, jnp.sum(sq * w), jnp.sum(w, axis=1)

    per_clip = {a: [] for a in thresholds}  # per clip: [J] hits and [J] visible weights
    clip_w, clip_records, sq_sum = [], [], 0.0
    indices, vis, identities, frames = [], None, set(), 0
    for batch in ds:
        jb = {k: batch[k] for k in ("frames", "keypoints", "heatmaps", "joint_weights")}
        heatmaps, idx, h, sq, w = jax.device_get(forward(jb))
        for a in thresholds:
            per_clip[a].append(np.asarray(h[a]))
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
    clip_w = np.concatenate(clip_w)
    w_sum = float(clip_w.sum())
    stats = codebook_stats(jnp.asarray(np.concatenate(indices)), config.model.quantizer.codebook_size)
    result = pck_figures({a: np.concatenate(v) for a, v in per_clip.items()}, clip_w,
                         data_path, config.eval.split, clip_records)
    result.update(heatmap_mse=sq_sum / max(w_sum, 1.0),
                  **{k: float(v) for k, v in stats.items()},
                  step=int(step), split=config.eval.split, num_frames=frames,
                  num_identities=len(identities), visible_joints=int(w_sum))
    evaluation.write_report(workdir, "stage1", result, vis)
    return result


def clip_hits(pred_xy, keypoints, weights, targets, thresholds) -> dict:
    """Per clip and joint, the weighted count of frames within alpha * heatmap size (Euclidean,
    in heatmap pixels) of the ground truth. pred_xy [B, T, J, 2] in heatmap pixels, keypoints
    [B, T, J, 3] in image pixels, weights [B, T, J] -> {alpha: [B, J]}; jnp or np."""
    xp = jnp if isinstance(pred_xy, jnp.ndarray) else np
    size = targets.heatmap_size
    gt = kp.image_to_heatmap(keypoints[..., :2], targets.image_size, size)
    dist = xp.linalg.norm((pred_xy - gt) / size, axis=-1)
    return {a: xp.sum((dist <= a) * weights, axis=1) for a in thresholds}


def pck_figures(hits: dict, weights, data_path: str, split: str, clip_records) -> dict:
    """hits {alpha: [N, J]} and weights [N, J] per clip (records `clip_records` of `split`) ->
    `pck@a`, per joint group, and per clip framing where the dataset index records one."""
    joint_w, none = weights.sum(0), "no visible joints"
    result = {f"pck@{a}": evaluation.ratio(float(h.sum()), float(joint_w.sum()), none)
              for a, h in hits.items()}
    for a, h in hits.items():  # per joint group: which joints hold the overall figure down
        for group, idx in GROUPS.items():
            result[f"pck@{a}/{group}"] = evaluation.ratio(float(h[:, idx].sum()),
                                                          float(joint_w[idx].sum()), none)
    index = records.read_index(data_path)["splits"][split]
    framing = np.array([index[r].get("framing") for r in clip_records], dtype=object)
    for name in sorted({f for f in framing if f is not None}):  # e.g. half-body vs full-body
        sel = framing == name
        result.update({f"pck@{a}/framing_{name}": evaluation.ratio(
            float(h[sel].sum()), float(weights[sel].sum()), none) for a, h in hits.items()})
        result[f"clips/framing_{name}"] = int(sel.sum())
    return result
