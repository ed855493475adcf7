"""Stage-1 training runs in subprocesses on the tiny config, and what they leave behind."""
import os
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp

from im_anim_jax.training.metric_writer import read_metrics  # noqa: F401  (re-exported)

STEPS = 40  # of the uninterrupted reference run (conftest.reference) and its interrupted twins
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def train_cmd(workdir, data, steps, *extra):
    """Stage 1 of the tiny config: metrics every step, a checkpoint every 10."""
    return [sys.executable, os.path.join(ROOT, "train.py"),
            f"--config={os.path.join(ROOT, 'configs', 'im_animation.py')}:tiny",
            f"--workdir={workdir}", "--stages=1", "--noeval", f"--config.data.path={data}",
            f"--config.stage1.steps={steps}", "--config.stage1.log_every=1",
            "--config.stage1.checkpoint_every=10", *extra]


def run(cmd, **kwargs):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, **kwargs)


def step_log(workdir):
    """({step: fingerprint}, [steps in order]); a step written twice keeps the last."""
    path = os.path.join(workdir, "stage1", "data_log.txt")
    if not os.path.exists(path):
        return {}, []
    with open(path) as f:
        pairs = [line.split() for line in f if line.strip()]
    return {int(s): fp for s, fp in pairs}, [int(s) for s, _ in pairs]


def wait_for_step(workdir, step, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if max(step_log(workdir)[1], default=0) >= step:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise TimeoutError(f"training did not reach step {step}")


def losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(workdir, "stage1"))}


def checkpoint_steps(workdir):
    d = os.path.join(workdir, "stage1")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def state_arrays(workdir, step):
    """{path: array} of the whole saved train state (params, optimizer state, counters)."""
    tree = ocp.StandardCheckpointer().restore(os.path.join(workdir, "stage1", str(step), "state"))
    flat = ocp.tree.to_flat_dict(tree)
    return {"/".join(map(str, k)): np.asarray(v) for k, v in flat.items()}


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
