"""Config checks run before any model is built or compiled: every violation, in one message.

  validate(config, stages, workdir)  # ValueError listing each problem, e.g.
  # "the config has 2 problems:
  #   - stage3.clip_frames=16: the VAE compresses time 4x, so clips need 1 + 4k frames (e.g. 17)
  #   - mesh.shape {...} needs 16 devices, but 8 are available"
"""
from __future__ import annotations

import glob
import math
import os

import jax

from im_anim_jax import sampling, sharding
from im_anim_jax.models.retargeter import TEMPORAL_STRIDE
from im_anim_jax.training import checkpointing

# What each stage trains: (config section, its learning-rate fields).
_SECTIONS = {1: (("stage1", ("lr",)),),
             2: (("vae_training", ("lr",)), ("stage2", ("lr",))),
             3: (("stage3", ("lr_dit", "lr_other")),)}


def _is_int(x, minimum: int) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) \
        and int(x) == x and x >= minimum


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _mesh(config, num_devices: int, num_processes: int, out: list) -> int | None:
    """Problems of mesh.shape / mesh.rules; returns data x fsdp (None if the shape is bad)."""
    for name, axes in config.mesh.rules:
        if name not in sharding.LOGICAL_AXES:
            out.append(f"mesh.rules names the logical axis {name!r}, which nothing carries (a "
                       f"rule it was meant as would be missing: its arrays left unsharded); "
                       f"the logical axes are {sharding.LOGICAL_AXES}")
        named = [axes] if isinstance(axes, str) else list(axes or ())
        unknown = [a for a in named if a not in sharding.MESH_AXES]
        if unknown:
            out.append(f"mesh.rules maps {name!r} to unknown mesh axes {unknown}; the axes are "
                       f"{sharding.MESH_AXES}")
    try:
        sizes = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh.shape, num_devices)))
    except ValueError as e:
        out.append(str(e))
        return None
    problem = sharding.batch_span_problem(sizes["data"] * sizes["fsdp"], num_processes)
    if problem:
        out.append(problem)
    return sizes["data"] * sizes["fsdp"]


def _schedule(config, section: str, lrs: tuple, batch_divisor: int | None, num_processes: int,
              out: list) -> None:
    cfg = config[section]
    for field in ("steps", "log_every", "checkpoint_every", "batch_size"):
        if not _is_int(cfg[field], 1):
            out.append(f"{section}.{field}={cfg[field]!r} must be a positive integer")
    if not _is_int(cfg.warmup_steps, 0):
        out.append(f"{section}.warmup_steps={cfg.warmup_steps!r} must be an integer >= 0")
    elif _is_int(cfg.steps, 1) and cfg.warmup_steps > cfg.steps:
        out.append(f"{section}.warmup_steps={cfg.warmup_steps} exceeds {section}.steps="
                   f"{cfg.steps}: the learning rate would never reach its peak")
    for field in lrs:
        lr = cfg[field]
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and 0 < lr < 1):
            out.append(f"{section}.{field}={lr!r} must be a learning rate in (0, 1)")
    if not (math.isfinite(cfg.grad_clip) and cfg.grad_clip > 0):
        out.append(f"{section}.grad_clip={cfg.grad_clip!r} must be > 0")
    if cfg.schedule not in ("constant", "cosine"):
        out.append(f"{section}.schedule={cfg.schedule!r} must be 'constant' or 'cosine'")
    for field in ("batch_size", "clip_batch_size"):  # clips: the VAE's second phase
        size = cfg.get(field)
        n = math.lcm(batch_divisor or 1, num_processes)
        if batch_divisor and _is_int(size, 1) and size % n:
            out.append(f"{section}.{field}={size} must be divisible by {n} (the data x fsdp "
                       f"mesh size {batch_divisor} and {num_processes} process(es))")


