"""The planner (im_anim_jax/plan.py): --mesh parsing and its one-line errors, the HLO collective
counter (loops counted per iteration), one abstract plan of the tiny stage-1 step, and the
stage-3 step traced at a non-square clip size."""
import json
import os
import subprocess
import sys

import pytest

from im_anim_jax import plan, sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_mesh_and_its_errors():
    assert sharding.parse_mesh("fsdp=16,tensor=4") == dict(data=1, fsdp=16, context=1, tensor=4)
    assert sharding.parse_mesh("data=-1, context=2")["data"] == -1
    for bad, words in (("fsdp=4,model=2", "AXIS=SIZE"), ("fsdp", "AXIS=SIZE"),
                       ("fsdp=x", "not an integer"), ("fsdp=-1,data=-1", "at most one -1"),
                       ("tensor=0", "positive"), ("fsdp=2,fsdp=4", "fsdp is given twice")):
        with pytest.raises(ValueError, match=words) as e:
            sharding.parse_mesh(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="needs 6 devices, but 8 are available"):
        sharding.mesh_shape(dict(fsdp=3, tensor=2), 8)
    with pytest.raises(ValueError, match="does not divide 8 devices"):
        sharding.mesh_shape(dict(fsdp=-1, tensor=3), 8)


def test_jaxpr_flops_count_every_scanned_layer_convolutions_and_remat():
    import jax
    import jax.numpy as jnp

    def stack(w, x):  # 10 remat'd layers: forward, recomputed forward, 2 backward matmuls each
        body = jax.checkpoint(lambda x, wi: (jnp.tanh(x @ wi), None))
        return jax.lax.scan(body, x, w)[0].sum()
    w, x = jnp.ones((10, 256, 256)), jnp.ones((64, 256))
    assert plan.step_flops(jax.grad(stack), w, x) == (10 * 4 * 2 * 64 * 256 * 256, 0)
    xla = jax.jit(jax.grad(stack)).lower(w, x).cost_analysis()["flops"]
    assert xla < 0.2 * 10 * 4 * 2 * 64 * 256 * 256  # why: XLA counts the scan body once

    def conv(k, x, groups):
        return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                            feature_group_count=groups).sum()
    x = jnp.ones((2, 8, 32, 32))
    dense = 2 * 2 * 16 * 32 * 32 * 8 * 9  # batch, out channels, pixels, in channels, 3x3
    assert plan.step_flops(lambda k: conv(k, x, 1), jnp.ones((16, 8, 3, 3)))[0] == dense
    # Depthwise: 8 channels, one input channel each; its weight gradient is a batch-grouped conv.
    assert plan.step_flops(jax.grad(lambda k: conv(k, x, 8)), jnp.ones((8, 1, 3, 3)))[0] == (
        2 * 2 * 2 * 8 * 32 * 32 * 9)
    # A strided conv's input gradient is a conv over the input dilated by the stride: the taps
    # on the inserted zeros are not work. An 8x8 patchify: backward-data costs what forward does.
    patchify = lambda x: jax.lax.conv_general_dilated(x, jnp.ones((16, 8, 8, 8)), (8, 8),  # noqa
                                                       "VALID").sum()
    forward = plan.step_flops(patchify, x)[0]
    assert forward == 2 * 2 * 16 * 4 * 4 * 8 * 64 and plan.step_flops(jax.grad(patchify), x)[0] == (
        2 * forward)


HLO = """HloModule step, entry_computation_layout={()->f32[]}

%body.1 (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %p = (s32[], f32[8,4]) parameter(0)
  %x = f32[2,4]{1,0} get-tuple-element(%p), index=1
  %ag = f32[8,4]{1,0} all-gather(f32[2,4]{1,0} %x), replica_groups=[2,4]<=[8], dimensions={0}, metadata={op_name="jit(step)/transpose(jvp(Model))/Model/encoder/while/body/eval_jaxpr/blocks/attn/all_gather"}
  ROOT %t = (s32[], f32[8,4]) tuple(%i, %ag)
}

%cond.2 (p: (s32[], f32[8,4])) -> pred[] {
  ROOT %lt = pred[] compare(%a, %b), direction=LT
}

ENTRY %main.3 (a: f32[8,4]) -> f32[] {
  %w = (s32[], f32[8,4]) while(%init), condition=%cond.2, body=%body.1, backend_config={"known_trip_count":{"n":"30"}}
  %rs = f32[2,4]{1,0} reduce-scatter(f32[8,4]{1,0} %a), replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, to_apply=%add
  %ar = f32[16]{0} all-reduce(f32[16]{0} %b), replica_groups={}, to_apply=%add
  %am = (f32[1,8]{1,0}, f32[1,8]{1,0}) all-reduce(%c, %d), channel_id=40, replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_2'=4] {'axis_2'}, use_global_device_ids=true, to_apply=%add
  %an = f32[16]{0} all-reduce(%e), channel_id=41, replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_2'=4], device_ids=([4,2]T(1,0)) {'axis_0'}, use_global_device_ids=true, to_apply=%add
  ROOT %r = f32[] constant(0)
}
"""


