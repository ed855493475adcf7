"""TiTok -> motion encoder + quantizer: a PyTorch TiTok with the official names and random
weights, converted by the CLI, agrees with our Flax encoder in fp32."""
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from im_anim_jax.convert import common
from im_anim_jax.models.stage1 import build_stage1
from torch_titok import TiTok  # tests/parity is on sys.path (pytest rootdir-less import)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZES = dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=2, num_latent_tokens=8,
             token_size=12)
CODEBOOK = 64


def randomise(module: torch.nn.Module, seed: int):
    """Random values for every tensor (LayerNorm scales/biases included), not the init's."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def run_convert(kind, src, dst, overrides):
    cmd = [sys.executable, "-m", "im_anim_jax.convert", kind, f"--src={src}", f"--dst={dst}",
           f"--config={ROOT}/configs/im_animation.py:tiny", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)


def overrides(is_legacy):
    o = [f"--config.model.motion_tokenizer.{k}={v}" for k, v in SIZES.items()]
    return o + [f"--config.model.motion_tokenizer.is_legacy={is_legacy}",
                f"--config.model.quantizer.codebook_size={CODEBOOK}"]


@pytest.mark.parametrize("is_legacy", [True, False])
def test_titok_encoder_parity(tmp_path, tiny_config, is_legacy):
    ref = TiTok(SIZES["image_size"], SIZES["patch_size"], SIZES["width"], SIZES["depth"],
                SIZES["num_heads"], SIZES["num_latent_tokens"], SIZES["token_size"], CODEBOOK,
                is_legacy=is_legacy).eval()
    randomise(ref, seed=int(is_legacy))
    src = tmp_path / "titok.pth"
    torch.save({"state_dict": ref.state_dict()}, src)
    done = run_convert("titok", src, tmp_path / "out", overrides(is_legacy))
    assert done.returncode == 0, done.stderr[-2000:]

    cfg = tiny_config.copy_and_resolve_references()
    cfg.model.motion_tokenizer.update(SIZES, is_legacy=is_legacy)
    cfg.model.quantizer.codebook_size = CODEBOOK
    params, meta = common.load_converted(str(tmp_path / "out"))
    assert meta["skipped_source_keys"] == 2  # decoder.weight, decoder.bias
    model = build_stage1(cfg.model)

    pixels = np.random.default_rng(0).uniform(size=(3, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        z_ref, idx_ref = ref(torch.from_numpy(pixels).permute(0, 3, 1, 2))
    z = model.motion_encoder.apply({"params": params["motion_encoder"]}, jnp.asarray(pixels))
    _, aux = model.quantize.apply({"params": params["quantize"]}, z)
    diff = float(np.max(np.abs(np.asarray(z) - z_ref.numpy())))
    print(f"TiTok encoder (legacy={is_legacy}) fp32 max abs diff: {diff:.2e}")
    assert diff <= 1e-5, f"encoder output max abs diff {diff:.2e} > 1e-5"
    np.testing.assert_array_equal(np.asarray(aux["indices"]), idx_ref.numpy())
    # The legacy reshape is not a no-op: the other layout on the same weights disagrees.
    other = model.motion_encoder.clone(is_legacy=not is_legacy)
    z_other = other.apply({"params": params["motion_encoder"]}, jnp.asarray(pixels))
    assert float(np.max(np.abs(np.asarray(z_other) - z_ref.numpy()))) > 1e-2


def test_titok_wrong_shape_and_missing_file_are_one_line_errors(tmp_path):
    ref = TiTok(SIZES["image_size"], SIZES["patch_size"], SIZES["width"], SIZES["depth"],
                SIZES["num_heads"], SIZES["num_latent_tokens"], SIZES["token_size"], CODEBOOK)
    sd = ref.state_dict()
    sd["encoder.ln_pre.weight"] = torch.ones(SIZES["width"] + 1)
    del sd["encoder.transformer.1.mlp.c_fc.bias"]
    torch.save(sd, tmp_path / "bad.pth")
    done = run_convert("titok", tmp_path / "bad.pth", tmp_path / "out", overrides(True))
    assert done.returncode == 2
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "encoder.ln_pre.weight: expected (32,), found (33,)" in err
    assert "missing: encoder.transformer.1.mlp.c_fc.bias" in err
    assert not (tmp_path / "out").exists()

    done = run_convert("titok", tmp_path / "nope.pth", tmp_path / "out", overrides(True))
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {tmp_path / 'nope.pth'}: no such file or directory"


def test_titok_checkpoint_initialises_stage1(tmp_path, tiny_config):
    from im_anim_jax.convert import convert
    from im_anim_jax.training.stage1 import dummy_frames, init_from_titok
    cfg = tiny_config.copy_and_resolve_references()
    cfg.model.motion_tokenizer.update(SIZES)
    cfg.model.quantizer.codebook_size = CODEBOOK
    ref = TiTok(SIZES["image_size"], SIZES["patch_size"], SIZES["width"], SIZES["depth"],
                SIZES["num_heads"], SIZES["num_latent_tokens"], SIZES["token_size"], CODEBOOK,
                is_legacy=False)
    torch.save(ref.state_dict(), tmp_path / "titok.pth")
    convert("titok", str(tmp_path / "titok.pth"), str(tmp_path / "out"), cfg.model)
    model = build_stage1(cfg.model)
    params = jax.tree.map(np.asarray, nn.unbox(
        model.init(jax.random.key(0), dummy_frames(cfg.model))["params"]))
    cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    new = init_from_titok(str(tmp_path / "out"), params, jax.tree.map(lambda _: cpu, params),
                          cfg.model)
    np.testing.assert_array_equal(new["quantize"]["embedding"],
                                  ref.quantize.embedding.weight.detach().numpy())
    np.testing.assert_array_equal(new["motion_encoder"]["latent_tokens"],
                                  ref.latent_tokens.detach().numpy())
    for a, b in zip(jax.tree.leaves(new["motion_decoder"]), jax.tree.leaves(params["motion_decoder"])):
        np.testing.assert_array_equal(a, b)

    cfg.model.motion_tokenizer.depth = 3  # a model the checkpoint does not fit
    bigger = jax.tree.map(np.asarray, nn.unbox(
        build_stage1(cfg.model).init(jax.random.key(0), dummy_frames(cfg.model))["params"]))
    with pytest.raises(ValueError, match="does not fit config.model"):
        init_from_titok(str(tmp_path / "out"), bigger, jax.tree.map(lambda _: cpu, bigger),
                        cfg.model)
