"""Wan2.2 DiT -> WanDiT: a PyTorch WanModel with the official state-dict names and random weights,
saved as .pth (converted by the CLI) and as sharded safetensors with an index (as the TI2V-5B
ships), agrees with our Flax model in fp32. Measured diffs print with -s."""
import functools
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import im_animation
from im_anim_jax import convert as convert_api
from im_anim_jax.convert import common, wan_dit
from im_anim_jax.models.wan import dit
import torch_wan_dit  # tests/parity is on sys.path (rootdir-less test modules)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = im_animation.wan_dit("tiny")  # dim 48, 2 heads (head_dim 24), 2 layers, text 8 x 16
B, F, H, W = 2, 3, 4, 6
L = F * (H // 2) * (W // 2)


def random_model(scale: float) -> torch_wan_dit.WanModel:
    model = torch_wan_dit.WanModel(CFG.dim, CFG.ffn_dim, CFG.num_heads, CFG.num_layers,
                                   CFG.text_dim, CFG.text_len, CFG.freq_dim).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every tensor random: norms and modulations too
        for p in model.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def ref():
    return random_model(0.3)


def save_sharded(sd: dict, root) -> str:
    """Two safetensors shards + model.safetensors.index.json, the official 5B layout."""
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: sd[k].contiguous() for k in keys}, os.path.join(root, shard))
    index = os.path.join(root, "model.safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}, f)
    return index


def converted(ref, tmp_path, fmt: str) -> dict:
    if fmt == "pth":  # the CLI, end to end
        torch.save(ref.state_dict(), tmp_path / "wan.pth")
        done = subprocess.run(
            [sys.executable, "-m", "im_anim_jax.convert", "wan-dit", f"--src={tmp_path}/wan.pth",
             f"--dst={tmp_path}/out", f"--config={ROOT}/configs/im_animation.py:tiny"],
            capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    else:  # the function the CLI calls
        config = im_animation.get_config("tiny")
        convert_api.convert("wan-dit", save_sharded(ref.state_dict(), tmp_path),
                            str(tmp_path / "out"), config.model)
    params, meta = common.load_converted(str(tmp_path / "out"))
    assert meta["num_params"] == sum(p.numel() for p in ref.parameters())
    return params


def inputs(per_token: bool):
    """Latents, t (per token with t = 0 on the first frame's tokens, or per clip), and prompts of
    different lengths."""
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((B, F, H, W, CFG.in_dim)).astype(np.float32)
    t = np.array([937.25, 412.5], np.float32)
    if per_token:
        t = np.repeat(t[:, None], L, 1)
        t[:, :L // F] = 0
    prompts = [rng.standard_normal((n, CFG.text_dim)).astype(np.float32) for n in (5, CFG.text_len)]
    return latents, t, prompts


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("fmt,per_token", [("pth", True), ("sharded_safetensors", False)])
def test_dit_forward_parity(ref, tmp_path, fmt, per_token):
    params = converted(ref, tmp_path, fmt)
    latents, t, prompts = inputs(per_token)
    model = dit.build_dit(CFG)
    out = jax.jit(model.apply)({"params": params}, latents, t,
                               dit.pad_context(prompts, CFG.text_len))
    with torch.no_grad():
        want = ref(torch.from_numpy(latents).permute(0, 4, 1, 2, 3), torch.from_numpy(t),
                   [torch.from_numpy(p) for p in prompts]).permute(0, 2, 3, 4, 1).numpy()
    assert out.shape == want.shape == (B, F, H, W, CFG.out_dim)
    diff = max_diff(out, want)
    print(f"WanDiT forward ({fmt}, per-token t={per_token}) fp32 max abs diff: {diff:.2e} "
          f"(|out| max {np.abs(want).max():.1f})")
    assert diff <= 1e-4, f"DiT forward max abs diff {diff:.2e} > 1e-4"


def test_block_parity():
    """Weights at 0.15 keep outputs O(1), so 1e-5 is not below float32 rounding of the output."""
    ref = random_model(0.15)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    block = jax.tree.map(lambda a: a[0], wan_dit.convert(sd, CFG)["blocks"])
    rng = np.random.default_rng(2)
    grid = (F, H // 2, W // 2)
    x = rng.standard_normal((B, L, CFG.dim)).astype(np.float32)
    e0 = (0.5 * rng.standard_normal((B, L, 6, CFG.dim))).astype(np.float32)
    context = rng.standard_normal((B, CFG.text_len, CFG.dim)).astype(np.float32)
    cos, sin = dit.rope_tables(grid, CFG.dim // CFG.num_heads)
    got, _ = jax.jit(dit.WanBlock(CFG.ffn_dim, CFG.num_heads, CFG.eps, True, jnp.float32,
                                  "xla").apply)({"params": block}, x, e0, context, cos, sin)
    with torch.no_grad():
        want = ref.blocks[0](*map(torch.from_numpy, (x, e0, context)),
                             torch_wan_dit.rope_angles(grid, CFG.dim // CFG.num_heads))
    diff = max_diff(got, want.numpy())
    print(f"WanBlock fp32 max abs diff: {diff:.2e} (|out| max {np.abs(want.numpy()).max():.1f})")
    assert diff <= 1e-5, f"block max abs diff {diff:.2e} > 1e-5"


def test_rope_parity():
    """The 5B's head_dim 128: (t, h, w) get 22/21/21 adjacent pairs (44/42/42 dims)."""
    assert dit.rope_split(128) == (22, 21, 21)
    grid = (5, 7, 9)
    q = np.random.default_rng(3).standard_normal((2, math.prod(grid), 3, 128)).astype(np.float32)
    got = dit.apply_rope(jnp.asarray(q), *dit.rope_tables(grid, 128))
    want = torch_wan_dit.rope(torch.from_numpy(q), torch_wan_dit.rope_angles(grid, 128))
    diff = max_diff(got, want.numpy())
    print(f"RoPE fp32 max abs diff: {diff:.2e}")
    assert diff <= 1e-5, f"RoPE max abs diff {diff:.2e} > 1e-5"


def test_time_embedding_parity(ref):
    t = np.array([[0.0, 1.0, 3.5, 412.5, 937.25, 999.999]], np.float32)
    got = dit.sinusoid(jnp.asarray(t), 256)
    want = torch_wan_dit.sinusoid(256, torch.from_numpy(t).flatten())  # float64
    diff = max_diff(got[0], want.numpy())
    print(f"timestep sinusoid (dim 256) max abs diff vs float64: {diff:.2e}")
    assert diff <= 1e-5, f"sinusoid max abs diff {diff:.2e} > 1e-5"

    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    params = wan_dit.convert(sd, CFG)
    e, e0 = jax.jit(functools.partial(dit.build_dit(CFG).apply, method=dit.WanDiT.embed_time))(
        {"params": params}, jnp.asarray(t))
    with torch.no_grad():
        e_ref, e0_ref = ref.embed_time(torch.from_numpy(t))
    diff = max(max_diff(e, e_ref.numpy()), max_diff(e0, e0_ref.numpy()))
    print(f"time embedding e, e0 fp32 max abs diff: {diff:.2e}")
    assert diff <= 1e-5, f"time embedding max abs diff {diff:.2e} > 1e-5"


def test_5b_param_count():
    """Abstract (eval_shape) init of the released TI2V-5B sizes: nothing is allocated."""
    cfg = im_animation.wan_dit("wan2_2_ti2v_5b")
    abstract = wan_dit.abstract_params(cfg)
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))
    assert n == sum(math.prod(s) for s in wan_dit.expected_shapes(cfg).values())
    assert len(wan_dit.expected_shapes(cfg)) == 15 + 27 * 30
    assert n == 4_999_787_712, n


def test_wrong_shape_names_key_expected_and_found(ref, tmp_path):
    sd = dict(ref.state_dict())
    sd["blocks.1.cross_attn.norm_k.weight"] = torch.ones(CFG.dim + 2)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(common.ConversionError) as err:
        convert_api.convert("wan-dit", str(tmp_path / "bad.pth"), str(tmp_path / "out"),
                            im_animation.get_config("tiny").model)
    assert "blocks.1.cross_attn.norm_k.weight: expected (48,), found (50,)" in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_bf16_remat_keeps_float32_stream(remat):
    """bf16 compute with a rematerialised scan traces (no compile) to a float32 velocity."""
    model = dit.build_dit(CFG, "bfloat16", "auto", remat)
    args = dit.init_inputs(CFG, batch=2, frames=2)
    params = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
    grads = jax.eval_shape(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, *args))), params)
    out = jax.eval_shape(model.apply, {"params": params}, *args)
    assert out.shape == args[0].shape[:4] + (CFG.out_dim,) and out.dtype == jnp.float32
    assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("change,message", [
    (lambda x, t, c: (x[..., :40], t, c), "in_dim=48"),
    (lambda x, t, c: (x[:, :, :1], t, c), "not divisible by the patch size"),
    (lambda x, t, c: (x, t, c[:, :5]), "text_len=8, text_dim=16"),
    (lambda x, t, c: (x, jnp.zeros((1, 5)), c), "L=1"),
])
def test_bad_inputs_are_value_errors(change, message):
    model = dit.build_dit(CFG)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(model.init, jax.random.key(0), *change(*dit.init_inputs(CFG)))
    with pytest.raises(ValueError, match="L <= text_len=8"):
        dit.pad_context([np.zeros((9, CFG.text_dim))], CFG.text_len)
