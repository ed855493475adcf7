"""CLI: python -m im_anim_jax.convert {titok,wan-dit,wan-vae,clip-vit,...} --src FILE --dst DIR."""
from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

import im_anim_jax
from im_anim_jax import cli
from im_anim_jax.convert import KINDS, convert

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    im_anim_jax.__file__))), "configs", "im_animation.py") + ":paper"
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG,
                                "Config whose `model` section sizes the target model.")
flags.DEFINE_string("src", None, "Official checkpoint: .pth/.bin/.safetensors, a sharded "
                                 "*.safetensors.index.json, or a directory holding one.")
flags.DEFINE_string("dst", None, "Output directory (Orbax params + meta.json).")
flags.DEFINE_bool("overwrite", False, "Replace an existing --dst.")
FLAGS = flags.FLAGS
USAGE = f"usage: python -m im_anim_jax.convert {{{','.join(KINDS)}}} --src FILE --dst DIR"


@cli.user_errors
def main(argv):
    if FLAGS.verbosity <= 0:  # backend/Orbax INFO lines would bury the one result or error line
        logging.set_verbosity(logging.WARNING)
    if len(argv) != 2 or not FLAGS.src or not FLAGS.dst:
        raise ValueError(f"expected one checkpoint kind and --src/--dst; {USAGE}")
    config = cli.load_config(FLAGS)
    meta = convert(argv[1], FLAGS.src, FLAGS.dst, config.model, overwrite=FLAGS.overwrite)
    print(json.dumps({k: meta[k] for k in ("kind", "source", "num_params", "dtypes",
                                           "skipped_source_keys")} | {"dst": FLAGS.dst}))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
