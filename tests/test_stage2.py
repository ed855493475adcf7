"""Stage 2: it starts from stage 1 (read-only; refusing a missing or different one), it learns the
cross-identity target, its baselines train on the same data, and its report has every figure."""
import json
import os
import shutil

import numpy as np
import pytest

from data_pipelines import pipeline, records
from im_anim_jax import keypoints as kp
from im_anim_jax.evaluation import stage2 as stage2_eval
from im_anim_jax.training import stage1, stage2, vae
from im_anim_jax.training.metric_writer import read_metrics

STEPS = 60


def _config(base, **stage2_fields):
    config = base.copy_and_resolve_references()
    # Single frames only (image_steps = steps): these runs need the reference encoder; the
    # clip phase is tested in test_vae_training.
    config.vae_training.update(dict(steps=30, image_steps=30, lr=3e-3, batch_size=4,
                                    log_every=10, checkpoint_every=30))
    config.stage2.update(dict(steps=STEPS, log_every=10, checkpoint_every=STEPS, batch_size=4,
                              lr=2e-3, baselines=()))
    config.stage2.update(stage2_fields)
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_stage1, tiny_dataset, tree_digest):
    """Stage 1 copied into a fresh workdir, then the VAE and the main stage-2 model; the
    baselines for 3 steps each (enough to be evaluated, not to be compared)."""
    base, stage1_dir = tiny_stage1
    workdir = str(tmp_path_factory.mktemp("stage2"))
    shutil.copytree(os.path.join(stage1_dir, "stage1"), os.path.join(workdir, "stage1"))
    before = tree_digest(os.path.join(workdir, "stage1"))
    config = _config(base)
    stage2.train(config, workdir, tiny_dataset, log=lambda _: None)
    for name in stage2.BASELINES:
        short = _config(base, steps=3, log_every=3, checkpoint_every=3)
        ref = vae.load_reference_encoder(short, workdir)
        stage2.train_variant(short, workdir, tiny_dataset, name, ref, log=lambda _: None)
    config.stage2.baselines = tuple(stage2.BASELINES)
    return config, workdir, before


def test_stage2_learns_the_cross_identity_target(trained):
    _, workdir, _ = trained
    rows = read_metrics(stage2.stage_dir(workdir))
    assert [r["step"] for r in rows] == list(range(10, STEPS + 1, 10))
    first, last = rows[0], rows[-1]
    assert last["heatmap_loss"] < 0.7 * first["heatmap_loss"], (first, last)
    assert last["train_pck@0.1"] > first["train_pck@0.1"] + 0.1, (first, last)
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert all(r["codebook_perplexity"] >= 1 for r in rows)  # logged, so a collapse is visible


def test_stage1_files_are_read_only_inputs(trained, tree_digest):
    _, workdir, before = trained
    assert tree_digest(os.path.join(workdir, "stage1")) == before
    for d in ["stage2"] + [f"stage2_{n}" for n in stage2.BASELINES]:
        assert stage2.checkpointing.latest_step(os.path.join(workdir, d)) is not None, d


def test_missing_or_different_stage1_is_refused(trained, tmp_path, tiny_dataset):
    config, workdir, _ = trained
    ref = vae.load_reference_encoder(config, workdir)
    with pytest.raises(FileNotFoundError, match="no stage-1 checkpoint.*--stages 1"):
        stage2.train_variant(config, str(tmp_path), tiny_dataset, "main", ref)
    assert not os.path.exists(tmp_path / "stage1")
    shutil.copytree(os.path.join(workdir, "stage1"), tmp_path / "stage1")
    other = config.copy_and_resolve_references()
    other.model.motion_decoder.width = 48
    with pytest.raises(ValueError, match="stage-1 checkpoint .* different architecture"):
        stage2.train_variant(other, str(tmp_path), tiny_dataset, "main", ref)
    # Same shapes, other maths (it started silently from the tokenizer trained the other way).
    other = config.copy_and_resolve_references()
    other.model.quantizer.use_l2_norm = not config.model.quantizer.use_l2_norm
    with pytest.raises(ValueError, match=r"stage-1 checkpoint .* another model config \(1 keys "
                                         r"differ: model\.quantizer\.use_l2_norm: "):
        stage2.train_variant(other, str(tmp_path), tiny_dataset, "main", ref)
    assert not os.path.exists(tmp_path / "stage2")
    with pytest.raises(ValueError, match="unknown entries \\['typo'\\]"):
        stage2.variants(_config(config, baselines=("typo",)))


