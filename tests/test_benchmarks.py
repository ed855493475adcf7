"""The benchmark tools' own logic: the step-profile summary and the scaling sweep's inputs."""
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import profile_summary, scaling
from im_anim_jax import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(5):
            x = jnp.tanh(nn.Dense(512, name=f"big_{i}")(x))
        return nn.Dense(1, name="small")(x).sum()


def test_profile_summary_names_the_scope_that_does_the_work(tmp_path):
    net = _Net()
    x = jnp.ones((256, 512))
    params = net.init(jax.random.key(0), x)
    grad = jax.jit(jax.grad(lambda p: net.apply(p, x)))
    compiled = grad.lower(params).compile()
    jax.block_until_ready(compiled(params))
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        jax.block_until_ready(compiled(params))
    summary = profile_summary.summarize(str(tmp_path), compiled.as_text(), top=50, depth=1)
    scopes = {name: ms for name, ms, _ in summary["scopes"]}
    assert summary["busy_ms"] > 0 and summary["kernels"]
    # each big_i: a [256, 512] x [512, 512] matmul forward and two backward; small: 512 -> 1;
    # the tanh (in _Net's own code) is '(top level)'
    big = sum(scopes.get(f"big_{i}", 0.0) for i in range(5))
    assert all(f"big_{i}" in scopes for i in range(5)) and "(top level)" in scopes, scopes
    assert big > 0.3 * summary["busy_ms"] and big > 10 * scopes.get("small", 0.0), scopes
    assert sum(share for *_, share in summary["kernels"]) <= 1.0 + 1e-6
    assert "top kernels" in profile_summary.report(summary)
    with pytest.raises(FileNotFoundError, match="perfetto_trace"):
        profile_summary.find_trace(str(tmp_path / "nothing"))
    bad = tmp_path / "perfetto_trace.json.gz"
    bad.write_bytes(b"not gzip")
    res = subprocess.run([sys.executable, profile_summary.__file__, str(bad)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("error: "), res.stderr[-2000:]
    assert len(res.stderr.strip().splitlines()) == 1


def test_op_scope_drops_transforms_and_flax_class_names():
    name = ("jit(step)/transpose(jvp(Stage3Model))/Stage3Model.conditions/Stage3Model/"
            "motion_encoder/transformer/while/body/eval_jaxpr/checkpoint/blocks/attn/dot_general")
    assert plan.op_scope(name, 2) == "motion_encoder/transformer"
    assert plan.op_scope(name, 9) == "motion_encoder/transformer/blocks/attn"
    assert plan.op_scope("jit(step)/select_n", 2) == "(top level)"
    # a transform's name may hold slashes: jvp(Model)/... inside transpose(...) is one part
    assert plan.op_scope("jit(step)/transpose(jvp(Model)/reduce_sum)/head/mul", 2) == "head"
    assert plan.op_scope("jit(step)/Model/Dense_0/dot_general", 2) == "Dense_0"
    assert plan.op_scope("", 2) == "(no HLO name)"


def test_synthetic_args_fill_every_leaf_on_its_sharding():
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    specs = [jax.ShapeDtypeStruct((64, 33), jnp.float32, sharding=sharding),
             jax.ShapeDtypeStruct((7, 9, 3), jnp.uint8, sharding=sharding),
             jax.ShapeDtypeStruct((4,), jnp.bfloat16, sharding=sharding),
             jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding)]
    made = scaling.synthetic_args(specs)
    for x, s in zip(made, specs):
        assert (x.shape, x.dtype, x.sharding) == (s.shape, s.dtype, sharding)
    floats, pixels = np.asarray(made[0]), np.asarray(made[1])
    assert np.abs(floats).max() <= 0.02 and 0.01 < floats.std() < 0.02
    assert np.unique(floats).size > 0.9 * floats.size
    assert np.unique(pixels).size > 100  # spread over [0, 255], not a few values
    assert int(made[3]) == 0


def test_synthetic_optimizer_state_gives_a_finite_step():
    """Adam's second moments are filled non-negative: a negative one made sqrt(nu) NaN, so the
    scaling sweep timed steps that the NaN guard skipped on parameters already NaN."""
    import optax
    params = {"w": jnp.zeros((16, 8)), "b": jnp.zeros((8,))}
    tx = optax.adam(1e-3)
    state = jax.eval_shape(tx.init, params)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params_s, state_s = scaling.synthetic_args(jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), (params, state)))
    assert float(state_s[0].nu["w"].min()) >= 0 and float(state_s[0].mu["w"].min()) < 0
    grads = jax.tree.map(jnp.ones_like, params_s)
    updates, _ = tx.update(grads, state_s, params_s)
    assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates))


