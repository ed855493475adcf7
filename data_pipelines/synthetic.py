"""Procedurally rendered 2D characters: the project's embedded default dataset.

Stand-in for the paper's game-engine "motion-consistent, identity-inconsistent" pairs: a *motion*
(smooth parametric joint-angle trajectories) can be rendered on any *identity* (body proportions,
framing, clothes, colours, textures, background) with exact ground-truth keypoints in the
62-joint layout of `im_anim_jax.skeleton`.

Model, in short
  * `joint_angles(motion, T)` turns the motion into one vector per bone of `skeleton.BONES`
    (canonical lengths, body units U where the canonical torso is 1 U long). It depends only on
    the motion and the frame index.
  * `skeleton_positions(identity, motion, T)` scales every bone vector by the identity's length
    multiplier for that bone (one positive scalar per bone) and by the identity's pixel size of
    U, then chains them from the neck. So the unit direction of every bone is the same on every
    identity ("normalised pose"); only lengths, scale and placement differ.
  * `render_clip` draws the figure with anti-aliased signed-distance shapes (tapered capsules,
    ellipses), layer by layer, each layer evaluated only in a per-frame window around it and
    for all frames at once (numpy, no per-pixel loops).

Conventions: image x to the right, y down; pixel (i, j) covers [j-0.5, j+0.5) x [i-0.5, i+0.5),
so its centre is (x=j, y=i). The character faces the camera: its right side is on the image's
left. Left (far-side) limbs are drawn first and darker. Identity placement is stored in image
fractions, so one identity renders at any size.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import inspect
import math
import multiprocessing as mp
import os
import sys
import time

import numpy as np

from data_pipelines import records
from im_anim_jax import skeleton

GENERATOR_VERSION = 2                # 2: eyes that blink and squint ("eyes" DOF)
DATASET_NAME = "synthetic_characters"

SHAPE_PARAM_NAMES = (
    "overall_scale",    # body unit U (canonical torso length) as a fraction of the image size
    "torso_length", "shoulder_width", "hip_width", "head_size", "head_aspect",
    "upper_arm", "forearm", "hand_size", "finger_length",
    "thigh", "shin", "foot",
    "arm_thickness", "leg_thickness", "torso_thickness",
)
NUM_SHAPE_PARAMS = len(SHAPE_PARAM_NAMES)
_SP = {n: i for i, n in enumerate(SHAPE_PARAM_NAMES)}

MOTION_FAMILIES = ("dance", "walk", "wave", "gesture", "jumping_jack")
FRAMINGS = ("full", "half")

# ---------------------------------------------------------------- canonical body (units of U)
_TORSO, _SHOULDER, _UPPER_ARM, _FOREARM = 1.0, 0.42, 0.58, 0.52
_THIGH, _SHIN, _FOOT = 0.82, 0.78, 0.24
_HEAD_R = 0.30                       # head radius; the head centre is 1.25 radii above the neck
_HEAD_UP = 1.25
_HAND_OFF = 0.04                     # body wrist -> hand wrist, along the hand
# per finger (thumb..pinky): metacarpal angle from the hand axis (towards the thumb > 0), its
# length, the fan angle of the finger itself, and the three phalanx lengths
_META_ANG = np.array([0.80, 0.20, 0.04, -0.12, -0.27])
_META_LEN = np.array([0.07, 0.19, 0.20, 0.19, 0.17])
_FAN = np.array([1.00, 0.26, 0.05, -0.13, -0.32])
_PHAL = np.array([[0.080, 0.065, 0.055], [0.090, 0.060, 0.050], [0.100, 0.065, 0.055],
                  [0.095, 0.060, 0.050], [0.075, 0.048, 0.042]])
# points on the (spherical) head: azimuth, elevation, radius (in head radii)
_NOSE_PT = (0.0, -0.10, 1.12)
_EYE_PT = (0.42, 0.15, 1.0)
_EAR_PT = (1.45, 0.02, 1.0)
_MOUTH_PT = (0.28, -0.45, 1.0)

# ---------------------------------------------------------------- motion degrees of freedom
# Every DOF is base + a sum of sinusoids, then softly clamped into (lo, hi) with tanh, so it is
# smooth in time and never leaves its range; `vmax` caps its speed (units per frame).
_SIDE_DOFS = (
    ("shrug", -0.15, 0.35, 0.05), ("abd", -1.0, 3.05, 0.20), ("elbow", -2.6, 2.6, 0.28),
    ("ua_fs", 0.55, 1.0, 0.05), ("fa_fs", 0.5, 1.0, 0.06), ("wrist", -1.3, 1.3, 0.30),
    ("leg", -0.8, 0.8, 0.14), ("knee", -1.4, 1.4, 0.20), ("thigh_fs", 0.6, 1.0, 0.05),
    ("shin_fs", 0.6, 1.0, 0.05), ("foot", -0.6, 0.9, 0.20), ("spread", 0.5, 1.5, 0.10),
    ("curl_thumb", 0.0, 1.5, 0.25), ("curl_index", 0.0, 1.5, 0.25),
    ("curl_middle", 0.0, 1.5, 0.25), ("curl_ring", 0.0, 1.5, 0.25),
    ("curl_pinky", 0.0, 1.5, 0.25),
)
_DOFS = (
    ("root_x", -0.15, 0.15, 0.03), ("root_y", -0.15, 0.15, 0.03),
    ("trunk", -0.35, 0.35, 0.06), ("hip_spread", 0.16, 0.30, 0.01),
    ("head_roll", -0.45, 0.45, 0.08), ("head_yaw", -0.9, 0.9, 0.10),
    ("head_pitch", -0.35, 0.35, 0.08), ("mouth", 0.0, 1.0, 0.5), ("eyes", 0.0, 1.0, 0.05),
) + tuple((f"{s}_{n}", lo, hi, v) for s in "rl" for n, lo, hi, v in _SIDE_DOFS)
DOF_NAMES = tuple(d[0] for d in _DOFS)
_DI = {n: i for i, n in enumerate(DOF_NAMES)}
_LO = np.array([d[1] for d in _DOFS])
_HI = np.array([d[2] for d in _DOFS])
_VMAX = np.array([d[3] for d in _DOFS])
_K = 3                                   # sinusoid components per DOF
_LEG_MAX = 0.8                           # |absolute thigh/shin angle from straight down|
_FOOT_MAX = 1.4                          # |absolute foot angle from straight down| (toe never up)
_NEUTRAL = {
    "root_x": 0.0, "root_y": 0.0, "trunk": 0.0, "hip_spread": 0.22, "head_roll": 0.0,
    "head_yaw": 0.0, "head_pitch": 0.0, "mouth": 0.15, "eyes": 0.9, "shrug": 0.0, "abd": 0.2,
    "elbow": -0.15, "ua_fs": 0.96, "fa_fs": 0.95, "wrist": 0.0, "leg": 0.06, "knee": -0.03,
    "thigh_fs": 0.97, "shin_fs": 0.97, "foot": 0.0, "spread": 1.0, "curl_thumb": 0.3,
    "curl_index": 0.35, "curl_middle": 0.4, "curl_ring": 0.45, "curl_pinky": 0.5,
}

# ---------------------------------------------------------------- skeleton bookkeeping
_J = skeleton.JOINT_INDEX
_BONE_INDEX = {(skeleton.JOINT_NAMES[p], skeleton.JOINT_NAMES[c]): b
               for b, (p, c) in enumerate(skeleton.BONES)}
_NECK = _J["neck"]


def _check_tree() -> None:
    seen = {_NECK}
    for p, c in skeleton.BONES:
        if p not in seen or c in seen:
            raise AssertionError("skeleton.BONES is not in parent-before-child order")
        seen.add(c)
    if len(seen) != skeleton.NUM_JOINTS:
        raise AssertionError("skeleton.BONES does not reach every joint from the neck")


_check_tree()


def _bone_multiplier_names() -> tuple[tuple[str, ...], ...]:
    """Per bone of skeleton.BONES, the shape parameters whose product scales its length."""
    out = []
    for p, c in skeleton.BONES:
        pn, cn = skeleton.JOINT_NAMES[p], skeleton.JOINT_NAMES[c]
        if cn in ("nose", "r_eye", "l_eye", "r_ear", "l_ear"):
            out.append(("head_size",))
        elif cn.endswith("shoulder"):
            out.append(("shoulder_width",))
        elif cn.endswith("elbow"):
            out.append(("upper_arm",))
        elif cn.endswith("_wrist") and not cn.startswith(("lhand", "rhand")):
            out.append(("forearm",))
        elif cn.endswith("hip"):
            out.append(("torso_length",))
        elif cn.endswith("knee"):
            out.append(("thigh",))
        elif cn.endswith("ankle"):
            out.append(("shin",))
        elif cn.endswith("toe"):
            out.append(("foot",))
        elif cn.endswith("hand_wrist") or pn.endswith("hand_wrist"):
            out.append(("hand_size",))           # wrist offset and metacarpals
        else:
            out.append(("hand_size", "finger_length"))   # phalanges
    return tuple(out)


_BONE_MULT = _bone_multiplier_names()


# ================================================================ motions
def _new_motion(family: str, rng: np.random.Generator) -> dict:
    base = np.array([_NEUTRAL[n.split("_", 1)[1]] if n[:2] in ("r_", "l_") else _NEUTRAL[n]
                     for n in DOF_NAMES])
    return {"family": family, "base": base, "amp": np.zeros((len(DOF_NAMES), _K)),
            "freq": np.zeros((len(DOF_NAMES), _K)), "phase": np.zeros((len(DOF_NAMES), _K)),
            "t0": float(rng.uniform(0.0, 200.0))}


def _osc(m: dict, name: str, amp: float, freq: float, phase: float, k: int = 0) -> None:
    i = _DI[name]
    m["amp"][i, k], m["freq"][i, k], m["phase"][i, k] = amp, freq, phase


def _idle(m: dict, rng: np.random.Generator, scale: float = 1.0) -> None:
    """Small random drift on every DOF (breathing, weight shifts, fidgeting) in slot k=2."""
    for n in DOF_NAMES:
        span = _HI[_DI[n]] - _LO[_DI[n]]
        _osc(m, n, scale * 0.03 * span * rng.uniform(0.3, 1.0), rng.uniform(0.01, 0.04),
             rng.uniform(0, 2 * np.pi), k=2)


def _both(m: dict, name: str, r_val: float, l_val: float | None = None) -> None:
    m["base"][_DI["r_" + name]] = r_val
    m["base"][_DI["l_" + name]] = r_val if l_val is None else l_val


def _random_fingers(m, rng, lo=0.0, hi=1.3, amp=0.5, fmin=0.02, fmax=0.07, slot=1):
    for s in "rl":
        for f in ("thumb", "index", "middle", "ring", "pinky"):
            n = f"{s}_curl_{f}"
            m["base"][_DI[n]] = rng.uniform(lo, hi)
            _osc(m, n, rng.uniform(0, amp), rng.uniform(fmin, fmax), rng.uniform(0, 2 * np.pi),
                 slot)
        m["base"][_DI[f"{s}_spread"]] = rng.uniform(0.7, 1.35)
        _osc(m, f"{s}_spread", rng.uniform(0, 0.25), rng.uniform(0.02, 0.06),
             rng.uniform(0, 2 * np.pi), slot)


def _motion_walk(m, rng):
    f = rng.uniform(0.025, 0.05)
    ph = rng.uniform(0, 2 * np.pi)
    view = rng.choice([-1, 1]) * rng.uniform(0.3, 1.0)      # how much of the stride is in-plane
    stride = rng.uniform(0.25, 0.5) * 1.3 * abs(math.sin(view))
    for s in "rl":   # mirrored parameters with the same sign = legs scissor in the image
        _osc(m, f"{s}_leg", stride, f, ph)
        _osc(m, f"{s}_knee", 0.5 * stride + rng.uniform(0.05, 0.2), f, ph - np.pi / 2)
        _osc(m, f"{s}_thigh_fs", rng.uniform(0.03, 0.1), 2 * f, 2 * ph + np.pi / 2)
        _osc(m, f"{s}_shin_fs", rng.uniform(0.03, 0.1), 2 * f, 2 * ph)
        _osc(m, f"{s}_foot", rng.uniform(0.1, 0.3), f, ph + np.pi)
    swing = rng.uniform(0.5, 1.2) * stride + rng.uniform(0.0, 0.1)
    _both(m, "abd", rng.uniform(0.05, 0.3))
    _both(m, "elbow", -rng.uniform(0.1, 0.7))
    for s in "rl":   # arms counter-swing the same-side leg
        _osc(m, f"{s}_abd", swing, f, ph + np.pi)
        _osc(m, f"{s}_elbow", rng.uniform(0.1, 0.35), f, ph + np.pi)
        _osc(m, f"{s}_fa_fs", rng.uniform(0.03, 0.1), f, ph)
    _osc(m, "root_y", rng.uniform(0.02, 0.05), 2 * f, 2 * ph)
    _osc(m, "root_x", rng.uniform(0.0, 0.05), f, ph)
    _osc(m, "trunk", rng.uniform(0.02, 0.08), f, ph + np.pi / 2)
    _osc(m, "head_roll", rng.uniform(0.0, 0.08), f, ph)
    m["base"][_DI["head_yaw"]] = 0.6 * view
    _random_fingers(m, rng, 0.1, 0.8, amp=0.2)
    _idle(m, rng, 0.5)


def _motion_wave(m, rng):
    a, b = ("r", "l") if rng.random() < 0.5 else ("l", "r")
    f = rng.uniform(0.05, 0.1)
    ph = rng.uniform(0, 2 * np.pi)
    m["base"][_DI[f"{a}_abd"]] = rng.uniform(1.6, 2.7)
    m["base"][_DI[f"{a}_elbow"]] = rng.uniform(0.5, 1.5)
    m["base"][_DI[f"{a}_wrist"]] = rng.uniform(-0.3, 0.3)
    _osc(m, f"{a}_elbow", rng.uniform(0.3, 0.6), f, ph)
    _osc(m, f"{a}_wrist", rng.uniform(0.2, 0.5), f, ph + rng.uniform(0.5, 1.5))
    _osc(m, f"{a}_abd", rng.uniform(0.05, 0.25), f / 2, ph)
    _osc(m, f"{a}_abd", rng.uniform(0.1, 0.4), rng.uniform(0.01, 0.025), rng.uniform(0, 6.3), 1)
    for fi in ("thumb", "index", "middle", "ring", "pinky"):
        m["base"][_DI[f"{a}_curl_{fi}"]] = rng.uniform(0.0, 0.25)
    m["base"][_DI[f"{a}_spread"]] = rng.uniform(1.1, 1.45)
    if rng.random() < 0.4:    # other hand on the hip
        m["base"][_DI[f"{b}_abd"]] = rng.uniform(0.5, 0.8)
        m["base"][_DI[f"{b}_elbow"]] = -rng.uniform(1.6, 2.1)
    else:
        m["base"][_DI[f"{b}_abd"]] = rng.uniform(-0.2, 0.5)
        m["base"][_DI[f"{b}_elbow"]] = rng.uniform(-0.8, 0.3)
    _osc(m, f"{b}_abd", rng.uniform(0.0, 0.2), rng.uniform(0.01, 0.03), rng.uniform(0, 6.3))
    m["base"][_DI["head_roll"]] = rng.uniform(-0.2, 0.2)
    m["base"][_DI["head_yaw"]] = rng.uniform(-0.5, 0.5)
    m["base"][_DI["mouth"]] = rng.uniform(0.2, 0.8)
    _both(m, "leg", rng.uniform(0.0, 0.2), rng.uniform(0.0, 0.2))
    _osc(m, "trunk", rng.uniform(0.0, 0.1), rng.uniform(0.01, 0.03), rng.uniform(0, 6.3))
    _random_fingers_side(m, rng, b)
    _idle(m, rng)


def _random_fingers_side(m, rng, s):
    for f in ("thumb", "index", "middle", "ring", "pinky"):
        m["base"][_DI[f"{s}_curl_{f}"]] = rng.uniform(0.1, 1.2)


def _motion_gesture(m, rng):
    for s in "rl":
        m["base"][_DI[f"{s}_abd"]] = rng.uniform(-0.3, 1.3)
        m["base"][_DI[f"{s}_elbow"]] = rng.choice([-1, 1], p=[0.7, 0.3]) * rng.uniform(0.5, 2.2)
        m["base"][_DI[f"{s}_fa_fs"]] = rng.uniform(0.55, 0.95)
        m["base"][_DI[f"{s}_wrist"]] = rng.uniform(-0.6, 0.6)
        _osc(m, f"{s}_abd", rng.uniform(0.1, 0.4), rng.uniform(0.02, 0.05), rng.uniform(0, 6.3))
        _osc(m, f"{s}_elbow", rng.uniform(0.2, 0.6), rng.uniform(0.02, 0.06), rng.uniform(0, 6.3))
        _osc(m, f"{s}_wrist", rng.uniform(0.3, 0.9), rng.uniform(0.03, 0.08), rng.uniform(0, 6.3))
        _osc(m, f"{s}_fa_fs", rng.uniform(0.0, 0.15), rng.uniform(0.02, 0.05), rng.uniform(0, 6.3))
    _random_fingers(m, rng, 0.0, 1.3, amp=0.7, fmin=0.03, fmax=0.09, slot=0)
    m["base"][_DI["head_yaw"]] = rng.uniform(-0.5, 0.5)
    _osc(m, "head_yaw", rng.uniform(0.1, 0.4), rng.uniform(0.01, 0.04), rng.uniform(0, 6.3))
    _osc(m, "head_pitch", rng.uniform(0.05, 0.2), rng.uniform(0.03, 0.07), rng.uniform(0, 6.3))
    _osc(m, "mouth", rng.uniform(0.2, 0.5), rng.uniform(0.08, 0.15), rng.uniform(0, 6.3))
    m["base"][_DI["mouth"]] = rng.uniform(0.2, 0.5)
    _both(m, "leg", rng.uniform(0.0, 0.2), rng.uniform(0.0, 0.2))
    _idle(m, rng)


def _motion_dance(m, rng):
    for s in "rl":
        m["base"][_DI[f"{s}_abd"]] = rng.uniform(-0.6, 2.8)
        m["base"][_DI[f"{s}_elbow"]] = rng.uniform(-2.2, 2.2)
        m["base"][_DI[f"{s}_wrist"]] = rng.uniform(-0.8, 0.8)
        m["base"][_DI[f"{s}_ua_fs"]] = rng.uniform(0.7, 1.0)
        m["base"][_DI[f"{s}_fa_fs"]] = rng.uniform(0.65, 1.0)
        m["base"][_DI[f"{s}_leg"]] = rng.uniform(-0.1, 0.55)
        m["base"][_DI[f"{s}_knee"]] = rng.uniform(-1.0, 0.3)
        m["base"][_DI[f"{s}_thigh_fs"]] = rng.uniform(0.7, 1.0)
        for n, amp in (("abd", 1.0), ("elbow", 1.2), ("wrist", 0.6), ("leg", 0.3),
                       ("knee", 0.5), ("shrug", 0.15), ("ua_fs", 0.15), ("fa_fs", 0.15),
                       ("thigh_fs", 0.12), ("foot", 0.3)):
            for k in range(2):
                _osc(m, f"{s}_{n}", rng.uniform(0, amp), rng.uniform(0.015, 0.06),
                     rng.uniform(0, 2 * np.pi), k)
    beat = rng.uniform(0.03, 0.06)
    _osc(m, "root_y", rng.uniform(0.02, 0.1), beat, rng.uniform(0, 6.3))
    _osc(m, "root_x", rng.uniform(0.0, 0.12), beat / 2, rng.uniform(0, 6.3))
    m["base"][_DI["root_y"]] = rng.uniform(-0.02, 0.08)
    _osc(m, "trunk", rng.uniform(0.1, 0.35), rng.uniform(0.015, 0.04), rng.uniform(0, 6.3))
    for n, amp in (("head_roll", 0.35), ("head_yaw", 0.6), ("head_pitch", 0.2), ("mouth", 0.4)):
        _osc(m, n, rng.uniform(0, amp), rng.uniform(0.02, 0.06), rng.uniform(0, 6.3))
    _random_fingers(m, rng, 0.0, 1.4, amp=0.6)
    _idle(m, rng)


def _motion_jumping_jack(m, rng):
    f = rng.uniform(0.018, 0.028)
    ph = rng.uniform(0, 2 * np.pi)
    top = rng.uniform(2.3, 2.95)
    _both(m, "abd", (top + 0.2) / 2)
    _both(m, "elbow", rng.uniform(-0.4, 0.4))
    _both(m, "leg", rng.uniform(0.2, 0.35))
    _both(m, "knee", -rng.uniform(0.0, 0.2))
    for s in "rl":
        _osc(m, f"{s}_abd", (top - 0.2) / 2, f, ph)
        _osc(m, f"{s}_leg", rng.uniform(0.15, 0.3), f, ph)
        _osc(m, f"{s}_elbow", rng.uniform(0.0, 0.3), f, ph + np.pi / 2)
    _osc(m, "root_y", rng.uniform(0.03, 0.1), 2 * f, 2 * ph + np.pi)
    _random_fingers(m, rng, 0.0, 0.6, amp=0.3)
    m["base"][_DI["mouth"]] = rng.uniform(0.1, 0.7)
    _idle(m, rng, 0.5)


# eye openness per family: raw base range and slow squint amplitude range (before the soft clamp
# into (0, 1)); blinks: per motion, the mean extra gap between blink events (frames)
_EYES = {"dance": ((0.9, 1.3), (0.0, 0.2)), "walk": ((0.75, 1.2), (0.0, 0.1)),
         "wave": ((0.4, 0.8), (0.05, 0.2)), "gesture": ((0.55, 1.1), (0.15, 0.35)),
         "jumping_jack": ((0.9, 1.3), (0.0, 0.15))}
_BLINK_GAP = (4.0, 12.0)


def _eyes(m, rng):
    """Family-dependent eye openness with slow squints, and the motion's blink events."""
    (lo, hi), (alo, ahi) = _EYES[m["family"]]
    m["base"][_DI["eyes"]] = rng.uniform(lo, hi)
    _osc(m, "eyes", rng.uniform(alo, ahi), rng.uniform(0.01, 0.04), rng.uniform(0, 2 * np.pi))
    m["blink"] = {"seed": int(rng.integers(2**31)), "gap": float(rng.uniform(*_BLINK_GAP))}