def test_collective_bytes_counts_loop_iterations_and_group_sizes():
    out = plan.collective_bytes(HLO, 8)
    assert out["all-gather"]["ops"] == 30 and out["all-gather"]["static_ops"] == 1
    assert out["all-gather"]["bytes"] == pytest.approx(30 * 128 * 3 / 4)  # n = 4 per group
    assert out["reduce-scatter"]["bytes"] == pytest.approx(32 * 3)  # result 32 B x (n - 1)
    # all 8 devices; then two [1, 8] floats over the mesh form's axis_2 (4 devices); then
    # [16] over axis_0 (2 devices) in the form with a device order (it counted all 8 before)
    assert out["all-reduce"]["bytes"] == pytest.approx(2 * 64 * 7 / 8 + 2 * 64 * 3 / 4
                                                       + 2 * 64 * 1 / 2)
    assert out["unknown_trip_counts"] == 0
    assert out["by_scope"] == {  # (kind, group size, module scope): bytes; no metadata: no name
        ("all-gather", 4, "encoder/blocks"): pytest.approx(30 * 128 * 3 / 4),
        ("reduce-scatter", 4, "(no HLO name)"): pytest.approx(32 * 3),
        ("all-reduce", 8, "(no HLO name)"): pytest.approx(2 * 64 * 7 / 8),
        ("all-reduce", 4, "(no HLO name)"): pytest.approx(2 * 64 * 3 / 4),
        ("all-reduce", 2, "(no HLO name)"): pytest.approx(2 * 64 * 1 / 2)}


def test_the_backward_pass_skips_a_frozen_prefix_of_the_stage2_path():
    """Ideal collectives: a frozen group before every trained one of the stage-2 path takes no
    input gradient, so its fsdp params are gathered once and the motion encoder's tensor-parallel
    all-reduces run forward only (the demo's stage 3 counted both twice: 1.7x its ideal)."""
    groups = ("motion_encoder", "quantize", "retargeter", "joint_head", "joint_decoder", "dit",
              "expression_encoder")
    params = dict.fromkeys(groups, {})
    demo3 = plan.backward_groups(params, dict.fromkeys(("dit", "expression_encoder")))
    assert demo3 == {"dit", "expression_encoder"}
    demo2 = plan.backward_groups(params, dict.fromkeys(("retargeter", "joint_head")))
    assert demo2 == {"retargeter", "joint_head", "joint_decoder", "dit", "expression_encoder"}
    assert plan.backward_groups(params, dict.fromkeys(("motion_encoder",))) == set(groups)


def _plan(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "im_anim_jax.plan",
                           "--config", os.path.join(ROOT, "configs/im_animation.py:tiny"),
                           *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)


