"""Ingest real videos + per-frame DWPose (COCO-WholeBody-133) keypoints into the clip format.

The output is the same ArrayRecord dataset directory that `data_pipelines.synthetic` writes (see
`data_pipelines.records`), so stage 1 trains on it unchanged. Each video is its own
identity performing its own motion, so it gives stages 2-3 no cross-identity pairs (config
validation refuses those stages on such data).

Inputs
------
`videos_dir` holds one entry per video:
  * a video file that PyAV decodes: .mp4 .m4v .avi .mov .mkv .webm .gif .mpg .mpeg. Frames are
    read in display orientation (a phone video's display-matrix rotation is applied, as
    `media.read_video` and OpenCV do);
  * or a sub-folder of same-size image frames (.png .jpg .jpeg .bmp .webp), ordered by the last
    integer in each file name (e.g. frame_000012.png), converted as `media.image_frames` does
    (EXIF orientation applied, transparency on white, 16-bit greyscale to its top 8 bits).
    Sub-folders without image files are ignored.
The video's NAME is its file name without extension (or the sub-folder's name).

`keypoints_dir` holds, for each NAME, EITHER
  * a folder `NAME/` with one JSON file per frame, ordered by the last integer in the file name
    (e.g. 000012.json; the numbers must be consecutive), each file holding one frame entry;
  * OR one file `NAME.json` holding a list with one frame entry per frame (also accepted: mmpose's
    video dump `{"instance_info": [{"frame_id": i, "instances": [...]}, ...]}`).

A frame entry is one of
  (a) a list of person instances, each `{"keypoints": [[x, y], ... 133], "keypoint_scores":
      [s, ... 133]}` (mmpose / DWPose style; `"keypoints": [[x, y, s], ...]` also works);
  (b) `{"instance_info": [instances as in (a)]}` (mmpose's image prediction dump), or
      `{"instances": [...]}` (one frame of mmpose's video dump);
  (c) one person: `{"keypoints": [[x, y, score], ... 133]}` or a flat list of 399 numbers
      (x0, y0, s0, x1, ...).
When a frame has several persons, the one with the highest mean keypoint score is kept. A frame
with no person (empty list, `null`, no instances) gets confidence 0 for every joint.
Coordinates are pixels of the source video in display orientation, pixel centres at integer
coordinates. Coordinates normalised to [0, 1] (as DWPose's annotator writes them) are refused:
a video whose confident coordinates all lie in [0, 1] while its frames are larger than 4x4 pixels
is skipped.

Processing
----------
Each frame is centre-cropped to a square (side = min(H, W), offset floor((W - side) / 2),
floor((H - side) / 2)) and resized to `size` x `size` with PIL's LANCZOS filter. Keypoints get the
same transform: with pixel (i, j) spanning [j - 0.5, j + 0.5), a source x maps to
`(x - x0 + 0.5) * size / side - 0.5` (same for y). Scores below `min_score` (DWPose's usual 0.3),
non-finite values and joints outside the output image ([-0.5, size - 0.5) on both axes) get
confidence 0; otherwise the confidence is the detector's score. The 133 joints are mapped to the
project's 62 with `skeleton.from_coco_wholebody` (a joint averaged from several keypoints takes
their minimum confidence, so it is 0 when any source is absent).

Each video is cut into non-overlapping clips of `clip_frames` frames (a shorter tail is dropped;
a video shorter than one clip is skipped). identity_id = motion_id = the video's index in the
sorted list of all video names found; shape_params is empty. The index entry of each clip carries
{"video": NAME, "start_frame": k, "fps": the source's frame rate, as media.declared_fps reads it
(None for a folder of frames); clips are not resampled}. All clips go to split "train"; with
`test_fraction` > 0 whole videos go to "test", chosen by a hash of the name (deterministic,
independent of other videos).

Bad input (undecodable or truncated video, missing/broken/mismatched keypoints) skips that video
with a reason and never stops the run or leaves a half-written video in the dataset. The dataset
is written atomically by `records.DatasetWriter`; when nothing can be ingested nothing is written
and `IngestError` is raised. The output must lie outside both input folders, in a writable
folder (missing parent folders are created); `overwrite` replaces an existing output only when it is a dataset
(dataset_info.json, features.json, index.json) or an empty directory, never anything else.

CLI: python -m data_pipelines.ingest --videos DIR --keypoints DIR --out DIR
         [--size 64] [--clip-frames 17] [--test-fraction 0.1] [--min-score 0.3] [--overwrite]
Exit status 0 when something was ingested, 2 (with one line on stderr) for bad arguments or when
nothing could be ingested.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys

import av
import numpy as np

from data_pipelines import records
from im_anim_jax import media, skeleton

VIDEO_EXTS = (".mp4", ".m4v", ".avi", ".mov", ".mkv", ".webm", ".gif", ".mpg", ".mpeg")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
NUM_KPTS = skeleton.NUM_COCO_WHOLEBODY  # 133
DEFAULT_MIN_SCORE = 0.3


class InputError(ValueError):
    """One input (video or keypoint file) is unusable; the message says why."""


class IngestError(RuntimeError):
    """The run as a whole cannot proceed (bad arguments, nothing could be ingested)."""


# --------------------------------------------------------------------------------------------
# Keypoints
# --------------------------------------------------------------------------------------------

def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _parse_instance(inst, where: str) -> np.ndarray:
    """One person -> float32 [133, 3] (x, y, score)."""
    scores = None
    if isinstance(inst, dict):
        if "keypoints" not in inst:
            raise InputError(f"{where}: person entry has no 'keypoints' (keys: {sorted(inst)})")
        kp, scores = inst["keypoints"], inst.get("keypoint_scores")
    else:
        kp = inst
    try:
        a = np.asarray(kp, dtype=np.float64)
        s = None if scores is None else np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{where}: keypoints are not a numeric array") from None
    while a.ndim > 2 and a.shape[0] == 1:  # [1, N, C] from some dumps
        a = a[0]
    if s is not None:
        s = s.reshape(-1)
    if a.ndim == 1:  # flat list
        per = 2 if s is not None else 3
        if a.size % per:
            raise InputError(f"{where}: flat keypoint list of {a.size} numbers is not a multiple "
                             f"of {per}; expected {NUM_KPTS} keypoints")
        a = a.reshape(-1, per)
        if a.shape[0] != NUM_KPTS:
            raise InputError(f"{where}: expected {NUM_KPTS} keypoints, found {a.shape[0]} "
                             f"({a.size} numbers)")
    if a.ndim != 2 or a.shape[1] not in (2, 3):
        raise InputError(f"{where}: keypoints must be [{NUM_KPTS}, 2 or 3], got shape "
                         f"{list(a.shape)}")
    if a.shape[0] != NUM_KPTS:
        raise InputError(f"{where}: expected {NUM_KPTS} keypoints, found {a.shape[0]}")
    if s is None:
        if a.shape[1] != 3:
            raise InputError(f"{where}: keypoints are (x, y) but there are no 'keypoint_scores'")
        s = a[:, 2]
    elif s.shape[0] != NUM_KPTS:
        raise InputError(f"{where}: expected {NUM_KPTS} keypoint scores, found {s.shape[0]}")
    return np.concatenate([a[:, :2], s[:, None]], axis=1).astype(np.float32)


def _parse_frame(entry, where: str) -> np.ndarray:
    """One frame entry -> float32 [133, 3]; the highest-mean-score person, zeros if nobody."""
    if entry is None:
        return np.zeros((NUM_KPTS, 3), np.float32)
    if isinstance(entry, dict):
        for key in ("instance_info", "instances"):
            if key in entry:
                return _parse_frame(entry[key] if entry[key] is not None else [], where)
        if "keypoints" in entry:
            if not entry["keypoints"]:
                return np.zeros((NUM_KPTS, 3), np.float32)
            return _parse_instance(entry, where)
        raise InputError(f"{where}: unrecognised frame entry with keys {sorted(entry)} (expected "
                         f"'keypoints', 'instance_info' or 'instances')")
    if isinstance(entry, list):
        if not entry:
            return np.zeros((NUM_KPTS, 3), np.float32)
        if all(_is_number(v) for v in entry):
            return _parse_instance(entry, where)
        if all(isinstance(v, dict) for v in entry):
            people = [_parse_instance(p, f"{where}, person {i}") for i, p in enumerate(entry)]
            means = [np.nan_to_num(p[:, 2], nan=-np.inf).mean() for p in people]
            return people[int(np.argmax(means))]
        raise InputError(f"{where}: a frame entry must be a list of persons (dicts) or a flat "
                         f"list of {3 * NUM_KPTS} numbers")
    raise InputError(f"{where}: unrecognised frame entry of type {type(entry).__name__}")


def _load_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: invalid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text: {e}") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None


def _frame_number(filename: str) -> int | None:
    nums = re.findall(r"\d+", os.path.splitext(filename)[0])
    return int(nums[-1]) if nums else None


def _numbered_files(folder: str, exts: tuple[str, ...], what: str,
                    consecutive: bool) -> list[str]:
    """Files in `folder` with one of `exts`, ordered by the last integer in their name."""
    names = [n for n in os.listdir(folder)
             if n.lower().endswith(exts) and not n.startswith(".")
             and os.path.isfile(os.path.join(folder, n))]
    if not names:
        raise InputError(f"{folder}: no {what} files ({' '.join(exts)})")
    numbered = []
    for n in names:
        k = _frame_number(n)
        if k is None:
            raise InputError(f"{os.path.join(folder, n)}: no frame number in the file name")
        numbered.append((k, n))
    numbered.sort()
    for (a, na), (b, nb) in zip(numbered, numbered[1:]):
        if a == b:
            raise InputError(f"{folder}: {na} and {nb} have the same frame number {a}")
        if consecutive and b != a + 1:
            raise InputError(f"{folder}: frame numbers are not consecutive ({na} is followed by "
                             f"{nb}; frame {a + 1} is missing)")
    return [os.path.join(folder, n) for _, n in numbered]


def read_keypoints(path: str) -> np.ndarray:
    """Per-frame COCO-WholeBody keypoints of one video -> float32 [T, 133, 3] (x, y, score).

    `path` is a folder with one JSON per frame or one JSON file with a list of frames (formats
    in the module docstring). Raises InputError with the file and the problem.
    """
    if os.path.isdir(path):
        files = _numbered_files(path, (".json",), "keypoint .json", consecutive=True)
        frames = [_parse_frame(_load_json(f), f) for f in files]
    elif os.path.isfile(path):
        data = _load_json(path)
        if isinstance(data, dict) and isinstance(data.get("instance_info"), list) and all(
                isinstance(e, dict) and "instances" in e for e in data["instance_info"]):
            data = data["instance_info"]  # mmpose video dump: [{"frame_id", "instances"}, ...]
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON list with one entry per frame, got "
                             f"{type(data).__name__}")
        frames = [_parse_frame(e, f"{path}, frame {i}") for i, e in enumerate(data)]
    else:
        raise InputError(f"keypoints not found: {path}")
    if not frames:
        raise InputError(f"{path}: no frames")
    return np.stack(frames).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------------------------

def _iter_image_folder(folder: str):
    files = _numbered_files(folder, IMAGE_EXTS, "image", consecutive=False)
    try:
        for img in media.image_frames(files):
            yield np.asarray(img, dtype=np.uint8)
    except media.MediaError as e:  # a broken image, or one whose size differs from the first
        raise InputError(str(e)) from None


def _probe_video(path: str) -> int:
    """Opens the container with PyAV; returns the frame count it declares (0 = unknown)."""
    try:
        with av.open(path) as c:
            if not c.streams.video:
                raise InputError(f"{path}: no video stream")
            return int(c.streams.video[0].frames or 0)
    except av.FFmpegError as e:
        msg = getattr(e, "strerror", None) or str(e)
        raise InputError(f"{path}: cannot open video ({msg}; truncated or not a video "
                         f"file?)") from None
    except UnicodeDecodeError as e:  # PyAV decodes the metadata tags as UTF-8 when opening
        raise InputError(f"{path}: cannot open video (metadata is not UTF-8: {e}; corrupt "
                         f"file?)") from None


def _iter_video_file(path: str):
    """Frames in display orientation, decoded as `media.read_video` decodes them."""
    declared = _probe_video(path)
    n = 0
    try:
        with av.open(path) as c:
            for img in media.display_frames(c, c.streams.video[0]):
                n += 1
                yield np.asarray(img, dtype=np.uint8)
    except av.FFmpegError as e:
        msg = getattr(e, "strerror", None) or str(e)
        raise InputError(f"{path}: decoding failed after {n} frames ({msg}; truncated or "
                         f"corrupt file?)") from None
    except Exception as e:  # any other failure of a corrupt file stays one InputError
        raise InputError(f"{path}: decoding failed after {n} frames ({type(e).__name__}: "
                         f"{e})") from None
    if n == 0:
        raise InputError(f"{path}: no frames could be decoded (truncated or empty file?)")
    if declared and n < declared:
        raise InputError(f"{path}: truncated: the container declares {declared} frames but only "
                         f"{n} could be decoded")


def _iter_video(path: str):
    if os.path.isdir(path):
        return _iter_image_folder(path)
    if not os.path.isfile(path):
        raise InputError(f"video not found: {path}")
    return _iter_video_file(path)


def read_video(path: str) -> np.ndarray:
    """All frames of a video file (or a folder of image frames) -> uint8 [T, H, W, 3].

    Raises InputError when the file cannot be opened, is truncated or has no frames.
    """
    return np.stack(list(_iter_video(path)))


# --------------------------------------------------------------------------------------------
# Crop + resize
# --------------------------------------------------------------------------------------------

def crop_box(height: int, width: int) -> tuple[int, int, int]:
    """Centre square crop of an H x W frame -> (x0, y0, side)."""
    side = min(height, width)
    return (width - side) // 2, (height - side) // 2, side


def crop_resize_frame(frame: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> centre-cropped, LANCZOS-resized uint8 [size, size, 3]."""
    from PIL import Image
    x0, y0, side = crop_box(frame.shape[0], frame.shape[1])
    crop = np.ascontiguousarray(frame[y0:y0 + side, x0:x0 + side])
    if side == size:
        return crop
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.LANCZOS),
                      dtype=np.uint8)


