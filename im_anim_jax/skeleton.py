"""The 62-joint skeleton shared by data, models and metrics.

Layout (index: name): 18 OpenPose body joints, one toe per foot, then 21 joints per hand
(left hand first). Each hand is: wrist, then thumb..pinky with 4 joints each (base to tip).
The COCO-WholeBody-133 (DWPose) index of every joint is in `COCO_WHOLEBODY_SOURCES`; a joint
that is the mean of several COCO joints (neck, toes) lists all of them.
"""
from __future__ import annotations

import numpy as np

BODY_NAMES = (
    "nose", "neck",
    "r_shoulder", "r_elbow", "r_wrist",
    "l_shoulder", "l_elbow", "l_wrist",
    "r_hip", "r_knee", "r_ankle",
    "l_hip", "l_knee", "l_ankle",
    "r_eye", "l_eye", "r_ear", "l_ear",
    "l_toe", "r_toe",
)
FINGERS = ("thumb", "index", "middle", "ring", "pinky")
HAND_NAMES = ("wrist",) + tuple(f"{f}_{k}" for f in FINGERS for k in range(4))
JOINT_NAMES = (BODY_NAMES + tuple(f"lhand_{n}" for n in HAND_NAMES)
               + tuple(f"rhand_{n}" for n in HAND_NAMES))
NUM_BODY = len(BODY_NAMES)            # 20
NUM_HAND = len(HAND_NAMES)            # 21
NUM_JOINTS = len(JOINT_NAMES)         # 62
LEFT_HAND = slice(NUM_BODY, NUM_BODY + NUM_HAND)
RIGHT_HAND = slice(NUM_BODY + NUM_HAND, NUM_JOINTS)
JOINT_INDEX = {n: i for i, n in enumerate(JOINT_NAMES)}

def _mirrored(name: str) -> str:
    for a, b in (("l_", "r_"), ("r_", "l_"), ("lhand_", "rhand_"), ("rhand_", "lhand_")):
        if name.startswith(a):
            return b + name[len(a):]
    return name


# The joint each joint becomes in a left-right mirrored image: keypoints_mirrored[..., j, :] =
# keypoints[..., MIRROR[j], :] (x reflected); a permutation and its own inverse.
MIRROR = np.array([JOINT_INDEX[_mirrored(n)] for n in JOINT_NAMES])

# COCO-WholeBody-133 indices per joint (mean of the listed joints).
COCO_WHOLEBODY_SOURCES = (
    (0,), (5, 6),
    (6,), (8,), (10,),
    (5,), (7,), (9,),
    (12,), (14,), (16,),
    (11,), (13,), (15,),
    (2,), (1,), (4,), (3,),
    (17, 18), (20, 21),
) + tuple((91 + i,) for i in range(NUM_HAND)) + tuple((112 + i,) for i in range(NUM_HAND))
NUM_COCO_WHOLEBODY = 133


def _hand_bones(offset: int) -> tuple[tuple[int, int], ...]:
    bones = []
    for f in range(5):
        base = offset + 1 + 4 * f
        bones.append((offset, base))
        bones += [(base + k, base + k + 1) for k in range(3)]
    return tuple(bones)


_J = JOINT_INDEX
BODY_BONES = tuple((_J[a], _J[b]) for a, b in (
    ("neck", "nose"), ("nose", "r_eye"), ("nose", "l_eye"), ("r_eye", "r_ear"), ("l_eye", "l_ear"),
    ("neck", "r_shoulder"), ("r_shoulder", "r_elbow"), ("r_elbow", "r_wrist"),
    ("neck", "l_shoulder"), ("l_shoulder", "l_elbow"), ("l_elbow", "l_wrist"),
    ("neck", "r_hip"), ("r_hip", "r_knee"), ("r_knee", "r_ankle"), ("r_ankle", "r_toe"),
    ("neck", "l_hip"), ("l_hip", "l_knee"), ("l_knee", "l_ankle"), ("l_ankle", "l_toe"),
))
# Every joint is reachable from the neck through BONES (the skeleton is one tree).
BONES = (BODY_BONES + ((_J["l_wrist"], LEFT_HAND.start), (_J["r_wrist"], RIGHT_HAND.start))
         + _hand_bones(LEFT_HAND.start) + _hand_bones(RIGHT_HAND.start))


def from_coco_wholebody(kpts: np.ndarray) -> np.ndarray:
    """COCO-WholeBody keypoints [..., 133, 3] (x, y, score) -> our layout [..., 62, 3].

    A joint averaged from several sources takes the minimum of their scores.
    """
    kpts = np.asarray(kpts, np.float32)
    if kpts.shape[-2:] != (NUM_COCO_WHOLEBODY, 3):
        raise ValueError(f"expected keypoints of shape [..., {NUM_COCO_WHOLEBODY}, 3] "
                         f"(x, y, score), got {kpts.shape}")
    out = [np.concatenate([kpts[..., src, :2].mean(-2), kpts[..., src, 2].min(-1, keepdims=True)],
                          axis=-1) for src in COCO_WHOLEBODY_SOURCES]
    return np.stack(out, axis=-2)