def _blink_closure(blink: dict, t: np.ndarray) -> np.ndarray:
    """Eyelid closure in [0, 1] at motion times t [T] (frames, increasing).

    Blink events form a renewal process drawn from blink["seed"] (so every clip of the motion sees
    the same events): each a smooth bump of half-width 1.3..2.5 frames, the next one starting
    its width + 1 + an exponential gap (mean blink["gap"]) later.
    """
    rng = np.random.default_rng(blink["seed"])
    closure = np.zeros_like(t)
    s = -rng.uniform(0.0, blink["gap"])
    while s < t[-1] + 3.0:
        w = rng.uniform(1.3, 2.5)
        u = np.clip(1 - np.abs(t - s) / w, 0, 1)
        closure = np.maximum(closure, u * u * (3 - 2 * u))
        s += 2 * w + 1 + rng.exponential(blink["gap"])
    return closure


_FAMILY_FNS = {"dance": _motion_dance, "walk": _motion_walk, "wave": _motion_wave,
               "gesture": _motion_gesture, "jumping_jack": _motion_jumping_jack}


def sample_motion(rng: np.random.Generator, family: str | None = None) -> dict:
    """A smooth parametric motion: per DOF a base value plus 3 sinusoids (numpy arrays), and
    blink events that close the eyes ("eyes" DOF) for a few frames.

    Keys: family, base [D], amp/freq/phase [D, 3] (freq in cycles per frame), t0 (frames),
    blink {seed, gap} (see _blink_closure).
    """
    if family is None:
        family = str(rng.choice(MOTION_FAMILIES))
    if family not in _FAMILY_FNS:
        raise ValueError(f"unknown motion family {family!r}; choose one of {MOTION_FAMILIES}")
    m = _new_motion(family, rng)
    _FAMILY_FNS[family](m, rng)
    _eyes(m, rng)
    speed = np.sum(np.abs(m["amp"]) * 2 * np.pi * m["freq"], axis=1)
    m["amp"] *= np.minimum(1.0, _VMAX / np.maximum(speed, 1e-12))[:, None]
    return m


