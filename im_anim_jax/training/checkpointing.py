"""Orbax checkpoints of a stage: items `state` (params, opt state, step, rng), `data` (the Grain
iterator state) and `meta` (config JSON, stage, code version, param shapes, config changes
accepted on resume)."""
from __future__ import annotations

import json
import os
import time

import grain
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

import im_anim_jax


class Checkpointer:
    """Every save() call writes a checkpoint: the caller decides when (Orbax's own interval
    policy also saves the first step, and consulting it every step costs seconds on CPU)."""

    def __init__(self, directory: str, *, max_to_keep: int = 2, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=1,
            enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_iter, meta: dict) -> bool:
        args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(self, step: int, abstract_state, data_iter=None):
        """Restores `state` onto the shardings in `abstract_state` (and the iterator in place).
        A checkpoint written before the non-finite guard (0.1.0: the optimizer state without
        optax.apply_if_finite's counters) is restored with zeroed counters."""
        try:
            return self._restore(step, abstract_state, data_iter)
        except ValueError as e:
            guard = getattr(abstract_state, "opt_state", None)
            if not (isinstance(guard, optax.ApplyIfFiniteState) and "do not match" in str(e)):
                raise
        old = self._restore(step, abstract_state.replace(opt_state=guard.inner_state), data_iter)
        put = lambda s, v: jax.device_put(np.full(s.shape, v, s.dtype), s.sharding)  # noqa: E731
        return old.replace(opt_state=optax.ApplyIfFiniteState(
            notfinite_count=put(guard.notfinite_count, 0), last_finite=put(guard.last_finite, 1),
            total_notfinite=put(guard.total_notfinite, 0), inner_state=old.opt_state))

    def _restore(self, step: int, abstract_state, data_iter):
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        return self.manager.restore(step, args=ocp.args.Composite(**args)).state

    def restore_params(self, step: int, abstract_params):
        """Only `state.params` (no optimizer state): for evaluation and later stages.

        Use a fresh Checkpointer: Orbax binds the `state` item to its first handler."""
        return self.restore_part(step, {"params": abstract_params})["params"]

    def restore_part(self, step: int, target: dict):
        """The part of `state` that `target` names (nested dicts of ShapeDtypeStructs as Orbax
        stores the state: NamedTuples as dicts by field, tuples as lists, None for an element
        left out), nothing else read. Use a fresh Checkpointer, as for restore_params."""
        args = ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)
        return self.manager.restore(step, args=ocp.args.Composite(state=args)).state

    def meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def set_aside(self, steps) -> list[str]:
        """Renames the directories of `steps` to `<step>.unreadable-<unix time>`, which no step
        listing counts (nothing is deleted); returns the new paths."""
        stamp, moved = int(time.time()), []
        for step in steps:
            path = os.path.join(self.directory, str(step))
            moved.append(f"{path}.unreadable-{stamp}")
            if jax.process_index() == 0:
                os.rename(path, moved[-1])
        if moved and jax.process_count() > 1:
            multihost_utils.sync_global_devices("checkpoints set aside")
        self.manager.reload()
        return moved

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree, shardings):
    """ShapeDtypeStructs carrying `shardings`: the target of a resharding restore."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def param_shapes(params) -> dict:
    """{'a/b/kernel': [shape]}: recorded in `meta` so a later stage can check the architecture."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): list(np.shape(v))
            for path, v in flat}


def latest_step(directory: str) -> int | None:
    """Newest finished checkpoint step in `directory` (None if none or no such directory)."""
    if not os.path.isdir(directory):
        return None
    ckpt = Checkpointer(directory, async_save=False)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


def all_steps(directory: str) -> list[int]:
    """Finished checkpoint steps in `directory`, ascending ([] if none or no such directory)."""
    if not os.path.isdir(directory):
        return []
    ckpt = Checkpointer(directory, async_save=False)
    try:
        return ckpt.all_steps()
    finally:
        ckpt.close()


