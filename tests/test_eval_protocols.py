"""Stage-3 evaluation protocols: the metric suite against direct computations (stub networks),
then with the real converted networks (random weights); "not computed" figures without weights;
table.md, the history and its plot; the self protocol on a folder of videos with a tiny trained
run; bad --videos input (one error line, exit 2)."""
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from im_anim_jax import media, metrics
from im_anim_jax.evaluation import metric_suite, stage3_self, summary, video_folder
from im_anim_jax.metrics import frechet, i3d, image, inception, lpips

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_COMPUTED = "not computed: "


def clips(seed, shape=(2, 17, 20, 20, 3)):
    """Ground-truth videos and a darker, noisy copy, [B, T, H, W, 3] in [0, 1]."""
    rng = np.random.default_rng(seed)
    truth = rng.uniform(size=shape).astype(np.float32)
    return truth, np.clip(0.7 * truth + 0.2 * rng.normal(size=shape), 0, 1).astype(np.float32)


# Stand-ins with the real networks' interfaces (pixels in [0, 1]).
STUBS = {
    "inception": lambda x: np.concatenate([x.mean((1, 2)), x.std((1, 2))], -1),  # [N, 6]
    "i3d": lambda v: np.concatenate([v.mean((1, 2, 3)), np.abs(np.diff(v, axis=1)).mean(
        (1, 2, 3))], -1),  # [B, 6]
    "lpips": lambda a, b: np.abs(a - b).mean((1, 2, 3)),  # [N]
}


def stats(feats):
    return feats.mean(0), np.cov(feats, rowvar=False)


def direct_frechet(a, b):
    return frechet.frechet_distance(*stats(a), *stats(b))


def test_suite_matches_direct_computation_with_stub_networks(tiny_config):
    config = tiny_config.copy_and_resolve_references()
    config.eval.metric_weights.update(dict(inception="w/inc", i3d="w/i3d", lpips="w/lp"))
    config.eval.metric_batch = 5
    calls = []

    def load(kind, path, **options):
        assert path.startswith("w/") and options == ({"rescale": False} if kind == "lpips"
                                                     else {})
        return lambda *x: calls.append((kind, len(x[0]))) or STUBS[kind](*x)

    suite = metric_suite.Suite(config, ("model", "copy"), metric_suite.load_networks(config, load))
    batches = [clips(0), clips(1, (1, 17, 20, 20, 3))]
    for truth, generated in batches:
        suite.add_truth(truth)
        suite.add("model", generated, truth, {0.05: 1.0, 0.1: 3.0}, 4.0)
        suite.add("copy", truth, truth, {0.05: 4.0, 0.1: 4.0}, 4.0)
    got, copy = suite.result("model"), suite.result("copy")

    truth, generated = (np.concatenate(x) for x in zip(*batches))  # [3, 17, ...]
    frames = lambda v: v.reshape(-1, *v.shape[2:])
    for key, fn in (("l1", image.l1), ("psnr_star", image.psnr_star), ("ssim", image.ssim),
                    ("lpips", lambda a, b: STUBS["lpips"](frames(a), frames(b)))):
        np.testing.assert_allclose(got[key], fn(generated, truth).mean(), rtol=1e-6)
    np.testing.assert_allclose(got["fid"], direct_frechet(
        STUBS["inception"](frames(generated)), STUBS["inception"](frames(truth))), rtol=1e-6)
    np.testing.assert_allclose(got["fvd"], direct_frechet(  # the first 16 of 17 frames
        STUBS["i3d"](generated[:, :16]), STUBS["i3d"](truth[:, :16])), rtol=1e-6)
    assert got["fid"] > 0.01 and got["fvd"] > 0.01
    assert got["fid_samples"] == {"generated": 51, "ground_truth": 51}
    assert got["fvd_samples"] == {"generated": 3, "ground_truth": 3}
    assert got["motion_pck@0.05"] == 0.25 and got["motion_pck@0.1"] == 0.75
    assert copy["lpips"] == 0 and copy["l1"] == 0 and copy["motion_pck@0.1"] == 1
    assert abs(copy["fid"]) < 1e-8 and abs(copy["fvd"]) < 1e-8
    # Networks see chunks of eval.metric_batch frames (I3D: at least one clip).
    sizes = {k: [n for kind, n in calls if kind == k] for k in STUBS}
    assert max(sizes["inception"]) == 5 and sum(sizes["inception"]) == 3 * 51
    assert set(sizes["i3d"]) == {1} and sum(sizes["lpips"]) == 2 * 51


