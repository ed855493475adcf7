"""One training step of every stage (1, 2, 3, and the VAE the demo trains) on the meshes
(data, fsdp, context, tensor) = (8,1,1,1), (2,4,1,1), (2,2,1,2), (1,2,2,2) gives the loss and
updated state of the same step on one device, for the tiny configs.

Each stage runs in its own subprocess with 8 simulated CPU devices (the device count must be
set before jax starts), so pytest-xdist can spread them (conftest: one group per test). Per
stage the state is initialised once on one device (the tiny VAE's init runs on every mesh, for
its shardings); each mesh gets a copy placed by its own shardings, then two steps run (the
warmup schedules give the first step a zero learning rate, so the second is the one that moves
the params; both losses are compared) and the whole state (params, optimizer moments,
counters) is compared with the one-device run.

Tolerances (float32; the meshes only change reduction order and collectives): losses rtol 1e-5;
optimizer state and counters |a - b| <= 1e-5 * max|b| + 1e-6 per leaf (relative to the leaf's
scale; Adam's moments are the gradients and their squares); params |a - b| <= a fifth of the
largest change of any param in the one-device run, about its second step's learning rate (Adam's
first updates are ~lr): 1e-4 where the warmup is 2 steps (lr 5e-4), 2e-5 for tiny stage 1 (10
warmup steps: lr 1e-4), so a mesh run that skipped the update is 5x over. Adam's update
m / (sqrt(v) + eps) turns the rounding noise of gradients that are zero in exact arithmetic
(attention key biases: softmax ignores a shift of the keys) into changes of up to ~10% of the
learning rate (measured 4.5e-5 at lr 5e-4: stage 2 on 1x2x2x2; 1e-7 at 1e-4 for stage 1).
"""
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ((8, 1, 1, 1), (2, 4, 1, 1), (2, 2, 1, 2), (1, 2, 2, 2))
BATCH = 8  # divisible by data x fsdp of every mesh
LOSS_RTOL = 1e-5
STATE_RTOL, STATE_ATOL = 1e-5, 1e-6
PARAM_RTOL = 0.2  # of the largest param change of the one-device run


@pytest.mark.parametrize("stage", ["stage3", "vae", "stage2", "stage1"])  # longest first
def test_stage_step_matches_one_device_on_four_meshes(stage):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "configs")]))
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, os.path.abspath(__file__), stage], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=3600)
    assert res.returncode == 0, res.stderr[-4000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert list(report) == [stage], report
    print(f"{time.perf_counter() - t0:.0f} s; worst per stage and mesh: {report}")
    failures = [f"{stage} on {mesh}: {r}" for stage, by_mesh in report.items()
                for mesh, r in by_mesh.items() if not r["ok"]]
    assert not failures, "\n".join(failures)


def test_two_processes_join_one_mesh_and_checkpoint_collectively(tmp_path):
    """distributed.initialize from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID:
    2 processes x 2 CPU devices make one 4-device mesh; each feeds only its own rows
    (sharding.global_batch), a jitted sum sees all of them, and Orbax writes one checkpoint with
    a part from each process."""
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = []
    for pid in range(2):
        env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(pid), JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                   XLA_FLAGS="--xla_force_host_platform_device_count=2")
        procs.append(subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--multihost", str(tmp_path / "ckpt")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert json.loads(out.strip().splitlines()[-1]) == {
            "processes": 2, "devices": 4, "rows": 4, "sum": 18.0,
            "context_mesh": ["refused by check_batch_size", "refused by global_batch"]}
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(tmp_path / "ckpt"))


