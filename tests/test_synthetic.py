"""The procedural character renderer and dataset builder (data_pipelines/synthetic.py)."""
import json
import os

import numpy as np
import pytest

from data_pipelines import pairs, records
from data_pipelines import synthetic as syn
from im_anim_jax import skeleton as sk

J = sk.JOINT_INDEX
PARENT = np.array([p for p, _ in sk.BONES])
CHILD = np.array([c for _, c in sk.BONES])
LEG_JOINTS = [J[n] for n in ("r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle",
                             "r_toe", "l_toe")]


def _ident(i, framing=None, size=64):
    return syn.sample_identity(np.random.default_rng([7, i]), framing=framing, image_size=size)


def _motion(i, family=None):
    return syn.sample_motion(np.random.default_rng([8, i]), family)


def _bone_dirs(pos):
    v = pos[:, CHILD] - pos[:, PARENT]
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _tiny_args(**over):
    args = dict(seed=3, num_train_identities=2, num_heldout_identities=1, num_train_motions=2,
                num_heldout_motions=1, clip_frames=3, image_size=32)
    args.update(over)
    return args


def test_api_shapes_and_dtypes():
    assert len(syn.SHAPE_PARAM_NAMES) == len(set(syn.SHAPE_PARAM_NAMES))
    assert {"dance", "walk", "wave", "gesture"} <= set(syn.MOTION_FAMILIES)
    ident, motion = _ident(0), _motion(0)
    assert ident["shape_params"].dtype == np.float32
    assert ident["shape_params"].shape == (len(syn.SHAPE_PARAM_NAMES),)
    assert ident["framing"] in ("full", "half")
    for size in (64, 128):
        frames, kpts = syn.render_clip(ident, motion, 4, size)
        assert frames.shape == (4, size, size, 3) and frames.dtype == np.uint8
        assert kpts.shape == (4, sk.NUM_JOINTS, 3) and kpts.dtype == np.float32
        pos = syn.skeleton_positions(ident, motion, 4, size)
        assert pos.dtype == np.float32
        np.testing.assert_array_equal(pos, kpts[..., :2])
        assert set(np.unique(kpts[..., 2])) <= {0.0, 1.0}
    # placement is in image fractions: doubling the size doubles the (edge-based) coordinates
    p64, p128 = (syn.skeleton_positions(ident, motion, 3, s, dtype=np.float64) for s in (64, 128))
    np.testing.assert_allclose(p128 + 0.5, 2 * (p64 + 0.5), rtol=1e-9, atol=1e-9)


def test_determinism_and_seed_sensitivity():
    a = syn.render_clip(syn.make_identity(0, 5, 32), syn.make_motion(0, 2), 3, 32)
    b = syn.render_clip(syn.make_identity(0, 5, 32), syn.make_motion(0, 2), 3, 32)
    c = syn.render_clip(syn.make_identity(1, 5, 32), syn.make_motion(1, 2), 3, 32)
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    assert a[0].tobytes() != c[0].tobytes() and a[1].tobytes() != c[1].tobytes()
    # identity i does not depend on which other identities exist
    assert (syn.make_identity(0, 5)["shape_params"].tobytes()
            == syn.make_identity(0, 5)["shape_params"].tobytes())
    assert (syn.make_identity(0, 5)["shape_params"].tobytes()
            != syn.make_identity(0, 6)["shape_params"].tobytes())


@pytest.mark.parametrize("family", syn.MOTION_FAMILIES)
def test_pairing_same_motion_same_normalised_pose(family):
    motion = _motion(11, family)
    pose = syn.joint_angles(motion, 12)
    ids = [_ident(20), _ident(21), _ident(22, framing="half")]
    pos = [syn.skeleton_positions(i, motion, 12, 64, dtype=np.float64) for i in ids]
    dirs = [_bone_dirs(p) for p in pos]
    for d in dirs:
        assert np.abs(d - dirs[0]).max() < 1e-5
        np.testing.assert_allclose(d, pose["bone_directions"], atol=1e-5)
    for p in pos[1:]:
        assert np.abs(p - pos[0]).max() > 2.0         # but bodies/placements differ
    # the float32 public output agrees up to float32 rounding of the coordinates
    d32 = _bone_dirs(syn.skeleton_positions(ids[1], motion, 12, 64).astype(np.float64))
    assert np.abs(d32 - dirs[0]).max() < 1e-4
    # and a different motion gives a different normalised pose
    other = _bone_dirs(syn.skeleton_positions(ids[0], _motion(12, family), 12, 64,
                                              dtype=np.float64))
    assert np.abs(other - dirs[0]).max() > 0.1


