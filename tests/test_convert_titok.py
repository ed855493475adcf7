"""TiTok's is_legacy / use_l2_norm change the maths but no shape: the release's config.json beside
the source, and the converted checkpoint at stage1.init_from, must agree with config.model."""
import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from im_anim_jax.convert import common, convert, titok
from im_anim_jax.training.stage1 import init_from_titok

SIZES = dict(image_size=16, patch_size=8, width=16, depth=1, num_heads=2, num_latent_tokens=4,
             token_size=4)


@pytest.fixture
def model_cfg(tiny_config):
    cfg = tiny_config.copy_and_resolve_references().model  # the fixture is shared: a copy
    cfg.motion_tokenizer.update(SIZES, is_legacy=True)
    cfg.quantizer.update(codebook_size=8, use_l2_norm=True)
    return cfg


def release(folder, model_cfg, vq_model=None) -> str:
    """A TiTok Hugging Face folder: model.safetensors (+ config.json)."""
    folder.mkdir()
    save_file({k: np.zeros(s, np.float32) for k, s in titok.expected_shapes(model_cfg).items()},
              str(folder / "model.safetensors"))
    if vq_model is not None:
        (folder / "config.json").write_text(json.dumps({"model": {"vq_model": vq_model}}))
    return str(folder)


def test_config_json_beside_the_source_must_match(tmp_path, model_cfg):
    src = release(tmp_path / "fixed", model_cfg, {"is_legacy": False, "use_l2_norm": True})
    with pytest.raises(common.ConversionError, match=r"is_legacy=False in .*/fixed/config.json "
                       r"but config.model.motion_tokenizer.is_legacy=True"):
        convert("titok", src, str(tmp_path / "out"), model_cfg)
    assert not (tmp_path / "out").exists()
    src = release(tmp_path / "legacy", model_cfg, {"use_l2_norm": True})  # upstream: legacy
    meta = convert("titok", src, str(tmp_path / "out"), model_cfg)
    assert meta["source_config"] == str(tmp_path / "legacy" / "config.json")


def test_init_from_refuses_a_checkpoint_converted_with_other_maths(tmp_path, model_cfg):
    convert("titok", release(tmp_path / "src", model_cfg), str(tmp_path / "out"), model_cfg)
    model_cfg.quantizer.use_l2_norm = False
    with pytest.raises(ValueError, match=r"use_l2_norm=True in stage1.init_from=.*/out but "
                       r"config.model.quantizer.use_l2_norm=False"):
        init_from_titok(str(tmp_path / "out"), {}, {}, model_cfg=model_cfg)