def make_motion(seed: int, motion_id: int) -> dict:
    """Motion `motion_id` of the dataset built with `seed` (family = MOTION_FAMILIES[id % n])."""
    rng = np.random.default_rng([int(seed), 1, int(motion_id)])
    return sample_motion(rng, MOTION_FAMILIES[int(motion_id) % len(MOTION_FAMILIES)])


def _soft(x, lo, hi):
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    return mid + half * np.tanh((x - mid) / half)


def _dir(theta):
    return np.stack([np.cos(theta), np.sin(theta)], -1)


def _sphere(pt, yaw, pitch, side):
    """Point (azimuth, elevation, radius) of a unit-radius head turned by yaw/pitch -> [T, 2]
    in the head frame (x to image right when upright, y down). side=-1 mirrors the azimuth."""
    az, el, rad = pt
    az = side * az
    x, y = rad * math.sin(az) * math.cos(el), -rad * math.sin(el)
    z = rad * math.cos(az) * math.cos(el)
    x1 = x * np.cos(yaw) + z * np.sin(yaw)
    z1 = -x * np.sin(yaw) + z * np.cos(yaw)
    y1 = y * np.cos(pitch) - z1 * np.sin(pitch)
    return np.stack([x1, y1], -1)


def joint_angles(motion: dict, num_frames: int) -> dict:
    """The normalised pose per frame; depends only on the motion and the frame index.

    Returns a dict of float32 arrays:
      dofs [T, D]               the DOF values (names in DOF_NAMES)
      bone_vectors [T, B, 2]    per bone of skeleton.BONES, the canonical-body vector (units U)
      bone_directions [T, B, 2] the same, unit length (identical on every identity)
      root [T, 2]               pelvis offset (units U)
      head_center [T, 2]        neck -> head centre (units of head radius)
      head_axis [T, 2]          head "down" unit vector (the drawn head's roll)
      mouth [T, 2, 2]           neck -> mouth corners (units of head radius)
      mouth_open [T]            0..1
      eyes_open [T]             0 (closed) .. 1 (open): squints and blinks
    """
    num_frames = int(num_frames)
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    t = np.arange(num_frames, dtype=np.float64) + float(motion["t0"])
    raw = motion["base"][None] + np.sum(
        motion["amp"][None] * np.sin(2 * np.pi * motion["freq"][None] * t[:, None, None]
                                     + motion["phase"][None]), -1)
    q = _soft(raw, _LO, _HI)
    q[:, _DI["eyes"]] *= 1 - _blink_closure(motion["blink"], t)
    g = lambda n: q[:, _DI[n]]  # noqa: E731
    T = num_frames
    vec = np.zeros((T, len(skeleton.BONES), 2))

    def put(a, b, v):
        vec[:, _BONE_INDEX[(a, b)]] = v

    th_d = np.pi / 2 + g("trunk")
    down, lat_r = _dir(th_d), _dir(th_d + np.pi / 2)
    up = -down
    hs = g("hip_spread")[:, None]
    put("neck", "r_hip", _TORSO * (down + hs * lat_r))
    put("neck", "l_hip", _TORSO * (down - hs * lat_r))

    # head: centre 1.25 radii above the neck along the head axis, landmarks on a sphere
    th_h = th_d + g("head_roll")
    e_down, e_x = _dir(th_h), _dir(th_h - np.pi / 2)
    yaw, pitch = g("head_yaw"), g("head_pitch")
    to2d = lambda p: p[:, :1] * e_x + p[:, 1:] * e_down  # noqa: E731
    center = -_HEAD_UP * e_down
    nose = center + to2d(_sphere(_NOSE_PT, yaw, pitch, 1))
    put("neck", "nose", _HEAD_R * nose)
    for s, side in (("r", -1), ("l", 1)):
        eye = center + to2d(_sphere(_EYE_PT, yaw, pitch, side))
        ear = center + to2d(_sphere(_EAR_PT, yaw, pitch, side))
        put("nose", f"{s}_eye", _HEAD_R * (eye - nose))
        put(f"{s}_eye", f"{s}_ear", _HEAD_R * (ear - eye))
    mouth = np.stack([center + to2d(_sphere(_MOUTH_PT, yaw, pitch, side)) for side in (-1, 1)], 1)

    for s, sg in (("r", 1.0), ("l", -1.0)):   # sg: mirror for the left side
        n = lambda k: g(f"{s}_{k}")  # noqa: E731
        lat = sg * lat_r
        put("neck", f"{s}_shoulder", _SHOULDER * (lat + n("shrug")[:, None] * up))
        th_ua = th_d + sg * n("abd")
        th_fa = th_ua + sg * n("elbow")
        th_hand = th_fa + sg * n("wrist")
        put(f"{s}_shoulder", f"{s}_elbow", _UPPER_ARM * n("ua_fs")[:, None] * _dir(th_ua))
        put(f"{s}_elbow", f"{s}_wrist", _FOREARM * n("fa_fs")[:, None] * _dir(th_fa))
        hand = f"{'r' if s == 'r' else 'l'}hand_"
        put(f"{s}_wrist", hand + "wrist", _HAND_OFF * _dir(th_hand))
        spread = n("spread")
        for fi, fname in enumerate(skeleton.FINGERS):
            put(hand + "wrist", f"{hand}{fname}_0",
                _META_LEN[fi] * _dir(th_hand + sg * _META_ANG[fi] * (0.6 + 0.4 * spread)))
            curl = n(f"curl_{fname}")
            th = th_hand + sg * _FAN[fi] * spread
            for k in range(3):
                if fi == 0:       # thumb folds across the palm, little foreshortening
                    th = th - sg * 0.45 * curl
                    fs = np.cos(0.4 * curl)
                else:             # fingers fold towards the camera and a bit towards the thumb
                    th = th + sg * 0.25 * curl
                    fs = np.maximum(np.cos(0.8 * curl), 0.3)
                put(f"{hand}{fname}_{k}", f"{hand}{fname}_{k + 1}",
                    _PHAL[fi, k] * fs[:, None] * _dir(th))
        leg = n("leg")
        shin = _soft(leg + n("knee"), -_LEG_MAX, _LEG_MAX)
        foot = _soft(shin + 0.45 + n("foot"), -_FOOT_MAX, _FOOT_MAX)
        put(f"{s}_hip", f"{s}_knee", _THIGH * n("thigh_fs")[:, None] * _dir(np.pi / 2 + sg * leg))
        put(f"{s}_knee", f"{s}_ankle", _SHIN * n("shin_fs")[:, None] * _dir(np.pi / 2 + sg * shin))
        put(f"{s}_ankle", f"{s}_toe", _FOOT * _dir(np.pi / 2 + sg * foot))

    norm = np.linalg.norm(vec, axis=-1, keepdims=True)
    if np.any(norm < 1e-6):
        raise AssertionError("a bone has zero length")
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return {"dofs": f32(q), "bone_vectors": f32(vec), "bone_directions": f32(vec / norm),
            "root": f32(np.stack([g("root_x"), g("root_y")], -1)), "head_center": f32(center),
            "head_axis": f32(e_down), "mouth": f32(mouth), "mouth_open": f32(g("mouth")),
            "eyes_open": f32(g("eyes"))}


