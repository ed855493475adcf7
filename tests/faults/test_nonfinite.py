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
