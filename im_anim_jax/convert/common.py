"""What every converter shares: reading official checkpoint files, checking keys and shapes,
layout transposes, and writing/reading the converted Orbax checkpoint.

A converter module (titok, wan_dit, wan_vae) exposes `MODEL` (its config.model key: `model_cfg`
below is `config.model[MODEL]`, or the whole `config.model` when MODEL is None),
`abstract_params(model_cfg)`, `expected_shapes(model_cfg)` ({torch key: shape}) and
`convert(state_dict, model_cfg)` (-> nested numpy params, source dtype kept), and optionally
`select(state_dict)` (drops parts of the source that our model does not use) and `load(src)` ->
(state_dict, model_cfg): reads a source that is more than one file, or whose architecture the
file itself fixes (the metric networks); its model_cfg replaces the config's.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Mapping

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp

import im_anim_jax

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
WRAPPER_KEYS = ("state_dict", "model", "module", "ema")


class ConversionError(ValueError):
    """A source checkpoint that does not match the model: the message names what is wrong."""


def load_state_dict(src: str) -> dict[str, np.ndarray]:
    """{key: array} from a .pth/.pt/.bin/.ckpt file (torch), a .safetensors file, a sharded
    safetensors `*.index.json`, or a directory holding one of those. Dtypes are kept (bf16 ->
    ml_dtypes.bfloat16)."""
    if not os.path.exists(src):
        raise ConversionError(f"{src}: no such file or directory")
    if os.path.isdir(src):
        return load_state_dict(_pick_in_dir(src))
    try:
        if src.endswith(".index.json"):
            return _load_sharded(src)
        if src.endswith(".safetensors"):
            return _load_safetensors(src)
        if src.endswith(TORCH_SUFFIXES):
            return _load_torch(src)
    except ConversionError:
        raise
    except Exception as e:  # corrupt or truncated files surface here with the reader's reason
        raise ConversionError(f"{src}: cannot read checkpoint ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:300]})") from None
    raise ConversionError(f"{src}: unknown checkpoint format; expected one of "
                          f"{TORCH_SUFFIXES + ('.safetensors', '.index.json')} or a directory")


def _pick_in_dir(path: str) -> str:
    names = sorted(os.listdir(path))
    for pattern in (".safetensors.index.json", ".safetensors") + TORCH_SUFFIXES:
        found = [n for n in names if n.endswith(pattern)]
        if len(found) == 1:
            return os.path.join(path, found[0])
        if len(found) > 1 and pattern != ".safetensors":
            raise ConversionError(f"{path}: several {pattern} files {found}; pass one with --src")
    raise ConversionError(f"{path}: no checkpoint file (.safetensors[.index.json], .pth, .bin) in it")


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open  # the flax reader understands bf16, the numpy one does not
    with safe_open(path, framework="flax") as f:
        return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}


def _load_sharded(index_path: str) -> dict[str, np.ndarray]:
    with open(index_path) as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ConversionError(f"{index_path}: no 'weight_map' object in the index")
    root, out = os.path.dirname(index_path), {}
    for shard in sorted(set(weight_map.values())):
        path = os.path.join(root, shard)
        if not os.path.exists(path):
            raise ConversionError(f"{index_path}: shard {shard} listed in the index is missing")
        tensors = _load_safetensors(path)
        wanted = {k for k, v in weight_map.items() if v == shard}
        absent = sorted(wanted - tensors.keys())
        if absent:
            raise ConversionError(f"{path}: keys listed in the index are not in the shard: "
                                  f"{_some(absent)}")
        out.update({k: tensors[k] for k in wanted})
    return out


def _load_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ConversionError(f"{path}: reading PyTorch files needs torch (pip install torch); "
                              f"or convert the file to .safetensors first") from None
    obj = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(obj, dict) and not any(torch.is_tensor(v) for v in obj.values()):
        inner = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)]
        if not inner:
            break
        obj = obj[inner[0]]
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return {k: _torch_to_numpy(v) for k, v in obj.items() if torch.is_tensor(v)}


def _torch_to_numpy(t) -> np.ndarray:
    import torch
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bf16: reinterpret the bits, no value change
        return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def check_state_dict(sd: Mapping[str, np.ndarray], expected: Mapping[str, tuple], what: str):
    """Raises ConversionError naming every missing, unexpected and mis-shaped key."""
    missing = sorted(expected.keys() - sd.keys())
    unexpected = sorted(sd.keys() - expected.keys())
    misshaped = [f"{k}: expected {tuple(expected[k])}, found {tuple(sd[k].shape)}"
                 for k in sorted(expected.keys() & sd.keys())
                 if tuple(sd[k].shape) != tuple(expected[k])]
    problems = []
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped: " + "; ".join(misshaped[:20]))
    if missing:
        problems.append(f"{len(missing)} missing: {_some(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_some(unexpected)}")
    if problems:
        raise ConversionError(f"{what} does not match the configured model: "
                              + " | ".join(problems))


def _some(keys, n: int = 20) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


# ---- layouts: PyTorch -> Flax ----
def linear(w: np.ndarray) -> np.ndarray:
    """nn.Linear weight [out, in] -> Dense kernel [in, out]."""
    return np.ascontiguousarray(w.T)


def conv(w: np.ndarray) -> np.ndarray:
    """ConvNd weight [O, I, *k] -> Flax kernel [*k, I, O]."""
    return np.ascontiguousarray(np.moveaxis(w, (0, 1), (-1, -2)))


def stack(sd: Mapping[str, np.ndarray], key: str, n: int, fn=lambda w: w) -> np.ndarray:
    """np.stack([fn(sd[key.format(i)]) for i < n]): per-block tensors -> one scanned param."""
    return np.stack([fn(sd[key.format(i)]) for i in range(n)])


TORCH_LEAVES = {"kernel": "weight", "bias": "bias", "scale": "weight", "mean": "running_mean",
                "var": "running_var"}


def mirrored_shapes(abstract) -> dict[str, tuple]:
    """{torch key: torch shape} of a Flax tree mirroring PyTorch module names (mirrored_keys)."""
    return {k: shape for k, (_, shape) in mirrored_keys(abstract).items()}


def mirrored_keys(abstract) -> dict[str, tuple[str, tuple]]:
    """{torch key: (flax path, torch shape)} of a Flax tree whose module paths are the PyTorch
    module names (`a/b/conv/kernel` <-> `a.b.conv.weight`; BatchNorm `bn/{scale,bias,mean,var}`
    <-> `bn.{weight,bias,running_mean,running_var}`; conv kernels [*k, I, O] <-> [O, I, *k])."""
    out = {}
    for path, shape in _paths(abstract).items():
        *modules, leaf = path.split("/")
        if leaf == "kernel":
            shape = (shape[-1], shape[-2], *shape[:-2])
        out[".".join(modules + [TORCH_LEAVES[leaf]])] = (path, shape)
    return out


def convert_mirrored(sd: Mapping[str, np.ndarray], abstract) -> dict:
    """The params of `abstract` from a state dict named as `mirrored_keys` says."""
    return unflatten({path: conv(sd[key]) if path.endswith("/kernel") else sd[key]
                      for key, (path, _) in mirrored_keys(abstract).items()})


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
    """{'a/b/c': x} -> {'a': {'b': {'c': x}}}."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _paths(tree) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(v))
            for path, v in flat}


