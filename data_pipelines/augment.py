"""Stage-2 augmentation, numpy and vectorised; every random draw comes from the Generator passed in
(e.g. the one Grain's `random_map` hands over), so results are reproducible.

  color_jitter       brightness / contrast / saturation / hue, one draw per clip
  random_affine      zoom about the centre + shift: crop (zoom > 1) or pad (zoom < 1), as a 2x3
  warp_clip          the same affine on every frame (bilinear, `fill` outside)
  transform_keypoints  the affine on (x, y); joints leaving the frame get confidence 0
  ClipAugment        all of the above on a driving clip; the supervision target stays the ORIGINAL
                     clip's keypoints by default (paper supplement, Stage 2: "randomly crop or scale
                     the original video, and then supervise the model using the original video")
  rescale_bones / random_bone_factors / realign_bones
                     Animate-X-style explicit pose augmentation on 62-joint keypoints: every bone
                     of `skeleton.BONES` scaled about its parent joint (directions kept), and
                     realignment of a driving pose to another body's bone lengths and position.

Coordinates: (x, y) pixels, pixel centres at integers (records.py); an affine A maps a point p of
the input image to A @ (x, y, 1) in the output image.
"""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from im_anim_jax import skeleton

# ---------------------------------------------------------------- colour
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _check_frames(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim < 3 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [..., H, W, 3], got {frames.dtype} {frames.shape}")
    return frames


def _hue_matrix(angle: float) -> np.ndarray:
    """3x3 RGB matrix rotating chroma (I, Q of YIQ) by `angle` radians, luma kept."""
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    return (np.linalg.inv(_RGB_TO_YIQ) @ rot @ _RGB_TO_YIQ).astype(np.float32)


def color_jitter(frames, rng: np.random.Generator, brightness: float = 0.2,
                 contrast: float = 0.2, saturation: float = 0.2, hue: float = 0.05) -> np.ndarray:
    """uint8 [..., H, W, 3] (one clip) -> uint8, same shape. Factors drawn once for the clip:
    brightness/contrast/saturation in [1 - x, 1 + x] (contrast about each frame's mean luma,
    saturation about each pixel's luma), hue rotated by up to `hue` turns."""
    frames = _check_frames(frames)
    for name, v, hi in (("brightness", brightness, 1), ("contrast", contrast, 1),
                        ("saturation", saturation, 1), ("hue", hue, 0.5)):
        if not 0 <= v <= hi:
            raise ValueError(f"{name} strength must be in [0, {hi}], got {v}")
    b, c, s = (rng.uniform(1 - v, 1 + v) for v in (brightness, contrast, saturation))
    angle = 2 * np.pi * rng.uniform(-hue, hue)
    x = frames.astype(np.float32) * (b / 255.0)
    mean = (x @ _LUMA).mean(axis=(-2, -1), keepdims=True)[..., None]
    x = mean + c * (x - mean)
    luma = (x @ _LUMA)[..., None]
    x = (luma + s * (x - luma)) @ _hue_matrix(angle).T
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- geometry
def random_affine(rng: np.random.Generator, size: tuple[int, int],
                  scale: tuple[float, float] = (0.75, 1.25), shift: float = 0.15) -> np.ndarray:
    """A 2x3 affine for an (H, W) image: isotropic zoom s ~ U(scale) about the image centre
    (s > 1 crops, s < 1 pads), then a shift of up to `shift` * size on each axis."""
    if not 0 < scale[0] <= scale[1] or shift < 0:
        raise ValueError(f"need 0 < scale[0] <= scale[1] and shift >= 0, got {scale}, {shift}")
    h, w = size
    s = rng.uniform(*scale)
    centre = np.array([(w - 1) / 2, (h - 1) / 2])
    offset = centre * (1 - s) + rng.uniform(-shift, shift, 2) * np.array([w, h])
    return np.array([[s, 0.0, offset[0]], [0.0, s, offset[1]]])


def warp_clip(frames, affine, fill: int = 0) -> np.ndarray:
    """uint8 [..., H, W, 3] -> the same affine on every frame: out(q) = in(A^-1 q), bilinear,
    `fill` (0..255) outside the input."""
    frames = _check_frames(frames)
    h, w = frames.shape[-3:-1]
    inv = np.linalg.inv(np.vstack([affine, [0.0, 0.0, 1.0]]))[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    # Source coordinates in a frame padded by one `fill` pixel on every side.
    sx = np.clip(inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2] + 1, 0, w + 1)
    sy = np.clip(inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2] + 1, 0, h + 1)
    pad = [(0, 0)] * (frames.ndim - 3) + [(1, 1), (1, 1), (0, 0)]
    if max(np.abs(sx - np.rint(sx)).max(), np.abs(sy - np.rint(sy)).max()) < 1e-6:
        # Whole-pixel moves (mirror, integer shift): the bilinear weights are 0/1, so gather.
        p = np.pad(frames, pad, constant_values=fill)
        return p[..., np.rint(sy).astype(int), np.rint(sx).astype(int), :]
    x0, y0 = np.minimum(np.floor(sx), w).astype(int), np.minimum(np.floor(sy), h).astype(int)
    fx, fy = (sx - x0)[..., None].astype(np.float32), (sy - y0)[..., None].astype(np.float32)
    p = np.pad(frames, pad, constant_values=fill).astype(np.float32)
    top = p[..., y0, x0, :] * (1 - fx) + p[..., y0, x0 + 1, :] * fx
    bottom = p[..., y0 + 1, x0, :] * (1 - fx) + p[..., y0 + 1, x0 + 1, :] * fx
    return np.clip(np.rint(top * (1 - fy) + bottom * fy), 0, 255).astype(np.uint8)


