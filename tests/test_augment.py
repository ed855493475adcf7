"""Clip augmentation: colour jitter range, crop/scale/pad affine on pixels and keypoints, the
left-right mirror, explicit pose augmentation (bone rescale, realignment), similarity alignment."""
import numpy as np
import pytest

from data_pipelines import augment as aug
from data_pipelines import records, synthetic
from im_anim_jax import skeleton as sk

PARENT = np.array([p for p, _ in sk.BONES])
CHILD = np.array([c for _, c in sk.BONES])
NECK = sk.JOINT_INDEX["neck"]


def _bones(kpts):
    v = kpts[..., CHILD, :2] - kpts[..., PARENT, :2]
    n = np.linalg.norm(v, axis=-1)
    return v / n[..., None], n


def _blobs(points, size, sigma=1.5):
    """float image [T, S, S] with a Gaussian blob at each (x, y) of points [T, 2]."""
    g = np.arange(size, dtype=np.float64)
    gx = np.exp(-(g - points[:, 0, None]) ** 2 / (2 * sigma ** 2))
    gy = np.exp(-(g - points[:, 1, None]) ** 2 / (2 * sigma ** 2))
    return gy[:, :, None] * gx[:, None, :]


def test_color_jitter_keeps_uint8_range_and_is_seeded():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    frames[0, 0, 0] = (255, 255, 255)
    out = aug.color_jitter(frames, np.random.default_rng(1), 0.9, 0.9, 0.9, 0.5)
    assert out.dtype == np.uint8 and out.shape == frames.shape and not np.array_equal(out, frames)
    again = aug.color_jitter(frames, np.random.default_rng(1), 0.9, 0.9, 0.9, 0.5)
    np.testing.assert_array_equal(out, again)
    np.testing.assert_array_equal(aug.color_jitter(frames, rng, 0, 0, 0, 0), frames)
    # Hue rotation alone keeps each pixel's luma.
    hued = aug.color_jitter(frames, np.random.default_rng(2), 0, 0, 0, 0.5).astype(np.float32)
    luma = lambda x: x.astype(np.float32) @ np.array([0.299, 0.587, 0.114])  # noqa: E731
    unclipped = (hued > 0).all(-1) & (hued < 255).all(-1)
    np.testing.assert_allclose(luma(hued)[unclipped], luma(frames)[unclipped], atol=1.0)
    with pytest.raises(ValueError, match="uint8"):
        aug.color_jitter(frames.astype(np.float32), rng)
    with pytest.raises(ValueError, match="hue strength"):
        aug.color_jitter(frames, rng, hue=0.7)


@pytest.mark.parametrize("seed", range(4))
def test_keypoints_follow_the_pixels_under_crop_scale_pad(seed):
    """A blob drawn at each keypoint lands exactly where transform_keypoints puts the keypoint."""
    size, rng = 48, np.random.default_rng(seed)
    affine = aug.random_affine(rng, (size, size), scale=(0.6, 1.4), shift=0.1)
    pts = rng.uniform(18, 30, (3, 2))                 # stays inside after the transform
    frames = np.repeat((_blobs(pts, size) * 255).round().astype(np.uint8)[..., None], 3, -1)
    warped = aug.warp_clip(frames, affine)[..., 0].astype(np.float64)
    kpts = np.concatenate([pts, np.ones((3, 1))], -1)[:, None]          # [T, 1, 3]
    moved = aug.transform_keypoints(kpts, affine, (size, size))[:, 0]
    np.testing.assert_allclose(moved[:, :2], pts @ affine[:, :2].T + affine[:, 2], atol=1e-4)
    ys, xs = np.mgrid[0:size, 0:size]
    mass = warped.sum(axis=(1, 2))
    centroid = np.stack([(warped * xs).sum((1, 2)) / mass, (warped * ys).sum((1, 2)) / mass], -1)
    np.testing.assert_allclose(centroid, moved[:, :2], atol=0.1)


