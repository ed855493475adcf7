"""Train IM-Animation stage by stage, then evaluate.

  python train.py --config configs/demo.py --workdir runs/demo            # all stages + report
  python train.py --config configs/demo.py --workdir W --stages 1         # stage 1 only
  python train.py --config configs/im_animation.py:paper --workdir W --config.stage1.lr=5e-5

Rerunning the same command resumes every stage from its newest checkpoint (data order included).
Exit codes: 0 done; 2 bad input or config (one message naming every config problem, before any
compilation), or more than faults.max_bad_records unreadable training records; 3 stopped by
SIGTERM/SIGINT after checkpointing the finished step; 4 faults.max_nonfinite_in_a_row steps in a
row with a non-finite loss or gradients (skipped; no new checkpoint); 5 a checkpoint could not be
written (disk full, ...; the older checkpoints are intact). `kill -9` at any moment: rerunning
resumes from the newest complete checkpoint (Orbax finalises a checkpoint by renaming its temp
directory, so a half-written one is never restored).
"""
import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file (optionally file.py:variant).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for data, checkpoints, metrics and reports.")
flags.DEFINE_string("stages", None, "Comma-separated stages to run (default: config.stages).")
flags.DEFINE_bool("eval", True, "Evaluate every stage that was trained, into WORKDIR/eval.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _main(argv):
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]}")
    from data_pipelines import datasets  # heavy imports after flag parsing
    from im_anim_jax import cli, config_validation, distributed
    from im_anim_jax.evaluation import stage1 as stage1_eval
    from im_anim_jax.evaluation import stage2 as stage2_eval
    from im_anim_jax.evaluation import stage3 as stage3_eval
    from im_anim_jax.training import stage1, stage2, stage3

    distributed.initialize()  # multi-host: from the environment, before any other JAX work
    config, workdir = cli.load_config(FLAGS), os.path.abspath(FLAGS.workdir)
    stages = cli.parse_stages(FLAGS.stages, config.stages)
    # before any data, model or compile
    config_validation.validate(config, stages, workdir, evaluating=FLAGS.eval)
    os.makedirs(workdir, exist_ok=True)
    data_path = datasets.resolve(config, workdir)
    trainers = {1: stage1.train, 2: stage2.train, 3: stage3.train}
    evaluators = {1: stage1_eval.evaluate, 2: stage2_eval.evaluate, 3: stage3_eval.evaluate}
    for s in stages:
        trainers[s](config, workdir, data_path)
        if FLAGS.eval:
            result = evaluators[s](config, workdir, data_path)
            print(f"[eval] stage {s}: " + json.dumps(result))
    print(f"[train] done; reports in {os.path.join(workdir, 'eval')}")


def main(argv):
    from absl import logging

    from im_anim_jax import cli
    from im_anim_jax.training import loop
    if FLAGS.verbosity <= 0:  # Orbax/TFDS INFO lines drown the progress line; -v 1 shows them
        logging.set_verbosity(logging.WARNING)
    try:
        return cli.user_errors(_main)(argv)
    except (loop.Diverged, loop.CheckpointFailed) as e:
        logging.flush()
        print(f"error: {e.message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        if isinstance(e, loop.CheckpointFailed):
            os._exit(e.code)  # not a teardown that waits on Orbax's failed writer threads
        raise


if __name__ == "__main__":
    from im_anim_jax import cli
    app.run(main, flags_parser=cli.parse_flags)
