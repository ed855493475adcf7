"""Stage-2 evaluation on held-out identities and motions (the `test` split).

Every cross-identity pair of the split (driving A, reference image of B from another motion,
target = B performing A's motion at the same frames; pairs.PairSource, seed config.eval.pair_seed):
  cross_pck@a               predicted heatmaps' argmax vs B's target keypoints (heatmap pixels,
                            normalised by the heatmap size, as stage 1); where the dataset's
  cross_pck@a/reference_F   index records each clip's framing F (synthetic: full / half), the
                            same over the pairs whose reference image has that framing
  reference_pose_pck@0.1    the prediction vs B's OWN pose in the reference image: how much of
                            the reference pose leaks into the output (`/ground_truth`: the same
                            figure for the target itself, i.e. the level explained by chance)
  reference_pose_follow     the reference shuffled to another frame of B (another pose, same
  reference_swap_shift      identity): slope of the prediction's move on the reference pose's
                            move (0: the reference pose does not leak), and the mean move
  driving_pose_follow       each pair's driving clip swapped for its batch neighbour's (same
  driving_swap_shift        reference): the same slope on the driving poses' move (ground-truth
                            keypoints) and mean move; 0 means the output ignores the motion
  foreign_reference_pck@0.1, foreign_reference_drop@0.1
                            each pair's reference swapped for its batch neighbour's (another
                            identity), scored against the pair's own target, and how much lower
                            that is than with its own reference on the same pairs: 0 means the
                            output ignores the reference (its body, framing and placement)
for the main model and every trained baseline, plus four explicit, training-free baselines:
  no_retarget       the stage-1 pose of the driving frames pasted onto the reference
  no_retarget_gt    the same with the driving identity's ground-truth keypoints
  explicit_realign  the stage-1 driving pose moved onto the stage-1 pose of the reference image
                    (augment.realign_bones: Animate-X-style bone-length and position alignment)
  explicit_similarity  the same by one scale and shift per clip (augment.align_similarity:
                       the head/torso joints' centre and spread), bone ratios kept
and one oracle, `stage1_on_target`: the stage-1 model reading the target video itself (B really
performing the motion). Stage 2 decodes through the same frozen joint decoder, so this is what
that decoder draws when its encoder sees the answer: a reference level for cross_pck, per framing
too (not a strict bound: stage 2 may find tokens the stage-1 encoder does not);
and the identity-leakage probe (evaluation/leakage.py) on frozen motion features of the split's
clips: fit on the first half of its motions, tested on the rest (same identities, unseen
motions), predicting each driving identity's shape parameters (R^2) and id (accuracy).
The `pose_indicator` baseline reads the driving frames with their keypoints as given (the
dataset's: DWPose for ingested videos, exact for the synthetic set), untransformed; its probe
features are the IPI output tokens.

Writes WORKDIR/eval/stage2.json and WORKDIR/eval/stage2.png (driving | reference | ground-truth
retargeted pose | predicted heatmaps | with the pose_indicator baseline trained: its heatmaps).
"""
from __future__ import annotations

import functools

import jax
import numpy as np

from data_pipelines import augment, pipeline, records
from im_anim_jax import keypoints as kp
from im_anim_jax import evaluation, visualize
from im_anim_jax.evaluation import leakage
from im_anim_jax.models.quantizer import code_vectors
from im_anim_jax.training import checkpointing
from im_anim_jax.training import stage1 as stage1_training
from im_anim_jax.training import stage2 as stage2_training
from im_anim_jax.training import vae as vae_training


def load_variant(config, workdir: str, name: str, ref_encoder):
    """(variant config, model, params, step) of a trained variant; None for a baseline that was
    not trained (the main model is required)."""
    directory = stage2_training.stage_dir(workdir, name)
    if name != stage2_training.MAIN and checkpointing.latest_step(directory) is None:
        return None
    cfg = stage2_training.variant_config(config, name)
    model = stage2_training.build_stage2(cfg.model, ref_encoder.grid)
    abstract = stage2_training.abstract_params(model, cfg, ref_encoder.dim)
    params, step = checkpointing.restore_checked_params(
        directory, abstract, f"stage-2 ({name})",
        "run `python train.py --config ... --workdir ... --stages 2` first")
    return cfg, model, params, step