def transform_keypoints(keypoints, affine, size: tuple[int, int]) -> np.ndarray:
    """keypoints [..., J, 3] (x, y, conf) -> (A (x, y), conf), conf 0 where the joint leaves the
    (H, W) frame (outside [-0.5, W - 0.5) x [-0.5, H - 0.5), as the datasets mark it)."""
    kpts = np.asarray(keypoints, np.float32)
    affine = np.asarray(affine, np.float64)
    xy = kpts[..., :2] @ affine[:, :2].T + affine[:, 2]
    h, w = size
    inside = (xy[..., 0] >= -0.5) & (xy[..., 0] < w - 0.5) & (xy[..., 1] >= -0.5) & (
        xy[..., 1] < h - 0.5)
    return np.concatenate([xy, (kpts[..., 2] * inside)[..., None]], -1).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ClipAugment:
    """Colour jitter and one random crop / scale / pad for a whole driving clip."""
    scale: tuple[float, float] = (0.75, 1.25)
    shift: float = 0.15
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.05
    fill: int = 0
    supervise_original: bool = True  # target = the original clip's keypoints (paper, Stage 2)
    flip: float = 0.0  # probability of a left-right mirror (joints relabelled: skeleton.MIRROR)

    def __post_init__(self):
        if not 0.0 <= self.flip <= 1.0:
            raise ValueError(f"flip is a probability in [0, 1], got {self.flip}")
        if self.flip and self.supervise_original:
            raise ValueError("flip needs supervise_original=False: a mirrored clip cannot be "
                             "supervised with the original clip's (unmirrored) keypoints")

    def __call__(self, frames, keypoints, rng: np.random.Generator) -> dict:
        """frames uint8 [T, H, W, 3], keypoints [T, J, 3] -> {"frames": augmented clip,
        "keypoints": keypoints of the augmented clip, "target_keypoints": the original keypoints
        if supervise_original else the augmented ones, "affine": [2, 3]}. With `flip`, the
        affine includes the mirror x -> W - 1 - x and each joint takes its mirror's label."""
        frames = _check_frames(frames)
        size = frames.shape[-3:-1]
        affine = random_affine(rng, size, self.scale, self.shift)
        mirror = self.flip > 0 and rng.random() < self.flip   # no draw when flip is off
        if mirror:
            affine = affine @ np.array([[-1.0, 0.0, size[1] - 1.0], [0.0, 1.0, 0.0], [0, 0, 1]])
            keypoints = np.asarray(keypoints)[..., skeleton.MIRROR, :]
        if any((self.brightness, self.contrast, self.saturation, self.hue)):  # else no draw
            frames = color_jitter(frames, rng, self.brightness, self.contrast, self.saturation,
                                  self.hue)
        moved = warp_clip(frames, affine, self.fill)
        kpts = transform_keypoints(keypoints, affine, size)
        target = np.asarray(keypoints, np.float32) if self.supervise_original else kpts
        return {"frames": moved, "keypoints": kpts, "target_keypoints": target,
                "affine": affine.astype(np.float32)}


