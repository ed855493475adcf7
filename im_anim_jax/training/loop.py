"""The training loop shared by all stages: resume, step, log, checkpoint, stop on SIGTERM.

Per stage directory: Orbax checkpoints (`<step>/{state,data,meta}`), TensorBoard events and
`metrics.jsonl`, and `data_log.txt` ("step fingerprint" per step: which clips each step saw).
"""
from __future__ import annotations

import os
import re
import signal
import time
from typing import Callable

import jax
import numpy as np

from data_pipelines import pipeline
from im_anim_jax import sharding
from im_anim_jax.training import checkpointing
from im_anim_jax.training.checkpointing import Checkpointer
from im_anim_jax.training.metric_writer import MetricWriter

EXIT_PREEMPTED = 3   # SIGTERM/SIGINT: the current step finished and was checkpointed
EXIT_DIVERGED = 4    # faults.max_nonfinite_in_a_row non-finite steps in a row; no new checkpoint
EXIT_CHECKPOINT_FAILED = 5  # a checkpoint could not be written (e.g. disk full); older ones intact


class Preempted(SystemExit):
    """Raised after a checkpoint was written in response to SIGTERM/SIGINT."""

    def __init__(self, step: int):
        super().__init__(EXIT_PREEMPTED)
        self.step = step


class Diverged(SystemExit):
    """Raised when too many steps in a row had a non-finite loss or gradient."""

    def __init__(self, step: int, message: str):
        super().__init__(EXIT_DIVERGED)
        self.step, self.message = step, message


class CheckpointFailed(SystemExit):
    """Raised when writing a checkpoint failed; the complete older checkpoints stay."""

    def __init__(self, step: int, message: str):
        super().__init__(EXIT_CHECKPOINT_FAILED)
        self.step, self.message = step, message


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def console(name: str, step: int, total: int, scalars: dict, steps_per_s: float,
            keys=None) -> str:
    keys = list(scalars) if keys is None else [k for k in keys if k in scalars]
    shown = " ".join(f"{k} {scalars[k]:.4g}" for k in keys)
    eta = (total - step) / steps_per_s if steps_per_s > 0 else float("nan")
    return (f"[{name}] step {step}/{total} {shown} | {steps_per_s:.2f} steps/s | "
            f"ETA {_fmt_duration(eta)}")


def _short(text: str, head: int = 160, tail: int = 240) -> str:
    """One line; a long text keeps its start and its end (where the cause usually is)."""
    text = " ".join(text.split())
    return text if len(text) <= head + tail else f"{text[:head]} ... {text[-tail:]}"


def _os_cause(e: Exception) -> str:
    """'File too large (errno 27): ' for an OSError or a TensorStore error carrying an
    os_error_code, whose text may be too long to keep whole; '' otherwise."""
    code = getattr(e, "errno", None)
    if code is None:
        found = re.search(r"os_error_code='?(\d+)", str(e))
        code = int(found.group(1)) if found else None
    return f"{os.strerror(code)} (errno {code}): " if code else ""


def _means(host: list[dict]) -> dict:
    """Per-key means over the steps the guard applied (a skipped step's loss is NaN); the guard's
    counters as of the last step."""
    applied = [m for m in host if not m.get("nonfinite_in_a_row", 0)]
    out = {k: float(np.mean([m[k] for m in applied])) if applied else float("nan")
           for k in host[0] if k not in GUARD_KEYS}
    out.update({k: float(host[-1][k]) for k in GUARD_KEYS if k in host[-1]})
    return out


GUARD_KEYS = ("nonfinite_in_a_row", "nonfinite_total")