def test_pad_fills_and_joints_leaving_the_frame_lose_confidence():
    frames = np.full((2, 16, 16, 3), 200, np.uint8)
    shrink = np.array([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]])            # zoom out to the top-left
    out = aug.warp_clip(frames, shrink, fill=7)
    assert np.all(out[:, :7, :7] == 200) and np.all(out[:, 9:, 9:] == 7)
    shift = np.array([[1.0, 0.0, 10.0], [0.0, 1.0, 0.0]])
    kpts = np.array([[[2.0, 3.0, 1.0], [8.0, 3.0, 1.0]]], np.float32)
    moved = aug.transform_keypoints(kpts, shift, (16, 16))
    np.testing.assert_allclose(moved[0, :, :2], [[12, 3], [18, 3]])
    np.testing.assert_array_equal(moved[0, :, 2], [1, 0])


@pytest.mark.parametrize("affine", [[[-1.0, 0.0, 15.0], [0.0, 1.0, 0.0]],     # mirror
                                    [[1.0, 0.0, -5.0], [0.0, 1.0, 4.0]],      # shift, fills
                                    [[-1.0, 0.0, 20.0], [0.0, 1.0, -3.0]]])   # both
def test_whole_pixel_moves_equal_the_bilinear_warp(affine):
    """warp_clip gathers for whole-pixel moves; a 1e-4 px nudge takes the bilinear path, whose
    result must be the same pixels (the nudge moves no value by half a level)."""
    frames = np.random.default_rng(0).integers(8, 256, (3, 16, 16, 3), dtype=np.uint8)
    affine = np.array(affine)
    nudged = affine + np.array([[0, 0, 1e-4], [0, 0, 1e-4]])
    fast = aug.warp_clip(frames, affine, fill=7)
    np.testing.assert_array_equal(fast, aug.warp_clip(frames, nudged, fill=7))
    assert fast.dtype == np.uint8 and (fast == 7).any() == (affine[:, 2] != [15, 0]).any()


def test_clip_augment_supervises_with_the_original_keypoints(tiny_dataset):
    ex = records.open_split(tiny_dataset, "train")[0]
    out = aug.ClipAugment()(ex["frames"], ex["keypoints"], np.random.default_rng(3))
    assert out["frames"].shape == ex["frames"].shape and out["frames"].dtype == np.uint8
    np.testing.assert_array_equal(out["target_keypoints"], ex["keypoints"])
    size = ex["frames"].shape[1:3]
    np.testing.assert_allclose(out["keypoints"], aug.transform_keypoints(
        ex["keypoints"], out["affine"].astype(np.float64), size), atol=1e-4)
    moved = aug.ClipAugment(supervise_original=False)(ex["frames"], ex["keypoints"],
                                                      np.random.default_rng(3))
    np.testing.assert_array_equal(moved["target_keypoints"], moved["keypoints"])
    with pytest.raises(ValueError, match="scale"):
        aug.ClipAugment(scale=(1.2, 0.8))(ex["frames"], ex["keypoints"], np.random.default_rng(0))


def test_flip_mirrors_pixels_and_relabels_left_and_right(tiny_dataset):
    ex = records.open_split(tiny_dataset, "train")[0]
    frames, kpts = ex["frames"], ex["keypoints"]
    w = frames.shape[2]
    plain = dict(scale=(1.0, 1.0), shift=0.0, brightness=0, contrast=0, saturation=0, hue=0,
                 supervise_original=False)
    out = aug.ClipAugment(flip=1.0, **plain)(frames, kpts, np.random.default_rng(0))
    np.testing.assert_array_equal(out["frames"], frames[:, :, ::-1])
    np.testing.assert_array_equal(out["target_keypoints"], out["keypoints"])
    lw, rw = sk.JOINT_INDEX["l_wrist"], sk.JOINT_INDEX["r_wrist"]
    np.testing.assert_allclose(out["keypoints"][:, lw, 0], w - 1 - kpts[:, rw, 0], atol=1e-4)
    np.testing.assert_allclose(out["keypoints"][:, sk.LEFT_HAND, 1], kpts[:, sk.RIGHT_HAND, 1],
                               atol=1e-4)
    # The renderer's characters face the viewer (left shoulder on the image's right); relabelling
    # keeps that true of the mirrored clip, so it is a plausible rendered clip.
    ls, rs = sk.JOINT_INDEX["l_shoulder"], sk.JOINT_INDEX["r_shoulder"]
    for k in (kpts, out["keypoints"]):
        assert np.all(k[:, ls, 0] > k[:, rs, 0])
    mirrored = [aug.ClipAugment(flip=0.5, **plain)(frames, kpts, np.random.default_rng(s))[
        "affine"][0, 0] < 0 for s in range(40)]
    assert 10 < sum(mirrored) < 30
    with pytest.raises(ValueError, match="flip needs supervise_original=False"):
        aug.ClipAugment(flip=0.5)
    with pytest.raises(ValueError, match="probability"):
        aug.ClipAugment(flip=2.0, supervise_original=False)