# ================================================================ identities
def _hsv(h, s, v):
    h = (h % 1.0) * 6
    c = v * s
    x = c * (1 - abs(h % 2 - 1))
    rgb = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h) % 6]
    return np.array(rgb) + (v - c)


def _rand_color(rng, s=(0.2, 0.95), v=(0.2, 0.95)):
    return _hsv(rng.random(), rng.uniform(*s), rng.uniform(*v))


def _skin(rng):
    if rng.random() < 0.65:
        t = rng.random()
        c = (1 - t) * np.array([0.98, 0.84, 0.72]) + t * np.array([0.36, 0.23, 0.15])
        return np.clip(c + rng.normal(0, 0.03, 3), 0, 1)
    return _rand_color(rng, (0.25, 0.8), (0.45, 0.95))


def _hair(rng):
    if rng.random() < 0.7:
        natural = np.array([[0.08, 0.06, 0.05], [0.30, 0.18, 0.10], [0.55, 0.35, 0.18],
                            [0.85, 0.70, 0.40], [0.60, 0.25, 0.10], [0.75, 0.75, 0.75]])
        return np.clip(natural[rng.integers(len(natural))] + rng.normal(0, 0.03, 3), 0, 1)
    return _rand_color(rng, (0.5, 1.0), (0.4, 1.0))


def _dist(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)))


def _texture(rng, kinds=("flat", "stripes", "checker", "noise", "dots"),
             p=(0.3, 0.25, 0.15, 0.15, 0.15)):
    kind = str(rng.choice(kinds, p=p))
    return {"kind": kind, "period": float(rng.uniform(0.15, 0.45)),
            "angle": float(rng.uniform(0, np.pi)), "contrast": float(rng.uniform(0.5, 1.0)),
            "table": rng.random((8, 8)).astype(np.float32)}


def _reach(sp: np.ndarray) -> dict:
    """Conservative keypoint/drawing extents relative to the pelvis centre (units U), valid for
    every motion (they follow from the DOF bounds)."""
    p = lambda n: float(sp[_SP[n]])  # noqa: E731
    sin_tr = math.sin(_HI[_DI["trunk"]])
    rx, ry = _HI[_DI["root_x"]], _HI[_DI["root_y"]]
    hand = p("hand_size") * (_HAND_OFF + np.max(_META_LEN + p("finger_length") * _PHAL.sum(1)))
    limb = p("upper_arm") * _UPPER_ARM + p("forearm") * _FOREARM + hand + 0.08
    shrug = _HI[_DI["r_shrug"]]
    arm = p("shoulder_width") * _SHOULDER * math.hypot(1, shrug) + limb      # any direction
    arm_up = p("shoulder_width") * _SHOULDER * (sin_tr + shrug) + limb      # upwards
    head = p("head_size") * _HEAD_R * (_HEAD_UP + 1.45)      # head top incl. hair
    torso = p("torso_length") * _TORSO
    hip_lat = torso * _HI[_DI["hip_spread"]]
    legs = p("thigh") * _THIGH + p("shin") * _SHIN
    up = torso + ry + max(arm_up, head)
    down = ry + hip_lat * sin_tr + legs + p("foot") * _FOOT + 0.08
    lat = max(torso * sin_tr + rx + max(arm, head),
              rx + hip_lat + legs * math.sin(_LEG_MAX) + p("foot") * _FOOT + 0.08)
    fs_min = _LO[_DI["r_thigh_fs"]]
    ankle_drop = (-ry - hip_lat * sin_tr
                  + (p("thigh") * _THIGH + p("shin") * _SHIN) * fs_min * math.cos(_LEG_MAX))
    return {"up": up, "down": down, "lat": lat, "head_top": torso + ry + head,
            "ankle_drop": ankle_drop}


