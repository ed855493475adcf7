"""Stage-3 evaluation, protocol `cross`: cross-reenactment on held-out identities and motions
(motion-consistent, identity-inconsistent pairs, as the paper's 50-pair benchmark). The `self`
protocol (a folder of real videos) is in stage3_self.py.

Pairs: the held-out split's cross-identity pairs (identity A drives, identity B's image is the
reference, B performing the same motion is the ground truth), the first `eval.stage3_pairs` in
rounds over the held-out driving clips (each clip's next partner per round; clips and partners
in orders `eval.pair_seed` fixes), so they cover the clips as evenly as their number allows.
(Until a later session they were the first pairs in index order, every partner of each clip:
the demo's 32 covered 3 of its 8 driving identities and 2 of its 4 motions.)
Per variant, against B's true frames: L1, PSNR*, SSIM, LPIPS, FID, FVD (metric_suite.py: DisCo's
conventions, sample counts, "not computed: ..." without converted weights), and motion accuracy:
keypoints read back from the generated frames by the stage-1 heatmap model, PCK against B's
ground-truth keypoints. Baselines on the same pairs: `reference_repeated` (the reference image as
every frame) and `control_zeroed` (the model with M_ret's control channels' patch-embedding weights
zeroed: no retargeted motion reaches the DiT). A ceiling beside them, `vae_reconstruction`: B's
true frames encoded and decoded by the run's VAE, the best the latent generator can reach.

Drift: one long held-out clip (4 windows of stage3.clip_frames) is generated in windows
(generation.py) and PSNR* / PCK are reported per window, so error growth across windows is a
number. Writes WORKDIR/eval/stage3.json, stage3.png (driving | reference | generated | truth)
and the videos in WORKDIR/eval/stage3_videos/, then refreshes table.md, stage3_history.jsonl and
stage3_metrics.png (summary.py).
"""
from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from data_pipelines import pipeline, records, synthetic
from im_anim_jax import evaluation, generation, media, metrics
from im_anim_jax import keypoints as kp
from im_anim_jax.evaluation import metric_suite, summary
from im_anim_jax.metrics import image as image_metrics
from im_anim_jax.models import stage3 as stage3_model
from im_anim_jax.training import stage1 as stage1_training

BASELINES = ("reference_repeated", "control_zeroed")
CEILINGS = ("vae_reconstruction",)
VARIANTS = ("model",) + BASELINES + CEILINGS


def zero_control(params: dict, config) -> dict:
    """Stage-3 params with M_ret's control channels' patch-embedding kernel slice set to zero
    (the reference channels of model.reference_control stay)."""
    pe = params["dit"]["patch_embedding"]
    start = config.model.dit.in_dim
    stop = start + stage3_model.motion_control_dim(config.model)
    kernel = jnp.asarray(pe["kernel"]).at[..., start:stop, :].set(0.0)
    return {**params, "dit": {**params["dit"], "patch_embedding": {**pe, "kernel": kernel}}}


def motion_hits(animator, frames, gt_keypoints, config) -> tuple[dict, float]:
    """({alpha: joints within alpha}, visible joints) of the keypoints the stage-1 model reads
    back from `frames` [B, T, H, W, 3] in [0, 1] against gt_keypoints [B, T, J, 3] (joints with
    conf < data.conf_threshold ignored)."""
    pred = animator.read_keypoints(frames)[..., :2]
    size, hm = config.model.motion_tokenizer.image_size, config.model.joint_decoder.heatmap_size
    weights = (gt_keypoints[..., 2] >= config.data.conf_threshold).astype(np.float32)
    out = kp.pck(kp.image_to_heatmap(pred, size, hm), kp.image_to_heatmap(
        gt_keypoints[..., :2], size, hm), weights, hm, tuple(config.eval.pck_thresholds))
    visible = float(weights.sum())
    return {a: float(v) * max(visible, 1.0) for a, v in out.items()}, visible


def generate_variant(animator, name: str, batch, params_zeroed, seed: int):
    reference, driving = batch["reference"], batch["driving"]
    if name == "reference_repeated":
        ref = reference.astype(np.float32) / 255.0
        return np.repeat(ref[:, None], driving.shape[1], 1)
    if name == "vae_reconstruction":
        return animator.reconstruct(batch["target"])
    return animator.generate(reference, driving, seed=seed,
                             params=params_zeroed if name == "control_zeroed" else None)


def pair_figures(config, animator, data_path: str, video_dir: str, networks: dict):
    """(figures per variant, a picture, number of pairs); `networks`: metric_suite's."""
    ds = pipeline.pair_eval_dataset(data_path, config.eval.split,
                                    clip_frames=config.stage3.clip_frames,
                                    batch_size=config.eval.batch_size,
                                    targets=stage1_training.targets(config),
                                    seed=config.eval.pair_seed, spread=True)
    zeroed = zero_control(animator.params, config)
    suite = metric_suite.Suite(config, VARIANTS, networks)
    done, vis = 0, None
    for batch in ds:
        n = min(len(batch["record"]), config.eval.stage3_pairs - done)
        if n <= 0:
            break
        batch = {k: v[:n] for k, v in batch.items()}
        truth = batch["target"].astype(np.float32) / 255.0
        suite.add_truth(truth)
        for name in VARIANTS:
            video = generate_variant(animator, name, batch, zeroed, config.sampling.seed + done)
            suite.add(name, video, truth, *motion_hits(animator, video,
                                                       batch["target_keypoints"], config))
            if name == "model":
                generated = video
        for i in range(n):
            media.write_video(os.path.join(video_dir, f"pair{done + i:03d}.mp4"),
                              media.side_by_side(batch["driving"][i], batch["reference"][i],
                                                 generated[i], batch["target"][i]), fps=8)
        if vis is None:
            vis = grid(batch, generated, config.eval.num_vis_frames)
        done += n
    return {n: suite.result(n) for n in VARIANTS}, vis, done


