"""Checkpoint reading shared by the converters: formats, dtypes, and clear errors."""
import errno
import json
import os
import re
import shutil

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from im_anim_jax.convert import common, wan_dit, wan_vae

W = np.arange(6, dtype=np.float32).reshape(2, 3)


class Identity:
    """A one-tensor converter: params {"w": the source's "w" [2, 3]}."""
    MODEL = None

    @staticmethod
    def expected_shapes(_):
        return {"w": (2, 3)}

    @staticmethod
    def convert(sd, _):
        return {"w": sd["w"]}

    @staticmethod
    def abstract_params(_):
        return {"w": np.zeros((2, 3), np.float32)}


def save_pth(path, sd):
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, path)


def test_bf16_is_read_without_a_dtype_change(tmp_path):
    w = torch.randn(4, 3).to(torch.bfloat16)
    torch.save({"model": {"w": w}}, tmp_path / "a.pth")  # wrapped, as many releases are
    save_file({"w": w}, str(tmp_path / "a.safetensors"))
    bits = w.view(torch.int16).numpy()
    for name in ("a.pth", "a.safetensors"):
        got = common.load_state_dict(str(tmp_path / name))["w"]
        assert got.dtype == ml_dtypes.bfloat16, name
        np.testing.assert_array_equal(got.view(np.int16), bits)