def restore_checked_params(stage_dir: str, abstract_params, name: str, hint: str,
                           step: int | None = None, config=None, forward_keys: tuple = (),
                           with_meta: bool = False):
    """(params, step) (and its meta, `with_meta`) of checkpoint `step` (default the newest) in
    `stage_dir`, read-only, after
    checking that its recorded param shapes equal those of `abstract_params` and, with `config`,
    that its config equals `config` on `forward_keys` (keys that change the maths but no shape).
    A missing checkpoint or another architecture -> FileNotFoundError / ValueError naming `name`
    (e.g. "stage-1") and `hint`."""
    if not os.path.isdir(stage_dir):
        raise FileNotFoundError(f"no {name} checkpoint: {stage_dir} does not exist; {hint}")
    ckpt = Checkpointer(stage_dir, async_save=False)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"no finished {name} checkpoint in {stage_dir}; {hint}")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"no {name} checkpoint of step {step} in {stage_dir}; it "
                                    f"holds steps {steps}")
        meta, what = ckpt.meta(step), f"the {name} checkpoint in {stage_dir}"
        check_architecture(meta, param_shapes(abstract_params), what)
        if config is not None:
            check_forward_keys(meta, config, forward_keys, what)
        params = ckpt.restore_params(step, abstract_params)
        return (params, step, meta) if with_meta else (params, step)
    finally:
        ckpt.close()