def sample_identity(rng: np.random.Generator, framing: str | None = None,
                    image_size: int = 64) -> dict:
    """A random character: body proportions, framing/placement, clothes, colours, background.

    Placement ("center": pelvis centre, "scale": U) is in fractions of the image size, so the
    identity renders at any size; `image_size` is only the default for skeleton_positions.
    """
    if framing is None:
        framing = "half" if rng.random() < 0.3 else "full"
    if framing not in FRAMINGS:
        raise ValueError(f"framing must be one of {FRAMINGS}, got {framing!r}")
    u = rng.uniform
    limb, legf = u(0.85, 1.15), u(0.78, 1.2)
    big_head = rng.random() < 0.25
    shape = {
        "torso_length": u(0.8, 1.2), "shoulder_width": u(0.75, 1.35), "hip_width": u(0.75, 1.4),
        "head_size": u(1.2, 1.7) if big_head else u(0.8, 1.2), "head_aspect": u(0.92, 1.25),
        "upper_arm": limb * u(0.9, 1.1), "forearm": limb * u(0.9, 1.1),
        "hand_size": u(0.85, 1.4), "finger_length": u(0.85, 1.2),
        "thigh": legf * u(0.92, 1.08), "shin": legf * u(0.92, 1.08), "foot": u(0.8, 1.3),
        "arm_thickness": u(0.7, 1.8), "leg_thickness": u(0.7, 1.7),
        "torso_thickness": u(0.75, 1.5), "overall_scale": 0.0,
    }
    sp = np.array([shape[n] for n in SHAPE_PARAM_NAMES], np.float64)
    r = _reach(sp)
    m = 0.02
    if framing == "full":
        scale_max = (1 - 2 * m) / max(2 * r["lat"], r["up"] + r["down"])
        scale = scale_max * u(0.85, 1.0)
        cx = u(m + r["lat"] * scale, 1 - m - r["lat"] * scale)
        cy = u(m + r["up"] * scale, 1 - m - r["down"] * scale)
    else:
        # ankles (and toes, which never point up) always below the frame; the head inside it
        scale = 1.0 / u(1.9, 2.6)
        extra = u(0.0, 0.3)
        scale = min(scale, (1 + m - 0.03) / (r["head_top"] + r["ankle_drop"] - extra))
        cy = 1 + m - scale * (r["ankle_drop"] - extra)
        cx = 0.5 + u(-0.12, 0.12)
    sp[_SP["overall_scale"]] = scale

    skin = _skin(rng)
    for _ in range(20):
        top = _rand_color(rng)
        if _dist(top, skin) > 0.3:
            break
    for _ in range(20):
        bottom = _rand_color(rng)
        if _dist(bottom, top) > 0.25 and _dist(bottom, skin) > 0.25:
            break
    colors = {"skin": skin, "top": top, "top2": _rand_color(rng), "bottom": bottom,
              "bottom2": _rand_color(rng), "shoe": _rand_color(rng, (0.0, 0.8), (0.05, 0.7)),
              "hair": _hair(rng), "glove": _rand_color(rng) if rng.random() < 0.15 else skin,
              "eye": _rand_color(rng, (0.0, 0.9), (0.0, 0.4)),
              "mouth": np.array([0.55, 0.12, 0.15]) * u(0.6, 1.0)}
    background = _sample_background(rng, [skin, top, bottom])
    return {
        "framing": framing, "center": (float(cx), float(cy)), "scale": float(scale),
        "shape_params": sp.astype(np.float32), "image_size": int(image_size),
        "colors": {k: np.asarray(v, np.float32) for k, v in colors.items()},
        "textures": {"top": _texture(rng), "bottom": _texture(rng)},
        "sleeves": int(rng.choice([0, 1, 2], p=[0.2, 0.4, 0.4])),
        "legwear": str(rng.choice(["pants", "shorts", "skirt"], p=[0.55, 0.3, 0.15])),
        "hair": {"style": str(rng.choice(["none", "short", "long", "tall"],
                                         p=[0.12, 0.45, 0.3, 0.13]))},
        "eye_size": float(u(0.8, 1.5)), "outline": float(u(0.25, 0.6)),
        "background": background,
    }


def make_identity(seed: int, identity_id: int, image_size: int = 64) -> dict:
    """Identity `identity_id` of the dataset built with `seed` (independent of the others)."""
    return sample_identity(np.random.default_rng([int(seed), 0, int(identity_id)]),
                           image_size=image_size)


def _sample_background(rng, figure_colors) -> dict:
    kind = str(rng.choice(["gradient", "noise", "stripes", "blobs", "checker", "room"]))
    for _ in range(30):
        cols = [_rand_color(rng, (0.0, 0.9), (0.1, 1.0)) for _ in range(3)]
        if all(_dist(c, f) > 0.22 for c in cols[:2] for f in figure_colors):
            break
    return {"kind": kind, "colors": np.asarray(cols, np.float32), "seed": int(rng.integers(2**31)),
            "angle": float(rng.uniform(0, 2 * np.pi)), "period": float(rng.uniform(0.08, 0.3)),
            "soft": bool(rng.random() < 0.5), "horizon": float(rng.uniform(0.55, 0.85)),
            "octaves": int(rng.integers(1, 4)), "cells": int(rng.integers(2, 7)),
            "grain": float(rng.uniform(0.0, 0.03))}


def render_background(identity: dict, size: int) -> np.ndarray:
    """The identity's static background, float32 [size, size, 3] in [0, 1]."""
    bg = identity["background"]
    rng = np.random.default_rng([bg["seed"], int(size)])
    c = bg["colors"]
    v = (np.arange(size, dtype=np.float32) + 0.5) / size
    X, Y = v[None, :], v[:, None]
    ca, sa = math.cos(bg["angle"]), math.sin(bg["angle"])
    proj = (X - 0.5) * ca + (Y - 0.5) * sa
    mix = lambda a, b, t: a + (b - a) * t[..., None]  # noqa: E731
    kind = bg["kind"]
    if kind == "gradient":
        img = mix(c[0], c[1], np.clip(proj + 0.5, 0, 1))
    elif kind == "stripes":
        s = np.sin(2 * np.pi * proj / bg["period"])
        img = mix(c[0], c[1], 0.5 + 0.5 * (s if bg["soft"] else np.tanh(4 * s)))
    elif kind == "checker":
        q = (X - 0.5) * -sa + (Y - 0.5) * ca
        s = np.sin(2 * np.pi * proj / bg["period"]) * np.sin(2 * np.pi * q / bg["period"])
        img = mix(c[0], c[1], 0.5 + 0.5 * np.tanh(4 * s))
    elif kind == "noise":
        acc = np.zeros((size, size), np.float32)
        for o in range(bg["octaves"]):
            n = bg["cells"] * 2 ** o
            grid = np.random.default_rng([bg["seed"], o]).random((n + 1, n + 1)).astype(np.float32)
            gx, gy = X * n, Y * n
            ix, iy = np.minimum(gx.astype(int), n - 1), np.minimum(gy.astype(int), n - 1)
            fx, fy = gx - ix, gy - iy
            fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
            top = grid[iy, ix] * (1 - fx) + grid[iy, ix + 1] * fx
            bot = grid[iy + 1, ix] * (1 - fx) + grid[iy + 1, ix + 1] * fx
            acc += (top * (1 - fy) + bot * fy) / 2 ** o
        acc = (acc - acc.min()) / max(float(acc.max() - acc.min()), 1e-6)
        img = np.where(acc[..., None] < 0.5, mix(c[0], c[1], np.clip(2 * acc, 0, 1)),
                       mix(c[1], c[2], np.clip(2 * acc - 1, 0, 1)))
    elif kind == "blobs":
        img = np.broadcast_to(c[0], (size, size, 3)).copy()
        brng = np.random.default_rng([bg["seed"], 99])
        for _ in range(int(brng.integers(3, 9))):
            cx, cy, rad = brng.random(), brng.random(), brng.uniform(0.05, 0.3)
            d = (np.sqrt((X - cx) ** 2 + (Y - cy) ** 2) - rad) * size
            a = np.clip(0.5 - d / (1 + 6 * bg["soft"]), 0, 1) * brng.uniform(0.5, 1.0)
            col = c[1] + (c[2] - c[1]) * brng.random()
            img += (col - img) * a[..., None]
    else:  # room: wall above a horizon, floor below, both shaded
        h = bg["horizon"]
        wall = mix(c[0] * 0.85, c[0], np.broadcast_to(Y / h, (size, size)))
        depth = np.broadcast_to(np.clip((Y - h) / (1 - h), 0, 1), (size, size))
        floor = mix(c[1], c[1] * 0.7, depth)
        img = np.where((Y < h)[..., None], wall, floor)
    img = np.broadcast_to(img, (size, size, 3)).astype(np.float32)
    if bg["grain"] > 0:
        img = img + rng.normal(0, bg["grain"], img.shape).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


# ================================================================ kinematics
def _placement(identity: dict, size: int):
    """(pixels per U, pelvis centre in pixels)."""
    U = identity["scale"] * size
    cx, cy = identity["center"]
    return U, np.array([cx * size - 0.5, cy * size - 0.5])


def _bone_scales(identity: dict) -> np.ndarray:
    sp = identity["shape_params"]
    return np.array([np.prod([sp[_SP[n]] for n in names]) for names in _BONE_MULT], np.float64)


def _fk(identity: dict, pose: dict, size: int) -> np.ndarray:
    U, center = _placement(identity, size)
    vec = pose["bone_vectors"].astype(np.float64) * (U * _bone_scales(identity))[None, :, None]
    T = vec.shape[0]
    pos = np.zeros((T, skeleton.NUM_JOINTS, 2))
    pelvis = center[None] + U * pose["root"].astype(np.float64)
    hips = vec[:, _BONE_INDEX[("neck", "r_hip")]] + vec[:, _BONE_INDEX[("neck", "l_hip")]]
    pos[:, _NECK] = pelvis - hips / 2
    for b, (p, c) in enumerate(skeleton.BONES):
        pos[:, c] = pos[:, p] + vec[:, b]
    return pos


