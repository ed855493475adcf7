"""Stage 2: it starts from stage 1 (read-only; refusing a missing or different one), it learns the
cross-identity target, its baselines train on the same data, and its report has every figure."""
import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from im_anim_jax.evaluation import stage2 as stage2_eval
from im_anim_jax.training import stage2, vae
from im_anim_jax.training.metric_writer import read_metrics

STEPS = 60


def _digest(directory):
    """{relative path: sha1} of every file under `directory`."""
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, directory)] = hashlib.sha1(fh.read()).hexdigest()
    return out


def _config(base, **stage2_fields):
    config = base.copy_and_resolve_references()
    config.vae_training.update(dict(steps=30, lr=3e-3, batch_size=4, log_every=10,
                                    checkpoint_every=30))
    config.stage2.update(dict(steps=STEPS, log_every=10, checkpoint_every=STEPS, batch_size=4,
                              lr=2e-3, baselines=()))
    config.stage2.update(stage2_fields)
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_stage1, tiny_dataset):
    """Stage 1 copied into a fresh workdir, then the VAE and the main stage-2 model; the
    baselines for 3 steps each (enough to be evaluated, not to be compared)."""
    base, stage1_dir = tiny_stage1
    workdir = str(tmp_path_factory.mktemp("stage2"))
    shutil.copytree(os.path.join(stage1_dir, "stage1"), os.path.join(workdir, "stage1"))
    before = _digest(os.path.join(workdir, "stage1"))
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


def test_stage1_files_are_read_only_inputs(trained):
    _, workdir, before = trained
    assert _digest(os.path.join(workdir, "stage1")) == before
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
    with pytest.raises(ValueError, match="unknown entries \\['typo'\\]"):
        stage2.variants(_config(config, baselines=("typo",)))


def test_evaluation_reports_every_variant_and_baseline(trained, tiny_dataset):
    config, workdir, _ = trained
    result = stage2_eval.evaluate(config, workdir, tiny_dataset)
    with open(os.path.join(workdir, "eval", "stage2.json")) as f:
        assert json.load(f) == result
    assert os.path.getsize(os.path.join(workdir, "eval", "stage2.png")) > 1000
    assert 0 <= result["cross_pck@0.05"] <= result["cross_pck@0.1"] <= 1
    assert result["step"] == STEPS and result["num_pairs"] > 0
    names = set(stage2.BASELINES) | {"no_retarget", "no_retarget_gt", "explicit_realign"}
    assert set(result["baselines"]) == names
    for name, figures in result["baselines"].items():
        assert 0 <= figures["cross_pck@0.05"] <= figures["cross_pck@0.1"] <= 1, name
    # Ground-truth driving keypoints pasted on another body miss many joints.
    assert result["baselines"]["no_retarget_gt"]["cross_pck@0.1"] < 0.9
    for kind in ("tokens_stage1", "tokens_stage2", "conv_features", "pose_indicator_tokens"):
        probe = result["leakage"][kind]
        assert 0 <= probe["id_accuracy"] <= 1 and np.isfinite(probe["shape_r2"]), kind
    assert 0 <= result["reference_pose_pck@0.1"] <= 1
    for name in ("main",) + tuple(stage2.BASELINES):
        figures = result if name == "main" else result["baselines"][name]
        assert np.isfinite(figures["reference_pose_follow"]), name
        assert figures["reference_swap_shift"] >= 0, name
