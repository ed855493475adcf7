"""Resuming training.loop.run on a toy state: a checkpoint of another config is refused (allowed
changes are logged and recorded), an unreadable one is set aside for the one before it, the
abandoned run's logged rows go, and a signal during a save stops right after it."""
import json
import os
import shutil
import signal
import struct

import grain
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from im_anim_jax import sharding
from im_anim_jax.training import checkpointing, loop

CONFIG = {"seed": 0, "data": {"path": "d", "read_threads": 2},
          "model": {"motion_tokenizer": {"width": 8}, "attention_impl": "xla"},
          "stage1": {"steps": 10, "lr": 1e-3, "schedule": "cosine", "log_every": 1},
          "stage2": {"lr": 1.0}, "eval": {"batch_size": 2}}


def _config(**changes):
    """CONFIG with {"section.key" or "key": value} changes."""
    config = json.loads(json.dumps(CONFIG))
    for key, value in changes.items():
        *path, name = key.split(".")
        node = config
        for part in path:
            node = node[part]
        node[name] = value
    return config


def _step(state, batch):
    return {"w": state["w"] + batch["x"][0]}, {"loss": np.float32(1.0)}


def _run(directory, steps, config=CONFIG, allow=False, train_step=_step, log=None,
         log_every=1, first_step=0):
    """loop.run for `steps` steps on a Grain iterator (record i at step i + 1), a checkpoint
    every 5; returns the log."""
    lines = [] if log is None else log
    data = iter(grain.MapDataset.range(1000).map(
        lambda i: {"x": np.full((1,), i, np.float32), "record": np.full((1,), i, np.int32),
                   "start": np.zeros((1,), np.int32)}).to_iter_dataset())
    state = {"w": jnp.zeros(2)}
    meta = {"stage": 1, "config": json.dumps(config),
            "param_shapes": checkpointing.param_shapes(state)}
    loop.run(name="toy", stage_dir=str(directory), state=state, abstract_state=None,
             train_step=train_step, data_iter=data, mesh=sharding.make_mesh(
                 ml_collections.ConfigDict(dict(shape=dict(data=-1, fsdp=1, context=1,
                                                           tensor=1)))),
             total_steps=steps, log_every=log_every, checkpoint_every=5,
             ckpt_cfg=ml_collections.ConfigDict(dict(max_to_keep=3, async_save=False,
                                                     allow_config_change=allow)),
             meta=meta, max_nonfinite_in_a_row=2, log=lines.append, first_step=first_step)
    return lines


def _damage(checkpoint):
    """Empties every file of a checkpoint's state (it can no longer be restored)."""
    for root, _, files in os.walk(checkpoint / "state"):
        for name in files:
            open(os.path.join(root, name), "w").close()


def _steps_in(path, parse=lambda row: int(row.split()[0])):
    with open(path) as f:
        return [parse(row) for row in f]


def test_another_config_is_refused_before_restoring_listing_each_key(tmp_path, tree_digest):
    _run(tmp_path, 5)
    before = tree_digest(tmp_path)
    other = _config(**{"seed": 1, "model.motion_tokenizer.width": 16,
                       "model.attention_impl": "auto",
                       "stage1.steps": 20, "stage2.lr": 2.0, "eval.batch_size": 4})
    with pytest.raises(ValueError) as refused:
        _run(tmp_path, 20, other)
    message = str(refused.value)
    assert message.startswith(f"the checkpoint of step 5 in {tmp_path} was written under another "
                              f"config (3 keys differ: model.motion_tokenizer.width: 8 -> 16; "
                              f"seed: 0 -> 1; "
                              f"stage1.steps: 10 -> 20 (the cosine schedule decays over it")
    assert "move " in message and "allow_config_change=True" in message
    for unchecked in ("attention_impl", "stage2", "eval"):  # allowed or another stage's
        assert unchecked not in message
    assert tree_digest(tmp_path) == before


