"""FID InceptionV3, FVD I3D and LPIPS: PyTorch references with the official state-dict names and
random weights, saved under the standard file names, converted (CLI for one, the same code as a
function for the rest), loaded with metrics.load_extractor and compared in fp32. The real
architectures at reduced input sizes (Inception resizes to 107 px, I3D to 16 x 64 px) keep CPU
time low; at full size (299 px; 16 x 224 px with the port's AvgPool3d(1, 7, 7)) the same
comparison measured 1.5e-5 and 2.7e-5."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import torch_metric_nets as ref_nets  # tests/parity is on sys.path
from im_anim_jax import metrics
from im_anim_jax.convert import common, convert

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BOUND = 1e-4


def randomise(module: torch.nn.Module, seed: int):
    """He-normal conv/linear weights (activations stay O(1) through the depth), random BatchNorm
    statistics and affine parameters, small biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))


def run_cli(kind, src, dst):
    cmd = [sys.executable, "-m", "im_anim_jax.convert", kind, f"--src={src}", f"--dst={dst}"]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)


def report(name, got, want):
    diff = float(np.max(np.abs(np.asarray(got) - want)))
    print(f"{name} fp32 max abs diff: {diff:.2e} (outputs up to {np.max(np.abs(want)):.3g})")
    assert diff <= BOUND, f"{name}: max abs diff {diff:.2e} > {BOUND}"


def test_inception_parity_through_cli(tmp_path):
    ref = ref_nets.FIDInceptionV3(size=107).eval()
    randomise(ref, seed=0)
    src = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(ref.state_dict(), src)
    done = run_cli("inception", src, tmp_path / "inception")
    assert done.returncode == 0, done.stderr[-2000:]
    meta = common.load_converted(str(tmp_path / "inception"))[1]
    assert meta["skipped_source_keys"] == 2 + 94  # fc.{weight,bias}, num_batches_tracked

    pixels = np.random.default_rng(0).uniform(size=(2, 96, 120, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(pixels).permute(0, 3, 1, 2)).numpy()
    got = metrics.load_extractor("inception", str(tmp_path / "inception"), size=107)(pixels)
    assert got.shape == (2, 2048)
    report("InceptionV3 pool3", got, want)


def test_i3d_parity(tmp_path):
    ref = ref_nets.InceptionI3d(avg_kernel=(1, 2, 2)).eval()  # 64 px -> a 2x2 final grid
    randomise(ref, seed=1)
    torch.save(ref.state_dict(), tmp_path / "i3d_pretrained_400.pt")
    convert("i3d", str(tmp_path / "i3d_pretrained_400.pt"), str(tmp_path / "i3d"), None)
    video = np.random.default_rng(1).uniform(size=(1, 16, 80, 56, 3)).astype(np.float32)
    frames = torch.from_numpy(video[0]).permute(0, 3, 1, 2)  # antialiased bicubic, as PIL's
    frames = F.interpolate(frames, size=(64, 64), mode="bicubic", antialias=True)
    with torch.no_grad():
        want = ref(2 * frames.permute(1, 0, 2, 3)[None] - 1).numpy()
    got = metrics.load_extractor("i3d", str(tmp_path / "i3d"), size=64)(video)
    assert got.shape == (1, 400)
    report("I3D logits", got, want)


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips_parity(tmp_path, net):
    trunk, heads = ref_nets.Trunk(net).eval(), ref_nets.LPIPSHeads(net).eval()
    randomise(trunk, seed=2)
    with torch.no_grad():
        for p in heads.parameters():  # the released heads are non-negative
            p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(3)))
    torch.save(trunk.state_dict(), tmp_path / f"trunk_{net}.pth")
    torch.save(heads.state_dict(), tmp_path / f"{net}.pth")
    if net == "vgg":  # a directory holding both files
        os.makedirs(tmp_path / "src")
        for name in ("trunk_vgg.pth", "vgg.pth"):
            os.replace(tmp_path / name, tmp_path / "src" / name)
        src = str(tmp_path / "src")
    else:  # the two files joined by a comma
        src = f"{tmp_path / 'trunk_alex.pth'},{tmp_path / 'alex.pth'}"
    meta = convert("lpips", src, str(tmp_path / "lpips"), None)
    assert meta["model_config"] == {"net": net}

    rng = np.random.default_rng(2)
    a, b = (rng.uniform(size=(3, 48, 48, 3)).astype(np.float32) for _ in range(2))
    ta, tb = (torch.from_numpy(x).permute(0, 3, 1, 2) for x in (a, b))
    for rescale in (True, False):  # False: DisCo's unscaled [0, 1] inputs
        with torch.no_grad():
            want = ref_nets.lpips(trunk, heads, net, ta, tb, normalize=rescale).numpy()
        got = metrics.load_extractor("lpips", str(tmp_path / "lpips"), rescale=rescale)(a, b)
        assert got.shape == (3,)
        report(f"LPIPS-{net} (rescale={rescale})", got, want)