def test_absent_weights_and_degenerate_sets_are_not_computed(tiny_config, tmp_path):
    config = tiny_config.copy_and_resolve_references()
    config.eval.metric_weights.update(dict(inception="", i3d=str(tmp_path / "i3d"), lpips=""))
    suite = metric_suite.Suite(config, ("model",), metric_suite.load_networks(config))
    truth, generated = clips(0)
    suite.add_truth(truth)
    suite.add("model", generated, truth, {0.05: 0.0, 0.1: 1.0}, 2.0)
    got = json.loads(json.dumps(suite.result("model")))
    assert got["fid"] == (
        "not computed: FID needs the converted inception weights "
        "(pt_inception-2015-12-05-6726825d.pth), and config.eval.metric_weights.inception is "
        "empty; make them with: python -m im_anim_jax.convert inception "
        "--src pt_inception-2015-12-05-6726825d.pth --dst DIR and pass "
        "--config.eval.metric_weights.inception=DIR")
    assert got["fvd"].startswith(f"not computed: FVD needs the converted i3d weights, and "
                                 f"{tmp_path / 'i3d' / 'meta.json'} is missing")
    assert got["lpips"].startswith("not computed: LPIPS") and "metric_weights.lpips" in got["lpips"]
    assert got["fid_samples"] is None and got["fvd_samples"] is None
    assert math.isfinite(got["psnr_star"]) and got["motion_pck@0.1"] == 0.5

    # Networks present, but clips shorter than eval.fvd_frames, and a single frame per set.
    nets = {kind: STUBS[kind] for kind in STUBS}
    suite = metric_suite.Suite(config, ("model",), nets)
    truth, generated = clips(1, (1, 1, 20, 20, 3))
    suite.add_truth(truth)
    suite.add("model", generated, truth, {0.05: 0.0, 0.1: 0.0}, 0.0)
    got = suite.result("model")
    assert got["fvd"] == ("not computed: FVD needs videos of eval.fvd_frames = 16 frames, these "
                          "have 1")
    assert got["fid"] == ("not computed: FID over {'generated': 1, 'ground_truth': 1}: need at "
                          "least 2 feature vectors, have 1")
    assert math.isfinite(got["lpips"])