def test_a_complete_checkpoint_is_used_under_another_config_with_the_changes_logged(
        tmp_path, tree_digest):
    """`--stages 2 --config.seed=1` on a workdir whose VAE is done: nothing trains on from the
    finished VAE, so its seed (or any setting) may differ; only logged, nothing written."""
    _run(tmp_path, 10)
    before = tree_digest(tmp_path)
    lines = _run(tmp_path, 10, _config(**{"seed": 1, "model.motion_tokenizer.width": 16}))
    assert lines == [
        f"[toy] resuming from the checkpoint at step 10 in {tmp_path}",
        "[toy] config changed since step 10: model.motion_tokenizer.width: 8 -> 16 (complete at "
        "step 10: nothing trains under this config)",
        "[toy] config changed since step 10: seed: 0 -> 1 (complete at step 10: nothing trains "
        "under this config)",
        "[toy] already complete (10/10 steps)"]
    assert tree_digest(tmp_path) == before
    with pytest.raises(ValueError, match="seed: 0 -> 1"):  # training on from it still refuses
        _run(tmp_path, 15, _config(seed=1))


def test_allowed_config_changes_are_logged_and_recorded(tmp_path):
    _run(tmp_path, 5, _config(**{"stage1.schedule": "constant"}))
    lines = _run(tmp_path, 10, _config(**{"stage1.schedule": "constant", "stage1.steps": 30,
                                          "stage1.lr": 1e-4, "data.read_threads": 8}))
    notices = [x for x in lines if "config changed" in x]
    assert notices == [
        "[toy] config changed since step 5: data.read_threads: 2 -> 8 (execution only)",
        "[toy] config changed since step 5: stage1.lr: 0.001 -> 0.0001 (allowed on resume)",
        "[toy] config changed since step 5: stage1.steps: 10 -> 30 (the constant schedule does "
        "not depend on it)"]
    # A refused change passes with allow_config_change; the history accumulates.
    lines = _run(tmp_path, 15, _config(**{"stage1.schedule": "constant",
                                          "model.motion_tokenizer.width": 9}),
                 allow=True)
    assert any("model.motion_tokenizer.width: 8 -> 9 (accepted by checkpoint.allow_config_change)"
               in x
               for x in lines)
    ckpt = checkpointing.Checkpointer(str(tmp_path), async_save=False)
    history = ckpt.meta(15)["config_changes"]
    ckpt.close()
    assert history == [
        {"step": 5, "changes": {"data.read_threads": [2, 8], "stage1.lr": [1e-3, 1e-4],
                                "stage1.steps": [10, 30]}},
        {"step": 10, "changes": {"data.read_threads": [8, 2],
                                 "model.motion_tokenizer.width": [8, 9],
                                 "stage1.lr": [1e-4, 1e-3], "stage1.steps": [30, 10]}}]


def test_an_unreadable_checkpoint_is_set_aside_for_the_one_before(tmp_path):
    _run(tmp_path, 10)
    _damage(tmp_path / "10")
    lines = _run(tmp_path, 10)
    assert lines[0].startswith(f"[toy] warning: the checkpoint of step 10 in {tmp_path} could not "
                               f"be read: ")
    aside = [n for n in os.listdir(tmp_path) if n.startswith("10.unreadable-")]
    assert len(aside) == 1 and os.path.isdir(tmp_path / aside[0] / "state")  # kept, not deleted
    assert f"[toy] resuming from the checkpoint at step 5 in {tmp_path}" in lines
    assert checkpointing.all_steps(str(tmp_path)) == [5, 10]
    assert _steps_in(tmp_path / "data_log.txt") == list(range(1, 11))
    # Nothing readable left: one line, nothing renamed.
    for step in ("5", "10"):
        _damage(tmp_path / step)
    with pytest.raises(ValueError, match=f"none of the 2 checkpoints in {tmp_path} could be read "
                       r"\(.*step 10: .*\): move "):
        _run(tmp_path, 10)
    assert checkpointing.all_steps(str(tmp_path)) == [5, 10]