def test_phases_put_the_self_pairs_first(tiny_config):
    cfg = lambda k: _config(tiny_config, self_pair_steps=k, steps=10).stage2  # noqa: E731
    assert stage2.phases(cfg(0)) == [(10, False)]
    assert stage2.phases(cfg(4)) == [(4, True), (10, False)]


def test_the_self_pair_phase_trains_on_the_driving_pose(trained, tiny_dataset):
    """Its batches are self pairs, un-augmented: the target clip is the driving clip, frame for
    frame; the later phase's are not (cross pairs, crop/scale/pad)."""
    config, _, _ = trained
    first = next(iter(stage2.train_dataset(config, tiny_dataset, self_only=True)))
    assert np.array_equal(first["driving"], first["target"])
    assert np.array_equal(first["driving_keypoints"], first["target_keypoints"])
    assert np.all(first["driving_identity_id"] == first["reference_identity_id"])
    later = next(iter(stage2.train_dataset(config, tiny_dataset)))
    assert not np.array_equal(later["driving"], later["target"])


def test_the_pose_indicator_keeps_its_explicit_pose_indicator_in_the_self_pair_phase(
        trained, tiny_dataset):
    """It reads the driving keypoints: un-transformed in a self pair they would be the answer."""
    config, _, _ = trained
    config = config.copy_and_resolve_references()
    config.model.motion_encoder = "pose_indicator"
    config.stage2.epi.prob = 1.0
    batch = next(iter(stage2.train_dataset(config, tiny_dataset, self_only=True)))
    assert np.array_equal(batch["driving"]["frames"], batch["target"])     # frames un-augmented
    assert not np.allclose(batch["driving"]["keypoints"], batch["target_keypoints"])


def test_resuming_at_the_phase_boundary_repeats_the_run(trained, tiny_dataset, tmp_path):
    """A run that stops at the last self-pair step and resumes takes the batches and losses of
    one that did not stop."""
    config, workdir, _ = trained
    config = _config(config, steps=6, self_pair_steps=3, log_every=1, checkpoint_every=3)
    for d in ("stage1", "vae"):
        shutil.copytree(os.path.join(workdir, d), tmp_path / d)
    ref = vae.load_reference_encoder(config, str(tmp_path))
    run = lambda: stage2.train_variant(config, str(tmp_path), tiny_dataset,  # noqa: E731
                                       "main", ref, log=lambda _: None)
    run()
    out = stage2.stage_dir(str(tmp_path))
    with open(os.path.join(out, "data_log.txt")) as f:
        straight_log = f.read()
    straight = read_metrics(out)
    assert [r["step"] for r in straight] == [1, 2, 3, 4, 5, 6]
    shutil.rmtree(os.path.join(out, "6"))          # as if stopped right after the phase's end
    run()
    with open(os.path.join(out, "data_log.txt")) as f:
        assert f.read() == straight_log
    assert [(r["step"], r["loss"]) for r in read_metrics(out)] == [
        (r["step"], r["loss"]) for r in straight]


