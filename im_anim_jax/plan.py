"""Memory / FLOP / communication planner: compiles a stage's training step for a mesh abstractly
(ShapeDtypeStructs carrying shardings; nothing is allocated) and prints what one device holds and
does per step.

  python -m im_anim_jax.plan --config configs/im_animation.py:paper --mesh fsdp=16,tensor=4 \\
      [--stage 3 --frames 81 --height 704 --width 1280] [--device_gib 80] [--config.X=...]

The step is the trainer's own (training/stage<N>.make_train_step; stages 2/3 take the frozen
VAE's encodings as inputs, its encoder running as its own jit before the step), jitted with the state donated, lowered with jax.jit(...).lower on a mesh of
simulated CPU devices (jax_num_cpu_devices = the mesh's size: 8, 16, 64 ... all work on one
host) and compiled by XLA:CPU. Printed per device:
  - params and optimizer state bytes (from the state's shardings), beside the ideal
    total / (fsdp x tensor);
  - XLA memory analysis: arguments, outputs, temporaries (activations, gradients, gathered
    weights), the peak estimate arguments + outputs - donated aliases + temporaries, and the
    verdict against --device_gib;
  - FLOPs per step: the matmuls and convolutions of the step's jaxpr, scanned layers counted
    once per layer (XLA's cost analysis counts a scan body once, whatever its length), remat's
    recomputation included; per device = total / devices;
  - bytes moved per collective kind, summed from the compiled HLO (collectives inside the scanned
    layers counted once per iteration), and the largest by model scope (op_name metadata) and
    group size, beside the ideal traffic of FSDP, data parallelism and
    the DiT's tensor / context parallelism (see `ideal_collectives`). XLA:CPU emits no
    reduce-scatter (it all-reduces the gradients, 2x the bytes, and slices); the report also
    gives the ratio with those all-reduces (groups other than tensor / context ones) at half,
    the traffic a GPU/TPU compile's reduce-scatter would send.
Memory figures are XLA:CPU's for the configured attention (`xla` on CPU: the score matrix is
materialised); a GPU run with cuDNN flash attention needs less for activations.
"""
from __future__ import annotations

import json
import math
import re
import sys
import time
from collections import defaultdict
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from im_anim_jax import sharding

GIB = 2 ** 30
KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


# ------------------------------------------------------------------ abstract state and batches

def abstract_state(config, stage: int, model, tx, mesh, ref_dim: int = 0):
    """(ShapeDtypeStructs with shardings, shardings) of the TrainState that stage `stage`'s
    init_state would create on `mesh` (the same fields and placement, traced with eval_shape:
    no compile, no memory). ref_dim: the reference encoder's token width (stages 2 and 3)."""
    from im_anim_jax.training import stage1, stage2, stage3
    from im_anim_jax.training import state as train_state
    rules = sharding.rules(config.mesh)
    key = jax.random.key(0)
    if stage == 1:
        boxed = jax.eval_shape(model.init, key, stage1.dummy_frames(config.model))["params"]
        trained = lambda p: p  # noqa: E731
    elif stage == 2:
        boxed = stage2.abstract_params(model, config, ref_dim, boxed=True)
        trained = lambda p: stage2._trained(p, config)  # noqa: E731
    else:
        boxed = stage3.abstract_params(model, config, ref_dim, boxed=True)
        trained = lambda p: stage3._trained(p, config)  # noqa: E731
    params_sh = sharding.param_shardings(boxed, mesh, rules)
    params = sharding.raw_values(boxed)
    opt = jax.eval_shape(tx.init, trained(params))
    opt_sh = sharding.opt_state_shardings(tx, opt, trained(params_sh), mesh)
    rep = NamedSharding(mesh, P())
    rng = jax.eval_shape(lambda: jax.random.key_data(key))
    fields = dict(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt, rng=rng)
    fields_sh = dict(step=rep, params=params_sh, opt_state=opt_sh, rng=rep)
    cls = train_state.TrainState
    if stage == 1:
        cls = stage1.TrainState
        fields["code_usage"] = jax.ShapeDtypeStruct((config.model.quantizer.codebook_size,),
                                                    jnp.float32)
        fields_sh["code_usage"] = rep
    state, state_sh = cls(**fields), cls(**fields_sh)
    return jax.tree.map(lambda x, sh: _spec(x.shape, x.dtype, sh), state, state_sh), state_sh


