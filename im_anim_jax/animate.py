"""Animate one identity image with the motion of a driving video (needs a stage-3 checkpoint).

  python -m im_anim_jax.animate --config configs/im_animation.py:demo --workdir runs/demo \\
      --image ref.png --driving dance.mp4 --out out.mp4 [--preview p.mp4] [--seed 0] [--overwrite]

Inputs: --image png/jpg/jpeg/webp/bmp; --driving mp4/mov/webm/mkv/avi/gif or a directory of
frames. Both are resized to cover the model's resolution and centre-cropped. Outputs (.mp4 or
.gif): --out, the generated video at the driving video's fps, and --preview (default
OUT_preview.EXT), driving | reference | generated side by side. Both are written all or nothing:
if either fails, neither is created and files they would replace are untouched.
Every flag and input is checked before the model loads. Prints one JSON line
{"out", "preview", "frames", "fps"}, the last two of what --out holds (a GIF over 50 fps keeps
every k-th frame). Exit codes: 0 done, 2 bad input (one `error:` line).
"""
import json
import os

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file (optionally file.py:variant).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "The training workdir holding the stage-3 checkpoint.")
flags.DEFINE_string("image", None, "Reference image of the identity to animate.")
flags.DEFINE_string("driving", None, "Driving video (or directory of frames) giving the motion.")
flags.DEFINE_string("out", None, "Output video (.mp4 or .gif).")
flags.DEFINE_string("preview", None, "Side-by-side preview video (default: OUT_preview.EXT).")
flags.DEFINE_integer("seed", 0, "Sampling seed.", lower_bound=0, upper_bound=2**32 - 1)
flags.DEFINE_integer("max_frames", None, "Animate at most this many driving frames (default: all).",
                     lower_bound=1)
flags.DEFINE_bool("overwrite", False, "Replace existing --out / --preview files.")
flags.mark_flags_as_required(["config", "workdir", "image", "driving", "out"])
FLAGS = flags.FLAGS


def _check_output(flag: str, path: str, overwrite: bool) -> None:
    from im_anim_jax import media
    ext = os.path.splitext(path)[1].lower()
    if ext not in media.WRITE_EXTS:
        raise ValueError(f"--{flag} {path}: unsupported output type {ext or '(none)'!r}; "
                         f"expected one of {', '.join(media.WRITE_EXTS)}")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"--{flag} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):  # also False on a read-only file system
        raise ValueError(f"--{flag} {path}: directory {parent} is not writable")
    if os.path.isdir(path):
        raise ValueError(f"--{flag} {path} is a directory")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"--{flag} {path} exists; pass --overwrite to replace it")


def _same_file(a: str, b: str) -> bool:
    """Whether two paths name one file: the same real path (symlinks resolved), or, both
    existing, one inode (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def _outputs() -> tuple[str, str]:
    """(out, preview) absolute paths, checked: two different files, neither an input (not even
    with --overwrite)."""
    out = os.path.abspath(FLAGS.out)
    stem, ext = os.path.splitext(out)
    preview = os.path.abspath(FLAGS.preview) if FLAGS.preview else f"{stem}_preview{ext}"
    if _same_file(preview, out):
        raise ValueError(f"--preview {preview} and --out {out} are the same file")
    for flag, path in (("out", out), ("preview", preview)):
        for source in ("image", "driving"):
            if _same_file(path, getattr(FLAGS, source)):
                raise ValueError(f"--{flag} {path} is the --{source} input; write elsewhere")
    _check_output("out", out, FLAGS.overwrite)
    _check_output("preview", preview, FLAGS.overwrite)
    return out, preview


def _main(argv):
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]}")
    from im_anim_jax import cli, config_validation, media

    config = cli.load_config(FLAGS)
    problems = config_validation.sampling_problems(config)
    if problems:
        raise ValueError("; ".join(problems))
    workdir = os.path.abspath(FLAGS.workdir)
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"--workdir {workdir} does not exist; train first with train.py")
    out, preview = _outputs()
    from im_anim_jax import generation
    size = generation.resolution(config)  # both inputs decoded whole: fail before the model loads
    reference = media.read_image(FLAGS.image, size)
    driving, fps = media.read_video(FLAGS.driving, size, FLAGS.max_frames)
    animator = generation.Animator.from_workdir(config, workdir)
    video = animator(reference, driving, seed=FLAGS.seed, progress=True)
    try:
        media.write_videos({out: video, preview: media.side_by_side(driving, reference, video)},
                           fps)
    except OSError as e:  # e.g. the disk filled up while encoding: nothing was written
        raise ValueError(f"could not write {out} and {preview} (neither was written; existing "
                         f"files are untouched): {e}") from None
    frames, out_fps = media.stored(out, len(video), fps)
    print(json.dumps({"out": out, "preview": preview, "frames": frames, "fps": out_fps}))


def main(argv):
    from absl import logging

    from im_anim_jax import cli
    if FLAGS.verbosity <= 0:  # Orbax INFO lines drown the progress line; -v 1 shows them
        logging.set_verbosity(logging.WARNING)
    return cli.user_errors(_main)(argv)


if __name__ == "__main__":
    from im_anim_jax import cli
    app.run(main, flags_parser=cli.parse_flags)
