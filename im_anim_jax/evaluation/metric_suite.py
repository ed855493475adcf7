"""Video metrics of the stage-3 protocols, per variant, DisCo-style (ARCHITECTURE.md section 8).

Conventions (DisCo's scripts and pytorch-fid unless said otherwise):
- L1, PSNR*, SSIM (metrics.image, float64) and LPIPS: one value per generated frame against its
  ground-truth frame, averaged over every scored frame. L1 is the mean |a - b| in [0, 1] units
  (DisCo's L1 is 255 L1 / (H W)); SSIM uses the 11x11 Gaussian window; LPIPS is v0.1 on [0, 1]
  pixels without the 2x - 1, as DisCo's compute_lpips (eval.lpips_rescale=True: [-1, 1]).
- FID: InceptionV3 pool3 features [2048] of every generated frame against those of every
  ground-truth frame (the network resizes each frame bilinearly to 299 px, as pytorch-fid).
- FVD: I3D logits [400] of the first eval.fvd_frames (16) frames of every video, generated
  against ground truth (the network resizes every frame to 224 px); videos shorter than that
  give no FVD (cross: the first 16 of the demo's 17 frames; self: its 16 scored frames).
- The networks see eval.metric_batch frames per call (I3D: metric_batch // fvd_frames clips).
- Both stream through float64 `FeatureStats` (only a D x D scatter matrix per set is held) and
  are reported with their sample counts (`fid_samples`, `fvd_samples`): with fewer samples than
  feature dimensions the covariances are singular and the distance is degenerate, comparable
  only between runs with the same counts.
- A network whose converted weights are not configured (eval.metric_weights) or absent makes
  its metric the string "not computed: ..." naming the missing file, in place of the number.
"""
from __future__ import annotations

import collections

import numpy as np

from im_anim_jax import evaluation, metrics
from im_anim_jax.metrics import frechet
from im_anim_jax.metrics import image as image_metrics

KINDS = {"lpips": "lpips", "fid": "inception", "fvd": "i3d"}  # metric -> its network
GROUND_TRUTH = "ground_truth"


def _unconfigured(kind: str) -> str:
    source, metric, _ = metrics.SOURCES[kind]
    return (f"not computed: {metric} needs the converted {kind} weights ({source}), and "
            f"config.eval.metric_weights.{kind} is empty; make them with: "
            f"{metrics.conversion_command(kind, 'DIR')} and pass "
            f"--config.eval.metric_weights.{kind}=DIR")


def load_networks(config, load=metrics.load_extractor) -> dict:
    """{kind: extractor, or its "not computed: ..." string} for inception, i3d and lpips, from
    config.eval.metric_weights; `load` has metrics.load_extractor's signature."""
    nets = {}
    for kind in ("inception", "i3d", "lpips"):
        path = config.eval.metric_weights[kind]
        options = {"rescale": config.eval.lpips_rescale} if kind == "lpips" else {}
        try:
            nets[kind] = load(kind, path, **options) if path else _unconfigured(kind)
        except metrics.MetricUnavailable as e:
            nets[kind] = str(e)
    return nets


def _batched(net, size: int, *inputs) -> np.ndarray:
    """net over inputs [N, ...] in chunks of `size` -> [N, ...] float64."""
    n = len(inputs[0])
    return np.concatenate([np.asarray(net(*(x[i:i + size] for x in inputs)), np.float64)
                           for i in range(0, n, size)])


class Suite:
    """Running sums and feature statistics of named variants against shared ground truth.

    Per batch: `add_truth(truth)` once, then `add(variant, video, truth, hits, visible)` for each
    variant; `result(variant)` gives its figures."""

    def __init__(self, config, variants, networks: dict):
        self.nets = networks
        self.thresholds = tuple(config.eval.pck_thresholds)
        self.fvd_frames = config.eval.fvd_frames
        self.chunk = config.eval.metric_batch
        self.sums = {v: collections.defaultdict(float) for v in variants}
        self.stats = {}  # (variant or GROUND_TRUTH, "fid" / "fvd") -> FeatureStats
        self.video_frames = 0

    def add_truth(self, truth) -> None:
        """Ground-truth videos [B, T, H, W, 3] in [0, 1]."""
        self._features(GROUND_TRUTH, truth)

    def add(self, variant: str, video, truth, hits: dict, visible: float) -> None:
        """`variant`'s videos [B, T, H, W, 3] in [0, 1] against `truth` (same shape); `hits`
        {alpha: joints within alpha} of `visible` joints (stage3.motion_hits)."""
        s = self.sums[variant]
        for name, fn in (("l1", image_metrics.l1), ("psnr_star", image_metrics.psnr_star),
                         ("ssim", image_metrics.ssim)):
            s[name] += float(fn(video, truth).sum())
        if callable(self.nets["lpips"]):
            frames = [np.asarray(x, np.float32).reshape(-1, *x.shape[2:]) for x in (video, truth)]
            s["lpips"] += float(_batched(self.nets["lpips"], self.chunk, *frames).sum())
        s["frames"] += int(np.prod(video.shape[:2]))
        for a, h in hits.items():
            s[f"hits@{a}"] += h
        s["visible"] += visible
        self._features(variant, video)

    def _features(self, name: str, video) -> None:
        video = np.asarray(video, np.float32)
        self.video_frames = video.shape[1]
        inputs = {"fid": video.reshape(-1, *video.shape[2:])}
        if video.shape[1] >= self.fvd_frames:
            inputs["fvd"] = video[:, :self.fvd_frames]
        for metric, x in inputs.items():
            net = self.nets[KINDS[metric]]
            if callable(net):
                size = self.chunk if metric == "fid" else max(1, self.chunk // self.fvd_frames)
                feats = _batched(net, size, x)
                self.stats.setdefault((name, metric), frechet.FeatureStats(feats.shape[1]))
                self.stats[(name, metric)].update(feats)

    def _frechet(self, variant: str, metric: str) -> tuple:
        """(distance or "not computed: ..." string, sample counts or None)."""
        net = self.nets[KINDS[metric]]
        if not callable(net):
            return net, None
        if metric == "fvd" and self.video_frames < self.fvd_frames:
            return (f"not computed: FVD needs videos of eval.fvd_frames = {self.fvd_frames} "
                    f"frames, these have {self.video_frames}"), None
        ours, truth = self.stats[(variant, metric)], self.stats[(GROUND_TRUTH, metric)]
        samples = {"generated": ours.count, "ground_truth": truth.count}
        try:
            return ours.distance(truth), samples
        except ValueError as e:  # too few samples, or a complex square root
            return f"not computed: {metric.upper()} over {samples}: {e}", samples

    def result(self, variant: str) -> dict:
        """{l1, psnr_star, ssim, lpips, fid, fid_samples, fvd, fvd_samples, motion_pck@a}."""
        s = self.sums[variant]
        frames = max(s["frames"], 1)
        out = {k: s[k] / frames for k in ("l1", "psnr_star", "ssim")}
        out["lpips"] = s["lpips"] / frames if callable(self.nets["lpips"]) else self.nets["lpips"]
        for metric in ("fid", "fvd"):
            out[metric], out[f"{metric}_samples"] = self._frechet(variant, metric)
        out.update({f"motion_pck@{a}": evaluation.ratio(s[f"hits@{a}"], s["visible"],
                                                         "no visible reference keypoints")
                    for a in self.thresholds})
        return out