def test_stage1_ceiling_learns_the_pose_given_on_the_tiny_set(tmp_path, tiny_config,
                                                              tiny_dataset):
    """benchmarks/stage1_ceiling.py: with the pose given, the decode path's held-out PCK rises
    well above its untrained value within the tiny config's steps; one figure per framing."""
    import os
    from benchmarks import stage1_ceiling
    from data_pipelines import records
    os.makedirs(tmp_path / "data")
    os.symlink(tiny_dataset, tmp_path / "data" / "synthetic")

    def run(steps):
        config = tiny_config.copy_and_resolve_references()
        config.stage1.steps = steps
        return stage1_ceiling.ceiling(config, str(tmp_path), log=lambda _: None)
    before, after = run(1), run(120)
    framings = {c["framing"] for c in records.read_index(tiny_dataset)["splits"]["test"]}
    assert {k for k in after if k.startswith("pck@0.1/framing_")} == {
        f"pck@0.1/framing_{f}" for f in framings}
    assert after["pck@0.1"] >= before["pck@0.1"] + 0.2, (before, after)


def test_stage1_ceiling_reads_pixels_without_the_1d_tokens(tmp_path, tiny_config, tiny_dataset):
    """--read pixels: the patch-token ViT learns heatmaps from the frames (held-out PCK on the tiny
    set: 0.011 after 1 step, 0.157 after 300), and refuses a heatmap size the patch grid does not
    divide."""
    import os
    from benchmarks import stage1_ceiling
    os.makedirs(tmp_path / "data")
    os.symlink(tiny_dataset, tmp_path / "data" / "synthetic")

    def run(steps, **model):
        config = tiny_config.copy_and_resolve_references()
        config.stage1.steps = steps
        config.model.joint_decoder.update(model)
        return stage1_ceiling.ceiling(config, str(tmp_path), read="pixels", log=lambda _: None)
    before, after = run(1), run(300)
    assert after["read"] == "pixels"
    assert after["pck@0.1"] >= before["pck@0.1"] + 0.1, (before, after)
    with pytest.raises(ValueError, match="multiple of the patch grid"):
        run(1, heatmap_size=6)


@pytest.mark.parametrize("args, message", [
    (["--stage", "1", "--size", "64"], "--size sets model.video_size, which stage 1 does not read"),
    (["--stage", "2", "--size", "30"], "reference images of 30x30"),
])
def test_scaling_size_errors_are_one_line(args, message):
    res = subprocess.run([sys.executable, "benchmarks/scaling.py", "--devices", "1", "--sweeps", "",
                          *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith("error: ") and message in res.stderr


def test_scaling_peak_by_device_kind():
    """PCIe and NVL H100s are not the SXM part; an unknown kind is refused by name."""
    class Device:
        platform = "gpu"

        def __init__(self, kind):
            self.device_kind = kind
    assert scaling.peak_tflops(Device("NVIDIA H100 PCIe"), None) == 756.0
    assert scaling.peak_tflops(Device("NVIDIA H100 NVL"), None) == 835.0
    assert scaling.peak_tflops(Device("NVIDIA H100 80GB HBM3"), None) == 989.0
    assert scaling.peak_tflops(Device("NVIDIA B200"), 2250.0) == 2250.0
    with pytest.raises(ValueError, match="unknown peak for 'NVIDIA B200': pass --peak_tflops"):
        scaling.peak_tflops(Device("NVIDIA B200"), None)