def _in_image(xy: np.ndarray, size: int) -> np.ndarray:
    return np.all((xy >= -0.5) & (xy < size - 0.5), axis=-1)


def transform_keypoints(kpts: np.ndarray, height: int, width: int, size: int,
                        min_score: float = DEFAULT_MIN_SCORE) -> np.ndarray:
    """COCO-WholeBody [..., 133, 3] in source pixels -> our [..., 62, 3] in output pixels.

    Applies the crop/resize of `crop_resize_frame`, zeroes the confidence of low-score,
    non-finite and outside-the-image joints, then maps to the 62-joint layout.
    """
    kpts = np.asarray(kpts, np.float64)
    x0, y0, side = crop_box(height, width)
    scale = size / side
    xy = (kpts[..., :2] - np.array([x0, y0]) + 0.5) * scale - 0.5
    score = kpts[..., 2]
    finite = np.all(np.isfinite(kpts), axis=-1)
    keep = finite & (score >= min_score) & (score > 0) & _in_image(xy, size)
    xy = np.where(finite[..., None], xy, 0.0)
    conf = np.where(keep, score, 0.0)
    # A joint averaged from several keypoints takes their minimum confidence, and a mean of
    # points inside the (convex) image is inside it: no second bounds check is needed.
    return skeleton.from_coco_wholebody(np.concatenate([xy, conf[..., None]], -1).astype(np.float32))


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------

