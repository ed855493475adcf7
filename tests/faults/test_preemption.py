"""Preemption: SIGKILL and SIGTERM at random steps of a real training subprocess, then resume.

The resumed run must reproduce the uninterrupted one bitwise on CPU: the same clips per step,
the same per-step losses, the same final train state (params, optimizer state, counters). The
kill steps are drawn at random on every run (printed on failure)."""
import os
import random
import shutil
import signal
import subprocess

import faultrun

STEPS = faultrun.STEPS


def _assert_same_as_reference(workdir, reference, note):
    fp, _ = faultrun.step_log(workdir)
    ref_fp, _ = faultrun.step_log(reference)
    assert fp == ref_fp, note
    assert faultrun.losses(workdir) == faultrun.losses(reference), note  # exact floats
    faultrun.assert_same_state(faultrun.state_arrays(workdir, STEPS),
                               faultrun.state_arrays(reference, STEPS))


def _interrupted(workdir, data, sig, at):
    proc = subprocess.Popen(faultrun.train_cmd(workdir, data, STEPS), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=faultrun.ROOT)
    faultrun.wait_for_step(workdir, at, proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


def test_sigkill_at_a_random_step_resumes_bitwise(tmp_path, tiny_dataset, reference):
    at = random.randint(3, STEPS - 8)
    note = f"SIGKILL after step {at}"
    workdir = str(tmp_path)
    code, _ = _interrupted(workdir, tiny_dataset, signal.SIGKILL, at)
    assert code == -signal.SIGKILL, note
    _, before = faultrun.step_log(workdir)
    killed_at = max(before)
    assert killed_at < STEPS, note
    done = faultrun.run(faultrun.train_cmd(workdir, tiny_dataset, STEPS))
    assert done.returncode == 0, done.stdout + done.stderr
    resumed = (int(done.stdout.split("resuming from the checkpoint at step ")[1].split()[0])
               if "resuming from" in done.stdout else 0)
    # Only complete checkpoints count: the newest one at or before the kill (or none).
    assert resumed % 10 == 0 and resumed <= killed_at, note
    # The resume dropped the killed run's rows after its checkpoint: one row per step, in order.
    _, steps = faultrun.step_log(workdir)
    assert steps == list(range(1, STEPS + 1)), note
    _assert_same_as_reference(workdir, reference, note)


def test_sigterm_at_a_random_step_checkpoints_exits_3_and_resumes_bitwise_past_a_partial_one(
        tmp_path, tiny_dataset, reference):
    at = random.randint(3, STEPS - 8)
    note = f"SIGTERM after step {at}"
    workdir = str(tmp_path)
    code, out = _interrupted(workdir, tiny_dataset, signal.SIGTERM, at)
    assert code == 3, note + out
    stopped = int(out.split("after saving step ")[1].split()[0])
    assert at <= stopped < STEPS and stopped in faultrun.checkpoint_steps(workdir), note
    # What a kill while writing the next checkpoint leaves: a directory Orbax never finalised.
    partial = os.path.join(workdir, "stage1", f"{stopped + 1}.orbax-checkpoint-tmp-1234")
    os.makedirs(os.path.join(partial, "state"))
    with open(os.path.join(partial, "state", "_METADATA"), "w") as f:
        f.write('{"truncated')
    done = faultrun.run(faultrun.train_cmd(workdir, tiny_dataset, STEPS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resuming from the checkpoint at step {stopped} " in done.stdout, note
    _assert_same_as_reference(workdir, reference, note)


def test_resuming_under_another_architecture_exits_2_naming_the_params_and_writes_nothing(
        tmp_path, tiny_dataset, reference, tree_digest):
    """A config whose model differs from the checkpoint's (here: 128 codes, not 64) is refused
    before any restore: one message naming the differing params, exit 2, the directory intact
    (before, Orbax's tree-mismatch dump of both trees)."""
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    before = tree_digest(workdir)
    res = faultrun.run(faultrun.train_cmd(workdir, tiny_dataset, STEPS + 10,
                                          "--config.model.quantizer.codebook_size=128"))
    assert res.returncode == 2, res.stdout + res.stderr
    error = res.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: the checkpoint of step {STEPS} in ") and (
        "has a different architecture than the config" in error), error
    assert "checkpoint [64, " in error and "vs config [128, " in error, error
    assert "move " in error and len(error) < 1000, error
    assert tree_digest(workdir) == before
