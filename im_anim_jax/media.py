"""Reading and writing user media: a reference image, a driving video, generated videos.

Everything read comes back as float32 RGB in [0, 1], resized to *cover* the requested (H, W) with
the aspect ratio kept, then centre-cropped. Problems with a user's file raise `MediaError` naming
the file, what was wrong and what was expected.
"""
from __future__ import annotations

import fractions
import math
import os
import re
import struct
import uuid

import av
import numpy as np
from PIL import Image, ImageOps, ImageSequence

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_EXTS = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".gif")
WRITE_EXTS = (".mp4", ".gif")
MIN_SIDE = 16  # inputs smaller than this on a side are rejected
DEFAULT_FPS = 25.0
GIF_MAX_FPS = 50  # GIF delays are whole centiseconds; players slow those under 2 cs to 10 cs


class MediaError(ValueError):
    """A user's media file is missing, unsupported, undecodable or unusable."""


def _size(size) -> tuple[int, int]:
    h, w = (size, size) if np.isscalar(size) else size
    if int(h) < 1 or int(w) < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return int(h), int(w)


def _ext(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _require_exists(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise MediaError(f"{what} {path} does not exist")


def _grey8(img: Image.Image) -> Image.Image:
    """16-bit greyscale ("I;16*", or "I" as Pillow 10 opens 16-bit PNGs) -> its top 8 bits ("L",
    or "LA" with its transparent value's pixels at alpha 0), not Pillow's clip at 255."""
    value = np.asarray(img).astype(np.int64)
    grey = Image.fromarray((np.clip(value, 0, 65535) >> 8).astype(np.uint8))
    key = img.info.get("transparency")
    if not isinstance(key, int):
        return grey
    return Image.merge("LA", (grey, Image.fromarray(np.where(value == key, 0, 255).astype(
        np.uint8))))


def _rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited on white."""
    if img.mode.startswith("I;16") or img.mode == "I":
        img = _grey8(img)
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _fit(img: Image.Image, hw: tuple[int, int], path: str) -> np.ndarray:
    """PIL image -> float32 [H, W, 3] in [0, 1], covering (H, W) then centre-cropped."""
    if min(img.size) < MIN_SIDE:
        raise MediaError(f"{path} is too small ({img.width}x{img.height} pixels); "
                         f"at least {MIN_SIDE} pixels on each side are needed")
    fitted = ImageOps.fit(_rgb(img), (hw[1], hw[0]), method=Image.Resampling.LANCZOS)
    return np.asarray(fitted, np.float32) / 255.0


def _open_image(path: str) -> Image.Image:
    """Decoded PIL image, EXIF orientation applied."""
    try:
        with Image.open(path) as img:
            img.load()
            return ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(f"{path} could not be decoded as an image ({type(e).__name__}: {e}); "
                         f"is it a valid {', '.join(IMAGE_EXTS)} file?") from None


def image_frames(paths):
    """Image files -> RGB PIL images (EXIF orientation applied, as `_rgb` converts them).

    Raises MediaError naming the first file whose size differs from the first file's.
    """
    first = None
    for path in paths:
        img = _rgb(_open_image(path))
        first = first or img.size
        if img.size != first:
            raise MediaError(f"{path}: frame size {img.width}x{img.height} differs from the first "
                             f"frame's {first[0]}x{first[1]}; all frames must be the same size")
        yield img


def read_image(path: str, size) -> np.ndarray:
    """Image file -> float32 [H, W, 3] in [0, 1]; size is an int (square) or (H, W).

    Formats: png, jpg/jpeg, webp, bmp. Transparency is composited on white, greyscale becomes
    RGB, EXIF orientation is applied; the image is resized (Lanczos) to cover (H, W) with its
    aspect ratio kept, then centre-cropped.
    """
    hw = _size(size)
    _require_exists(path, "image")
    if os.path.isdir(path) or _ext(path) not in IMAGE_EXTS:
        raise MediaError(f"{path}: unsupported image type; expected one of {', '.join(IMAGE_EXTS)}")
    return _fit(_open_image(path), hw, path)


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _frame_dir(path: str, hw, max_frames):
    names = sorted((n for n in os.listdir(path) if _ext(n) in IMAGE_EXTS
                    and not n.startswith(".") and os.path.isfile(os.path.join(path, n))),
                   key=_natural_key)
    if not names:
        raise MediaError(f"directory {path} contains no image frames "
                         f"({', '.join(IMAGE_EXTS)})")
    paths = [os.path.join(path, n) for n in names[:max_frames]]
    frames = (_fit(img, hw, f) for f, img in zip(paths, image_frames(paths)))
    return frames, DEFAULT_FPS


def _gif(path: str, hw, max_frames):
    """GIF -> (frame iterator, fps() from the mean frame duration, known once iterated)."""
    durations = []

    def frames():
        with Image.open(path) as img:
            try:
                for i, frame in enumerate(ImageSequence.Iterator(img)):
                    if i == max_frames:
                        return
                    durations.append(frame.info.get("duration", 0))
                    yield _fit(frame, hw, path)
            # Pillow's GIF seek reads past the end of a truncated frame header without a check.
            except (IndexError, struct.error) as e:
                raise OSError(f"truncated GIF frame {len(durations)} ({type(e).__name__}: "
                              f"{e})") from None

    def fps():
        return _delay_fps(durations) or DEFAULT_FPS
    return frames(), fps


def _delay_fps(delays) -> float | None:
    """A GIF's frame rate from its frame delays (ms); None when any is missing or 0."""
    return 1000.0 / float(np.mean(delays)) if min(delays, default=0) > 0 else None


def _stream_fps(stream) -> float | None:
    """A PyAV video stream's declared frame rate, or None."""
    rate = stream.average_rate or stream.guessed_rate
    return float(rate) if rate else None


def display_frames(container, stream):
    """Decoded frames of a PyAV video `stream` -> RGB PIL images in display orientation."""
    for frame in container.decode(stream):
        img = frame.to_image()
        if frame.rotation:  # phone videos: the display matrix says how to turn the frame
            img = img.rotate(frame.rotation, expand=True)
        yield img


def _av_frames(container, stream, hw, path, max_frames):
    for i, img in enumerate(display_frames(container, stream)):
        if i == max_frames:
            return
        yield _fit(img, hw, path)


def _av(path: str, hw, max_frames):
    """Video container -> (frame iterator, fps); the container closes when the iterator ends."""
    container = av.open(path)
    if not container.streams.video:
        fmt = container.format.name
        container.close()
        raise MediaError(f"{path} could not be decoded as a video: it has no video stream "
                         f"(FFmpeg read it as '{fmt}')")
    stream = container.streams.video[0]
    fps = _stream_fps(stream) or DEFAULT_FPS

    def frames():
        with container:
            yield from _av_frames(container, stream, hw, path, max_frames)
    return frames(), fps


def declared_fps(path: str) -> float | None:
    """A video file's frame rate as `read_video` reads it (a GIF's from its frame delays),
    without decoding the frames; None for a folder of frames, or a file that declares none or
    whose rate cannot be read."""
    if os.path.isdir(path):
        return None
    try:
        if _ext(path) == ".gif":
            with Image.open(path) as img:
                return _delay_fps([f.info.get("duration", 0) for f in ImageSequence.Iterator(img)])
        with av.open(path) as container:
            return _stream_fps(container.streams.video[0])
    # Pillow's GIF seek reads past a truncated frame header without a check (see _gif)
    except (av.FFmpegError, OSError, SyntaxError, IndexError, struct.error):
        return None


def read_video(path: str, size, max_frames: int | None = None):
    """Video file or frame directory -> (float32 [T, H, W, 3] in [0, 1], fps).

    Formats: mp4, mov, webm, mkv, avi (PyAV), gif (fps from its frame durations), or a directory
    of same-size image frames in natural order (frame2 before frame10, fps 25). Frames are
    resized as `read_image` does while decoding, so only the resized video is held; at most
    `max_frames` frames are read.
    """
    hw = _size(size)
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    _require_exists(path, "video")
    if os.path.isdir(path):
        reader = _frame_dir
    elif _ext(path) in VIDEO_EXTS:
        reader = _gif if _ext(path) == ".gif" else _av
    else:
        raise MediaError(f"{path}: unsupported video type; expected one of "
                         f"{', '.join(VIDEO_EXTS)} or a directory of image frames")
    try:
        frames, fps = reader(path, hw, max_frames)
        video = list(frames)
    # UnicodeDecodeError: PyAV decodes the container's metadata tags as UTF-8 when opening it.
    except (av.FFmpegError, OSError, SyntaxError, UnicodeDecodeError,
            Image.DecompressionBombError) as e:
        raise MediaError(f"{path} could not be decoded as a video ({type(e).__name__}: {e}); "
                         f"is it a valid {', '.join(VIDEO_EXTS)} file?") from None
    if not video:
        raise MediaError(f"{path} contains no video frames")
    return np.stack(video), float(fps() if callable(fps) else fps)


def _uint8(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return frames
    return np.round(np.clip(frames, 0.0, 1.0) * 255.0).astype(np.uint8)


def _check_video(path: str, frames, fps) -> np.ndarray:
    if _ext(path) not in WRITE_EXTS:
        raise MediaError(f"{path}: cannot write this video type; expected one of "
                         f"{', '.join(WRITE_EXTS)}")
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"{path}: frames must be [T>0, H, W, 3], got shape {frames.shape}")
    if not fps > 0:
        raise ValueError(f"{path}: fps must be positive, got {fps}")
    return frames


def _write_mp4(path: str, frames: np.ndarray, fps: float) -> None:
    """H.264 yuv420p; odd heights/widths get one edge-replicated row/column (4:2:0 needs even)."""
    t, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with av.open(path, mode="w", format="mp4") as container:
        rate = fractions.Fraction(fps).limit_denominator(1001)  # NTSC 29.97002997 -> 30000/1001
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = w + w % 2, h + h % 2
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def gif_step(fps: float) -> int:
    """k: a GIF of a clip at `fps` keeps every k-th frame (its rate fps / k is at most 50)."""
    return max(1, math.ceil(fps / GIF_MAX_FPS - 1e-9))


def stored(path: str, frames: int, fps: float) -> tuple[int, float]:
    """(frames, fps) of what write_videos stores at `path` for a clip of `frames` at `fps`."""
    step = gif_step(fps) if _ext(path) == ".gif" else 1
    return -(-frames // step), fps / step


def _write_gif(path: str, frames: np.ndarray, fps: float) -> None:
    """Looping GIF. Its delays are whole centiseconds, and players slow delays under 2 cs to
    10 cs, so over 50 fps only every k-th frame is kept (k = ceil(fps / 50)). Each delay is the
    frame's span on the clip's own clock rounded to centiseconds (30 fps: 3, 3, 4, ...), so the
    GIF plays as long as the clip. Pillow merges identical consecutive frames into one longer
    frame."""
    step = gif_step(fps)
    frames = frames[::step]
    ticks = np.round(np.arange(len(frames) + 1) * (100.0 * step / fps))
    delays = [10 * max(2, int(d)) for d in np.diff(ticks)]  # ms, as Pillow takes them
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:],
                   duration=delays, loop=0)


def _temp_sibling(path: str) -> str:
    head, name = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(name)
    return os.path.join(head, f".{stem}.tmp-{uuid.uuid4().hex[:8]}{ext}")


def write_atomic(path: str, write) -> None:
    """write(temp) to a temporary sibling of `path` (same extension), then os.replace onto it:
    a reader never sees half a file; on failure the temporary file is removed and `path` kept."""
    temp = _temp_sibling(path)
    try:
        write(temp)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def write_videos(videos: dict, fps: float) -> None:
    """{path: frames [T, H, W, 3] (uint8, or float in [0, 1])} -> files, all or nothing.

    Each video is encoded to a temporary file next to its destination; only when every encode
    succeeded are they moved into place (os.replace). On failure the temporary files are removed
    and existing files at the destinations are untouched.
    """
    checked = {path: _check_video(path, frames, fps) for path, frames in videos.items()}
    temps = {}
    try:
        for path, frames in checked.items():
            temps[path] = _temp_sibling(path)
            writer = _write_gif if _ext(path) == ".gif" else _write_mp4
            writer(temps[path], _uint8(frames), float(fps))
        for path, temp in temps.items():
            os.replace(temp, path)
    finally:
        for temp in temps.values():
            if os.path.exists(temp):
                os.remove(temp)


def write_video(path: str, frames, fps: float) -> None:
    """frames [T, H, W, 3] (uint8, or float in [0, 1]) -> .mp4 (H.264, yuv420p) or .gif,
    written atomically (see `write_videos`)."""
    write_videos({path: frames}, fps)


def _to_height(clip: np.ndarray, height: int) -> np.ndarray:
    if clip.shape[1] == height:
        return clip
    width = max(1, round(clip.shape[2] * height / clip.shape[1]))
    size = (width, height)
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BICUBIC))
                     for f in clip])


def side_by_side(*clips, gap: int = 4) -> np.ndarray:
    """Clips [T_i, H_i, W_i, 3] or images [H, W, 3] (uint8, or float in [0, 1]) -> uint8
    [T, H, W_total, 3]: heights resized to the tallest, T = max T_i (shorter clips hold their last
    frame), white `gap`-pixel columns between them."""
    if not clips:
        raise ValueError("side_by_side needs at least one clip")
    clips = [_uint8(c)[None] if np.ndim(c) == 3 else _uint8(c) for c in clips]
    for c in clips:
        if c.ndim != 4 or c.shape[-1] != 3 or c.shape[0] == 0:
            raise ValueError(f"side_by_side: expected [T, H, W, 3] or [H, W, 3], got {c.shape}")
    height, length = max(c.shape[1] for c in clips), max(c.shape[0] for c in clips)
    clips = [_to_height(c, height) for c in clips]
    clips = [np.concatenate([c, np.repeat(c[-1:], length - len(c), 0)]) for c in clips]
    white = np.full((length, height, gap, 3), 255, np.uint8)
    parts = [p for c in clips for p in (white, c)][1:]
    return np.concatenate(parts, axis=2)
