"""Checkpoint reading shared by the converters: formats, dtypes, and clear errors."""
import json

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from im_anim_jax.convert import common


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


def test_overwrite_replaces_a_converted_checkpoint(tmp_path):
    sd = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}

    class Identity:  # a one-tensor converter
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

    torch.save({"w": torch.from_numpy(sd["w"])}, tmp_path / "a.pth")
    dst = str(tmp_path / "out")
    common.convert_file(Identity, str(tmp_path / "a.pth"), dst, None, "test")
    torch.save({"w": torch.from_numpy(sd["w"] + 1)}, tmp_path / "a.pth")
    common.convert_file(Identity, str(tmp_path / "a.pth"), dst, None, "test", overwrite=True)
    params, meta = common.load_converted(dst)
    np.testing.assert_array_equal(params["w"], sd["w"] + 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pth", "out"]  # no temp dirs left