def test_a_batch_shard_must_sit_in_one_process():
    """data=2 x tensor=2 over 2 processes passes the count check (data x fsdp = 2 shards for 2
    processes) but, with the devices interleaved as a TPU slice's layout can order them, each
    batch shard spans both hosts: refused before any data (it used to fail at the first batch
    in make_array_from_process_local_data)."""
    import types

    import numpy as np

    from im_anim_jax import sharding

    def mesh(owners):  # owners [data][tensor] -> process index of each device
        devices = np.array([[types.SimpleNamespace(process_index=p) for p in row]
                            for row in owners], dtype=object).reshape(2, 1, 1, 2)
        return types.SimpleNamespace(axis_names=("data", "fsdp", "context", "tensor"),
                                     devices=devices, shape={"data": 2, "fsdp": 1})
    assert sharding.batch_layout_problem(mesh([[0, 0], [1, 1]])) is None
    problem = sharding.batch_layout_problem(mesh([[0, 1], [0, 1]]))
    assert problem.startswith("batch shard 0 of the data x fsdp axes has devices on processes "
                              "[0, 1]")
    assert "unequal numbers of batch shards [2, 0, 1]" in sharding.batch_layout_problem(
        types.SimpleNamespace(axis_names=("data", "fsdp"), shape={"data": 3, "fsdp": 1},
                              devices=np.array([[types.SimpleNamespace(process_index=p)]
                                                for p in (0, 0, 2)], dtype=object)))