def _frames_and_sizes(config, stages, out: list) -> None:
    from im_anim_jax.models.wan import vae
    m = config.model
    size, patch = m.motion_tokenizer.image_size, m.motion_tokenizer.patch_size
    if not _is_int(size, 1) or not _is_int(patch, 1) or size % patch:
        out.append(f"model.motion_tokenizer.image_size={size} must be a multiple of its "
                   f"patch_size={patch}")
    stem = tuple(m.motion_tokenizer.stem_channels)
    if _is_int(patch, 1) and patch % 2 ** len(stem):
        out.append(f"model.motion_tokenizer.stem_channels={stem} halve the frame {len(stem)} "
                   f"times, so patch_size={patch} must be a multiple of {2 ** len(stem)}")
    hm = m.joint_decoder.heatmap_size
    if (m.motion_tokenizer.patch_heatmap_head and _is_int(size, 1) and _is_int(patch, 1)
            and _is_int(hm, 1) and hm % (size // patch)):
        out.append(f"model.motion_tokenizer.patch_heatmap_head needs "
                   f"model.joint_decoder.heatmap_size={hm} to be a multiple of the "
                   f"{size // patch}x{size // patch} patch grid")
    if config.stage1.patch_heatmap_weight and not m.motion_tokenizer.patch_heatmap_head:
        out.append(f"stage1.patch_heatmap_weight={config.stage1.patch_heatmap_weight} needs "
                   f"model.motion_tokenizer.patch_heatmap_head=True")
    ce_w, ce_t = config.stage1.heatmap_ce_weight, config.stage1.heatmap_ce_temperature
    if not (_is_number(ce_w) and ce_w >= 0):
        out.append(f"stage1.heatmap_ce_weight={ce_w!r} must be a number >= 0 (0: MSE alone)")
    if not (_is_number(ce_t) and ce_t > 0):
        out.append(f"stage1.heatmap_ce_temperature={ce_t!r} must be a number > 0")
    if 2 in stages or 3 in stages:
        try:
            v = vae.build_vae(m.vae)
            space, time = v.space_factor, v.time_factor
        except ValueError as e:
            out.append(f"model.vae: {e}")
            space = time = None
        if space and (2 in stages or 3 in stages):
            _video_size(config, stages, size, space, out)
        if time and 2 in stages and not m.vae.init_from:
            _vae_clips(config.vae_training, time, out)
        lv = m.vae.initial_logvar
        if 2 in stages and not m.vae.init_from and not (_is_number(lv) and -30 <= lv <= 20):
            out.append(f"model.vae.initial_logvar={lv!r} must be a number in [-30, 20] (the "
                       f"range the VAE loss clips log-variances to; -8: a narrow posterior)")
    for s in (2, 3):
        n = config[f"stage{s}"].partners_per_clip
        if s in stages and n is not None and not _is_int(n, 1):
            out.append(f"stage{s}.partners_per_clip={n!r} must be an integer >= 1 or None "
                       f"(every partner): stage {s} trains on cross-identity pairs")
    k, steps2 = config.stage2.self_pair_steps, config.stage2.steps
    if 2 in stages and not (_is_int(k, 0) and (not _is_int(steps2, 1) or k < steps2)):
        out.append(f"stage2.self_pair_steps={k!r} must be an integer in [0, stage2.steps="
                   f"{steps2}) (0: every step on every pair, augmented)")
    if 2 in stages and m.retargeter.output_frames == "latent":
        t = config.stage2.clip_frames
        if not _is_int(t, 1) or (t - 1) % TEMPORAL_STRIDE:
            out.append(f"stage2.clip_frames={t}: the retargeter's latent frames need 1 + "
                       f"{TEMPORAL_STRIDE}k driving frames")
    if not config.data.path:
        syn = config.data.synthetic
        if syn.image_size != size:
            out.append(f"data.synthetic.image_size={syn.image_size} differs from "
                       f"model.motion_tokenizer.image_size={size}")
        lengths = [config[f"stage{s}"].clip_frames for s in stages]
        vae_cfg = config.vae_training
        if 2 in stages and not m.vae.init_from and vae_cfg.steps > vae_cfg.image_steps:
            lengths.append(vae_cfg.clip_frames)
        longest = max([t for t in lengths if _is_int(t, 1)] or [1])
        if syn.clip_frames < longest:
            out.append(f"data.synthetic.clip_frames={syn.clip_frames} is shorter than the "
                       f"{longest}-frame clips the stages train on")
        if not _is_int(config.data.render_workers, 0):
            out.append(f"data.render_workers={config.data.render_workers!r} must be an integer "
                       f">= 0 (0: one render process per CPU core)")


def _vae_clips(cfg, time: int, out: list) -> None:
    """Problems of the VAE's training phases (single frames, then clips)."""
    if not _is_int(cfg.image_steps, 0):
        out.append(f"vae_training.image_steps={cfg.image_steps!r} must be an integer >= 0")
    if not _is_int(cfg.clip_batch_size, 1):
        out.append(f"vae_training.clip_batch_size={cfg.clip_batch_size!r} must be a positive "
                   f"integer")
    t = cfg.clip_frames
    if not _is_int(t, 1) or (t - 1) % time:
        out.append(f"vae_training.clip_frames={t!r}: the VAE compresses time {time}x, so its "
                   f"training clips need 1 + {time}k frames")


def _video_size(config, stages, size: int, space: int, out: list) -> None:
    """Problems of the reference / generated clip size (model.video_size) for stages 2-3."""
    m = config.model
    given = tuple(m.video_size)
    if len(given) != 2 or not all(_is_int(x, 0) for x in given) or (0 in given and any(given)):
        out.append(f"model.video_size={given} must be (H, W) of positive integers, or (0, 0) "
                   f"for model.motion_tokenizer.image_size square")
        return
    from im_anim_jax.training import vae as vae_training
    h, w = vae_training.video_size(config)
    label = (f"model.video_size={given}" if any(given)
             else f"model.motion_tokenizer.image_size={size}")
    factor = space * m.retargeter.reference_patch
    if h % factor or w % factor:
        out.append(f"{label}: the reference image must be a multiple of {factor} (the "
                   f"VAE's {space}x spatial compression, then {m.retargeter.reference_patch}x"
                   f"{m.retargeter.reference_patch} reference patches)")
    (_, ph, pw), (lh, lw) = tuple(m.dit.patch_size), (h // space, w // space)
    if 3 in stages and (lh % ph or lw % pw):
        out.append(f"{label} gives {lh}x{lw} latents, not divisible by the DiT's patch "
                   f"{ph}x{pw}")
    if (h, w) != (size, size):
        out.append(f"model.video_size={given}: training reads reference and target frames at "
                   f"the clips' own size, {size}x{size} (model.motion_tokenizer.image_size); "
                   f"other sizes are for the planner (python -m im_anim_jax.plan --height H "
                   f"--width W) until the data pipeline resizes them")


def _prerequisites(config, stages, workdir: str, out: list) -> None:
    def done(name):
        return checkpointing.latest_step(os.path.join(workdir, name)) is not None
    if 2 in stages and 1 not in stages and not done("stage1"):
        out.append(f"stage 2 starts from stage 1, but {workdir}/stage1 holds no checkpoint: run "
                   f"--stages 1,2")
    if 3 in stages and 2 not in stages:
        if not done("stage2"):
            out.append(f"stage 3 starts from stage 2, but {workdir}/stage2 holds no checkpoint: "
                       f"run stage 2 first")
        if not config.model.vae.init_from and not done("vae"):
            out.append(f"stage 3 needs the reference VAE: {workdir}/vae holds no checkpoint and "
                       f"model.vae.init_from is empty (stage 2 trains it)")


# What each stage directory is built on: a stage that trains (from scratch, or on past its newest
# checkpoint) changes the model these later stages were trained from.
_DEPENDENTS = {"stage1": ("stage2", "stage2_*", "stage3"),
               "vae": ("stage2", "stage2_*", "stage3"), "stage2": ("stage3",)}


def _dependents(config, stages, workdir: str, out: list) -> None:
    """A stage may not train on under later stages' checkpoints: they would be left on a model
    that no longer exists (and `checkpoint.max_to_keep` deletes the old one)."""
    runs = [("stage1", config.stage1.steps)] if 1 in stages else []
    if 2 in stages:
        runs += [] if config.model.vae.init_from else [("vae", config.vae_training.steps)]
        runs.append(("stage2", config.stage2.steps))
    for name, steps in runs:
        done = checkpointing.latest_step(os.path.join(workdir, name)) or 0
        later = sorted({os.path.basename(d) for pattern in _DEPENDENTS[name]
                        for d in glob.glob(os.path.join(workdir, pattern))
                        if checkpointing.latest_step(d) is not None})
        if _is_int(steps, 1) and done < steps and later:
            built = f"its step-{done} checkpoint" if done else "a checkpoint no longer there"
            out.append(f"{name} would train to step {steps}, but {', '.join(later)} in {workdir} "
                       f"were trained on {built}: they would be left on a model that no longer "
                       f"exists. Keep its steps at {done} or move {', '.join(later)} away first")


def _pairs(config, stages, out: list) -> None:
    """Stages 2-3 train on cross-identity pairs: a dataset at data.path must hold some (an
    ingested video is one identity performing its own motion, so ingested data holds none)."""
    from data_pipelines import pairs, records
    path = config.data.path
    if not path or not records.is_dataset(path):
        return  # rendered by the run, or refused when it is read
    for s in (2, 3):
        if s not in stages:
            continue
        c = config[f"stage{s}"]
        try:
            pairs.load_pairs(path, "train", clip_frames=c.clip_frames, seed=config.seed,
                             partners_per_clip=c.partners_per_clip, self_pairs=c.self_pairs)
        except ValueError as e:
            out.append(f"stage {s} trains on pairs of identities performing the same motion, "
                       f"and data.path has none: {e}. Ingested videos (one identity, one motion "
                       f"each) train stage 1 only")


def _splits(config, evaluating: bool, out: list) -> None:
    """A dataset at data.path holds the split training reads ("train") and, where the run
    evaluates, eval.split (ingest puts videos there with --test-fraction > 0)."""
    from data_pipelines import records
    path = config.data.path
    if not path or not records.is_dataset(path):
        return  # rendered by the run, or refused when it is read
    have = sorted(records.read_index(path)["splits"])
    if "train" not in have:
        out.append(f"data.path={path} has no 'train' split to train on (it has {have}); ingest "
                   f"with --test-fraction below 1")
    if evaluating and config.eval.split not in have:
        out.append(f"eval.split={config.eval.split!r} is not in data.path={path} (it has {have}), "
                   f"so the evaluation after each stage would fail once it has trained: ingest "
                   f"with --test-fraction > 0 (whole videos held out), set --config.eval.split, "
                   f"or pass --noeval")


def _quantizer(config, stages, out: list) -> None:
    """The codebook's size, and the dead-code restart stage 1 runs: a usage EMA (decay in
    [0, 1); 1 never moves it) against a threshold in [0, 1) (0 turns the restart off; a restarted
    code's EMA starts at 1, so a threshold of 1 or more restarts every code every step)."""
    q = config.model.quantizer
    if not _is_int(q.codebook_size, 1):
        out.append(f"model.quantizer.codebook_size={q.codebook_size!r} must be an integer >= 1")
    if 1 not in stages:
        return
    if not (_is_number(q.restart_threshold) and 0 <= q.restart_threshold < 1):
        out.append(f"model.quantizer.restart_threshold={q.restart_threshold!r} must be a number "
                   f"in [0, 1) (0: no dead-code restart)")
    elif q.restart_threshold > 0 and not (_is_number(q.restart_decay)
                                          and 0 <= q.restart_decay < 1):
        out.append(f"model.quantizer.restart_decay={q.restart_decay!r} must be a number in "
                   f"[0, 1) (the usage EMA's decay; 1 would never move it, so no code would "
                   f"restart)")


def _targets(config, out: list) -> None:
    """The heatmap targets every stage trains on: a Gaussian needs a width, and a joint counts
    as visible from a confidence in (0, 1] (0 would count joints off the frame, above 1 none)."""
    sigma, threshold = config.data.heatmap_sigma, config.data.conf_threshold
    if not (_is_number(sigma) and sigma > 0):
        out.append(f"data.heatmap_sigma={sigma!r} must be a number > 0 (heatmap pixels)")
    if not (_is_number(threshold) and 0 < threshold <= 1):
        out.append(f"data.conf_threshold={threshold!r} must be a number in (0, 1]")


def _faults(config, out: list) -> None:
    f = config.faults
    if not _is_int(f.max_nonfinite_in_a_row, 1):
        out.append(f"faults.max_nonfinite_in_a_row={f.max_nonfinite_in_a_row!r} must be >= 1")
    if not _is_int(f.max_bad_records, 0):
        out.append(f"faults.max_bad_records={f.max_bad_records!r} must be an integer >= 0")
    if not all(_is_int(s, 1) for s in f.inject_nan_steps):
        out.append(f"faults.inject_nan_steps={tuple(f.inject_nan_steps)} must be steps >= 1")


def _augment(config, stages, out: list) -> None:
    for s in stages:
        aug = config[f"stage{s}"].get("augment")
        if aug is None or not aug.enabled:
            continue
        if not (isinstance(aug.flip, (int, float)) and 0 <= aug.flip <= 1):
            out.append(f"stage{s}.augment.flip={aug.flip!r} must be a probability in [0, 1]")
        elif aug.flip and s != 1:
            out.append(f"stage{s}.augment.flip={aug.flip}: only stage 1 can mirror its clips "
                       f"(stage {s} supervises the driving clip with the unmirrored original)")


def _frozen(config, stages, out: list) -> None:
    """stage3.frozen's groups, model.expression.every, model.dit_prediction and
    stage3.loss_weighting (stage 3)."""
    if 3 in stages:
        from im_anim_jax.training import stage3
        every, layers = config.model.expression.every, config.model.dit.num_layers
        if not _is_int(every, 1) or (_is_int(layers, 1) and layers % every):
            out.append(f"model.expression.every={every!r} must be an integer >= 1 that divides "
                       f"model.dit.num_layers={layers} (an expression block after every k DiT "
                       f"blocks; stage 3 always drives the DiT with expression tokens)")
        prediction = config.model.dit_prediction
        if config.model.dit.init_from and prediction != "velocity":
            out.append(f"model.dit_prediction={prediction!r} with model.dit.init_from: the "
                       f"converted Wan2.2 DiT's head predicts the velocity, which would be read "
                       f"as {'x0' if prediction == 'x0' else 'a change from z_ref'}; use "
                       f"'velocity' to start from it")
        for check in (lambda: stage3.frozen(config),
                      lambda: stage3.stage3_model.check_prediction(config.model),
                      lambda: stage3.check_loss_weighting(config.stage3.loss_weighting)):
            try:
                check()
            except ValueError as e:
                out.append(str(e))


def _eval(config, out: list) -> None:
    thresholds = config.eval.pck_thresholds
    if 0.1 not in thresholds or not all(_is_number(a) and 0 < a <= 1 for a in thresholds):
        out.append(f"eval.pck_thresholds={tuple(thresholds)} must be numbers in (0, 1] and "
                   f"include 0.1, the figure every report leads with")
    for field in ("batch_size", "stage3_pairs", "num_vis_frames", "fvd_frames", "metric_batch"):
        value = config.eval[field]
        if not _is_int(value, 1):
            out.append(f"eval.{field}={value!r} must be an integer >= 1")


def _windows(config, out: list) -> None:
    """Generation's windows: stage3.clip_frames video frames (1 + 4k for a VAE that compresses
    time 4x), consecutive windows sharing sampling.overlap_frames (1 + 4j, fewer)."""
    from im_anim_jax.models.wan import vae
    try:
        time = vae.build_vae(config.model.vae).time_factor
    except ValueError:
        return  # model.vae itself is named by _frames_and_sizes (training) or the checkpoint
    t = config.stage3.clip_frames
    if not _is_int(t, 1) or (t - 1) % time:
        out.append(f"stage3.clip_frames={t}: the VAE compresses time {time}x, so clips "
                   f"need 1 + {time}k frames (e.g. {1 + time * max(1, round((t - 1) / time))})")
    k = config.sampling.overlap_frames
    if not _is_int(k, 1) or (k - 1) % time or (_is_int(t, 1) and k >= t):
        out.append(f"sampling.overlap_frames={k} must be 1 + {time}j and below "
                   f"stage3.clip_frames={t}")


def sampling_problems(config) -> list[str]:
    """Problems of config.sampling and of the clip windows the generator samples (stage 3's
    training and evaluation, `animate`)."""
    c, out = config.sampling, []
    _windows(config, out)
    if c.method not in sampling.METHODS:
        out.append(f"sampling.method must be one of {', '.join(map(repr, sampling.METHODS))}, "
                   f"got {c.method!r}")
    if not _is_int(c.steps, 1):
        out.append(f"sampling.steps={c.steps!r} must be a positive integer")
    if not (_is_number(c.shift) and c.shift > 0):
        out.append(f"sampling.shift={c.shift!r} must be a number > 0 (1: no shift)")
    if not (_is_number(c.guidance) and c.guidance >= 0):
        out.append(f"sampling.guidance={c.guidance!r} must be a number >= 0 (1: no guidance)")
    return out


def evaluation_problems(config, stage: int) -> list[str]:
    """Problems of the settings `evaluate.py --stage N` reads (found before any model loads)."""
    out: list[str] = []
    _eval(config, out)
    return out + (sampling_problems(config) if stage == 3 else [])


def problems(config, stages, workdir: str, num_devices: int | None = None,
             num_processes: int | None = None, evaluating: bool = False) -> list[str]:
    """Every problem of `config` for running `stages` in `workdir` (empty: none); `evaluating`:
    each stage is evaluated after it trains (train.py without --noeval)."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    num_processes = jax.process_count() if num_processes is None else num_processes
    out: list[str] = []
    divisor = _mesh(config, num_devices, num_processes, out)
    for s in stages:
        for section, lrs in _SECTIONS[s]:
            if section == "vae_training" and config.model.vae.init_from:
                continue
            _schedule(config, section, lrs, divisor, num_processes, out)
    _frames_and_sizes(config, stages, out)
    _prerequisites(config, stages, workdir, out)
    _dependents(config, stages, workdir, out)
    _splits(config, evaluating, out)
    _pairs(config, stages, out)
    _augment(config, stages, out)
    _frozen(config, stages, out)
    _quantizer(config, stages, out)
    _targets(config, out)
    _faults(config, out)
    _eval(config, out)
    if 3 in stages:
        out += sampling_problems(config)
    return out


def validate(config, stages, workdir: str, **kwargs) -> None:
    """ValueError naming every problem `problems` finds."""
    raise_if_any(problems(config, stages, workdir, **kwargs))


def raise_if_any(found: list[str]) -> None:
    """ValueError naming every problem in `found`, one per line (none: nothing)."""
    if found:
        n = len(found)
        raise ValueError(f"the config has {n} problem{'s' if n > 1 else ''}:\n"
                         + "\n".join(f"  - {p}" for p in found))
