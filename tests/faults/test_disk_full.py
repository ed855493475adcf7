"""A full disk while checkpointing: the file-size limit of the running training process is cut
(RLIMIT_FSIZE: writes past it fail with EFBIG, as on a full disk), so the next checkpoint cannot
be written. The run stops with exit 5 and a clear message; the older checkpoints survive and a
rerun resumes from them, reproducing the uninterrupted run bitwise."""
import resource
import subprocess
import time

import faultrun

STEPS = faultrun.STEPS


def test_a_failed_checkpoint_write_exits_5_and_the_previous_checkpoint_survives(
        tmp_path, tiny_dataset, reference):
    workdir = str(tmp_path / "run")
    proc = subprocess.Popen(faultrun.train_cmd(workdir, tiny_dataset, STEPS),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=faultrun.ROOT)
    while 10 not in faultrun.checkpoint_steps(workdir):  # the step-10 save has finished
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    # Logs stay below 64 KiB here; a checkpoint's parameter file (150 KB) does not.
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 5, out + err
    # Orbax's writer threads log their own tracebacks; the run ends with one clear line.
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: [stage1] writing a checkpoint in ") and last in err, last
    noticed = int(last.split("noticed when saving step ")[1].split(";")[0])
    assert noticed in (20, 30, 40) and "File too large (errno 27): " in last, last
    assert last.endswith("the checkpoint of step 10 is intact: free space and rerun to resume "
                         "from it"), last
    assert faultrun.checkpoint_steps(workdir) == [10]

    done = faultrun.run(faultrun.train_cmd(workdir, tiny_dataset, STEPS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming from the checkpoint at step 10 " in done.stdout
    assert faultrun.losses(workdir) == faultrun.losses(reference)
    faultrun.assert_same_state(faultrun.state_arrays(workdir, STEPS),
                               faultrun.state_arrays(reference, STEPS))


def test_the_os_error_is_named_even_when_the_message_is_cut():
    """TensorStore puts the OS error code in the middle of a long message (the store's JSON spec
    follows), where the one-line report cuts it out; the report names it first."""
    from im_anim_jax.training.loop import _os_cause, _short
    long = ValueError("OUT_OF_RANGE: Error opening \"zarr\" driver: Error writing \"code_usage/"
                      ".zarray\" " + "x" * 300 + " [os_error_code='27'] " + '{"spec": 0} ' * 40)
    assert "os_error_code" not in _short(str(long))
    assert _os_cause(long) == "File too large (errno 27): "
    assert _os_cause(OSError(28, "No space left on device")) == \
        "No space left on device (errno 28): "
    assert _os_cause(RuntimeError("unrelated")) == ""