def clip_augment(cfg, supervise_original: bool) -> ClipAugment | None:
    """ClipAugment from a config block (enabled, scale, shift, brightness, contrast, saturation,
    hue, flip); None when not enabled."""
    if not cfg.enabled:
        return None
    return ClipAugment(scale=tuple(cfg.scale), shift=cfg.shift, brightness=cfg.brightness,
                       contrast=cfg.contrast, saturation=cfg.saturation, hue=cfg.hue,
                       supervise_original=supervise_original, flip=cfg.flip)


# ---------------------------------------------------------------- explicit pose augmentation
_PARENT = np.array([p for p, _ in skeleton.BONES])
_CHILD = np.array([c for _, c in skeleton.BONES])
_ROOT = skeleton.JOINT_INDEX["neck"]


def _paths() -> np.ndarray:
    """[J, num_bones] 0/1: bone b lies on the path from the neck to joint j."""
    paths = np.zeros((skeleton.NUM_JOINTS, len(skeleton.BONES)), np.float32)
    for b, (p, c) in enumerate(skeleton.BONES):   # parents before children
        paths[c] = paths[p]
        paths[c, b] = 1.0
    return paths


_PATHS = _paths()
# Bone groups by child joint (left and right together: one factor per group keeps symmetry).
_HAND = tuple(n for n in skeleton.JOINT_NAMES if n.startswith(("lhand_", "rhand_")))
BONE_GROUPS = {name: np.array([b for b, c in enumerate(_CHILD)
                               if skeleton.JOINT_NAMES[c] in children])
               for name, children in {
                   "head": ("nose", "r_eye", "l_eye", "r_ear", "l_ear"),
                   "shoulders": ("r_shoulder", "l_shoulder"),
                   "torso": ("r_hip", "l_hip"),
                   "arms": ("r_elbow", "l_elbow", "r_wrist", "l_wrist"),
                   "legs": ("r_knee", "l_knee", "r_ankle", "l_ankle", "r_toe", "l_toe"),
                   "hands": _HAND,
               }.items()}
DEFAULT_MAX_FACTORS = {"head": 1.3, "shoulders": 1.3, "torso": 1.25, "arms": 1.25, "legs": 1.25,
                       "hands": 1.3}


def _check_keypoints(keypoints) -> np.ndarray:
    kpts = np.asarray(keypoints, np.float32)
    if kpts.shape[-2:] != (skeleton.NUM_JOINTS, 3):
        raise ValueError(f"keypoints must be [..., {skeleton.NUM_JOINTS}, 3], got {kpts.shape}")
    return kpts


def rescale_bones(keypoints, factors) -> np.ndarray:
    """keypoints [..., 62, 3], factors [..., num_bones] (per bone of skeleton.BONES, > 0) ->
    keypoints whose every bone keeps its direction and has its length times its factor; the neck
    stays put and children follow their parents. Confidences are kept."""
    kpts = _check_keypoints(keypoints)
    factors = np.asarray(factors, np.float32)
    if factors.shape[-1:] != (len(skeleton.BONES),) or np.any(factors <= 0):
        raise ValueError(f"factors must be positive [..., {len(skeleton.BONES)}] (one per bone), "
                         f"got shape {factors.shape}")
    bones = kpts[..., _CHILD, :2] - kpts[..., _PARENT, :2]                     # [..., nb, 2]
    xy = kpts[..., _ROOT, None, :2] + np.einsum("jb,...b,...bd->...jd", _PATHS,
                                                np.broadcast_to(factors, bones.shape[:-1]), bones)
    return np.concatenate([xy, kpts[..., 2:]], -1).astype(np.float32)


def random_bone_factors(rng: np.random.Generator, max_factors: dict | None = None,
                        prob: float = 0.5) -> np.ndarray:
    """[num_bones] factors: each group of BONE_GROUPS is rescaled with probability `prob` by one
    log-uniform factor in [1/m, m] (m = max_factors[group]); other bones keep factor 1."""
    max_factors = DEFAULT_MAX_FACTORS if max_factors is None else max_factors
    unknown = set(max_factors) - set(BONE_GROUPS)
    if unknown or any(m < 1 for m in max_factors.values()):
        raise ValueError(f"max_factors must map groups of {sorted(BONE_GROUPS)} to values >= 1, "
                         f"got {max_factors}")
    factors = np.ones(len(skeleton.BONES), np.float32)
    for name, m in max_factors.items():
        if rng.uniform() < prob:
            factors[BONE_GROUPS[name]] = np.exp(rng.uniform(-np.log(m), np.log(m)))
    return factors


