"""Metric writing: TensorBoard event files via tensorboardX plus a JSON-lines file.

Why tensorboardX and not clu.metric_writers: clu's writers import TensorFlow (a ~600 MB
dependency used for nothing else); tensorboardX writes the same TensorBoard event format from
pure Python. The JSON-lines copy (`metrics.jsonl`) is for scripts and tests.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import jax
import numpy as np
from tensorboardX import SummaryWriter


class MetricWriter:
    """Writes on process 0 only. The run starts after `resume_step` (0: from scratch), so rows of
    later steps an earlier run logged (an abandoned run's, or one killed before its first
    checkpoint) leave metrics.jsonl and TensorBoard."""

    def __init__(self, logdir: str, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            os.makedirs(logdir, exist_ok=True)
            path = os.path.join(logdir, "metrics.jsonl")
            earlier = os.path.exists(path)
            if earlier:
                drop_rows_after(path, resume_step, lambda row: json.loads(row)["step"])
            self._tb = SummaryWriter(logdir, purge_step=resume_step + 1 if earlier else None)
            self._jsonl = open(path, "a")

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in scalars.items():
            if isinstance(v, str):
                row[k] = v
                continue
            row[k] = float(np.asarray(v))
            self._tb.add_scalar(k, row[k], int(step))
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()


def read_metrics(logdir: str) -> list[dict]:
    """Rows of metrics.jsonl; for a step logged twice (a resumed run) the last row wins."""
    rows: dict[int, dict] = {}
    path = os.path.join(logdir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    rows[row["step"]] = row
    return [rows[s] for s in sorted(rows)]


def drop_rows_after(path: str, step: int, step_of: Callable[[str], int]) -> None:
    """Rewrites the text file `path` (if any) without its rows of steps after `step` and an
    unfinished last row (a kill while writing), atomically (a temporary file, then a rename).
    A row `step_of` cannot parse is kept."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = f.readlines()
    kept = [r for r in rows if r.endswith("\n") and _step(r, step_of) <= step]
    if len(kept) == len(rows):
        return
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def _step(row: str, step_of: Callable[[str], int]) -> int:
    try:
        return int(step_of(row))
    except (ValueError, IndexError, KeyError, TypeError):
        return -1
