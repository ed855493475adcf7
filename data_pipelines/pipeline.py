"""Grain pipelines over clip datasets (records.py): clip sampling, heatmap targets, batching.

A batch is a dict of numpy arrays:
  frames [B, T, H, W, 3] uint8, keypoints [B, T, J, 3], heatmaps [B, T, J, Hh, Wh] float32,
  joint_weights [B, T, J] (0 where confidence < threshold), identity_id [B], motion_id [B],
  shape_params [B, S], record [B] (index in the split), start [B] (first frame of the clip).
Training iterators shuffle with a seed (reshuffled every epoch), repeat forever and are sharded by
JAX process; their state (`get_state`/`set_state`) is checkpointed with the model. A training
record that cannot be read or decoded, or has the wrong shapes, is skipped and logged with its
index; each batch carries `bad_records` [B] (per clip, the count skipped before it: its max is
the total so far, which is part of the iterator state), and more than `max_bad_records` raise
BadRecords.
"""
from __future__ import annotations

import dataclasses
import hashlib

import grain
import jax
import numpy as np
from absl import logging

from data_pipelines import pairs, records
from im_anim_jax import keypoints as kp
from im_anim_jax import skeleton


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


def _first_readable(src, path: str, split: str, tries: int = 16) -> dict:
    """The first record of `src` that decodes (training skips bad ones; see _guarded)."""
    for i in range(min(tries, len(src))):
        try:
            return src[i]
        except Exception as e:  # noqa: BLE001  any decoding failure
            error = f"{type(e).__name__}: {e}"
    raise ValueError(f"none of the first {min(tries, len(src))} records of split {split!r} of "
                     f"{path} can be read (the last: {error}); repair or re-ingest the data")


def _check_source(src, path: str, split: str, clip_frames: int, targets: Targets) -> None:
    if len(src) == 0:
        raise ValueError(f"split {split!r} of {path} is empty")
    first = _first_readable(src, path, split)
    t, h, w, _ = first["frames"].shape
    if (h, w) != (targets.image_size, targets.image_size):
        raise ValueError(f"dataset {path} has {h}x{w} frames but the model expects "
                         f"{targets.image_size}x{targets.image_size} "
                         f"(model.motion_tokenizer.image_size); rebuild or re-ingest the data")
    if t < clip_frames:
        raise ValueError(f"dataset {path} has clips of {t} frames, fewer than the {clip_frames} "
                         f"frames requested")


class BadRecords(ValueError):
    """More training records than allowed could not be used."""


def _clip_check(clip_frames: int, targets: Targets):
    """ex -> None, or ValueError naming what is wrong with the record `ex`."""
    size = (targets.image_size, targets.image_size)

    def check(ex):
        records.validate_example(ex)
        t, h, w, _ = ex["frames"].shape
        if (h, w) != size or t < clip_frames:
            raise ValueError(f"frames are {t}x{h}x{w}, expected >= {clip_frames} frames of "
                             f"{size[0]}x{size[1]}")
    return check


def _pair_check(clip_frames: int, targets: Targets):
    s, j = targets.image_size, skeleton.NUM_JOINTS
    shapes = {"driving": (clip_frames, s, s, 3), "target": (clip_frames, s, s, 3),
              "reference": (s, s, 3), "driving_keypoints": (clip_frames, j, 3),
              "target_keypoints": (clip_frames, j, 3), "reference_keypoints": (j, 3)}

    def check(ex):
        for k, shape in shapes.items():
            role = k.split("_")[0]
            if np.shape(ex[k]) != shape:
                raise pairs.BadClip(int(ex[f"{role}_record"]), role,
                                    f"{k} is {np.shape(ex[k])}, expected {shape}")
            if k.endswith("keypoints") and not np.all(np.isfinite(ex[k])):
                raise pairs.BadClip(int(ex[f"{role}_record"]), role, f"{k} contain NaN or inf")
    return check


