"""Evaluate a trained stage on held-out identities; prints one JSON line.

  python evaluate.py --config configs/demo.py --workdir runs/demo --stage 1
writes WORKDIR/eval/stage1.json and WORKDIR/eval/stage1.png (driving | GT | predicted heatmaps);
  --stage 2 writes WORKDIR/eval/stage2.json (cross-identity PCK of the retargeter and of every
baseline, identity-leakage probe) and WORKDIR/eval/stage2.png; --stage 3 writes
WORKDIR/eval/stage3.json (cross-reenactment PSNR*, SSIM, motion PCK of the model and its two
baselines; per-window drift over a long clip), stage3.png and the videos in eval/stage3_videos.
"""
import json
import os

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file (optionally file.py:variant).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "The training workdir.")
flags.DEFINE_integer("stage", 1, "Which stage to evaluate.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _main(argv):
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]}")
    from data_pipelines import datasets
    from im_anim_jax import cli
    from im_anim_jax.evaluation import stage1 as stage1_eval
    from im_anim_jax.evaluation import stage2 as stage2_eval
    from im_anim_jax.evaluation import stage3 as stage3_eval

    if FLAGS.stage not in cli.IMPLEMENTED_STAGES:
        raise ValueError(f"--stage {FLAGS.stage}: the stages are {cli.IMPLEMENTED_STAGES}")
    config = cli.load_config(FLAGS)
    workdir = os.path.abspath(FLAGS.workdir)
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"--workdir {workdir} does not exist; train first with train.py")
    data_path = datasets.resolve(config, workdir)
    evaluate = {1: stage1_eval.evaluate, 2: stage2_eval.evaluate,
                3: stage3_eval.evaluate}[FLAGS.stage]
    result = evaluate(config, workdir, data_path)
    print(json.dumps(result))


def main(argv):
    from absl import logging

    from im_anim_jax import cli
    if FLAGS.verbosity <= 0:  # Orbax/TFDS INFO lines drown the progress line; -v 1 shows them
        logging.set_verbosity(logging.WARNING)
    return cli.user_errors(_main)(argv)


if __name__ == "__main__":
    from im_anim_jax import cli
    app.run(main, flags_parser=cli.parse_flags)