def _spec(shape, dtype, sh):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sh)


def jitted_step(run_step: Callable):
    """The jitted step inside a trainer's run_step (its closure variable `jitted`: run_step
    enters the mesh itself, which jit cannot trace)."""
    cells = dict(zip(run_step.__code__.co_freevars, run_step.__closure__ or ()))
    if "jitted" not in cells:
        raise ValueError("the trainer's run_step holds no `jitted` step to plan")
    return cells["jitted"].cell_contents


def stage_step(config, stage: int, mesh):
    """(jitted step, abstract args) of the trainer of `stage` on `mesh` for config's batch and
    clip sizes (stage<N>.batch_size, stage<N>.clip_frames; driving frames at
    model.motion_tokenizer.image_size, reference and target at vae_training.video_size).
    Stages 2 and 3 take the frozen VAE's encodings (reference tokens; z_ref and x0) as inputs:
    their encoder runs as its own jit before the step and is not part of the plan."""
    from im_anim_jax import text
    from im_anim_jax.models.stage1 import build_stage1
    from im_anim_jax.models.stage2 import build_stage2
    from im_anim_jax.models.wan import vae
    from im_anim_jax.training import stage1, stage2, stage3
    from im_anim_jax.training import vae as vae_training

    rules = sharding.rules(config.mesh)
    cfg = config[f"stage{stage}"]
    sharding.check_batch_size(cfg.batch_size, mesh, f"stage{stage}.batch_size")
    b, t, s = cfg.batch_size, cfg.clip_frames, config.model.motion_tokenizer.image_size
    hm = config.model.joint_decoder.heatmap_size
    bsh = sharding.batch_sharding(mesh)
    clip = {"frames": _spec((b, t, s, s, 3), jnp.uint8, bsh),
            "keypoints": _spec((b, t, 62, 3), jnp.float32, bsh),
            "heatmaps": _spec((b, t, 62, hm, hm), jnp.float32, bsh),
            "joint_weights": _spec((b, t, 62), jnp.float32, bsh)}
    if stage == 1:
        model, tx = build_stage1(config.model), stage1.make_optimizer(cfg)
        state, state_sh = abstract_state(config, 1, model, tx, mesh)
        return jitted_step(stage1.make_train_step(model, tx, config, mesh, rules, state_sh)), (
            state, clip)

    vae_model = vae.build_vae(config.model.vae, config.model.dtype, config.model.attention_impl)
    vae_abs, vae_sh = vae_training.abstract_params(vae_model, mesh, rules)
    enc = {k: jax.tree.map(lambda x, sh: _spec(x.shape, x.dtype, sh), vae_abs[k], vae_sh[k])
           for k in vae_training.ENCODER_PARAMS}
    encoder = vae_training.reference_encoder(config, vae_model, enc)

    def encoded(fn, *args):  # the frozen encoder's output shape, sharded like the batch
        out = jax.eval_shape(fn, *args)
        return _spec(out.shape, out.dtype, bsh)
    height, width = vae_training.video_size(config)
    reference = _spec((b, height, width, 3), jnp.uint8, bsh)
    if stage == 2:
        model, tx = build_stage2(config.model, encoder.grid), stage1.make_optimizer(cfg)
        state, state_sh = abstract_state(config, 2, model, tx, mesh, encoder.dim)
        batch = {"driving": clip["frames"], "heatmaps": clip["heatmaps"],
                 "joint_weights": clip["joint_weights"], "target_keypoints": clip["keypoints"]}
        step = stage2.make_train_step(model, tx, config, mesh, rules, state_sh, encoder)
        return jitted_step(step), (state, batch, encoded(lambda e, r: e(r), encoder, reference))

    model = stage3.build(config, encoder)
    tx = stage3.make_optimizer(cfg, stage3._trained(stage3.abstract_params(model, config,
                                                                           encoder.dim), config))
    state, state_sh = abstract_state(config, 3, model, tx, mesh, encoder.dim)
    batch = {"driving": clip["frames"], "driving_keypoints": clip["keypoints"],
             "heatmaps": clip["heatmaps"], "joint_weights": clip["joint_weights"]}
    step = stage3.make_train_step(model, tx, config, mesh, rules, state_sh, encoder,
                                  jnp.asarray(text.context(config)))
    z_ref = encoded(vae_training.encode_video, encoder, _spec((b, 1, height, width, 3), jnp.uint8,
                                                              bsh))
    x0 = encoded(vae_training.encode_video, encoder,
                 _spec((b, t, height, width, 3), jnp.uint8, bsh))
    return jitted_step(step), (state, batch, z_ref, x0)