def write_random_converted(dst, kind, abstract, model_config, seed):
    """A converted checkpoint laid out as `python -m im_anim_jax.convert` writes it (DIR/params,
    DIR/meta.json), random weights: He-normal kernels, random BatchNorm statistics and affine
    parameters, small biases, non-negative LPIPS heads (as the released ones)."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        names = [str(getattr(k, "key", k)) for k in path]
        if names[-1] == "kernel" and names[0].startswith("lin"):
            return rng.uniform(size=x.shape)
        if names[-1] == "kernel":
            return rng.normal(size=x.shape) * np.sqrt(2 / np.prod(x.shape[:-1]))
        if names[-1] in ("scale", "var"):
            return 0.5 + rng.uniform(size=x.shape)
        return 0.1 * rng.normal(size=x.shape)

    params = jax.tree_util.tree_map_with_path(lambda p, x: leaf(p, x).astype(np.float32), abstract)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(dst, "params"), params)
    with open(os.path.join(dst, "meta.json"), "w") as f:
        json.dump({"kind": kind, "model_config": model_config}, f)
    return str(dst)


# Resize targets inside the networks (in use: 299 and 224; the parity tests check those sizes).
# On XLA:CPU (tests compile at optimisation level 0) I3D takes 0.4 s per call at 16 px, 3 s at
# 32 px; LPIPS-VGG likewise has slow sizes below 64 px.
SMALL = {"inception": {"size": 75}, "i3d": {"size": 16}}
FID_DIMS = 64


def small_load(kind, path, **options):
    """metrics.load_extractor at the SMALL resize targets, with the InceptionV3 features cut to
    the first FID_DIMS: FID's 2048 x 2048 matrix square root alone takes 25-70 s on 2 CPU cores
    (frechet_distance has its own tests)."""
    net = metrics.load_extractor(kind, path, **options, **SMALL.get(kind, {}))
    return (lambda x: net(x)[:, :FID_DIMS]) if kind == "inception" else net


def test_real_networks_with_random_weights(tiny_config, tmp_path):
    """The real InceptionV3, I3D and LPIPS-VGG, converted random weights, on two 16-frame videos
    of 64 px per set, against the same networks called directly."""
    config = tiny_config.copy_and_resolve_references()
    config.eval.metric_weights.update(dict(
        inception=write_random_converted(tmp_path / "inc", "inception",
                                         inception.abstract_params(), None, 0),
        i3d=write_random_converted(tmp_path / "i3d", "i3d", i3d.abstract_params(), None, 1),
        lpips=write_random_converted(tmp_path / "lpips", "lpips", lpips.abstract_params("vgg"),
                                     {"net": "vgg"}, 2)))
    config.eval.metric_batch = 32  # one call per set and network: one compilation each
    nets = metric_suite.load_networks(config, small_load)
    suite = metric_suite.Suite(config, ("model",), nets)
    truth, generated = clips(0, (2, 16, 64, 64, 3))
    suite.add_truth(truth)
    suite.add("model", generated, truth, {0.05: 0.0, 0.1: 0.0}, 0.0)
    got = suite.result("model")

    frames = lambda v: v.reshape(-1, *v.shape[2:])
    features = lambda kind, x: np.asarray(nets[kind](x), np.float64)
    np.testing.assert_allclose(got["lpips"], np.mean(nets["lpips"](frames(generated),
                                                                   frames(truth))), rtol=1e-5)
    np.testing.assert_allclose(got["fid"], direct_frechet(
        features("inception", frames(generated)), features("inception", frames(truth))),
        rtol=1e-4)
    for name, video in (("model", generated), (metric_suite.GROUND_TRUTH, truth)):
        fvd_stats = suite.stats[(name, "fvd")]  # (its 400-d distance: 7 s more per call)
        np.testing.assert_allclose(fvd_stats.mean, features("i3d", video).mean(0), rtol=1e-5)
        np.testing.assert_allclose(fvd_stats.cov, np.cov(features("i3d", video), rowvar=False),
                                   rtol=1e-4, atol=1e-9)
    assert got["lpips"] > 0 and got["fid"] > 0 and got["fvd"] > 0
    assert got["fid_samples"] == {"generated": 32, "ground_truth": 32}
    assert got["fvd_samples"] == {"generated": 2, "ground_truth": 2}


def report(step, psnr, lpips_value, fid, fvd, **extra):
    """A hand-made stage-3 report: model figures; baselines at fixed figures."""
    samples = lambda value, n: None if isinstance(value, str) else {"generated": n,
                                                                    "ground_truth": n}
    figures = lambda p, l, f, v, pck: {
        "psnr_star": p, "ssim": 0.5, "lpips": l, "fid": f, "fvd": v, "motion_pck@0.1": pck,
        "fid_samples": samples(f, 136), "fvd_samples": samples(v, 8)}
    return {**figures(psnr, lpips_value, fid, fvd, 0.472), "step": step, "fvd_frames": 16,
            "pck_reference": "the target identity's ground-truth keypoints", "baselines": {
                "reference_repeated": figures(23.114, lpips_value, 60.0, fvd, 0.474),
                "control_zeroed": figures(15.4, lpips_value, 88.123, fvd, 0.4744)},
            "ceilings": {"vae_reconstruction": figures(21.8, lpips_value, 30.0, fvd, 0.7)},
            **extra}


NO_I3D = "not computed: FVD needs the converted i3d weights, and w/i3d/meta.json is missing"
NO_LPIPS = "not computed: LPIPS needs the converted lpips weights"


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)


def test_table_from_hand_made_reports(tmp_path):
    with pytest.raises(FileNotFoundError, match="no stage-3 report"):
        summary.write_table(str(tmp_path))
    write_json(tmp_path / "stage3.json", report(93, 15.5, 0.31, 70.456, NO_I3D, pairs=8))
    older = report(93, 17.0, NO_LPIPS, NO_LPIPS.replace("LPIPS", "FID"), NO_I3D,
                   inputs=["a.mp4", "b"], inputs_dir="/data/tiktok")
    del older["ceilings"]  # a report from before the ceiling row
    write_json(tmp_path / "stage3_self.json", older)
    with open(summary.write_table(str(tmp_path))) as f:
        text = f.read()
    cross, own = text.split("## Self-reenactment")
    assert cross.startswith("# Stage-3 evaluation\n\n## Cross-reenactment")
    assert ("Checkpoint step 93, 8 pairs; PCK against the target identity's ground-truth "
            "keypoints.") in cross
    assert ("| variant | PSNR* ↑ | SSIM ↑ | LPIPS ↓ | FID ↓ | FVD ↓ | PCK@0.1 ↑ |\n"
            "|---|---|---|---|---|---|---|\n"
            "| this model | 15.50 | 0.500 | 0.310 | 70.46 | n/c [1] | 0.472 |\n"
            "| reference repeated | 23.11 | 0.500 | 0.310 | 60.00 | n/c [1] | 0.474 |\n"
            "| control zeroed | 15.40 | 0.500 | 0.310 | 88.12 | n/c [1] | 0.474 |\n"
            "| VAE reconstruction (ceiling) | 21.80 | 0.500 | 0.310 | 30.00 | n/c [1] | 0.700 |\n"
            ) in cross
    assert ("\n\nFID over 136 generated and 136 ground-truth frames (per variant). Fewer "
            "samples than feature dimensions (FID 2048)") in cross
    assert cross.endswith(f"\n\n[1] {NO_I3D}\n\n")
    assert "FID over" not in own  # the model's FID was not computed
    assert "2 videos of /data/tiktok" in own
    assert "| this model | 17.00 | 0.500 | n/c [1] | n/c [2] | n/c [3] | 0.472 |" in own
    assert own.endswith(f"| 0.474 |\n\n[1] {NO_LPIPS}\n\n[2] {NO_LPIPS.replace('LPIPS', 'FID')}"
                        f"\n\n[3] {NO_I3D}\n")
    os.remove(tmp_path / "stage3.json")  # regenerated from the reports present
    with open(summary.write_table(str(tmp_path))) as f:
        assert "Cross-reenactment" not in f.read()


def test_history_keeps_one_line_per_step_and_protocol_and_is_plotted(tmp_path):
    path = str(tmp_path / summary.HISTORY)
    summary.append_history(path, "cross", report(10, 12.0, 0.4, NO_I3D, NO_I3D, pairs=8))
    summary.append_history(path, "self", report(10, 14.0, 0.4, 90.0, NO_I3D))
    summary.append_history(path, "cross", report(20, 13.0, 0.35, 80.0, NO_I3D, pairs=8))
    rows = summary.append_history(path, "cross", report(10, 12.5, 0.4, 95.0, NO_I3D, pairs=8))
    assert rows == summary.read_history(path)
    assert [(r["protocol"], r["step"]) for r in rows] == [("cross", 10), ("self", 10),
                                                         ("cross", 20)]
    model = rows[0]["variants"]["model"]
    assert model["psnr_star"] == 12.5 and model["fid"] == 95.0 and model["fvd"] is None
    assert set(rows[0]["variants"]) == {"model", "reference_repeated", "control_zeroed",
                                        "vae_reconstruction"}
    png = str(tmp_path / summary.PLOT)
    summary.plot_history(rows, png)
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size == (1040, 560)
    assert sorted(os.listdir(tmp_path)) == [summary.HISTORY, summary.PLOT]  # no temporaries
    with open(path, "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match="line 4 is not JSON"):
        summary.read_history(path)


@pytest.fixture(scope="module")
def stage3_run(tiny_stage3_copy):
    """conftest.tiny_stage3_copy: this module's copy of the tiny stage-3 run."""
    return tiny_stage3_copy