def skeleton_positions(identity: dict, motion: dict, num_frames: int,
                       size: int | None = None, dtype=np.float32) -> np.ndarray:
    """Forward kinematics: [T, 62, 2] pixel coordinates (pixel centres at integers) in a
    `size` x `size` image (default identity["image_size"]), before any visibility handling.

    Computed in float64; returned as `dtype` (float32 by default, whose rounding alone moves the
    direction of the shortest finger bones by ~1e-5; pass np.float64 for exact directions)."""
    size = int(identity.get("image_size", 64) if size is None else size)
    return _fk(identity, joint_angles(motion, num_frames), size).astype(dtype)


# ================================================================ rasteriser
class _Canvas:
    """Frames [T, S, S, 3] float32; layers are composited inside per-frame windows."""

    def __init__(self, background: np.ndarray, T: int, U: float, outline: float):
        self.size = background.shape[0]
        self.img = np.repeat(background[None], T, axis=0)
        self.T, self.U, self.edge = T, U, outline
        self.ow = max(0.8, 0.05 * U)

    def layer(self, caps=(), ells=(), color=None, texture=None, frame=None, shade=1.0,
              clip=None, edge=None):
        """Union of capsules [(a [T,2], b [T,2], r0, r1)] and ellipses [(c [T,2], rx, ry,
        axis [T,2])] (radii in pixels; capsule radii scalars or per frame [T]), optionally
        intersected with the half-plane dot(p - point, normal) <= 0 (clip = (point, normal))."""
        S, T = self.size, self.T
        lo, hi = [], []
        for a, b, r0, r1 in caps:
            r = float(max(np.max(r0), np.max(r1)))
            lo.append(np.minimum(a, b) - r)
            hi.append(np.maximum(a, b) + r)
        for c, rx, ry, _ in ells:
            r = max(rx, ry)
            lo.append(c - r)
            hi.append(c + r)
        lo = np.min(np.stack(lo), 0) - 1.5
        hi = np.max(np.stack(hi), 0) + 1.5
        if np.all(np.any((hi < -0.5) | (lo > S - 0.5), axis=-1)):
            return                                  # outside the image in every frame
        ext = np.max(hi - lo, 0)
        wx, wy = (int(min(S, math.ceil(e) + 1)) for e in ext)
        ox = np.clip(np.floor(lo[:, 0]), 0, S - wx).astype(np.int64)
        oy = np.clip(np.floor(lo[:, 1]), 0, S - wy).astype(np.int64)
        xi = ox[:, None, None] + np.arange(wx)[None, None, :]      # [T, 1, wx]
        yi = oy[:, None, None] + np.arange(wy)[None, :, None]      # [T, wy, 1]
        X, Y = xi.astype(np.float32), yi.astype(np.float32)
        d = None
        if caps:
            A = np.stack([c[0] for c in caps]).astype(np.float32)[:, :, None, None, :]
            B = np.stack([c[1] for c in caps]).astype(np.float32)[:, :, None, None, :]
            r0, r1 = (np.stack([np.broadcast_to(np.asarray(c[i], np.float32), (T,)) for c in caps])
                      [:, :, None, None] for i in (2, 3))
            pax, pay = X[None] - A[..., 0], Y[None] - A[..., 1]
            bax, bay = B[..., 0] - A[..., 0], B[..., 1] - A[..., 1]
            h = np.clip((pax * bax + pay * bay) / (bax * bax + bay * bay + 1e-6), 0, 1)
            dx, dy = pax - bax * h, pay - bay * h
            d = np.min(np.sqrt(dx * dx + dy * dy) - (r0 + (r1 - r0) * h), 0)
        if ells:
            C = np.stack([e[0] for e in ells]).astype(np.float32)[:, :, None, None, :]
            ax = np.stack([e[3] for e in ells]).astype(np.float32)[:, :, None, None, :]
            rx = np.array([e[1] for e in ells], np.float32)[:, None, None, None]
            ry = np.array([e[2] for e in ells], np.float32)[:, None, None, None]
            px, py = X[None] - C[..., 0], Y[None] - C[..., 1]
            lx = px * ax[..., 0] + py * ax[..., 1]
            ly = -px * ax[..., 1] + py * ax[..., 0]
            k0 = np.sqrt((lx / rx) ** 2 + (ly / ry) ** 2)
            k1 = np.sqrt((lx / rx ** 2) ** 2 + (ly / ry ** 2) ** 2)
            de = np.where(k0 < 0.5, (k0 - 1) * np.minimum(rx, ry),
                          k0 * (k0 - 1) / np.maximum(k1, 1e-6))
            de = np.min(de, 0)
            d = de if d is None else np.minimum(d, de)
        if clip is not None:
            pt, nrm = (np.asarray(v, np.float32)[:, None, None, :] for v in clip)
            d = np.maximum(d, (X - pt[..., 0]) * nrm[..., 0] + (Y - pt[..., 1]) * nrm[..., 1])
        alpha = np.clip(0.5 - d, 0, 1)
        if not np.any(alpha > 0):
            return
        edge = self.edge if edge is None else edge
        shading = shade * (1 - edge * np.clip(1 + d / self.ow, 0, 1))
        if texture is None or texture["kind"] == "flat":
            color = color[0] if isinstance(color, tuple) else color
            col = np.asarray(color, np.float32) * shading[..., None]
        else:
            o, u = (np.asarray(v, np.float32)[:, None, None, :] for v in frame)
            s = ((X - o[..., 0]) * u[..., 0] + (Y - o[..., 1]) * u[..., 1]) / self.U
            w = (-(X - o[..., 0]) * u[..., 1] + (Y - o[..., 1]) * u[..., 0]) / self.U
            ca, sa = math.cos(texture["angle"]), math.sin(texture["angle"])
            s, w = s * ca + w * sa, -s * sa + w * ca
            P = texture["period"]
            kind = texture["kind"]
            if kind == "stripes":
                t = 0.5 + 0.5 * np.tanh(3 * np.sin(2 * np.pi * s / P))
            elif kind == "checker":
                t = 0.5 + 0.5 * np.tanh(4 * np.sin(2 * np.pi * s / P) * np.sin(2 * np.pi * w / P))
            elif kind == "dots":
                t = np.clip((np.cos(2 * np.pi * s / P) * np.cos(2 * np.pi * w / P) - 0.3) * 4, 0, 1)
            else:  # noise: blocky random cells
                tab = texture["table"]
                t = tab[np.floor(s / P).astype(np.int64) % 8, np.floor(w / P).astype(np.int64) % 8]
            # fade patterns that the pixel grid cannot resolve
            k = texture["contrast"] * float(np.clip((P * self.U - 2.5) / 4, 0, 1))
            t = 0.5 + (t - 0.5) * k
            c0, c1 = (np.asarray(c, np.float32) for c in color)
            col = (c0 + (c1 - c0) * t[..., None]) * shading[..., None]
        # per-frame slices: much faster than fancy indexing for these window sizes
        win = [(slice(y, y + wy), slice(x, x + wx)) for y, x in zip(oy.tolist(), ox.tolist())]
        region = np.stack([self.img[t][w] for t, w in enumerate(win)])
        region += alpha[..., None] * (col - region)
        for t, w in enumerate(win):
            self.img[t][w] = region[t]


