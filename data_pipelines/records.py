"""The on-disk clip format: a TFDS-compatible ArrayRecord dataset directory.

One record is one clip:
  frames        uint8   [T, H, W, 3]   pixels (0..255)
  keypoints     float32 [T, 62, 3]     (x, y, confidence) in pixels of `frames`; pixel centres
                                        at integer coordinates; confidence 0 = absent/out of frame
  identity_id   int32                  who is shown (synthetic: index into the identity table)
  motion_id     int32                  what they do (same id => same motion on any identity)
  shape_params  float32 [S]            identity body-shape parameters (S may be 0 for real data)

A directory holds `dataset_info.json` + `features.json` (TFDS metadata, so
`tfds.builder_from_directory(dir).as_data_source()` reads it without TensorFlow), ArrayRecord
shards per split, and `index.json`: per split, one entry per record in data-source order
({"identity_id", "motion_id", "num_frames", ...}), so samplers can find pairs without decoding clips.
Writers build everything under a temporary name and rename at the end: a crash never leaves a
half-written dataset where a complete one is expected.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module

from im_anim_jax import skeleton

FEATURES = tfds.features.FeaturesDict({
    "frames": tfds.features.Tensor(shape=(None, None, None, 3), dtype=np.uint8, encoding="zlib"),
    "keypoints": tfds.features.Tensor(shape=(None, skeleton.NUM_JOINTS, 3), dtype=np.float32),
    "identity_id": tfds.features.Scalar(dtype=np.int32),
    "motion_id": tfds.features.Scalar(dtype=np.int32),
    "shape_params": tfds.features.Tensor(shape=(None,), dtype=np.float32),
})
INDEX_FILE = "index.json"
_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"


def validate_example(ex: dict) -> None:
    """Raises ValueError naming the field when `ex` does not match FEATURES."""
    frames, kpts = np.asarray(ex["frames"]), np.asarray(ex["keypoints"])
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if frames.shape[0] < 1:
        raise ValueError(f"frames must hold at least one frame, got {frames.shape}")
    if kpts.shape != (frames.shape[0], skeleton.NUM_JOINTS, 3):
        raise ValueError(f"keypoints must be [T={frames.shape[0]}, {skeleton.NUM_JOINTS}, 3], "
                         f"got {kpts.shape}")
    if not np.all(np.isfinite(kpts)):
        raise ValueError("keypoints contain NaN or inf")


class DatasetWriter:
    """Writes splits of clips into `path` atomically (temp dir, then rename on close()).

    Usage: `with DatasetWriter(path, name) as w: w.add("train", example, extra_index)`.
    If the block raises, the temporary directory is removed and `path` is untouched. With
    `overwrite`, an existing `path` is replaced only if it is a dataset or an empty directory.
    """

    def __init__(self, path: str, name: str, shards_per_split: int = 1, overwrite: bool = False):
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"dataset directory {path} already exists (pass overwrite)")
        check_replaceable(path)
        self.path, self.name, self.shards = os.path.abspath(path), name, shards_per_split
        self.tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:8]}"
        os.makedirs(self.tmp)
        self._writers: dict[str, list] = {}
        self._index: dict[str, list[list[dict]]] = {}
        self._count: dict[str, int] = {}

    def _shard_writers(self, split: str) -> list:
        if split not in self._writers:
            names = [os.path.join(self.tmp, f"{self.name}-{split}.array_record-"
                                            f"{i:05d}-of-{self.shards:05d}") for i in range(self.shards)]
            self._writers[split] = [array_record_module.ArrayRecordWriter(n, "group_size:1")
                                    for n in names]
            self._index[split] = [[] for _ in names]
            self._count[split] = 0
        return self._writers[split]

    def add(self, split: str, example: dict, extra_index: dict | None = None) -> None:
        validate_example(example)
        writers = self._shard_writers(split)
        shard = self._count[split] % self.shards
        writers[shard].write(FEATURES.serialize_example(example))
        entry = {"identity_id": int(example["identity_id"]), "motion_id": int(example["motion_id"]),
                 "num_frames": int(np.shape(example["frames"])[0]), **(extra_index or {})}
        self._index[split][shard].append(entry)
        self._count[split] += 1

    def close(self, description: str = "", metadata: dict | None = None) -> str:
        if not self._writers:
            raise ValueError(f"no example was written to {self.path}")
        check_replaceable(self.path)  # it may have been filled since __init__
        for ws in self._writers.values():
            for w in ws:
                w.close()
        splits = [tfds.core.SplitInfo(name=s, shard_lengths=[len(x) for x in self._index[s]],
                                      num_bytes=0, filename_template=None) for s in self._index]
        tfds.folder_dataset.write_metadata(
            data_dir=self.tmp, features=FEATURES, split_infos=splits, filename_template=_TEMPLATE,
            description=description, check_data=False)
        index = {"splits": {s: [e for shard in v for e in shard] for s, v in self._index.items()},
                 "metadata": metadata or {}}
        with open(os.path.join(self.tmp, INDEX_FILE), "w") as f:
            json.dump(index, f)
        old = None
        if os.path.exists(self.path):
            old = f"{self.path}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        self._writers = {}
        return self.path

    def abort(self) -> None:
        for ws in self._writers.values():
            for w in ws:
                w.close()
        self._writers = {}
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None and self._writers:
            self.close()
        elif exc_type is not None or os.path.exists(self.tmp):  # raised, or closed nothing
            self.abort()
            if exc_type is None:
                raise ValueError(f"no example was written to {self.path}; nothing was created")
        return False


def is_dataset(path: str) -> bool:
    return all(os.path.exists(os.path.join(path, f))
               for f in ("dataset_info.json", "features.json", INDEX_FILE))


def check_replaceable(path: str) -> None:
    """Raises FileExistsError when `path` exists but is neither a dataset nor an empty directory
    (what `DatasetWriter(overwrite=True)` would otherwise delete)."""
    if os.path.exists(path) and not (is_dataset(path) or (os.path.isdir(path)
                                                          and not os.listdir(path))):
        raise FileExistsError(f"{path} exists and is not a dataset this tool wrote (no "
                              f"dataset_info.json, features.json and {INDEX_FILE}) nor an empty "
                              f"directory; refusing to replace it")


def read_index(path: str) -> dict:
    """The dataset's index.json: {"splits": {split: [entry, ...]}, "metadata": {...}}."""
    if not is_dataset(path):
        raise FileNotFoundError(f"{path} is not a clip dataset (expected dataset_info.json, "
                                f"features.json and {INDEX_FILE}); create it with "
                                f"data_pipelines.synthetic or data_pipelines.ingest")
    with open(os.path.join(path, INDEX_FILE)) as f:
        return json.load(f)


def open_split(path: str, split: str):
    """Random-access source of decoded clip dicts (a TFDS ArrayRecord data source)."""
    splits = read_index(path)["splits"]
    if split not in splits:
        raise ValueError(f"split {split!r} not in dataset {path}; it has {sorted(splits)}")
    return tfds.builder_from_directory(path).as_data_source(split=split)
