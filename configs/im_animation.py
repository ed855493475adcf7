"""IM-Animation configs. Variants: `paper` (sizes and schedules of the paper), `demo` (CPU, minutes),
`tiny` (tests, seconds).

  python train.py --config configs/im_animation.py:paper --workdir W
  python train.py --config configs/im_animation.py:demo --workdir W --config.stage1.lr=3e-4
Every field can be overridden with --config.<path>=<value>.
"""
import ml_collections

VARIANTS = ("paper", "demo", "tiny")

# Logical axis -> mesh axis. Params are sharded ZeRO-3 style over `fsdp` and by heads/mlp over
# `tensor`; activations carry the batch over (data, fsdp) and long sequences over `context`.
MESH_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("act_frames", None),
    ("act_length", "context"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("layers", None),
    ("layer_groups", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("head_dim", None),
    ("joints", None),
    ("codebook", None),
    ("conv_in", None),
    # Conv channels stay replicated: XLA's partitioner (Shardy, jax 0.10) computes wrong joint
    # decoder heatmaps (max error 0.84) when they are split over tensor on a mesh with context > 1
    # (tests/test_sharding_equivalence.py).
    ("conv_out", None),
)


def get_config(variant: str = "demo") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"unknown config variant {variant!r}; choose one of {VARIANTS}")
    c = ml_collections.ConfigDict()
    c.variant = variant
    c.seed = 0
    c.stages = (1, 2, 3)

    # ---- data: the synthetic character set unless data.path points at an ingested dataset ----
    c.data = ml_collections.ConfigDict()
    c.data.path = ""  # empty: WORKDIR/data/synthetic, generated on first use
    c.data.synthetic = ml_collections.ConfigDict(dict(
        seed=0, num_train_identities=48, num_heldout_identities=8, num_train_motions=16,
        num_heldout_motions=4, clip_frames=81, image_size=256, shards_per_split=16,
        # 0: every train identity performs every train motion; k > 0: k motions each (more
        # motions at the same clip count; synthetic.motion_assignment).
        motions_per_identity=0))
    c.data.heatmap_sigma = 2.0       # in heatmap pixels
    c.data.conf_threshold = 0.3      # joints below it get zero heatmap weight
    c.data.num_workers = 0           # grain worker processes (0: in the training process)
    c.data.render_workers = 0        # processes rendering the synthetic set (0: one per core)
    c.data.read_threads = 2

    # ---- model ----
    c.model = ml_collections.ConfigDict()
    c.model.dtype = "float32"        # compute dtype; params are float32
    c.model.attention_impl = "auto"  # xla | cudnn | auto (cuDNN flash on GPU in half precision)
    c.model.remat_policy = "none"    # none | full | dots | dots_no_batch
    c.model.motion_tokenizer = ml_collections.ConfigDict(dict(
        image_size=256, patch_size=16, width=1024, depth=24, num_heads=16, num_latent_tokens=32,
        token_size=12, is_legacy=True,  # TiTok-L-32 (its released checkpoint is legacy)
        stem_channels=(), stem_blocks=2,  # () = TiTok's patch embedding; see MotionTokenizer
        # Training aid (stage 1): a linear head on the encoder's patch tokens predicting heatmaps,
        # its loss weighted by stage1.patch_heatmap_weight; TiTok discards those outputs.
        patch_heatmap_head=False))
    # Dead-code restart (training only): a code whose usage EMA (per batch) falls below the
    # threshold is re-seeded from this batch's encoder outputs; 0 disables it.
    c.model.quantizer = ml_collections.ConfigDict(dict(
        codebook_size=4096, commitment_cost=0.25, use_l2_norm=True,
        restart_decay=0.99, restart_threshold=0.01))
    c.model.motion_decoder = ml_collections.ConfigDict(dict(width=512, depth=8, num_heads=8))
    c.model.joint_decoder = ml_collections.ConfigDict(dict(
        num_joints=62, heatmap_size=64, channels=(256, 128, 64, 32)))

    # Stage 2 (paper sec. 3.2): which motion encoder feeds the retargeter ("tokenizer": the 1D
    # motion tokenizer + quantizer of stage 1; "conv": the plain convolutional baseline, Table 2
    # exp. A, trained from scratch in stage 2), the retargeter ("mask_token" | "self_attention",
    # Table 6) and the head reading joint tokens from M_ret for the stage-1 joint decoder.
    c.model.motion_encoder = "tokenizer"
    c.model.conv_motion_encoder = ml_collections.ConfigDict(dict(
        channels=(64, 128, 256, 512), features=512))
    # reference_patch: latent pixels per reference token side (2: the DiT's patch tokens).
    c.model.retargeter = ml_collections.ConfigDict(dict(
        mode="mask_token", output_frames="latent", width=1024, depth=8, num_heads=16,
        out_dim=192, reference_patch=2))
    c.model.joint_head = ml_collections.ConfigDict(dict(width=512, depth=2, num_heads=8))
    # The `pose_indicator` baseline (Animate-X's Implicit Pose Indicator, models/pose_indicator.py):
    # per frame, one query per driving keypoint (keypoint transformer + learnable query) cross-
    # attends `depth` times to CLIP ViT features of the frame. The CLIP sizes are CLIP-H/14 (the
    # SD 2.1 image encoder Animate-X uses); clip.init_from: a converted Hugging Face
    # CLIPVisionModel (`python -m im_anim_jax.convert clip-vit`), else trained from scratch.
    # conf_threshold: keypoints below it are invisible to the query (as data.conf_threshold).
    c.model.pose_indicator = ml_collections.ConfigDict(dict(
        width=1024, depth=4, num_heads=16, keypoint_depth=2, conf_threshold=0.3,
        clip=ml_collections.ConfigDict(dict(
            image_size=224, patch_size=14, width=1280, depth=32, num_heads=16, mlp_dim=5120,
            hidden_act="gelu", init_from=""))))

    # (H, W) of the reference image and the generated clip (stages 2-3: the VAE's and DiT's
    # grids); (0, 0): model.motion_tokenizer.image_size square, the driving frames' size. The
    # planner's --height/--width set it (Wan2.2 generates 704x1280). Training reads references
    # and targets at the clips' own square size, so it refuses any other value for now.
    c.model.video_size = (0, 0)
    c.model.vae = wan_vae("wan2_2")
    c.model.dit = wan_dit("wan2_2_ti2v_5b")
    # True: the reference latent z_ref also joins the control channels of every generated latent
    # frame (zero-initialised like M_ret's). Not in the paper, whose pretrained TI2V DiT already
    # carries the first latent frame's appearance forward; a DiT trained from scratch learns that
    # slowly through attention (the demo; docs/experiments.md, stage 3).
    c.model.reference_control = False
    # What the DiT's output means: "velocity" (Wan2.2's, eps - x0), "x0" (the clean latent,
    # turned into the velocity (x_t - x0) / max(sigma, 0.05) for the loss and the sampler) or
    # "x0_residual" (x0 = z_ref + the output: a fresh zero-init head predicts the still reference).
    c.model.dit_prediction = "velocity"
    # Stage 3 expression branch: a compact ViT maps each driving frame's face crop to `num_tokens`
    # expression tokens; an ExpressionBlock (frame-wise cross-attention, zero-initialised output)
    # follows every `every` DiT blocks.
    c.model.expression = ml_collections.ConfigDict(dict(
        every=6, crop_size=64, patch_size=8, num_tokens=8, width=384, depth=4, num_heads=6,
        out_dim=512))
    # Text conditioning: a precomputed prompt embedding, [L, text_dim] float32 in a .npy file or
    # under the key "context" of a .safetensors file (e.g. umT5-XXL outputs cut to the prompt's
    # length); empty: a fixed seeded embedding standing in for one prompt (the synthetic data
    # has one caption). `negative_embedding` (same format): the unconditional branch of
    # classifier-free guidance, as Wan2.2 samples with its encoded negative prompt; empty: zeros,
    # the null context that stage 3's text dropout trains.
    c.text = ml_collections.ConfigDict(dict(embedding="", negative_embedding="", fixed_length=8,
                                            fixed_seed=0))

    # ---- stages (paper sec. 4.1 / supplement sec. 6) ----
    c.stage1 = ml_collections.ConfigDict(dict(
        steps=5000, lr=1e-4, schedule="constant", warmup_steps=500, weight_decay=0.01, grad_clip=1.0,
        batch_size=16, clip_frames=1, vq_loss_weight=1.0, patch_heatmap_weight=0.0,
        # Training aid (0: the paper's MSE alone): this weight times the decoded heatmaps'
        # spatial cross-entropy against the normalised target (softmax of heatmap / temperature).
        heatmap_ce_weight=0.0, heatmap_ce_temperature=0.1,
        log_every=50, checkpoint_every=500,
        # A converted TiTok checkpoint (python -m im_anim_jax.convert titok ...) whose encoder and
        # codebook initialise the motion encoder and quantizer (the paper fine-tunes TiTok-L-32).
        init_from="",
        # Colour jitter + crop / scale / pad of each clip, keypoints moved with it.
        augment=augmentation(False)))
    # The reference encoder: without model.vae.init_from (a converted Wan2.2 VAE), the configured
    # VAE is first trained on the run's frames (reconstruction + KL) into WORKDIR/vae.
    # Single frames (batch_size of them) for the first image_steps, then random windows of
    # clip_frames = 1 + 4k frames (clip_batch_size of them): stage 3 encodes and decodes whole
    # clips, so the VAE's temporal path must learn, not only its first-frame path.
    c.vae_training = ml_collections.ConfigDict(dict(
        steps=20000, lr=1e-4, schedule="constant", warmup_steps=500, weight_decay=0.0,
        grad_clip=1.0, batch_size=16, image_steps=0, clip_frames=17, clip_batch_size=16,
        kl_weight=1e-6, log_every=50, checkpoint_every=1000))
    c.stage2 = ml_collections.ConfigDict(dict(
        steps=10000, lr=1e-4, schedule="constant", warmup_steps=500, weight_decay=0.01,
        grad_clip=1.0, batch_size=16, clip_frames=81, vq_loss_weight=1.0,
        # Pairs: per driving clip, `partners_per_clip` other identities performing the same motion
        # (target = their keypoints) plus, with self_pairs, the driving identity itself (target =
        # its own, un-augmented clip: the crop/scale/pad supervision of the paper).
        partners_per_clip=1, self_pairs=True,
        # The first self_pair_steps steps train on the self pairs alone, un-augmented (target =
        # the driving pose), then on every pair with `augment` (a demo-budget aid; README,
        # stage 2, "A reading phase").
        self_pair_steps=0,
        augment=augmentation(True),
        # False: the `no_middle_supervision` ablation (M_ret gets no heatmap signal; see README).
        middle_supervision=True,
        # False: the motion encoder keeps its stage-1 weights (the paper trains it in stage 2).
        train_motion_encoder=True,
        # Ablations trained after the main model, each into WORKDIR/stage2_<name>.
        baselines=("self_attention", "conv", "no_middle_supervision", "pose_indicator"),
        # Animate-X's Explicit Pose Indicator on the driving keypoints of the `pose_indicator`
        # baseline (data_pipelines/epi.py): with probability `prob` (the paper: over 98%) the pose
        # is realigned to an anchor clip of the pose pool (`pool_size` training clips, every
        # `pool_stride`-th frame; added parts play the anchor frame by frame, so a stride k plays
        # them k times fast), then each rescale group is rescaled with probability
        # `rescale_prob` (factor log-uniform in [1/m, m], m = max_factor), each removable part
        # the driving pose lacks added from the anchor with probability `add_prob`, and each
        # other one dropped with probability `drop_prob`.
        epi=ml_collections.ConfigDict(dict(
            prob=0.99, pool_size=256, pool_stride=1, rescale_prob=0.5, max_factor=1.3,
            drop_prob=0.1, add_prob=0.1)),
        log_every=50, checkpoint_every=1000))
    # Stage 3: everything end to end (DiT 1e-5, the rest 5e-5), flow matching + 10 x the
    # retarget heatmap loss on stage-2 pairs (target = the reference identity's video). The DiT
    # starts from model.dit.init_from (a converted Wan2.2 TI2V-5B) or, without it, from scratch.
    # With probability `context_prob` the first latent frames of the target (those of
    # sampling.overlap_frames video frames) are held clean, as the next window of a long video
    # sees them (see generation.py).
    c.stage3 = ml_collections.ConfigDict(dict(
        steps=30000, lr_dit=1e-5, lr_other=5e-5, schedule="constant", warmup_steps=500,
        weight_decay=0.01, grad_clip=1.0, batch_size=16, clip_frames=81,
        retarget_loss_weight=10.0, vq_loss_weight=1.0, timestep_shift=5.0, text_dropout=0.1,
        context_prob=0.3, ema_decay=0.0, partners_per_clip=1, self_pairs=True,
        # "velocity": Wan2.2's flow loss; "x0": each sample's error times sigma^2, the error of
        # the clean latent it implies (every noise level alike).
        loss_weighting="velocity",
        augment=augmentation(True), log_every=50, checkpoint_every=1000,
        # Param groups kept fixed besides the quantizer's codebook (the paper trains all parts):
        # ("motion_encoder",) keeps the stage-1/2 motion encoder (as stage2.train_motion_encoder).
        frozen=()))
    # Generation (Wan2.2 TI2V defaults: UniPC, 50 steps, shift 5, guidance 5). Long videos are
    # made in windows of stage3.clip_frames; the last `overlap_frames` (1 + 4j) generated frames
    # start the next window.
    c.sampling = ml_collections.ConfigDict(dict(
        method="unipc", steps=50, shift=5.0, guidance=5.0, overlap_frames=5, seed=0))

    # ---- sharding (mesh axes: data, fsdp, context, tensor; one size may be -1 = the rest) ----
    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = ml_collections.ConfigDict(dict(data=-1, fsdp=1, context=1, tensor=1))
    c.mesh.rules = MESH_RULES

    c.checkpoint = ml_collections.ConfigDict(dict(max_to_keep=2, async_save=True,
                                                  allow_config_change=False))
    # Faults (every stage): a step with a non-finite loss or gradient leaves params and optimizer
    # state as they were and is counted; `max_nonfinite_in_a_row` such steps stop the stage (exit
    # 4) without a new checkpoint. Training records that cannot be decoded or have wrong shapes
    # are skipped, counted and logged; more than `max_bad_records` in a stage abort it (exit 2).
    # inject_nan_steps: steps (1-based, per stage) whose loss is made NaN, to exercise the guard.
    c.faults = ml_collections.ConfigDict(dict(
        max_nonfinite_in_a_row=10, max_bad_records=100, inject_nan_steps=()))
    # stage3_pairs: the paper's cross-reenactment benchmark has 50 pairs. metric_weights: the
    # directories of the converted metric networks (`python -m im_anim_jax.convert {inception,
    # i3d,lpips}`); an empty one reports its metric (FID, FVD, LPIPS) as "not computed: ...".
    # fvd_frames: frames per FVD clip; metric_batch: frames per metric-network call;
    # lpips_rescale=False feeds LPIPS [0, 1] pixels as DisCo's scripts do (True: the lpips
    # package's intended [-1, 1]).
    c.eval = ml_collections.ConfigDict(dict(
        split="test", pck_thresholds=(0.05, 0.1), subpixel=True, batch_size=8, num_vis_frames=4,
        pair_seed=1234, stage3_pairs=50,
        metric_weights=ml_collections.ConfigDict(dict(inception="", i3d="", lpips="")),
        fvd_frames=16, metric_batch=16, lpips_rescale=False))

    if variant in ("demo", "tiny"):
        _small(c, variant)
    return c