def _draw_figure(cv: _Canvas, identity: dict, pose: dict, pos: np.ndarray) -> None:
    sp = identity["shape_params"]
    p = lambda n: float(sp[_SP[n]])  # noqa: E731
    U = cv.U
    col = identity["colors"]
    tex = identity["textures"]
    J = lambda n: pos[:, _J[n]]  # noqa: E731
    R_h = U * _HEAD_R * p("head_size")
    far = 0.78                                    # left (far side) limbs are darker
    arm_r = U * 0.075 * p("arm_thickness")
    leg_r = U * 0.11 * p("leg_thickness")
    hand = p("hand_size")
    neck = J("neck")
    head_c = neck + R_h * pose["head_center"]
    head_ax = pose["head_axis"]                   # head "down"
    head_x = np.stack([head_ax[:, 1], -head_ax[:, 0]], -1)   # image-right when upright
    pelvis = (J("r_hip") + J("l_hip")) / 2
    trunk_down = pelvis - neck
    trunk_down = trunk_down / np.linalg.norm(trunk_down, axis=-1, keepdims=True)
    top_c = (col["top"], col["top2"])
    bot_c = (col["bottom"], col["bottom2"])

    def seg_frame(a, b):
        d = b - a
        return a, d / np.maximum(np.linalg.norm(d, axis=-1, keepdims=True), 1e-6)

    hair = identity["hair"]["style"]
    if hair in ("long", "tall"):                  # hair behind the head and shoulders
        if hair == "long":
            cv.layer(ells=[(head_c + 0.35 * R_h * head_ax, 1.18 * R_h, 1.45 * R_h, head_x)],
                     color=col["hair"])
        else:
            cv.layer(ells=[(head_c - 0.45 * R_h * head_ax, 1.0 * R_h, 1.25 * R_h, head_x)],
                     color=col["hair"])

    # legs (far one first), feet
    for s, shade in (("l", far), ("r", 1.0)):
        hip, knee, ankle, toe = J(f"{s}_hip"), J(f"{s}_knee"), J(f"{s}_ankle"), J(f"{s}_toe")
        pants = identity["legwear"] == "pants"
        cv.layer(caps=[(hip, knee, 1.25 * leg_r, leg_r)],
                 color=bot_c if identity["legwear"] == "shorts" or pants else col["skin"],
                 texture=tex["bottom"] if identity["legwear"] != "skirt" else None,
                 frame=seg_frame(hip, knee), shade=shade)
        cv.layer(caps=[(knee, ankle, leg_r, 0.75 * leg_r)],
                 color=bot_c if pants else col["skin"], texture=tex["bottom"] if pants else None,
                 frame=seg_frame(knee, ankle), shade=shade)
        cv.layer(caps=[(ankle, toe, 0.8 * leg_r, 0.75 * leg_r * p("foot"))],
                 color=col["shoe"], shade=shade)

    # neck, torso, hips
    neck_r = 0.45 * R_h * min(p("torso_thickness"), 1.2)
    cv.layer(caps=[(neck + 0.3 * trunk_down * U, head_c, neck_r, 0.4 * R_h)],
             color=col["skin"] * 0.9)
    chest = U * _SHOULDER * p("shoulder_width") * 0.78 * p("torso_thickness") ** 0.5
    waist = U * _TORSO * 0.24 * p("hip_width") * p("torso_thickness") ** 0.5
    sh_r, sh_l = J("r_shoulder"), J("l_shoulder")
    cv.layer(caps=[(neck + 0.8 * chest * trunk_down, pelvis - 0.1 * U * trunk_down, chest, waist),
                   (sh_r, sh_l, 1.15 * arm_r * (1.3 if identity["sleeves"] else 1.0),
                    1.15 * arm_r * (1.3 if identity["sleeves"] else 1.0))],
             color=top_c, texture=tex["top"], frame=(neck, trunk_down))
    hip_r = max(leg_r * 1.25, waist * 0.8)
    hip_shift = (J("r_hip") - J("l_hip")) * 0.12
    if identity["legwear"] == "skirt":
        cv.layer(caps=[(pelvis - 0.15 * U * trunk_down, pelvis + 0.55 * U * p("thigh") * trunk_down,
                        waist, waist * 1.6 + leg_r)], color=bot_c, texture=tex["bottom"],
                 frame=(pelvis, trunk_down))
    else:
        cv.layer(caps=[(J("r_hip") - hip_shift, J("l_hip") + hip_shift, hip_r, hip_r)],
                 color=bot_c, texture=tex["bottom"], frame=(pelvis, trunk_down))

    # head: ears, face, hair on top, eyes, nose, mouth
    ear_r = 0.24 * R_h
    cv.layer(ells=[(J(f"{s}_ear"), ear_r, 1.3 * ear_r, head_x) for s in "rl"],
             color=col["skin"] * 0.85)
    asp = p("head_aspect")
    cv.layer(ells=[(head_c, 0.98 * R_h, asp * R_h, head_x)], color=col["skin"])
    if hair != "none":
        cv.layer(ells=[(head_c - 0.04 * R_h * head_ax, 1.05 * R_h, asp * R_h * 1.06, head_x)],
                 clip=(head_c - 0.38 * R_h * head_ax, head_ax), color=col["hair"], edge=0.2)
    eye_r = 0.17 * R_h * identity["eye_size"]
    eyes = [J("r_eye"), J("l_eye")]
    cv.layer(ells=[(e, eye_r, 0.8 * eye_r, head_x) for e in eyes], color=np.full(3, 0.97),
             edge=0.15)
    cv.layer(ells=[(e, 0.55 * eye_r, 0.55 * eye_r, head_x) for e in eyes], color=col["eye"],
             edge=0.0)
    # skin-coloured lids close from above and below, leaving an open band whose half-height is
    # the eye's vertical radius times the openness (shut: the lids overlap, their edges a lash line)
    band = ((0.8 * eye_r + 0.5) * pose["eyes_open"] - 0.5)[:, None]
    for e in eyes:
        for sgn in (-1.0, 1.0):                   # upper lid, lower lid
            cv.layer(ells=[(e, eye_r + 0.5, 0.8 * eye_r + 0.5, head_x)], color=col["skin"],
                     clip=(e + sgn * band * head_ax, -sgn * head_ax), edge=0.35)
    nose = J("nose")
    cv.layer(caps=[(nose - 0.2 * R_h * head_ax, nose, 0.05 * R_h, 0.08 * R_h)],
             color=col["skin"] * 0.62, edge=0.0)
    mouth = neck[:, None] + R_h * pose["mouth"]
    mouth_r = 0.06 * R_h * (1 + 1.5 * pose["mouth_open"])
    cv.layer(caps=[(mouth[:, 0], mouth[:, 1], mouth_r, mouth_r)], color=col["mouth"], edge=0.1)

    # arms (far one first), hands
    sleeve = identity["sleeves"]
    for s, shade in (("l", far), ("r", 1.0)):
        sh, el, wr = J(f"{s}_shoulder"), J(f"{s}_elbow"), J(f"{s}_wrist")
        cv.layer(caps=[(sh, el, 1.15 * arm_r * (1.2 if sleeve else 1.0), arm_r)],
                 color=top_c if sleeve else col["skin"], texture=tex["top"] if sleeve else None,
                 frame=seg_frame(sh, el), shade=shade)
        cv.layer(caps=[(el, wr, 0.95 * arm_r, 0.72 * arm_r)],
                 color=top_c if sleeve == 2 else col["skin"],
                 texture=tex["top"] if sleeve == 2 else None, frame=seg_frame(el, wr), shade=shade)
        hp = "lhand_" if s == "l" else "rhand_"
        hw = J(hp + "wrist")
        knuckles = (J(hp + "index_0") + J(hp + "pinky_0")) / 2
        kw = 0.5 * np.linalg.norm(J(hp + "index_0") - J(hp + "pinky_0"), axis=-1).mean()
        fr = U * 0.03 * hand * max(0.8, p("arm_thickness") ** 0.5)
        caps = [(hw, knuckles, 0.08 * U * hand, max(kw, fr)),
                (hw, J(hp + "thumb_0"), 0.05 * U * hand, 1.2 * fr)]
        for f in skeleton.FINGERS:
            for k in range(3):
                caps.append((J(f"{hp}{f}_{k}"), J(f"{hp}{f}_{k + 1}"),
                             fr * (1.0 - 0.12 * k), fr * (0.88 - 0.12 * k)))
        cv.layer(caps=caps, color=col["glove"], shade=shade, edge=min(cv.edge, 0.4))


def _to_keypoints(pos: np.ndarray, size: int) -> np.ndarray:
    inside = np.all((pos >= -0.5) & (pos < size - 0.5), axis=-1)
    return np.concatenate([pos, inside[..., None]], -1).astype(np.float32)