def _smooth(pos, unit):
    p = pos / unit
    return (np.linalg.norm(np.diff(p, axis=0), axis=-1).max(),
            np.linalg.norm(np.diff(p, 2, axis=0), axis=-1).max())


@pytest.mark.parametrize("family", syn.MOTION_FAMILIES)
def test_motion_smooth_and_moving(family):
    for k in range(4):
        ident = _ident(30 + k)
        motion = _motion(40 + k, family)
        pos = syn.skeleton_positions(ident, motion, 30, 64, dtype=np.float64)
        unit = ident["scale"] * 64                       # pixels per body unit (torso length)
        vel, acc = _smooth(pos, unit)
        assert vel < 0.7 and acc < 0.35, (family, k, vel, acc)
        assert np.abs(pos - pos[:1]).max() / unit > 0.05  # it does move
        # the same check flags a clip whose frames are shuffled
        shuffled = pos[np.random.default_rng(k).permutation(len(pos))]
        vel_s, acc_s = _smooth(shuffled, unit)
        assert vel_s > vel and acc_s > 2 * acc


def test_motions_cover_hard_poses():
    above = crossing = bent = 0
    for k in range(40):
        pos = syn.skeleton_positions(_ident(k, "full"), _motion(100 + k), 17, 64, dtype=np.float64)
        wrist_y = np.minimum(pos[:, J["r_wrist"], 1], pos[:, J["l_wrist"], 1])
        above += np.any(wrist_y < pos[:, J["nose"], 1] - 0.5 * np.abs(
            pos[:, J["nose"], 1] - pos[:, J["neck"], 1]))
        # the character's right is on the image's left: a right wrist right of the neck crosses
        crossing += np.any((pos[:, J["r_wrist"], 0] > pos[:, J["neck"], 0])
                           | (pos[:, J["l_wrist"], 0] < pos[:, J["neck"], 0]))
        for s in "rl":
            th = pos[:, J[f"{s}_knee"]] - pos[:, J[f"{s}_hip"]]
            sh = pos[:, J[f"{s}_ankle"]] - pos[:, J[f"{s}_knee"]]
            ang = np.abs(np.arctan2(th[:, 0] * sh[:, 1] - th[:, 1] * sh[:, 0], (th * sh).sum(-1)))
            bent += np.any(ang > 0.5)
    assert above >= 4 and crossing >= 2 and bent >= 2, (above, crossing, bent)


def test_visibility_half_and_full_framing():
    for k in range(6):
        motion = _motion(60 + k, syn.MOTION_FAMILIES[k % len(syn.MOTION_FAMILIES)])
        size = 48
        _, kp_half = syn.render_clip(_ident(70 + k, "half", size), motion, 6, size)
        inside = np.all((kp_half[..., :2] >= -0.5) & (kp_half[..., :2] < size - 0.5), -1)
        np.testing.assert_array_equal(kp_half[..., 2], inside.astype(np.float32))
        leg_conf = kp_half[:, LEG_JOINTS, 2]
        assert np.all(leg_conf.min(1) == 0)               # some leg joints leave the frame
        assert kp_half[:, J["nose"], 2].all()              # the face stays in
        _, kp_full = syn.render_clip(_ident(80 + k, "full", size), motion, 6, size)
        assert np.all(kp_full[..., 2] == 1)
        assert np.all((kp_full[..., :2] >= -0.5) & (kp_full[..., :2] < size - 0.5))


def test_framing_bounds_hold_for_many_motions():
    # cheap kinematics only, random identities x motions of every family, 40 frames each:
    # full body keeps every joint inside; half body always loses ankles and toes, keeps the nose
    feet = [J[n] for n in ("r_ankle", "l_ankle", "r_toe", "l_toe")]
    for k in range(25):
        full, half = _ident(200 + k, "full"), _ident(250 + k, "half")
        for fam in syn.MOTION_FAMILIES:
            motion = _motion(300 + k, fam)
            pos = syn.skeleton_positions(full, motion, 40, 64)
            assert pos.min() >= -0.5 and pos.max() < 63.5, (k, fam)
            pos = syn.skeleton_positions(half, motion, 40, 64)
            assert pos[:, feet, 1].min() >= 63.5, (k, fam)
            nose = pos[:, J["nose"]]
            assert nose.min() >= -0.5 and nose.max() < 63.5, (k, fam)