def augmentation(enabled: bool) -> ml_collections.ConfigDict:
    """Clip augmentation (data_pipelines/augment.py: ClipAugment): zoom range, shift (fraction of
    the frame), colour jitter strengths, left-right mirror probability (stage 1 only: stages 2
    and 3 supervise with the unmirrored clip)."""
    return ml_collections.ConfigDict(dict(
        enabled=enabled, scale=(0.75, 1.25), shift=0.15, brightness=0.2, contrast=0.2,
        saturation=0.2, hue=0.05, flip=0.0))


def wan_dit(preset: str) -> ml_collections.ConfigDict:
    """Wan2.2 DiT sizes. `wan2_2_ti2v_5b`: the released TI2V-5B (4,999,787,712 params);
    `demo`/`tiny`: the same structure at CPU sizes. RoPE splits the c = head_dim/2 rotation pairs
    over (t, h, w) as (c - 2 (c // 3), c // 3, c // 3): 22/21/21 at head_dim 128 (5B), 6/5/5 at
    32 (demo), 4/4/4 at 24 (tiny)."""
    presets = {
        "wan2_2_ti2v_5b": dict(dim=3072, ffn_dim=14336, num_layers=30, num_heads=24,
                               text_dim=4096, text_len=512, freq_dim=256),
        "demo": dict(dim=128, ffn_dim=256, num_layers=4, num_heads=4,
                     text_dim=32, text_len=16, freq_dim=32),
        "tiny": dict(dim=48, ffn_dim=96, num_layers=2, num_heads=2,
                     text_dim=16, text_len=8, freq_dim=16),
    }
    if preset not in presets:
        raise ValueError(f"unknown DiT preset {preset!r}; choose one of {sorted(presets)}")
    return ml_collections.ConfigDict(dict(
        preset=preset, in_dim=48, out_dim=48, patch_size=(1, 2, 2), eps=1e-6,
        cross_attn_norm=True, init_from="", **presets[preset]))


