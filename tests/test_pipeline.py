"""Grain pipeline over the tiny synthetic set: targets, determinism, state, sharding, eval order."""
import itertools

import numpy as np
import pytest

from data_pipelines import pipeline, records
from im_anim_jax import keypoints as kp
from im_anim_jax import skeleton


def _targets(cfg):
    return pipeline.Targets(image_size=cfg.model.motion_tokenizer.image_size,
                            heatmap_size=cfg.model.joint_decoder.heatmap_size,
                            sigma=cfg.data.heatmap_sigma)


def _train(path, cfg, **kw):
    args = dict(clip_frames=3, batch_size=4, targets=_targets(cfg), seed=7, read_threads=1)
    args.update(kw)
    return pipeline.train_dataset(path, "train", **args)


def test_batch_shapes_dtypes_and_targets(tiny_dataset, tiny_config):
    batch = next(iter(_train(tiny_dataset, tiny_config)))
    s, h = tiny_config.model.motion_tokenizer.image_size, tiny_config.model.joint_decoder.heatmap_size
    j = skeleton.NUM_JOINTS
    assert batch["frames"].shape == (4, 3, s, s, 3) and batch["frames"].dtype == np.uint8
    assert batch["keypoints"].shape == (4, 3, j, 3)
    assert batch["heatmaps"].shape == (4, 3, j, h, h) and batch["heatmaps"].dtype == np.float32
    assert batch["joint_weights"].shape == (4, 3, j)
    # Targets are exactly the Gaussians of the batch's own keypoints.
    hm, w = kp.gaussian_heatmaps(batch["keypoints"], s, h, tiny_config.data.heatmap_sigma)
    np.testing.assert_allclose(batch["heatmaps"], hm)
    np.testing.assert_array_equal(batch["joint_weights"], w)
    # ... and they match the stored clip at the sampled start frame.
    src = records.open_split(tiny_dataset, "train")
    ex = src[int(batch["record"][0])]
    start = int(batch["start"][0])
    np.testing.assert_array_equal(batch["frames"][0], ex["frames"][start:start + 3])
    np.testing.assert_array_equal(batch["keypoints"][0], ex["keypoints"][start:start + 3])
    assert int(batch["identity_id"][0]) == int(ex["identity_id"])


def test_same_seed_same_batches_other_seed_differs(tiny_dataset, tiny_config):
    a = [pipeline.fingerprint(b) for _, b in zip(range(4), _train(tiny_dataset, tiny_config))]
    b = [pipeline.fingerprint(b) for _, b in zip(range(4), _train(tiny_dataset, tiny_config))]
    c = [pipeline.fingerprint(b) for _, b in zip(range(4), _train(tiny_dataset, tiny_config, seed=8))]
    assert a == b and a != c


def test_iterator_state_restores_exactly(tiny_dataset, tiny_config):
    it = iter(_train(tiny_dataset, tiny_config))
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [pipeline.fingerprint(next(it)) for _ in range(3)]
    fresh = iter(_train(tiny_dataset, tiny_config))
    fresh.set_state(state)
    assert [pipeline.fingerprint(next(fresh)) for _ in range(3)] == expected


def test_iterator_state_of_0_1_0_checkpoints_resumes(tiny_dataset, tiny_config):
    """Checkpoints written before bad records were skipped hold {"next_index": batches}."""
    expected = [pipeline.fingerprint(b) for b in itertools.islice(
        iter(_train(tiny_dataset, tiny_config)), 3, 6)]
    old = iter(_train(tiny_dataset, tiny_config))
    old.set_state({"next_index": 3})
    assert [pipeline.fingerprint(next(old)) for _ in range(3)] == expected


def test_every_clip_seen_once_per_epoch(tiny_dataset, tiny_config):
    n = len(records.open_split(tiny_dataset, "train"))
    it = iter(_train(tiny_dataset, tiny_config, batch_size=1))
    seen = [int(next(it)["record"][0]) for _ in range(n)]
    assert sorted(seen) == list(range(n))


def test_process_shards_are_disjoint_and_cover(tiny_dataset, tiny_config):
    n = len(records.open_split(tiny_dataset, "train"))
    per = n // 2
    shards, starts = [], []
    for i in range(2):
        it = iter(_train(tiny_dataset, tiny_config, batch_size=1, shard_index=i, shard_count=2))
        batches = [next(it) for _ in range(per)]
        shards.append({int(b["record"][0]) for b in batches})
        starts.append([int(b["start"][0]) for b in batches])
    assert not shards[0] & shards[1]
    assert len(shards[0] | shards[1]) == 2 * per
    # Each process draws its own random windows (Grain would give the i-th element of every
    # shard the same generator): the clip starts differ somewhere.
    assert starts[0] != starts[1], starts


def test_eval_dataset_in_order_with_all_frames(tiny_dataset, tiny_config):
    ds = pipeline.eval_dataset(tiny_dataset, "test", clip_frames=None, batch_size=3,
                               targets=_targets(tiny_config))
    batches = list(ds)
    records_seen = np.concatenate([b["record"] for b in batches])
    n = len(records.open_split(tiny_dataset, "test"))
    np.testing.assert_array_equal(records_seen, np.arange(n))
    assert batches[0]["frames"].shape[1] == tiny_config.data.synthetic.clip_frames


def test_mismatched_image_size_is_a_clear_error(tiny_dataset, tiny_config):
    bad = pipeline.Targets(image_size=48, heatmap_size=12, sigma=1.0)
    with pytest.raises(ValueError, match="expects 48x48"):
        pipeline.train_dataset(tiny_dataset, "train", clip_frames=3, batch_size=2, targets=bad,
                               seed=0)