def find_videos(videos_dir: str) -> tuple[list[tuple[str, str | None]], list[dict]]:
    """Sorted [(NAME, path)] of the videos in `videos_dir` (path None when NAME is ambiguous),
    plus skip entries for ambiguous names and unreadable folders."""
    by_name: dict[str, list[str]] = {}
    skipped: list[dict] = []
    for entry in sorted(os.listdir(videos_dir)):
        if entry.startswith("."):
            continue
        p = os.path.join(videos_dir, entry)
        if os.path.isdir(p):
            try:
                has_images = any(n.lower().endswith(IMAGE_EXTS) for n in os.listdir(p))
            except OSError as e:
                skipped.append({"file": p, "reason": f"cannot list folder: {e.strerror or e}"})
                continue
            if has_images:
                by_name.setdefault(entry, []).append(p)
        elif os.path.splitext(entry)[1].lower() in VIDEO_EXTS:
            by_name.setdefault(os.path.splitext(entry)[0], []).append(p)
    videos = []
    for name in sorted(by_name):
        paths = by_name[name]
        if len(paths) > 1:
            for p in paths:
                skipped.append({"file": p, "reason": f"ambiguous: several videos are named "
                                f"{name!r} ({', '.join(os.path.basename(q) for q in paths)})"})
        videos.append((name, paths[0] if len(paths) == 1 else None))
    return videos, skipped


