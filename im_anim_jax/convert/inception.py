"""pytorch-fid's FID InceptionV3 weights (pt_inception-2015-12-05-6726825d.pth) ->
metrics.inception.

  python -m im_anim_jax.convert inception --src pt_inception-2015-12-05-6726825d.pth --dst DIR

The classifier (`fc.*`, 1008 classes; FID uses the pool3 features) and BatchNorm step counters
are skipped; the architecture is fixed (no config.model entry).
"""
from __future__ import annotations

from im_anim_jax.convert import common
from im_anim_jax.metrics import inception

MODEL = None
STANDARD_FILES = ("pt_inception-2015-12-05-6726825d.pth",)
SKIPPED_PREFIXES = ("fc.", "AuxLogits.")


def load(src: str) -> tuple[dict, dict]:
    return common.load_state_dict(src), {"net": "pt_inception-2015-12-05"}


def abstract_params(_) -> dict:
    return inception.abstract_params()


def expected_shapes(_) -> dict[str, tuple]:
    return common.mirrored_shapes(abstract_params(None))


def keep(key: str) -> bool:
    """False for the classifier heads and `num_batches_tracked`."""
    return not key.startswith(SKIPPED_PREFIXES) and not key.endswith("num_batches_tracked")


def convert(sd: dict, _) -> dict:
    return common.convert_mirrored(sd, abstract_params(None))
