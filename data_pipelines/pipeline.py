"""Grain pipelines over clip datasets (records.py): clip sampling, heatmap targets, batching.

A batch is a dict of numpy arrays:
  frames [B, T, H, W, 3] uint8, keypoints [B, T, J, 3], heatmaps [B, T, J, Hh, Wh] float32,
  joint_weights [B, T, J] (0 where confidence < threshold), identity_id [B], motion_id [B],
  shape_params [B, S], record [B] (index in the split), start [B] (first frame of the clip).
Training iterators shuffle with a seed (reshuffled every epoch), repeat forever and are sharded by
JAX process; their state (`get_state`/`set_state`) is checkpointed with the model.
"""
from __future__ import annotations

import dataclasses
import hashlib

import grain
import jax
import numpy as np

from data_pipelines import records
from im_anim_jax import keypoints as kp


@dataclasses.dataclass(frozen=True)
class Targets:
    """How heatmap targets are made from keypoints."""
    image_size: int
    heatmap_size: int
    sigma: float
    conf_threshold: float = 0.3


def _with_targets(ex: dict, start: int, clip_frames: int, targets: Targets, augment=None,
                  rng=None) -> dict:
    """The window's frames and keypoints (moved and recoloured by `augment`, an
    augment.ClipAugment, the keypoints with them) and their heatmap targets."""
    frames = ex["frames"][start:start + clip_frames]
    kpts = ex["keypoints"][start:start + clip_frames]
    if augment is not None:
        moved = augment(frames, kpts, rng)
        frames, kpts = moved["frames"], moved["keypoints"]
    heatmaps, weights = kp.gaussian_heatmaps(kpts, targets.image_size, targets.heatmap_size,
                                             targets.sigma, targets.conf_threshold)
    return {"frames": frames, "keypoints": kpts, "heatmaps": heatmaps, "joint_weights": weights,
            "identity_id": np.int32(ex["identity_id"]), "motion_id": np.int32(ex["motion_id"]),
            "shape_params": np.asarray(ex["shape_params"], np.float32),
            "record": np.int32(ex["record"]), "start": np.int32(start)}


def _check_source(src, path: str, split: str, clip_frames: int, targets: Targets) -> None:
    if len(src) == 0:
        raise ValueError(f"split {split!r} of {path} is empty")
    first = src[0]
    t, h, w, _ = first["frames"].shape
    if (h, w) != (targets.image_size, targets.image_size):
        raise ValueError(f"dataset {path} has {h}x{w} frames but the model expects "
                         f"{targets.image_size}x{targets.image_size} "
                         f"(model.motion_tokenizer.image_size); rebuild or re-ingest the data")
    if t < clip_frames:
        raise ValueError(f"dataset {path} has clips of {t} frames, fewer than the {clip_frames} "
                         f"frames requested")


def _source(path: str, split: str, clip_frames: int, targets: Targets) -> grain.MapDataset:
    src = records.open_split(path, split)
    _check_source(src, path, split, clip_frames, targets)
    return grain.MapDataset.source(src).map_with_index(lambda i, ex: dict(ex, record=i))


def train_dataset(path: str, split: str, *, clip_frames: int, batch_size: int, targets: Targets,
                  seed: int, read_threads: int = 2, num_workers: int = 0,
                  shard_index: int | None = None, shard_count: int | None = None,
                  augment=None) -> grain.IterDataset:
    """Infinite, shuffled, process-sharded batches of random `clip_frames`-frame windows;
    `augment` (augment.ClipAugment with supervise_original=False, or None) moves and recolours
    each window and its keypoints."""
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")

    def sample(ex, rng: np.random.Generator):
        start = int(rng.integers(0, ex["frames"].shape[0] - clip_frames + 1))
        return _with_targets(ex, start, clip_frames, targets, augment, rng)

    return _iterate(_source(path, split, clip_frames, targets), sample, seed, batch_size,
                    shard_index, shard_count, read_threads, num_workers)