def render_clip(identity: dict, motion: dict, num_frames: int, size: int,
                draw_figure: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Renders `motion` on `identity`.

    Returns frames uint8 [T, size, size, 3] and keypoints float32 [T, 62, 3] = (x, y, conf) in
    pixels (pixel centres at integers); conf is 1 inside the image, 0 outside.
    draw_figure=False renders the background alone (same keypoints).
    """
    size = int(size)
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    pose = joint_angles(motion, num_frames)
    pos = _fk(identity, pose, size)
    U, _ = _placement(identity, size)
    cv = _Canvas(render_background(identity, size), pose["dofs"].shape[0], U, identity["outline"])
    if draw_figure:
        _draw_figure(cv, identity, pose, pos)
    frames = np.clip(cv.img * 255 + 0.5, 0, 255).astype(np.uint8)
    return frames, _to_keypoints(pos.astype(np.float32), size)


# ================================================================ datasets
_INT_ARGS = ("seed", "num_train_identities", "num_heldout_identities", "num_train_motions",
             "num_heldout_motions", "motions_per_identity", "clip_frames", "image_size",
             "shards_per_split")
# Arguments added after datasets had been written, with the value those datasets were built with.
_LATER_ARGS = {"motions_per_identity": 0}


def _validate(args: dict) -> dict:
    out = {}
    for k in _INT_ARGS:
        v = args[k]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{k} must be an integer, got {v!r}")
        out[k] = int(v)
    for k in _INT_ARGS[1:]:
        if out[k] < 1 and k not in ("image_size", "motions_per_identity"):
            raise ValueError(f"{k} must be >= 1, got {out[k]}")
    k, ni, nm = out["motions_per_identity"], out["num_train_identities"], out["num_train_motions"]
    if k < 0 or k == 1:
        raise ValueError(f"motions_per_identity must be 0 (every motion) or >= 2 (stage-2 pairs "
                         f"take the reference image from another motion), got {k}")
    if 0 < k < nm and ni * k < 2 * nm:
        raise ValueError(f"motions_per_identity={k}: {ni} train identities x {k} motions leave some "
                         f"of the {nm} train motions with fewer than 2 performers (pairs need 2); "
                         f"need num_train_identities * motions_per_identity >= "
                         f"2 * num_train_motions")
    if out["seed"] < 0:
        raise ValueError(f"seed must be >= 0, got {out['seed']}")
    if not 16 <= out["image_size"] <= 1024:
        raise ValueError(f"image_size must be in [16, 1024], got {out['image_size']}")
    return out


def motion_assignment(identity_ids, motion_ids, per_identity: int) -> dict:
    """{identity: motions it performs}: every motion (per_identity 0 or >= their number), else
    the r-th identity a run of `per_identity` consecutive motions from (r * per_identity) mod M.
    The runs tile the motions in turn, so each has floor or ceil of N * per_identity / M
    performers."""
    mids = list(motion_ids)
    if not 0 < per_identity < len(mids):
        return {i: tuple(mids) for i in identity_ids}
    return {i: tuple(mids[(r * per_identity + j) % len(mids)] for j in range(per_identity))
            for r, i in enumerate(identity_ids)}


def _render_identity(seed: int, identity_id: int, motions, clip_frames: int,
                     image_size: int) -> tuple[dict, list]:
    """Identity `identity_id` and its clips [(frames, keypoints)], one per motion (make_motion)."""
    ident = make_identity(seed, identity_id, image_size)
    return ident, [render_clip(ident, motion, clip_frames, image_size) for motion in motions]


def _bounded_map(pool, jobs, in_flight: int):
    """_render_identity over jobs in `pool`, in order, at most `in_flight` at a time (one
    identity's clips at the paper's size are ~250 MB)."""
    pending = collections.deque()
    for job in jobs:
        pending.append(pool.submit(_render_identity, *job))
        if len(pending) >= in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _check_workers(workers) -> int:
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 0:
        raise ValueError(f"workers must be an integer >= 0 (0: one per CPU core), got {workers!r}")
    return int(workers) or os.cpu_count() or 1


def make_dataset(path: str, *, seed: int = 0, num_train_identities: int = 40,
                 num_heldout_identities: int = 8, num_train_motions: int = 16,
                 num_heldout_motions: int = 4, motions_per_identity: int = 0,
                 clip_frames: int = 17, image_size: int = 64, shards_per_split: int = 1,
                 overwrite: bool = False, workers: int = 1) -> str:
    """Renders the dataset into `path` (records.DatasetWriter format); returns its path.

    Identity ids 0..Ni-1 are train, Ni..Ni+Nh-1 held out; motion ids likewise. Split "train" =
    every train identity x every train motion, or with `motions_per_identity` k > 0 each train
    identity x k of them (motion_assignment: many motions at the same clip count); "test" =
    every held-out identity x every held-out motion. Identity i / motion m come from rngs seeded
    with (seed, 0, i) / (seed, 1, m).
    `workers` > 1 renders identities in that many spawned processes (0: one per CPU core); the
    records and their order do not depend on it.
    """
    args = _validate(dict(seed=seed, num_train_identities=num_train_identities,
                          num_heldout_identities=num_heldout_identities,
                          num_train_motions=num_train_motions,
                          num_heldout_motions=num_heldout_motions,
                          motions_per_identity=motions_per_identity, clip_frames=clip_frames,
                          image_size=image_size, shards_per_split=shards_per_split))
    workers = _check_workers(workers)
    ni, nm = args["num_train_identities"], args["num_train_motions"]
    splits = {
        "train": (range(ni), range(nm)),
        "test": (range(ni, ni + args["num_heldout_identities"]),
                 range(nm, nm + args["num_heldout_motions"])),
    }
    spawned = (concurrent.futures.ProcessPoolExecutor(workers, mp.get_context("spawn"))
               if workers > 1 else contextlib.nullcontext())
    with records.DatasetWriter(path, DATASET_NAME, shards_per_split=args["shards_per_split"],
                               overwrite=overwrite) as w, spawned as pool:
        for split, (ids, mids) in splits.items():
            motions = {m: make_motion(args["seed"], m) for m in mids}
            role = "train" if split == "train" else "heldout"
            per = args["motions_per_identity"] if split == "train" else 0
            assigned = motion_assignment(ids, mids, per)
            jobs = [(args["seed"], i, tuple(motions[m] for m in assigned[i]), args["clip_frames"],
                     args["image_size"]) for i in ids]
            rendered = (_bounded_map(pool, jobs, 2 * workers) if pool
                        else (_render_identity(*job) for job in jobs))
            for (_, i, *_), (ident, clips) in zip(jobs, rendered):
                for m, (frames, kpts) in zip(assigned[i], clips):
                    w.add(split, {"frames": frames, "keypoints": kpts, "identity_id": np.int32(i),
                                  "motion_id": np.int32(m), "shape_params": ident["shape_params"]},
                          {"framing": ident["framing"], "family": motions[m]["family"],
                           "split_role": role})
        return w.close(description="Procedurally rendered 2D characters (synthetic pairs).",
                       metadata={"generator": "synthetic", "version": GENERATOR_VERSION, **args})


def ensure_dataset(path: str, workers: int = 1, **kwargs) -> str:
    """Reuses `path` if it holds a synthetic dataset built with the same arguments, builds it
    (with `workers` render processes, see make_dataset) if missing; raises ValueError naming the
    differing arguments otherwise, a stale GENERATOR_VERSION included (never overwrites:
    checkpoints may have been trained on it)."""
    _check_workers(workers)
    if "overwrite" in kwargs:
        raise ValueError("ensure_dataset never overwrites; call make_dataset(overwrite=True)")
    try:
        bound = inspect.signature(make_dataset).bind(path, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad synthetic dataset arguments: {e}") from None
    bound.apply_defaults()
    args = _validate({k: bound.arguments[k] for k in _INT_ARGS})
    want = {"generator": "synthetic", "version": GENERATOR_VERSION, **args}
    if records.is_dataset(path):
        have = records.read_index(path).get("metadata", {})
        have = {**_LATER_ARGS, **have}
        diff = [k for k in want if have.get(k) != want[k]]
        diff += [k for k in have if k not in want]
        if diff:
            detail = ", ".join(f"{k}: existing {have.get(k)!r} vs requested {want.get(k)!r}"
                               for k in diff)
            raise ValueError(f"dataset at {path} was built with different arguments ({detail}); "
                             f"use another path or delete it")
        return os.path.abspath(path)
    if os.path.exists(path):
        if not os.path.isdir(path) or os.listdir(path):
            raise ValueError(f"{path} exists but is not a clip dataset; refusing to overwrite it")
        return make_dataset(path, overwrite=True, workers=workers, **args)
    return make_dataset(path, workers=workers, **args)


# ================================================================ previews and CLI
def contact_sheet(identities: list, motion: dict, num_frames: int, size: int,
                  gap: int = 2) -> np.ndarray:
    """uint8 grid: one row per identity, one column per frame of `motion`."""
    rows = []
    for ident in identities:
        frames, _ = render_clip(ident, motion, num_frames, size)
        pad = np.full((size, gap, 3), 255, np.uint8)
        rows.append(np.concatenate([x for f in frames for x in (f, pad)][:-1], 1))
    sep = np.full((gap, rows[0].shape[1], 3), 255, np.uint8)
    return np.concatenate([x for r in rows for x in (r, sep)][:-1], 0)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv=None) -> int:
    defaults = {k: v.default for k, v in inspect.signature(make_dataset).parameters.items()
                if v.default is not inspect.Parameter.empty}
    ap = _Parser(prog="python -m data_pipelines.synthetic",
                 description="Render the synthetic character dataset.")
    ap.add_argument("--out", required=True, help="dataset directory to write")
    for k in _INT_ARGS:
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=defaults[k])
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing dataset (default: reuse it if the arguments match)")
    ap.add_argument("--workers", type=int, default=0,
                    help="render processes (default 0: one per CPU core); the data do not depend "
                         "on it")
    ap.add_argument("--preview", default="", help="also write a PNG contact sheet here")
    a = ap.parse_args(argv)
    kwargs = {k: getattr(a, k) for k in _INT_ARGS}
    t0 = time.perf_counter()
    try:
        if a.overwrite:
            path = make_dataset(a.out, overwrite=True, workers=a.workers, **kwargs)
        else:
            path = ensure_dataset(a.out, workers=a.workers, **kwargs)
        if a.preview:
            from PIL import Image
            ids = [make_identity(a.seed, i, a.image_size)
                   for i in range(min(6, a.num_train_identities))]
            sheet = contact_sheet(ids, make_motion(a.seed, 0), 6, a.image_size)
            Image.fromarray(sheet).save(a.preview)
    except (ValueError, OSError) as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 2
    splits = records.read_index(path)["splits"]
    print(f"{path}: " + ", ".join(f"{s}={len(v)} clips" for s, v in splits.items())
          + f" ({a.clip_frames} frames, {a.image_size}px) in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
