"""The training loop shared by all stages: resume, step, log, checkpoint, stop on SIGTERM.

Per stage directory: Orbax checkpoints (`<step>/{state,data,meta}`), TensorBoard events and
`metrics.jsonl`, and `data_log.txt` ("step fingerprint" per step: which clips each step saw).
A resume refuses a checkpoint written under another config (checkpointing.check_config), sets
aside one that cannot be read (`<step>.unreadable-<unix time>`) for the one before it, and drops
the logged rows of the steps after it (the abandoned run's).
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
from im_anim_jax.training.metric_writer import MetricWriter, drop_rows_after

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


class _Unreadable(Exception):
    """A checkpoint's meta or state could not be read (its cause, one line)."""


def _read(action: Callable):
    """action(), or _Unreadable naming the innermost cause of its error."""
    try:
        return action()
    except Exception as e:  # noqa: BLE001  Orbax/TensorStore raise several types
        while e.__cause__ is not None:
            e = e.__cause__
        raise _Unreadable(f"{_os_cause(e)}{type(e).__name__}: {_short(str(e), 100, 140)}") \
            from None


def _resume(ckpt: Checkpointer, name: str, state, abstract_state, data_iter, meta: dict,
            allow_config_change: bool, total_steps: int, log: Callable[[str], None]):
    """(step, state, meta to save) from the newest checkpoint that restores after passing the
    checks against `meta` (architecture, trained groups, config); (0, state, meta) where there is
    none. Newer ones that could not be read are then set aside; ValueError if none could be. A
    checkpoint at or past `total_steps` trains no further, so its config changes are only logged
    (a later stage may use it under another seed or settings)."""
    failed = {}
    for step in reversed(ckpt.all_steps()):
        try:
            have = _read(lambda: ckpt.meta(step))
            changes = _check(have, meta, step, ckpt.directory, allow_config_change,
                             complete=step >= total_steps)
            state = _read(lambda: ckpt.restore(step, abstract_state, data_iter))
        except _Unreadable as e:
            log(f"[{name}] warning: the checkpoint of step {step} in {ckpt.directory} could not "
                f"be read: {e}")
            failed[step] = str(e)
            continue
        for old in ckpt.set_aside(sorted(failed)):
            log(f"[{name}] set the unreadable checkpoint aside as {old}")
        log(f"[{name}] resuming from the checkpoint at step {step} in {ckpt.directory}")
        for key, (before, after, why) in changes.items():
            log(f"[{name}] config changed since step {step}: {key}: {before} -> {after} ({why})")
        history = have.get("config_changes", []) + (
            [{"step": step, "changes": {k: v[:2] for k, v in changes.items()}}] if changes else [])
        return step, state, (dict(meta, config_changes=history) if history else meta)
    if failed:
        newest = max(failed)
        raise ValueError(f"none of the {len(failed)} checkpoints in {ckpt.directory} could be "
                         f"read (the warnings above give each cause; step {newest}: "
                         f"{failed[newest]}): move {ckpt.directory} away (and the stages "
                         f"trained on it) to train from scratch")
    return 0, state, meta


def _check(have: dict, meta: dict, step: int, stage_dir: str, allow_config_change: bool,
           complete: bool) -> dict:
    """checkpointing.check_config's changes, after checking architecture and trained groups;
    every change is accepted where the checkpoint is `complete` (nothing trains on from it)."""
    what = f"the checkpoint of step {step} in {stage_dir}"
    move = f"move {stage_dir} away (and the stages trained on it) to train this config from scratch"
    hint = f". Resume it with the config that wrote it, or {move}"
    checkpointing.check_architecture(have, meta["param_shapes"], what, hint)
    checkpointing.check_trained(have, meta.get("trained_groups"), what, hint)
    return checkpointing.check_config(
        have, meta, what, f". Resume it with the config that wrote it, {move}, or set --config."
        f"checkpoint.allow_config_change=True to continue it under this config (the changes are "
        f"logged and recorded in its meta)", allow_config_change or complete,
        f"complete at step {step}: nothing trains under this config" if complete else None)


def unfinished(stage_dir: str, phases: list, total_steps: int) -> list:
    """The training phases (tuples whose first item is the phase's last step) a run in
    `stage_dir` still has to run: a phase before the last is done once the newest checkpoint
    reaches its end; the last always runs (a finished stage is restored and reported)."""
    done = checkpointing.latest_step(stage_dir) or 0
    return [p for p in phases if p[0] >= total_steps or done < p[0]]


class _BeforePhase(Exception):
    """run() resumed from a step before its phase's first: the checkpoint that ended the phase
    before could not be read and was set aside."""


