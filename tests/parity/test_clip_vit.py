"""CLIP ViT (Hugging Face CLIPVisionModel names) -> the Pose Indicator's image encoder: a PyTorch
CLIP vision tower with random weights, converted by convert/clip_vit.py, agrees with our Flax ViT in
fp32 (max abs diff ~1e-6, asserted <= 1e-5), and loads into a pose-indicator stage-2 model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from im_anim_jax.convert import clip_vit as clip_convert
from im_anim_jax.convert import common
from im_anim_jax.models.pose_indicator import build_clip_vit
from torch_clip_vit import CLIPVisionModel  # tests/parity is on sys.path

SIZES = dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64)


def reference(act: str, seed: int) -> CLIPVisionModel:
    ref = CLIPVisionModel(SIZES["image_size"], SIZES["patch_size"], SIZES["width"],
                          SIZES["depth"], SIZES["num_heads"], SIZES["mlp_dim"], act).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random values for every tensor, LayerNorms included
        for p in ref.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return ref


def clip_config(tiny_config, act: str):
    cfg = tiny_config.copy_and_resolve_references()
    cfg.model.pose_indicator.clip.update(SIZES, hidden_act=act)
    return cfg


def check_parity(ref, params, cfg):
    pixels = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        hidden_ref, pooled_ref = ref(torch.from_numpy(pixels).permute(0, 3, 1, 2))
    hidden, pooled = build_clip_vit(cfg.model.pose_indicator.clip).apply(
        {"params": params}, jnp.asarray(pixels))
    diff = max(float(np.max(np.abs(np.asarray(hidden) - hidden_ref.numpy()))),
               float(np.max(np.abs(np.asarray(pooled) - pooled_ref.numpy()))))
    print(f"CLIP ViT ({cfg.model.pose_indicator.clip.hidden_act}) fp32 max abs diff: {diff:.2e}")
    assert diff <= 1e-5, f"max abs diff {diff:.2e} > 1e-5"


def test_clip_vit_parity_quick_gelu_clipmodel_file(tmp_path, tiny_config):
    ref = reference("quick_gelu", seed=0)
    sd = {**ref.state_dict(), "text_model.embeddings.token_embedding.weight": torch.zeros(4, 8),
          "visual_projection.weight": torch.zeros(8, SIZES["width"]), "logit_scale": torch.ones(())}
    torch.save(sd, tmp_path / "pytorch_model.bin")  # a CLIPModel file: the text half is skipped
    cfg = clip_config(tiny_config, "quick_gelu")
    meta = common.convert_file(clip_convert, str(tmp_path / "pytorch_model.bin"),
                               str(tmp_path / "out"), cfg.model, "clip-vit")
    assert meta["skipped_source_keys"] == 4  # text, projection, logit scale, position_ids
    params, _ = common.load_converted(str(tmp_path / "out"))
    check_parity(ref, params, cfg)


def test_clip_vit_parity_gelu_and_stage2_init(tmp_path, tiny_config):
    from im_anim_jax.training import stage2
    ref = reference("gelu", seed=1)
    torch.save(ref.state_dict(), tmp_path / "clip.pth")
    cfg = clip_config(tiny_config, "gelu")
    common.convert_file(clip_convert, str(tmp_path / "clip.pth"), str(tmp_path / "out"),
                        cfg.model, "clip-vit")
    params, _ = common.load_converted(str(tmp_path / "out"))
    check_parity(ref, params, cfg)

    # The converted file initialises the pose indicator's CLIP (cast, placed, names checked).
    cfg = stage2.variant_config(cfg, "pose_indicator")
    model = stage2.build_stage2(cfg.model, (1, 1))
    fresh = stage2.abstract_params(model, cfg, 48)["motion_encoder"]["clip"]
    fresh = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), fresh)
    cpu = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), fresh)
    loaded = stage2.load_clip(str(tmp_path / "out"), fresh, cpu)
    np.testing.assert_array_equal(loaded["class_embedding"],
                                  ref.vision_model.embeddings.class_embedding.detach().numpy())
    bigger = dict(fresh, position_embedding=np.zeros((26, SIZES["width"]), np.float32))
    with pytest.raises(ValueError, match="does not fit config.model.pose_indicator.clip"):
        stage2.load_clip(str(tmp_path / "out"), bigger, dict(cpu, position_embedding=cpu[
            "position_embedding"]))


def test_clip_vit_wrong_shape_names_the_tensor(tmp_path, tiny_config):
    sd = reference("gelu", seed=2).state_dict()
    sd["vision_model.encoder.layers.1.mlp.fc1.weight"] = torch.zeros(65, SIZES["width"])
    del sd["vision_model.post_layernorm.bias"]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(common.ConversionError) as err:
        common.convert_file(clip_convert, str(tmp_path / "bad.pth"), str(tmp_path / "out"),
                            clip_config(tiny_config, "gelu").model, "clip-vit")
    msg = str(err.value)
    assert "vision_model.encoder.layers.1.mlp.fc1.weight: expected (64, 32), found (65, 32)" in msg
    assert "missing: vision_model.post_layernorm.bias" in msg
    assert not (tmp_path / "out").exists()
