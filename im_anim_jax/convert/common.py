"""What every converter shares: reading official checkpoint files, checking keys and shapes,
layout transposes, and writing/reading the converted Orbax checkpoint.

A converter module (titok, wan_dit, wan_vae) exposes `MODEL` (its config.model key: `model_cfg`
below is `config.model[MODEL]`, or the whole `config.model` when MODEL is None),
`abstract_params(model_cfg)`, `expected_shapes(model_cfg)` ({torch key: shape}) and
`convert(state_dict, model_cfg)` (-> nested numpy params, source dtype kept), and optionally
`STANDARD_FILES` (the file names picked first when --src is a directory), `keep(key)` (False for
source keys our model does not use), `source_meta(path, model_cfg)` (checks files beside the
source; returns entries for meta.json) and `load(src)` -> (state_dict, model_cfg): reads a source
that is more than one file (then `MULTI_FILE = True`: --src is passed as given), or whose
architecture the file itself fixes (the metric networks); its model_cfg replaces the config's.

State dicts are read lazily (`LazyStateDict`): keys and shapes come from the file headers, each
tensor is read when a converter asks for it, so a conversion holds about its output plus one
source tensor.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import tempfile
import zipfile
from typing import Callable, Iterable, Mapping, Sequence

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

import im_anim_jax

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
CHECKPOINT_SUFFIXES = (".safetensors.index.json", ".safetensors") + TORCH_SUFFIXES
SHARD = re.compile(r"-\d+-of-\d+\.safetensors$")  # read through their index, never alone
WRAPPER_KEYS = ("state_dict", "model", "module", "ema")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile
NUMPY_LACKS = ("BF16", "F8_E4M3", "F8_E5M2")  # safetensors dtypes read through JAX (on the CPU)
CONVERTED = {"meta.json", "params"}  # a converted checkpoint holds these and nothing else


class ConversionError(ValueError):
    """A source checkpoint that does not match the model: the message names what is wrong."""


class LazyStateDict(Mapping):
    """{key: np.ndarray} whose arrays are read from the file on each access (never cached);
    `entries` is {key: (shape, read)}, known from the file headers alone."""

    def __init__(self, entries: Mapping[str, tuple[tuple, Callable[[], np.ndarray]]]):
        self.entries = dict(entries)

    def __getitem__(self, key: str) -> np.ndarray:
        return self.entries[key][1]()

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def shapes(self) -> dict[str, tuple]:
        return {k: shape for k, (shape, _) in self.entries.items()}

    def renamed(self, rename: Callable[[str], str]) -> LazyStateDict:
        return LazyStateDict({rename(k): e for k, e in self.entries.items()})

    def subset(self, keys: Iterable[str]) -> LazyStateDict:
        return LazyStateDict({k: self.entries[k] for k in keys})


def load_state_dict(src: str) -> LazyStateDict:
    """{key: array} of a .pth/.pt/.bin/.ckpt file (torch), a .safetensors file, a sharded
    safetensors `*.index.json`, or a directory holding one of those (`pick_source`), read lazily.
    Dtypes are kept (bf16 -> ml_dtypes.bfloat16); a `module.`/`_orig_mod.` prefix on every key is
    dropped."""
    src = pick_source(src)
    with _reading(src):
        if src.endswith(".index.json"):
            sd = _load_sharded(src)
        elif src.endswith(".safetensors"):
            sd = _load_safetensors(src)
        elif src.endswith(TORCH_SUFFIXES):
            sd = _load_torch(src)
        else:
            raise ConversionError(f"{src}: unknown checkpoint format; expected one of "
                                  f"{CHECKPOINT_SUFFIXES} or a directory")
    return _strip_wrapper_prefixes(sd, src)


def pick_source(src: str, standard: tuple[str, ...] = ()) -> str:
    """`src`, or for a directory the first of the `standard` file names in it, else its only
    checkpoint file (shards named *-NNNNN-of-NNNNN.safetensors count through their index)."""
    if not os.path.exists(src):
        raise ConversionError(f"{src}: no such file or directory")
    if not os.path.isdir(src):
        return src
    names = sorted(os.listdir(src))
    found = [n for n in standard if n in names][:1] or [
        n for n in names if n.endswith(CHECKPOINT_SUFFIXES) and not SHARD.search(n)]
    if len(found) == 1:
        return os.path.join(src, found[0])
    expected = f"; expected {' or '.join(standard)}" if standard else ""
    if not found:
        raise ConversionError(f"{src}: no checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)}) in "
                              f"it{expected}")
    raise ConversionError(f"{src}: several checkpoint files {found}; pass one with --src"
                          f"{expected}")


@contextlib.contextmanager
def _reading(path: str):
    """Corrupt or truncated files surface as ConversionError with the reader's reason."""
    try:
        yield
    except ConversionError:
        raise
    except Exception as e:
        raise ConversionError(f"{path}: cannot read checkpoint ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:300]})") from None