class _SkipBadIterator(grain.DatasetIterator):
    """Counts distinct bad records: the stream repeats, and a record skipped in every epoch is
    one bad record, not one per epoch (else one bad file would end any long enough run)."""

    def __init__(self, parent, limit: int, where: str, batch_size: int):
        super().__init__(parent)
        self._limit, self._where, self._bad, self._earlier = limit, where, set(), 0
        self._batch_size = batch_size

    @property
    def _skipped(self) -> int:
        return self._earlier + len(self._bad)

    def __next__(self):
        while "bad_record" in (ex := next(self._parent)):
            if ex["bad_record"] in self._bad:
                continue  # skipped and counted in an earlier epoch
            self._bad.add(ex["bad_record"])
            logging.warning("skipped bad %s of %s (%d skipped so far): %s",
                            ex["bad_record"], self._where, self._skipped, ex["error"])
            if self._skipped > self._limit:
                raise BadRecords(
                    f"{self._skipped} bad records in {self._where}, more than "
                    f"faults.max_bad_records={self._limit}; the last: "
                    f"{ex['bad_record']}: {ex['error']}. Repair or re-ingest the data, or raise "
                    f"the limit")
        return dict(ex, bad_records=np.int32(self._skipped))

    def get_state(self):
        return {"parent": self._parent.get_state(), "skipped": self._skipped,
                "bad": sorted(self._bad)}

    def set_state(self, state):
        if set(state) == {"next_index"}:  # written before bad records were skipped (0.1.0):
            # the same element order, batched before reading; nothing was skipped
            state = {"parent": {"next_index": state["next_index"] * self._batch_size},
                     "skipped": 0}
        self._parent.set_state(state["parent"])
        # States written before the distinct count hold the count alone; a record counted then
        # may be counted once more. Ids written as plain ints, before they named their kind,
        # were records (or, in a pair pipeline, pairs whose failure named no clip).
        self._bad = {b if isinstance(b, str) else f"record {b}" for b in state.get("bad", ())}
        self._earlier = state["skipped"] - len(self._bad)


class _SkipBad(grain.IterDataset):
    """Drops the `{"bad_record": index, "error": message}` markers of _guarded reads, counting
    and logging them; every element passed on gains `bad_records` (the count so far)."""

    def __init__(self, parent: grain.IterDataset, limit: int, where: str, batch_size: int):
        super().__init__(parent)
        self._limit, self._where, self._batch_size = limit, where, batch_size

    def __iter__(self):
        return _SkipBadIterator(self._parent.__iter__(), self._limit, self._where,
                                self._batch_size)


def _guarded(get, check, sample, kind: str = "record"):
    """(index, rng) -> sample(get(index, rng), rng), or a bad-record marker when reading,
    decoding, `check`ing or sampling that element (a `kind`: "record" or "pair") fails.
    `bad_record` names what failed, "record 3" or "pair 3": a pair's failing clip
    (pairs.BadClip) by its record, so it counts once however many pairs read it."""
    def read(i, rng):
        what = "cannot be read or decoded"
        try:
            ex = get(i, rng)
            what = "has the wrong contents"
            check(ex)
            what = "cannot be sampled"
            return sample(dict(ex, record=np.int32(i)), rng)
        except pairs.BadClip as e:
            return {"bad_record": f"record {e.record}", "error": f"{what}: pair {i}'s {e}"}
        except Exception as e:  # noqa: BLE001  the one place a bad record becomes a skip
            return {"bad_record": f"{kind} {int(i)}", "error": f"{what} ({type(e).__name__}: {e})"}
    return read


def train_dataset(path: str, split: str, *, clip_frames: int, batch_size: int, targets: Targets,
                  seed: int, read_threads: int = 2, num_workers: int = 0,
                  shard_index: int | None = None, shard_count: int | None = None,
                  augment=None, max_bad_records: int = 100) -> grain.IterDataset:
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

    src = records.open_split(path, split)
    _check_source(src, path, split, clip_frames, targets)
    read = _guarded(lambda i, _: src[i], _clip_check(clip_frames, targets), sample)
    return _iterate(len(src), read, seed, batch_size, shard_index, shard_count, read_threads,
                    num_workers, max_bad_records, f"split {split!r} of {path}")


def _iterate(size: int, read, seed: int, batch_size: int, shard_index: int, shard_count: int,
             read_threads: int, num_workers: int, max_bad_records: int,
             where: str) -> grain.IterDataset:
    """Seeded shuffle of range(size) (reshuffled per epoch), repeat, shard, `read(index, rng)`
    with threads (and optionally worker processes), skip bad records, batch."""
    ds = grain.MapDataset.range(size).seed(seed).shuffle().repeat()[shard_index::shard_count]
    # Grain draws element i's generator from the seed and i's position in this shard, so every
    # process would draw the same crops, flips and clip starts: seed each shard apart (one
    # process keeps the dataset's seed, and so its figures).
    shard_seed = None if shard_count == 1 else int(
        np.random.SeedSequence([seed, shard_index]).generate_state(1)[0])
    it = ds.random_map(read, seed=shard_seed).to_iter_dataset(grain.ReadOptions(
        num_threads=read_threads, prefetch_buffer_size=2 * read_threads * batch_size))
    if num_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return _SkipBad(it, max_bad_records, where, batch_size).batch(batch_size,
                                                                  drop_remainder=True)


