"""Shared fixtures. Grain worker processes need absl flags parsed."""
import hashlib
import os
import sys

# Tiny test programs spend far longer in XLA's CPU backend optimisation than in running
# (e.g. 7.6 s -> 2.1 s to compile a 2-layer init); tests measure correctness, not speed.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
# One persistent XLA compilation cache per test session, shared by the xdist workers and the
# train.py subprocesses the tests start (they inherit the environment): many tests compile the
# same tiny programs (a fault test's run and its resume, the tiny stage-1 run of each worker).
# Measured on tests/faults + tests/test_training.py (-n 0, 2 cores): 6 min 05 s -> 4 min 31 s.
# pytest loads this file in the xdist controller first, so the workers see the directory it makes.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile
    _cache = tempfile.mkdtemp(prefix="im_anim_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "configs")]  # configs, and benchmarks' tools


# pytest-xdist (pytest.ini: `-n 2 --dist loadgroup --no-loadscope-reorder`): every file runs
# whole on one worker (its module fixtures are built once), the files that use the trained
# tiny_stage3 run form one group (it is trained once), and the longest groups start first so the
# two workers end together. tryfirst: the marks must exist before xdist's own hook reads them.
LONGEST_FIRST = ("tiny_stage3", "test_sharding_equivalence.py", "test_stage2.py", "faults")
# Files whose tests share no fixture (each runs its own subprocess): one group per test.
SPLIT = ("test_sharding_equivalence.py",)
_ORDER = pytest.StashKey[int]()
# Two test processes on a GPU host must not each reserve 75% of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    groups = {}
    for item in items:
        groups.setdefault(item.path, set()).update(item.fixturenames)
    for item in items:
        name = ("tiny_stage3" if "tiny_stage3" in groups[item.path] else
                f"{item.path.parent.name}/{item.path.name}")
        if item.path.name in SPLIT:
            name = f"{name}::{item.name}"
        item.add_marker(pytest.mark.xdist_group(name))
        item.stash[_ORDER] = next((i for i, k in enumerate(LONGEST_FIRST) if k in name),
                                  len(LONGEST_FIRST))
    items.sort(key=lambda item: item.stash[_ORDER])  # stable: file order otherwise kept


def _tree_digest(directory):
    """{relative path: sha1} of every file under `directory`."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha1(f.read()).hexdigest()
    return out


@pytest.fixture(scope="session")
def tree_digest():
    """The function directory -> {relative path: sha1} (to check that nothing was written)."""
    return _tree_digest


@pytest.fixture(scope="session")
def tiny_config():
    """The `tiny` variant of configs/im_animation.py (a fresh copy per call of .copy_and_resolve)."""
    import im_animation
    return im_animation.get_config("tiny")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, tiny_config):
    """The tiny synthetic character set, rendered once per test session."""
    from data_pipelines import synthetic
    path = str(tmp_path_factory.mktemp("data") / "synthetic")
    synthetic.ensure_dataset(path, **tiny_config.data.synthetic.to_dict())
    return path


@pytest.fixture(scope="session")
def tiny_stage1(tmp_path_factory, tiny_config, tiny_dataset):
    """(config, workdir) of a short stage-1 run on the tiny set (fixed seeds, 600 steps at a
    peak rate of 3e-3, metrics every 50): the learning test of stage 1 and the starting point of
    stage 2's tests. 120 steps at 1e-3 drew one pose for every frame (test_training). Read-only
    for its users (copy the workdir to train further)."""
    from im_anim_jax.training import stage1
    config = tiny_config.copy_and_resolve_references()
    config.stage1.update(dict(steps=600, lr=3e-3, log_every=50, checkpoint_every=600))
    workdir = str(tmp_path_factory.mktemp("stage1"))
    stage1.train(config, workdir, tiny_dataset, log=lambda _: None)
    return config, workdir


@pytest.fixture(scope="session")
def tiny_stage2(tmp_path_factory, tiny_stage1, tiny_dataset):
    """(config, workdir) with stage 1 (copied), a 30-step VAE and a 20-step main stage-2 model
    (no baselines): the starting point of stage 3's tests. Read-only for its users."""
    import shutil

    from im_anim_jax.training import stage2
    base, stage1_dir = tiny_stage1
    workdir = str(tmp_path_factory.mktemp("stage2_for_3"))
    shutil.copytree(os.path.join(stage1_dir, "stage1"), os.path.join(workdir, "stage1"))
    config = base.copy_and_resolve_references()
    # Single frames only (image_steps = steps): these runs need the reference encoder; the
    # clip phase is tested in test_vae_training.
    config.vae_training.update(dict(steps=30, image_steps=30, lr=3e-3, batch_size=4,
                                    log_every=10, checkpoint_every=30))
    config.stage2.update(dict(steps=20, log_every=10, checkpoint_every=20, batch_size=4,
                              lr=2e-3, baselines=()))
    stage2.train(config, workdir, tiny_dataset, log=lambda _: None)
    return config, workdir


TINY_STAGE3_STEPS = 40


@pytest.fixture(scope="session")
def tiny_stage3(tmp_path_factory, tiny_stage2, tiny_dataset):
    """(config, workdir): the tiny stage-2 run copied, then TINY_STAGE3_STEPS stage-3 steps
    (EMA 0.9, metrics every 10, checkpoints at 20 and 40). Read-only for its users (copy the
    workdir to write into it)."""
    import shutil

    from im_anim_jax.training import stage3
    base, stage2_dir = tiny_stage2
    workdir = str(tmp_path_factory.mktemp("stage3"))
    for d in ("stage1", "vae", "stage2"):
        shutil.copytree(os.path.join(stage2_dir, d), os.path.join(workdir, d))
    config = base.copy_and_resolve_references()
    config.stage3.update(dict(steps=TINY_STAGE3_STEPS, log_every=10,
                              checkpoint_every=TINY_STAGE3_STEPS // 2, batch_size=2,
                              ema_decay=0.9))
    stage3.train(config, workdir, tiny_dataset, log=lambda _: None)
    return config, workdir


@pytest.fixture(scope="module")
def tiny_stage3_copy(tmp_path_factory, tiny_stage3):
    """(config, workdir): a private copy of tiny_stage3 per test module, free to write into."""
    import shutil
    config, source = tiny_stage3
    workdir = str(tmp_path_factory.mktemp("stage3_copy") / "run")
    shutil.copytree(source, workdir)
    return config, workdir