def test_sharded_safetensors_index(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "m-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "m-00002-of-00002.safetensors"))
    index = {"weight_map": {"a": "m-00001-of-00002.safetensors",
                            "b": "m-00002-of-00002.safetensors"}}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    for src in (tmp_path / "m.safetensors.index.json", tmp_path):  # the file or its directory
        sd = common.load_state_dict(str(src))
        assert sorted(sd) == ["a", "b"] and sd["b"].shape == (3,)
    (tmp_path / "m-00002-of-00002.safetensors").unlink()
    with pytest.raises(common.ConversionError, match="shard m-00002-of-00002.safetensors .* missing"):
        common.load_state_dict(str(tmp_path / "m.safetensors.index.json"))


def test_unreadable_and_unknown_files(tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(common.ConversionError, match="broken.safetensors: cannot read checkpoint"):
        common.load_state_dict(str(tmp_path / "broken.safetensors"))
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(common.ConversionError, match="unknown checkpoint format"):
        common.load_state_dict(str(tmp_path / "w.npz"))


def test_check_state_dict_names_every_problem():
    sd = {"a": np.zeros((2, 3)), "extra": np.zeros(1)}
    with pytest.raises(common.ConversionError) as e:
        common.check_state_dict(sd, {"a": (3, 2), "b": (4,)}, "x.pth")
    msg = str(e.value)
    assert "a: expected (3, 2), found (2, 3)" in msg
    assert "missing: b" in msg and "unexpected: extra" in msg


def test_existing_destination_is_left_alone(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")

    class Never:  # convert_file must refuse before reading anything
        MODEL = None

    with pytest.raises(common.ConversionError, match="already exists"):
        common.convert_file(Never, str(tmp_path / "src.pth"), str(dst), None, "titok")
    assert (dst / "keep.txt").read_text() == "mine"


def test_cli_with_default_config_names_a_missing_file_in_one_line(tmp_path):
    import subprocess
    import sys
    src = tmp_path / "wan_dit.safetensors"
    done = subprocess.run([sys.executable, "-m", "im_anim_jax.convert", "wan-dit", f"--src={src}",
                           f"--dst={tmp_path / 'out'}"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)  # cwd: the default config is found anyway
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {src}: no such file or directory"
    src.write_text("a download")  # --dst: the folder holding the source
    done = subprocess.run([sys.executable, "-m", "im_anim_jax.convert", "wan-dit", f"--src={src}",
                           f"--dst={tmp_path}", "--overwrite"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 2 and src.exists()
    assert done.stderr.strip().startswith(f"error: {tmp_path} exists and is neither a converted")


def test_overwrite_replaces_a_converted_checkpoint(tmp_path):
    save_pth(tmp_path / "a.pth", {"w": W})
    dst = str(tmp_path / "out")
    common.convert_file(Identity, str(tmp_path / "a.pth"), dst, None, "test")
    save_pth(tmp_path / "a.pth", {"w": W + 1})
    common.convert_file(Identity, str(tmp_path / "a.pth"), dst, None, "test", overwrite=True)
    params, meta = common.load_converted(dst)
    np.testing.assert_array_equal(params["w"], W + 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pth", "out"]  # no temp dirs left


def test_overwrite_replaces_only_a_converted_checkpoint_or_an_empty_folder(tmp_path):
    save_pth(tmp_path / "titok.bin", {"w": W})
    (tmp_path / "Wan2.2_VAE.pth").write_text("another download")
    with pytest.raises(common.ConversionError, match="neither a converted checkpoint"):
        common.convert_file(Identity, str(tmp_path / "titok.bin"), str(tmp_path), None, "test",
                            overwrite=True)  # --dst: the folder holding the source
    assert sorted(os.listdir(tmp_path)) == ["Wan2.2_VAE.pth", "titok.bin"]

    dst = tmp_path / "out"
    common.convert_file(Identity, str(tmp_path / "titok.bin"), str(dst), None, "test")
    shutil.copy(tmp_path / "titok.bin", dst / "params" / "titok.bin")
    with pytest.raises(common.ConversionError, match="is inside --dst"):
        common.convert_file(Identity, str(dst / "params" / "titok.bin"), str(dst), None, "test",
                            overwrite=True)
    assert (dst / "params" / "titok.bin").exists()

    (tmp_path / "empty").mkdir()
    common.convert_file(Identity, str(tmp_path / "titok.bin"), str(tmp_path / "empty"), None,
                        "test", overwrite=True)
    assert common.is_converted(str(tmp_path / "empty"))


def test_overwrite_leaves_other_paths_alone_and_a_failed_rename_loses_nothing(tmp_path,
                                                                              monkeypatch):
    save_pth(tmp_path / "a.pth", {"w": W})
    dst = tmp_path / "out"
    common.convert_file(Identity, str(tmp_path / "a.pth"), str(dst), None, "test")
    for leftover in ("out.replaced/params/x", "out.partial/y"):  # not written by this run
        os.makedirs(tmp_path / os.path.dirname(leftover))
        (tmp_path / leftover).write_text("keep")
    save_pth(tmp_path / "a.pth", {"w": W + 1})
    common.convert_file(Identity, str(tmp_path / "a.pth"), str(dst), None, "test", overwrite=True)
    np.testing.assert_array_equal(common.load_converted(str(dst))[0]["w"], W + 1)
    listing = ["a.pth", "out", "out.partial", "out.replaced"]
    assert sorted(os.listdir(tmp_path)) == listing

    replace, failed = os.replace, []

    def replace_failing_once(a, b):  # the rename of the new checkpoint onto --dst fails
        if b == str(dst) and not failed:
            failed.append(a)
            raise OSError(errno.EIO, "Input/output error")
        replace(a, b)

    monkeypatch.setattr(os, "replace", replace_failing_once)
    save_pth(tmp_path / "a.pth", {"w": W + 2})
    with pytest.raises(common.ConversionError,
                       match=f"cannot move the converted checkpoint to {dst}: Input/output error"):
        common.convert_file(Identity, str(tmp_path / "a.pth"), str(dst), None, "test",
                            overwrite=True)
    np.testing.assert_array_equal(common.load_converted(str(dst))[0]["w"], W + 1)
    assert sorted(os.listdir(tmp_path)) == listing


def test_keys_and_shapes_are_checked_before_any_tensor_is_read(tmp_path, monkeypatch):
    reads, read = [], common._torch_to_numpy
    monkeypatch.setattr(common, "_torch_to_numpy",
                        lambda t: reads.append(tuple(t.shape)) or read(t))
    save_pth(tmp_path / "bad.pth", {"w": np.zeros((3, 2), np.float32), "extra": np.zeros(4)})
    with pytest.raises(common.ConversionError, match=r"w: expected \(2, 3\), found \(3, 2\)"):
        common.convert_file(Identity, str(tmp_path / "bad.pth"), str(tmp_path / "out"), None,
                            "test")
    assert reads == []

    class Keep(Identity):
        keep = staticmethod(lambda key: key != "unused")

    save_pth(tmp_path / "a.pth", {"w": W, "unused": np.zeros(5)})
    common.convert_file(Keep, str(tmp_path / "a.pth"), str(tmp_path / "out"), None, "test")
    assert reads == [(2, 3)]  # each converted tensor once, a skipped one never


def test_safetensors_are_read_on_the_host_with_their_dtypes(tmp_path):
    path = str(tmp_path / "a.safetensors")
    save_file({"i": torch.tensor([2 ** 40, -3]),
               "d": torch.tensor([1 + 1e-12], dtype=torch.float64)}, path)
    sd = common.load_state_dict(path)
    assert type(sd["i"]) is np.ndarray and sd["i"].dtype == np.int64
    assert sd["i"].tolist() == [2 ** 40, -3]
    assert sd["d"].dtype == np.float64 and sd["d"][0] == 1 + 1e-12


def test_a_directory_source_is_one_file_or_an_error_naming_the_candidates(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ("model.safetensors", "model.fp16.safetensors"):
        save_file({"w": torch.ones(2)}, str(hf / name))
    with pytest.raises(common.ConversionError, match=re.escape(
            "several checkpoint files ['model.fp16.safetensors', 'model.safetensors']")):
        common.load_state_dict(str(hf))
    save_pth(hf / "pytorch_model.bin", {"w": W})
    with pytest.raises(common.ConversionError, match="several checkpoint files .*pytorch_model"):
        common.load_state_dict(str(hf))

    release = tmp_path / "Wan2.2-TI2V-5B"  # each converter takes its own file
    release.mkdir()
    for name in ("Wan2.2_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth",
                 "diffusion_pytorch_model-00001-of-00002.safetensors",
                 "diffusion_pytorch_model-00002-of-00002.safetensors",
                 "diffusion_pytorch_model.safetensors.index.json"):
        (release / name).write_text("")
    assert common.pick_source(str(release), wan_vae.STANDARD_FILES) == str(
        release / "Wan2.2_VAE.pth")
    assert common.pick_source(str(release), wan_dit.STANDARD_FILES) == str(
        release / "diffusion_pytorch_model.safetensors.index.json")
    with pytest.raises(common.ConversionError, match="several checkpoint files"):
        common.pick_source(str(release))

    class Vae(Identity):
        STANDARD_FILES = ("Wan2.2_VAE.pth",)

    save_pth(release / "Wan2.2_VAE.pth", {"w": np.zeros((3, 2), np.float32)})
    with pytest.raises(common.ConversionError,
                       match=re.escape(f"{release / 'Wan2.2_VAE.pth'} (test) does not match")):
        common.convert_file(Vae, str(release), str(tmp_path / "out"), None, "test")


def test_wrapper_prefixes_are_dropped_and_skipped_keys_are_counted(tmp_path):
    for name, key in (("ddp.pth", "module.w"), ("compiled.pth", "_orig_mod.module.w")):
        save_pth(tmp_path / name, {key: W})
        out = str(tmp_path / f"{name}.out")
        common.convert_file(Identity, str(tmp_path / name), out, None, "test")
        np.testing.assert_array_equal(common.load_converted(out)[0]["w"], W)
    save_pth(tmp_path / "some.pth", {"module.w": W, "v": W})  # not every key: names kept
    assert sorted(common.load_state_dict(str(tmp_path / "some.pth"))) == ["module.w", "v"]

    class Keep(Identity):
        keep = staticmethod(lambda key: not key.startswith("decoder."))

    save_pth(tmp_path / "dec.pth", {"decoder.w": W, "decoder.b": W, "v": W})
    with pytest.raises(common.ConversionError, match=re.escape(
            "1 missing: w (2 source keys were skipped as unused by this model: decoder.b, "
            "decoder.w)")):
        common.convert_file(Keep, str(tmp_path / "dec.pth"), str(tmp_path / "out"), None, "test")


def test_containers_are_unwrapped_only_when_unambiguous(tmp_path):
    """{"state_dict": sd, "step": 5} unwraps (a tensor beside it stopped the unwrapping); two
    state dicts ({"model", "ema"}: the EMA was dropped without a word) and non-tensor entries
    inside the state dict (dropped too) are refused, naming them."""
    w = torch.ones(2)
    torch.save({"state_dict": {"w": w}, "step": torch.tensor(5)}, tmp_path / "a.pth")
    assert list(common.load_state_dict(str(tmp_path / "a.pth"))) == ["w"]
    torch.save({"model": {"w": w}, "ema": {"w": 2 * w}}, tmp_path / "b.pth")
    with pytest.raises(common.ConversionError, match=r"several state dicts \(model, ema\)"):
        common.load_state_dict(str(tmp_path / "b.pth"))
    torch.save({"w": w, "sub": {"x": w}}, tmp_path / "c.pth")
    with pytest.raises(common.ConversionError, match="entries that are not tensors: sub"):
        common.load_state_dict(str(tmp_path / "c.pth"))


def test_a_shard_key_missing_from_the_index_is_refused(tmp_path):
    save_file({"a": torch.ones(2), "extra": torch.ones(1)}, str(tmp_path / "m-1.safetensors"))
    index = {"weight_map": {"a": "m-1.safetensors"}}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(common.ConversionError, match="not in the index .*: extra"):
        common.load_state_dict(str(tmp_path / "m.safetensors.index.json"))


def test_blocks_in_mixed_precisions_stack_exactly_and_fp8_reads(tmp_path):
    """A scanned param from blocks saved as bf16 and fp32 (either order) or fp16 and bf16 is
    float32 with every value exact (a TypeError before); fp8 in a .pth reads as ml_dtypes'."""
    x = np.array([1.5, -0.375], np.float32)
    for a, b in ((ml_dtypes.bfloat16, np.float32), (np.float32, ml_dtypes.bfloat16),
                 (np.float16, ml_dtypes.bfloat16)):
        out = common.stack({"b.0": x.astype(a), "b.1": 2 * x.astype(b)}, "b.{}", 2)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, [x, 2 * x])
    torch.save({"w": torch.tensor([0.5, -2.0]).to(torch.float8_e4m3fn)}, tmp_path / "f8.pth")
    got = common.load_state_dict(str(tmp_path / "f8.pth"))["w"]
    assert got.dtype == ml_dtypes.float8_e4m3fn
    np.testing.assert_array_equal(got.astype(np.float32), [0.5, -2.0])


def test_inception_refuses_torchvision_s_imagenet_weights(tmp_path):
    """Same trunk names and shapes, other weights: a 1000-class classifier and AuxLogits (it
    converted silently, and FID came from the wrong network)."""
    from im_anim_jax.convert import inception
    sd = {"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000),
          "AuxLogits.fc.bias": torch.zeros(1000)}
    torch.save(sd, tmp_path / "inception_v3_google.pth")
    with pytest.raises(common.ConversionError, match=re.escape(
            "classifier {'fc.weight': (1000, 2048), 'fc.bias': (1000,)} and AuxLogits.*, "
            "expected {'fc.weight': (1008, 2048), 'fc.bias': (1008,)} (or none): not "
            "pytorch-fid's")):
        inception.load(str(tmp_path / "inception_v3_google.pth"))
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, tmp_path / "trunk.pth")
    assert list(inception.load(str(tmp_path / "trunk.pth"))[0]) == ["Conv2d_1a_3x3.conv.weight"]