def test_figure_is_drawn_at_the_keypoints():
    names = ("r_wrist", "l_wrist", "nose", "r_ankle", "l_ankle", "neck", "r_elbow", "l_knee")
    hits, total = 0, 0
    for k in range(4):
        ident = _ident(90 + k, "full")
        motion = _motion(95 + k)
        frames, kpts = syn.render_clip(ident, motion, 5, 96)
        bg, kp_bg = syn.render_clip(ident, motion, 5, 96, draw_figure=False)
        np.testing.assert_array_equal(kpts, kp_bg)
        assert np.all(bg == bg[:1])                        # the background is static
        diff = np.abs(frames.astype(int) - bg.astype(int)).max(-1)
        for n in names:
            xy = np.round(kpts[:, J[n], :2]).astype(int)
            d = diff[np.arange(5), xy[:, 1], xy[:, 0]]
            hits += int(np.sum(d > 12))
            total += d.size
        # the figure covers a modest part of the image, not everything
        assert 0.03 < np.mean(diff > 12) < 0.5
    assert hits >= 0.9 * total, (hits, total)


def test_far_side_limbs_are_darker():
    ident = _ident(5, "full")
    ident["textures"] = {"top": {"kind": "flat"}, "bottom": {"kind": "flat"}}
    ident["sleeves"], ident["legwear"] = 0, "pants"
    motion = _motion(6, "walk")
    motion["amp"][:] = 0.0                                  # the neutral standing pose
    frames, kpts = syn.render_clip(ident, motion, 4, 128)
    f = frames.astype(float)

    def mean_at(joint_a, joint_b):
        mid = np.round((kpts[:, J[joint_a], :2] + kpts[:, J[joint_b], :2]) / 2).astype(int)
        return f[np.arange(4), mid[:, 1], mid[:, 0]].sum(-1).mean()

    assert mean_at("l_knee", "l_ankle") < 0.9 * mean_at("r_knee", "r_ankle")


def test_dataset_round_trip_and_pairing(tmp_path):
    path = str(tmp_path / "ds")
    args = _tiny_args()
    out = syn.make_dataset(path, **args)
    assert os.path.abspath(path) == out
    index = records.read_index(path)
    assert index["metadata"]["generator"] == "synthetic"
    assert {k: index["metadata"][k] for k in args} == args
    train, test = index["splits"]["train"], index["splits"]["test"]
    assert len(train) == 4 and len(test) == 1
    train_ids = {e["identity_id"] for e in train}
    test_ids = {e["identity_id"] for e in test}
    assert train_ids == {0, 1} and test_ids == {2} and not train_ids & test_ids
    assert {e["motion_id"] for e in train} == {0, 1} and {e["motion_id"] for e in test} == {2}
    for m in (0, 1):   # every train motion is shown by every train identity
        assert {e["identity_id"] for e in train if e["motion_id"] == m} == train_ids
    assert all(e["framing"] in ("full", "half") and e["num_frames"] == 3 for e in train + test)
    src = records.open_split(path, "train")
    assert len(src) == 4
    for i in (0, 3):
        ex = src[i]
        ident = syn.make_identity(args["seed"], int(ex["identity_id"]), 32)
        frames, kpts = syn.render_clip(ident, syn.make_motion(args["seed"], int(ex["motion_id"])),
                                       3, 32)
        assert int(ex["identity_id"]) == train[i]["identity_id"]
        np.testing.assert_array_equal(ex["frames"], frames)
        np.testing.assert_array_equal(ex["keypoints"], kpts)
        np.testing.assert_array_equal(ex["shape_params"], ident["shape_params"])
    assert len(records.open_split(path, "test")) == 1