def test_a_phase_after_an_unreadable_phase_end_waits_for_the_phase_before(tmp_path):
    """Phases of steps 1-7 and 8-10 (as stage 2's self-pair phase and the VAE's frame phase),
    the checkpoint ending the first unreadable: steps 6-7 train again in the first phase, then
    the second runs (before, the second phase trained steps 6-10, two of them in its task)."""
    trained, lines = [], []

    def run_phase(phase, first_step):
        def step(state, batch):
            trained.append((phase[1], int(batch["x"][0]) + 1))
            return _step(state, batch)
        return _run(tmp_path, phase[0], train_step=step, log=lines, first_step=first_step)

    phases = [(7, "frames"), (10, "clips")]
    loop.run_phases(str(tmp_path), phases[:1], 7, run_phase)  # stopped after the first phase
    _damage(tmp_path / "7")
    trained.clear()
    loop.run_phases(str(tmp_path), phases, 10, run_phase)
    assert trained == [("frames", 6), ("frames", 7), ("clips", 8), ("clips", 9), ("clips", 10)]
    assert ("[toy] the checkpoint at step 5 is before this phase (steps 8-10): training the "
            "phase before it again") in lines
    assert _steps_in(tmp_path / "data_log.txt") == list(range(1, 11))
    assert any(n.startswith("7.unreadable-") for n in os.listdir(tmp_path))


def _purge_steps(directory):
    """Steps of the TensorBoard SessionLog events (purge markers) in `directory`."""
    from tensorboardX.proto import event_pb2
    out = []
    for name in sorted(os.listdir(directory)):
        if "tfevents" in name:
            data, i = (directory / name).read_bytes(), 0
            while i < len(data):
                n = struct.unpack("<Q", data[i:i + 8])[0]
                event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
                i += 16 + n
                if event.HasField("session_log"):
                    out.append(event.step)
    return out


def test_resume_drops_the_rows_the_abandoned_run_logged(tmp_path):
    _run(tmp_path, 8)  # checkpoints 5 and 8
    shutil.rmtree(tmp_path / "8")  # as if killed before step 8 was saved
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "lo')  # killed while writing
    _run(tmp_path, 8)
    assert _steps_in(tmp_path / "data_log.txt") == list(range(1, 9))
    assert _steps_in(tmp_path / "metrics.jsonl", lambda r: json.loads(r)["step"]) == \
        list(range(1, 9))
    assert _purge_steps(tmp_path) == [6]  # TensorBoard hides the first run's points after 5


def test_rows_hold_each_step_once_when_saves_and_rows_fall_apart(tmp_path):
    """Rows every 4 steps, saves every 5: a save also writes the steps since the last row, so a
    run resumed from step 5 logs what an uninterrupted one does (before, step 5 was in no row
    and the resumed row 8 averaged steps 6-8 alone)."""
    def step(state, batch):  # loss = the step's record index, step - 1
        return {"w": state["w"] + batch["x"][0]}, {"loss": batch["x"][0]}

    def rows(directory):
        return _steps_in(directory / "metrics.jsonl",
                         lambda r: (json.loads(r)["step"], json.loads(r)["loss"]))
    _run(tmp_path / "a", 12, train_step=step, log_every=4)
    _run(tmp_path / "b", 8, train_step=step, log_every=4)
    shutil.rmtree(tmp_path / "b" / "8")  # as if killed before step 8 was saved
    _run(tmp_path / "b", 12, train_step=step, log_every=4)
    assert rows(tmp_path / "a") == rows(tmp_path / "b") == [
        (4, 1.5), (5, 4.0), (8, 6.0), (10, 8.5), (12, 10.5)]


def test_a_run_killed_before_its_first_checkpoint_leaves_no_rows(tmp_path):
    """Killed during its first save (no checkpoint completed), the rerun starts from scratch:
    the killed run's rows go too (they had stayed, each step then logged twice)."""
    _run(tmp_path, 4)
    shutil.rmtree(tmp_path / "4")  # the only checkpoint, as if the kill came before it finished
    _run(tmp_path, 6)
    assert _steps_in(tmp_path / "data_log.txt") == list(range(1, 7))
    assert _steps_in(tmp_path / "metrics.jsonl", lambda r: json.loads(r)["step"]) == \
        list(range(1, 7))