def eval_dataset(path: str, split: str, *, clip_frames: int | None, batch_size: int,
                 targets: Targets) -> grain.MapDataset:
    """Every clip of the split once, in order; the first `clip_frames` frames (None: all, or
    where clips differ in length, as many as the shortest has, so that they batch together)."""
    src = records.open_split(path, split)
    frames = clip_frames
    if frames is None:
        frames = min(e["num_frames"] for e in records.read_index(path)["splits"][split])
    _check_source(src, path, split, frames, targets)
    return (grain.MapDataset.source(src).map_with_index(lambda i, ex: dict(ex, record=i))
            .map(lambda ex: _with_targets(ex, 0, frames, targets))
            .batch(batch_size, drop_remainder=False))


def _pairs(path, split, clip_frames, targets, **pairing):
    src = pairs.PairSource(path, split, clip_frames=clip_frames, **pairing)
    _check_source(records.open_split(path, split), path, split, clip_frames, targets)
    return src


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
                       num_workers: int = 0, max_bad_records: int = 100,
                       log=None) -> grain.IterDataset:
    """Infinite, shuffled, process-sharded batches of stage-2 pairs (pairs.PairSource fields plus
    heatmaps [B, T, J, Hh, Wh] / joint_weights [B, T, J] of the target keypoints and `record`,
    the pair index), each with a window and reference frame drawn per sample, the driving clip
    augmented by `augment` (None: as rendered). `log` (a print-like callable) is told how many
    driving clips have no pair and are left out."""
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    src = _pairs(path, split, clip_frames, targets, seed=seed,
                 partners_per_clip=partners_per_clip, self_pairs=self_pairs)
    unpaired = src.pairs.unpaired.tolist()
    if unpaired and log is not None:
        log(f"[pairs] split {split!r}: {len(unpaired)} clips drive no pair and are left out "
            f"(records {unpaired[:10]}{' ...' if len(unpaired) > 10 else ''}): shorter than "
            f"{clip_frames} frames, or " + (
                "their identity has no clip of another motion for the reference image"
                if partners_per_clip == 0 else
                "no other identity performs their motion and has a clip of another motion for "
                "the reference image"))
    read = _guarded(src.example, _pair_check(clip_frames, targets),
                    lambda ex, rng: _with_pair_targets(ex, targets, augment, rng), kind="pair")
    return _iterate(len(src), read, seed, batch_size, jax.process_index(), jax.process_count(),
                    read_threads, num_workers, max_bad_records, f"the pairs of split {split!r} of "
                    f"{path}")


def pair_eval_dataset(path: str, split: str, *, clip_frames: int, batch_size: int,
                      targets: Targets, seed: int, spread: bool = False) -> grain.MapDataset:
    """Every cross-identity pair of the split (all partners, no self pairs), un-augmented, in
    index order or, with `spread`, in rounds over the driving clips (pairs.spread_order: the
    first N pairs cover the clips as evenly as N allows); `seed` fixes the partners' order, the
    windows, reference frames and the rounds' clip order. `record`: the pair's index order."""
    src = _pairs(path, split, clip_frames, targets, seed=seed, partners_per_clip=None,
                 self_pairs=False)
    ds = grain.MapDataset.source(src).map_with_index(lambda i, ex: dict(ex, record=np.int32(i)))
    if spread:
        order, indexed = pairs.spread_order(src.pairs.driving, seed), ds
        ds = grain.MapDataset.range(len(order)).map(lambda j: indexed[int(order[j])])
    return (ds.map(lambda ex: _with_pair_targets(ex, targets))
            .batch(batch_size, drop_remainder=False))


def fingerprint(batch: dict) -> str:
    """A short id of which clip windows a batch holds (for resume tests and logs)."""
    windows = np.stack([batch["record"], batch["start"]], -1).astype(np.int64)
    return hashlib.sha1(windows.tobytes()).hexdigest()[:12]
