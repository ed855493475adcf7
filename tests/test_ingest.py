"""Tests for data_pipelines.ingest: real videos + DWPose JSON -> the ArrayRecord clip dataset.

All inputs are made here: tiny videos (48x40, 24 frames) with a bright dot that moves one pixel
per frame, and COCO-WholeBody-133 keypoint JSON whose nose follows the dot.
"""
from __future__ import annotations

import errno
import glob
import json
import os
import struct
import subprocess
import sys

import av
import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from data_pipelines import ingest as ing
from data_pipelines import records
from im_anim_jax import media, skeleton

H, W, T = 40, 48, 24          # source videos: 48 wide, 40 high -> crop x0=4, y0=0, side 40
SIZE, CLIP = 32, 8            # output 32x32 (scale 0.8), 8-frame clips
J = skeleton.JOINT_INDEX
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dot_xy(t: int) -> tuple[int, int]:
    return 10 + t, 12 + (t % 5)


def make_frames(n: int = T, h: int = H, w: int = W) -> np.ndarray:
    f = np.zeros((n, h, w, 3), np.uint8)
    for t in range(n):
        x, y = dot_xy(t)
        f[t, y - 1:y + 2, x - 1:x + 2] = 255
    return f


def make_kpts(n: int = T) -> np.ndarray:
    """[n, 133, 3]; nose on the dot, plus joints with known low scores / outside the crop."""
    k = np.zeros((n, 133, 3), np.float64)
    j = np.arange(133)
    k[:, :, 0], k[:, :, 1], k[:, :, 2] = 5 + j % 38, 1 + (j // 38) * 9, 0.9
    for t in range(n):
        k[t, 0] = (*dot_xy(t), 0.95)   # nose
    k[:, 5] = (14, 18, 0.8)            # left shoulder
    k[:, 6] = (30, 22, 0.6)            # right shoulder  -> neck (22, 20), conf 0.6
    k[:, 7, 2] = 0.1                   # left elbow: low score
    k[:, 9, :2] = (1.0, 20)            # left wrist: in the cropped-away left strip
    k[:, 10, :2] = (46.0, 20)          # right wrist: in the cropped-away right strip
    k[:, 17, :2] = (2.0, 30)           # left big toe outside, small toe inside -> l_toe absent
    k[:, 18, :2] = (20.0, 30)
    return k


def out_xy(x, y, size=SIZE):
    """Independent statement of the mapping: crop offset 4, scale size/40, half-pixel centres."""
    return (x - 4 + 0.5) * size / 40 - 0.5, (y + 0.5) * size / 40 - 0.5


def instance(kp):  # mmpose / DWPose style
    return {"keypoints": kp[:, :2].tolist(), "keypoint_scores": kp[:, 2].tolist(),
            "bbox": [[0, 0, 10, 10]], "bbox_score": 0.99}


def write_video(path, frames, codec=None, faststart=False):
    ext = os.path.splitext(path)[1]
    if ext == ".gif":
        iio.imwrite(path, frames, loop=0, duration=40)
    elif faststart:
        with av.open(str(path), "w", options={"movflags": "faststart"}) as c:
            s = c.add_stream("libx264", rate=24)
            s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            for f in frames:
                for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
    else:
        iio.imwrite(path, frames, plugin="pyav", fps=24, codec=codec or "libx264")


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def write_frame_jsons(folder, entries):
    for t, e in enumerate(entries):
        write_json(os.path.join(folder, f"{t:06d}.json"), e)


def good_pair(vdir, kdir, name, n=T):
    """A valid mp4 + one-file keypoints (format c)."""
    write_video(os.path.join(vdir, f"{name}.mp4"), make_frames(n))
    write_json(os.path.join(kdir, f"{name}.json"), [{"keypoints": k.tolist()} for k in make_kpts(n)])


def png_pair(vdir, kdir, name, side=16, kp=(8, 8, 0.9)):
    """A 2-frame video as a folder of side x side PNGs + one-file keypoints, every joint at kp."""
    os.makedirs(os.path.join(vdir, name))
    for t in range(2):
        iio.imwrite(os.path.join(vdir, name, f"{t}.png"), np.zeros((side, side, 3), np.uint8))
    write_json(os.path.join(kdir, f"{name}.json"), [{"keypoints": [list(kp)] * 133}] * 2)


def rotate_mp4_90_cw(path, height):
    """Sets the mp4's track display matrix to a 90-degree clockwise turn, as phones do for
    portrait video; the coded frames are unchanged."""
    data = bytearray(open(path, "rb").read())
    at = data.find(b"tkhd")
    matrix = at + 8 + (20 if data[at + 4] == 0 else 32) + 16  # after version, times, id, volume
    data[matrix:matrix + 36] = struct.pack(">9i", 0, 0x10000, 0, -0x10000, 0, 0, height << 16, 0,
                                           0x40000000)
    open(path, "wb").write(bytes(data))


def assert_dot_turned_cw(frame, t):
    """The dot of frame t (source H x W) after a 90-degree clockwise turn: (H - 1 - y, x)."""
    x, y = dot_xy(t)
    cx, cy = dot_centroid(frame)
    assert abs(cx - (H - 1 - y)) < 0.5 and abs(cy - x) < 0.5, (t, cx, cy)


def tiny_dataset(path):
    """A one-clip dataset at `path`, as a previous run would have left it."""
    with records.DatasetWriter(path, "old") as w:
        w.add("train", {"frames": np.zeros((1, 4, 4, 3), np.uint8),
                        "keypoints": np.zeros((1, 62, 3), np.float32),
                        "identity_id": np.int32(0), "motion_id": np.int32(0),
                        "shape_params": np.zeros((0,), np.float32)})


def clips_by_video(path, split="train"):
    src = records.open_split(path, split)
    entries = records.read_index(path)["splits"][split]
    out = {}
    for i, e in enumerate(entries):
        out.setdefault(e["video"], []).append((e["start_frame"], src[i], e))
    return out


def dot_centroid(frame):
    w = np.clip(frame.astype(np.float64).mean(-1) - 64, 0, None)
    ys, xs = np.mgrid[:frame.shape[0], :frame.shape[1]]
    return (w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()


# --------------------------------------------------------------------------------------------
# Good videos, every keypoint format
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    vdir, kdir = str(root / "videos"), str(root / "kpts")
    os.makedirs(vdir)
    kp = make_kpts()
    decoy = kp.copy()
    decoy[:, :, :2] += 3
    decoy[:, :, 2] = 0.5
    # (a) per-frame folder, list of persons; the decoy (lower mean score) comes first
    write_video(os.path.join(vdir, "a_mp4.mp4"), make_frames())
    write_frame_jsons(os.path.join(kdir, "a_mp4"), [[instance(d), instance(k)]
                                                    for d, k in zip(decoy, kp)])
    # (b) one file, {"instance_info": [...]} per frame
    write_video(os.path.join(vdir, "b_avi.avi"), make_frames(), codec="mpeg4")
    write_json(os.path.join(kdir, "b_avi.json"), [{"instance_info": [instance(k)]} for k in kp])
    # (c) one file, {"keypoints": [[x, y, s]]}; 20 frames -> 2 clips, 4-frame tail dropped
    write_video(os.path.join(vdir, "c_mkv.mkv"), make_frames(20))
    write_json(os.path.join(kdir, "c_mkv.json"), [{"keypoints": k.tolist()} for k in kp[:20]])
    # (c) flat 399 numbers, per-frame folder; the video is a folder of png frames
    os.makedirs(os.path.join(vdir, "d_frames"))
    for t, f in enumerate(make_frames()):
        iio.imwrite(os.path.join(vdir, "d_frames", f"img_{t:04d}.png"), f)
    write_frame_jsons(os.path.join(kdir, "d_frames"), [k.reshape(-1).tolist() for k in kp])
    # gif, flat lists in one file; frame 3 has no person
    write_video(os.path.join(vdir, "e_gif.gif"), make_frames())
    entries = [k.reshape(-1).tolist() for k in kp]
    entries[3] = []
    write_json(os.path.join(kdir, "e_gif.json"), entries)
    out = str(root / "ds")
    report = ing.ingest(vdir, kdir, out, size=SIZE, clip_frames=CLIP)
    return report, out


def test_good_report_and_clip_counts(good):
    report, out = good
    assert sorted(report["ingested"]) == ["a_mp4", "b_avi", "c_mkv", "d_frames", "e_gif"]
    assert report["skipped"] == []
    assert report["clips"] == {"train": 3 + 3 + 2 + 3 + 3}
    assert report["path"] == out and records.is_dataset(out)
    src = records.open_split(out, "train")
    assert len(src) == 14
    by_video = clips_by_video(out)
    assert {v: sorted(s for s, _, _ in c) for v, c in by_video.items()} == {
        "a_mp4": [0, 8, 16], "b_avi": [0, 8, 16], "c_mkv": [0, 8],
        "d_frames": [0, 8, 16], "e_gif": [0, 8, 16]}
    ids = {v: int(c[0][1]["identity_id"]) for v, c in by_video.items()}
    assert ids == {"a_mp4": 0, "b_avi": 1, "c_mkv": 2, "d_frames": 3, "e_gif": 4}
    for v, cs in by_video.items():
        for _, ex, entry in cs:
            assert ex["frames"].shape == (CLIP, SIZE, SIZE, 3) and ex["frames"].dtype == np.uint8
            assert ex["keypoints"].shape == (CLIP, 62, 3)
            assert int(ex["motion_id"]) == int(ex["identity_id"]) == ids[v]
            assert ex["shape_params"].shape == (0,)
            assert entry["num_frames"] == CLIP
            # the source's rate, recorded (clips are not resampled); none for a frame folder
            fps = {"d_frames": None, "e_gif": 25.0}.get(v, 24.0)
            assert entry["fps"] == (fps and pytest.approx(fps))


@pytest.mark.parametrize("video", ["a_mp4", "b_avi", "c_mkv", "d_frames", "e_gif"])
def test_keypoint_lands_on_dot(good, video):
    _, out = good
    clips = clips_by_video(out)[video]
    assert clips
    for start, ex, _ in clips:
        for i in range(CLIP):
            t = start + i
            nose = ex["keypoints"][i, J["nose"]]
            if video == "e_gif" and t == 3:
                assert np.all(ex["keypoints"][i, :, 2] == 0)                  # no person
                continue
            np.testing.assert_allclose(nose[:2], out_xy(*dot_xy(t)), atol=1e-4)  # exact mapping
            assert nose[2] == pytest.approx(0.95)
            cx, cy = dot_centroid(ex["frames"][i])
            assert abs(cx - nose[0]) < 1 and abs(cy - nose[1]) < 1, (video, t, cx, cy, nose)


@pytest.mark.parametrize("video", ["a_mp4", "d_frames"])
def test_joint_confidences_and_neck(good, video):
    _, out = good
    kp = np.concatenate([ex["keypoints"] for _, ex, _ in clips_by_video(out)[video]])
    neck = kp[:, J["neck"]]
    np.testing.assert_allclose(neck[:, :2], (kp[:, J["l_shoulder"], :2]
                                             + kp[:, J["r_shoulder"], :2]) / 2, atol=1e-5)
    np.testing.assert_allclose(neck[:, :2], np.broadcast_to(out_xy(22, 20), neck[:, :2].shape),
                               atol=1e-4)
    assert np.allclose(neck[:, 2], 0.6)                      # min of the shoulders' scores
    assert np.allclose(kp[:, J["l_shoulder"], 2], 0.8)
    assert np.all(kp[:, J["l_elbow"], 2] == 0)               # score 0.1 < 0.3
    assert np.all(kp[:, J["l_wrist"], 2] == 0)               # x=1 is cropped away
    assert np.all(kp[:, J["r_wrist"], 2] == 0)               # x=46 is cropped away
    assert np.all(kp[:, J["l_toe"], 2] == 0)                 # one source outside
    assert np.allclose(kp[:, J["r_toe"], 2], 0.9)
    assert np.allclose(kp[:, J["lhand_wrist"], 2], 0.9)
    # every joint with confidence > 0 is inside the image
    inside = kp[kp[..., 2] > 0][:, :2]
    assert np.all((inside >= -0.5) & (inside < SIZE - 0.5))


def test_transform_keypoints_exact_mapping():
    k = np.zeros((133, 3))
    k[:, 2] = 0.9
    k[:, :2] = (20, 20)
    k[0, :2] = (30, 12)      # -> (26.5 * 0.8 - 0.5, 12.5 * 0.8 - 0.5) = (20.7, 9.5)
    k[1, :2] = (3.5, 39.4)   # l_eye, left crop edge -> x = -0.5 (inside), y = 31.42 (inside)
    k[2, :2] = (3.4, 10)     # r_eye, just left of the crop -> outside
    k[3, :2] = (43.5, 10)    # l_ear, right crop edge -> x = 31.5 (outside: pixel 31 ends there)
    k[4, :2] = (43.4, -0.5)  # r_ear -> (31.42, -0.5): inside
    out = ing.transform_keypoints(k, H, W, SIZE, min_score=0.3)
    nose, l_eye, r_eye, l_ear, r_ear = (out[J[n]] for n in ("nose", "l_eye", "r_eye", "l_ear",
                                                           "r_ear"))
    np.testing.assert_allclose(nose, (20.7, 9.5, 0.9), atol=1e-5)
    np.testing.assert_allclose(l_eye, (-0.5, 31.42, 0.9), atol=1e-5)
    assert r_eye[2] == 0 and l_ear[2] == 0
    np.testing.assert_allclose(r_ear, (31.42, -0.5, 0.9), atol=1e-5)
    # portrait input, upscaling: 40 wide x 60 high -> y0 = 10, side 40, scale 64/40
    out = ing.transform_keypoints(k, 60, 40, 64)
    np.testing.assert_allclose(out[J["nose"], :2], ((30.5) * 1.6 - 0.5, 2.5 * 1.6 - 0.5),
                               atol=1e-5)


def test_crop_resize_frame_matches_keypoint_mapping():
    f = np.zeros((60, 40, 3), np.uint8)   # portrait: crop rows 10..49
    f[29:32, 19:22] = 255                 # dot centred at (20, 30)
    g = ing.crop_resize_frame(f, 64)
    assert g.shape == (64, 64, 3) and g.dtype == np.uint8
    cx, cy = dot_centroid(g)
    assert abs(cx - (20.5 * 1.6 - 0.5)) < 0.25 and abs(cy - (20.5 * 1.6 - 0.5)) < 0.25


# --------------------------------------------------------------------------------------------
# read_keypoints / read_video on their own
# --------------------------------------------------------------------------------------------

def test_read_keypoints_formats_and_person_choice(tmp_path):
    kp = make_kpts(2)
    low = kp[0].copy()
    low[:, 2] = 0.2
    high = kp[0].copy()
    high[:, :2] += 7
    write_json(str(tmp_path / "a.json"), [[instance(low), instance(high)], []])
    got = ing.read_keypoints(str(tmp_path / "a.json"))
    assert got.shape == (2, 133, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got[0], high, atol=1e-5)
    assert np.all(got[1] == 0)
    # mmpose video dump; frame folder with names that sort wrongly as strings
    write_json(str(tmp_path / "b.json"), {"meta_info": {}, "instance_info": [
        {"frame_id": i, "instances": [instance(k)]} for i, k in enumerate(kp)]})
    np.testing.assert_allclose(ing.read_keypoints(str(tmp_path / "b.json")), kp, atol=1e-5)
    for i in (9, 10, 11):
        write_json(str(tmp_path / "c" / f"frame_{i}.json"), {"keypoints": (kp[0] + i).tolist()})
    got = ing.read_keypoints(str(tmp_path / "c"))
    np.testing.assert_allclose(got[:, 0, 0], kp[0, 0, 0] + np.array([9, 10, 11]))


def test_read_keypoints_errors(tmp_path):
    write_json(str(tmp_path / "k17.json"), [{"keypoints": np.ones((17, 3)).tolist()}])
    with pytest.raises(ing.InputError, match=r"expected 133 keypoints, found 17"):
        ing.read_keypoints(str(tmp_path / "k17.json"))
    write_json(str(tmp_path / "flat.json"), [list(range(51))])
    with pytest.raises(ing.InputError, match=r"expected 133 keypoints, found 17"):
        ing.read_keypoints(str(tmp_path / "flat.json"))
    (tmp_path / "broken.json").write_text('[{"keypoints": [1, 2,')
    with pytest.raises(ing.InputError, match=r"broken\.json: invalid JSON: Expecting"):
        ing.read_keypoints(str(tmp_path / "broken.json"))
    for i in (0, 1, 3):
        write_json(str(tmp_path / "gap" / f"{i:06d}.json"), [])
    with pytest.raises(ing.InputError, match=r"not consecutive.*frame 2 is missing"):
        ing.read_keypoints(str(tmp_path / "gap"))
    with pytest.raises(ing.InputError, match="keypoints not found"):
        ing.read_keypoints(str(tmp_path / "nope.json"))


def test_read_video(tmp_path):
    write_video(str(tmp_path / "v.mp4"), make_frames())
    v = ing.read_video(str(tmp_path / "v.mp4"))
    assert v.shape == (T, H, W, 3) and v.dtype == np.uint8
    assert v[5, 12 + 0, 15].mean() > 200 and v[5, 30, 30].mean() < 30   # dot of frame 5
    (tmp_path / "text.mp4").write_text("this is not a video")
    with pytest.raises(ing.InputError, match="cannot open video"):
        ing.read_video(str(tmp_path / "text.mp4"))
    os.makedirs(tmp_path / "frames")
    iio.imwrite(str(tmp_path / "frames" / "1.png"), np.zeros((8, 8, 3), np.uint8))
    iio.imwrite(str(tmp_path / "frames" / "2.png"), np.zeros((8, 9, 3), np.uint8))
    with pytest.raises(ing.InputError, match="differs from the first"):
        ing.read_video(str(tmp_path / "frames"))


def test_rotated_video_is_read_in_display_orientation(tmp_path):
    path = str(tmp_path / "rot.mp4")
    write_video(path, make_frames(3))
    rotate_mp4_90_cw(path, H)
    v = ing.read_video(path)
    assert v.shape == (3, W, H, 3)                       # 40 wide, 48 high once turned
    for t in range(3):
        assert_dot_turned_cw(v[t], t)
    assert media.read_video(path, (W, H))[0].shape == (3, W, H, 3)   # as media reads it


def test_image_frames_are_converted_as_media_does(tmp_path):
    img = Image.fromarray(make_frames(1)[0])
    exif = img.getexif()
    exif[0x0112] = 6                                     # EXIF orientation: turn 90 degrees CW
    os.makedirs(tmp_path / "exif")
    img.save(tmp_path / "exif" / "0.png", exif=exif.tobytes())
    v = ing.read_video(str(tmp_path / "exif"))
    assert v.shape == (1, W, H, 3)
    assert_dot_turned_cw(v[0], 0)
    os.makedirs(tmp_path / "g16")
    Image.fromarray(np.full((8, 8), 20000, np.uint16)).save(tmp_path / "g16" / "0.png")
    assert np.all(ing.read_video(str(tmp_path / "g16")) == 20000 >> 8)   # not clipped to 255
    os.makedirs(tmp_path / "alpha")
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(tmp_path / "alpha" / "0.png")
    assert np.all(ing.read_video(str(tmp_path / "alpha")) == 255)        # on white, not black


def test_fewer_frames_than_the_container_declares_is_truncation(tmp_path, monkeypatch):
    # Some truncated files (e.g. an AVI cut before its end) decode without any error, just fewer
    # frames: the count the container declares exposes them.
    write_video(str(tmp_path / "v.mp4"), make_frames())
    monkeypatch.setattr(ing, "_probe_video", lambda path: 30)
    with pytest.raises(ing.InputError, match="truncated: the container declares 30 frames but "
                                             "only 24"):
        ing.read_video(str(tmp_path / "v.mp4"))


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

def test_bad_files_are_skipped_with_reasons(tmp_path):
    vdir, kdir, out = str(tmp_path / "v"), str(tmp_path / "k"), str(tmp_path / "out")
    os.makedirs(vdir)
    good_pair(vdir, kdir, "good")
    good_pair(vdir, kdir, "truncated")
    p = os.path.join(vdir, "truncated.mp4")
    data = open(p, "rb").read()
    open(p, "wb").write(data[:len(data) // 2])
    write_video(os.path.join(vdir, "trunc_fs.mp4"), make_frames(), faststart=True)
    data = open(os.path.join(vdir, "trunc_fs.mp4"), "rb").read()
    open(os.path.join(vdir, "trunc_fs.mp4"), "wb").write(data[:len(data) // 2])
    write_json(os.path.join(kdir, "trunc_fs.json"), [{"keypoints": k.tolist()} for k in make_kpts()])
    write_video(os.path.join(vdir, "trunc_mkv.mkv"), make_frames())   # decodes fewer frames
    data = open(os.path.join(vdir, "trunc_mkv.mkv"), "rb").read()
    open(os.path.join(vdir, "trunc_mkv.mkv"), "wb").write(data[:len(data) * 6 // 10])
    write_json(os.path.join(kdir, "trunc_mkv.json"), [{"keypoints": k.tolist()}
                                                      for k in make_kpts()])
    good_pair(vdir, kdir, "notvideo")
    open(os.path.join(vdir, "notvideo.mp4"), "w").write("definitely not a video\n" * 20)
    write_video(os.path.join(vdir, "nokpts.mp4"), make_frames())
    good_pair(vdir, kdir, "mismatch")
    write_json(os.path.join(kdir, "mismatch.json"), [{"keypoints": k.tolist()}
                                                     for k in make_kpts(20)])
    write_video(os.path.join(vdir, "k17.mp4"), make_frames())
    write_frame_jsons(os.path.join(kdir, "k17"), [[instance(np.ones((17, 3)))]] * T)
    write_video(os.path.join(vdir, "badjson.mp4"), make_frames())
    write_json(os.path.join(kdir, "badjson.json"), [])
    open(os.path.join(kdir, "badjson.json"), "w").write("[{'keypoints': }]")
    good_pair(vdir, kdir, "dup")                                    # dup.mp4 and dup.avi
    write_video(os.path.join(vdir, "dup.avi"), make_frames(), codec="mpeg4")
    write_video(os.path.join(vdir, "short.mp4"), make_frames(5))
    write_json(os.path.join(kdir, "short.json"), [{"keypoints": k.tolist()} for k in make_kpts(5)])

    report = ing.ingest(vdir, kdir, out, size=SIZE, clip_frames=CLIP)
    assert report["ingested"] == ["good"]
    assert report["clips"] == {"train": 3}
    reasons = {os.path.basename(s["file"]): s["reason"] for s in report["skipped"]}
    assert sorted(reasons) == sorted(["truncated.mp4", "trunc_fs.mp4", "trunc_mkv.mkv",
                                      "notvideo.mp4",
                                      "nokpts.mp4", "mismatch.mp4", "k17.mp4", "badjson.mp4",
                                      "short.mp4", "dup.mp4", "dup.avi"])
    assert "ambiguous" in reasons["dup.mp4"] and "dup.avi" in reasons["dup.mp4"]
    assert "cannot open video" in reasons["truncated.mp4"]
    assert "truncated" in reasons["trunc_fs.mp4"] or "decoding failed" in reasons["trunc_fs.mp4"]
    assert "cannot open video" in reasons["notvideo.mp4"]
    assert "missing keypoints" in reasons["nokpts.mp4"] and "nokpts.json" in reasons["nokpts.mp4"]
    assert "video has 24 frames" in reasons["mismatch.mp4"] and "have 20" in reasons["mismatch.mp4"]
    assert "expected 133 keypoints, found 17" in reasons["k17.mp4"]
    assert "000000.json" in reasons["k17.mp4"]
    assert "badjson.json: invalid JSON" in reasons["badjson.mp4"]
    assert "short" in reasons["short.mp4"] and "5 frames" in reasons["short.mp4"]
    assert [e["video"] for e in records.read_index(out)["splits"]["train"]] == ["good"] * 3
    assert len(records.open_split(out, "train")) == 3


def test_normalised_keypoints_are_refused(tmp_path):
    vdir, kdir = str(tmp_path / "v"), str(tmp_path / "k")
    png_pair(vdir, kdir, "norm", side=16, kp=(0.5, 0.25, 0.9))
    png_pair(vdir, kdir, "tiny", side=4, kp=(0.5, 0.25, 0.9))   # 4x4: [0, 1] may be pixels
    report = ing.ingest(vdir, kdir, str(tmp_path / "out"), size=4, clip_frames=2)
    assert report["ingested"] == ["tiny"]
    assert report["skipped"] == [{"file": os.path.join(vdir, "norm"), "reason": (
        f"{os.path.join(kdir, 'norm.json')}: coordinates look normalised to [0, 1]; expected "
        f"pixels of the 16x16 source video")}]


def test_all_bad_raises_and_writes_nothing(tmp_path, capsys):
    vdir, kdir, out = str(tmp_path / "v"), str(tmp_path / "k"), str(tmp_path / "out")
    os.makedirs(vdir)
    os.makedirs(kdir)
    open(os.path.join(vdir, "x.mp4"), "w").write("nope")
    write_video(os.path.join(vdir, "y.mp4"), make_frames())
    with pytest.raises(ing.IngestError, match="nothing could be ingested"):
        ing.ingest(vdir, kdir, out, size=SIZE, clip_frames=CLIP)
    assert sorted(os.listdir(tmp_path)) == ["k", "v"]        # no output, no temp directory
    assert "ingested 0 videos (0 clips), skipped 2" in capsys.readouterr().out
    # the same with overwrite over an existing dataset: it is left alone
    tiny_dataset(out)
    before = sorted(os.listdir(out))
    with pytest.raises(ing.IngestError, match="nothing could be ingested"):
        ing.ingest(vdir, kdir, out, size=SIZE, clip_frames=CLIP, overwrite=True)
    assert sorted(os.listdir(out)) == before and records.is_dataset(out)
    assert sorted(os.listdir(tmp_path)) == ["k", "out", "v"]


def test_existing_output_needs_overwrite(tmp_path):
    vdir, kdir, out = str(tmp_path / "v"), str(tmp_path / "k"), str(tmp_path / "out")
    os.makedirs(vdir)
    good_pair(vdir, kdir, "one", n=CLIP)
    tiny_dataset(out)
    with pytest.raises(ing.IngestError, match="already exists"):
        ing.ingest(vdir, kdir, out, size=SIZE, clip_frames=CLIP)
    assert records.read_index(out)["splits"]["train"][0]["num_frames"] == 1
    report = ing.ingest(vdir, kdir, out, size=SIZE, clip_frames=CLIP, overwrite=True)
    assert report["clips"] == {"train": 1}
    assert records.read_index(out)["splits"]["train"][0]["num_frames"] == CLIP
    assert not glob.glob(out + ".tmp-*") and not glob.glob(out + ".old-*")
    os.makedirs(tmp_path / "empty")                   # an empty directory may be replaced too
    ing.ingest(vdir, kdir, str(tmp_path / "empty"), size=SIZE, clip_frames=CLIP, overwrite=True)
    assert records.is_dataset(str(tmp_path / "empty"))


def test_overwrite_never_replaces_a_folder_that_is_not_a_dataset(tmp_path):
    vdir, kdir, out = str(tmp_path / "v"), str(tmp_path / "k"), str(tmp_path / "out")
    png_pair(vdir, kdir, "a")
    os.makedirs(out)
    open(os.path.join(out, "keep.txt"), "w").write("mine")
    with pytest.raises(ing.IngestError, match="out exists and is not a dataset this tool wrote"):
        ing.ingest(vdir, kdir, out, size=8, clip_frames=2, overwrite=True)
    assert os.listdir(out) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["k", "out", "v"]


def test_dataset_writer_overwrite_replaces_only_datasets(tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(out)
    open(os.path.join(out, "keep.txt"), "w").write("mine")
    with pytest.raises(FileExistsError, match="not a dataset this tool wrote"):
        records.DatasetWriter(out, "x", overwrite=True)
    os.remove(os.path.join(out, "keep.txt"))
    w = records.DatasetWriter(out, "x", overwrite=True)   # empty: allowed ...
    tiny_dataset(str(tmp_path / "src"))
    w.add("train", records.open_split(str(tmp_path / "src"), "train")[0])
    open(os.path.join(out, "keep.txt"), "w").write("mine")  # ... but filled before close()
    with pytest.raises(FileExistsError, match="not a dataset this tool wrote"):
        w.close()
    w.abort()
    assert os.listdir(out) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["out", "src"]


def test_dataset_writer_refuses_empty_clips_and_an_empty_dataset(tmp_path):
    """A clip of 0 frames is refused (its pairs would fail later with a bare numpy message),
    and a `with` block that adds nothing raises and leaves no temporary directory."""
    empty = {"frames": np.zeros((0, 8, 8, 3), np.uint8),
             "keypoints": np.zeros((0, skeleton.NUM_JOINTS, 3), np.float32)}
    with pytest.raises(ValueError, match=r"at least one frame, got \(0, 8, 8, 3\)"):
        records.validate_example(empty)
    with pytest.raises(ValueError, match="no example was written to .*empty; nothing was created"):
        with records.DatasetWriter(str(tmp_path / "empty"), "x"):
            pass
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("out,folder", [("v", "videos"), ("v/ds", "videos"), (".", "videos"),
                                        ("k", "keypoints")])
def test_output_may_not_overlap_the_inputs(tmp_path, capsys, out, folder):
    vdir, kdir = str(tmp_path / "v"), str(tmp_path / "k")
    png_pair(vdir, kdir, "a")
    rc = ing.main(["--videos", vdir, "--keypoints", kdir, "--out", str(tmp_path / out),
                   "--overwrite", "--size", "8", "--clip-frames", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"is, contains or lies inside the {folder} folder" in err
    assert sorted(os.listdir(tmp_path)) == ["k", "v"] and os.listdir(vdir) == ["a"]


def test_unusable_output_is_one_line_before_decoding(tmp_path, capsys):
    vdir, kdir = str(tmp_path / "v"), str(tmp_path / "k")
    png_pair(vdir, kdir, "a")
    open(tmp_path / "file", "w").write("x")
    rc = ing.main(["--videos", vdir, "--keypoints", kdir, "--out",
                   str(tmp_path / "file" / "ds"), "--size", "8", "--clip-frames", "2"])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == "" and len(captured.err.splitlines()) == 1
    assert f"{tmp_path / 'file'} is not a folder" in captured.err
    assert sorted(os.listdir(tmp_path)) == ["file", "k", "v"]
    # missing parent folders are created
    assert ing.main(["--videos", vdir, "--keypoints", kdir, "--out",
                     str(tmp_path / "new" / "sub" / "ds"), "--size", "8", "--clip-frames", "2"]) == 0
    assert records.is_dataset(str(tmp_path / "new" / "sub" / "ds"))


def test_write_failure_is_an_ingest_error_and_leaves_nothing(tmp_path, monkeypatch):
    vdir, kdir, out = str(tmp_path / "v"), str(tmp_path / "k"), str(tmp_path / "out")
    png_pair(vdir, kdir, "a")

    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(records.DatasetWriter, "close", disk_full)
    with pytest.raises(ing.IngestError, match="cannot write dataset .*out: No space left"):
        ing.ingest(vdir, kdir, out, size=8, clip_frames=2)
    assert sorted(os.listdir(tmp_path)) == ["k", "v"]


def test_numpy_scalar_arguments(tmp_path):
    vdir, kdir, out = str(tmp_path / "v"), str(tmp_path / "k"), str(tmp_path / "out")
    png_pair(vdir, kdir, "a")
    ing.ingest(vdir, kdir, out, size=np.int64(8), clip_frames=np.int32(2),
               test_fraction=np.float64(0.0), min_score=np.float32(0.5))
    meta = records.read_index(out)["metadata"]
    numbers = [meta[k] for k in ("size", "clip_frames", "test_fraction", "min_score")]
    assert numbers == [8, 2, 0, 0.5]
    with pytest.raises(ing.IngestError, match=r"test_fraction must be a number in \[0, 1\]"):
        ing.ingest(vdir, kdir, out + "2", test_fraction="0.1")


def test_test_split_hashes_the_name_as_bytes_on_disk():
    # UTF-8 names keep the split existing datasets were made with
    names = ["vid0", "vid1", "café", "über", "舞蹈", "ñandú"]
    assert [ing.is_test_video(n, 0.5) for n in names] == [False, True, False, False, True, True]
    name = os.fsdecode(b"caf\xe9")   # not UTF-8: os.listdir gives it with a surrogate
    assert ing.is_test_video(name, 0.86) and not ing.is_test_video(name, 0.85)   # u = 0.8554


def test_test_fraction_splits_whole_videos(tmp_path):
    names = [f"vid{i}" for i in range(8)]
    assert 0 < sum(ing.is_test_video(n, 0.5) for n in names) < len(names)
    vdir, kdir = str(tmp_path / "v"), str(tmp_path / "k")
    os.makedirs(vdir)
    for n in names:
        good_pair(vdir, kdir, n, n=2 * CLIP)
    report = ing.ingest(vdir, kdir, str(tmp_path / "out"), size=16, clip_frames=CLIP,
                        test_fraction=0.5)
    idx = records.read_index(str(tmp_path / "out"))["splits"]
    test_videos = {e["video"] for e in idx["test"]}
    train_videos = {e["video"] for e in idx["train"]}
    assert test_videos == {n for n in names if ing.is_test_video(n, 0.5)}
    assert train_videos == set(names) - test_videos
    assert all(sum(e["video"] == n for e in idx[s]) == 2
               for s in idx for n in (test_videos if s == "test" else train_videos))
    assert report["clips"] == {"train": 2 * len(train_videos), "test": 2 * len(test_videos)}
    assert len(records.open_split(str(tmp_path / "out"), "test")) == 2 * len(test_videos)
    # the hash rule: deterministic, about the requested fraction, monotone in the fraction
    many = [f"clip_{i}" for i in range(2000)]
    assert abs(np.mean([ing.is_test_video(n, 0.1) for n in many]) - 0.1) < 0.03
    assert all(ing.is_test_video(n, 0.3) for n in many if ing.is_test_video(n, 0.1))
    assert not any(ing.is_test_video(n, 0.0) for n in many)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "data_pipelines.ingest", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_exit_codes(tmp_path):
    vdir, kdir, out = str(tmp_path / "v"), str(tmp_path / "k"), str(tmp_path / "out")
    os.makedirs(vdir)
    good_pair(vdir, kdir, "one", n=CLIP)
    open(os.path.join(vdir, "bad.mp4"), "w").write("nope")
    r = run_cli("--videos", vdir, "--keypoints", kdir, "--out", out, "--size", "16",
                "--clip-frames", str(CLIP))
    assert r.returncode == 0, r.stderr
    assert "ingested 1 videos (1 clips), skipped 1: bad.mp4" in r.stdout
    assert records.is_dataset(out)

    for args in (["--videos", str(tmp_path / "missing"), "--keypoints", kdir, "--out", out + "2"],
                 ["--videos", vdir, "--keypoints", kdir, "--out", out],        # exists
                 ["--videos", vdir, "--keypoints", kdir, "--out", out + "3",
                  "--clip-frames", "9"],                                       # all too short
                 ["--videos", vdir, "--keypoints", kdir, "--out", out + "4", "--size", "big"]):
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not glob.glob(os.path.join(str(tmp_path), "out[234]*"))