def test_cluster_launches_are_told_from_single_processes(monkeypatch):
    """Only a launch jax.distributed can itself join counts: an salloc shell or an sbatch script
    without srun (no job step) is one process, where it used to fail with `coordinator_address
    should be defined`; a Kubernetes indexed job without the `kubernetes` package is one line."""
    from im_anim_jax import distributed
    salloc = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}
    assert distributed.initialize(salloc) is False
    srun = dict(salloc, SLURM_STEP_NODELIST="n[1-2]", SLURM_PROCID="0", SLURM_LOCALID="0")
    assert distributed._cluster_size(srun) == 4
    assert distributed._cluster_size({"OMPI_COMM_WORLD_SIZE": "3"}) == 1  # no mpirun URI
    assert distributed._cluster_size({"OMPI_COMM_WORLD_SIZE": "3",
                                      "OMPI_MCA_orte_hnp_uri": "1.0;tcp://h:1"}) == 3
    # A process count without the coordinator: each host would have trained alone, on the same
    # workdir (before: a single process, silently).
    for env in ({"JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"},
                {"JAX_COORDINATOR_ADDRESS": "", "JAX_NUM_PROCESSES": "4"}):
        with pytest.raises(ValueError, match="describe a multi-host run, but "
                                             "JAX_COORDINATOR_ADDRESS is not set"):
            distributed.initialize(env)
    assert distributed.initialize({"JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}) is False
    monkeypatch.setattr(distributed.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install kubernetes"):
        distributed.initialize({"KUBERNETES_SERVICE_HOST": "h", "JOB_COMPLETION_INDEX": "0"})


def _multihost(directory: str):
    """One process of the two-process test: rows filled with (process index + 1)."""
    from im_anim_jax import distributed
    assert distributed.initialize()
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np
    import orbax.checkpoint as ocp

    from im_anim_jax import sharding
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(shape=dict(data=-1, fsdp=2))))
    rows = {"x": np.full((2, 3), jax.process_index() + 1, np.float32)}
    batch = sharding.global_batch(rows, mesh)
    total = jax.jit(lambda b: jnp.sum(b["x"]),
                    out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(directory, batch)
    ckpt.wait_until_finished()
    # Batch axes that do not span the hosts (context across them): each process's rows would
    # be one shard's replicas, different on each host. Refused by both the check and the feed.
    ctx = sharding.make_mesh(ml_collections.ConfigDict(dict(shape=dict(data=1, context=-1))))
    context_mesh = []
    try:
        sharding.check_batch_size(4, ctx, "stage1.batch_size")
    except ValueError as e:
        if "must be a multiple of the number of processes 2" in str(e):
            context_mesh.append("refused by check_batch_size")
    try:
        sharding.global_batch(rows, ctx)
    except ValueError:
        context_mesh.append("refused by global_batch")
    print(json.dumps({"processes": jax.process_count(), "devices": jax.device_count(),
                      "rows": batch["x"].shape[0], "sum": float(total(batch)),
                      "context_mesh": context_mesh}))


# ---------------------------------------------------------------- the subprocess (8 devices)

def _batches(config, rng):
    """Random uint8 clips and float targets of the tiny config's shapes, per stage."""
    import numpy as np
    s = config.model.motion_tokenizer.image_size
    hm = config.model.joint_decoder.heatmap_size

    def clip(t):
        return {"frames": rng.integers(0, 256, (BATCH, t, s, s, 3), dtype=np.uint8),
                "keypoints": np.concatenate(
                    [rng.uniform(0, s - 1, (BATCH, t, 62, 2)), np.ones((BATCH, t, 62, 1))],
                    -1).astype(np.float32),
                "heatmaps": rng.uniform(0, 1, (BATCH, t, 62, hm, hm)).astype(np.float32),
                "joint_weights": (rng.uniform(0, 1, (BATCH, t, 62)) > 0.2).astype(np.float32)}

    def pairs(t):
        c = clip(t)
        return {"driving": c["frames"], "driving_keypoints": c["keypoints"],
                "target_keypoints": c["keypoints"][..., ::-1, :].copy(),
                "heatmaps": c["heatmaps"], "joint_weights": c["joint_weights"],
                "reference": rng.integers(0, 256, (BATCH, s, s, 3), dtype=np.uint8),
                "target": rng.integers(0, 256, (BATCH, t, s, s, 3), dtype=np.uint8)}
    vae_frames = (BATCH, config.vae_training.clip_frames, s, s, 3)
    return {"vae": {"frames": rng.integers(0, 256, vae_frames, dtype=np.uint8)},
            "stage1": clip(config.stage1.clip_frames),
            "stage2": pairs(config.stage2.clip_frames), "stage3": pairs(config.stage3.clip_frames)}


def _stages(config):
    """{stage: (init(mesh) -> (state, state_sh), make_step(mesh, state_sh) -> run_step)}."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from im_anim_jax import sharding, text
    from im_anim_jax.models.stage1 import build_stage1
    from im_anim_jax.models.stage2 import build_stage2
    from im_anim_jax.models.wan import vae
    from im_anim_jax.training import stage1, stage2, stage3
    from im_anim_jax.training import vae as vae_training

    rules = sharding.rules(config.mesh)
    vae_model = vae.build_vae(config.model.vae, config.model.dtype, config.model.attention_impl)
    vae_params = jax.jit(lambda k: nn.unbox(vae_model.init(
        k, jnp.zeros((1, 1, vae_model.space_factor, vae_model.space_factor, 3)))["params"]))(
        jax.random.key(1))

    def ref_encoder(mesh):  # a freshly initialised tiny VAE's encoder, replicated on `mesh`
        params = jax.device_put(vae_params, NamedSharding(mesh, P()))
        return vae_training.reference_encoder(config, vae_model, params)

    one = ref_encoder(sharding.make_mesh(config.mesh, jax.devices()[:1]))
    grid, dim = one.grid, one.dim
    s1_model, s1_tx = build_stage1(config.model), stage1.make_optimizer(config.stage1)
    s2_model, s2_tx = build_stage2(config.model, grid), stage1.make_optimizer(config.stage2)
    s3_model = stage3.stage3_model.build_stage3(config.model, grid)
    s3_tx = stage3.make_optimizer(config.stage3, stage3._trained(
        stage3.abstract_params(s3_model, config, dim), config))
    context = jnp.asarray(text.context(config))
    v_tx = stage1.make_optimizer(config.vae_training)

    from im_anim_jax import plan

    def first(f, stage, model, tx, ref_dim=0):
        """init(mesh): the real init_state on the first (one-device) mesh, then only the
        shardings of the others (plan.abstract_state: traced, nothing compiled)."""
        def init(mesh, real):
            return f(mesh)[0::2] if real else (
                None, plan.abstract_state(config, stage, model, tx, mesh, ref_dim)[1])
        return init
    return {
        # The VAE on clips (its temporal path); tiny: every mesh initialises it for real.
        "vae": (lambda m, real: vae_training.init_state(vae_model, v_tx, config, m)[0::2],
                lambda m, sh: vae_training.make_train_step(
                    vae_model, v_tx, config.vae_training.kl_weight, m, rules, sh)),
        "stage1": (first(lambda m: stage1.init_state(s1_model, s1_tx, config, m, rules), 1,
                         s1_model, s1_tx),
                   lambda m, sh: stage1.make_train_step(s1_model, s1_tx, config, m, rules, sh)),
        "stage2": (first(lambda m: stage2.init_state(s2_model, s2_tx, config, m, dim), 2,
                         s2_model, s2_tx, dim),
                   lambda m, sh: stage2.make_train_step(s2_model, s2_tx, config, m, rules, sh,
                                                        ref_encoder(m))),
        "stage3": (first(lambda m: stage3.init_state(s3_model, s3_tx, config, m, dim), 3,
                         s3_model, s3_tx, dim),
                   lambda m, sh: stage3.make_train_step(s3_model, s3_tx, config, m, rules, sh,
                                                        ref_encoder(m), context)),
    }


def _compare(ref, got, params0) -> dict:
    """Worst loss and state deviations of `got` from `ref` ((losses, state) on host), both
    stepped from `params0`."""
    import jax
    import numpy as np
    loss_err = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(got[0], ref[0]))
    step = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)),
                            initial=0.0))
               for a, b in zip(jax.tree.leaves(ref[1].params), jax.tree.leaves(params0)))
    worst, where = 0.0, ""
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got[1])[0],
                            jax.tree.leaves(ref[1])):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        name = jax.tree_util.keystr(path)
        scale = max(PARAM_RTOL * step, 1e-12) if name.startswith(".params") else (
            STATE_RTOL * float(np.max(np.abs(b), initial=0.0)) + STATE_ATOL)
        err = float(np.max(np.abs(a - b), initial=0.0)) / scale
        if err > worst:
            worst, where = err, name
    return {"loss_rel_err": loss_err, "state_err_over_tol": worst, "worst_leaf": where,
            "param_step": step, "ok": bool(step > 0 and loss_err <= LOSS_RTOL and worst <= 1.0)}


def main():
    import im_animation
    import jax
    import numpy as np

    from im_anim_jax import sharding
    assert jax.device_count() == 8, jax.devices()
    config = im_animation.get_config("tiny")
    for stage in ("stage1", "stage2", "stage3"):
        config[stage].batch_size = BATCH
    # The dead-code restart is its own small jit after the step (one compile more per mesh).
    config.model.quantizer.restart_threshold = 0.0
    batches = _batches(config, np.random.default_rng(0))
    one = config.copy_and_resolve_references()
    one.mesh.shape.update(dict(data=1, fsdp=1, context=1, tensor=1))
    meshes = {"1x1x1x1": sharding.make_mesh(one.mesh, jax.devices()[:1])}
    for shape in MESHES:
        c = config.copy_and_resolve_references()
        c.mesh.shape.update(dict(zip(sharding.MESH_AXES, shape)))
        meshes["x".join(map(str, shape))] = sharding.make_mesh(c.mesh)
    report = {}
    only = sys.argv[1:]
    for stage, (init, make_step) in _stages(config).items():
        if only and stage not in only:
            continue
        results, state0 = {}, None
        for name, mesh in meshes.items():
            t0 = time.perf_counter()
            state, state_sh = init(mesh, state0 is None)
            if state0 is None:  # one initialisation; every mesh starts from its values
                state0 = jax.device_get(state)
            state = jax.device_put(state0, state_sh)
            run_step = make_step(mesh, state_sh)
            losses = []
            for _ in range(2):
                state, metrics = run_step(state, sharding.global_batch(batches[stage], mesh))
                losses.append(float(metrics["loss"]))
            results[name] = (losses, jax.device_get(state))
            print(f"{stage} {name}: loss {losses} {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr, flush=True)
        ref = results.pop("1x1x1x1")
        report[stage] = {name: _compare(ref, got, state0.params) for name, got in results.items()}
    print(json.dumps(report))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--multihost"]:
        _multihost(sys.argv[2])
    else:
        main()