def test_evaluation_reports_every_variant_and_baseline(trained, tiny_dataset):
    config, workdir, _ = trained
    # A batch of 4 holds pairs of both held-out references (6 -> 7 and 7 -> 6), so every swap
    # figure is measured; in batches of 2 each batch's references show one identity and the
    # foreign-reference figures are "not computed" (test_unmeasured_figures_...).
    config = config.copy_and_resolve_references()
    config.eval.batch_size = 4
    result = stage2_eval.evaluate(config, workdir, tiny_dataset)
    with open(os.path.join(workdir, "eval", "stage2.json")) as f:
        assert json.load(f) == result
    assert os.path.getsize(os.path.join(workdir, "eval", "stage2.png")) > 1000
    assert 0 <= result["cross_pck@0.05"] <= result["cross_pck@0.1"] <= 1
    assert result["step"] == STEPS and result["num_pairs"] > 0
    names = set(stage2.BASELINES) | {"no_retarget", "no_retarget_gt", "explicit_realign",
                                     "explicit_similarity", "stage1_on_target"}
    assert set(result["baselines"]) == names
    framings = {r["framing"] for r in records.read_index(tiny_dataset)["splits"]["test"]}
    for name, figures in [("main", result)] + list(result["baselines"].items()):
        assert 0 <= figures["cross_pck@0.05"] <= figures["cross_pck@0.1"] <= 1, name
        # The per-framing figures split the same hits: their weighted mean is the overall one.
        by = [figures[f"cross_pck@0.1/reference_{f}"] for f in sorted(framings)]
        assert all(0 <= v <= 1 for v in by), name
        assert min(by) - 1e-9 <= figures["cross_pck@0.1"] <= max(by) + 1e-9, name
    # Ground-truth driving keypoints pasted on another body miss many joints. Scored on the
    # joints every row is scored on (visible in the target), also those out of the driving
    # frame (they were left out for this row alone, which made it easier).
    assert result["baselines"]["no_retarget_gt"]["cross_pck@0.1"] < 0.9
    targets = stage1.targets(config)
    to_hm = lambda xy: kp.image_to_heatmap(xy[..., :2], targets.image_size,  # noqa: E731
                                           targets.heatmap_size)
    pasted, dropped = stage2_eval.Hits((0.1,)), 0.0
    for batch in pipeline.pair_eval_dataset(tiny_dataset, config.eval.split,
                                            clip_frames=config.stage2.clip_frames, batch_size=4,
                                            targets=targets, seed=config.eval.pair_seed):
        w = batch["joint_weights"]
        pasted.add(to_hm(batch["driving_keypoints"]), to_hm(batch["target_keypoints"]), w,
                   targets.heatmap_size)
        dropped += float((w * (batch["driving_keypoints"][..., 2] < targets.conf_threshold)).sum())
    assert dropped > 0  # the tiny split has such joints, so the old weighting would differ
    assert result["baselines"]["no_retarget_gt"]["cross_pck@0.1"] == pytest.approx(
        pasted.result("p")["p@0.1"], abs=1e-12)
    for kind in ("tokens_stage1", "tokens_stage2", "conv_features", "pose_indicator_tokens"):
        probe = result["leakage"][kind]
        assert 0 <= probe["id_accuracy"] <= 1 and np.isfinite(probe["shape_r2"]), kind
    assert 0 <= result["reference_pose_pck@0.1"] <= 1
    for name in ("main",) + tuple(stage2.BASELINES):
        figures = result if name == "main" else result["baselines"][name]
        for kind in ("reference", "driving"):
            assert np.isfinite(figures[f"{kind}_pose_follow"]), (name, kind)
            assert figures[f"{kind}_swap_shift"] >= 0, (name, kind)
        theirs, drop = (figures[f"foreign_reference_{k}@0.1"] for k in ("pck", "drop"))
        assert 0 <= theirs <= 1 and 0 <= theirs + drop <= 1, name


