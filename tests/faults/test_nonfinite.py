"""Non-finite loss or gradients (a NaN injected through faults.inject_nan_steps): the step is
skipped and counted; too many in a row stop the run (exit 4) with the last checkpoint intact."""
import os

import jax
import numpy as np

import faultrun
from data_pipelines import pipeline
from im_anim_jax import sharding
from im_anim_jax.models.stage1 import build_stage1
from im_anim_jax.training import stage1 as stage1_training


def test_a_nan_step_leaves_the_state_unchanged_and_is_counted(tiny_config, tiny_dataset):
    config = tiny_config.copy_and_resolve_references()
    config.faults.inject_nan_steps = (2,)
    mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
    model, tx = build_stage1(config.model), stage1_training.make_optimizer(config.stage1)
    state, _, state_sh = stage1_training.init_state(model, tx, config, mesh, rules)
    step = stage1_training.make_train_step(model, tx, config, mesh, rules, state_sh)
    data = iter(pipeline.train_dataset(tiny_dataset, "train", clip_frames=1, batch_size=4,
                                       targets=stage1_training.targets(config), seed=0))
    states, metrics = [], []
    for _ in range(3):
        batch = next(data)
        batch.pop("bad_records")
        state, m = step(state, sharding.global_batch(batch, mesh))
        states.append(jax.device_get(state))
        metrics.append(jax.device_get(m))
    assert [int(m["nonfinite_in_a_row"]) for m in metrics] == [0, 1, 0]
    assert [int(m["nonfinite_total"]) for m in metrics] == [0, 1, 1]
    assert np.isnan(metrics[1]["loss"]) and np.isfinite(metrics[2]["loss"])
    assert [int(s.step) for s in states] == [1, 2, 3]
    # Step 2 changed nothing but the step counter and the guard's counts.
    same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)  # noqa: E731
    same(states[1].params, states[0].params)
    same(states[1].opt_state.inner_state, states[0].opt_state.inner_state)
    same(states[1].code_usage, states[0].code_usage)
    # Step 3 trained again, from finite params.
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(states[2].params))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(states[2].params),
                                                         jax.tree.leaves(states[1].params)))


def test_nan_steps_are_skipped_and_too_many_in_a_row_stop_with_exit_4(tmp_path, tiny_dataset):
    """Step 4 alone is skipped and training goes on; 11-13 in a row stop the run at 13 (limit 3),
    leaving the checkpoint of step 10 (written after the skipped step 4) as the newest."""
    workdir = str(tmp_path)
    res = faultrun.run(faultrun.train_cmd(workdir, tiny_dataset, 40,
                                          "--config.faults.inject_nan_steps=(4,11,12,13,14)",
                                          "--config.faults.max_nonfinite_in_a_row=3"))
    assert res.returncode == 4, res.stdout + res.stderr
    rows = {r["step"]: r for r in faultrun.read_metrics(os.path.join(workdir, "stage1"))}
    assert [rows[s]["nonfinite_total"] for s in (3, 4, 5, 10, 11, 12)] == [0, 1, 1, 1, 2, 3]
    assert np.isnan(rows[4]["loss"]) and np.isfinite(rows[10]["loss"])
    assert res.stdout.count("non-finite loss or gradients: update skipped") == 4
    assert "stopped at step 13: 3 steps in a row had a non-finite loss" in res.stdout
    assert "the last checkpoint (step 10) is intact" in res.stdout
    assert res.stderr.strip().splitlines()[-1].startswith("error: [stage1] stopped at step 13")
    assert faultrun.checkpoint_steps(workdir) == [10]
    saved = faultrun.state_arrays(workdir, 10)
    assert all(np.isfinite(v).all() for v in saved.values() if v.dtype.kind == "f")
    # Rerunning without the NaNs resumes from it and finishes.
    res = faultrun.run(faultrun.train_cmd(workdir, tiny_dataset, 40))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resuming from the checkpoint at step 10 " in res.stdout


def test_checkpoints_from_before_the_guard_restore_with_zero_counts(tmp_path):
    """0.1.0 checkpoints hold the bare optimizer state; it restores inside the guard's."""
    import optax

    from im_anim_jax.training import checkpointing
    from im_anim_jax.training import state as train_state
    inner = optax.adamw(1e-3)
    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    old = train_state.TrainState(step=np.int32(7), params=params, opt_state=inner.init(params),
                                 rng=np.zeros(2, np.uint32))
    old = old.replace(opt_state=inner.update(params, old.opt_state, params)[1])  # count 1
    ckpt = checkpointing.Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(7, jax.device_put(old), None, {})
    tx = train_state.guard(inner)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                                           sharding=sharding),
                            old.replace(opt_state=tx.init(params)))
    restored = ckpt.restore(7, abstract)
    ckpt.close()
    guard = restored.opt_state
    assert (int(guard.notfinite_count), bool(guard.last_finite), int(guard.total_notfinite)) == \
        (0, True, 0)
    jax.tree.map(np.testing.assert_array_equal, guard.inner_state, old.opt_state)
    np.testing.assert_array_equal(restored.params["w"], params["w"])