def _strip_wrapper_prefixes(sd: LazyStateDict, path: str) -> LazyStateDict:
    while sd and (prefix := next((p for p in WRAPPER_PREFIXES
                                  if all(k.startswith(p) for k in sd)), None)):
        logging.warning("%s: every key starts with %r; reading the keys without it", path, prefix)
        sd = sd.renamed(lambda k, n=len(prefix): k[n:])
    return sd


def _load_safetensors(path: str) -> LazyStateDict:
    from safetensors import safe_open
    with safe_open(path, framework="numpy") as f:
        slices = {k: f.get_slice(k) for k in f.keys()}
        return LazyStateDict({
            k: (tuple(s.get_shape()), functools.partial(_read_safetensor, path, k, s.get_dtype()))
            for k, s in slices.items()})


def _read_safetensor(path: str, key: str, dtype: str) -> np.ndarray:
    """One tensor, on the host, its dtype kept: numpy has no bf16/fp8, so those go through JAX
    on the CPU device (with numpy, int64/float64 are not narrowed to JAX's 32-bit defaults)."""
    from safetensors import safe_open
    if dtype in NUMPY_LACKS:
        framework, device = "flax", jax.default_device(jax.devices("cpu")[0])
    else:
        framework, device = "numpy", contextlib.nullcontext()
    with _reading(path), device, safe_open(path, framework=framework) as f:
        return np.asarray(f.get_tensor(key))


def _load_sharded(index_path: str) -> LazyStateDict:
    with open(index_path) as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ConversionError(f"{index_path}: no 'weight_map' object in the index")
    root, entries = os.path.dirname(index_path), {}
    for shard in sorted(set(weight_map.values())):
        path = os.path.join(root, shard)
        if not os.path.exists(path):
            raise ConversionError(f"{index_path}: shard {shard} listed in the index is missing")
        with _reading(path):
            tensors = _load_safetensors(path)
        wanted = {k for k, v in weight_map.items() if v == shard}
        absent, unlisted = sorted(wanted - tensors.keys()), sorted(tensors.keys() - wanted)
        if absent:
            raise ConversionError(f"{path}: keys listed in the index are not in the shard: "
                                  f"{_some(absent)}")
        if unlisted:  # a loader reading the shards would load them: they must be checked too
            raise ConversionError(f"{path}: keys in the shard are not in the index "
                                  f"{os.path.basename(index_path)}: {_some(unlisted)}")
        entries.update(tensors.subset(wanted).entries)
    return LazyStateDict(entries)


