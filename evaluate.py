"""Evaluate a trained stage on held-out identities; prints one JSON line.

  python evaluate.py --config configs/demo.py --workdir runs/demo --stage 1
writes WORKDIR/eval/stage1.json and WORKDIR/eval/stage1.png (driving | GT | predicted heatmaps);
  --stage 2 writes WORKDIR/eval/stage2.json (cross-identity PCK of the retargeter and of every
baseline, identity-leakage probe) and WORKDIR/eval/stage2.png. --stage 3 evaluates the model and
its two baselines (L1, PSNR*, SSIM, LPIPS, FID, FVD, motion PCK) under a protocol:
  --protocol cross (default): held-out cross-identity pairs of the run's data; writes
    WORKDIR/eval/stage3.json (+ per-window drift over a long clip), stage3.png, eval/stage3_videos;
  --protocol self --videos DIR: each video of DIR animates its own first frame; writes
    WORKDIR/eval/stage3_self.json, stage3_self.png, eval/stage3_self_videos.
Both then refresh WORKDIR/eval/table.md (the paper's table per protocol), stage3_history.jsonl and
stage3_metrics.png (figures against checkpoint step). --all_checkpoints evaluates every kept
stage-3 checkpoint, oldest first (one JSON line each; the reports and videos left are the
newest's, the history and its plot hold them all). LPIPS/FID/FVD need converted networks
(--config.eval.metric_weights.{lpips,inception,i3d}=DIR); without them the JSON says
"not computed: ..." in place of the number.
"""
import json
import os

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file (optionally file.py:variant).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "The training workdir.")
flags.DEFINE_integer("stage", 1, "Which stage to evaluate.")
flags.DEFINE_enum("protocol", "cross", ["cross", "self"],
                  "Stage-3 protocol: cross (held-out cross-identity pairs) or self (--videos).")
flags.DEFINE_string("videos", None, "--protocol self: a folder of videos (mp4/mov/webm/mkv/avi/"
                    "gif) or folders of frames; each animates its own first frame.")
flags.DEFINE_bool("all_checkpoints", False, "--stage 3: evaluate every kept stage-3 checkpoint "
                  "(oldest first), not only the newest.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _check_protocol() -> None:
    if FLAGS.stage != 3 and (FLAGS["protocol"].present or FLAGS.videos is not None
                             or FLAGS.all_checkpoints):
        raise ValueError(f"--protocol, --videos and --all_checkpoints apply to --stage 3, not "
                         f"--stage {FLAGS.stage}")
    if FLAGS.protocol == "self" and not FLAGS.videos:
        raise ValueError("--protocol self needs --videos DIR (a folder of videos or of folders "
                         "of frames)")
    if FLAGS.protocol == "cross" and FLAGS.videos is not None:
        raise ValueError("--videos is read by --protocol self only; the cross protocol uses the "
                         "run's held-out data")


def _main(argv):
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]}")
    from im_anim_jax import cli, distributed
    from im_anim_jax.evaluation import video_folder

    distributed.initialize()  # multi-host: from the environment, before any other JAX work
    if FLAGS.stage not in cli.IMPLEMENTED_STAGES:
        raise ValueError(f"--stage {FLAGS.stage}: the stages are {cli.IMPLEMENTED_STAGES}")
    _check_protocol()
    config = cli.load_config(FLAGS)
    from im_anim_jax import config_validation
    config_validation.raise_if_any(config_validation.evaluation_problems(config, FLAGS.stage))
    workdir = os.path.abspath(FLAGS.workdir)
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"--workdir {workdir} does not exist; train first with train.py")
    steps = [None]  # the newest
    if FLAGS.all_checkpoints:
        from im_anim_jax.training import checkpointing, stage3
        steps = checkpointing.all_steps(stage3.stage_dir(workdir)) or [None]  # None: its error
    if FLAGS.protocol == "self":  # the videos are checked before the heavy imports
        paths = video_folder.find_videos(FLAGS.videos, config.stage3.clip_frames)
        from im_anim_jax.evaluation import stage3_self
        for step in steps:
            print(json.dumps(stage3_self.evaluate(config, workdir, paths, step=step)))
        return
    from data_pipelines import datasets
    from im_anim_jax.evaluation import stage1 as stage1_eval
    from im_anim_jax.evaluation import stage2 as stage2_eval
    from im_anim_jax.evaluation import stage3 as stage3_eval

    data_path = datasets.resolve(config, workdir)
    if FLAGS.stage == 3:
        for step in steps:
            print(json.dumps(stage3_eval.evaluate(config, workdir, data_path, step=step)))
        return
    evaluate = {1: stage1_eval.evaluate, 2: stage2_eval.evaluate}[FLAGS.stage]
    print(json.dumps(evaluate(config, workdir, data_path)))


def main(argv):
    from absl import logging

    from im_anim_jax import cli
    if FLAGS.verbosity <= 0:  # Orbax/TFDS INFO lines drown the progress line; -v 1 shows them
        logging.set_verbosity(logging.WARNING)
    return cli.user_errors(_main)(argv)


if __name__ == "__main__":
    from im_anim_jax import cli
    app.run(main, flags_parser=cli.parse_flags)