def is_test_video(name: str, test_fraction: float) -> bool:
    """Deterministic split: a hash of the video name, uniform in [0, 1), below the fraction."""
    if test_fraction <= 0:
        return False
    # fsencode: the name's bytes on disk, also for names that are not valid UTF-8
    u = int.from_bytes(hashlib.sha256(os.fsencode(name)).digest()[:8], "big") / 2.0 ** 64
    return u < test_fraction


def _keypoint_source(keypoints_dir: str, name: str) -> str:
    folder, file = os.path.join(keypoints_dir, name), os.path.join(keypoints_dir, name + ".json")
    has_folder, has_file = os.path.isdir(folder), os.path.isfile(file)
    if has_folder and has_file:
        raise InputError(f"ambiguous keypoints: both {folder}/ and {file} exist")
    if not (has_folder or has_file):
        raise InputError(f"missing keypoints: neither {folder}/ nor {file} exists")
    return folder if has_folder else file


def _check_pixel_coordinates(kpts: np.ndarray, height: int, width: int, min_score: float,
                             where: str) -> None:
    """Raises InputError when every confident coordinate lies in [0, 1] on a frame > 4x4 pixels."""
    score = kpts[..., 2]
    confident = np.all(np.isfinite(kpts), axis=-1) & (score >= min_score) & (score > 0)
    xy = kpts[..., :2][confident]
    if min(height, width) > 4 and xy.size and np.all((xy >= 0) & (xy <= 1)):
        raise InputError(f"{where}: coordinates look normalised to [0, 1]; expected pixels of "
                         f"the {width}x{height} source video")


