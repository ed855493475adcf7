"""Implicit Pose Indicator: shapes, logical axes on every parameter, the keypoint query (hidden
joints carry no coordinates), the CLIP resize path, and the stage-2 model's driving input."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from im_anim_jax.models.pose_indicator import build_pose_indicator
from im_anim_jax.training import stage2


def test_ipi_shapes_axes_and_query(tiny_config):
    cfg = tiny_config.copy_and_resolve_references()
    cfg.model.pose_indicator.clip.image_size = 16  # frames (32 px) are resized for the CLIP
    ipi = build_pose_indicator(cfg.model)
    rng = np.random.default_rng(0)
    pixels = jnp.asarray(rng.uniform(size=(3, 32, 32, 3)), jnp.float32)
    kpts = np.concatenate([rng.uniform(0, 31, (3, 62, 2)), np.ones((3, 62, 1))], -1)
    variables = jax.jit(ipi.init)(jax.random.key(0), pixels, jnp.asarray(kpts, jnp.float32))
    specs = jax.tree.leaves(nn.get_partition_spec(variables["params"]),
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    n_params = len(jax.tree.leaves(nn.unbox(variables["params"])))
    assert len(specs) == n_params and all(any(a is not None for a in s) for s in specs)
    assert nn.unbox(variables["params"])["layers"]["q_proj"]["kernel"].shape == (1, 32, 2, 16)

    apply = jax.jit(ipi.apply)

    def run(k):
        return np.asarray(apply(variables, pixels, jnp.asarray(k, jnp.float32)))

    out = run(kpts)
    assert out.shape == (3, 62, cfg.model.pose_indicator.width) and np.all(np.isfinite(out))
    moved = kpts.copy()
    moved[:, 5, :2] += 4.0
    assert np.abs(run(moved) - out).max() > 1e-4  # the query reads the keypoints
    hidden, hidden_moved = kpts.copy(), moved.copy()
    hidden[:, 5, 2] = hidden_moved[:, 5, 2] = 0.1  # below conf_threshold: position ignored
    np.testing.assert_allclose(run(hidden), run(hidden_moved), atol=1e-6)
    with pytest.raises(ValueError, match="keypoints \\[3, 62, 3\\]"):
        jax.eval_shape(ipi.apply, variables, pixels, jnp.zeros((3, 61, 3)))


def test_stage2_model_takes_frames_and_keypoints(tiny_config):
    cfg = stage2.variant_config(tiny_config, "pose_indicator")
    assert stage2.trainable(cfg) == ("motion_encoder", "retargeter", "joint_head")
    # Not from stage 1, so trained even where the stage-1 encoder is kept (the demo's setting).
    for name in ("pose_indicator", "conv", "self_attention"):
        kept = tiny_config.copy_and_resolve_references()
        kept.stage2.train_motion_encoder = False
        trained = stage2.trainable(stage2.variant_config(kept, name))
        assert ("motion_encoder" in trained) == (name != "self_attention"), (name, trained)
    model = stage2.build_stage2(cfg.model, (1, 1))
    driving, ref = stage2.dummy_inputs(cfg, 48, (1, 1))
    assert set(driving) == {"frames", "keypoints"}
    variables = jax.eval_shape(model.init, jax.random.key(0), driving, ref)  # shapes only
    heatmaps, aux = jax.eval_shape(model.apply, variables, driving, ref)
    t = cfg.stage2.clip_frames
    assert aux["motion"].shape == (1, t, 62, cfg.model.pose_indicator.width)
    assert heatmaps.shape == (1, t, 62, 16, 16)
    with pytest.raises(ValueError, match="needs the driving input as"):
        jax.eval_shape(model.apply, variables, driving["frames"], ref)


def test_training_batches_pack_the_epi_pose_with_the_frames(tiny_config, tiny_dataset):
    cfg = stage2.variant_config(tiny_config, "pose_indicator")
    cfg.stage2.update(batch_size=2, epi=dict(cfg.stage2.epi, prob=1.0, drop_prob=0.0))
    lines = []
    batch = next(iter(stage2.train_dataset(cfg, tiny_dataset, log=lines.append)))
    assert "pose pool of" in lines[0] and "probability 1.0" in lines[0]
    t, s = cfg.stage2.clip_frames, cfg.model.motion_tokenizer.image_size
    assert batch["driving"]["frames"].shape == (2, t, s, s, 3)
    np.testing.assert_array_equal(batch["driving"]["keypoints"], batch["driving_keypoints"])
    assert batch["driving_keypoints"].shape == (2, t, 62, 3)
