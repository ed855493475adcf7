"""The legacy data-parallel stage-1 step (training/data_parallel.py: shard_map and pmap over 4
simulated CPU devices) gives the loss and updated state of stage1.make_train_step on one device
(float32; reduction order only, tolerances of tests/test_sharding_equivalence.py: losses rtol
1e-5, optimizer state 1e-5 of its scale + 1e-6, params 1e-4), and skips a non-finite step as it
does. One subprocess: the device count
must be set before jax starts."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shard_map_and_pmap_steps_match_the_stage1_step():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "configs")]))
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    res = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    for kind in ("shard_map", "pmap"):
        r = report[kind]
        assert r["loss_rel_err"] <= 1e-5, (kind, r)
        assert r["state_err_over_tol"] <= 1.0, (kind, r)
        assert report[f"{kind}_nan_step"] == {"params_kept": True, "nonfinite_in_a_row": 1}


def main():
    import im_animation
    import jax
    import numpy as np

    from im_anim_jax import sharding
    from im_anim_jax.models.stage1 import build_stage1
    from im_anim_jax.training import data_parallel, stage1
    from tests.test_sharding_equivalence import _batches, _compare

    config = im_animation.get_config("tiny")
    config.stage1.batch_size = 8
    config.model.quantizer.restart_threshold = 0.0
    # Every loss term of the stage-1 step (the demo's): the cross-entropy and the patch head.
    config.stage1.update(dict(heatmap_ce_weight=0.5, patch_heatmap_weight=0.7))
    config.model.motion_tokenizer.patch_heatmap_head = True
    config.mesh.shape.update(dict(data=1, fsdp=1, context=1, tensor=1))
    batch = _batches(config, np.random.default_rng(0))["stage1"]
    model, tx = build_stage1(config.model), stage1.make_optimizer(config.stage1)
    mesh, rules = sharding.make_mesh(config.mesh, jax.devices()[:1]), sharding.rules(config.mesh)
    state, _, state_sh = stage1.init_state(model, tx, config, mesh, rules)
    state0 = jax.device_get(state)
    run = stage1.make_train_step(model, tx, config, mesh, rules, state_sh)
    losses = []
    for _ in range(2):  # the warmup gives step 1 a zero learning rate: step 2 moves the params
        state, metrics = run(state, sharding.global_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    ref = (losses, jax.device_get(state))
    devices, report = jax.devices()[:4], {}
    for kind in sys.argv[1:] or data_parallel.KINDS:
        step = data_parallel.make_step(model, tx, config, devices, kind)
        state, losses = data_parallel.replicate(state0, devices, kind), []
        for _ in range(2):
            state, metrics = step(state, data_parallel.split_batch(batch, devices, kind))
            losses.append(float(np.asarray(metrics["loss"]).reshape(-1)[0]))
        report[kind] = _compare(ref, (losses, data_parallel.unreplicate(state, kind)),
                                state0.params)
        # The trainer's fault handling: an injected NaN step is skipped alike on every device
        # and counted in the guard's metrics.
        config.faults.inject_nan_steps = (1,)
        nan_step = data_parallel.make_step(model, tx, config, devices, kind)
        config.faults.inject_nan_steps = ()
        state = data_parallel.replicate(state0, devices, kind)
        state, metrics = nan_step(state, data_parallel.split_batch(batch, devices, kind))
        after = data_parallel.unreplicate(state, kind)
        report[f"{kind}_nan_step"] = {
            "params_kept": all(bool(np.array_equal(a, b)) for a, b in zip(
                jax.tree.leaves(after.params), jax.tree.leaves(state0.params))),
            "nonfinite_in_a_row": int(np.asarray(metrics["nonfinite_in_a_row"]).reshape(-1)[0])}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