def _prepare_video(name: str, path: str, keypoints_dir: str, size: int, clip_frames: int,
                   min_score: float) -> tuple[np.ndarray, np.ndarray]:
    """Reads and transforms one video -> (frames [T, size, size, 3], keypoints [T, 62, 3])."""
    kp_path = _keypoint_source(keypoints_dir, name)
    kpts = read_keypoints(kp_path)
    frames, hw = [], None
    for frame in _iter_video(path):
        if hw is not None and frame.shape[:2] != hw:
            raise InputError(f"{path}: frame {len(frames)} is {frame.shape[1]}x{frame.shape[0]}, "
                             f"the first frame is {hw[1]}x{hw[0]}")
        hw = frame.shape[:2]
        frames.append(crop_resize_frame(frame, size))
    if not frames:
        raise InputError(f"{path}: no frames")
    if len(frames) != kpts.shape[0]:
        raise InputError(f"frame count mismatch: video has {len(frames)} frames but the "
                         f"keypoints ({kp_path}) have {kpts.shape[0]}")
    if len(frames) < clip_frames:
        raise InputError(f"too short: {len(frames)} frames, fewer than clip_frames={clip_frames}")
    _check_pixel_coordinates(kpts, hw[0], hw[1], min_score, kp_path)
    return np.stack(frames), transform_keypoints(kpts, hw[0], hw[1], size, min_score)


