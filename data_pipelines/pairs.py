"""Motion-consistent, identity-inconsistent pairs for stage 2 (the paper's game-engine pairs).

For a driving clip (identity A, motion m) a partner identity B != A that also performs m in the same
split is drawn; the example is
  driving           A's frames [start, start + T)                      (what the motion encoder sees)
  reference         one frame of B performing ANOTHER motion m' != m   (the identity image)
  target_keypoints  B's keypoints performing m at the same frames      (what the retargeter must hit)
The reference comes from a different motion so that B's own pose in the identity image is not the
target pose (a reference frame from B's clip of m would hand the model the answer for that frame,
and the pose the mask tokens must ignore would coincide with the target). Its frame is drawn
uniformly from that clip. "Same frames" is what motion consistency means in the synthetic set:
frame t of motion m has the same joint angles on every identity.

Every draw comes from np.random.default_rng([seed, driving record]), so a record's pairs do not
depend on the rest of the split. Clips without a valid partner are left out (`Pairs.unpaired`);
a split with no valid pair at all is an error. Training reads each pair's records with a window
and reference frame drawn per sample (`PairSource.example(i, rng)`), so later epochs see other
windows; evaluation reads the pair's own (`PairSource[i]`).
"""
from __future__ import annotations

import collections
import dataclasses

import numpy as np

from data_pipelines import records

_FIELDS = ("identity_id", "motion_id", "num_frames")


@dataclasses.dataclass(frozen=True)
class Pairs:
    """Record indices (into the split) of every pair; all arrays [N] int64 except `unpaired`."""
    driving: np.ndarray          # identity A performing motion m
    target: np.ndarray           # identity B != A performing m: the target keypoints
    reference: np.ndarray        # identity B performing m' != m: the reference image
    reference_frame: np.ndarray  # frame of `reference` used as the identity image
    start: np.ndarray            # first frame of the window, the same in driving and target
    unpaired: np.ndarray         # driving records without a valid partner

    def __len__(self) -> int:
        return len(self.driving)


def _check_entries(entries: list, clip_frames: int) -> None:
    if int(clip_frames) != clip_frames or clip_frames < 1:
        raise ValueError(f"clip_frames must be a positive integer, got {clip_frames}")
    for i, e in enumerate(entries):
        missing = [f for f in _FIELDS if f not in e]
        if missing:
            raise ValueError(f"index entry {i} lacks {missing} (expected {_FIELDS})")


def _no_pair_error(entries: list, clip_frames: int) -> ValueError:
    long_enough = [e for e in entries if e["num_frames"] >= clip_frames]
    if not long_enough:
        return ValueError(f"no clip has the {clip_frames} frames requested")
    ids = collections.defaultdict(set)
    for e in long_enough:
        ids[e["motion_id"]].add(e["identity_id"])
    if all(len(v) < 2 for v in ids.values()):
        return ValueError("no motion is performed by two identities (of >= "
                          f"{clip_frames} frames): no motion-consistent, identity-inconsistent pair")
    return ValueError("motions shared by two identities exist, but no partner identity has a clip "
                      "of another motion to take the reference frame from (need >= 2 motions "
                      "per identity)")


def make_pairs(entries: list, *, clip_frames: int, seed: int,
               partners_per_clip: int | None = 1, self_pairs: bool = False) -> Pairs:
    """Pairs over one split's index entries ({"identity_id", "motion_id", "num_frames"}, in
    data-source order). partners_per_clip: partner identities per driving clip (drawn without
    replacement, fewer when fewer exist); None: every valid partner; 0 (with self_pairs): none,
    the self rows alone. self_pairs: also one row per driving clip whose partner is its own
    identity (target = the driving record itself, reference = a frame of another of its
    motions): the crop/scale/pad examples, supervised by the original clip. Self rows are drawn
    after the cross rows, so adding them leaves the cross rows as they were."""
    _check_entries(entries, clip_frames)
    if partners_per_clip is not None and partners_per_clip < (0 if self_pairs else 1):
        raise ValueError(f"partners_per_clip must be >= 1 or None (or 0 with self_pairs: self "
                         f"pairs alone), got {partners_per_clip}")
    clips = collections.defaultdict(list)       # (identity, motion) -> records long enough
    performers = collections.defaultdict(set)   # motion -> identities with such a record
    by_identity = collections.defaultdict(list)  # identity -> all its records
    for r, e in enumerate(entries):
        by_identity[e["identity_id"]].append(r)
        if e["num_frames"] >= clip_frames:
            clips[e["identity_id"], e["motion_id"]].append(r)
            performers[e["motion_id"]].add(e["identity_id"])
    rows, unpaired = [], []
    for r, e in enumerate(entries):
        a, m = e["identity_id"], e["motion_id"]
        others = {b: [x for x in by_identity[b] if entries[x]["motion_id"] != m]
                  for b in performers[m]}
        partners = sorted(b for b, refs in others.items() if refs and b != a)
        chosen = []
        if e["num_frames"] >= clip_frames:
            rng = np.random.default_rng([seed, r])
            if partners and partners_per_clip != 0:
                k = len(partners) if partners_per_clip is None else min(partners_per_clip,
                                                                        len(partners))
                chosen = rng.choice(partners, size=k, replace=False).tolist()
            if self_pairs and others.get(a):
                chosen.append(a)
        if not chosen:
            unpaired.append(r)
            continue
        for b in chosen:
            target = r if b == a else int(rng.choice(clips[b, m]))
            ref = int(rng.choice(others[b]))
            last = min(e["num_frames"], entries[target]["num_frames"]) - clip_frames
            rows.append((r, target, ref, int(rng.integers(entries[ref]["num_frames"])),
                         int(rng.integers(last + 1))))
    if not rows:
        raise _no_pair_error(entries, clip_frames)
    cols = np.asarray(rows, np.int64).T
    return Pairs(*cols, unpaired=np.asarray(unpaired, np.int64))


