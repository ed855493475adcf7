"""Bad training records: corrupt bytes, a truncated ArrayRecord shard and a record of the wrong
shape are skipped, counted exactly, logged with their index, carried across resume, and a
limit aborts cleanly."""
import logging
import os
import shutil

import numpy as np
import pytest

import faultrun
from data_pipelines import pipeline, records, synthetic
from im_anim_jax.training import stage1 as stage1_training


@pytest.fixture(scope="module")
def clean(tmp_path_factory, tiny_config):
    """The tiny synthetic set in 2 shards per split (18 train clips)."""
    path = str(tmp_path_factory.mktemp("clean") / "data")
    synthetic.ensure_dataset(path, **dict(tiny_config.data.synthetic.to_dict(),
                                          shards_per_split=2))
    return path


def _shard(path, i):
    return os.path.join(path, sorted(n for n in os.listdir(path) if "-train.array_record" in n)[i])


def _unreadable(path):
    src, bad = records.open_split(path, "train"), set()
    for i in range(len(src)):
        try:
            src[i]
        except Exception:  # noqa: BLE001
            bad.add(i)
    return bad


@pytest.fixture(scope="module")
def faulty(tmp_path_factory, clean, tiny_config):
    """(path, bad indices): one record with flipped bytes, one re-written at 16x16 pixels."""
    path = str(tmp_path_factory.mktemp("faulty") / "data")
    src = records.open_split(clean, "train")
    small = 4
    with records.DatasetWriter(path, "synthetic_characters", shards_per_split=2) as w:
        for split in ("train", "test"):
            s = records.open_split(clean, split)
            for i in range(len(s)):
                ex = {k: s[i][k] for k in ("frames", "keypoints", "identity_id", "motion_id",
                                           "shape_params")}
                if split == "train" and i == small:  # valid for the format, not for the model
                    ex["frames"] = ex["frames"][:, ::2, ::2]
                w.add(split, ex)
    assert len(records.open_split(path, "train")) == len(src)
    shard = _shard(path, 1)
    with open(shard, "rb") as f:
        original = f.read()
    # Flip 64 bytes inside one record's chunk (not a 64 KiB block header, which would take the
    # whole shard: that case is the truncation test's).
    for at in range(len(original) // 10, len(original) // 2, 1999):
        data = bytearray(original)
        data[at:at + 64] = bytes(b ^ 0xFF for b in data[at:at + 64])
        with open(shard, "wb") as f:
            f.write(bytes(data))
        corrupt = _unreadable(path)
        if len(corrupt) == 1:
            break
    assert len(corrupt) == 1, corrupt
    new = records.open_split(path, "train")  # the writer deals records to shards in turn
    shrunk = {i for i in set(range(len(new))) - corrupt if new[i]["frames"].shape[1] == 16}
    assert len(shrunk) == 1
    return path, corrupt | shrunk


def _batches(path, config, n, **kwargs):
    it = iter(pipeline.train_dataset(path, "train", clip_frames=1, batch_size=4,
                                     targets=stage1_training.targets(config), seed=3, **kwargs))
    return it, [next(it) for _ in range(n)]


def _expected(clean, bad, config, n):
    """What skipping must give: the clean draw order without `bad`, and per kept draw the
    number of distinct bad records drawn before it."""
    _, batches = _batches(clean, config, 3 * n)
    order = np.concatenate([b["record"] for b in batches])
    kept = [(r, len(set(order[:j].tolist()) & bad)) for j, r in enumerate(order)
            if r not in bad]
    return np.array(kept[:4 * n])


def test_bad_records_are_skipped_counted_and_logged(clean, faulty, tiny_config, caplog):
    path, bad = faulty
    n = 12  # 48 clips: more than 2 epochs of the 16 good ones
    with caplog.at_level(logging.WARNING):
        _, batches = _batches(path, tiny_config, n)
    got = np.stack([np.concatenate([b["record"] for b in batches]),
                    np.concatenate([b["bad_records"] for b in batches])], -1)
    np.testing.assert_array_equal(got, _expected(clean, bad, tiny_config, n))
    # Both bad records are drawn in each of 2 epochs and counted once: a bad file does not
    # use up faults.max_bad_records epoch after epoch.
    assert got[-1, 1] == 2
    assert all(b["frames"].shape == (4, 1, 32, 32, 3) for b in batches)
    assert np.all(np.diff(got[:, 1]) >= 0)
    logged = [r.getMessage() for r in caplog.records if "skipped bad record" in r.getMessage()]
    assert len(logged) == got[-1, 1]
    for i in bad:
        assert any(m.startswith(f"skipped bad record {i} of split 'train'") for m in logged), i
    assert any("wrong contents" in m and "expected >= 1 frames of 32x32" in m for m in logged)
    assert any("cannot be read or decoded" in m and "hash mismatch" in m for m in logged)


def test_the_count_is_part_of_the_iterator_state(faulty, tiny_config):
    path, _ = faulty
    it, _ = _batches(path, tiny_config, 5)
    state = it.get_state()
    after = [next(it) for _ in range(4)]
    resumed = iter(pipeline.train_dataset(path, "train", clip_frames=1, batch_size=4,
                                          targets=stage1_training.targets(tiny_config), seed=3))
    resumed.set_state(state)
    for a, b in zip(after, (next(resumed) for _ in range(4))):
        np.testing.assert_array_equal(a["record"], b["record"])
        np.testing.assert_array_equal(a["bad_records"], b["bad_records"])


def test_more_bad_records_than_the_limit_abort_with_a_message(faulty, tiny_config):
    path, _ = faulty
    _batches(path, tiny_config, 12, max_bad_records=2)  # 2 bad records, each in 2+ epochs
    with pytest.raises(pipeline.BadRecords, match=r"2 bad records in split 'train' .* more "
                       r"than faults.max_bad_records=1; the last: record \d+"):
        _batches(path, tiny_config, 12, max_bad_records=1)


def test_a_truncated_shard_loses_only_its_records(clean, tiny_config, tmp_path):
    path = str(tmp_path / "data")
    shutil.copytree(clean, path)
    shard = _shard(path, 1)
    os.truncate(shard, os.path.getsize(shard) // 2)
    bad = _unreadable(path)
    assert bad == set(range(9, 18))  # the second shard's 9 clips; the first is intact
    _, batches = _batches(path, tiny_config, 6)
    got = np.stack([np.concatenate([b["record"] for b in batches]),
                    np.concatenate([b["bad_records"] for b in batches])], -1)
    np.testing.assert_array_equal(got, _expected(clean, bad, tiny_config, 6))


def test_training_on_faulty_data_reports_the_count_and_a_limit_exits_2(faulty, tmp_path):
    path, bad = faulty
    ok = faultrun.run(faultrun.train_cmd(str(tmp_path / "ok"), path, 12))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    rows = faultrun.read_metrics(os.path.join(tmp_path, "ok", "stage1"))
    assert rows[-1]["bad_records"] >= 2 and all(np.isfinite(r["loss"]) for r in rows)
    assert "bad training records skipped so far" in ok.stdout
    assert "skipped bad record" in ok.stderr
    strict = faultrun.run(faultrun.train_cmd(str(tmp_path / "strict"), path, 12,
                                             "--config.faults.max_bad_records=0"))
    assert strict.returncode == 2, strict.stdout + strict.stderr
    assert "Traceback" not in strict.stderr
    last = strict.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 bad records in split 'train'") and \
        "faults.max_bad_records=0" in last, last


def test_stage_2_and_3_pairs_skip_pairs_touching_a_bad_record(faulty, tiny_config):
    path, bad = faulty
    it = iter(pipeline.pair_train_dataset(path, "train", clip_frames=5, batch_size=2,
                                          targets=stage1_training.targets(tiny_config), seed=0))
    batches = [next(it) for _ in range(24)]  # 48 pairs: more than one epoch of the 36
    used = np.concatenate([np.stack([b[f"{k}_record"] for k in ("driving", "target",
                                                                "reference")], -1)
                           for b in batches])
    assert not np.isin(used, list(bad)).any()
    assert batches[-1]["bad_records"].max() > 0
    assert all(b["driving"].shape == (2, 5, 32, 32, 3) for b in batches)


def test_a_bad_clip_counts_once_however_many_pairs_read_it(faulty, tiny_config):
    """Every pair reading a bad clip is skipped, but the clip counts as one bad record (before,
    once per pair: faults.max_bad_records tripped after ~1/5 of the bad files stage 1 allows)."""
    path, bad = faulty
    it = iter(pipeline.pair_train_dataset(path, "train", clip_frames=5, batch_size=2,
                                          targets=stage1_training.targets(tiny_config), seed=0))
    for _ in range(40):  # 80 pairs: more than two epochs of the 36
        count = int(next(it)["bad_records"].max())
    src = pipeline._pairs(path, "train", 5, stage1_training.targets(tiny_config), seed=0,
                          partners_per_clip=1, self_pairs=False).pairs
    touching = np.isin(np.stack([src.driving, src.target, src.reference], -1), list(bad))
    assert touching.any(-1).sum() > len(bad)  # several pairs read the bad clips
    assert count == len(bad)


def test_bad_ids_name_records_and_pairs_apart():
    """A pair that fails for a reason naming no clip is counted as that pair, not as the record
    with its index (pair 3 and record 3 were one id, and the second was never counted)."""
    import grain

    from data_pipelines import pairs

    def get(i, rng):
        if i in (0, 1):  # two pairs reading the bad clip of record 3
            raise pairs.BadClip(3, "reference", "decode failed")
        if i == 3:
            raise ValueError("high <= 0")
        return {"x": np.float32(i)}
    read = pipeline._guarded(get, lambda ex: None, lambda ex, rng: ex, kind="pair")
    assert [read(i, None).get("bad_record") for i in range(4)] == [
        "record 3", "record 3", None, "pair 3"]
    ds = grain.MapDataset.range(5).map(lambda i: read(i, None)).to_iter_dataset()
    it = iter(pipeline._SkipBad(ds, limit=5, where="test", batch_size=1))
    assert [int(next(it)["bad_records"]) for _ in range(2)] == [1, 2]  # after pairs 0-1, 3
    state = it.get_state()
    assert state["bad"] == ["pair 3", "record 3"]
    it.set_state(dict(state, bad=[3]))  # ids written before they named their kind: records
    assert it._bad == {"record 3"}
