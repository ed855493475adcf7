"""Explicit Pose Indicator: realignment, rescaling and part removal keep the skeleton one
connected tree (every bone keeps its direction) and the motion's timing; the probability works."""
import numpy as np
import pytest

from data_pipelines import augment, epi
from im_anim_jax import skeleton

PARENT = np.array([p for p, _ in skeleton.BONES])
CHILD = np.array([c for _, c in skeleton.BONES])


def pose_clip(rng, t=6, scale=1.0, shift=(0.0, 0.0)):
    """A random pose clip [t, 62, 3]: random bone directions and lengths grown from the neck."""
    kpts = np.zeros((t, skeleton.NUM_JOINTS, 3), np.float32)
    kpts[:, skeleton.JOINT_INDEX["neck"], :2] = rng.uniform(20, 40, (t, 2)) + shift
    lengths = scale * rng.uniform(1, 6, len(skeleton.BONES))
    for b, (p, c) in enumerate(skeleton.BONES):
        angle = rng.uniform(0, 2 * np.pi, t)
        kpts[:, c, :2] = kpts[:, p, :2] + lengths[b] * np.stack([np.cos(angle), np.sin(angle)], -1)
    kpts[..., 2] = 1.0
    return kpts


def bones(kpts):
    return kpts[..., CHILD, :2] - kpts[..., PARENT, :2]


def assert_connected_same_directions(before, after):
    """Every bone of `after` is a positive multiple of the same bone of `before` (one tree: each
    child sits on its parent's bone line, no bone detached, flipped or reordered)."""
    b0, b1 = bones(before), bones(after)
    cross = b0[..., 0] * b1[..., 1] - b0[..., 1] * b1[..., 0]
    dot = np.sum(b0 * b1, -1)
    scale = np.linalg.norm(b0, axis=-1) * np.linalg.norm(b1, axis=-1)
    np.testing.assert_allclose(cross / scale, 0, atol=1e-4)
    assert np.all(dot > 0)


