"""pytorch-fid's FID InceptionV3 weights (pt_inception-2015-12-05-6726825d.pth) ->
metrics.inception.

  python -m im_anim_jax.convert inception --src pt_inception-2015-12-05-6726825d.pth --dst DIR

The classifier (`fc.*`, 1008 classes; FID uses the pool3 features) and BatchNorm step counters
are skipped, the classifier's shape checked first: torchvision's ImageNet InceptionV3 has the same
trunk names and shapes but other weights (a 1000-class `fc`, and `AuxLogits.*`), and FID on it is
not comparable. The architecture is fixed (no config.model entry).
"""
from __future__ import annotations

from im_anim_jax.convert import common
from im_anim_jax.metrics import inception

MODEL = None
STANDARD_FILES = ("pt_inception-2015-12-05-6726825d.pth",)
SKIPPED_PREFIXES = ("fc.",)
CLASSIFIER = {"fc.weight": (1008, 2048), "fc.bias": (1008,)}  # the 2015 TF graph's 1008 classes


def load(src: str) -> tuple[dict, dict]:
    sd = common.load_state_dict(src)
    shapes = sd.shapes()
    found = {k: shapes[k] for k in CLASSIFIER if k in shapes}  # a trunk-only file has none
    aux = any(k.startswith("AuxLogits.") for k in shapes)
    if aux or any(found[k] != CLASSIFIER[k] for k in found):
        raise common.ConversionError(
            f"{src}: classifier {found}{' and AuxLogits.*' if aux else ''}, expected "
            f"{CLASSIFIER} (or none): not pytorch-fid's FID InceptionV3 ({STANDARD_FILES[0]}); "
            f"torchvision's ImageNet weights give other features, so FID on them would not "
            f"compare with published figures")
    return sd, {"net": "pt_inception-2015-12-05"}


def abstract_params(_) -> dict:
    return inception.abstract_params()


def expected_shapes(_) -> dict[str, tuple]:
    return common.mirrored_shapes(abstract_params(None))


def keep(key: str) -> bool:
    """False for the classifier heads and `num_batches_tracked`."""
    return not key.startswith(SKIPPED_PREFIXES) and not key.endswith("num_batches_tracked")


def convert(sd: dict, _) -> dict:
    return common.convert_mirrored(sd, abstract_params(None))