class Hits:
    """Accumulates weighted PCK hits at several thresholds."""

    def __init__(self, thresholds):
        self.thresholds = tuple(thresholds)
        self.hits, self.weight = dict.fromkeys(self.thresholds, 0.0), 0.0

    def add(self, pred_xy, gt_xy, weights, size: int):
        dist = np.linalg.norm((np.asarray(pred_xy) - np.asarray(gt_xy)) / size, axis=-1)
        w = np.asarray(weights, np.float64)
        for a in self.thresholds:
            self.hits[a] += float(np.sum((dist <= a) * w))
        self.weight += float(w.sum())

    def result(self, prefix: str) -> dict:
        return {f"{prefix}@{a}": evaluation.ratio(self.hits[a], self.weight, "no visible joints")
                for a in self.thresholds}


class Follow:
    """How far predictions move when only one input changes. `prefix="reference"`: the reference
    image's pose (same identity, another frame of its clip); `prefix="driving"`: the driving clip
    (another pair's, same reference). `{prefix}_swap_shift` = mean joint displacement of the
    prediction (per-axis normalised like PCK); `{prefix}_pose_follow` = least-squares slope of
    that displacement on the input pose's displacement (reference: 1 copies the reference pose's
    change, 0 ignores it, the wanted value; driving: 0 ignores the motion)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.num = self.den = self.shift = self.weight = 0.0

    def add(self, pred, pred_swapped, pose, pose_swapped, weights, size: int):
        """pred, pred_swapped [B, T, J, 2]; pose, pose_swapped broadcastable to them (heatmap
        pixels); weights [B, T, J]."""
        dp = (np.asarray(pred_swapped) - np.asarray(pred)) / size
        dr = np.broadcast_to((np.asarray(pose_swapped) - np.asarray(pose)) / size, dp.shape)
        w = np.asarray(weights, np.float64)[..., None]
        self.num += float(np.sum(w * dp * dr))
        self.den += float(np.sum(w * dr * dr))
        self.shift += float(np.sum(w[..., 0] * np.linalg.norm(dp, axis=-1)))
        self.weight += float(w.sum())

    def result(self) -> dict:
        """Not computed where no pair had a swap (e.g. eval.batch_size 1 for `driving`, whose
        swaps are batch neighbours) or the swapped input pose never moved."""
        return {f"{self.prefix}_swap_shift": evaluation.ratio(
                    self.shift, self.weight, f"no pair had a {self.prefix} swap"),
                f"{self.prefix}_pose_follow": evaluation.ratio(
                    self.num, self.den, f"no {self.prefix} swap moved the input pose")}


class Foreign:
    """PCK@0.1 against each pair's own target, with its own reference and with the batch
    neighbour's (another identity: pairs whose neighbour shows the same identity are left out).
    `foreign_reference_drop@0.1` = own - neighbour's: 0 means the output ignores the reference."""

    def __init__(self):
        self.own, self.theirs = Hits((0.1,)), Hits((0.1,))

    def add(self, pred, pred_foreign, gt, weights, other_identity, size: int):
        """pred, pred_foreign, gt [B, T, J, 2] (heatmap pixels); weights [B, T, J];
        other_identity [B] bool: the neighbour's reference shows another identity."""
        w = np.asarray(weights) * np.asarray(other_identity)[:, None, None]
        self.own.add(pred, gt, w, size)
        self.theirs.add(pred_foreign, gt, w, size)

    def result(self) -> dict:
        own, theirs = (h.result("pck")["pck@0.1"] for h in (self.own, self.theirs))
        if isinstance(own, str):  # no batch neighbour showed another identity
            missing = "not computed: no pair had a neighbour of another identity"
            return {"foreign_reference_pck@0.1": missing, "foreign_reference_drop@0.1": missing}
        return {"foreign_reference_pck@0.1": theirs, "foreign_reference_drop@0.1": own - theirs}