def check_architecture(have: dict, want: dict, what: str, hint: str = ""):
    """ValueError naming the first differing params unless the param shapes recorded in the
    checkpoint meta `have` equal `want` (param_shapes of the config's model)."""
    have = have["param_shapes"]
    diffs = [f"{k}: checkpoint {have.get(k)} vs config {want.get(k)}"
             for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
    if diffs:
        raise ValueError(f"{what} has a different architecture than the config ({len(diffs)} "
                         f"params differ), e.g. " + "; ".join(diffs[:3]) + hint)


def check_forward_keys(have: dict, config, keys: tuple, what: str):
    """ValueError listing each of `keys` (config keys that change a model's maths but no param
    shape, e.g. model.quantizer.use_l2_norm) whose value in the config of checkpoint meta `have`
    differs from `config`'s. A key on one side only (a code change) and a meta without a config
    are not compared."""
    if "config" not in have:
        return
    old, new = _flat(json.loads(have["config"])), _flat(json.loads(config.to_json_best_effort()))
    diffs = [_change(k, old, new, "") for k in keys if k in old and k in new and old[k] != new[k]]
    if diffs:
        raise ValueError(f"{what} was trained with another model config ({len(diffs)} keys "
                         "differ: " + "; ".join(diffs) + "): its params would run under maths "
                         "they were not trained for. Use the config that trained it, or retrain "
                         "that stage")


def check_trained(have: dict, want, what: str, hint: str = ""):
    """ValueError unless the checkpoint meta `have` recorded the same trained param groups as
    `want` (its optimizer state holds exactly those); nothing to check where either side
    recorded none."""
    have = have.get("trained_groups")
    if want is not None and have is not None and list(have) != list(want):
        raise ValueError(f"{what} trained the param groups {list(have)}, the config trains "
                         f"{list(want)} (e.g. stage3.frozen or stage2.train_motion_encoder "
                         f"changed), so its optimizer state does not fit" + hint)


# What a stage's training trajectory depends on, compared on resume (check_config): these config
# sections, and per stage its own section first, then the parts of `model` it builds (stage 2's
# baselines write into WORKDIR/stage2_<name> with their overrides applied, so their section is
# `stage2` too). A part another stage alone uses (e.g. model.dit for stage 1) may differ.
TRAJECTORY = ("seed", "data", "model.dtype")
_STAGE1_MODEL = ("model.motion_tokenizer", "model.quantizer", "model.motion_decoder",
                 "model.joint_decoder")
STAGE_SECTIONS = {
    1: ("stage1", *_STAGE1_MODEL),
    "vae": ("vae_training", "model.vae", "model.video_size"),
    2: ("stage2", *_STAGE1_MODEL, "model.vae", "model.motion_encoder", "model.retargeter",
        "model.joint_head", "model.conv_motion_encoder", "model.pose_indicator"),
    3: ("stage3", "model", "text", "sampling.overlap_frames")}
# May change on resume (logged): how the same computation runs (the mesh and its axis rules are
# not compared at all)...
EXECUTION_ONLY = ("model.attention_impl", "model.remat_policy", "data.read_threads",
                  "data.render_workers")
# ...and these keys of the stage's own section: learning rates (Diverged asks for a lower one),
# how often it logs and saves, and which other stage-2 variants train.
RESUMABLE = ("lr", "lr_dit", "lr_other", "log_every", "checkpoint_every", "baselines")
ABSENT = "(absent)"
MAX_LISTED = 6


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _why_allowed(key: str, have: dict, want: dict, section: str) -> str:
    """Why a change of `key` cannot alter the trajectory resumed; '' where it can."""
    parent, _, leaf = key.rpartition(".")
    if ABSENT in (have.get(key, ABSENT), want.get(key, ABSENT)):
        return "a key added or removed by a code change"
    if key in EXECUTION_ONLY:
        return "execution only"
    if parent == section and leaf in RESUMABLE:
        return "allowed on resume"
    schedules = {have.get(f"{section}.schedule"), want.get(f"{section}.schedule")}
    if parent == section and leaf == "steps" and schedules == {"constant"}:
        return "the constant schedule does not depend on it"
    return ""


def _change(key: str, have: dict, want: dict, section: str) -> str:
    """`key: old -> new` of a refused change."""
    text = lambda v: v if v == ABSENT else _cut(json.dumps(v))  # noqa: E731
    out = f"{key}: {text(have.get(key, ABSENT))} -> {text(want.get(key, ABSENT))}"
    if key == f"{section}.steps":  # refused where a schedule is "cosine"
        out += " (the cosine schedule decays over it: the learning rate would jump on resume)"
    return out


def _cut(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_config(have: dict, want: dict, what: str, hint: str, allow: bool = False,
                 allowed_as: str | None = None) -> dict:
    """{key: [old, new, why allowed]}: the changes between the config JSON of checkpoint meta
    `have` and that of meta `want` over what determines the stage's trajectory (TRAJECTORY and
    STAGE_SECTIONS), where each is allowed (_why_allowed) or `allow` (why: `allowed_as`, or
    checkpoint.allow_config_change); otherwise ValueError listing the others as
    `key: old -> new`, then `hint`. {} where either holds no config."""
    if "config" not in have or "config" not in want:
        return {}
    old, new = _flat(json.loads(have["config"])), _flat(json.loads(want["config"]))
    section, *extra = STAGE_SECTIONS[want["stage"]]
    compared = (*TRAJECTORY, section, *extra)
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k, ABSENT) != new.get(k, ABSENT)
            and any(k == p or k.startswith(p + ".") for p in compared)]
    why = {k: _why_allowed(k, old, new, section) for k in keys}
    refused = [_change(k, old, new, section) for k in keys if not why[k]]
    if refused and not allow:
        more = f"; +{len(refused) - MAX_LISTED} more" if len(refused) > MAX_LISTED else ""
        raise ValueError(f"{what} was written under another config ({len(refused)} keys differ: "
                         + "; ".join(refused[:MAX_LISTED]) + more + ")" + hint)
    return {k: [old.get(k, ABSENT), new.get(k, ABSENT),
                why[k] or allowed_as or "accepted by checkpoint.allow_config_change"]
            for k in keys}


def meta_for(config, stage, params, trained=None) -> dict:
    """Checkpoint metadata; `trained`: the top-level param groups the stage updates, where it
    updates only some (check_trained compares them on resume)."""
    meta = {"stage": stage, "code_version": im_anim_jax.__version__,
            "config": config.to_json_best_effort(), "param_shapes": param_shapes(params)}
    if trained is not None:
        meta["trained_groups"] = sorted(trained)
    return meta