def _video_clips(vid: int, name: str, path: str, keypoints_dir: str, size: int,
                 clip_frames: int, min_score: float) -> list[tuple[dict, dict]]:
    """One video -> [(example, extra index entry)] for each of its whole clips, all validated."""
    frames, kpts = _prepare_video(name, path, keypoints_dir, size, clip_frames, min_score)
    fps = media.declared_fps(path)  # clips keep the source's rate: recorded, not resampled
    examples = []
    for k in range(0, frames.shape[0] - clip_frames + 1, clip_frames):
        ex = {"frames": frames[k:k + clip_frames], "keypoints": kpts[k:k + clip_frames],
              "identity_id": np.int32(vid), "motion_id": np.int32(vid),
              "shape_params": np.zeros((0,), np.float32)}
        records.validate_example(ex)  # every clip is valid before any is written
        examples.append((ex, {"video": name, "start_frame": k, "fps": fps}))
    return examples


def _check_numbers(size, clip_frames, test_fraction, min_score) -> tuple[int, int, float, float]:
    """The numeric arguments as plain int/float (json.dump takes no numpy scalars)."""
    for what, v in (("size", size), ("clip_frames", clip_frames)):
        if isinstance(v, bool) or not (isinstance(v, (int, np.integer)) and v > 0):
            raise IngestError(f"{what} must be a positive integer, got {v!r}")
    if not (_is_number(test_fraction) and 0.0 <= test_fraction <= 1.0):
        raise IngestError(f"test_fraction must be a number in [0, 1], got {test_fraction!r}")
    if not (_is_number(min_score) and math.isfinite(min_score)):
        raise IngestError(f"min_score must be a finite number, got {min_score!r}")
    return int(size), int(clip_frames), float(test_fraction), float(min_score)