# ------------------------------------------------------------------ FLOPs from the jaxpr

def _dot_flops(eqn) -> float:
    """2 x multiply-adds of a dot_general or conv_general_dilated equation (global shapes)."""
    out = math.prod(eqn.outvars[0].aval.shape)
    if eqn.primitive.name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return 2.0 * out * math.prod(lhs[d] for d in contract)
    rhs = eqn.invars[1].aval.shape  # each output element: a dot over the kernel less its out dim
    # An input dilated by d (a strided conv's input gradient) holds 1/prod(d) of real values:
    # the taps on the inserted zeros are not work.
    return (2.0 * out * math.prod(rhs) / rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            / math.prod(eqn.params["lhs_dilation"]))


def jaxpr_flops(jaxpr) -> tuple[float, int]:
    """(FLOPs of the matmuls and convolutions of `jaxpr`, loops of unknown trip count): scan
    bodies times their length, the largest branch of a cond, while bodies once (counted in the
    second figure), shard_map bodies times their shards. XLA's cost analysis counts a scanned
    layer stack once (the body of its while loop), whatever the number of layers; this does not.
    Elementwise work is left out: it is a few % of a transformer's FLOPs."""
    from jax.extend import core as jcore
    total, unknown = 0.0, 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in ("dot_general", "conv_general_dilated"):
            total += _dot_flops(eqn)
            continue
        subs = [(j.jaxpr if isinstance(j, jcore.ClosedJaxpr) else j)
                for j in jcore.jaxprs_in_params(eqn.params)]
        counted = [jaxpr_flops(j) for j in subs]
        if not counted:
            continue
        unknown += sum(u for _, u in counted) + (name == "while")
        if name == "cond":
            total += max(f for f, _ in counted)
            continue
        times = eqn.params["length"] if name == "scan" else 1
        if name == "shard_map":
            mesh = eqn.params["mesh"]  # jax 0.10 names the manual axes `newly_manual_axes`
            manual = eqn.params.get("newly_manual_axes", eqn.params.get("manual_axes"))
            times = math.prod(mesh.shape[a] for a in manual) if manual else mesh.size
        total += times * sum(f for f, _ in counted)
    return total, unknown


def step_flops(step, *args) -> tuple[float, int]:
    """jaxpr_flops of `step` traced on `args` (abstract; all devices together)."""
    return jaxpr_flops(jax.make_jaxpr(step)(*args).jaxpr)


# ------------------------------------------------------------------ collectives in the HLO

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+(" + "|".join(KINDS)
                    + r")(-start)?\(")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(|\{)")
_CALLS = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation)"
                    r"=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _arrays(text: str) -> list[int]:
    return [_DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x)
            for d, dims in _ARRAY.findall(text)]