def write_videos(folder, frames: int):
    """An mp4 with more frames than needed, a folder of PNG frames and a file that is no video."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    media.write_video(str(folder / "a.mp4"), rng.integers(0, 255, (frames + 2, 40, 48, 3),
                                                          np.uint8), fps=10)
    (folder / "b").mkdir()
    for i in range(frames):
        Image.fromarray(rng.integers(0, 255, (36, 36, 3), np.uint8)).save(folder / "b" / f"{i}.png")
    (folder / "notes.txt").write_text("not a video")


def test_self_protocol_on_a_folder_of_videos(stage3_run, tmp_path):
    config, workdir = stage3_run
    frames = config.stage3.clip_frames
    write_videos(tmp_path / "videos", frames)
    paths = video_folder.find_videos(str(tmp_path / "videos"), frames)
    assert paths == [str(tmp_path / "videos" / n) for n in ("a.mp4", "b")]  # not notes.txt
    result = stage3_self.evaluate(config, workdir, paths)
    out = os.path.join(workdir, "eval")
    with open(os.path.join(out, "stage3_self.json")) as f:
        assert json.load(f) == json.loads(json.dumps(result))
    assert result["protocol"] == "self" and result["inputs"] == ["a.mp4", "b"]
    assert result["pck_reference"] == stage3_self.PCK_REFERENCE
    assert result["scored_frames_per_video"] == frames - 1 and result["step"] == 40
    assert list(summary.variants(result)) == ["model", "reference_repeated", "control_zeroed",
                                              "vae_reconstruction"]
    for figures in summary.variants(result).values():
        for key in ("l1", "psnr_star", "ssim", "motion_pck@0.05", "motion_pck@0.1"):
            assert math.isfinite(figures[key]), (key, figures)
        for key in ("lpips", "fid", "fvd"):
            assert figures[key].startswith(NOT_COMPUTED), figures[key]
    assert sorted(os.listdir(os.path.join(workdir, result["videos"]))) == ["000_a.mp4",
                                                                          "001_b.mp4"]
    with open(os.path.join(out, summary.TABLE)) as f:
        table = f.read()
    assert "## Self-reenactment" in table and "| this model |" in table
    assert "[1] not computed: LPIPS" in table and "metric_weights.lpips=DIR" in table
    assert ("self", 40) in [(r["protocol"], r["step"]) for r in summary.read_history(
        os.path.join(out, summary.HISTORY))]
    for name in ("stage3_self.png", summary.PLOT):
        assert os.path.getsize(os.path.join(out, name)) > 0


def test_an_older_checkpoint_is_evaluated_on_request(stage3_run, tmp_path):
    """What evaluate.py --all_checkpoints does for each kept checkpoint: step 20 of the run."""
    from im_anim_jax.training import checkpointing, stage3
    config, workdir = stage3_run
    assert checkpointing.all_steps(stage3.stage_dir(workdir)) == [20, 40]
    write_videos(tmp_path / "videos", config.stage3.clip_frames)
    paths = video_folder.find_videos(str(tmp_path / "videos"), config.stage3.clip_frames)
    assert stage3_self.evaluate(config, workdir, paths, step=20)["step"] == 20
    assert ("self", 20) in [(r["protocol"], r["step"]) for r in summary.read_history(
        os.path.join(workdir, "eval", summary.HISTORY))]
    with pytest.raises(FileNotFoundError, match=r"no stage-3 checkpoint of step 30 in .*it holds "
                                                r"steps \[20, 40\]"):
        stage3_self.evaluate(config, workdir, paths, step=30)


def test_all_checkpoints_is_for_stage_3(tmp_path):
    res = subprocess.run([sys.executable, "evaluate.py", "--config=configs/im_animation.py:tiny",
                          f"--workdir={tmp_path}", "--stage=1", "--all_checkpoints"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        "error: --protocol, --videos and --all_checkpoints apply to --stage 3, not --stage 1")


def test_short_video_is_refused_before_the_model_loads(tmp_path):
    (tmp_path / "v").mkdir()
    frames = np.random.default_rng(0).integers(0, 255, (3, 20, 20, 3), np.uint8)
    media.write_video(str(tmp_path / "v" / "short.gif"), frames, fps=10)
    with pytest.raises(media.MediaError, match=r"short.gif has 3 frames; the self protocol needs "
                                               r"config.stage3.clip_frames = 5"):
        video_folder.find_videos(str(tmp_path / "v"), 5)


@pytest.mark.parametrize("case, message", [
    ("no_flag", "--protocol self needs --videos DIR"),
    ("missing", "videos does not exist"),
    ("empty", "holds no videos"),
    ("unreadable", "broken.mp4 could not be decoded as a video"),
])
def test_bad_videos_input_is_one_error_line(tmp_path, case, message):
    folder = tmp_path / "videos"
    if case in ("empty", "unreadable"):
        folder.mkdir()
    if case == "unreadable":
        (folder / "broken.mp4").write_bytes(b"not a video")
    args = [sys.executable, "evaluate.py", "--config=configs/im_animation.py:tiny",
            f"--workdir={tmp_path}", "--stage=3", "--protocol=self"]
    args += [] if case == "no_flag" else [f"--videos={folder}"]
    res = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, res.stderr
    assert not (tmp_path / "eval").exists()