def run(*, name: str, stage_dir: str, state, abstract_state, train_step: Callable,
        data_iter, mesh, total_steps: int, log_every: int, checkpoint_every: int, ckpt_cfg,
        meta: dict, max_nonfinite_in_a_row: int, console_keys=None,
        log: Callable[[str], None] = print):
    """Runs `train_step(state, batch) -> (state, metrics)` until `total_steps`, resuming from the
    newest checkpoint in `stage_dir` (state and data iterator). Returns (state, last metrics).

    Stops with Preempted (after a checkpoint) on SIGTERM/SIGINT, Diverged after
    `max_nonfinite_in_a_row` steps the optimizer guard skipped, CheckpointFailed when a
    checkpoint cannot be written. A batch's `bad_records` field (the pipeline's count of skipped
    records) is reported as a metric."""
    ckpt = Checkpointer(stage_dir, max_to_keep=ckpt_cfg.max_to_keep,
                        async_save=ckpt_cfg.async_save)
    start = ckpt.latest_step() or 0
    if start:
        what = f"the checkpoint of step {start} in {stage_dir}"
        hint = (f". Resume it with the config that wrote it, or move {stage_dir} away (and the "
                f"stages trained on it) to train this config from scratch")
        try:
            checkpointing.check_architecture(ckpt, start, meta["param_shapes"], what, hint)
            checkpointing.check_trained(ckpt, start, meta.get("trained_groups"), what, hint)
        except ValueError:
            ckpt.close()
            raise
        state = ckpt.restore(start, abstract_state, data_iter)
        log(f"[{name}] resuming from the checkpoint at step {start} in {stage_dir}")
    if start >= total_steps:
        log(f"[{name}] already complete ({start}/{total_steps} steps)")
        ckpt.close()
        return state, {}
    writer = MetricWriter(stage_dir)
    stop = {"signal": None}
    previous = {s: signal.signal(s, lambda sig, _: stop.update(signal=sig))
                for s in (signal.SIGTERM, signal.SIGINT)}
    # XLA:CPU runs queued asynchronous steps ~4x slower on 2 cores (measured 2.7-3.4 s vs
    # 0.75 s per demo step), so on CPU each step is awaited; accelerators keep async dispatch
    # and read the guard's streak one step late.
    sync_each_step = jax.default_backend() == "cpu"
    pending, last, watched, bad_records = [], {}, None, 0
    intact = lambda: checkpointing.latest_step(stage_dir) or "none"  # noqa: E731

    def checkpointed(step: int, action: Callable) -> None:
        try:
            action()
        except Exception as e:  # noqa: BLE001  Orbax/TensorStore raise several types
            message = (f"[{name}] writing a checkpoint in {stage_dir} failed (noticed when "
                       f"saving step {step}; a save runs in the background until the next one): "
                       f"{_os_cause(e)}{type(e).__name__}: {_short(str(e))}; the checkpoint of "
                       f"step {intact()} is intact: free space and rerun to resume from it")
            log(message)
            raise CheckpointFailed(step, message) from None

    t0, s0 = time.perf_counter(), start
    try:
        with open(os.path.join(stage_dir, "data_log.txt"), "a") as data_log:
            for step in range(start + 1, total_steps + 1):
                batch = next(data_iter)
                if "bad_records" in batch:
                    count = int(np.max(batch.pop("bad_records")))
                    if count > bad_records:
                        log(f"[{name}] step {step}: {count} bad training records skipped so far "
                            f"(their indices are in the warnings above)")
                    bad_records = count
                data_log.write(f"{step} {pipeline.fingerprint(batch)}\n")
                state, metrics = train_step(state, sharding.global_batch(batch, mesh))
                if sync_each_step:
                    jax.block_until_ready(state)
                pending.append(metrics)
                stopping = stop["signal"] is not None
                saving = step % checkpoint_every == 0 or step == total_steps or stopping
                # Read one step late on accelerators, but this step's streak before a checkpoint.
                probe, watched = ((metrics, None) if sync_each_step or saving
                                  else (watched, metrics))
                if probe is not None and "nonfinite_in_a_row" in probe:
                    streak = int(probe["nonfinite_in_a_row"])
                    if streak:
                        log(f"[{name}] non-finite loss or gradients: update skipped ({streak} in "
                            f"a row, {int(probe['nonfinite_total'])} in this stage)")
                    if streak >= max_nonfinite_in_a_row:
                        checkpointed(step, ckpt.wait)  # an earlier save may still be in flight
                        message = (f"[{name}] stopped at step {step}: {streak} steps in a row "
                                   f"had a non-finite loss or gradients (faults.max_nonfinite_in_"
                                   f"a_row={max_nonfinite_in_a_row}); the last checkpoint (step "
                                   f"{intact()}) is intact. Lower the learning rate or check the "
                                   f"data, then rerun to resume from it")
                        log(message)
                        raise Diverged(step, message)
                if step % log_every == 0 or step == total_steps:
                    last = dict(_means(jax.device_get(pending)), bad_records=bad_records)
                    rate = (step - s0) / (time.perf_counter() - t0)
                    writer.write(step, dict(last, steps_per_s=rate))
                    log(console(name, step, total_steps, last, rate, console_keys))
                    data_log.flush()
                    pending, t0, s0 = [], time.perf_counter(), step
                if saving:
                    data_log.flush()  # the log never lags behind a checkpoint
                    checkpointed(step, lambda: ckpt.save(step, state, data_iter, meta))
                if stopping:
                    checkpointed(step, ckpt.wait)
                    log(f"[{name}] stopped by signal {stop['signal']} after saving step {step}")
                    raise Preempted(step)
        checkpointed(total_steps, ckpt.wait)
        if stop["signal"] is not None:  # came after the last step's check: still a stop
            log(f"[{name}] stopped by signal {stop['signal']} after saving step {total_steps}")
            raise Preempted(total_steps)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        writer.close()
        try:
            ckpt.close()
        except Exception:  # noqa: BLE001  only after an error already raised or reported
            pass
    return state, last