def test_planner_cli_on_the_tiny_stage1_and_a_bad_mesh():
    res = _plan("--mesh", "fsdp=2", "--stage", "1", "--batch", "4", "--device_gib", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["devices"] == 2 and r["mesh"]["fsdp"] == 2 and r["fits"] is True
    assert r["flops_per_step"] > 0 and r["temps_gib"] > 0
    assert r["params_gib"] <= 1.05 * r["params_ideal_gib"] + 1e-4  # ZeRO-3: half per device
    # XLA:CPU gathers the fsdp-sharded params and all-reduces the gradients (no reduce-scatter).
    assert r["collective_gib"]["all-gather"] > 0 and r["collective_gib"]["all-reduce"] > 0
    assert "fits on 2 x 1 GiB: yes" in res.stdout
    scoped = sum(gib for kind, size, _, gib in r["collectives_by_scope"] if kind == "all-gather")
    assert 0 < scoped <= r["collective_gib"]["all-gather"] * (1 + 1e-9)
    assert any(where.startswith("motion_encoder") for *_, where, _ in r["collectives_by_scope"])
    res = _plan("--mesh", "fsdp=2,pipeline=2")
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: --mesh")


def test_stage3_step_traces_at_a_non_square_clip(tiny_config):
    """--height/--width size the reference and target (model.video_size); the driving frames
    stay at the motion tokenizer's square size. The whole step traces (eval_shape, no compile)
    with the latents, the reference grid and the DiT tokens of a 64x96 clip."""
    import jax
    config, _ = plan.configure(tiny_config, 3, "data=1", None, 64, 96, 2)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    step, (state, batch, z_ref, x0) = plan.stage_step(config, 3, mesh)
    s = config.model.motion_tokenizer.image_size
    assert batch["driving"].shape[2:4] == (s, s) and s == 32
    assert z_ref.shape[2:4] == (4, 6) and x0.shape[2:4] == (4, 6)  # 16x VAE compression
    with jax.set_mesh(mesh):
        new_state, metrics = jax.eval_shape(step, state, batch, z_ref, x0)
    assert metrics["loss"].shape == ()
    assert jax.tree.map(lambda a: a.shape, new_state.params) == jax.tree.map(
        lambda a: a.shape, state.params)
    with pytest.raises(ValueError, match="stage 1 reads driving frames"):
        plan.configure(tiny_config, 1, "data=1", None, 64, 96, 2)
    with pytest.raises(ValueError, match="must be positive multiples of 32"):
        plan.configure(tiny_config, 3, "data=1", None, 48, 96, 2)
    with pytest.raises(ValueError, match="--height 0 --width 96: sizes must be positive"):
        plan.configure(tiny_config, 3, "data=1", None, 0, 96, 2)
    for frames, batch, flag in ((0, 2, "--frames 0"), (None, -4, "--batch -4")):
        with pytest.raises(ValueError, match=f"{flag}: must be a positive integer"):
            plan.configure(tiny_config, 3, "data=1", frames, None, None, batch)


def test_shard_map_flops_count_the_manual_axes_only():
    """A shard_map manual over some mesh axes runs its body once per manual shard (jax 0.10
    records them as `newly_manual_axes`; before, the planner read `manual_axes` and counted the
    whole mesh)."""
    code = """
import jax
jax.config.update("jax_num_cpu_devices", 8)
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from im_anim_jax import plan
mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
x, w = jnp.ones((8, 16)), jnp.ones((16, 16))
f = jax.shard_map(lambda x, w: x @ w, mesh=mesh, in_specs=(P("a"), P()), out_specs=P("a"),
                  axis_names={"a"}, check_vma=False)
with jax.set_mesh(mesh):
    print(plan.step_flops(jax.jit(f), x, w)[0])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split()[-1]) == 4 * (2 * 2 * 16 * 16)  # 4 shards of [2,16]@[16,16]


def test_collective_bytes_of_merged_asynchronous_collectives():
    """GPU/TPU compiles start collectives asynchronously, merged into tuples: every output counts
    (before, one: 36,864 bytes counted of 61,440 for this all-reduce pair)."""
    hlo = """HloModule m

ENTRY %main (a: f32[1024], b: f32[4096]) -> f32[1024] {
  %ars = (f32[1024]{0}, f32[4096]{0}) all-reduce-start(f32[1024]{0} %a, f32[4096]{0} %b), replica_groups=[1,4]<=[4], to_apply=%add
  %ags = ((f32[256]{0}, f32[1024]{0}), (f32[1024]{0}, f32[4096]{0})) all-gather-start(f32[256]{0} %x, f32[1024]{0} %y), replica_groups=[1,4]<=[4], dimensions={0}
  %ar = (f32[1024]{0}, f32[4096]{0}) all-reduce(f32[1024]{0} %a, f32[4096]{0} %b), replica_groups=[1,4]<=[4], to_apply=%add
  %rss = ((f32[1024]{0}), f32[256]{0}) reduce-scatter-start(f32[1024]{0} %a), replica_groups=[1,4]<=[4], dimensions={0}, to_apply=%add
  ROOT %r = f32[1024]{0} copy(%a)
}
"""
    out = plan.collective_bytes(hlo, 4)
    outputs = (1024 + 4096) * 4  # bytes of the two outputs of each op
    assert out["all-reduce"]["bytes"] == pytest.approx(2 * (2 * outputs * 3 / 4))
    assert out["all-gather"]["bytes"] == pytest.approx(outputs * 3 / 4)
    # a reduce-scatter's result is its scattered output (before: its input, n times too much)
    assert out["reduce-scatter"]["bytes"] == pytest.approx(256 * 4 * 3)
