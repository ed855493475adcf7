"""A bad config fails before any data, model or compilation, naming every violation."""
import os
import sys

import numpy as np
import pytest

import faultrun
from im_anim_jax import config_validation


@pytest.mark.parametrize("overrides, stages, expected", [
    ({"mesh.shape.data": 3}, (1,), "needs 3 devices, but 1 are available"),
    ({"mesh.rules": (("embeds", "fsdp"),)}, (1,),
     "mesh.rules names the logical axis 'embeds', which nothing carries"),
    ({"mesh.shape.fsdp": -1, "mesh.shape.data": -1}, (1,), "at most one -1"),
    ({"stage3.clip_frames": 4}, (1, 2, 3), "stage3.clip_frames=4: the VAE compresses time 4x, "
                                           "so clips need 1 + 4k frames (e.g. 5)"),
    ({"stage2.clip_frames": 4}, (1, 2), "stage2.clip_frames=4: the retargeter's latent frames"),
    ({"sampling.overlap_frames": 3}, (1, 2, 3), "sampling.overlap_frames=3 must be 1 + 4j"),
    ({"model.motion_tokenizer.image_size": 40, "data.synthetic.image_size": 40}, (1, 2, 3),
     "image_size=40: the reference image must be a multiple of 32"),
    ({"model.motion_tokenizer.image_size": 36, "data.synthetic.image_size": 36}, (1,),
     "image_size=36 must be a multiple of its patch_size=8"),
    ({"model.motion_tokenizer.stem_channels": (4, 4, 4, 4)}, (1,),
     "stem_channels=(4, 4, 4, 4) halve the frame 4 times, so patch_size=8 must be a multiple of 16"),
    ({"stage1.patch_heatmap_weight": 1.0}, (1,),
     "stage1.patch_heatmap_weight=1.0 needs model.motion_tokenizer.patch_heatmap_head=True"),
    ({"model.motion_tokenizer.patch_heatmap_head": True, "model.joint_decoder.heatmap_size": 10},
     (1,), "heatmap_size=10 to be a multiple of the 4x4 patch grid"),
    ({"stage1.lr": 0.0}, (1,), "stage1.lr=0.0 must be a learning rate in (0, 1)"),
    ({"model.quantizer.codebook_size": 0}, (1,),
     "model.quantizer.codebook_size=0 must be an integer >= 1"),
    ({"model.quantizer.restart_threshold": 1.0}, (1,),
     "model.quantizer.restart_threshold=1.0 must be a number in [0, 1)"),
    ({"model.quantizer.restart_decay": 1.0}, (1,),
     "model.quantizer.restart_decay=1.0 must be a number in [0, 1)"),
    ({"stage1.heatmap_ce_weight": -1.0}, (1,),
     "stage1.heatmap_ce_weight=-1.0 must be a number >= 0"),
    ({"stage1.heatmap_ce_temperature": 0.0}, (1,),
     "stage1.heatmap_ce_temperature=0.0 must be a number > 0"),
    ({"stage2.augment.flip": 0.5}, (1, 2), "stage2.augment.flip=0.5: only stage 1 can mirror"),
    ({"data.render_workers": -1}, (1,), "data.render_workers=-1 must be an integer >= 0"),
    ({"stage1.augment.enabled": True, "stage1.augment.flip": 1.5}, (1,),
     "stage1.augment.flip=1.5 must be a probability in [0, 1]"),
    ({"stage3.lr_dit": float("nan")}, (1, 2, 3), "stage3.lr_dit=nan must be a learning rate"),
    ({"stage3.frozen": ("motion_encoders",)}, (1, 2, 3),
     "config.stage3.frozen has unknown param groups ['motion_encoders']"),
    ({"model.dit_prediction": "eps"}, (1, 2, 3),
     "model.dit_prediction must be 'velocity' (Wan2.2's), 'x0' or 'x0_residual', got 'eps'"),
    ({"model.dit_prediction": "x0_residual", "model.dit.init_from": "wan_dit"}, (1, 2, 3),
     "model.dit_prediction='x0_residual' with model.dit.init_from: the converted Wan2.2 DiT's "
     "head predicts the velocity, which would be read as a change from z_ref"),
    ({"stage3.loss_weighting": "snr"}, (1, 2, 3),
     "stage3.loss_weighting must be 'velocity' (Wan2.2's) or 'x0', got 'snr'"),
    ({"sampling.method": "ddim"}, (1, 2, 3),
     "sampling.method must be one of 'euler', 'unipc', got 'ddim'"),
    ({"sampling.steps": 0}, (1, 2, 3), "sampling.steps=0 must be a positive integer"),
    ({"sampling.shift": 0.0}, (1, 2, 3), "sampling.shift=0.0 must be a number > 0"),
    ({"sampling.guidance": float("nan")}, (1, 2, 3), "sampling.guidance=nan must be a number"),
    ({"eval.pck_thresholds": (0.05, 0.2)}, (1,),
     "eval.pck_thresholds=(0.05, 0.2) must be numbers in (0, 1] and include 0.1"),
    ({"eval.stage3_pairs": 0}, (1,), "eval.stage3_pairs=0 must be an integer >= 1"),
    ({"model.expression.every": 0}, (1, 2, 3), "model.expression.every=0 must be an integer >= 1 "
                                               "that divides model.dit.num_layers=2"),
    ({"eval.fvd_frames": 0}, (1,), "eval.fvd_frames=0 must be an integer >= 1"),
    ({"eval.metric_batch": 0}, (1,), "eval.metric_batch=0 must be an integer >= 1"),
    ({"eval.batch_size": 0}, (1,), "eval.batch_size=0 must be an integer >= 1"),
    ({"stage2.steps": 0}, (1, 2), "stage2.steps=0 must be a positive integer"),
    ({"stage2.self_pair_steps": 6}, (1, 2), "stage2.self_pair_steps=6 must be an integer in [0, "
                                            "stage2.steps=6)"),
    ({"stage2.self_pair_steps": -1}, (1, 2), "stage2.self_pair_steps=-1 must be an integer"),
    ({"stage3.partners_per_clip": 0}, (1, 2, 3), "stage3.partners_per_clip=0 must be an integer "
                                                 ">= 1 or None"),
    ({"vae_training.warmup_steps": 50}, (1, 2), "vae_training.warmup_steps=50 exceeds"),
    ({"model.vae.initial_logvar": float("nan")}, (1, 2),
     "model.vae.initial_logvar=nan must be a number in [-30, 20]"),
    ({"vae_training.clip_frames": 4}, (1, 2), "vae_training.clip_frames=4: the VAE compresses "
                                              "time 4x, so its training clips need 1 + 4k frames"),
    ({"vae_training.clip_frames": 9}, (1, 2),
     "data.synthetic.clip_frames=5 is shorter than the 9-frame clips"),
    ({"vae_training.image_steps": -1}, (1, 2), "vae_training.image_steps=-1 must be an integer"),
    ({"vae_training.clip_batch_size": 6, "vae_training.batch_size": 4, "stage2.batch_size": 4,
      "mesh.shape.data": 4}, (1, 2), "vae_training.clip_batch_size=6 must be divisible by 4"),
    ({"stage1.batch_size": 6, "mesh.shape.data": 4}, (1,),
     "stage1.batch_size=6 must be divisible by 4"),
    ({"stage1.schedule": "linear"}, (1,), "stage1.schedule='linear' must be"),
    ({"faults.max_nonfinite_in_a_row": 0}, (1,), "faults.max_nonfinite_in_a_row=0 must be >= 1"),
    ({"data.heatmap_sigma": 0.0}, (1,), "data.heatmap_sigma=0.0 must be a number > 0"),
    ({"data.conf_threshold": 0.0}, (1,), "data.conf_threshold=0.0 must be a number in (0, 1]"),
    ({"data.conf_threshold": 1.5}, (1,), "data.conf_threshold=1.5 must be a number in (0, 1]"),
    ({}, (2,), "stage 2 starts from stage 1, but"),
    ({}, (3,), "stage 3 starts from stage 2, but"),
    ({"data.synthetic.clip_frames": 3}, (1, 2), "data.synthetic.clip_frames=3 is shorter than"),
    ({"model.video_size": (64, 96)}, (1, 2, 3), "model.video_size=(64, 96): training reads "
                                                "reference and target frames at the clips' own "
                                                "size, 32x32"),
    ({"model.video_size": (0, 64)}, (1, 2), "model.video_size=(0, 64) must be (H, W) of positive"),
])
def test_each_violation_is_named(tiny_config, tmp_path, overrides, stages, expected):
    config = tiny_config.copy_and_resolve_references()
    for key, value in overrides.items():
        section, *path = key.split(".")
        target = config[section]
        for p in path[:-1]:
            target = target[p]
        target[path[-1]] = value
    found = config_validation.problems(config, stages, str(tmp_path), num_devices=4 if
                                       "batch" in expected else 1, num_processes=1)
    assert any(expected in p for p in found), found
    assert len(found) == 1 or not overrides, found  # nothing else is blamed