def test_motions_per_identity_spreads_many_motions_over_the_identities(tmp_path):
    """k motions per train identity: runs of k motions tiling the motions in turn, so each has
    floor or ceil of N k / M performers; the records are those identities' renders; every clip
    finds a cross-identity partner; the held-out split keeps every motion."""
    assert syn.motion_assignment(range(4), range(10, 16), 3) == {
        0: (10, 11, 12), 1: (13, 14, 15), 2: (10, 11, 12), 3: (13, 14, 15)}
    uneven = syn.motion_assignment(range(5), range(4), 2)
    assert sorted(np.bincount(np.concatenate([list(v) for v in uneven.values()]))) == [2, 2, 3, 3]
    for k in (0, 3, 7):   # 0 or at least every motion: all of them
        assert syn.motion_assignment(range(2), range(3), k) == {0: (0, 1, 2), 1: (0, 1, 2)}
    path = str(tmp_path / "ds")
    args = _tiny_args(num_train_identities=4, num_train_motions=4, num_heldout_motions=2,
                      motions_per_identity=2, clip_frames=2, image_size=16)
    syn.make_dataset(path, **args)
    index = records.read_index(path)
    assert index["metadata"]["motions_per_identity"] == 2
    train, test = index["splits"]["train"], index["splits"]["test"]
    assert [(e["identity_id"], e["motion_id"]) for e in train] == [
        (0, 0), (0, 1), (1, 2), (1, 3), (2, 0), (2, 1), (3, 2), (3, 3)]
    assert sorted((e["identity_id"], e["motion_id"]) for e in test) == [(4, 4), (4, 5)]
    ex = records.open_split(path, "train")[2]                 # identity 1, motion 2
    frames, _ = syn.render_clip(syn.make_identity(3, 1, 16), syn.make_motion(3, 2), 2, 16)
    np.testing.assert_array_equal(ex["frames"], frames)
    found = pairs.make_pairs(train, clip_frames=2, seed=0)
    assert len(found.unpaired) == 0 and len(found) == len(train)
    for bad in (1, -1):
        with pytest.raises(ValueError, match="0 \\(every motion\\) or >= 2"):
            syn.make_dataset(str(tmp_path / "bad"), **dict(args, motions_per_identity=bad))
    with pytest.raises(ValueError, match="fewer than 2 performers"):
        syn.make_dataset(str(tmp_path / "bad"), **dict(args, num_train_motions=5))
    assert not os.path.exists(tmp_path / "bad")


def test_render_processes_write_the_same_dataset(tmp_path):
    """Two spawned render processes give the single process's records, in the same order."""
    args = _tiny_args(num_train_identities=3)
    one, two = (syn.make_dataset(str(tmp_path / f"w{n}"), workers=n, **args) for n in (1, 2))
    assert records.read_index(one)["splits"] == records.read_index(two)["splits"]
    for split in ("train", "test"):
        a, b = records.open_split(one, split), records.open_split(two, split)
        assert len(a) == len(b) == {"train": 6, "test": 1}[split]
        for i in range(len(a)):
            for k in ("frames", "keypoints", "identity_id", "motion_id", "shape_params"):
                np.testing.assert_array_equal(a[i][k], b[i][k])
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="workers must be an integer >= 0"):
            syn.make_dataset(str(tmp_path / "bad"), workers=bad, **args)
    assert not os.path.exists(tmp_path / "bad")


def test_ensure_dataset_reuses_and_refuses_mismatch(tmp_path):
    path = str(tmp_path / "ds")
    args = _tiny_args(num_train_identities=1, num_train_motions=1, clip_frames=2, image_size=16)
    syn.ensure_dataset(path, **args)                        # builds
    stamp = os.path.getmtime(os.path.join(path, records.INDEX_FILE))
    assert syn.ensure_dataset(path, **args) == os.path.abspath(path)   # reuses, no rewrite
    assert os.path.getmtime(os.path.join(path, records.INDEX_FILE)) == stamp
    with pytest.raises(ValueError, match="clip_frames"):
        syn.ensure_dataset(path, **dict(args, clip_frames=4))
    with pytest.raises(ValueError, match="seed"):
        syn.ensure_dataset(path, **dict(args, seed=4))
    with open(os.path.join(path, records.INDEX_FILE)) as f:
        assert json.load(f)["metadata"]["clip_frames"] == 2   # untouched
    with open(os.path.join(path, records.INDEX_FILE)) as f:   # written before motions_per_identity
        index = json.load(f)
    del index["metadata"]["motions_per_identity"]
    with open(os.path.join(path, records.INDEX_FILE), "w") as f:
        json.dump(index, f)
    assert syn.ensure_dataset(path, **args) == os.path.abspath(path)   # reused: it had every motion
    with pytest.raises(ValueError, match="motions_per_identity: existing 0 vs requested 2"):
        syn.ensure_dataset(path, **dict(args, motions_per_identity=2))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not a clip dataset"):
        syn.ensure_dataset(str(junk), **args)
    with pytest.raises(ValueError, match="num_train_motions"):
        syn.ensure_dataset(str(tmp_path / "other"), **dict(args, num_train_motions=0))