def check_tree(params, abstract) -> None:
    """The converted tree has exactly the model's structure and shapes (else a converter bug)."""
    got, want = _paths(params), _paths(abstract)
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))
        raise AssertionError(f"converted params do not match the model: {diff[:10]}")


# ---- the converted checkpoint: DIR/params (Orbax) + DIR/meta.json ----
def convert_file(converter, src: str, dst: str, model_cfg, kind: str,
                 overwrite: bool = False) -> dict:
    """Reads `src`, checks it against `model_cfg` (config.model), converts and writes `dst` (via a
    temporary directory renamed at the end: an existing `dst` is never half-overwritten)."""
    if converter.MODEL is not None:
        model_cfg = model_cfg[converter.MODEL]
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not overwrite:
        raise ConversionError(f"{dst} already exists; choose another --dst or pass --overwrite")
    if hasattr(converter, "load"):
        sd, model_cfg = converter.load(src)
    else:
        sd = load_state_dict(src)
    skipped = len(sd)
    sd = converter.select(sd) if hasattr(converter, "select") else sd
    skipped -= len(sd)
    check_state_dict(sd, converter.expected_shapes(model_cfg), f"{src} ({kind})")
    params = converter.convert(sd, model_cfg)
    check_tree(params, converter.abstract_params(model_cfg))
    dtypes = sorted({str(np.asarray(x).dtype) for x in jax.tree.leaves(params)})
    meta = {"kind": kind, "source": os.path.abspath(src), "dtypes": dtypes,
            "skipped_source_keys": skipped,
            "num_params": int(sum(np.size(x) for x in jax.tree.leaves(params))),
            "model_config": model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg,
            "code_version": im_anim_jax.__version__}
    tmp, old = dst + ".partial", dst + ".replaced"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, "params"), params)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1, default=str)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(dst):  # --overwrite: the old checkpoint goes only once the new one is in place
        os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)
    return meta


def load_converted(path: str, abstract=None) -> tuple[dict, dict]:
    """(params, meta) of a converted checkpoint; `abstract` (ShapeDtypeStructs, optionally with
    shardings) restores straight onto devices with those shardings and dtypes."""
    path = os.path.abspath(path)
    meta_path = os.path.join(path, "meta.json")
    if not os.path.exists(meta_path):
        raise ConversionError(f"{path}: not a converted checkpoint (no meta.json); "
                              f"write one with `python -m im_anim_jax.convert`")
    with open(meta_path) as f:
        meta = json.load(f)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(path, "params"), abstract)
    return params, meta
