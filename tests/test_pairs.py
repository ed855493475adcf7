"""Stage-2 pairing sampler: motion-consistent, identity-inconsistent, deterministic, exact targets."""
import grain
import numpy as np
import pytest

from data_pipelines import pairs, records
from im_anim_jax import skeleton as sk

PARENT = np.array([p for p, _ in sk.BONES])
CHILD = np.array([c for _, c in sk.BONES])


def _entries(ids_motions, num_frames=5):
    return [{"identity_id": i, "motion_id": m, "num_frames": num_frames} for i, m in ids_motions]


def _bone_dirs(kpts):
    v = kpts[..., CHILD, :2] - kpts[..., PARENT, :2]
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_pairs_are_motion_consistent_and_identity_inconsistent(tiny_dataset):
    entries = records.read_index(tiny_dataset)["splits"]["train"]
    p = pairs.load_pairs(tiny_dataset, "train", clip_frames=3, seed=0)
    assert len(p) == len(entries) and len(p.unpaired) == 0   # every clip has partners
    e = lambda rec, f: np.array([entries[r][f] for r in rec])  # noqa: E731
    assert np.all(e(p.driving, "motion_id") == e(p.target, "motion_id"))
    assert np.all(e(p.driving, "identity_id") != e(p.target, "identity_id"))
    assert np.all(e(p.reference, "identity_id") == e(p.target, "identity_id"))
    assert np.all(e(p.reference, "motion_id") != e(p.target, "motion_id"))
    assert np.all((p.start >= 0) & (p.start <= 5 - 3))
    assert np.all((p.reference_frame >= 0) & (p.reference_frame < 5))
    every = pairs.load_pairs(tiny_dataset, "train", clip_frames=3, seed=0, partners_per_clip=None)
    assert len(every) == len(entries) * 5                    # 6 identities: 5 partners each
    assert len(set(zip(every.driving.tolist(), every.target.tolist()))) == len(every)


def test_deterministic_under_seed():
    entries = _entries([(i, m) for i in range(4) for m in range(3)])
    a = pairs.make_pairs(entries, clip_frames=3, seed=1)
    b = pairs.make_pairs(entries, clip_frames=3, seed=1)
    c = pairs.make_pairs(entries, clip_frames=3, seed=2)
    fields = ("driving", "target", "reference", "reference_frame", "start")
    assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in fields)
    assert any(not np.array_equal(getattr(a, f), getattr(c, f)) for f in fields)
    # A record's pairs do not depend on the rest of the split.
    more = pairs.make_pairs(entries + _entries([(9, 0)]), clip_frames=3, seed=1)
    assert np.array_equal(more.driving[:len(a)], a.driving)
    assert np.array_equal(more.reference_frame[:len(a)], a.reference_frame)


def test_self_pairs_add_one_own_row_per_clip_and_keep_the_cross_rows():
    entries = _entries([(i, m) for i in range(3) for m in range(2)] + [(7, 0)])  # 7: one motion
    cross = pairs.make_pairs(entries, clip_frames=3, seed=3)
    both = pairs.make_pairs(entries, clip_frames=3, seed=3, self_pairs=True)
    own = both.driving == both.target
    assert np.all(own == [entries[r]["identity_id"] == entries[t]["identity_id"]
                          for r, t in zip(both.driving, both.target)])
    # one self row per clip whose identity has another motion (identity 7 has none)
    assert sorted(both.driving[own].tolist()) == [r for r, e in enumerate(entries)
                                                  if e["identity_id"] != 7]
    ref_id = np.array([entries[r]["identity_id"] for r in both.reference])
    ref_motion = np.array([entries[r]["motion_id"] for r in both.reference])
    drv_motion = np.array([entries[r]["motion_id"] for r in both.driving])
    assert np.all(ref_id[own] == [entries[r]["identity_id"] for r in both.driving[own]])
    assert np.all(ref_motion != drv_motion)                    # never the answer frame
    for f in ("driving", "target", "reference", "reference_frame", "start"):
        assert np.array_equal(getattr(both, f)[~own], getattr(cross, f))


def test_source_targets_are_partner_keypoints_at_the_same_frames(tiny_dataset):
    src = pairs.PairSource(tiny_dataset, "train", clip_frames=3, seed=0)
    clips = records.open_split(tiny_dataset, "train")
    for i in (0, len(src) - 1):
        ex = src[i]
        drv, tgt, ref = (clips[int(ex[k])] for k in ("driving_record", "target_record",
                                                      "reference_record"))
        s = int(ex["start"])
        np.testing.assert_array_equal(ex["reference_keypoints"],
                                      ref["keypoints"][int(ex["reference_frame"])])
        assert ex["driving"].shape == (3, 32, 32, 3) and ex["driving"].dtype == np.uint8
        assert ex["reference"].shape == (32, 32, 3) and ex["reference"].dtype == np.uint8
        np.testing.assert_array_equal(ex["driving"], drv["frames"][s:s + 3])
        np.testing.assert_array_equal(ex["driving_keypoints"], drv["keypoints"][s:s + 3])
        np.testing.assert_array_equal(ex["target_keypoints"], tgt["keypoints"][s:s + 3])
        np.testing.assert_array_equal(ex["reference"], ref["frames"][int(ex["reference_frame"])])
        assert ex["driving_identity_id"] != ex["reference_identity_id"] == tgt["identity_id"]
        assert ex["motion_id"] == tgt["motion_id"] != ex["reference_motion_id"]
        # Same motion, same frames: every bone points the same way on both bodies ...
        np.testing.assert_allclose(_bone_dirs(ex["target_keypoints"]),
                                   _bone_dirs(ex["driving_keypoints"]), atol=2e-3)
        # ... while the bodies (lengths, placement) differ.
        assert np.abs(ex["target_keypoints"][..., :2] - ex["driving_keypoints"][..., :2]).max() > 1
    batch = grain.MapDataset.source(src).seed(0).shuffle().batch(4)[0]
    assert batch["driving"].shape == (4, 3, 32, 32, 3) and batch["target_keypoints"].shape == (
        4, 3, sk.NUM_JOINTS, 3)