def test_a_signal_during_a_save_stops_right_after_it(tmp_path, monkeypatch):
    save = checkpointing.Checkpointer.save

    def save_then_signal(self, step, *args):
        done = save(self, step, *args)
        os.kill(os.getpid(), signal.SIGTERM)
        return done
    monkeypatch.setattr(checkpointing.Checkpointer, "save", save_then_signal)
    with pytest.raises(loop.Preempted) as stopped:
        _run(tmp_path, 10)
    assert stopped.value.step == 5
    assert checkpointing.all_steps(str(tmp_path)) == [5]
    assert _steps_in(tmp_path / "data_log.txt") == list(range(1, 6))


def test_only_process_0_writes_the_data_log(tmp_path, monkeypatch):
    monkeypatch.setattr(loop.jax, "process_index", lambda: 1)
    monkeypatch.setattr(checkpointing.Checkpointer, "save", lambda *_: True)  # needs process 0
    _run(tmp_path, 2)
    assert not os.path.exists(tmp_path / "data_log.txt")


@pytest.mark.parametrize("stage, refused", [
    (1, ["model.motion_tokenizer.depth", "stage1.batch_size"]),
    (2, ["model.motion_tokenizer.depth", "model.retargeter.depth", "model.vae.dim",
         "stage2.batch_size"]),
    ("vae", ["model.vae.dim", "vae_training.batch_size"]),
    (3, ["model.dit.depth", "model.motion_tokenizer.depth", "model.retargeter.depth",
         "model.vae.dim", "sampling.overlap_frames", "stage3.batch_size", "text.embedding"])])
def test_each_stage_compares_its_own_sections(stage, refused):
    """Stage 2's baselines are written under their own overrides, so `stage2` is their section
    too; which baselines train, other stages' sections and model parts, the mesh and sampling
    settings other than stage 3's overlap are not compared."""
    sections = ("stage1", "stage2", "stage3", "vae_training")
    parts = ("motion_tokenizer", "retargeter", "vae", "dit")
    old = {"mesh": {"data": 1}, "text": {"embedding": ""}, "sampling": {"overlap_frames": 1,
           "steps": 4}, **{s: {"batch_size": 2} for s in sections},
           "model": {p: {"depth" if p != "vae" else "dim": 1} for p in parts}}
    new = json.loads(json.dumps(old))
    new["mesh"]["data"], new["text"]["embedding"], new["sampling"] = 2, "e.npy", {
        "overlap_frames": 5, "steps": 8}
    for s in sections:
        new[s]["batch_size"] = 4
    for p, v in new["model"].items():
        v.update({k: 2 for k in v})
    old["stage2"]["baselines"], new["stage2"]["baselines"] = ["conv"], []
    changes = checkpointing.check_config(
        {"config": json.dumps(old)}, {"stage": stage, "config": json.dumps(new)}, "", "",
        allow=True)
    assert [k for k, (_, _, why) in changes.items() if why.startswith("accepted")] == refused
    assert set(changes) - set(refused) == ({"stage2.baselines"} if stage == 2 else set())


def test_stage1_loads_compare_the_keys_that_change_its_maths_but_no_shape():
    """A stage-1 checkpoint under another quantizer.use_l2_norm is refused where stage 2,
    evaluation and generation load it; a training-only key (restart_threshold) is not compared."""
    def meta(**quantizer):
        return {"config": json.dumps({"model": {"quantizer": quantizer,
                                                "motion_tokenizer": {"is_legacy": False}}})}
    config = ml_collections.ConfigDict(json.loads(meta(use_l2_norm=True, restart_threshold=0.03)[
        "config"]))
    from im_anim_jax.training import stage1
    keys = stage1.forward_keys()
    checkpointing.check_forward_keys(meta(use_l2_norm=True, restart_threshold=0.0), config, keys,
                                     "the stage-1 checkpoint")
    with pytest.raises(ValueError, match=r"the stage-1 checkpoint was trained with another model "
                                         r"config \(1 keys differ: model\.quantizer\.use_l2_norm: "
                                         r"false -> true\)"):
        checkpointing.check_forward_keys(meta(use_l2_norm=False), config, keys,
                                         "the stage-1 checkpoint")