def grid(batch, generated, num_frames: int) -> np.ndarray:
    """Rows (first pair, `num_frames` frames): driving | reference | generated | ground truth."""
    to8 = lambda x: np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8)
    idx = np.linspace(0, generated.shape[1] - 1, num_frames).round().astype(int)
    rows = [np.concatenate([batch["driving"][0][t], batch["reference"][0], to8(generated[0][t]),
                            batch["target"][0][t]], 1) for t in idx]
    return np.concatenate(rows, 0)


def _synthetic_args(data_path: str) -> dict | None:
    """The generator arguments of the synthetic set at `data_path` (its index), else None."""
    meta = records.read_index(data_path).get("metadata", {})
    return meta if meta.get("generator") == "synthetic" else None


def long_clip(config, data_path: str, windows: int = 4):
    """A held-out long clip: (driving A [T, ...], reference B [H, W, 3], truth B [T, ...],
    truth keypoints [T, J, 3]) uint8/float32, T = clip + (windows - 1) (clip - overlap),
    rendered by the generator of the synthetic set at `data_path` (its index's arguments, so
    identities and motion are held out from that set, whatever config.data.synthetic says);
    ValueError for data of another origin."""
    syn = _synthetic_args(data_path)
    if syn is None:
        raise ValueError(f"the data at {data_path} is not the synthetic set: no held-out long "
                         f"clip to render")
    size = config.model.motion_tokenizer.image_size
    clip, overlap = config.stage3.clip_frames, config.sampling.overlap_frames
    t = clip + (windows - 1) * (clip - overlap)
    ident = [synthetic.make_identity(syn["seed"], syn["num_train_identities"] + i, size)
             for i in range(2)]
    motion = synthetic.make_motion(syn["seed"], syn["num_train_motions"])
    other = synthetic.make_motion(syn["seed"], syn["num_train_motions"] + 1)
    driving, _ = synthetic.render_clip(ident[0], motion, t, size)
    truth, truth_kp = synthetic.render_clip(ident[1], motion, t, size)
    reference, _ = synthetic.render_clip(ident[1], other, 1, size)
    return driving, reference[0], truth, truth_kp


def drift_figures(config, animator, data_path: str, video_dir: str) -> dict:
    """Per-window PSNR* and motion PCK@0.1 over a 4-window held-out clip, each window scored on
    the frames it adds to the video (after the first, its first `overlap_frames` are the previous
    window's)."""
    if _synthetic_args(data_path) is None:
        return {"window_psnr_star": "not computed: the drift clip is rendered by the synthetic "
                                    "generator, and the evaluated data is not the synthetic set"}
    driving, reference, truth, truth_kp = long_clip(config, data_path)
    video = animator.generate(reference[None], driving[None], seed=config.sampling.seed)[0]
    media.write_video(os.path.join(video_dir, "long_clip.mp4"),
                      media.side_by_side(driving, reference, video, truth), fps=8)
    _, starts = generation.windows(len(driving), config.stage3.clip_frames,
                                   config.sampling.overlap_frames)
    truth = truth.astype(np.float32) / 255.0
    psnr, pck = [], []
    overlap = config.sampling.overlap_frames
    for i, s in enumerate(starts):
        w = slice(s + (overlap if i else 0), s + config.stage3.clip_frames)
        psnr.append(float(image_metrics.psnr_star(video[w], truth[w]).mean()))
        hits, visible = motion_hits(animator, video[None, w], truth_kp[None, w], config)
        pck.append(evaluation.ratio(hits[0.1], visible, "no visible keypoints"))
    return {"frames": len(driving), "window_starts": [int(s) for s in starts],
            "window_psnr_star": psnr, "window_motion_pck@0.1": pck,
            "psnr_star_change_last_vs_first": psnr[-1] - psnr[0]}


def report_fields(config, animator, protocol: str, variants: dict, pck_reference: str) -> dict:
    """What both protocols' reports hold: the model's figures at the top level, the baselines'
    under `baselines`, the ceilings' under `ceilings`, and how they were made."""
    return {**variants["model"], "baselines": {n: variants[n] for n in BASELINES},
            "ceilings": {n: variants[n] for n in CEILINGS},
            "protocol": protocol, "pck_reference": pck_reference, "step": int(animator.step),
            "clip_frames": config.stage3.clip_frames, "fvd_frames": config.eval.fvd_frames,
            "sampler": {k: config.sampling[k] for k in ("method", "steps", "shift", "guidance")}}


def evaluate(config, workdir: str, data_path: str, load=metrics.load_extractor,
             step: int | None = None) -> dict:
    """The cross protocol's report (also written to WORKDIR/eval); `load` loads the metric
    networks (metrics.load_extractor's signature); `step`: the stage-3 checkpoint (default the
    newest)."""
    networks = metric_suite.load_networks(config, load)
    animator = generation.Animator.from_workdir(config, workdir, step)
    video_dir = os.path.join(workdir, "eval", "stage3_videos")
    os.makedirs(video_dir, exist_ok=True)
    variants, vis, pairs = pair_figures(config, animator, data_path, video_dir, networks)
    result = report_fields(config, animator, "cross", variants,
                           "the target identity's ground-truth keypoints")
    result.update(drift=drift_figures(config, animator, data_path, video_dir), pairs=pairs,
                  split=config.eval.split, videos=os.path.relpath(video_dir, workdir))
    evaluation.write_report(workdir, summary.REPORTS["cross"], result, vis)
    summary.update(workdir, "cross", result)
    return result