def _group_size(line: str, num_devices: int) -> int:
    """Devices per replica group: iota form [groups,size]<=[...], explicit {{0,1,..},..}, or the
    mesh form mesh['axis_0'=16,'axis_1'=4] {'axis_1'} (the product of the named axes), which
    may carry a device order between the two: ..., device_ids=([2,2]T(1,0)) {'axis_1'}."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\S+)?\s*"
                  r"\{([^}]*)\}", line)
    if m:
        sizes = {a: int(n) for a, n in re.findall(r"'(\w+)'=(\d+)", m.group(1))}
        return math.prod(sizes[a] for a in re.findall(r"'(\w+)'", m.group(2)))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    return len(m.group(1).split(",")) if m and m.group(1) else num_devices


_NOISE = re.compile(r"^(jit|pjit|transpose|jvp|vmap|remat|checkpoint|rematted_computation|while|"
                    r"body|cond|branch_\d+_fun|closed_call|core_call|custom_jvp_call|"
                    r"custom_vjp_call|eval_jaxpr|shard_map)\b|^[A-Z][A-Za-z0-9]*(\.\w+)?$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def op_scope(op_name: str, depth: int = 2) -> str:
    """The first `depth` module names of an HLO op_name (jit(step)/transpose(jvp(Model))/Model/
    motion_encoder/transformer/while/body/.../dot_general -> motion_encoder/transformer):
    transforms, control flow, Flax class(.method) names (not auto-named modules like Dense_0) and
    the primitive dropped. '(top level)' outside every named submodule (the root module's code,
    loss, optimizer); '(no HLO name)' without metadata."""
    if not op_name:
        return "(no HLO name)"
    parts, level, start = [], 0, 0  # split at the slashes outside parentheses
    for i, ch in enumerate(op_name + "/"):
        level += (ch == "(") - (ch == ")")
        if ch == "/" and level == 0:
            parts.append(op_name[start:i])
            start = i + 1
    parts = [p for p in parts[:-1] if p and not _NOISE.match(p)]
    return "/".join(parts[:depth]) or "(top level)"


def collective_bytes(hlo: str, num_devices: int, depth: int = 2) -> dict:
    """Bytes each device sends per step, by collective kind, from an SPMD-partitioned HLO module
    (ring algorithms: all-gather / all-to-all (n-1)/n of the gathered size, reduce-scatter (n-1)
    x the scattered result, all-reduce 2 (n-1)/n of the array, collective-permute the array).
    Collectives inside while loops count once per iteration (XLA's known_trip_count).
    -> {kind: {"bytes", "ops" (executions), "static_ops"}, "unknown_trip_counts": int,
        "by_scope": {(kind, group size, op_scope(op_name, depth)): bytes}}."""
    comps, order, current = defaultdict(list), [], None
    entry = None
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            m = _COMP.match(line)
            if m:
                current = m.group(1)
                order.append(current)
                if line.startswith("ENTRY"):
                    entry = current
                continue
        if current is not None and line.strip() and line.strip() != "}":
            comps[current].append(line)
    calls = defaultdict(list)  # computation -> [(callee, factor)]
    unknown = 0
    for name, lines in comps.items():
        for line in lines:
            trip = 1
            if " while(" in line:
                m = _TRIP.search(line)
                trip = int(m.group(1)) if m else 1
                unknown += m is None
            calls[name].extend((callee, trip if key == "body" else 1)
                               for key, callee in _CALLS.findall(line))
            for group in _BRANCHES.findall(line):
                calls[name].extend((c.strip().lstrip("%"), 1) for c in group.split(",")
                                   if c.strip())
    root = entry or (order[-1] if order else "")
    mult = defaultdict(int)
    mult[root] = 1
    for name in reversed(_topological(calls, root)):
        for callee, factor in calls.get(name, ()):
            mult[callee] += mult[name] * factor
    out = {k: {"bytes": 0.0, "ops": 0, "static_ops": 0} for k in KINDS}
    by_scope = defaultdict(float)
    for name, lines in comps.items():
        for line in lines:
            m = _INSTR.match(line)
            if not m or not mult[name]:
                continue
            result, kind, start = m.group(1), m.group(2), m.group(3)
            sizes = _arrays(result)
            if not sizes:
                continue
            r = _start_bytes(kind, sizes) if start else sum(sizes)
            n = _group_size(line, num_devices)
            moved = {"all-gather": r * (n - 1) / n, "reduce-scatter": r * (n - 1),
                     "all-reduce": 2 * r * (n - 1) / n, "all-to-all": r * (n - 1) / n,
                     "collective-permute": r}[kind]
            out[kind]["bytes"] += moved * mult[name]
            out[kind]["ops"] += mult[name]
            out[kind]["static_ops"] += 1
            op_name = _OP_NAME.search(line)
            by_scope[kind, n, op_scope(op_name.group(1) if op_name else "", depth)] += (
                moved * mult[name])
    out["unknown_trip_counts"] = unknown
    out["by_scope"] = dict(by_scope)
    return out


def _start_bytes(kind: str, sizes: list[int]) -> int:
    """Result bytes of an asynchronous `<kind>-start` from its result's array sizes: an
    all-reduce's outputs (one each for a merged op), an all-gather's or reduce-scatter's second
    half (operands, then outputs), a collective-permute's operand (the rest are outputs and
    context scalars)."""
    if kind == "all-reduce":
        return sum(sizes)
    if kind in ("all-gather", "reduce-scatter"):
        return sum(sizes[len(sizes) // 2:])
    return sizes[0]


def _topological(calls: dict, root: str) -> list[str]:
    """Computations reachable from `root`, callees before callers."""
    seen, post = set(), []

    def visit(n):
        if n in seen:
            return
        seen.add(n)
        for c, _ in calls.get(n, ()):
            visit(c)
        post.append(n)
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    visit(root)
    return post


# ------------------------------------------------------------------ ideal figures

def _leaf_bytes(x) -> int:
    return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize


def _shard_bytes(x) -> int:
    return math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize


def _axes(x) -> set:
    return {a for part in x.sharding.spec if part for a in ((part,) if isinstance(part, str)
                                                           else part)}


def trained_params(config, stage: int, params: dict) -> dict:
    """The subtree of `params` that stage `stage` updates."""
    from im_anim_jax.training import stage2, stage3
    if stage == 2:
        return {k: params[k] for k in stage2.trainable(config)}
    if stage == 3:
        return stage3._trained(params, config)
    return params


# The stage-2 path in the order data flows through it: a frozen prefix of it (no trained group at
# or before it) needs no backward pass, since nothing before it takes a gradient.
_PATH = ("motion_encoder", "quantize", "retargeter", "joint_head", "joint_decoder")


def backward_groups(params: dict, trained: dict) -> set:
    """Top-level param groups the backward pass runs through: those of `_PATH` from its first
    trained group on, and every group outside it (the DiT, the expression encoder, stage 1's
    decoders)."""
    out, reached = set(params) - set(_PATH), False
    for group in _PATH:
        reached = reached or group in trained
        if reached and group in params:
            out.add(group)
    return out


def ideal_collectives(config, stage: int, state, mesh, args) -> dict:
    """Bytes per device per step that ideal ZeRO-3 / data / tensor / context parallelism moves.

    Parameters (exact, from their shardings; n = group size, shard = the device's slice):
      all-gather      each fsdp-sharded param twice (forward, and again in the backward pass),
                      once where the backward pass skips its group (backward_groups: e.g. a
                      frozen motion encoder): 2 shard (F - 1) or shard (F - 1);
      reduce-scatter  each trained fsdp-sharded gradient over fsdp: shard (F - 1);
      all-reduce      each trained gradient over the batch/sequence axes (data, fsdp, context)
                      that do not shard it: 2 shard (n - 1) / n.
    Activations of the two big transformers (A = one device's [B/(data fsdp), L/context, width]
    in the compute dtype, K = its k (or v) [B/(data fsdp), L/context, width/tensor]):
      all-reduce      tensor (Megatron): per block the outputs of its attention(s) and MLP forward
                      and their input gradients backward, 2 A (T - 1) / T each: 4 per block of
                      the motion encoder (every stage; T frames x its tokens; 2 where the
                      backward pass skips it), 6 per DiT block
                      (stage 3: self- and cross-attention, FFN);
      all-gather      context (stage 3): the DiT's k and v gathered over the sequence,
                      2 K (C - 1) per block;
      reduce-scatter  context (stage 3): their gradients, 2 K (C - 1) per block.
    The smaller transformers (motion decoder, retargeter, joint head, expression encoder) are
    left out.
    """
    m = dict(mesh.shape)
    out = dict.fromkeys(KINDS, 0.0)
    trained_groups = trained_params(config, stage, state.params)
    trained = {id(x) for x in jax.tree.leaves(trained_groups)}
    backward = backward_groups(state.params, trained_groups)
    for group, x in ((g, x) for g, tree in state.params.items() for x in jax.tree.leaves(tree)):
        axes, shard = _axes(x), _shard_bytes(x)
        if "fsdp" in axes and m["fsdp"] > 1:
            out["all-gather"] += (2 if group in backward else 1) * shard * (m["fsdp"] - 1)
        if id(x) not in trained:
            continue
        if "fsdp" in axes:
            out["reduce-scatter"] += shard * (m["fsdp"] - 1)
        n = math.prod(m[a] for a in ("data", "fsdp", "context") if a not in axes)
        out["all-reduce"] += 2 * shard * (n - 1) / n
    c, tp, isz = m["context"], m["tensor"], jnp.dtype(config.model.dtype).itemsize
    per_device = args[1][next(iter(args[1]))].shape[0] // (m["data"] * m["fsdp"])
    frames = args[1][next(iter(args[1]))].shape[1]
    mt = config.model.motion_tokenizer
    tokens = (mt.image_size // mt.patch_size) ** 2 + 1 + mt.num_latent_tokens
    act = per_device * frames * math.ceil(tokens / c) * mt.width * isz
    per_block = 4 if "motion_encoder" in backward else 2
    out["all-reduce"] += mt.depth * per_block * 2 * act * (tp - 1) / tp
    if stage == 3:  # args = (state, batch, z_ref, x0 [B, F, h, w, z])
        d = config.model.dit
        f, h, w = args[3].shape[1:4]
        tokens = (1 + f) * (h // d.patch_size[1]) * (w // d.patch_size[2])
        act = per_device * math.ceil(tokens / c) * d.dim * isz
        out["all-gather"] += d.num_layers * 2 * act / tp * (c - 1)
        out["reduce-scatter"] += d.num_layers * 2 * act / tp * (c - 1)
        out["all-reduce"] += d.num_layers * 6 * 2 * act * (tp - 1) / tp
    return out


# ------------------------------------------------------------------ the plan

def plan(config, stage: int, mesh, device_gib: float) -> dict:
    """Compiles the step of `stage` for `mesh` abstractly; -> the figures (see module doc)."""
    rules = sharding.rules(config.mesh)
    t0 = time.perf_counter()
    step, args = stage_step(config, stage, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):  # as the trainers' run_step
        lowered = step.lower(*args)
        flops, unknown_loops = step_flops(step, *args)
    state, batch = args[:2]
    t_lower = time.perf_counter() - t0
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t0 - t_lower
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    n = mesh.size
    params = sum(_shard_bytes(x) for x in jax.tree.leaves(state.params))
    opt = sum(_shard_bytes(x) for x in jax.tree.leaves(state.opt_state))
    total_params = sum(_leaf_bytes(x) for x in jax.tree.leaves(state.params))
    total_opt = sum(_leaf_bytes(x) for x in jax.tree.leaves(state.opt_state))
    split = mesh.shape["fsdp"] * mesh.shape["tensor"]
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes)
    coll = collective_bytes(compiled.as_text(), n)
    ideal = ideal_collectives(config, stage, state, mesh, args)
    measured_total = sum(coll[k]["bytes"] for k in KINDS)
    ideal_total = sum(ideal.values())
    return {
        "stage": stage, "mesh": dict(mesh.shape), "devices": n,
        "batch": int(jax.tree.leaves(batch)[0].shape[0]),
        "params_count": sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
        "params_gib": params / GIB, "params_ideal_gib": total_params / split / GIB,
        "opt_state_gib": opt / GIB, "opt_state_ideal_gib": total_opt / split / GIB,
        "arguments_gib": mem.argument_size_in_bytes / GIB,
        "outputs_gib": mem.output_size_in_bytes / GIB,
        "donated_alias_gib": mem.alias_size_in_bytes / GIB,
        "temps_gib": mem.temp_size_in_bytes / GIB,
        "peak_gib": peak / GIB, "device_gib": device_gib,
        "fits": bool(peak <= device_gib * GIB), "margin_gib": device_gib - peak / GIB,
        "flops_per_step": flops, "flops_per_device": flops / n,
        "flops_unknown_loops": unknown_loops,
        "xla_cost_flops_per_device": float(cost.get("flops", float("nan"))),
        "collective_gib": {k: coll[k]["bytes"] / GIB for k in KINDS},
        "collective_ops": {k: coll[k]["ops"] for k in KINDS},
        "collectives_by_scope": [  # the largest 12: [kind, group size, model scope, GiB]
            [kind, size, where, b / GIB] for (kind, size, where), b
            in sorted(coll["by_scope"].items(), key=lambda kv: -kv[1])[:12]],
        "ideal_collective_gib": {k: v / GIB for k, v in ideal.items()},
        "collective_ratio": measured_total / ideal_total if ideal_total else float("nan"),
        # XLA:CPU has no reduce-scatter: it all-reduces the gradients and slices (2x the bytes).
        "collective_ratio_reduce_scatter_as_all_reduce": (
            (measured_total - _gradient_all_reduce(coll, mesh) / 2) / ideal_total
            if ideal_total and not coll["reduce-scatter"]["ops"] else None),
        "unknown_trip_counts": coll["unknown_trip_counts"],
        "lower_s": t_lower, "compile_s": t_compile,
    }


def _gradient_all_reduce(coll: dict, mesh) -> float:
    """Bytes of the all-reduces that reduce over the batch (their groups are not a tensor /
    context group, whose all-reduces are Megatron's and stay): the gradient reductions a GPU/TPU
    compile emits as reduce-scatters. A batch group the size of a model group counts as model."""
    m = dict(mesh.shape)
    model_sizes = {m["tensor"], m["context"], m["tensor"] * m["context"]}
    return sum(b for (kind, n, _), b in coll["by_scope"].items()
               if kind == "all-reduce" and n not in model_sizes)


def report(r: dict) -> str:
    """Human-readable lines of plan()'s figures."""
    mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
    lines = [f"stage {r['stage']} on {r['devices']} devices ({mesh}), batch {r['batch']}, "
             f"{r['params_count'] / 1e9:.3f}B params; compiled in {r['compile_s']:.0f} s "
             f"(lowered in {r['lower_s']:.0f} s)",
             f"  per device        {'GiB':>10} {'ideal':>10}",
             f"  params            {r['params_gib']:10.3f} {r['params_ideal_gib']:10.3f}",
             f"  optimizer state   {r['opt_state_gib']:10.3f} {r['opt_state_ideal_gib']:10.3f}",
             f"  arguments         {r['arguments_gib']:10.3f}",
             f"  outputs           {r['outputs_gib']:10.3f} (donated: {r['donated_alias_gib']:.3f})",
             f"  temps/activations {r['temps_gib']:10.3f}",
             f"  peak              {r['peak_gib']:10.3f}",
             f"  FLOPs per step    {r['flops_per_step']:.4g} ({r['flops_per_device']:.4g} "
             f"per device; matmuls + convolutions of the jaxpr"
             + (f", {r['flops_unknown_loops']} while loops counted once" if
                r["flops_unknown_loops"] else "") + ")",
             f"  collectives       {'GiB sent':>10} {'ideal':>10} {'ops':>8}"]
    for k in KINDS:
        lines.append(f"  {k:<17} {r['collective_gib'][k]:10.3f} "
                     f"{r['ideal_collective_gib'][k]:10.3f} {r['collective_ops'][k]:8d}")
    ratio = r["collective_ratio"]
    lines.append("  total / ideal     " + (f"{ratio:.2f}x" if ratio == ratio else "- (none ideal)")
                 + (f" ({r['unknown_trip_counts']} loops of unknown trip count counted once)"
                    if r["unknown_trip_counts"] else ""))
    if r["collective_ratio_reduce_scatter_as_all_reduce"] is not None:
        lines.append(f"  no reduce-scatter emitted (XLA:CPU all-reduces the gradients, then "
                     f"slices): with those at half, "
                     f"{r['collective_ratio_reduce_scatter_as_all_reduce']:.2f}x")
    if r["collectives_by_scope"]:
        lines.append("  largest collectives by model scope (GiB sent, kind over a group of n):")
        lines += [f"    {gib:10.3f}  {kind} over {size:<4d} {where}"
                  for kind, size, where, gib in r["collectives_by_scope"]]
    verdict = "yes" if r["fits"] else "no"
    lines.append(f"fits on {r['devices']} x {r['device_gib']:g} GiB: {verdict} "
                 f"(margin {r['margin_gib']:+.2f} GiB per device)")
    return "\n".join(lines)


def configure(config, stage: int, mesh_text: str, frames: int | None, height: int | None,
              width: int | None, batch: int | None):
    """A copy of `config` with the mesh and the clip of `stage` set; -> (config, mesh sizes).
    ValueError (one line) for a bad --mesh or a size this code cannot train."""
    if stage not in (1, 2, 3):
        raise ValueError(f"--stage must be 1, 2 or 3, got {stage}")
    sizes = sharding.parse_mesh(mesh_text)
    if -1 in sizes.values():
        raise ValueError(f"--mesh {mesh_text!r}: give every size (no -1): the planner simulates "
                         f"exactly that many devices")
    config = config.copy_and_resolve_references()
    config.mesh.shape.update(sizes)
    cfg = config[f"stage{stage}"]
    for flag, value in (("--frames", frames), ("--batch", batch)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: must be a positive integer")
    if frames is not None:
        cfg.clip_frames = frames
    if batch is not None:
        cfg.batch_size = batch
    if height is not None or width is not None:
        if stage == 1:
            raise ValueError("--height/--width size the reference and generated clip of stages 2 "
                             "and 3; stage 1 reads driving frames at model.motion_tokenizer."
                             "image_size (--config.model.motion_tokenizer.image_size=N)")
        height, width = (height if height is not None else width,
                         width if width is not None else height)
        if min(height, width) <= 0:
            raise ValueError(f"--height {height} --width {width}: sizes must be positive")
        config.model.video_size = (height, width)
        from im_anim_jax.training import vae as vae_training
        vae_training.check_reference_size(config)
    return config, sizes


def main(argv, flags_values):
    """The CLI (see the module doc): one report and a final JSON line."""
    from im_anim_jax import cli
    f = flags_values
    config = cli.load_config(f)
    config, sizes = configure(config, f.stage, f.mesh, f.frames, f.height, f.width, f.batch)
    n = math.prod(sizes.values())
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)
    if jax.device_count() != n:
        raise ValueError(f"--mesh {f.mesh!r} needs {n} simulated devices but jax has "
                         f"{jax.device_count()} (XLA_FLAGS forcing another host device count?)")
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:n])
    r = plan(config, f.stage, mesh, f.device_gib)
    print(report(r))
    print(json.dumps(r))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    from im_anim_jax import cli
    config_flags.DEFINE_config_file("config", None, "Config file (file.py:variant).",
                                    lock_config=True)
    flags.DEFINE_string("mesh", None, "Mesh sizes, e.g. fsdp=16,tensor=4 (others 1).")
    flags.DEFINE_integer("stage", 3, "Stage whose training step is planned: 1, 2 or 3.")
    flags.DEFINE_integer("frames", None, "Clip frames (default stage<N>.clip_frames).")
    flags.DEFINE_integer("height", None, "Reference / generated frame height, stages 2-3 "
                         "(default model.video_size; driving frames stay at "
                         "model.motion_tokenizer.image_size).")
    flags.DEFINE_integer("width", None, "Reference / generated frame width (default: --height).")
    flags.DEFINE_integer("batch", None, "Global batch (default stage<N>.batch_size).")
    flags.DEFINE_float("device_gib", 80.0, "Memory of one device, GiB (the fit verdict).")
    flags.mark_flags_as_required(["config", "mesh"])
    app.run(lambda argv: cli.user_errors(lambda a: main(a, flags.FLAGS))(argv),
            flags_parser=cli.parse_flags)