def test_the_default_rules_name_every_logical_axis_once():
    sys.path.insert(0, os.path.join(faultrun.ROOT, "configs"))
    import im_animation

    from im_anim_jax import sharding
    names = [name for name, _ in im_animation.MESH_RULES]
    assert sorted(names) == sorted(set(sharding.LOGICAL_AXES))


def test_batch_axes_must_span_the_processes(tiny_config, tmp_path):
    """Each process loads its own rows: context across 2 hosts (data x fsdp = 1) is refused."""
    config = tiny_config.copy_and_resolve_references()
    config.mesh.shape.update(dict(data=1, fsdp=1, context=4))
    found = config_validation.problems(config, (1,), str(tmp_path), num_devices=4,
                                       num_processes=2)
    assert found == ["the data x fsdp mesh size 1 must be a multiple of the number of processes "
                     "2: each process loads its own rows, so the batch axes must span the hosts "
                     "(put the cross-host factor on data or fsdp)"], found
    config.mesh.shape.update(dict(data=2, context=2))
    assert config_validation.problems(config, (1,), str(tmp_path), num_devices=4,
                                      num_processes=2) == []


def test_the_shipped_configs_pass(tmp_path):
    sys.path.insert(0, os.path.join(faultrun.ROOT, "configs"))
    import im_animation
    for variant in im_animation.VARIANTS:
        config = im_animation.get_config(variant)
        assert config_validation.problems(config, (1, 2, 3), str(tmp_path), num_devices=1,
                                          num_processes=1) == [], variant


