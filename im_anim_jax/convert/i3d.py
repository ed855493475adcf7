"""The Kinetics-400 I3D of FVD (piergiaj/pytorch-i3d names; `i3d_pretrained_400.pt` as loaded by
DisCo's and VideoGPT/TATS-style FVD code) -> metrics.i3d.

  python -m im_anim_jax.convert i3d --src i3d_pretrained_400.pt --dst DIR

BatchNorm step counters are skipped; the architecture is fixed (no config.model entry).
"""
from __future__ import annotations

from im_anim_jax.convert import common
from im_anim_jax.metrics import i3d

MODEL = None
STANDARD_FILES = ("i3d_pretrained_400.pt",)


def load(src: str) -> tuple[dict, dict]:
    return common.load_state_dict(src), {"net": "i3d-kinetics-400"}


def abstract_params(_) -> dict:
    return i3d.abstract_params()


def expected_shapes(_) -> dict[str, tuple]:
    return common.mirrored_shapes(abstract_params(None))


def keep(key: str) -> bool:
    """False for `num_batches_tracked`."""
    return not key.endswith("num_batches_tracked")


def convert(sd: dict, _) -> dict:
    return common.convert_mirrored(sd, abstract_params(None))
