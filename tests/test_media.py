"""im_anim_jax.media: reading user images/videos, atomic video writing, side-by-side panels."""
import os

import av
import numpy as np
import pytest
from PIL import Image, ImageSequence

from im_anim_jax import media
from im_anim_jax.media import MediaError

RED, BLUE = (255, 0, 0), (0, 0, 255)


def halves(h, w, left=RED, right=BLUE):
    """uint8 [h, w, 3]: left half `left`, right half `right`."""
    img = np.empty((h, w, 3), np.uint8)
    img[:, : w // 2], img[:, w // 2:] = left, right
    return img


def ramp(t, h, w):
    """uint8 [t, h, w, 3] whose frame i has brightness ~ 20 * i (distinct frames)."""
    return np.broadcast_to((20 * np.arange(t) + 30).astype(np.uint8)[:, None, None, None],
                           (t, h, w, 3)).copy()


def brightness(video):
    return video.mean(axis=(1, 2, 3)) * 255


@pytest.mark.parametrize("ext", [".png", ".jpg", ".jpeg", ".webp", ".bmp"])
def test_read_image_formats(tmp_path, ext):
    path = str(tmp_path / f"im{ext}")
    Image.fromarray(halves(40, 40)).save(path, quality=95)
    img = media.read_image(path, 20)
    assert img.shape == (20, 20, 3) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
    np.testing.assert_allclose(img[:, :8], np.broadcast_to([1, 0, 0], (20, 8, 3)), atol=0.1)
    np.testing.assert_allclose(img[:, 12:], np.broadcast_to([0, 0, 1], (20, 8, 3)), atol=0.1)


def test_read_image_covers_then_centre_crops(tmp_path):
    # 60 x 120 (H x W): green | red | blue | yellow quarters. Covering 32 x 32 scales to 32 x 64
    # and keeps the middle: red | blue.
    img = np.empty((60, 120, 3), np.uint8)
    for i, c in enumerate([(0, 255, 0), RED, BLUE, (255, 255, 0)]):
        img[:, 30 * i: 30 * (i + 1)] = c
    path = str(tmp_path / "wide.png")
    Image.fromarray(img).save(path)
    out = media.read_image(path, 32)
    assert out.shape == (32, 32, 3)
    np.testing.assert_allclose(out[:, 2:14], np.broadcast_to([1, 0, 0], (32, 12, 3)), atol=0.05)
    np.testing.assert_allclose(out[:, 18:30], np.broadcast_to([0, 0, 1], (32, 12, 3)), atol=0.05)
    # (H, W) size on a tall image: 120 x 60 covering 20 x 40 -> 80 x 40, middle 20 rows kept.
    tall = np.zeros((120, 60, 3), np.uint8)
    tall[:60] = 255
    Image.fromarray(tall).save(path)
    out = media.read_image(path, (20, 40))
    assert out.shape == (20, 40, 3)
    assert out[:8].min() > 0.9 and out[12:].max() < 0.1


def test_read_image_alpha_grey_and_16_bit(tmp_path):
    rgba = np.zeros((20, 20, 4), np.uint8)  # transparent black -> white
    rgba[:, 10:] = (0, 0, 255, 255)          # opaque blue stays blue
    Image.fromarray(rgba).save(tmp_path / "a.png")
    img = media.read_image(str(tmp_path / "a.png"), 20)
    np.testing.assert_allclose(img[:, :8], 1.0, atol=0.02)
    np.testing.assert_allclose(img[:, 12:], np.broadcast_to([0, 0, 1], (20, 8, 3)), atol=0.02)
    Image.fromarray(np.full((20, 20), 128, np.uint8)).save(tmp_path / "g.png")
    np.testing.assert_allclose(media.read_image(str(tmp_path / "g.png"), 20), 128 / 255, atol=1e-6)
    Image.fromarray(np.full((20, 20), 32768, np.uint16)).save(tmp_path / "g16.png")
    np.testing.assert_allclose(media.read_image(str(tmp_path / "g16.png"), 20), 128 / 255,
                               atol=1e-6)


def test_read_16_bit_grey_with_a_transparent_value_and_as_mode_i(tmp_path):
    """16-bit greyscale keeps its top 8 bits (Pillow's RGB/RGBA conversions clip it to white)
    when a tRNS value is set, and in mode "I" (how Pillow 10 opens 16-bit PNGs)."""
    grey = np.full((20, 20), 30000, np.uint16)
    grey[:, 10:] = 5  # the transparent value -> white
    Image.fromarray(grey).save(tmp_path / "t.png", transparency=5)
    img = media.read_image(str(tmp_path / "t.png"), 20)
    np.testing.assert_allclose(img[:, :8], (30000 >> 8) / 255, atol=1e-6)
    np.testing.assert_allclose(img[:, 12:], 1.0, atol=1e-6)
    as_i = Image.fromarray(np.full((20, 20), 30000, np.int32), mode="I")
    np.testing.assert_allclose(np.asarray(media._rgb(as_i)), 30000 >> 8)


def test_mp4_round_trip(tmp_path):
    path = str(tmp_path / "v.mp4")
    media.write_video(path, ramp(6, 32, 48), fps=12)
    video, fps = media.read_video(path, (16, 24))
    assert video.shape == (6, 16, 24, 3) and video.dtype == np.float32 and fps == 12
    np.testing.assert_allclose(brightness(video), 20 * np.arange(6) + 30, atol=3)
    short, _ = media.read_video(path, 16, max_frames=2)
    assert short.shape == (2, 16, 16, 3)


def test_mp4_odd_size_and_float_frames(tmp_path):
    path = str(tmp_path / "odd.mp4")
    media.write_video(path, np.full((3, 33, 47, 3), 0.5, np.float32), fps=29.97)
    with av.open(path) as c:
        stream = c.streams.video[0]
        assert (stream.height, stream.width) == (34, 48)
        assert abs(float(stream.average_rate) - 29.97) < 0.01
    video, _ = media.read_video(path, 32)
    np.testing.assert_allclose(video, 0.5, atol=0.02)


def test_gif_round_trip(tmp_path):
    path = str(tmp_path / "v.gif")
    media.write_video(path, ramp(5, 20, 20), fps=10)
    video, fps = media.read_video(path, 20)
    assert video.shape == (5, 20, 20, 3) and fps == pytest.approx(10)
    np.testing.assert_allclose(brightness(video), 20 * np.arange(5) + 30, atol=3)


@pytest.mark.parametrize("fps, delays", [(30, [3, 4, 3, 3, 4, 3, 3]), (60, [3, 4, 3, 3]),
                                          (120, [2, 3, 3]), (50, [2] * 7)])
def test_gif_delays_keep_the_clip_s_duration(tmp_path, fps, delays):
    """GIF delays are whole centiseconds and players slow those under 2 cs to 10 cs: over
    50 fps only every k-th frame is kept (60 fps: 2nd, 120: 3rd), and the delays (cs) follow
    the clip's clock (30 fps: 23 cs for 7 frames; before, 3 cs each, 10% fast)."""
    path = str(tmp_path / "v.gif")
    media.write_video(path, ramp(7, 20, 20), fps=fps)
    with Image.open(path) as img:
        assert [f.info["duration"] // 10 for f in ImageSequence.Iterator(img)] == delays
    assert media.stored(path, 7, fps) == (len(delays), {30: 30, 60: 30, 120: 40, 50: 50}[fps])
    assert media.stored(str(tmp_path / "v.mp4"), 7, fps) == (7, fps)


def test_gif_without_durations_is_25_fps(tmp_path):
    frames = [Image.fromarray(f) for f in ramp(3, 20, 20)]
    frames[0].save(tmp_path / "v.gif", save_all=True, append_images=frames[1:])
    video, fps = media.read_video(str(tmp_path / "v.gif"), 20)
    assert len(video) == 3 and fps == 25


def test_frame_directory_natural_order(tmp_path):
    frames = ramp(12, 20, 20)
    for i in range(12):  # frame2 must come before frame10
        Image.fromarray(frames[i]).save(tmp_path / f"frame{i}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    (tmp_path / "frame99.png").mkdir()  # a directory named like a frame is not one
    video, fps = media.read_video(str(tmp_path), 20)
    assert video.shape == (12, 20, 20, 3) and fps == 25
    np.testing.assert_allclose(brightness(video), 20 * np.arange(12) + 30, atol=1e-3)
    assert len(media.read_video(str(tmp_path), 20, max_frames=4)[0]) == 4


def test_frame_directory_of_mixed_sizes_is_refused(tmp_path):
    Image.fromarray(ramp(1, 20, 20)[0]).save(tmp_path / "frame0.png")
    Image.fromarray(ramp(1, 20, 24)[0]).save(tmp_path / "frame1.png")
    with pytest.raises(MediaError, match=r"frame1.png: frame size 24x20 differs from the first "
                                         r"frame's 20x20"):
        media.read_video(str(tmp_path), 16)


@pytest.mark.parametrize("ext", [".mp4", ".gif"])
def test_failed_write_leaves_existing_file_and_no_temp(tmp_path, monkeypatch, ext):
    path = tmp_path / f"out{ext}"
    path.write_bytes(b"previous result")
    writer = "_write_gif" if ext == ".gif" else "_write_mp4"
    real = getattr(media, writer)

    def encode_then_fail(temp, frames, fps):
        real(temp, frames, fps)  # a full temporary file exists when the failure hits
        raise RuntimeError("disk full")
    monkeypatch.setattr(media, writer, encode_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        media.write_video(str(path), ramp(3, 16, 16), fps=10)
    assert path.read_bytes() == b"previous result"
    assert os.listdir(tmp_path) == [path.name]


def test_write_videos_is_all_or_nothing(tmp_path, monkeypatch):
    real = media._write_gif
    monkeypatch.setattr(media, "_write_gif", lambda *a: (real(*a), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        media.write_videos({str(tmp_path / "a.mp4"): ramp(2, 16, 16),
                            str(tmp_path / "b.gif"): ramp(2, 16, 16)}, fps=10)
    assert os.listdir(tmp_path) == []


def test_png_report_written_atomically(tmp_path, monkeypatch):
    from im_anim_jax import visualize
    path = tmp_path / "stage3.png"
    visualize.write_png(str(path), np.full((4, 6, 3), 200, np.uint8))
    before = path.read_bytes()

    def crash(temp, image):
        open(temp, "wb").write(b"\x89PNG half")
        raise OSError("No space left on device")
    monkeypatch.setattr(visualize.iio, "imwrite", crash)
    with pytest.raises(OSError, match="No space left"):
        visualize.write_png(str(path), np.zeros((4, 6, 3), np.uint8))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["stage3.png"]


def test_write_video_replaces_existing(tmp_path):
    path = tmp_path / "out.mp4"
    path.write_bytes(b"old")
    media.write_video(str(path), ramp(2, 16, 16), fps=10)
    assert len(media.read_video(str(path), 16)[0]) == 2 and os.listdir(tmp_path) == ["out.mp4"]


def test_side_by_side():
    a = np.zeros((3, 20, 10, 3), np.uint8)
    b = np.ones((10, 10, 3), np.float32)    # an image, half the height: resized to 20 x 20
    c = ramp(5, 20, 6)
    panel = media.side_by_side(a, b, c, gap=2)
    assert panel.shape == (5, 20, 10 + 2 + 20 + 2 + 6, 3) and panel.dtype == np.uint8
    assert (panel[:, :, 10:12] == 255).all() and (panel[:, :, 12:32] == 255).all()
    assert (panel[3:, :, :10] == 0).all()             # a holds its last frame
    np.testing.assert_array_equal(panel[:, :, 34:], c)


def test_missing_paths(tmp_path):
    with pytest.raises(MediaError, match="image .*nope.png does not exist"):
        media.read_image(str(tmp_path / "nope.png"), 16)
    with pytest.raises(MediaError, match="video .*nope.mp4 does not exist"):
        media.read_video(str(tmp_path / "nope.mp4"), 16)


def test_directory_without_images(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(MediaError, match="contains no image frames"):
        media.read_video(str(tmp_path), 16)


def test_unsupported_extensions(tmp_path):
    (tmp_path / "a.tiff").write_bytes(b"x")
    with pytest.raises(MediaError, match=r"a.tiff: unsupported image type; expected one of .png"):
        media.read_image(str(tmp_path / "a.tiff"), 16)
    with pytest.raises(MediaError, match=r"unsupported video type; expected one of .mp4.*dir"):
        media.read_video(str(tmp_path / "a.tiff"), 16)
    with pytest.raises(MediaError, match=r"cannot write this video type; expected .*.mp4, .gif"):
        media.write_video(str(tmp_path / "o.avi"), ramp(2, 16, 16), fps=10)
    assert sorted(os.listdir(tmp_path)) == ["a.tiff"]


@pytest.mark.parametrize("name", ["bad.png", "bad.jpg", "bad.mp4", "bad.gif", "bad.webm"])
def test_corrupt_files(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    read = media.read_image if name.endswith((".png", ".jpg")) else media.read_video
    with pytest.raises(MediaError, match=f"{name} could not be decoded as an? (image|video)"):
        read(str(path), 16)


def test_truncated_gif_at_every_length(tmp_path):
    """Cutting a 3-frame GIF anywhere gives its frames or a MediaError; Pillow's own IndexError and
    struct.error from a cut frame header (found by the CI fuzz test) must not escape."""
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 255, (24, 24, 3), np.uint8)) for _ in range(3)]
    frames[0].save(tmp_path / "v.gif", save_all=True, append_images=frames[1:], duration=40)
    data = (tmp_path / "v.gif").read_bytes()
    outcomes = set()
    for n in range(len(data)):
        (tmp_path / "cut.gif").write_bytes(data[:n])
        try:
            video, _ = media.read_video(str(tmp_path / "cut.gif"), 16)
            assert video.shape[1:] == (16, 16, 3) and 1 <= len(video) <= 3
            outcomes.add("frames")
        except MediaError as e:
            assert "cut.gif could not be decoded as a video" in str(e) or "no video frames" in str(e)
            outcomes.add("error")
    assert outcomes == {"frames", "error"}


def _header_only(path, codec):
    """A container with a video stream but no frames."""
    with av.open(path, mode="w") as c:
        s = c.add_stream(codec, rate=10)
        s.width, s.height, s.pix_fmt = 16, 16, "yuv420p"
        c.start_encoding()


def test_empty_video(tmp_path):
    _header_only(str(tmp_path / "empty.avi"), "mpeg4")
    with pytest.raises(MediaError, match="empty.avi contains no video frames"):
        media.read_video(str(tmp_path / "empty.avi"), 16)
    _header_only(str(tmp_path / "empty.mp4"), "libx264")  # mp4 drops a stream without packets
    with pytest.raises(MediaError, match="empty.mp4 could not be decoded as a video: it has no video stream"):
        media.read_video(str(tmp_path / "empty.mp4"), 16)


def test_too_small(tmp_path):
    Image.fromarray(np.zeros((8, 40, 3), np.uint8)).save(tmp_path / "s.png")
    with pytest.raises(MediaError, match=r"s.png is too small \(40x8 pixels\); at least 16"):
        media.read_image(str(tmp_path / "s.png"), 32)
    media.write_video(str(tmp_path / "s.mp4"), ramp(2, 8, 8), fps=10)
    with pytest.raises(MediaError, match="s.mp4 is too small"):
        media.read_video(str(tmp_path / "s.mp4"), 32)
