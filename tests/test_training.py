"""Stage-1 training: it learns, its evaluation, and bad input fails cleanly (kills, resume and
other faults: tests/faults/)."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from data_pipelines import pipeline, records
from im_anim_jax import keypoints as kp
from im_anim_jax.evaluation import stage1 as stage1_eval
from im_anim_jax.training import stage1
from im_anim_jax.training.metric_writer import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEARN_STEPS = 600  # conftest.tiny_stage1


@pytest.fixture(scope="module")
def trained(tiny_stage1):
    return tiny_stage1


def test_short_training_run_learns(trained):
    _, workdir = trained
    rows = read_metrics(os.path.join(workdir, "stage1"))
    assert [r["step"] for r in rows] == list(range(50, LEARN_STEPS + 1, 50))
    first, last = rows[0], rows[-1]
    assert last["heatmap_loss"] < 0.6 * first["heatmap_loss"], (first, last)
    assert last["train_pck@0.1"] > first["train_pck@0.1"] + 0.15, (first, last)
    assert all(np.isfinite(r["loss"]) for r in rows)


def test_the_trained_model_reads_each_frames_pose(trained, tiny_dataset):
    """On the frames it trained on, the model beats the best input-free answer (the split's mean
    pose, 0.71 `pck@0.1`) and its joints move with the true ones (least-squares slope of the
    predicted on the true offsets from each joint's mean; 0 for any constant answer). The
    fixture's former 120-step run passed the loss and PCK checks above with one pose for every
    frame (slope 0.0, `pck@0.1` 0.675). The tiny set's 2 held-out identities x 2 motions
    are not learnt in a test's budget (held-out `pck@0.1` about the mean pose's)."""
    config, workdir = trained
    model, params, _ = stage1.load_params(config, workdir)
    targets = stage1.targets(config)
    forward = jax.jit(lambda f: model.apply({"params": params}, f)[0])
    pred, true, weights = [], [], []
    for batch in pipeline.eval_dataset(tiny_dataset, "train", clip_frames=None, batch_size=8,
                                       targets=targets):
        pred.append(kp.argmax_keypoints(np.asarray(forward(batch["frames"])), subpixel=True))
        true.append(batch["keypoints"])
        weights.append(batch["joint_weights"])
    pred, true, w = (np.concatenate(x) for x in (pred, true, weights))
    gt = kp.image_to_heatmap(true[..., :2], targets.image_size, targets.heatmap_size)

    def joint_mean(xy):  # [N, T, J, 2] -> [J, 2] over the visible frames
        return (xy * w[..., None]).sum((0, 1)) / np.maximum(w.sum((0, 1)), 1)[:, None]

    def pck(p):
        return stage1_eval.clip_hits(p, true, w, targets, (0.1,))[0.1].sum() / w.sum()
    mean = joint_mean(gt)
    model_pck, mean_pck = pck(pred), pck(np.broadcast_to(mean, pred.shape))
    assert model_pck > mean_pck + 0.1, (model_pck, mean_pck)
    dp, dg = pred - joint_mean(pred), gt - mean
    slope = float((w[..., None] * dp * dg).sum() / (w[..., None] * dg * dg).sum())
    assert slope > 0.3, slope


def test_evaluation_writes_report_and_png(trained, tiny_dataset):
    config, workdir = trained
    result = stage1_eval.evaluate(config, workdir, tiny_dataset)
    with open(os.path.join(workdir, "eval", "stage1.json")) as f:
        assert json.load(f) == result
    for key in ("pck@0.05", "pck@0.1", "heatmap_mse", "codebook_usage", "codebook_perplexity"):
        assert np.isfinite(result[key]), key
    assert 0 <= result["pck@0.05"] <= result["pck@0.1"] <= 1
    groups = [result[f"pck@0.1/{g}"] for g in ("body", "face", "feet", "hands")]
    assert all(0 <= g <= 1 for g in groups)
    assert min(groups) <= result["pck@0.1"] <= max(groups)  # the overall figure is their mix
    index = records.read_index(tiny_dataset)["splits"]["test"]
    framings = {e["framing"] for e in index}  # per clip, from the renderer
    assert {k.split("framing_")[1] for k in result if k.startswith("clips/framing_")} == framings
    assert sum(result[f"clips/framing_{f}"] for f in framings) == len(index)
    by_framing = [result[f"pck@0.1/framing_{f}"] for f in framings]
    assert min(by_framing) - 1e-9 <= result["pck@0.1"] <= max(by_framing) + 1e-9
    assert result["pck@0.1"] > 0.2  # above uniform chance (~0.03); see the test above
    assert result["step"] == LEARN_STEPS and result["split"] == "test"
    assert result["num_identities"] == config.data.synthetic.num_heldout_identities
    assert os.path.getsize(os.path.join(workdir, "eval", "stage1.png")) > 1000


def test_evaluation_refuses_a_checkpoint_of_another_architecture(trained, tiny_dataset):
    config, workdir = trained
    other = config.copy_and_resolve_references()
    other.model.motion_decoder.width = 48
    with pytest.raises(ValueError, match="different architecture"):
        stage1_eval.evaluate(other, workdir, tiny_dataset)


def _run(args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("args, message", [
    (["train.py", "--config=configs/nope.py", "--workdir={tmp}"], "configs/nope.py"),
    (["train.py", "--config=configs/demo.py", "--workdir={tmp}", "--config.stage1.lr=abc"],
     "could not convert"),
    (["train.py", "--config=configs/demo.py", "--workdir={tmp}", "--stages=1,7"], "unknown stage"),
    (["train.py", "--config=configs/demo.py", "--workdir={tmp}",
      "--config.data.path={tmp}/nothing"], "is not a clip dataset"),
    (["evaluate.py", "--config=configs/demo.py", "--workdir={tmp}/missing"], "does not exist"),
    (["evaluate.py", "--config=configs/demo.py", "--workdir={tmp}", "--stage=1",
      "--config.data.path={data}"], "no stage-1 checkpoint"),
    (["evaluate.py", "--config=configs/demo.py", "--workdir={tmp}", "--stage=2",
      "--config.data.path={data}"], "no VAE checkpoint"),
    (["evaluate.py", "--config=configs/demo.py", "--workdir={tmp}", "--stage=3",
      "--config.data.path={data}"], "no VAE checkpoint"),
    (["evaluate.py", "--config=configs/demo.py", "--workdir={tmp}", "--stage=4"],
     "the stages are"),
    (["evaluate.py", "--config=configs/demo.py", "--workdir={tmp}", "--stage=3",
      "--config.eval.pck_thresholds=(0.05,0.2)"], "must be numbers in (0, 1] and include 0.1"),
    (["evaluate.py", "--config=configs/demo.py", "--workdir={tmp}", "--stage=3",
      "--config.sampling.steps=0"], "sampling.steps=0 must be a positive integer"),
])
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, tiny_dataset, args, message):
    res = _run([a.format(tmp=tmp_path, data=tiny_dataset) for a in args])
    assert res.returncode == 2, res.stdout + res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr
    lines = [x for x in res.stderr.strip().splitlines() if not x.startswith("  - ")]
    assert lines[-1].startswith("error: ")  # a config's problems are listed below that line


@pytest.mark.parametrize("kind", ["constant", "cosine"])
def test_schedule_warms_up_from_zero_and_without_warmup_starts_at_the_peak(kind):
    import ml_collections

    from im_anim_jax.training import stage1 as stage1_training
    cfg = ml_collections.ConfigDict(dict(lr=1.0, schedule=kind, steps=100, warmup_steps=10))
    warm = stage1_training.schedule(cfg)
    assert float(warm(0)) == 0.0 and abs(float(warm(10)) - 1.0) < 1e-6
    cfg.warmup_steps = 0
    cold = stage1_training.schedule(cfg)
    assert float(cold(0)) == 1.0  # step 1 trains at the peak, not at 0
    assert abs(float(cold(100)) - (1.0 if kind == "constant" else 0.01)) < 1e-6


def test_weight_decay_reaches_kernels_only(tiny_config):
    """Scanned stacks give norm scales and biases a leading `layers` axis, so a rank test would
    decay them; the mask goes by name. Checked on the whole stage-3 model (every sub-model)."""
    import flax

    from im_anim_jax.training import stage1 as stage1_training, stage3
    config = tiny_config
    h, w = stage3.latent_size(config)
    model = stage3.stage3_model.build_stage3(config.model, (h // 2, w // 2))
    params = stage3.abstract_params(model, config, 4 * config.model.vae.z_dim)
    flat = flax.traverse_util.flatten_dict(params)
    mask = flax.traverse_util.flatten_dict(stage1_training.decay_mask(params))
    decayed = {k for k, v in mask.items() if v}
    assert decayed and decayed == {k for k in flat if k[-1] == "kernel"}
    # What the rank test used to decay: stacked norms and fused biases, learned embeddings and
    # tokens, the DiT's modulation and its qk-norm scales. None of them is decayed now.
    names = {k[-1] for k, v in flat.items() if v.ndim >= 2 and k[-1] != "kernel"}
    assert {"scale", "bias", "modulation", "mask_token"} <= names
    stacked = [k for k, v in flat.items() if k[-1] in ("scale", "bias") and v.ndim >= 2]
    assert stacked and not any(mask[k] for k in stacked)


def test_stage1_joint_groups_without_visible_joints_are_not_computed(tiny_dataset):
    """A group no clip shows (hands here) is "not computed: ...", not a PCK of 0."""
    n = len(records.read_index(tiny_dataset)["splits"]["test"])
    weights = np.ones((n, 62))
    weights[:, stage1_eval.GROUPS["hands"]] = 0
    result = stage1_eval.pck_figures({0.1: weights.copy()}, weights, tiny_dataset, "test",
                                     np.arange(n))
    assert result["pck@0.1/hands"] == "not computed: no visible joints"
    assert result["pck@0.1"] == result["pck@0.1/body"] == 1.0