def _iterate(ds: grain.MapDataset, sample, seed: int, batch_size: int, shard_index: int,
             shard_count: int, read_threads: int, num_workers: int) -> grain.IterDataset:
    """Seeded shuffle (reshuffled per epoch), repeat, shard, `sample(ex, rng)`, batch; read with
    threads and optionally worker processes."""
    ds = (ds.seed(seed).shuffle().repeat()[shard_index::shard_count].random_map(sample)
          .batch(batch_size, drop_remainder=True))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                              prefetch_buffer_size=2 * read_threads))
    if num_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it


def eval_dataset(path: str, split: str, *, clip_frames: int | None, batch_size: int,
                 targets: Targets) -> grain.MapDataset:
    """Every clip of the split once, in order; the first `clip_frames` frames (None: all)."""
    src = records.open_split(path, split)
    frames = src[0]["frames"].shape[0] if clip_frames is None else clip_frames
    _check_source(src, path, split, frames, targets)
    return (grain.MapDataset.source(src).map_with_index(lambda i, ex: dict(ex, record=i))
            .map(lambda ex: _with_targets(ex, 0, frames, targets))
            .batch(batch_size, drop_remainder=False))


def _pair_source(path, split, clip_frames, targets, **pairing) -> grain.MapDataset:
    from data_pipelines import pairs
    src = pairs.PairSource(path, split, clip_frames=clip_frames, **pairing)
    _check_source(records.open_split(path, split), path, split, clip_frames, targets)
    return grain.MapDataset.source(src).map_with_index(lambda i, ex: dict(ex, record=np.int32(i)))


def _with_pair_targets(ex: dict, targets: Targets, augment=None, rng=None) -> dict:
    """Heatmaps of the target keypoints; `augment` (augment.ClipAugment) moves and recolours the
    driving clip only, so the target stays B's (or, in a self pair, the original clip's) pose."""
    if augment is not None:
        moved = augment(ex["driving"], ex["driving_keypoints"], rng)
        ex = dict(ex, driving=moved["frames"], driving_keypoints=moved["keypoints"])
    heatmaps, weights = kp.gaussian_heatmaps(ex["target_keypoints"], targets.image_size,
                                             targets.heatmap_size, targets.sigma,
                                             targets.conf_threshold)
    return dict(ex, heatmaps=heatmaps, joint_weights=weights)


def pair_train_dataset(path: str, split: str, *, clip_frames: int, batch_size: int,
                       targets: Targets, seed: int, partners_per_clip: int | None = 1,
                       self_pairs: bool = True, augment=None, read_threads: int = 2,
                       num_workers: int = 0) -> grain.IterDataset:
    """Infinite, shuffled, process-sharded batches of stage-2 pairs (pairs.PairSource fields plus
    heatmaps [B, T, J, Hh, Wh] / joint_weights [B, T, J] of the target keypoints and `record`,
    the pair index), the driving clip augmented by `augment` (None: as rendered)."""
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    src = _pair_source(path, split, clip_frames, targets, seed=seed,
                       partners_per_clip=partners_per_clip, self_pairs=self_pairs)
    return _iterate(src, lambda ex, rng: _with_pair_targets(ex, targets, augment, rng), seed,
                    batch_size, jax.process_index(), jax.process_count(), read_threads,
                    num_workers)


def pair_eval_dataset(path: str, split: str, *, clip_frames: int, batch_size: int,
                      targets: Targets, seed: int) -> grain.MapDataset:
    """Every cross-identity pair of the split (all partners, no self pairs), un-augmented, in
    order; `seed` fixes the windows and reference frames."""
    return (_pair_source(path, split, clip_frames, targets, seed=seed, partners_per_clip=None,
                         self_pairs=False)
            .map(lambda ex: _with_pair_targets(ex, targets))
            .batch(batch_size, drop_remainder=False))


def fingerprint(batch: dict) -> str:
    """A short id of which clip windows a batch holds (for resume tests and logs)."""
    pairs = np.stack([batch["record"], batch["start"]], -1).astype(np.int64)
    return hashlib.sha1(pairs.tobytes()).hexdigest()[:12]