def _load_torch(path: str) -> LazyStateDict:
    try:
        import torch
    except ImportError:
        raise ConversionError(f"{path}: reading PyTorch files needs torch (pip install torch); "
                              f"or convert the file to .safetensors first") from None
    # mmap (zip files, torch >= 1.6): tensors stay on disk until read, one at a time
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    while isinstance(obj, dict):  # unwrap {"state_dict": {...}, "step": 5, ...}
        inner = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)]
        if len(inner) > 1:  # e.g. {"model": ..., "ema": ...}: which is meant?
            raise ConversionError(f"{path}: holds several state dicts ({', '.join(inner)}); "
                                  f"save the one to convert alone (torch.save(ckpt[key], f))")
        if not inner:
            break
        obj = obj[inner[0]]
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    nested = sorted(k for k, v in obj.items() if not torch.is_tensor(v))
    if nested:  # a module's sub-dict would otherwise be dropped without a word
        raise ConversionError(f"{path}: the state dict holds entries that are not tensors: "
                              f"{_some(nested)}; expected a flat {{name: tensor}} dict")
    return LazyStateDict({k: (tuple(v.shape), functools.partial(_torch_to_numpy, v))
                          for k, v in obj.items()})


def _torch_to_numpy(t) -> np.ndarray:
    """A copy (never a view of the memory-mapped file); bf16 / fp8 bits reinterpreted, not
    converted."""
    import torch
    t = t.detach().contiguous()
    # numpy has no bf16 / fp8: reinterpret the bits as ml_dtypes', no value change
    bits = {torch.bfloat16: (torch.uint16, ml_dtypes.bfloat16),
            torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
            torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2)}
    if t.dtype in bits:
        raw, dtype = bits[t.dtype]
        return t.view(raw).numpy().view(dtype).copy()
    return t.numpy().copy()


def check_state_dict(sd: Mapping[str, np.ndarray], expected: Mapping[str, tuple], what: str,
                     skipped: Sequence[str] = ()):
    """Raises ConversionError naming every missing, unexpected and mis-shaped key (shapes from
    the headers: no tensor is read); `skipped` are the source keys the converter left out."""
    have = sd.shapes() if isinstance(sd, LazyStateDict) else {k: np.shape(v) for k, v in sd.items()}
    missing = sorted(expected.keys() - have.keys())
    unexpected = sorted(have.keys() - expected.keys())
    misshaped = [f"{k}: expected {tuple(expected[k])}, found {tuple(have[k])}"
                 for k in sorted(expected.keys() & have.keys())
                 if tuple(have[k]) != tuple(expected[k])]
    problems = []
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped: " + "; ".join(misshaped[:20]))
    if missing:
        problems.append(f"{len(missing)} missing: {_some(missing)}" + (
            f" ({len(skipped)} source keys were skipped as unused by this model: "
            f"{_some(sorted(skipped), 5)})" if skipped else ""))
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
    """np.stack([fn(sd[key.format(i)]) for i < n]): per-block tensors -> one scanned param, filled
    one block at a time (no list of n blocks beside the result)."""
    first = np.asarray(fn(sd[key.format(0)]))
    out = np.empty((n, *first.shape), first.dtype)
    out[0] = first
    for i in range(1, n):
        block = np.asarray(fn(sd[key.format(i)]))
        if block.dtype != out.dtype:  # blocks saved in different precisions: float32 holds
            # bf16 / fp16 exactly (float64 stays float64): widen once, never narrow
            wide = np.float64 if np.float64 in (out.dtype, block.dtype) else np.float32
            if out.dtype != wide:
                out = out.astype(wide)
        np.copyto(out[i], block.astype(out.dtype))
    return out


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
    check_destination(dst, src, overwrite)
    if not getattr(converter, "MULTI_FILE", False):
        src = pick_source(src, getattr(converter, "STANDARD_FILES", ()))
    meta = {"kind": kind, "source": os.path.abspath(src)}
    if hasattr(converter, "source_meta"):
        meta.update(converter.source_meta(src, model_cfg))
    with _replacing(dst) as new:
        params, model_cfg, skipped = _convert(converter, src, model_cfg, kind)
        meta.update({"dtypes": sorted({str(np.asarray(x).dtype) for x in jax.tree.leaves(params)}),
                     "skipped_source_keys": skipped,
                     "num_params": int(sum(np.size(x) for x in jax.tree.leaves(params))),
                     "model_config": (model_cfg.to_dict() if hasattr(model_cfg, "to_dict")
                                      else model_cfg),
                     "code_version": im_anim_jax.__version__})
        _save(params, meta, new)
    return meta


