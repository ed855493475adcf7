"""Animate-X's Explicit Pose Indicator (EPI, sec. 3.2 and appendix A) as keypoint transforms on
62-joint poses [..., 62, 3] (x, y, conf in pixels), usable by every stage.

  pose_pool         anchor clips (every `stride`-th frame of `size` clips of a split)
  realign           the driving pose moved onto an anchor body: bone lengths and neck position
                    (augment.realign_bones)
  RESCALE_GROUPS / rescale
                    the rescale pool: the lengths of the body (neck-hips), legs, arms, neck
                    (neck-nose), shoulders, the face size, the hands; one factor per group
  REMOVABLE_PARTS / drop_parts / add_parts
                    removing body parts: the part's joints (a whole subtree of the skeleton, so
                    the rest stays one connected tree) get confidence 0; adding them: where the
                    driving frame lacks a part the anchor shows, the anchor's bones of that part
                    are attached at the driving pose's (visible) parent joint
  transform         one pool anchor and one random rescale / addition / removal combination,
                    applied with probability `prob` (Animate-X: over 98%), else the pose
                    unchanged
  ExplicitPoseIndicator
                    the augmentation callable of data_pipelines/augment.py's interface
                    (frames, keypoints, rng) -> {"frames", "keypoints", "target_keypoints"}:
                    an optional ClipAugment on the clip, then `transform` on its keypoints only

Every transform is per frame with per-clip parameters (one anchor, one factor per group, one set
of added and of removed parts for the whole clip), so the motion's timing and every visible
bone's direction are kept: only lengths, position and visibility change (an added part moves as
the anchor's does, frame t taking the anchor's frame t mod T_anchor).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from data_pipelines import augment, records
from im_anim_jax import skeleton

_J = skeleton.JOINT_INDEX
_CHILD = np.array([c for _, c in skeleton.BONES])
_HAND_JOINTS = tuple(n for n in skeleton.JOINT_NAMES if n.startswith(("lhand_", "rhand_")))
# Rescale pool: bones grouped by their child joint (left and right share one factor).
RESCALE_GROUPS = {name: np.flatnonzero(np.isin(_CHILD, [_J[n] for n in children]))
                  for name, children in {
                      "body": ("r_hip", "l_hip"),
                      "legs": ("r_knee", "l_knee", "r_ankle", "l_ankle", "r_toe", "l_toe"),
                      "arms": ("r_elbow", "l_elbow", "r_wrist", "l_wrist"),
                      "neck": ("nose",),
                      "shoulders": ("r_shoulder", "l_shoulder"),
                      "face": ("r_eye", "l_eye", "r_ear", "l_ear"),
                      "hands": _HAND_JOINTS,
                  }.items()}
# Removable parts: the roots of the removed subtrees.
REMOVABLE_PARTS = {"arms": ("r_elbow", "l_elbow"), "hands": ("lhand_wrist", "rhand_wrist"),
                   "legs": ("r_knee", "l_knee"), "ears": ("r_ear", "l_ear")}


def _subtrees() -> dict[str, np.ndarray]:
    """{part: bool [J]} the joints of each removable part (its roots and all their descendants)."""
    out = {}
    for part, roots in REMOVABLE_PARTS.items():
        mask = np.zeros(skeleton.NUM_JOINTS, bool)
        mask[[_J[r] for r in roots]] = True
        for p, c in skeleton.BONES:  # parents come before their children
            mask[c] |= mask[p]
        out[part] = mask
    return out


PART_JOINTS = _subtrees()


def pose_pool(path: str, split: str, size: int, stride: int = 1,
              seed: int = 0) -> tuple[np.ndarray, ...]:
    """Anchor clips: the keypoints [T_i / stride, 62, 3] of `size` records of the split (all when
    it has fewer; drawn without replacement by `seed`), every `stride`-th frame."""
    if size < 1 or stride < 1:
        raise ValueError(f"pose pool size and stride must be >= 1, got {size}, {stride}")
    src = records.open_split(path, split)
    if len(src) == 0:
        raise ValueError(f"split {split!r} of {path} is empty: no poses for the EPI pose pool")
    picked = np.sort(np.random.default_rng(seed).permutation(len(src))[:size])
    return tuple(np.asarray(src[int(i)]["keypoints"][::stride], np.float32) for i in picked)


def realign(keypoints, anchor) -> np.ndarray:
    """keypoints [T, 62, 3] on the anchor's body ([Ta, 62, 3]): bone lengths and neck position
    from the anchor (medians over frames), directions, timing and confidences from the driving
    pose."""
    return augment.realign_bones(keypoints, anchor)


def rescale(keypoints, factors: dict) -> np.ndarray:
    """keypoints [..., 62, 3] with the bones of each RESCALE_GROUPS group in `factors` ({group:
    factor > 0}) scaled about their parent joints (children follow, directions kept)."""
    unknown = set(factors) - set(RESCALE_GROUPS)
    if unknown:
        raise ValueError(f"unknown rescale groups {sorted(unknown)}; choose from "
                         f"{sorted(RESCALE_GROUPS)}")
    per_bone = np.ones(len(skeleton.BONES), np.float32)
    for group, f in factors.items():
        per_bone[RESCALE_GROUPS[group]] = f
    return augment.rescale_bones(keypoints, per_bone)


def drop_parts(keypoints, parts) -> np.ndarray:
    """keypoints [..., 62, 3] with every joint of the REMOVABLE_PARTS `parts` at confidence 0."""
    unknown = set(parts) - set(REMOVABLE_PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from {sorted(REMOVABLE_PARTS)}")
    kpts = np.array(keypoints, np.float32)
    for part in parts:
        kpts[..., PART_JOINTS[part], 2] = 0.0
    return kpts


def add_parts(keypoints, anchor, parts) -> np.ndarray:
    """keypoints [T, 62, 3] with the REMOVABLE_PARTS `parts` added from `anchor` [Ta, 62, 3]:
    in each frame t, every joint of the part that is invisible (confidence 0) while visible in
    anchor frame t mod Ta, with a visible parent, is placed at that parent plus the anchor's bone
    and takes the anchor's confidence. Visible joints never move. The anchor should run at the
    driving clip's frame rate (a pool kept every k-th frame plays added parts k times fast)."""
    unknown = set(parts) - set(REMOVABLE_PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from {sorted(REMOVABLE_PARTS)}")
    kpts = np.array(keypoints, np.float32)
    if not parts:
        return kpts
    anchor = np.asarray(anchor, np.float32)[np.arange(len(kpts)) % len(anchor)]
    mask = np.any([PART_JOINTS[p] for p in parts], axis=0)
    for p, c in skeleton.BONES:  # parents come before their children
        if not mask[c]:
            continue
        fill = (kpts[:, c, 2] <= 0) & (anchor[:, c, 2] > 0) & (kpts[:, p, 2] > 0)
        kpts[fill, c, :2] = kpts[fill, p, :2] + anchor[fill, c, :2] - anchor[fill, p, :2]
        kpts[fill, c, 2] = anchor[fill, c, 2]
    return kpts


def transform(keypoints, rng: np.random.Generator, pool, prob: float = 0.99,
              rescale_prob: float = 0.5, max_factor: float = 1.3,
              drop_prob: float = 0.1, add_prob: float = 0.1) -> tuple[np.ndarray, bool]:
    """With probability `prob`: `keypoints` [T, 62, 3] realigned to a random anchor of `pool`,
    then each rescale group rescaled with probability `rescale_prob` by a log-uniform factor in
    [1 / max_factor, max_factor], then each removable part added from the anchor (where the
    driving pose lacks it) with probability `add_prob`, then each removable part not added
    dropped with probability `drop_prob`. -> (keypoints, whether they were transformed)."""
    for name, p in (("prob", prob), ("rescale_prob", rescale_prob), ("drop_prob", drop_prob),
                    ("add_prob", add_prob)):
        if not 0 <= p <= 1:
            raise ValueError(f"EPI {name} must be in [0, 1], got {p}")
    if max_factor < 1:
        raise ValueError(f"EPI max_factor must be >= 1, got {max_factor}")
    if not pool:
        raise ValueError("the EPI pose pool is empty")
    kpts = np.asarray(keypoints, np.float32)
    if rng.uniform() >= prob:
        return kpts, False
    anchor = pool[int(rng.integers(len(pool)))]
    kpts = realign(kpts, anchor)
    log_m = np.log(max_factor)
    factors = {g: float(np.exp(rng.uniform(-log_m, log_m))) for g in RESCALE_GROUPS
               if rng.uniform() < rescale_prob}
    added = [p for p in REMOVABLE_PARTS if rng.uniform() < add_prob]
    kpts = add_parts(rescale(kpts, factors), anchor, added)
    return drop_parts(kpts, [p for p in REMOVABLE_PARTS
                             if p not in added and rng.uniform() < drop_prob]), True


@dataclasses.dataclass(frozen=True, eq=False)
class ExplicitPoseIndicator:
    """Augmentation callable: `clip_augment` (augment.ClipAugment or None) on the driving clip,
    then `transform` on its keypoints. The frames never see the pose transform (Animate-X feeds
    the video to CLIP untouched and the transformed pose to the pose branch)."""
    pool: tuple
    prob: float = 0.99
    rescale_prob: float = 0.5
    max_factor: float = 1.3
    drop_prob: float = 0.1
    add_prob: float = 0.1
    clip_augment: augment.ClipAugment | None = None

    def __call__(self, frames, keypoints, rng: np.random.Generator) -> dict:
        """frames uint8 [T, H, W, 3], keypoints [T, 62, 3] -> {"frames", "keypoints" (the
        transformed pose), "target_keypoints" (the clip augment's target, else the input pose),
        "epi_applied"}."""
        if self.clip_augment is not None:
            out = self.clip_augment(frames, keypoints, rng)
        else:
            kpts = np.asarray(keypoints, np.float32)
            out = {"frames": np.asarray(frames), "keypoints": kpts, "target_keypoints": kpts}
        moved, applied = transform(out["keypoints"], rng, self.pool, self.prob,
                                   self.rescale_prob, self.max_factor, self.drop_prob,
                                   self.add_prob)
        if applied:  # a joint the new body puts outside the frame is not visible there
            h, w = np.shape(out["frames"])[1:3]
            x, y = moved[..., 0], moved[..., 1]
            outside = (x < -0.5) | (x >= w - 0.5) | (y < -0.5) | (y >= h - 0.5)
            moved = moved.copy()
            moved[..., 2] = np.where(outside, 0.0, moved[..., 2])
        return dict(out, keypoints=moved, epi_applied=applied)


def explicit_pose_indicator(cfg, pool, clip_augment=None) -> ExplicitPoseIndicator:
    """ExplicitPoseIndicator from a config block (prob, rescale_prob, max_factor, drop_prob,
    add_prob)."""
    return ExplicitPoseIndicator(pool=tuple(pool), prob=cfg.prob, rescale_prob=cfg.rescale_prob,
                                 max_factor=cfg.max_factor, drop_prob=cfg.drop_prob,
                                 add_prob=cfg.add_prob, clip_augment=clip_augment)