def test_whole_lpips_state_dict_is_accepted(tmp_path):
    trunk, heads = ref_nets.Trunk("alex"), ref_nets.LPIPSHeads("alex")
    sd = heads.state_dict()
    for key, value in trunk.state_dict().items():  # the lpips package's names: net.slice{s}.{i}.*
        _, i, leaf = key.split(".")
        if _ == "features":
            s = 1 + sum(int(i) >= end for end in ref_nets.SLICES["alex"])
            sd[f"net.slice{s}.{i}.{leaf}"] = value
    sd["scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)
    torch.save(sd, tmp_path / "lpips_alex_full.pth")
    meta = convert("lpips", str(tmp_path / "lpips_alex_full.pth"), str(tmp_path / "out"), None)
    assert meta["model_config"] == {"net": "alex"} and meta["skipped_source_keys"] == 1
    params, _ = common.load_converted(str(tmp_path / "out"))
    np.testing.assert_array_equal(params["features_3"]["bias"],
                                  trunk.features[3].bias.detach().numpy())


def test_missing_weights_say_how_to_make_them(tmp_path):
    path = str(tmp_path / "fid")
    with pytest.raises(metrics.MetricUnavailable) as e:
        metrics.load_extractor("inception", path)
    assert str(e.value) == (
        f"not computed: FID needs the converted inception weights, and {path}/meta.json is "
        f"missing; make them with: python -m im_anim_jax.convert inception "
        f"--src pt_inception-2015-12-05-6726825d.pth --dst {path}")
    with pytest.raises(ValueError, match="unknown metric network 'fvd'"):
        metrics.load_extractor("fvd", path)


def test_lpips_without_heads_and_bad_pixels_are_clear_errors(tmp_path):
    torch.save(ref_nets.Trunk("vgg").state_dict(), tmp_path / "vgg16-397923af.pth")
    with pytest.raises(common.ConversionError, match=r"no LPIPS heads \(lin1.model.1.weight\); "
                                                     r"pass the lpips v0.1 head file"):
        convert("lpips", str(tmp_path / "vgg16-397923af.pth"), str(tmp_path / "out"), None)
    heads = ref_nets.LPIPSHeads("alex").state_dict()
    torch.save(heads, tmp_path / "alex.pth")
    with pytest.raises(common.ConversionError, match="10 missing: features.0.bias, features.0.w"):
        convert("lpips", str(tmp_path / "alex.pth"), str(tmp_path / "out"), None)

    torch.save(heads | ref_nets.Trunk("alex").state_dict(), tmp_path / "both.pth")
    convert("lpips", str(tmp_path / "both.pth"), str(tmp_path / "ok"), None)
    lp = metrics.load_extractor("lpips", str(tmp_path / "ok"))
    x = np.full((1, 64, 64, 3), 0.5, np.float32)
    with pytest.raises(ValueError, match=r"expected pixels in \[0, 1\], found .* \[0.5, 1.5\]"):
        lp(x, x + np.eye(64, dtype=np.float32)[None, :, :, None])
    with pytest.raises(ValueError, match="expected 4 axes with 3 channels last"):
        lp(x[0], x[0])
    with pytest.raises(ValueError, match="holds converted 'lpips' weights, not 'i3d'"):
        metrics.load_extractor("i3d", str(tmp_path / "ok"))
    assert float(lp(x, x)[0]) == 0.0
