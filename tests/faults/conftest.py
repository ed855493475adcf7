"""The uninterrupted reference run the preemption and disk-full tests compare against."""
import pytest

import faultrun


@pytest.fixture(scope="session")
def reference(tmp_path_factory, tiny_dataset):
    """Workdir of an uninterrupted faultrun.STEPS-step stage-1 run."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    res = faultrun.run(faultrun.train_cmd(workdir, tiny_dataset, faultrun.STEPS))
    assert res.returncode == 0, res.stdout + res.stderr
    return workdir