def _loop(tmp_path, steps, train_step, log_every=1):
    """training.loop.run on a toy state and a Grain iterator, a checkpoint every 100 steps."""
    import grain
    import jax.numpy as jnp
    import ml_collections
    from im_anim_jax.training import loop
    data = iter(grain.MapDataset.range(10_000).map(
        lambda i: {"x": np.full((1,), i, np.float32), "record": np.full((1,), i, np.int32),
                   "start": np.zeros((1,), np.int32)}).to_iter_dataset())
    return loop.run(
        name="toy", stage_dir=str(tmp_path), state={"w": jnp.zeros(2)}, abstract_state=None,
        train_step=train_step, data_iter=data, mesh=sharding.make_mesh(
            ml_collections.ConfigDict(dict(shape=dict(data=-1, fsdp=1, context=1, tensor=1)))),
        total_steps=steps, log_every=log_every, checkpoint_every=100,
        ckpt_cfg=ml_collections.ConfigDict(dict(max_to_keep=2, async_save=False)),
        meta={}, max_nonfinite_in_a_row=2, log=lambda s: None)


def test_a_streak_reaching_the_limit_on_the_last_step_stops_before_a_checkpoint_on_accelerators(
        tmp_path, monkeypatch):
    """Accelerators read the guard's streak one step late; the last step's is read before its
    checkpoint, so a run whose last two steps were skipped ends with Diverged and no new
    checkpoint (XLA:CPU syncs every step; the accelerator path is simulated)."""
    import pytest
    from im_anim_jax.training import loop
    monkeypatch.setattr(loop.jax, "default_backend", lambda: "gpu")

    def step(state, batch):
        bad = int(batch["x"][0]) >= 4  # steps 5 and 6 (the data starts at 0)
        streak = int(batch["x"][0]) - 3 if bad else 0
        return state, {"loss": np.float32(np.nan if bad else 1.0),
                       "nonfinite_in_a_row": np.int32(streak), "nonfinite_total": np.int32(streak)}
    with pytest.raises(loop.Diverged) as stopped:
        _loop(tmp_path, 6, step)
    assert stopped.value.step == 6 and stopped.value.code == 4
    assert not [n for n in os.listdir(tmp_path) if n.isdigit()]


def test_a_signal_during_the_last_step_still_stops_with_exit_3(tmp_path):
    """SIGTERM while the last step runs: its checkpoint is written, then Preempted (exit 3), not
    a normal return that would go on to the next stage."""
    import signal

    import pytest
    from im_anim_jax.training import loop

    def step(state, batch):
        if int(batch["x"][0]) == 4:  # step 5 of 5
            os.kill(os.getpid(), signal.SIGTERM)
        return state, {"loss": np.float32(1.0)}
    with pytest.raises(loop.Preempted) as stopped:
        _loop(tmp_path, 5, step)
    assert stopped.value.step == 5 and stopped.value.code == 3
    assert [n for n in os.listdir(tmp_path) if n.isdigit()] == ["5"]


def test_a_streak_reaching_the_limit_just_before_a_checkpoint_stops_on_accelerators(
        tmp_path, monkeypatch):
    """Accelerators read each step's streak one step late. A checkpoint step read its own streak
    and dropped the one still unread, so a limit reached on the step before a save went
    unnoticed and the run checkpointed on (CPU, syncing every step, stopped)."""
    import pytest
    from im_anim_jax.training import loop
    monkeypatch.setattr(loop.jax, "default_backend", lambda: "gpu")

    def step(state, batch):
        streak = {3: 1, 4: 2}.get(int(batch["x"][0]), 0)  # steps 4 and 5 skipped, 6 fine
        return state, {"loss": np.float32(np.nan if streak else 1.0),
                       "nonfinite_in_a_row": np.int32(streak), "nonfinite_total": np.int32(streak)}
    with pytest.raises(loop.Diverged) as stopped:
        _loop(tmp_path, 6, step)   # the last step saves
    assert stopped.value.step == 6
    assert not [n for n in os.listdir(tmp_path) if n.isdigit()]


def test_a_stop_between_log_rows_writes_the_partial_window(tmp_path):
    """SIGTERM at step 6 with a row every 4 steps: the means over steps 5-6 are written before
    Preempted (they were dropped, so a resumed run's metrics missed those steps)."""
    import json
    import signal

    import pytest
    from im_anim_jax.training import loop

    def step(state, batch):
        if int(batch["x"][0]) == 5:  # step 6
            os.kill(os.getpid(), signal.SIGTERM)
        return state, {"loss": np.float32(batch["x"][0] + 1)}   # step k: loss k
    with pytest.raises(loop.Preempted):
        _loop(tmp_path, 10, step, log_every=4)
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [(r["step"], r["loss"]) for r in rows] == [(4, 2.5), (6, 5.5)]