def wan_vae(preset: str) -> ml_collections.ConfigDict:
    """Wan2.2 VAE sizes (z 48, 4x temporal compression). `wan2_2`: the released VAE (16x spatial);
    `tiny`: its structure (levels, causal convs, resampling) at CPU widths; `demo`: the same blocks
    with one spatial level fewer (8x): at 64x64 the 16x VAE left 4x4 latents (a 2x2 DiT grid) and
    reconstructed held-out frames at 21.5 dB, clip frames at 19.7; at 8x (1.04M params, not 3.92M),
    24.7 and 21.7 after the same steps (docs/experiments.md, stage 3)."""
    wan = dict(dim_mult=(1, 2, 4, 4), temporal_downsample=(False, True, True))
    presets = {
        "wan2_2": dict(dim=160, dec_dim=256, **wan),
        "demo": dict(dim=16, dec_dim=16, dim_mult=(1, 2, 2), temporal_downsample=(True, True)),
        "tiny": dict(dim=8, dec_dim=8, **wan),
    }
    if preset not in presets:
        raise ValueError(f"unknown VAE preset {preset!r}; choose one of {sorted(presets)}")
    # initial_logvar: the posterior's log-variance at init, for training from scratch (a converted
    # VAE brings its own). With upstream's 0 (unit noise on the latents at first) the demo VAE
    # trained to 22.6 dB in its 1400 frame steps; from -8, where the tiny KL weight lets it end
    # anyway, to 23.7 (docs/experiments.md, stage 3).
    return ml_collections.ConfigDict(dict(
        preset=preset, z_dim=48, num_res_blocks=2, patch_size=2, init_from="",
        initial_logvar=-8.0, **presets[preset]))