def _convert(converter, src: str, model_cfg, kind: str) -> tuple[dict, object, int]:
    """(params, model_cfg, number of source keys skipped): keys and shapes are checked before
    any tensor is read."""
    if hasattr(converter, "load"):
        sd, model_cfg = converter.load(src)
    else:
        sd = load_state_dict(src)
    keep = getattr(converter, "keep", lambda _: True)
    skipped = [k for k in sd if not keep(k)]
    sd = sd.subset(k for k in sd if keep(k))
    check_state_dict(sd, converter.expected_shapes(model_cfg), f"{src} ({kind})", skipped)
    params = converter.convert(sd, model_cfg)
    check_tree(params, converter.abstract_params(model_cfg))
    return params, model_cfg, len(skipped)


def _save(params: dict, meta: dict, path: str) -> None:
    """Orbax params (synchronous and without the default copy of every numpy array, which
    doubles the peak memory; load_converted's StandardCheckpointer reads them) + meta.json."""
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.ArrayHandler()))
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry)) as ckptr:
        ckptr.save(os.path.join(path, "params"), args=ocp.args.PyTreeSave(params))
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1, default=str)


def is_converted(path: str) -> bool:
    """`path` is a checkpoint this tool wrote (meta.json + params, nothing else)."""
    return os.path.isdir(path) and set(os.listdir(path)) == CONVERTED


def check_destination(dst: str, src: str, overwrite: bool) -> None:
    """Refuses an existing `dst` unless `overwrite`, and then anything but an empty directory or
    a converted checkpoint, and a `dst` holding `src` (what replacing `dst` would delete)."""
    if not os.path.lexists(dst):
        return
    if not overwrite:
        raise ConversionError(f"{dst} already exists; choose another --dst or pass --overwrite")
    if not (is_converted(dst) or (os.path.isdir(dst) and not os.listdir(dst))):
        raise ConversionError(f"{dst} exists and is neither a converted checkpoint (only "
                              f"meta.json and params) nor an empty directory; refusing to "
                              f"replace it with --overwrite")
    real_src, real_dst = (os.path.realpath(p) for p in (src, dst))
    if os.path.commonpath([real_src, real_dst]) == real_dst:
        raise ConversionError(f"--src {src} is inside --dst {dst}; replacing {dst} would delete "
                              f"it")


@contextlib.contextmanager
def _replacing(dst: str):
    """Yields a fresh directory beside `dst` to write into, which then becomes `dst`: an existing
    `dst` goes only once the new one is in place, and no other path is touched."""
    try:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        work = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".partial-",
                                dir=os.path.dirname(dst))
    except OSError as e:
        raise ConversionError(f"cannot write {dst}: {e.strerror or e}") from None
    new, old = os.path.join(work, "new"), os.path.join(work, "old")
    try:
        yield new
        _swap(new, dst, old)
    finally:
        if not os.path.lexists(old) or os.path.lexists(dst):  # else `old` is all there is
            shutil.rmtree(work, ignore_errors=True)


def _swap(new: str, dst: str, old: str) -> None:
    """Renames `new` to `dst`, moving an existing `dst` to `old` first (and back on failure)."""
    try:
        if os.path.lexists(dst):
            os.replace(dst, old)
        os.replace(new, dst)
    except OSError as e:
        if os.path.lexists(old) and not os.path.lexists(dst):
            os.replace(old, dst)
        raise ConversionError(f"cannot move the converted checkpoint to {dst}: "
                              f"{e.strerror or e}") from None


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
