"""Which dataset a run uses: `config.data.path` if set, else the synthetic set in the workdir."""
from __future__ import annotations

import os
import time

import jax
from jax.experimental import multihost_utils

from data_pipelines import records


def resolve(config, workdir: str, log=print) -> str:
    """Path of the clip dataset for this run, building the synthetic one on first use."""
    if config.data.path:
        if not records.is_dataset(config.data.path):
            raise FileNotFoundError(
                f"config.data.path={config.data.path!r} is not a clip dataset (no dataset_info.json "
                f"/ index.json there); build one with `python -m data_pipelines.ingest` or leave "
                f"data.path empty to use the synthetic characters")
        return config.data.path
    from data_pipelines import synthetic  # the renderer is only needed for the default data

    path = os.path.join(workdir, "data", "synthetic")
    if jax.process_index() == 0:
        t0 = time.perf_counter()
        existed = records.is_dataset(path)
        synthetic.ensure_dataset(path, workers=config.data.render_workers,
                                 **config.data.synthetic.to_dict())
        if not existed:
            log(f"[data] rendered the synthetic character set into {path} "
                f"in {time.perf_counter() - t0:.1f}s")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("synthetic data ready")
    return path