def test_train_py_reports_all_problems_before_touching_the_workdir(tmp_path):
    workdir = tmp_path / "run"
    res = faultrun.run(faultrun.train_cmd(
        str(workdir), str(tmp_path / "nodata"), 10, "--stages=1,2,3",
        "--config.stage3.clip_frames=6", "--config.stage2.lr=2.0", "--config.mesh.shape.data=2"))
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    err = res.stderr[res.stderr.index("error: the config has 3 problems:"):]
    for text in ("stage3.clip_frames=6", "stage2.lr=2.0", "needs 2 devices, but 1 are"):
        assert text in err, err
    assert not os.path.exists(workdir / "stage1") and not os.path.exists(workdir / "data")


def test_data_without_pairs_is_refused_for_stages_2_and_3(tiny_config, tiny_dataset, tmp_path):
    """Ingested videos are one identity performing its own motion each: stage 1 trains on them,
    stages 2-3 would fail only when they start; validation names it at once."""
    import json
    import shutil
    data = tmp_path / "ingested"
    shutil.copytree(tiny_dataset, data)
    with open(data / "index.json") as f:
        index = json.load(f)
    for split in index["splits"].values():
        for i, entry in enumerate(split):  # what ingest writes: one identity and motion per video
            entry["identity_id"] = entry["motion_id"] = i
    with open(data / "index.json", "w") as f:
        json.dump(index, f)
    config = tiny_config.copy_and_resolve_references()
    config.data.path = str(data)
    assert not config_validation.problems(config, (1,), str(tmp_path), num_devices=1,
                                          num_processes=1)
    found = config_validation.problems(config, (1, 2, 3), str(tmp_path), num_devices=1,
                                       num_processes=1)
    for s in (2, 3):
        assert any(p.startswith(f"stage {s} trains on pairs") and "no motion is performed by two "
                   "identities" in p for p in found), found
    config.data.path = tiny_dataset  # the synthetic set has pairs
    assert config_validation.problems(config, (1, 2, 3), str(tmp_path), num_devices=1,
                                      num_processes=1) == []