def test_follow_measures_how_far_and_how_faithfully_the_output_moves():
    """Follow's slope and shift on known moves: a prediction that moves by half the input pose's
    move (slope 0.5), one that ignores it (0, no shift), weights that mask a joint."""
    rng = np.random.default_rng(0)
    pose, pose2 = rng.uniform(0, 16, (2, 3, 5, 4, 2))
    pred = rng.uniform(0, 16, (3, 5, 4, 2))
    half = stage2_eval.Follow("driving")
    half.add(pred, pred + 0.5 * (pose2 - pose), pose, pose2, np.ones((3, 5, 4)), 16)
    r = half.result()
    np.testing.assert_allclose(r["driving_pose_follow"], 0.5, rtol=1e-12)
    expected = np.mean(np.linalg.norm(0.5 * (pose2 - pose) / 16, axis=-1))
    np.testing.assert_allclose(r["driving_swap_shift"], expected, rtol=1e-12)
    still = stage2_eval.Follow("reference")
    still.add(pred, pred, pose[:, :1], pose2[:, :1], np.ones((3, 5, 4)), 16)  # broadcast over T
    assert still.result() == {"reference_swap_shift": 0.0, "reference_pose_follow": 0.0}
    masked = stage2_eval.Follow("driving")
    w = np.ones((3, 5, 4))
    w[..., 0] = 0  # joint 0 copies the pose's move, but it is masked out
    moved = pred.copy()
    moved[..., 0, :] += pose2[..., 0, :] - pose[..., 0, :]
    masked.add(pred, moved, pose, pose2, w, 16)
    assert masked.result() == {"driving_swap_shift": 0.0, "driving_pose_follow": 0.0}


def test_a_driving_swap_counts_where_the_window_differs():
    """The neighbour's driving window counts as a swap when its clip or its start differs (pairs
    of one clip sit side by side in the evaluation, each with its own window; comparing the clip
    alone left out three quarters of the demo's pairs)."""
    batch = {"driving_record": np.array([3, 3, 3, 5]), "start": np.array([0, 2, 2, 0])}
    other = np.roll(np.arange(4), 1)  # pair i gets pair i-1's driving window
    np.testing.assert_array_equal(stage2_eval._real_swaps(batch, other),
                                  [True, True, False, True])


def test_foreign_reference_drop_is_zero_only_for_an_output_that_ignores_the_reference():
    """Foreign on known outputs: one that stays put when the reference changes (drop 0), one
    that moves off the target (drop = its own PCK), pairs whose neighbour shows the same
    identity left out."""
    rng = np.random.default_rng(0)
    gt = rng.uniform(0, 16, (4, 5, 6, 2))
    w = np.ones((4, 5, 6))
    other_identity = np.array([True, True, True, False])
    ignores = stage2_eval.Foreign()
    ignores.add(gt, gt, gt, w, other_identity, 16)
    assert ignores.result() == {"foreign_reference_pck@0.1": 1.0,
                                "foreign_reference_drop@0.1": 0.0}
    follows = stage2_eval.Foreign()
    moved = gt + 8.0                       # half the heatmap away: every joint misses
    moved[3] = gt[3]                       # the same-identity pair would hit, but is left out
    follows.add(gt, moved, gt, w, other_identity, 16)
    assert follows.result() == {"foreign_reference_pck@0.1": 0.0,
                                "foreign_reference_drop@0.1": 1.0}


def test_unmeasured_figures_say_not_computed_instead_of_0():
    """No swap seen (eval.batch_size 1), no neighbour of another identity, no visible joint:
    the figure is "not computed: ...", never the 0 that reads as "the output ignores its input"
    (or, for PCK, "every joint missed")."""
    for follow in (stage2_eval.Follow("driving"), stage2_eval.Follow("reference")):
        assert all(v.startswith("not computed: ") for v in follow.result().values())
    gt = np.zeros((2, 5, 6, 2))
    same = stage2_eval.Foreign()
    same.add(gt, gt, gt, np.ones((2, 5, 6)), np.array([False, False]), 16)
    assert all(v.startswith("not computed: ") for v in same.result().values())
    still = stage2_eval.Follow("reference")  # the reference pose did not move: no slope
    still.add(gt, gt, gt, gt, np.ones((2, 5, 6)), 16)
    r = still.result()
    assert r["reference_swap_shift"] == 0.0 and r["reference_pose_follow"].startswith("not comp")
    hits = stage2_eval.Hits((0.05, 0.1))
    hits.add(gt, gt, np.zeros((2, 5, 6)), 16)
    assert hits.result("pck") == {f"pck@{a}": "not computed: no visible joints"
                                  for a in (0.05, 0.1)}
