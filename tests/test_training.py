"""Stage-1 training: it learns, it resumes exactly after a kill, and bad input fails cleanly."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from im_anim_jax.evaluation import stage1 as stage1_eval
from im_anim_jax.training.metric_writer import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEARN_STEPS = 120  # conftest.tiny_stage1


@pytest.fixture(scope="module")
def trained(tiny_stage1):
    return tiny_stage1


def test_short_training_run_learns(trained):
    _, workdir = trained
    rows = read_metrics(os.path.join(workdir, "stage1"))
    assert [r["step"] for r in rows] == list(range(10, LEARN_STEPS + 1, 10))
    first, last = rows[0], rows[-1]
    assert last["heatmap_loss"] < 0.6 * first["heatmap_loss"], (first, last)
    assert last["train_pck@0.1"] > first["train_pck@0.1"] + 0.15, (first, last)
    assert all(np.isfinite(r["loss"]) for r in rows)


def test_evaluation_writes_report_and_png(trained, tiny_dataset):
    config, workdir = trained
    result = stage1_eval.evaluate(config, workdir, tiny_dataset)
    with open(os.path.join(workdir, "eval", "stage1.json")) as f:
        assert json.load(f) == result
    for key in ("pck@0.05", "pck@0.1", "heatmap_mse", "codebook_usage", "codebook_perplexity"):
        assert np.isfinite(result[key]), key
    assert 0 <= result["pck@0.05"] <= result["pck@0.1"] <= 1
    groups = [result[f"pck@0.1/{g}"] for g in ("body", "face", "feet", "hands")]
    assert all(0 <= g <= 1 for g in groups)
    assert min(groups) <= result["pck@0.1"] <= max(groups)  # the overall figure is their mix
    assert result["pck@0.1"] > 0.2  # far above chance (~0.03) after a short run
    assert result["step"] == LEARN_STEPS and result["split"] == "test"
    assert result["num_identities"] == config.data.synthetic.num_heldout_identities
    assert os.path.getsize(os.path.join(workdir, "eval", "stage1.png")) > 1000


def test_evaluation_refuses_a_checkpoint_of_another_architecture(trained, tiny_dataset):
    config, workdir = trained
    other = config.copy_and_resolve_references()
    other.model.motion_decoder.width = 48
    with pytest.raises(ValueError, match="different architecture"):
        stage1_eval.evaluate(other, workdir, tiny_dataset)


def _train_cmd(workdir, data, steps, extra=()):
    return [sys.executable, os.path.join(ROOT, "train.py"),
            f"--config={os.path.join(ROOT, 'configs', 'im_animation.py')}:tiny",
            f"--workdir={workdir}", "--stages=1", "--noeval", f"--config.data.path={data}",
            f"--config.stage1.steps={steps}", "--config.stage1.log_every=1",
            "--config.stage1.checkpoint_every=20", *extra]


def _log(workdir):
    """{step: fingerprint}; a step written twice (before a kill and after resume) keeps the last."""
    with open(os.path.join(workdir, "stage1", "data_log.txt")) as f:
        pairs = [line.split() for line in f if line.strip()]
    return {int(s): fp for s, fp in pairs}, [int(s) for s, _ in pairs]


def _wait_for_step(workdir, step, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        path = os.path.join(workdir, "stage1", "data_log.txt")
        if os.path.exists(path) and max(_log(workdir)[1], default=0) >= step:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise TimeoutError(f"training did not reach step {step}")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_dataset):
    workdir = str(tmp_path_factory.mktemp("reference"))
    subprocess.run(_train_cmd(workdir, tiny_dataset, 100), check=True, capture_output=True)
    return workdir


def test_resume_after_sigkill_repeats_and_skips_no_batch(tmp_path, tiny_dataset, reference_run):
    ref_fp, _ = _log(reference_run)
    ref_loss = {r["step"]: r["loss"] for r in read_metrics(os.path.join(reference_run, "stage1"))}
    workdir = str(tmp_path)
    proc = subprocess.Popen(_train_cmd(workdir, tiny_dataset, 100), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    _wait_for_step(workdir, 47, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, steps_before = _log(workdir)
    killed_at = max(steps_before)
    assert killed_at < 100, "the run finished before it could be killed"
    done = subprocess.run(_train_cmd(workdir, tiny_dataset, 100), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    resumed_from = int(done.stdout.split("resuming from the checkpoint at step ")[1].split()[0])
    assert resumed_from % 20 == 0 and 20 <= resumed_from <= killed_at
    fp, steps = _log(workdir)
    # The resumed process starts exactly one step after its checkpoint and runs each step once.
    after = steps[len(steps_before):]
    assert after == list(range(resumed_from + 1, 101))
    # Every step saw the same clips as an uninterrupted run, and computed the same loss.
    assert fp == ref_fp
    loss = {r["step"]: r["loss"] for r in read_metrics(os.path.join(workdir, "stage1"))}
    assert loss.keys() == ref_loss.keys()
    np.testing.assert_allclose([loss[s] for s in sorted(loss)],
                               [ref_loss[s] for s in sorted(ref_loss)], rtol=0, atol=0)


def test_sigterm_checkpoints_and_exits_3(tmp_path, tiny_dataset):
    workdir = str(tmp_path)
    proc = subprocess.Popen(_train_cmd(workdir, tiny_dataset, 100000), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _wait_for_step(workdir, 5, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, out
    stopped = int(out.split("after saving step ")[1].split()[0])
    assert os.path.isdir(os.path.join(workdir, "stage1", str(stopped)))


def _run(args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("args, message", [
    (["train.py", "--config=configs/nope.py", "--workdir={tmp}"], "configs/nope.py"),
    (["train.py", "--config=configs/demo.py", "--workdir={tmp}", "--config.stage1.lr=abc"],
     "could not convert"),
    (["train.py", "--config=configs/demo.py", "--workdir={tmp}", "--stages=1,7"], "unknown stage"),
    (["train.py", "--config=configs/demo.py", "--workdir={tmp}",
      "--config.data.path={tmp}/nothing"], "is not a clip dataset"),
    (["evaluate.py", "--config=configs/demo.py", "--workdir={tmp}/missing"], "does not exist"),
    (["evaluate.py", "--config=configs/demo.py", "--workdir={tmp}", "--stage=1",
      "--config.data.path={data}"], "no stage-1 checkpoint"),
    (["evaluate.py", "--config=configs/demo.py", "--workdir={tmp}", "--stage=2",
      "--config.data.path={data}"], "no VAE checkpoint"),
    (["evaluate.py", "--config=configs/demo.py", "--workdir={tmp}", "--stage=3",
      "--config.data.path={data}"], "no VAE checkpoint"),
    (["evaluate.py", "--config=configs/demo.py", "--workdir={tmp}", "--stage=4"],
     "the stages are"),
])
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, tiny_dataset, args, message):
    res = _run([a.format(tmp=tmp_path, data=tiny_dataset) for a in args])
    assert res.returncode == 2, res.stdout + res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: ")
