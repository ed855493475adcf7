"""LPIPS v0.1 (linear heads + torchvision trunk) -> metrics.lpips.

  python -m im_anim_jax.convert lpips --src DIR --dst OUT
  python -m im_anim_jax.convert lpips --src vgg.pth,vgg16-397923af.pth --dst OUT

LPIPS needs two standard files: the heads of the `lpips` package (lpips/weights/v0.1/vgg.pth or
alex.pth: `lin{k}.model.1.weight`) and torchvision's ImageNet trunk (vgg16-397923af.pth or
alexnet-owt-7be5be79.pth: `features.{i}.*`, its classifier skipped). --src is a directory holding
both (every checkpoint file in it is read), the two files joined by a comma, or one file with a
whole LPIPS model's state dict (`net.slice{s}.{i}.*` + `lin{k}.*`). VGG or AlexNet follows from
the heads' shapes; it is recorded in meta.json's model_config.
"""
from __future__ import annotations

import os

import numpy as np

from im_anim_jax.convert import common
from im_anim_jax.metrics import lpips

MODEL = None
MULTI_FILE = True  # --src: a directory or comma-separated files, all read by load()
HEAD_FILES = {"vgg": "vgg.pth", "alex": "alex.pth"}
TRUNK_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}
CHECKPOINT_SUFFIXES = common.TORCH_SUFFIXES + (".safetensors",)
HEAD_KEY = "lin{}.model.1.weight"


def _files(src: str) -> list[str]:
    if os.path.isdir(src):
        found = sorted(os.path.join(src, n) for n in os.listdir(src)
                       if n.endswith(CHECKPOINT_SUFFIXES))
        if not found:
            raise common.ConversionError(f"{src}: no checkpoint files (.pth, .safetensors) in it")
        return found
    return [p for p in src.split(",") if p]


def _canonical(key: str) -> str:
    """`net.slice{s}.{i}.weight` (a whole LPIPS model) -> torchvision's `features.{i}.weight`."""
    parts = key.split(".")
    if parts[0] == "net" and len(parts) == 4 and parts[1].startswith("slice"):
        return ".".join(["features"] + parts[2:])
    return key


def _net(sd: dict, src: str) -> str:
    if HEAD_KEY.format(5) in sd:
        raise common.ConversionError(f"{src}: 7 LPIPS heads (SqueezeNet); only vgg and alex are "
                                     f"supported")
    if HEAD_KEY.format(1) not in sd:
        raise common.ConversionError(
            f"{src}: no LPIPS heads ({HEAD_KEY.format(1)}); pass the lpips v0.1 head file "
            f"({' or '.join(HEAD_FILES.values())}) together with the torchvision trunk "
            f"({' or '.join(TRUNK_FILES.values())}) as a directory or comma-separated files")
    channels = sd[HEAD_KEY.format(1)].shape[1]
    nets = [n for n in lpips.NETS if lpips.tap_channels(n)[1] == channels]
    if not nets:
        raise common.ConversionError(f"{src}: {HEAD_KEY.format(1)} has {channels} channels; "
                                     f"expected 128 (vgg) or 192 (alex)")
    return nets[0]


def load(src: str) -> tuple[common.LazyStateDict, dict]:
    entries = {}
    for path in _files(src):
        for key, entry in common.load_state_dict(path).renamed(_canonical).entries.items():
            if key in entries:
                raise common.ConversionError(f"{src}: {key} appears in more than one file")
            entries[key] = entry
    sd = common.LazyStateDict(entries)
    return sd, {"net": _net(sd, src)}


def keep(key: str) -> bool:
    """True for the trunk and the heads (not torchvision's classifier, ScalingLayer buffers)."""
    return key.startswith(("features.", "lin"))


def abstract_params(model_cfg) -> dict:
    return lpips.abstract_params(model_cfg["net"])


def expected_shapes(model_cfg) -> dict[str, tuple]:
    net, shapes, channels = model_cfg["net"], {}, 3
    for i, out, k, *_ in lpips.trunk_convs(net):
        shapes[f"features.{i}.weight"], shapes[f"features.{i}.bias"] = (out, channels, k, k), (out,)
        channels = out
    for k, c in enumerate(lpips.tap_channels(net)):
        shapes[HEAD_KEY.format(k)] = (1, c, 1, 1)
    return shapes


def convert(sd: dict, model_cfg) -> dict:
    net = model_cfg["net"]
    params = {f"features_{i}": {"kernel": common.conv(sd[f"features.{i}.weight"]),
                                "bias": sd[f"features.{i}.bias"]}
              for i, *_ in lpips.trunk_convs(net)}
    for k in range(len(lpips.NETS[net]["taps"])):
        params[f"lin{k}"] = {"kernel": np.ascontiguousarray(sd[HEAD_KEY.format(k)][0, :, 0, :])}
    return params
