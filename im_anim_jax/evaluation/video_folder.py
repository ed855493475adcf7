"""The input of the self protocol: a folder of videos, checked before anything heavy loads."""
from __future__ import annotations

import os

from im_anim_jax import media


def find_videos(folder: str, frames: int) -> list[str]:
    """Sorted absolute paths of the videos in `folder`: files with a media.VIDEO_EXTS extension
    and folders of image frames (other files are ignored). Each must decode to at least `frames`
    frames; a missing or empty folder or a bad video raises an error naming it."""
    folder = os.path.abspath(folder)
    if not os.path.exists(folder):
        raise FileNotFoundError(f"--videos {folder} does not exist")
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"--videos {folder} is not a directory")
    paths = [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if not n.startswith(".")]
    paths = [p for p in paths
             if os.path.isdir(p) or os.path.splitext(p)[1].lower() in media.VIDEO_EXTS]
    if not paths:
        raise ValueError(f"--videos {folder} holds no videos ({', '.join(media.VIDEO_EXTS)}) or "
                         f"folders of frames; pass the folder that holds them")
    for path in paths:
        have = len(media.read_video(path, media.MIN_SIDE, max_frames=frames)[0])
        if have < frames:
            raise media.MediaError(f"{path} has {have} frames; the self protocol needs "
                                   f"config.stage3.clip_frames = {frames}")
    return paths