def test_rescale_bones_keeps_directions_and_scales_lengths():
    rng = np.random.default_rng(0)
    kpts = np.concatenate([rng.uniform(0, 64, (3, sk.NUM_JOINTS, 2)),
                           rng.uniform(0, 1, (3, sk.NUM_JOINTS, 1))], -1).astype(np.float32)
    factors = rng.uniform(0.5, 2.0, len(sk.BONES))
    out = aug.rescale_bones(kpts, factors)
    d0, n0 = _bones(kpts)
    d1, n1 = _bones(out)
    np.testing.assert_allclose(d1, d0, atol=1e-4)
    np.testing.assert_allclose(n1, n0 * factors, rtol=1e-4)
    np.testing.assert_array_equal(out[:, NECK], kpts[:, NECK])
    np.testing.assert_array_equal(out[..., 2], kpts[..., 2])
    with pytest.raises(ValueError, match="one per bone"):
        aug.rescale_bones(kpts, factors[:-1])


def test_random_bone_factors_are_per_group():
    f = aug.random_bone_factors(np.random.default_rng(0), {"arms": 1.5, "head": 1.2}, prob=1.0)
    arms, head = aug.BONE_GROUPS["arms"], aug.BONE_GROUPS["head"]
    assert len(arms) == 4 and len(head) == 5
    assert len(set(f[arms].tolist())) == 1 and 1 / 1.5 <= f[arms][0] <= 1.5
    assert len(set(f[head].tolist())) == 1 and 1 / 1.2 <= f[head][0] <= 1.2
    rest = np.setdiff1d(np.arange(len(sk.BONES)), np.concatenate([arms, head]))
    np.testing.assert_array_equal(f[rest], 1.0)
    with pytest.raises(ValueError, match="max_factors"):
        aug.random_bone_factors(np.random.default_rng(0), {"tail": 2.0})


def test_realign_moves_a_motion_onto_another_body(tiny_dataset):
    """Synthetic identities share bone directions per motion: realigning A's keypoints to B's
    body gives B's pose relative to the neck, with A's bone directions."""
    src = records.open_split(tiny_dataset, "train")
    index = records.read_index(tiny_dataset)["splits"]["train"]
    a = next(i for i, e in enumerate(index) if e["motion_id"] == 0)
    b = next(i for i, e in enumerate(index) if e["motion_id"] == 0
             and e["identity_id"] != index[a]["identity_id"])
    ka, kb = src[a]["keypoints"], src[b]["keypoints"]
    out = aug.realign_bones(ka, kb)
    np.testing.assert_allclose(out[..., :2] - out[:, NECK:NECK + 1, :2],
                               kb[..., :2] - kb[:, NECK:NECK + 1, :2], atol=2e-3)
    np.testing.assert_allclose(np.median(out[:, NECK, :2], 0), np.median(kb[:, NECK, :2], 0),
                               atol=1e-4)


def test_align_similarity_undoes_a_scale_and_shift(tiny_dataset):
    """A clip scaled and shifted (one transform for the whole clip) is moved back onto the
    original exactly, whichever side is the anchor."""
    clip = np.asarray(records.open_split(tiny_dataset, "train")[0]["keypoints"], np.float64)
    moved = clip.copy()
    moved[..., :2] = 1.7 * clip[..., :2] + np.array([3.0, -4.0])
    np.testing.assert_allclose(aug.align_similarity(moved, clip), clip, atol=1e-4)
    np.testing.assert_allclose(aug.align_similarity(clip, moved), moved, atol=1e-4)