def test_realign_and_rescale_keep_bone_directions_and_timing():
    rng = np.random.default_rng(0)
    drv, anchor = pose_clip(rng), pose_clip(rng, t=4, scale=1.7, shift=(10, -5))
    out = epi.realign(drv, anchor)
    assert out.shape == drv.shape
    assert_connected_same_directions(drv, out)
    # The body is the anchor's: median bone lengths and median neck position.
    np.testing.assert_allclose(np.median(np.linalg.norm(bones(out), axis=-1), 0),
                               np.median(np.linalg.norm(bones(anchor), axis=-1), 0), rtol=1e-4)
    neck = skeleton.JOINT_INDEX["neck"]
    np.testing.assert_allclose(np.median(out[:, neck, :2], 0),
                               np.median(anchor[:, neck, :2], 0), atol=1e-3)
    # Timing: frame t of the output depends on frame t of the input only (with per-clip factors).
    np.testing.assert_allclose(epi.realign(drv[::-1], anchor), out[::-1], atol=1e-3)
    big = epi.rescale(drv, {"legs": 1.5, "face": 0.5})
    assert_connected_same_directions(drv, big)
    ratio = np.linalg.norm(bones(big), axis=-1) / np.linalg.norm(bones(drv), axis=-1)
    np.testing.assert_allclose(ratio[:, epi.RESCALE_GROUPS["legs"]], 1.5, rtol=1e-4)
    np.testing.assert_allclose(ratio[:, epi.RESCALE_GROUPS["face"]], 0.5, rtol=1e-4)
    others = np.setdiff1d(np.arange(len(skeleton.BONES)), np.concatenate(
        [epi.RESCALE_GROUPS["legs"], epi.RESCALE_GROUPS["face"]]))
    np.testing.assert_allclose(ratio[:, others], 1.0, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown rescale groups \\['tail'\\]"):
        epi.rescale(drv, {"tail": 2.0})


def test_dropped_parts_leave_a_connected_visible_tree():
    kpts = pose_clip(np.random.default_rng(1))
    for part in epi.REMOVABLE_PARTS:
        out = epi.drop_parts(kpts, [part])
        np.testing.assert_array_equal(out[..., :2], kpts[..., :2])
        visible = out[0, :, 2] > 0
        assert 0 < visible.sum() < skeleton.NUM_JOINTS, part
        # every visible joint's parent is visible: what remains hangs together from the neck
        assert np.all(visible[PARENT[visible[CHILD]]]), part
    with pytest.raises(ValueError, match="unknown parts"):
        epi.drop_parts(kpts, ["wings"])


def test_transform_probability_and_augment_interface(tiny_dataset):
    rng = np.random.default_rng(2)
    pool = epi.pose_pool(tiny_dataset, "train", size=4, stride=2)
    assert len(pool) == 4 and all(a.shape[1:] == (62, 3) for a in pool)
    drv = pose_clip(rng)
    applied = [epi.transform(drv, np.random.default_rng(s), pool, prob=0.7)[1]
               for s in range(400)]
    assert 0.62 < np.mean(applied) < 0.78
    same, flag = epi.transform(drv, rng, pool, prob=0.0)
    assert not flag
    np.testing.assert_array_equal(same, drv)
    moved, flag = epi.transform(drv, rng, pool, prob=1.0, rescale_prob=1.0, drop_prob=0.0)
    assert flag
    assert_connected_same_directions(drv, moved)
    with pytest.raises(ValueError, match="EPI prob must be in \\[0, 1\\]"):
        epi.transform(drv, rng, pool, prob=1.5)

    # As an augmentation: the frames go through the clip augment only; the keypoints are those
    # of the augmented clip, then transformed; the target stays the original pose.
    frames = np.random.default_rng(3).integers(0, 255, (6, 32, 32, 3), np.uint8)
    clip_aug = augment.ClipAugment(scale=(1.0, 1.0), shift=0.0, brightness=0, contrast=0,
                                   saturation=0, hue=0)
    aug = epi.ExplicitPoseIndicator(pool=pool, prob=1.0, clip_augment=clip_aug)
    out = aug(frames, drv, np.random.default_rng(4))
    np.testing.assert_array_equal(out["frames"], frames)
    np.testing.assert_array_equal(out["target_keypoints"], drv)
    assert out["epi_applied"] and out["keypoints"].shape == drv.shape
    assert_connected_same_directions(drv, out["keypoints"])


def test_added_parts_come_from_the_anchor_attached_to_the_driving_body():
    rng = np.random.default_rng(3)
    driving, anchor = pose_clip(rng, t=6), pose_clip(rng, t=4, scale=2.0, shift=(50, 50))
    lacking = epi.drop_parts(driving, ["arms"])
    lacking[2, skeleton.JOINT_INDEX["r_elbow"], 2] = 1.0  # one frame shows one elbow
    added = epi.add_parts(lacking, anchor, ["arms"])
    arm = epi.PART_JOINTS["arms"]
    # Joints that were visible do not move; the rest of the body is untouched.
    np.testing.assert_array_equal(added[:, ~arm], lacking[:, ~arm])
    np.testing.assert_array_equal(added[2, skeleton.JOINT_INDEX["r_elbow"]],
                                  lacking[2, skeleton.JOINT_INDEX["r_elbow"]])
    # Every arm joint is visible again, hanging off its parent by the anchor's bone of frame
    # t mod 4: the skeleton stays one connected tree, the motion keeps the driving's timing.
    assert np.all(added[..., arm, 2] > 0)
    for t in range(6):
        for p, c in skeleton.BONES:
            if arm[c] and not (t == 2 and c == skeleton.JOINT_INDEX["r_elbow"]):
                np.testing.assert_allclose(added[t, c, :2] - added[t, p, :2],
                                           anchor[t % 4, c, :2] - anchor[t % 4, p, :2],
                                           atol=1e-4)
    # Nothing to add where the part is present; unknown parts are refused.
    np.testing.assert_array_equal(epi.add_parts(driving, anchor, ["arms"]), driving)
    with pytest.raises(ValueError, match="unknown parts"):
        epi.add_parts(driving, anchor, ["tail"])


def test_realign_to_a_body_that_hides_some_bones_keeps_one_scale():
    """A full-body pose realigned onto a half-body anchor (its legs never visible): the legs
    take the scale of the bones both show. Before they kept factor 1, so the realigned figure had
    a body at the anchor's scale on legs at the driver's."""
    rng = np.random.default_rng(5)
    drv = pose_clip(rng)
    neck = drv[:, skeleton.JOINT_INDEX["neck"], :2][:, None]
    anchor = drv.copy()
    anchor[..., :2] = neck + 2.0 * (drv[..., :2] - neck)          # the same body, twice the size
    legs = [j for j, name in enumerate(skeleton.JOINT_NAMES)
            if any(k in name for k in ("knee", "ankle", "toe", "heel"))]
    anchor[:, legs, 2] = 0.0
    out = epi.realign(drv, anchor)
    ratio = np.linalg.norm(bones(out), axis=-1) / np.linalg.norm(bones(drv), axis=-1)
    np.testing.assert_allclose(ratio, 2.0, rtol=1e-4)   # every bone, the hidden legs included


def test_joints_the_new_body_puts_outside_the_frame_are_not_visible():
    """The EPI moves the pose after the clip augment marked the visible joints; a realignment to
    a larger body placed elsewhere carries joints out of the frame, and those were still marked
    visible (a fifth of the demo's EPI samples had some), which evaluation never shows."""
    rng = np.random.default_rng(6)
    drv = pose_clip(rng, scale=0.5)                  # neck at 20-40 px in a 64 px frame
    big = pose_clip(rng, scale=3.0, shift=(15.0, 15.0))
    frames = np.zeros((len(drv), 64, 64, 3), np.uint8)
    out = epi.ExplicitPoseIndicator(pool=(big,), prob=1.0, rescale_prob=0.0, drop_prob=0.0,
                                    add_prob=0.0)(frames, drv, np.random.default_rng(0))
    k = out["keypoints"]
    inside = (k[..., 0] >= -0.5) & (k[..., 0] < 63.5) & (k[..., 1] >= -0.5) & (k[..., 1] < 63.5)
    assert (~inside).any() and (k[..., 2] > 0).any()
    assert not np.any((k[..., 2] > 0) & ~inside)
    np.testing.assert_array_equal(k[..., 2] > 0, inside)