def _check_paths(videos_dir: str, keypoints_dir: str, out_dir: str, overwrite: bool) -> None:
    """IngestError unless both inputs are folders and `out_dir` can be written without harming
    them or anything that is not a dataset."""
    out = os.path.realpath(out_dir)
    for what, d in (("videos", videos_dir), ("keypoints", keypoints_dir)):
        if not os.path.isdir(d):
            raise IngestError(f"{what} folder {d} does not exist or is not a folder")
        src = os.path.realpath(d)
        if os.path.commonpath([out, src]) in (out, src):
            raise IngestError(f"output directory {out_dir} is, contains or lies inside the "
                              f"{what} folder {d}; choose an output outside the inputs")
    if os.path.exists(out_dir) and not overwrite:
        raise IngestError(f"output directory {out_dir} already exists (use overwrite=True / "
                          f"--overwrite to replace it)")
    try:
        records.check_replaceable(out_dir)
    except OSError as e:
        raise IngestError(str(e)) from None
    parent = os.path.dirname(os.path.abspath(out_dir))
    while not os.path.exists(parent):  # missing folders are created: the nearest existing one
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise IngestError(f"cannot create output directory {out_dir}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise IngestError(f"cannot create output directory {out_dir}: {parent} is not writable")


def ingest(videos_dir: str, keypoints_dir: str, out_dir: str, *, size: int = 64,
           clip_frames: int = 17, test_fraction: float = 0.0, overwrite: bool = False,
           name: str = "ingested", min_score: float = DEFAULT_MIN_SCORE) -> dict:
    """Writes the clip dataset `out_dir` from `videos_dir` + `keypoints_dir` (module docstring).

    Returns {"ingested": [NAME, ...], "skipped": [{"file", "reason"}], "clips": {split: n},
    "path": out_dir}. Raises IngestError for bad arguments, when nothing could be ingested or
    when the dataset cannot be written (then nothing is written).
    """
    size, clip_frames, test_fraction, min_score = _check_numbers(size, clip_frames,
                                                                 test_fraction, min_score)
    _check_paths(videos_dir, keypoints_dir, out_dir, overwrite)
    videos, skipped = find_videos(videos_dir)
    if not videos:
        raise IngestError(f"no videos found in {videos_dir} (looked for {' '.join(VIDEO_EXTS)} "
                          f"files and sub-folders of {' '.join(IMAGE_EXTS)} frames)")
    ingested, clips, writer = [], {}, None
    try:
        for vid, (vname, path) in enumerate(videos):
            if path is None:  # ambiguous name, already in `skipped`
                continue
            try:
                examples = _video_clips(vid, vname, path, keypoints_dir, size, clip_frames,
                                        min_score)
            except InputError as e:
                skipped.append({"file": path, "reason": str(e)})
                continue
            except Exception as e:  # never let one odd file kill the run
                skipped.append({"file": path, "reason": f"unexpected error: "
                                                        f"{type(e).__name__}: {e}"})
                continue
            split = "test" if is_test_video(vname, test_fraction) else "train"
            if writer is None:
                writer = records.DatasetWriter(out_dir, name, overwrite=overwrite)
            for ex, extra in examples:
                writer.add(split, ex, extra)
            clips[split] = clips.get(split, 0) + len(examples)
            ingested.append(vname)
        skipped.sort(key=lambda s: s["file"])
        if writer is not None:
            writer.close(
                description=f"real videos ingested from {os.path.abspath(videos_dir)}",
                metadata={"source": "ingest", "videos_dir": os.path.abspath(videos_dir),
                          "keypoints_dir": os.path.abspath(keypoints_dir), "size": size,
                          "clip_frames": clip_frames, "test_fraction": test_fraction,
                          "min_score": min_score, "videos": [v for v, _ in videos],
                          "ingested": ingested, "skipped": skipped})
    except BaseException as e:
        if writer is not None:
            writer.abort()
        if isinstance(e, OSError):  # input errors are caught above: this is the writer's
            raise IngestError(f"cannot write dataset {out_dir}: {e.strerror or e}") from None
        raise
    report = {"ingested": ingested, "skipped": skipped, "clips": clips, "path": out_dir}
    _print_report(report)
    if writer is None:
        reasons = "; ".join(f"{os.path.basename(s['file'])}: {s['reason']}" for s in skipped[:3])
        more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        raise IngestError(f"nothing could be ingested from {videos_dir}: all {len(skipped)} "
                          f"videos were skipped ({reasons}{more})")
    return report


def summary(report: dict) -> str:
    """`ingested N videos (M clips), skipped K: a.mp4, b.avi; splits: train=.. test=..`."""
    line = (f"ingested {len(report['ingested'])} videos ({sum(report['clips'].values())} clips), "
            f"skipped {len(report['skipped'])}")
    if report["skipped"]:
        line += ": " + ", ".join(os.path.basename(s["file"]) for s in report["skipped"])
    if report["clips"]:
        line += "; splits: " + " ".join(f"{s}={n}" for s, n in sorted(report["clips"].items()))
        line += f" -> {report['path']}"
    return line


def _print_report(report: dict) -> None:
    for s in report["skipped"]:
        print(f"  skipped {os.path.basename(s['file'])}: {s['reason']}")
    print(summary(report), flush=True)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="python -m data_pipelines.ingest",
                description="Ingest real videos + DWPose (COCO-WholeBody-133) keypoint JSON into "
                            "the project's ArrayRecord clip dataset.")
    p.add_argument("--videos", required=True, help="folder of videos / frame sub-folders")
    p.add_argument("--keypoints", required=True, help="folder of NAME/ or NAME.json keypoints")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--size", type=int, default=64, help="output frame side in pixels")
    p.add_argument("--clip-frames", type=int, default=17, help="frames per clip")
    p.add_argument("--test-fraction", type=float, default=0.0,
                   help="fraction of videos (by name hash) put in split 'test'")
    p.add_argument("--min-score", type=float, default=DEFAULT_MIN_SCORE,
                   help="keypoint scores below this get confidence 0")
    p.add_argument("--name", default="ingested", help="dataset name (shard file prefix)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    try:
        ingest(args.videos, args.keypoints, args.out, size=args.size,
               clip_frames=args.clip_frames, test_fraction=args.test_fraction,
               overwrite=args.overwrite, name=args.name, min_score=args.min_score)
    except IngestError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