def test_align_similarity_retargets_a_synthetic_motion():
    """A's clip of a motion, moved onto the first frame of B performing it, against B's clip
    (PCK@0.1 of the frame). Full-body anchors: >= 0.95 (measured 0.99-1.0; the synthetic targets
    are such transforms of the driving pose). Half-body anchors show the body at ~2x, so the
    motion's own root movement between the anchor frame and the clip costs twice the pixels:
    >= 0.55 (measured 0.61), and 0.3 above the plain paste (0.16)."""
    size, frames = 64, 9
    poses = {}
    for k, framing in enumerate(["full", "half"] * 4):
        ident = synthetic.sample_identity(np.random.default_rng(k), framing, image_size=size)
        for m in range(2):
            pos = synthetic.skeleton_positions(ident, synthetic.make_motion(0, m), frames, size)
            seen = np.all((pos >= -0.5) & (pos < size - 0.5), -1)
            poses[k, m] = np.concatenate([pos, seen[..., None]], -1).astype(np.float64)
    scores = {}  # (anchor framing, method) -> PCKs
    for (a, m), ka in poses.items():
        for (b, mb), kb in poses.items():
            if mb == m and b != a:
                seen = (ka[..., 2] > 0) & (kb[..., 2] > 0)
                for name, pred in (("paste", ka), ("aligned", aug.align_similarity(ka, kb[:1]))):
                    hit = np.linalg.norm(pred[..., :2] - kb[..., :2], axis=-1) <= 0.1 * size
                    scores.setdefault((b % 2, name), []).append(hit[seen].mean())
    mean = {k: float(np.mean(v)) for k, v in scores.items()}
    assert mean[0, "aligned"] >= 0.95, mean
    assert mean[1, "aligned"] >= max(0.55, mean[1, "paste"] + 0.3), mean


def test_align_similarity_leaves_an_unreadable_anchor_alone(tiny_dataset):
    """With fewer than two head/torso joints seen on both sides, or an anchor whose head and
    torso sit on one point (a degenerate read), the clip is returned unchanged."""
    src = records.open_split(tiny_dataset, "train")
    drv, anchor = np.asarray(src[0]["keypoints"]), np.asarray(src[1]["keypoints"])
    np.testing.assert_array_equal(aug.align_similarity(drv, np.zeros_like(anchor)), drv)
    point = anchor.copy()
    point[..., :2] = 5.0
    np.testing.assert_array_equal(aug.align_similarity(drv, point), drv)


def test_align_similarity_reads_medians_over_frames(tiny_dataset):
    """Each joint's position is its median over the frames: in an anchor holding one pose for 5
    frames, one frame thrown 40 px moves nothing (a mean would move the result 8 px)."""
    src = records.open_split(tiny_dataset, "train")
    drv = np.asarray(src[0]["keypoints"])
    still = np.repeat(np.asarray(src[1]["keypoints"])[:1], 5, axis=0)
    thrown = still.copy()
    thrown[0, :, :2] += 40.0
    np.testing.assert_array_equal(aug.align_similarity(drv, thrown),
                                  aug.align_similarity(drv, still))


@pytest.mark.parametrize("align", [aug.realign_bones, aug.align_similarity])
def test_realign_reads_only_visible_joints(tiny_dataset, align):
    """Frames with nobody detected (ingest writes every joint at (0, 0) with confidence 0) do not
    count: the other frames are moved as if those were not there. Before, their zero-length bones
    and (0, 0) neck pulled realign_bones' medians and shifted the pose by 17 px on a 32 px
    frame."""
    src = records.open_split(tiny_dataset, "train")
    drv, anchor = np.asarray(src[0]["keypoints"]), np.asarray(src[1]["keypoints"])
    blank = drv.copy()
    blank[3:] = 0.0
    np.testing.assert_allclose(align(blank, anchor)[:3], align(drv[:3], anchor), atol=1e-5)
    # A driving clip that never shows a bone keeps it (factor 1); nothing visible: no shift.
    nobody = np.zeros_like(drv)
    np.testing.assert_array_equal(align(nobody, anchor), nobody)