def _small(c, variant):
    """CPU-sized variants: same structure, small widths and a small synthetic set."""
    demo = variant == "demo"
    c.model.attention_impl = "xla"
    c.model.motion_tokenizer.update(dict(
        image_size=64 if demo else 32, patch_size=8, width=128 if demo else 32,
        depth=4 if demo else 1, num_heads=4 if demo else 2,
        num_latent_tokens=32 if demo else 8, is_legacy=False,
        # From scratch, the plain ViT does not learn to localise joints within the demo's budget
        # (docs/experiments.md, stage 1): the demo adds a conv stem and the patch heatmap head.
        # One residual block per stem stage (not 2): 0.815 vs 0.813 held out at 1100 steps, 12%
        # less time.
        stem_channels=(32, 64) if demo else (), stem_blocks=1, patch_heatmap_head=demo))
    # The demo's 4096 codes are the paper's: with 1024 (perplexity ~665 held out, ~9.4 bits per
    # token) the 32 tokens lose what the encoder's patch tokens still hold (docs/experiments.md,
    # stage 1).
    c.model.quantizer.update(dict(codebook_size=4096 if demo else 64, restart_decay=0.9,
                                  restart_threshold=0.03))
    c.model.motion_decoder.update(dict(width=128 if demo else 32, depth=2 if demo else 1,
                                       num_heads=4 if demo else 2))
    # Heatmaps at 1/4 of the frame size, as in SimpleBaseline/HRNet. Per-joint conv stacks are
    # memory-bound on CPU (channels (64, 32, 16) at 32x32: 6.6 s per 16-frame step); the light
    # decoder leaves the spatial work to the token -> grid linear map (whole step: 0.56 s).
    c.model.joint_decoder.update(dict(heatmap_size=16, channels=(8, 4)))
    c.model.conv_motion_encoder.update(dict(channels=(32, 64, 128) if demo else (8, 16),
                                            features=128 if demo else 32))
    c.model.retargeter.update(dict(width=128 if demo else 32, depth=2 if demo else 1,
                                   num_heads=4 if demo else 2, out_dim=128 if demo else 32))
    c.model.joint_head.update(dict(width=128 if demo else 32, depth=1, num_heads=4 if demo else 2))
    c.model.pose_indicator.update(dict(
        width=128 if demo else 32, depth=2 if demo else 1, num_heads=4 if demo else 2,
        keypoint_depth=1))
    c.model.pose_indicator.clip.update(dict(
        image_size=c.model.motion_tokenizer.image_size, patch_size=8, width=128 if demo else 32,
        depth=2 if demo else 1, num_heads=4 if demo else 2, mlp_dim=512 if demo else 64))
    c.model.vae = wan_vae(variant)
    c.model.dit = wan_dit(variant)
    # 2000 steps: after 400 the demo VAE sat on a plateau (16.9 dB PSNR) where it was colour-blind
    # (red, green and blue frames encoded alike and decoded to one grey); the plateau breaks after
    # ~600 steps (README, stage 2: reference tokens). The last 600 steps train on clips: on
    # single frames alone, held-out clips came back at 14.7 dB after frame 0. The demo's are
    # stage 3's 17 frames: trained on 5, each later 4-frame chunk of a 17-frame clip came back
    # worse (frames 1-4 24.1 dB, 13-16 19.3; frames 1-16 21.48 dB against 23.25 now; README).
    c.vae_training.update(dict(steps=2000 if demo else 6, lr=1e-3, schedule="cosine",
                               warmup_steps=20 if demo else 2, batch_size=16 if demo else 2,
                               image_steps=1400 if demo else 3, clip_frames=17 if demo else 5,
                               clip_batch_size=2,
                               log_every=100 if demo else 3, checkpoint_every=500 if demo else 3))
    c.data.heatmap_sigma = 1.5
    c.data.render_workers = 0 if demo else 1   # tiny sets render in a blink: no process start-up
    # The demo's 2560 train clips: 256 identities x 10 of 160 motions, not x the same 10. With
    # 10 motions stage 2 saw 170 distinct poses and fitted them (train PCK 0.63, held-out
    # cross_pck@0.1 0.515 without augmentation); with 160, 0.540 at 400 steps, 0.05 under
    # explicit_realign where it was 0.12 under (docs/experiments.md, stage 2). Stage 1: 0.800
    # held out.
    c.data.synthetic.update(dict(
        image_size=c.model.motion_tokenizer.image_size, shards_per_split=2 if demo else 1,
        num_train_identities=256 if demo else 6, num_heldout_identities=8 if demo else 2,
        num_train_motions=160 if demo else 3, num_heldout_motions=4 if demo else 2,
        motions_per_identity=10 if demo else 0, clip_frames=17 if demo else 5))
    # Trained from scratch (the paper fine-tunes pretrained TiTok at 1e-4): a higher peak rate
    # with cosine decay reaches the best pose accuracy within the CPU budget.
    # The heatmap cross-entropy beside the MSE: held-out pck@0.1 0.803 after 900 steps, against
    # 0.800 after 1100 without it (docs/experiments.md, stage 1).
    c.stage1.update(dict(steps=900 if demo else 120, lr=2e-3 if demo else 1e-3, schedule="cosine",
                         heatmap_ce_weight=1.0 if demo else 0.0,
                         warmup_steps=50 if demo else 10, patch_heatmap_weight=1.0 if demo else 0.0,
                         batch_size=16 if demo else 4, log_every=50 if demo else 5,
                         checkpoint_every=300 if demo else 10))
    # The demo's stage 1 mirrors half of its clips (no zoom, shift or colour jitter): held-out
    # pck@0.1 0.778 vs 0.712 without at 900 steps (docs/experiments.md, stage 1).
    if demo:
        c.stage1.augment.update(dict(enabled=True, flip=0.5, scale=(1.0, 1.0), shift=0.0,
                                     brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0))
    # The first 150 steps on the self pairs alone, un-augmented: the retargeter learns to read
    # the motion (train PCK 0.74 after 400 such steps), which it does not on the full task within
    # the demo's steps: cross_pck@0.1 0.553 / 0.537 against 0.511 / 0.495 in seeds 0 / 1, and
    # the output follows the driving clip three times as much (docs/experiments.md, stage 2).
    c.stage2.update(dict(steps=400 if demo else 6, lr=5e-4 if demo else 1e-3, schedule="cosine",
                         warmup_steps=20 if demo else 2, batch_size=8 if demo else 2,
                         clip_frames=5, log_every=50 if demo else 3,
                         checkpoint_every=200 if demo else 3, self_pair_steps=150 if demo else 0))
    # The demo keeps the stage-1 motion encoder: trained here (the paper's setting) its tokens
    # collapse (codebook perplexity 57 of 4096 at step 400) and the output ignores the motion
    # (cross_pck@0.1 0.488, driving_pose_follow 0.000); kept, 0.514 and 0.20
    # (docs/experiments.md, stage 2; measured on the former 10-motion data, not re-run on the
    # 160-motion set).
    c.stage2.train_motion_encoder = not demo
    # The demo trains the one ablation the stage-2 bar compares against (10 minutes each on 2
    # cores); --config.stage2.baselines="('self_attention','conv','no_middle_supervision')" runs all.
    if demo:
        c.stage2.baselines = ("self_attention",)
    c.model.expression.update(dict(
        every=2 if demo else 1, crop_size=16 if demo else 8, patch_size=4, num_tokens=4 if demo
        else 2, width=64 if demo else 16, depth=2 if demo else 1, num_heads=4 if demo else 2,
        out_dim=64 if demo else 16))
    # The demo DiT starts from scratch (no pretrained Wan2.2 on this machine): a far higher rate.
    # It trains the DiT and the expression branch and keeps the stage-2 model (the paper trains
    # all parts): on 2 cores the motion encoder's backward and the retarget heatmaps took 1.50 s
    # of a 1.58 s step, the DiT 0.07 s. Frozen, a step takes 0.45 s (the retarget loss, then a
    # constant, is left out): held-out PSNR* 19.11 after 1000 steps against 17.10 after 300 of
    # everything (README).
    # The DiT from scratch carries the reference's appearance into the generated frames better
    # with z_ref on its control channels and, in the demo, predicting x0 as z_ref plus its
    # output: held-out PSNR* 21.68 with x0 against 20.38 after 1000 steps (21.22 with the
    # channels alone); on the VAE started inflated with a narrow posterior, 22.58 with
    # x0_residual against 22.34 with x0 (docs/experiments.md, stage 3).
    c.model.reference_control = True
    c.model.dit_prediction = "x0_residual" if demo else "velocity"
    # The x0-prediction demo weighs every noise level alike (stage3.loss_weighting): Wan's flow
    # loss counts an x0 error 1/sigma^2 times, so nearly clean samples, which only need the
    # noise wiped, outweigh the noisy ones, where the motion has to come from the control:
    # held-out PSNR* 22.66 against 22.56 (docs/experiments.md, stage 3).
    c.stage3.loss_weighting = "x0" if demo else "velocity"
    c.stage3.update(dict(steps=1000 if demo else 6, clip_frames=17 if demo else 5, lr_dit=1e-3,
                         lr_other=1e-3, schedule="cosine", warmup_steps=20 if demo else 2,
                         batch_size=4 if demo else 2, log_every=50 if demo else 3,
                         checkpoint_every=250 if demo else 3,
                         frozen=("motion_encoder", "retargeter", "joint_head", "joint_decoder")
                         if demo else ()))
    c.sampling.update(dict(steps=20 if demo else 4, guidance=1.0, overlap_frames=5 if demo
                           else 1))
    c.eval.batch_size = 8 if demo else 2
    # One pair per held-out driving clip (8 identities x 4 motions): on 8 pairs the model's motion
    # PCK moved by 0.018 between two VAEs that tie on 32 (docs/experiments.md, stage 3).
    c.eval.stage3_pairs = 32 if demo else 2