def test_cli_bad_arguments_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        syn.main(["--out", str(tmp_path / "x"), "--image-size", "big"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "image-size" in err
    assert syn.main(["--out", str(tmp_path / "y"), "--clip-frames", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "clip_frames" in err
    assert not os.path.exists(tmp_path / "y")


def test_cli_builds_and_reuses(tmp_path, capsys):
    argv = ["--out", str(tmp_path / "cli"), "--num-train-identities", "1",
            "--num-heldout-identities", "1", "--num-train-motions", "1",
            "--num-heldout-motions", "1", "--clip-frames", "2", "--image-size", "16"]
    assert syn.main(argv) == 0
    line = capsys.readouterr().out.strip()
    assert len(line.splitlines()) == 1 and "train=1 clips" in line and "test=1 clips" in line
    assert syn.main(argv) == 0                                 # same arguments: reused
    assert syn.main(argv[:-2] + ["--image-size", "24"]) == 2   # different: refused
    assert "image_size" in capsys.readouterr().err


def _eye_white_pixels(frames, kpts, ident):
    """Per frame, the number of eye-white pixels within 1.2 eye radii of the two eye keypoints."""
    size = frames.shape[1]
    r_head = ident["scale"] * size * syn._HEAD_R * ident["shape_params"][syn._SP["head_size"]]
    radius = 1.2 * 0.17 * r_head * ident["eye_size"]
    f = frames.astype(int)
    white = (f.min(-1) >= 215) & (f.max(-1) - f.min(-1) <= 15)
    yy, xx = np.mgrid[:size, :size]
    near = np.zeros(white.shape, bool)
    for n in ("r_eye", "l_eye"):
        e = kpts[:, J[n], :2]
        near |= np.hypot(xx - e[:, :1, None], yy - e[:, 1:, None]) <= radius
    return (white & near).sum((1, 2))


def test_eyes_blink_at_the_same_frames_on_every_identity():
    motion = syn.make_motion(0, 1)                           # a walk: hands stay off the face
    T = 17
    eyes = syn.joint_angles(motion, T)["eyes_open"]
    assert eyes.shape == (T,) and 0 <= eyes.min() and eyes.max() <= 1
    np.testing.assert_array_equal(syn.joint_angles(motion, 30)["eyes_open"][:T], eyes)
    shut, wide = eyes < 0.15, eyes > 0.6
    assert shut.any() and wide.sum() >= T // 2, eyes
    for k in (1, 2):
        ident = _ident(k, "half", 256)
        frames, kpts = syn.render_clip(ident, motion, T, 256)
        n = _eye_white_pixels(frames, kpts, ident)
        assert n[wide].min() >= 0.5 * n.max() and n.max() >= 8, (k, n)
        assert n[shut].max() <= 0.2 * n[wide].min(), (k, n)


def test_blinks_are_frequent_and_brief():
    with_blink, closed = 0, []
    for m in range(100):
        eyes = syn.joint_angles(syn.make_motion(0, m), 17)["eyes_open"]
        ref = np.array([eyes[max(t - 4, 0):t + 5].max() for t in range(17)])
        dip = eyes < 0.4 * ref                               # a fast drop: a blink, not a squint
        with_blink += dip.any()
        closed.append(dip.mean())
    assert with_blink >= 75 and np.mean(closed) < 0.25, (with_blink, np.mean(closed))


def test_ensure_dataset_refuses_a_stale_generator_version(tmp_path):
    path = str(tmp_path / "ds")
    args = _tiny_args(num_train_identities=1, num_train_motions=1, clip_frames=2, image_size=16)
    syn.ensure_dataset(path, **args)
    index_file = os.path.join(path, records.INDEX_FILE)
    with open(index_file) as f:
        index = json.load(f)
    index["metadata"]["version"] = syn.GENERATOR_VERSION - 1
    with open(index_file, "w") as f:
        json.dump(index, f)
    with pytest.raises(ValueError, match="version: existing 1 vs requested 2"):
        syn.ensure_dataset(path, **args)
    assert records.read_index(path)["metadata"]["version"] == syn.GENERATOR_VERSION - 1