def test_clip_longer_than_stored_is_a_clear_error(tiny_dataset, tiny_config):
    with pytest.raises(ValueError, match="fewer than the 99"):
        _train(tiny_dataset, tiny_config, clip_frames=99)


def test_unknown_split_and_missing_dataset(tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match="split 'val'"):
        records.open_split(tiny_dataset, "val")
    with pytest.raises(FileNotFoundError, match="is not a clip dataset"):
        records.open_split(str(tmp_path), "train")


def test_pair_eval_dataset_spread_covers_the_driving_clips_in_rounds(tiny_dataset, tiny_config):
    """Stage 3's order: every pair of the split, in rounds that take each driving clip's next
    partner, so the first N pairs cover the clips evenly (index order gives the first clips'
    partners); a seed fixes it; more pairs than clips are still there (the paper config asks 50
    of 32 clips)."""
    kw = dict(clip_frames=3, batch_size=4, targets=_targets(tiny_config))
    rows = lambda ds: [(int(r), int(d)) for b in ds  # noqa: E731
                       for r, d in zip(b["record"], b["driving_record"])]
    ordered = rows(pipeline.pair_eval_dataset(tiny_dataset, "train", seed=3, **kw))
    spread = rows(pipeline.pair_eval_dataset(tiny_dataset, "train", seed=3, spread=True, **kw))
    assert [r for r, _ in ordered] == list(range(len(ordered)))
    assert sorted(spread) == ordered and spread != ordered
    assert spread == rows(pipeline.pair_eval_dataset(tiny_dataset, "train", seed=3, spread=True,
                                                     **kw))
    clips = len({d for _, d in ordered})
    assert len(ordered) > clips                                  # several partners per clip
    for k in range(len(ordered) // clips):                       # each round: every clip once
        assert sorted(d for _, d in spread[k * clips:(k + 1) * clips]) == list(range(clips))
    assert len({d for _, d in ordered[:clips]}) < clips          # index order: the first clips'


def test_pair_training_batches_draw_each_pairs_window_afresh(tiny_dataset, tiny_config):
    """Over three epochs a pair comes back with other windows and reference frames (they were
    fixed per pair, so a long run saw the same few windows every epoch), reproducibly."""
    kw = dict(clip_frames=3, batch_size=4, targets=_targets(tiny_config), seed=7, read_threads=1)
    size = len(pipeline.pairs.PairSource(tiny_dataset, "train", clip_frames=3, seed=7,
                                         self_pairs=True))

    def draws():
        ds = pipeline.pair_train_dataset(tiny_dataset, "train", **kw)
        seen = {}
        for b in itertools.islice(iter(ds), 3 * size // 4):
            for r, s, f in zip(b["record"], b["start"], b["reference_frame"]):
                seen.setdefault(int(r), set()).add((int(s), int(f)))
        return seen

    seen = draws()
    assert len(seen) == size and sum(len(v) > 1 for v in seen.values()) > size // 2
    assert draws() == seen


def test_pair_training_says_which_clips_drive_no_pair(tiny_dataset, tiny_config, tmp_path):
    """A clip too short for the window has no pair; training leaves it out and says so (before,
    silently)."""
    import json
    import shutil
    path = str(tmp_path / "data")
    shutil.copytree(tiny_dataset, path)
    index = records.read_index(path)
    last = len(index["splits"]["train"]) - 1
    index["splits"]["train"][last]["num_frames"] = 2      # the index now calls it 2 frames long
    with open(f"{path}/{records.INDEX_FILE}", "w") as f:
        json.dump(index, f)
    lines = []
    pipeline.pair_train_dataset(path, "train", clip_frames=3, batch_size=2,
                                targets=_targets(tiny_config), seed=0, log=lines.append)
    assert len(lines) == 1 and "1 clips drive no pair" in lines[0], lines
    assert f"records [{last}]" in lines[0] and "shorter than 3 frames" in lines[0]
    assert "no other identity performs their motion" in lines[0]
    lines.clear()                                       # the reading phase's self pairs alone:
    pipeline.pair_train_dataset(path, "train", clip_frames=3, batch_size=2, self_pairs=True,
                                partners_per_clip=0, targets=_targets(tiny_config), seed=0,
                                log=lines.append)
    assert len(lines) == 1 and "their identity has no clip of another motion" in lines[0], lines
    lines.clear()
    pipeline.pair_train_dataset(tiny_dataset, "train", clip_frames=3, batch_size=2,
                                targets=_targets(tiny_config), seed=0, log=lines.append)
    assert lines == []


def test_eval_dataset_of_clips_of_several_lengths(tmp_path):
    """All frames of clips of one length; clips of several lengths cut to the shortest (before,
    a batching error from deep inside Grain)."""
    rng = np.random.default_rng(0)
    path = str(tmp_path / "mixed")
    with records.DatasetWriter(path, "mixed") as w:
        for i, t in enumerate([5, 3, 4]):
            xy = rng.uniform(0, 32, (t, skeleton.NUM_JOINTS, 2))
            w.add("test", {"frames": rng.integers(0, 255, (t, 32, 32, 3), dtype=np.uint8),
                           "keypoints": np.concatenate([xy, np.ones_like(xy[..., :1])], -1)
                           .astype(np.float32),
                           "identity_id": i, "motion_id": 0,
                           "shape_params": np.zeros(16, np.float32)})
    ds = pipeline.eval_dataset(path, "test", clip_frames=None, batch_size=3,
                               targets=pipeline.Targets(image_size=32, heatmap_size=8, sigma=1.0))
    (batch,) = list(ds)
    assert batch["frames"].shape == (3, 3, 32, 32, 3)
    np.testing.assert_array_equal(batch["record"], [0, 1, 2])
