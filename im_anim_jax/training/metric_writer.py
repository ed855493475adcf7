"""Metric writing: TensorBoard event files via tensorboardX plus a JSON-lines file.

Why tensorboardX and not clu.metric_writers: clu's writers import TensorFlow (a ~600 MB
dependency used for nothing else); tensorboardX writes the same TensorBoard event format from
pure Python. The JSON-lines copy (`metrics.jsonl`) is for scripts and tests.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
from tensorboardX import SummaryWriter


class MetricWriter:
    def __init__(self, logdir: str):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            os.makedirs(logdir, exist_ok=True)
            self._tb = SummaryWriter(logdir)
            self._jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a")

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