def test_training_draws_the_window_and_reference_frame_per_sample(tiny_dataset):
    """PairSource.example(i, rng): the pair's records with a window and reference frame drawn
    from rng (a fixed window per pair gave a long run the same few windows every epoch); the
    drawn window still holds the partner's keypoints at the driving clip's frames."""
    src = pairs.PairSource(tiny_dataset, "train", clip_frames=3, seed=0)
    clips = records.open_split(tiny_dataset, "train")
    i = 0
    drawn = [src.example(i, np.random.default_rng(k)) for k in range(40)]
    frames = clips[int(src.pairs.driving[i])]["frames"].shape[0]
    ref_frames = clips[int(src.pairs.reference[i])]["frames"].shape[0]
    assert {int(ex["start"]) for ex in drawn} == set(range(frames - 3 + 1))
    assert {int(ex["reference_frame"]) for ex in drawn} == set(range(ref_frames))
    for ex in drawn[:5]:
        s, f = int(ex["start"]), int(ex["reference_frame"])
        assert int(ex["driving_record"]) == src.pairs.driving[i]  # the pairing stays
        assert int(ex["target_record"]) == src.pairs.target[i]
        tgt, drv = (clips[int(ex[k])] for k in ("target_record", "driving_record"))
        np.testing.assert_array_equal(ex["driving"], drv["frames"][s:s + 3])
        np.testing.assert_array_equal(ex["target_keypoints"], tgt["keypoints"][s:s + 3])
        np.testing.assert_array_equal(ex["reference"],
                                      clips[int(ex["reference_record"])]["frames"][f])
    same = src.example(i, np.random.default_rng(3)), src.example(i, np.random.default_rng(3))
    assert same[0]["start"] == same[1]["start"] and same[0]["reference_frame"] == same[1][
        "reference_frame"]
    assert src[i]["start"] == src.pairs.start[i]  # evaluation reads the pair's own window


def test_zero_partners_leave_the_self_rows_alone():
    """stage2.self_pair_steps trains on partners_per_clip=0: the self rows, nothing else."""
    entries = _entries([(i, m) for i in range(3) for m in range(2)] + [(7, 0)])
    alone = pairs.make_pairs(entries, clip_frames=3, seed=3, partners_per_clip=0, self_pairs=True)
    assert np.array_equal(alone.driving, alone.target)
    assert sorted(alone.driving.tolist()) == [r for r, e in enumerate(entries)
                                              if e["identity_id"] != 7]
    assert alone.unpaired.tolist() == [6]                    # identity 7 has no other motion
    ref_id = [entries[r]["identity_id"] for r in alone.reference]
    assert ref_id == [entries[r]["identity_id"] for r in alone.driving]
    with pytest.raises(ValueError, match="or 0 with self_pairs"):
        pairs.make_pairs(entries, clip_frames=3, seed=3, partners_per_clip=0)


def test_clear_errors():
    with pytest.raises(ValueError, match="two identities"):
        pairs.make_pairs(_entries([(0, 0), (1, 1), (0, 2)]), clip_frames=3, seed=0)
    with pytest.raises(ValueError, match="2 motions per identity"):
        pairs.make_pairs(_entries([(0, 0), (1, 0), (2, 0)]), clip_frames=3, seed=0)
    with pytest.raises(ValueError, match="6 frames"):
        pairs.make_pairs(_entries([(0, 0), (1, 0)]), clip_frames=6, seed=0)
    with pytest.raises(ValueError, match="lacks \\['num_frames'\\]"):
        pairs.make_pairs([{"identity_id": 0, "motion_id": 0}], clip_frames=3, seed=0)
    with pytest.raises(ValueError, match="partners_per_clip"):
        pairs.make_pairs(_entries([(0, 0)]), clip_frames=3, seed=0, partners_per_clip=0)
    # Clips whose motion nobody else performs are left out, not an error.
    p = pairs.make_pairs(_entries([(0, 0), (1, 0), (0, 1), (1, 1), (2, 7)]), clip_frames=3, seed=0)
    assert p.unpaired.tolist() == [4] and len(p) == 4


def test_split_errors_name_the_split(tiny_dataset):
    with pytest.raises(ValueError, match="split 'test' .*no clip has the 99 frames"):
        pairs.load_pairs(tiny_dataset, "test", clip_frames=99, seed=0)
    with pytest.raises(ValueError, match="split 'val' not in"):
        pairs.load_pairs(tiny_dataset, "val", clip_frames=3, seed=0)
