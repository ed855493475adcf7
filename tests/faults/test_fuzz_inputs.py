"""Hypothesis fuzzing of the user-supplied files: the ingestion's keypoint JSON and videos, and
the animate CLI's reference image, driving video and prompt embedding. Any input either loads
into the documented array or raises the module's own clear error (InputError / MediaError /
ValueError naming the file), never anything else."""
import io
import json
import os
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from data_pipelines import ingest
from im_anim_jax import media, text

FUZZ = settings(max_examples=40, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow])
N = ingest.NUM_KPTS

scalars = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=5)
           | st.floats(allow_nan=True, allow_infinity=True))
json_any = st.recursive(scalars, lambda c: st.lists(c, max_size=4)
                        | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=20)
coordinate = st.floats(-1e4, 1e4) | st.sampled_from([float("nan"), float("inf"), None, "x"])
# Nearly valid frame entries: the documented shapes with lengths, types and values perturbed.
point = st.lists(coordinate, min_size=1, max_size=4)
person = st.fixed_dictionaries(
    {"keypoints": st.lists(point, min_size=N - 1, max_size=N + 1) | st.lists(coordinate,
                                                                            max_size=3 * N + 1)},
    optional={"keypoint_scores": st.lists(coordinate, min_size=N - 1, max_size=N + 1)})
frame = (st.none() | st.lists(person, max_size=2) | st.fixed_dictionaries({"instances": st.lists(
    person, max_size=2)}) | person | json_any)


def _file(suffix, data: bytes) -> str:
    fd, path = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _keypoints_or_input_error(path):
    try:
        kpts = ingest.read_keypoints(path)
    except ingest.InputError as e:
        assert str(e)
        return
    finally:
        os.unlink(path)
    assert kpts.dtype == np.float32 and kpts.ndim == 3 and kpts.shape[1:] == (N, 3)


@FUZZ
@given(st.lists(frame, max_size=3) | json_any)
def test_keypoint_json_structures(data):
    _keypoints_or_input_error(_file(".json", json.dumps(data, allow_nan=True).encode()))


@FUZZ
@given(st.binary(max_size=300))
def test_keypoint_json_bytes(data):
    _keypoints_or_input_error(_file(".json", data))


def _valid_media():
    """A small PNG, GIF and MP4, as bytes."""
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)) for _ in range(3)]
    png, gif = io.BytesIO(), io.BytesIO()
    frames[0].save(png, "PNG")
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=40)
    path = tempfile.mktemp(suffix=".mp4")
    media.write_video(path, np.stack([np.asarray(f) for f in frames]), 8.0)
    with open(path, "rb") as f:
        mp4 = f.read()
    os.unlink(path)
    return {".png": png.getvalue(), ".gif": gif.getvalue(), ".mp4": mp4}


VALID = _valid_media()


def _mutated(draw_data, suffix):
    """The valid file of `suffix` with random bytes overwritten, inserted or cut off."""
    data = bytearray(VALID[suffix])
    for _ in range(draw_data.draw(st.integers(1, 6))):
        at = draw_data.draw(st.integers(0, len(data) - 1))
        kind = draw_data.draw(st.sampled_from(["flip", "insert", "truncate"]))
        if kind == "flip":
            data[at] ^= draw_data.draw(st.integers(1, 255))
        elif kind == "insert":
            data[at:at] = draw_data.draw(st.binary(min_size=1, max_size=16))
        else:
            del data[at:]
        if not data:
            break
    return bytes(data)


@pytest.mark.parametrize("suffix", [".png", ".gif"])
@FUZZ
@given(data=st.data())
def test_reference_images(suffix, data):
    path = _file(suffix, _mutated(data, suffix) if data.draw(st.booleans())
                 else data.draw(st.binary(max_size=200)))
    try:
        image = media.read_image(path, 32) if suffix == ".png" else None
        video, fps = media.read_video(path, 32) if suffix == ".gif" else (None, 1.0)
    except media.MediaError as e:
        assert path in str(e)
        return
    finally:
        os.unlink(path)
    for x in (image, video):
        assert x is None or (x.dtype == np.float32 and x.shape[-3:] == (32, 32, 3)
                             and np.isfinite(x).all())
    assert np.isfinite(fps) and fps > 0


@FUZZ
@given(data=st.data())
def test_driving_videos(data):
    """The animate CLI's --driving reader and the ingestion's video reader on mutated mp4s."""
    payload = _mutated(data, ".mp4") if data.draw(st.booleans()) else data.draw(
        st.binary(max_size=300))
    for reader, error in ((lambda p: media.read_video(p, 32)[0], media.MediaError),
                          (ingest.read_video, ingest.InputError)):
        path = _file(".mp4", payload)
        try:
            video = reader(path)
        except error as e:
            assert path in str(e)
            continue
        finally:
            os.unlink(path)
        assert video.ndim == 4 and video.shape[-1] == 3 and len(video) >= 1


def test_driving_video_with_non_utf8_metadata():
    """A case the fuzzing found: one corrupt byte in the mp4's encoder tag ("Lavf...") made PyAV
    raise UnicodeDecodeError from av.open; both readers must name the file in their own error."""
    data = bytearray(VALID[".mp4"])
    at = data.find(b"Lavf")
    assert at > 0, "the test mp4 no longer carries the encoder tag"
    data[at] = 0xCC  # a UTF-8 continuation byte where a start byte must be
    for reader, error in ((lambda p: media.read_video(p, 32), media.MediaError),
                          (ingest.read_video, ingest.InputError)):
        path = _file(".mp4", bytes(data))
        try:
            with pytest.raises(error, match="could not be decoded|cannot open") as e:
                reader(path)
            assert path in str(e.value)
        finally:
            os.unlink(path)


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
@FUZZ
@given(payload=st.binary(max_size=300))
def test_prompt_embeddings(suffix, payload):
    path = _file(suffix, payload)
    try:
        e = text.load_embedding(path, text_len=8, text_dim=4)
    except ValueError as err:
        assert path in str(err)
        return
    finally:
        os.unlink(path)
    assert e.dtype == np.float32 and e.shape[1] == 4


@pytest.mark.parametrize("read", [lambda p: media.read_image(p, 32),
                                  lambda p: media.read_video(p, 32)])
def test_a_gif_declaring_a_huge_canvas_is_a_media_error(read, tmp_path):
    """Found by the fuzzer: PIL's decompression-bomb guard escaped read_video."""
    data = bytearray(VALID[".gif"])
    data[6:10] = b"\xff\xff\xff\xff"  # logical screen 65535 x 65535
    path = str(tmp_path / "bomb.gif")
    with open(path, "wb") as f:
        f.write(bytes(data))
    with pytest.raises(media.MediaError, match="bomb.gif"):
        read(path)