def test_data_without_the_evaluated_split_is_refused_before_training(tiny_config, tiny_dataset,
                                                                     tmp_path):
    """Ingested with the default --test-fraction 0, a dataset has no 'test' split: the README's
    ingest-then-train commands trained stage 1 and then failed in its evaluation (exit 2 after
    minutes); validation names it at once where the run evaluates."""
    import json
    import shutil
    data = tmp_path / "ingested"
    shutil.copytree(tiny_dataset, data)
    with open(data / "index.json") as f:
        index = json.load(f)
    del index["splits"]["test"]
    with open(data / "index.json", "w") as f:
        json.dump(index, f)
    config = tiny_config.copy_and_resolve_references()
    config.data.path = str(data)
    kwargs = dict(num_devices=1, num_processes=1)
    assert not config_validation.problems(config, (1,), str(tmp_path), **kwargs)  # --noeval
    found = config_validation.problems(config, (1,), str(tmp_path), evaluating=True, **kwargs)
    assert found == [f"eval.split='test' is not in data.path={data} (it has ['train']), so the "
                     f"evaluation after each stage would fail once it has trained: ingest with "
                     f"--test-fraction > 0 (whole videos held out), set --config.eval.split, or "
                     f"pass --noeval"], found
    config.eval.split = "train"
    assert not config_validation.problems(config, (1,), str(tmp_path), evaluating=True, **kwargs)


def test_a_stage_may_not_train_on_under_later_stages(tiny_config, tmp_path):
    """Training stage 1, the VAE or stage 2 on (more steps, or from scratch) would leave the later
    stages' checkpoints on a model that no longer exists: refused before anything runs."""
    from im_anim_jax.training import checkpointing

    def checkpoint(name, step):
        ckpt = checkpointing.Checkpointer(str(tmp_path / name), async_save=False)
        ckpt.save(step, {"x": np.zeros(1, np.float32)}, None, {})
        ckpt.close()

    def found(stages, **steps):
        config = tiny_config.copy_and_resolve_references()
        for section, n in steps.items():
            config[section].steps = n
        return [p for p in config_validation.problems(config, stages, str(tmp_path),
                                                      num_devices=1, num_processes=1)
                if "would train to step" in p]
    checkpoint("stage1", 10)
    assert found((1,), stage1=20) == []  # nothing built on it yet
    checkpoint("vae", 6)
    checkpoint("stage2", 6)
    assert found((1, 2, 3), stage1=10, vae_training=6, stage2=6) == []  # all done: a rerun
    checkpoint("stage2_self_attention", 6)
    checkpoint("stage3", 6)
    (problem,) = found((1,), stage1=20)
    assert problem.startswith("stage1 would train to step 20, but stage2, stage2_self_attention, "
                              "stage3 in ") and "its step-10 checkpoint" in problem
    assert "Keep its steps at 10" in problem
    problems = found((2,), vae_training=8, stage2=7)
    assert [p.split(" would")[0] for p in problems] == ["vae", "stage2"]
    assert "but stage3 in" in problems[1]
    assert found((3,), stage1=20, vae_training=8, stage2=7) == []  # stage 3 trains nothing else


@pytest.mark.parametrize("args, expected", [
    (["--config.sampling.step=10"], "a --config override names a field the config does not have "
     "('step' Did you mean \"steps\" instead of \"step\"?); overrides given: "
     "--config.sampling.step=10"),
    (["--config.foo.bar=1"], "names a field the config does not have ('foo')"),
    (["--config.stage1.steps=abc"], "--config.stage1.steps=abc: invalid literal for int()"),
])
def test_a_mistyped_override_is_one_line_and_exit_2(args, expected):
    """Before, a field the config lacks ended in ml_collections' AttributeError / KeyError
    traceback (exit 1): the commonest typo broke the one-line, exit-2 contract."""
    res = _parse([f"--config={os.path.join(faultrun.ROOT, 'configs', 'demo.py')}", *args])
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("error: ") and expected in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_a_config_file_that_does_not_import_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("def get_config(:\n")
    res = _parse([f"--config={bad}"])
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip() == ("error: the config file could not be loaded: SyntaxError: "
                                  "invalid syntax (broken.py, line 1)")


def _parse(args):
    """cli.parse_flags over `args` in a fresh process (absl flags are process-global)."""
    code = ("import sys; from ml_collections import config_flags; from im_anim_jax import cli; "
            "config_flags.DEFINE_config_file('config', None, 'c', lock_config=True); "
            "cli.parse_flags(['prog'] + sys.argv[1:]); print('parsed')")
    return faultrun.run([sys.executable, "-c", code, *args])