def run_phases(stage_dir: str, phases: list, total_steps: int, run_phase: Callable):
    """run_phase(phase, first_step) for each phase `unfinished` leaves, where run_phase calls
    run(..., first_step=first_step) (first_step: the previous phase's last step, 0 for the
    first); returns the last call's result. A resume that lands before its phase (the newest
    checkpoint was unreadable) works the phases out again, so that each step trains in its own
    phase."""
    firsts = dict(zip(phases, [0] + [p[0] for p in phases[:-1]]))
    while True:
        result = None
        try:
            for phase in unfinished(stage_dir, phases, total_steps):
                result = run_phase(phase, firsts[phase])
            return result
        except _BeforePhase:
            continue


def run(*, name: str, stage_dir: str, state, abstract_state, train_step: Callable,
        data_iter, mesh, total_steps: int, log_every: int, checkpoint_every: int, ckpt_cfg,
        meta: dict, max_nonfinite_in_a_row: int, console_keys=None,
        log: Callable[[str], None] = print, first_step: int = 0):
    """Runs `train_step(state, batch) -> (state, metrics)` until `total_steps`, resuming from the
    newest checkpoint in `stage_dir` (state and data iterator). Returns (state, last metrics).

    Stops with Preempted (after a checkpoint) on SIGTERM/SIGINT, Diverged after
    `max_nonfinite_in_a_row` steps the optimizer guard skipped, CheckpointFailed when a
    checkpoint cannot be written. A batch's `bad_records` field (the pipeline's count of skipped
    records) is reported as a metric. A checkpoint of another config (checkpointing.check_config)
    is a ValueError unless `ckpt_cfg.allow_config_change`. A run that is one phase of a stage
    (run_phases) starts after `first_step`; resuming from before it raises _BeforePhase."""
    ckpt = Checkpointer(stage_dir, max_to_keep=ckpt_cfg.max_to_keep,
                        async_save=ckpt_cfg.async_save)
    try:
        start, state, meta = _resume(ckpt, name, state, abstract_state, data_iter, meta,
                                     ckpt_cfg.get("allow_config_change", False), total_steps,
                                     log)
        if start < first_step:
            log(f"[{name}] the checkpoint at step {start} is before this phase (steps "
                f"{first_step + 1}-{total_steps}): training the phase before it again")
            raise _BeforePhase(start)
    except Exception:
        ckpt.close()
        raise
    primary = jax.process_index() == 0  # writes the logs (Orbax coordinates the checkpoints)
    if primary:  # also from scratch: a run killed before its first checkpoint logged steps
        drop_rows_after(os.path.join(stage_dir, "data_log.txt"), start,
                        lambda row: int(row.split()[0]))
    if start >= total_steps:
        log(f"[{name}] already complete ({start}/{total_steps} steps)")
        ckpt.close()
        return state, {}
    writer = MetricWriter(stage_dir, resume_step=start)
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

    def write_log(step: int) -> dict:
        """One metrics row (and console line): the means over the steps since the last one."""
        row = dict(_means(jax.device_get(pending)), bad_records=bad_records)
        rate = (step - s0) / (time.perf_counter() - t0)
        writer.write(step, dict(row, steps_per_s=rate))
        log(console(name, step, total_steps, row, rate, console_keys))
        return row

    try:
        with open(os.path.join(stage_dir, "data_log.txt") if primary else os.devnull,
                  "a") as data_log:
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
                # Read one step late on accelerators; before a checkpoint, the step still
                # unread and this one.
                probes, watched = (([watched, metrics], None) if sync_each_step or saving
                                   else ([watched], metrics))
                for probe in probes:
                    if probe is None or "nonfinite_in_a_row" not in probe:
                        continue
                    streak = int(probe["nonfinite_in_a_row"])
                    if streak:
                        log(f"[{name}] non-finite loss or gradients: update skipped ({streak} in "
                            f"a row, {int(probe['nonfinite_total'])} in this stage)")
                    if streak >= max_nonfinite_in_a_row:
                        checkpointed(step, ckpt.wait)  # an earlier save may still be in flight
                        message = (f"[{name}] stopped at step {step}: {streak} steps in a row "
                                   f"had a non-finite loss or gradients (faults.max_nonfinite_"
                                   f"in_a_row={max_nonfinite_in_a_row}); the last checkpoint "
                                   f"(step {intact()}) is intact. Lower the learning rate or "
                                   f"check the data, then rerun to resume from it")
                        log(message)
                        raise Diverged(step, message)
                # A save writes the steps since the last row too: a resume drops the rows
                # after its checkpoint, so with checkpoint_every not a multiple of log_every
                # those steps were in no row.
                if step % log_every == 0 or step == total_steps or saving:
                    last = write_log(step)
                    data_log.flush()
                    pending, t0, s0 = [], time.perf_counter(), step
                if saving:
                    data_log.flush()  # the log never lags behind a checkpoint
                    checkpointed(step, lambda: ckpt.save(step, state, data_iter, meta))
                    stopping = stop["signal"] is not None  # also a signal during the save
                if stopping:
                    if pending:  # the steps since the last row: a partial window, not lost
                        last = write_log(step)
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
