"""Stage-3 evaluation, protocol `self`: self-reenactment on a TikTok-style folder of real videos.

Input: a folder holding videos (media.VIDEO_EXTS) and/or folders of image frames, one per video,
found and checked by video_folder.find_videos (a missing or empty folder, a video that cannot be
read or is shorter than the clip: one error naming it), read with media.read_video at the
model's resolution (resized to cover, centre-cropped, as the animate CLI does): the first
T = config.stage3.clip_frames frames of each. Frame 0 is the reference image and the clip itself
the driving video; the generated frames 1..T-1 are scored against the real frames 1..T-1 (frame 0
is the reference, so it is left out of every metric).

Metrics, baselines and conventions as the cross protocol (stage3.py, metric_suite.py). Motion
PCK: the true keypoints of a real video are unknown, so the reference keypoints are those the
stage-1 model reads from the real frames (joints it reads with a heatmap peak below
data.conf_threshold ignored). It measures agreement with what the pose reader sees in the real
video, not pose accuracy; the report says so under `pck_reference`.

Writes WORKDIR/eval/stage3_self.json, stage3_self.png (driving | reference | generated | real, the
first video) and WORKDIR/eval/stage3_self_videos/<name>.mp4 (driving | reference | generated),
then refreshes table.md, stage3_history.jsonl and stage3_metrics.png (summary.py).
"""
from __future__ import annotations

import os

import numpy as np

from im_anim_jax import evaluation, generation, media, metrics
from im_anim_jax.evaluation import metric_suite, summary
from im_anim_jax.evaluation import stage3 as cross

PCK_REFERENCE = ("the keypoints the stage-1 model reads from the real frames (the true keypoints "
                 "are unknown)")


def _read(paths: list[str], resolution, frames: int) -> tuple[np.ndarray, list[float]]:
    """(uint8 clips [B, frames, H, W, 3], fps per clip)."""
    read = [media.read_video(p, resolution, max_frames=frames) for p in paths]
    clips = np.stack([np.round(v * 255.0).astype(np.uint8) for v, _ in read])
    return clips, [fps for _, fps in read]


def video_figures(config, animator, paths: list[str], video_dir: str, networks: dict):
    """(figures per variant, a picture) over the videos at `paths`."""
    suite = metric_suite.Suite(config, cross.VARIANTS, networks)
    zeroed = cross.zero_control(animator.params, config)
    vis, bs = None, config.eval.batch_size
    for start in range(0, len(paths), bs):
        clips, fps = _read(paths[start:start + bs], animator.resolution,
                           config.stage3.clip_frames)
        batch = {"driving": clips, "reference": clips[:, 0], "target": clips}
        truth = clips[:, 1:].astype(np.float32) / 255.0
        truth_keypoints = animator.read_keypoints(truth)
        suite.add_truth(truth)
        for name in cross.VARIANTS:
            video = cross.generate_variant(animator, name, batch, zeroed,
                                           config.sampling.seed + start)
            suite.add(name, video[:, 1:], truth, *cross.motion_hits(
                animator, video[:, 1:], truth_keypoints, config))
            if name == "model":
                generated = video
        for i, path in enumerate(paths[start:start + bs]):
            stem = os.path.splitext(os.path.basename(path))[0]
            media.write_video(os.path.join(video_dir, f"{start + i:03d}_{stem}.mp4"),
                              media.side_by_side(clips[i], clips[i, 0], generated[i]), fps[i])
        if vis is None:
            vis = cross.grid(batch, generated, config.eval.num_vis_frames)
    return {n: suite.result(n) for n in cross.VARIANTS}, vis


def evaluate(config, workdir: str, paths: list[str], load=metrics.load_extractor,
             step: int | None = None) -> dict:
    """The self protocol's report on the videos at `paths` (from video_folder.find_videos; also
    written to WORKDIR/eval); `load` loads the metric networks (metrics.load_extractor's
    signature); `step`: the stage-3 checkpoint (default the newest)."""
    networks = metric_suite.load_networks(config, load)
    animator = generation.Animator.from_workdir(config, workdir, step)
    video_dir = os.path.join(workdir, "eval", "stage3_self_videos")
    os.makedirs(video_dir, exist_ok=True)
    variants, vis = video_figures(config, animator, paths, video_dir, networks)
    result = cross.report_fields(config, animator, "self", variants, PCK_REFERENCE)
    result.update(inputs_dir=os.path.dirname(paths[0]),
                  inputs=[os.path.basename(p) for p in paths],
                  scored_frames_per_video=config.stage3.clip_frames - 1,
                  videos=os.path.relpath(video_dir, workdir))
    evaluation.write_report(workdir, summary.REPORTS["self"], result, vis)
    summary.update(workdir, "self", result)
    return result