def _swapped_references(src, batch):
    """Another frame (half a clip away) of each pair's reference clip: (images, keypoints)."""
    images, kpts = [], []
    for rec, frame in zip(batch["reference_record"], batch["reference_frame"]):
        clip = src[int(rec)]
        f = (int(frame) + len(clip["frames"]) // 2) % len(clip["frames"])
        images.append(clip["frames"][f])
        kpts.append(clip["keypoints"][f])
    return np.stack(images), np.stack(kpts)


def _add_by_framing(hits: dict, ref_framing, pred, gt, weights, size: int) -> None:
    """Adds each pair to hits[its reference image's framing] (weights [B, T, J])."""
    for f, h in hits.items():
        h.add(pred, gt, np.asarray(weights) * (ref_framing == f)[:, None, None], size)


def _realigned(drv_xy, ref_xy, image_size: int, size: int, align=augment.realign_bones):
    """Heatmap-pixel poses [B, T, J, 2] moved onto the reference poses [B, J, 2] by `align`
    (augment.realign_bones or augment.align_similarity)."""
    to_img = lambda xy: kp.heatmap_to_image(np.asarray(xy), image_size, size)  # noqa: E731
    out = []
    for d, r in zip(to_img(drv_xy), to_img(ref_xy)):
        one = lambda xy: np.concatenate([xy, np.ones(xy.shape[:-1] + (1,))], -1)  # noqa: E731
        out.append(align(one(d), one(r)[None])[..., :2])
    return kp.image_to_heatmap(np.stack(out), image_size, size)


def _with_column(grid, heatmaps, gap: int = 4) -> np.ndarray:
    """visualize.pair_grid's image with one more column: a heatmap panel per row (frame)."""
    k = len(heatmaps)
    size = (grid.shape[0] - (k - 1) * gap) // k
    column = []
    for h in heatmaps:
        column += [visualize.heatmap_panel(h, size), np.full((gap, size, 3), 255, np.uint8)]
    pad = np.full((grid.shape[0], gap, 3), 255, np.uint8)
    return np.concatenate([grid, pad, np.concatenate(column[:-1], 0)], 1)


def _real_swaps(batch: dict, other: np.ndarray) -> np.ndarray:
    """[B] bool: pair i's driving window differs from that of pair other[i] (another clip, or
    the same clip at another start): a swap that changes the motion input."""
    record, start = np.asarray(batch["driving_record"]), np.asarray(batch["start"])
    return (record != record[other]) | (start != start[other])


def pair_figures(config, workdir, data_path, ref_encoder, loaded: dict, s1):
    """Cross-identity PCK of every variant and explicit baseline; the PNG of the main model."""
    targets = stage1_training.targets(config)
    size, image_size = targets.heatmap_size, targets.image_size
    thresholds = tuple(config.eval.pck_thresholds)
    ds = pipeline.pair_eval_dataset(data_path, config.eval.split,
                                    clip_frames=config.stage2.clip_frames,
                                    batch_size=config.eval.batch_size, targets=targets,
                                    seed=config.eval.pair_seed)
    s1_model, s1_params, _ = s1
    forwards = {n: jax.jit(lambda p, d, r, m=m: m.apply({"params": p}, d, r)[0])
                for n, (_, m, _, _) in loaded.items()}
    s1_forward = jax.jit(lambda f: s1_model.apply({"params": s1_params}, f)[0])
    read = lambda h: kp.argmax_keypoints(np.asarray(h), subpixel=config.eval.subpixel)  # noqa
    names = list(loaded) + ["no_retarget", "no_retarget_gt", "explicit_realign",
                            "explicit_similarity", "stage1_on_target"]
    cross = {n: Hits(thresholds) for n in names}
    ref_pose = {n: Hits((0.1,)) for n in list(loaded) + ["ground_truth"]}
    follow = {n: Follow("reference") for n in loaded}
    motion = {n: Follow("driving") for n in loaded}
    foreign = {n: Foreign() for n in loaded}
    src = records.open_split(data_path, config.eval.split)
    framing = np.array([r.get("framing") for r in
                        records.read_index(data_path)["splits"][config.eval.split]], object)
    framings = sorted({f for f in framing if f is not None})  # synthetic: full / half body
    by_framing = {n: {f: Hits(thresholds) for f in framings} for n in names}
    vis, ids, pairs = None, set(), 0
    for batch in ds:
        to_hm = lambda xy: kp.image_to_heatmap(xy[..., :2], image_size, size)  # noqa: E731
        gt, w = to_hm(batch["target_keypoints"]), batch["joint_weights"]
        ref_gt = np.broadcast_to(to_hm(batch["reference_keypoints"])[:, None], gt.shape)
        ref_w = w * (batch["reference_keypoints"][:, None, :, 2] >= targets.conf_threshold)
        ref_framing = framing[np.asarray(batch["reference_record"])]
        tokens = ref_encoder(batch["reference"])
        swap_images, swap_kpts = _swapped_references(src, batch)
        swap_tokens = ref_encoder(swap_images)
        swap_w = ref_w * (swap_kpts[:, None, :, 2] >= targets.conf_threshold)
        other = np.roll(np.arange(len(tokens)), 1)  # each pair gets its neighbour's driving clip
        drv_gt = to_hm(batch["driving_keypoints"])
        drv_seen = batch["driving_keypoints"][..., 2] >= targets.conf_threshold
        other_w = w * drv_seen * drv_seen[other] * _real_swaps(batch, other)[:, None, None]
        shown = {}
        for n, (cfg, _, params, _) in loaded.items():
            driving = stage2_training.driving_input(cfg, batch["driving"],
                                                    batch["driving_keypoints"])
            heatmaps = jax.device_get(forwards[n](params, driving, tokens))
            pred = read(heatmaps)
            cross[n].add(pred, gt, w, size)
            _add_by_framing(by_framing[n], ref_framing, pred, gt, w, size)
            ref_pose[n].add(pred, ref_gt, ref_w, size)
            swapped = read(jax.device_get(forwards[n](params, driving, swap_tokens)))
            follow[n].add(pred, swapped, to_hm(batch["reference_keypoints"])[:, None],
                          to_hm(swap_kpts)[:, None], swap_w, size)
            if len(other) > 1:
                moved = stage2_training.driving_input(cfg, batch["driving"][other],
                                                      batch["driving_keypoints"][other])
                motion[n].add(pred, read(jax.device_get(forwards[n](params, moved, tokens))),
                              drv_gt, drv_gt[other], other_w, size)
                ids_ref = batch["reference_identity_id"]
                foreign[n].add(pred, read(jax.device_get(forwards[n](params, driving,
                                                                     tokens[other]))),
                               gt, w, ids_ref != ids_ref[other], size)
            if vis is None:
                shown[n] = heatmaps[0][:config.eval.num_vis_frames]
        if vis is None:
            k = config.eval.num_vis_frames
            vis = visualize.pair_grid(batch["driving"][0][:k], batch["reference"][0],
                                      batch["heatmaps"][0][:k], shown[stage2_training.MAIN])
            if "pose_indicator" in shown:
                vis = _with_column(vis, shown["pose_indicator"])
        ref_pose["ground_truth"].add(gt, ref_gt, ref_w, size)
        drv = read(jax.device_get(s1_forward(batch["driving"])))
        ref = read(jax.device_get(s1_forward(batch["reference"][:, None])))[:, 0]
        realigned = _realigned(drv, ref, image_size, size)
        similar = _realigned(drv, ref, image_size, size, augment.align_similarity)
        oracle = read(jax.device_get(s1_forward(batch["target"])))
        # Every row is scored on the same joints (those visible in the target), the pasted
        # driving ground truth too: out of frame in the driving clip, its joints still miss.
        for n, pred in (("no_retarget", drv), ("no_retarget_gt", drv_gt),
                        ("explicit_realign", realigned), ("explicit_similarity", similar),
                        ("stage1_on_target", oracle)):
            cross[n].add(pred, gt, w, size)
            _add_by_framing(by_framing[n], ref_framing, pred, gt, w, size)
        ids.update(int(i) for i in batch["reference_identity_id"])
        pairs += len(batch["driving"])
    variants = {n: {**cross[n].result("cross_pck"), **(ref_pose[n].result("reference_pose_pck")
                                                       if n in ref_pose else {})}
                for n in names}
    for n in names:  # e.g. cross_pck@0.1/reference_half: pairs whose reference is half-body
        for f, hits in by_framing[n].items():
            variants[n].update({f"{k}/reference_{f}": v
                                for k, v in hits.result("cross_pck").items()})
    for n, (_, _, _, step) in loaded.items():
        variants[n].update(follow[n].result(), **motion[n].result(), **foreign[n].result(),
                           step=int(step))
    return variants, ref_pose["ground_truth"].result("reference_pose_pck"), vis, dict(
        num_pairs=pairs, num_reference_identities=len(ids))


def _features(model, params, driving):
    """The frozen motion features the leakage probe reads: the codes themselves for a quantized
    encoder (its straight-through output differs from them by the float32 rounding of the
    continuous encoding, which a probe on a collapsed token position would read as signal),
    else the encoder's output."""
    z, aux = model.apply({"params": params}, driving, method=type(model).encode)
    if "indices" not in aux:
        return z
    return code_vectors(params["quantize"]["embedding"], aux["indices"],
                        model.quantize.use_l2_norm)


def leakage_figures(config, data_path, loaded: dict, s1) -> dict:
    """Identity-leakage probe on the motion features of each encoder (frozen)."""
    targets = stage1_training.targets(config)
    ds = pipeline.eval_dataset(data_path, config.eval.split, clip_frames=None,
                               batch_size=config.eval.batch_size, targets=targets)
    s1_model, s1_params, _ = s1
    encoders = {"tokens_stage1": jax.jit(functools.partial(_features, s1_model, s1_params))}
    names = {stage2_training.MAIN: "tokens_stage2", "conv": "conv_features",
             "pose_indicator": "pose_indicator_tokens"}
    inputs = {"tokens_stage1": lambda batch: batch["frames"]}
    for n, label in names.items():
        if n in loaded:
            cfg, m, p, _ = loaded[n]
            encoders[label] = jax.jit(functools.partial(_features, m, p))
            inputs[label] = lambda batch, cfg=cfg: stage2_training.driving_input(
                cfg, batch["frames"], batch["keypoints"])
    feats = {k: [] for k in encoders}
    shape, ident, motion = [], [], []
    for batch in ds:
        b, t = batch["frames"].shape[:2]
        for k, f in encoders.items():
            feats[k].append(np.asarray(jax.device_get(f(inputs[k](batch)))).reshape(b * t, -1))
        shape.append(np.repeat(batch["shape_params"], t, 0))
        ident.append(np.repeat(batch["identity_id"], t))
        motion.append(np.repeat(batch["motion_id"], t))
    shape, ident, motion = (np.concatenate(x) for x in (shape, ident, motion))
    motions = np.unique(motion)
    if len(motions) < 2:
        raise ValueError(f"the leakage probe needs >= 2 motions in split {config.eval.split!r} "
                         f"(fit on some, test on others); it has {len(motions)}")
    fit = np.isin(motion, motions[:len(motions) // 2])
    # penalties chosen on held-out fit motions when there are several, else on held-out frames
    groups = motion[fit] if len(motions) >= 4 else None
    out = {}
    for k, chunks in feats.items():
        x = np.concatenate(chunks)
        out[k] = leakage.probe(x[fit], shape[fit], ident[fit], x[~fit], shape[~fit], ident[~fit],
                               groups_fit=groups)
    return out


def evaluate(config, workdir: str, data_path: str) -> dict:
    ref_encoder = vae_training.load_reference_encoder(config, workdir)
    loaded = {}
    for name in stage2_training.variants(config):
        variant = load_variant(config, workdir, name, ref_encoder)
        if variant is not None:
            loaded[name] = variant
    s1 = stage1_training.load_params(config, workdir)
    variants, ref_gt, vis, counts = pair_figures(config, workdir, data_path, ref_encoder,
                                                 loaded, s1)
    main = variants[stage2_training.MAIN]
    result = {k: v for k, v in main.items() if k != "step"}
    result["reference_pose_pck@0.1/ground_truth"] = ref_gt["reference_pose_pck@0.1"]
    result.update(step=main["step"], baselines={n: v for n, v in variants.items()
                                                if n != stage2_training.MAIN},
                  leakage=leakage_figures(config, data_path, loaded, s1),
                  split=config.eval.split, clip_frames=config.stage2.clip_frames, **counts)
    evaluation.write_report(workdir, "stage2", result, vis)
    return result