def spread_order(driving: np.ndarray, seed: int) -> np.ndarray:
    """An order of the rows of `driving` (each row's driving record) in rounds: each round takes
    the next row of every driving clip, the clips in a seeded order, so the first N rows cover
    the clips as evenly as N allows (make_pairs draws each clip's partners in a seeded order)."""
    clips = np.random.default_rng(seed).permutation(np.unique(driving))
    position = {int(c): i for i, c in enumerate(clips)}
    seen = collections.Counter()
    rank = np.zeros(len(driving), np.int64)
    for i, d in enumerate(driving.tolist()):
        rank[i], seen[d] = seen[d], seen[d] + 1
    return np.lexsort(([position[d] for d in driving.tolist()], rank))


def load_pairs(path: str, split: str, **kwargs) -> Pairs:
    """make_pairs over split `split` of the dataset directory `path` (its index.json)."""
    splits = records.read_index(path)["splits"]
    if split not in splits:
        raise ValueError(f"split {split!r} not in dataset {path}; it has {sorted(splits)}")
    try:
        return make_pairs(splits[split], **kwargs)
    except ValueError as e:
        raise ValueError(f"split {split!r} of {path}: {e}") from None


class BadClip(ValueError):
    """One clip of a pair cannot be read or has the wrong contents: `record` (its index in the
    split) and `role` ("driving", "target" or "reference") say which, so a bad file is counted once
    however many pairs read it."""

    def __init__(self, record: int, role: str, cause: str):
        super().__init__(f"record {record} (the {role} clip): {cause}")
        self.record, self.role = record, role


class PairSource:
    """Grain random-access source of pair examples (one per row of `load_pairs`):
    driving [T, H, W, 3] uint8, driving_keypoints [T, 62, 3], reference [H, W, 3] uint8,
    reference_keypoints [62, 3] (B's own pose in the reference image),
    target [T, H, W, 3] uint8 (B performing the motion: stage 3's video) and target_keypoints
    [T, 62, 3] (B's keypoints, pixels), int32 ids (driving_identity_id,
    reference_identity_id, motion_id, reference_motion_id) and the record/frame indices."""

    def __init__(self, path: str, split: str, *, clip_frames: int, seed: int,
                 partners_per_clip: int | None = 1, self_pairs: bool = False):
        self.pairs = load_pairs(path, split, clip_frames=clip_frames, seed=seed,
                                partners_per_clip=partners_per_clip, self_pairs=self_pairs)
        self.clip_frames = clip_frames
        self._src = records.open_split(path, split)

    def __len__(self) -> int:
        return len(self.pairs)

    def _clip(self, record: int, role: str) -> dict:
        try:
            return self._src[record]
        except Exception as e:  # noqa: BLE001  decoding raises several types
            raise BadClip(record, role, f"{type(e).__name__}: {e}") from None

    def __getitem__(self, i: int) -> dict:
        return self.example(i)

    def example(self, i: int, rng: np.random.Generator | None = None) -> dict:
        """Pair i with its own window and reference frame, or, with `rng` (training), both drawn
        afresh: the window uniformly over the frames the driving and target clips share, the
        reference frame uniformly over its clip."""
        p = self.pairs
        drv, tgt, ref = (self._clip(int(x[i]), role) for x, role in (
            (p.driving, "driving"), (p.target, "target"), (p.reference, "reference")))
        start, frame = int(p.start[i]), int(p.reference_frame[i])
        if not len(ref["frames"]):
            raise BadClip(int(p.reference[i]), "reference", "0 frames")
        if rng is not None:
            for record, role, clip in ((p.driving[i], "driving", drv), (p.target[i], "target",
                                                                           tgt)):
                if len(clip["frames"]) < self.clip_frames:
                    raise BadClip(int(record), role, f"{len(clip['frames'])} frames, fewer than "
                                  f"the {self.clip_frames} of a window")
            shared = min(len(drv["frames"]), len(tgt["frames"]))
            start = int(rng.integers(shared - self.clip_frames + 1))
            frame = int(rng.integers(len(ref["frames"])))
        window = slice(start, start + self.clip_frames)
        return {
            "driving": drv["frames"][window], "driving_keypoints": drv["keypoints"][window],
            "reference": ref["frames"][frame], "reference_keypoints": ref["keypoints"][frame],
            "target": tgt["frames"][window], "target_keypoints": tgt["keypoints"][window],
            "driving_identity_id": np.int32(drv["identity_id"]),
            "reference_identity_id": np.int32(ref["identity_id"]),
            "motion_id": np.int32(drv["motion_id"]),
            "reference_motion_id": np.int32(ref["motion_id"]),
            "driving_record": np.int32(p.driving[i]), "target_record": np.int32(p.target[i]),
            "reference_record": np.int32(p.reference[i]),
            "reference_frame": np.int32(frame), "start": np.int32(start),
        }