def realign_bones(keypoints, anchor) -> np.ndarray:
    """Moves a driving pose sequence [T, 62, 3] onto another body, the anchor [Ta, 62, 3] (one pose
    or a clip): every bone is scaled by median anchor length / median driving length (over the
    frames where both its joints are visible, confidence > 0; where either side never shows it
    or the driving bone has zero length, by the median factor of the bones both show, so that a
    full-body pose on a half-body anchor keeps one scale, or 1 without any; a zero-length anchor
    bone collapses it) and the neck
    trajectory is shifted by the difference of the median neck positions (over the frames where
    the neck is visible; no shift where either never shows it). Directions and confidences are
    the driving ones."""
    kpts, anchor = _check_keypoints(keypoints), _check_keypoints(anchor)

    def lengths(k):  # [num_bones], NaN where the bone is never visible
        seen = (k[..., _CHILD, 2] > 0) & (k[..., _PARENT, 2] > 0)
        length = np.linalg.norm(k[..., _CHILD, :2] - k[..., _PARENT, :2], axis=-1)
        return _visible_median(np.where(seen, length, np.nan).reshape(-1, len(_CHILD)))

    drv, anc = lengths(kpts), lengths(anchor)
    known = np.isfinite(drv) & np.isfinite(anc) & (np.nan_to_num(drv) > 0)
    factors = np.nan_to_num(anc) / np.where(known, drv, 1.0)
    overall = float(np.median(factors[known])) if known.any() else 1.0
    factors = np.where(known, factors, overall)
    out = rescale_bones(kpts, np.maximum(factors, 1e-6))

    def neck(k):  # [2], NaN where the neck is never visible
        root = k[..., _ROOT, :].reshape(-1, 3)
        return _visible_median(np.where(root[:, 2:] > 0, root[:, :2], np.nan))

    shift = neck(anchor) - neck(kpts)
    out[..., :2] += np.where(np.isfinite(shift), shift, 0.0)
    return out


# Head and torso joints: their centre and spread say where a body is and how large it is.
_CORE = np.array([skeleton.JOINT_INDEX[n] for n in (
    "nose", "neck", "r_shoulder", "l_shoulder", "r_hip", "l_hip", "r_eye", "l_eye", "r_ear",
    "l_ear")])


def align_similarity(keypoints, anchor) -> np.ndarray:
    """Moves a driving pose sequence [T, 62, 3] onto another body's framing, the anchor [Ta, 62,
    3] (one pose or a clip), by one scale and shift for the whole clip (no rotation, bone ratios
    kept): each head/torso joint's median position (over the frames where it is visible) on
    either side; over the joints both show, the driving centre goes to the anchor's and the RMS
    distance from it is scaled to the anchor's. Fewer than two such joints, or a zero spread on
    either side (a degenerate read, e.g. every joint at one argmax): returned unchanged.
    Confidences are the driving ones.

    On the synthetic set a cross-identity target is such a transform of the driving pose to
    within PCK tolerance (one fitted per clip to the true poses: cross_pck@0.1 0.99 on the demo's
    held-out pairs; this rule on the true poses, with the single reference frame as anchor,
    0.925)."""
    kpts, anchor = _check_keypoints(keypoints), _check_keypoints(anchor)

    def joints(k):  # [len(_CORE), 2], NaN where a joint is never visible
        core = k[..., _CORE, :].reshape(-1, len(_CORE), 3)
        return _visible_median(np.where(core[..., 2:] > 0, core[..., :2], np.nan)
                               .transpose(0, 2, 1).reshape(len(core), -1)).reshape(2, -1).T

    drv, anc = joints(kpts), joints(anchor)
    both = np.isfinite(drv).all(-1) & np.isfinite(anc).all(-1)
    if both.sum() < 2:
        return kpts.copy()
    drv, anc = drv[both], anc[both]
    spread = lambda x: np.sqrt(np.mean(np.sum((x - x.mean(0)) ** 2, -1)))  # noqa: E731
    if spread(drv) <= 0 or spread(anc) <= 0:
        return kpts.copy()
    scale = spread(anc) / spread(drv)
    out = kpts.copy()
    out[..., :2] = scale * (kpts[..., :2] - drv.mean(0)) + anc.mean(0)
    return out


def _visible_median(x) -> np.ndarray:
    """Median over axis 0 ignoring NaN (invisible) rows; NaN where a column has none."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: NaN, as wanted
        return np.nanmedian(x, axis=0)
