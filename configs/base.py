r"""Base unlearning experiment: every field the trainer reads, with working defaults.

Any preset runs with only the model and the two prompt sets given:

  unlearn-jax unlearn --config configs/base.py --workdir runs/sd15_distill_project \
      --config.model.path=/data/stable-diffusion-v1-5 \
      --config.forget.prompts=prompts/forget.txt \
      --config.retain.prompts=prompts/retain.txt \
      --config.eval.prompts=prompts/retain_heldout.txt

  unlearn-jax export --workdir runs/sd15_distill_project --out runs/sd15_distill_project/model

`configs/<method>.py` sets `unlearn.method` (and its usual hyperparameters) on
top of this file. Config args (after the colon, comma-separated):
`runlocal` shrinks everything for a CPU smoke test; `method=NAME` picks a preset.

Expected runtime (SD 1.5, 512x512, one A100/H100, float32 UNet, batch 8):
~1 s per step for the two-term methods (forget + retain, student and teacher
UNet passes), so 200 steps ~ 4 min, plus the one-off generation of the x0 latents
(8 forget + 4 retain images per prompt at 50 DDIM steps) and the final
integrity evaluation (4 seeds per held-out prompt, both models). `runlocal` on
the tiny test pipeline: ~30 s on 2 CPU cores, dominated by compilation.
Expected results: see the README's results table (integrity LPIPS of
distill/distill_project well below that of neggrad/graddiff/esd at a similar
forget rate).
"""

import ml_collections
from ml_collections import config_dict


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """big_vision-style args: 'runlocal,method=esd_x' -> {runlocal: True, method: 'esd_x'}."""
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in values:
            raise ValueError(f"unknown config arg {key!r}; valid: {', '.join(values)}")
        default = values[key]
        if not value:
            values[key] = True
        elif isinstance(default, bool):
            values[key] = value.lower() in ("1", "true", "yes")
        else:
            values[key] = type(default)(value) if default is not None else value
    return ml_collections.ConfigDict(values)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, runlocal=False, method="distill_project")
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.path = config_dict.placeholder(str)  # diffusers folder, FILE.safetensors or hub id
    config.model.variant = config_dict.placeholder(str)  # e.g. "fp16" weight files
    config.model.allow_pickle = False  # .bin/.ckpt pickles can run code; safetensors preferred
    # Single-file checkpoints (model.path=FILE.safetensors, the A1111/ComfyUI layout) only:
    config.model.config = config_dict.placeholder(str)  # diffusers folder giving the architecture
    config.model.prediction_type = config_dict.placeholder(str)  # epsilon | v_prediction
    config.model.ema = False  # load the UNet from the file's model_ema.* weights

    # Prompt sets: a list of prompts, or a text file with one prompt per line.
    config.forget = ml_collections.ConfigDict()
    config.forget.prompts = None
    # Anchors c_a of the remap family (ablation, distill, distill_project, salun,
    # erasediff): the prompt whose prediction each forget prompt is remapped to. Best one
    # per forget prompt, differing only in the concept (see unlearn_jax/data/anchors.py;
    # a bare shared word keeps the forget image's colour, size and background).
    # At most one of the three ways:
    config.forget.anchor = ""  # one anchor for every forget prompt; "" = the empty prompt
    # A list, or a text file with one anchor per line, paired with forget.prompts in
    # order (same length); in a list "" is the empty prompt, in a file blank lines are
    # skipped.
    config.forget.anchor_prompts = None
    # The concept as its words appear in the forget prompts (e.g. "circle"; also read
    # by the forget-rate classifier), and with anchor_concept (e.g. "square") each
    # anchor is its forget prompt with the concept's whole words replaced, case kept.
    # concept alone does not change the anchors.
    config.forget.concept = ""
    config.forget.anchor_concept = ""
    # Optional forget images: a folder of image files, or a prepared TFDS dataset
    # "tfds:NAME[/CONFIG][:SPLIT]" (its first prompts x images_per_prompt records);
    # empty: θ0's own generations for the prompts.
    config.forget.images = ""
    config.forget.images_per_prompt = 8  # θ0 generations (or ESD trajectories) per prompt

    config.retain = ml_collections.ConfigDict()
    config.retain.prompts = None
    config.retain.images = ""
    config.retain.images_per_prompt = 4

    config.unlearn = ml_collections.ConfigDict()
    config.unlearn.method = args.method  # a preset name (unlearn_jax.unlearn.registry.PRESETS)
    # UNet parameters that train: full | xattn | noxattn | none | a regex over '.'-joined
    # paths (e.g. 'attn2\.to_[kv]'); None: the preset's group. 'none' freezes the UNet
    # (then unlearn.text_encoder must train something).
    config.unlearn.params = config_dict.placeholder(str)
    # Text-encoder parameters that train too: 'none' (default: the text encoder is frozen
    # and its contexts are computed once), 'full', or a regex searched in '.'-joined
    # text-encoder paths such as 'text_model.encoder.layers.11.self_attn.v_proj.kernel'
    # or 'text_model.embeddings.token_embedding.embedding'. When on, the forget/retain
    # terms encode the prompts' token ids with the trainable text encoder inside the
    # loss (θ0's targets use θ0's text encoder), checkpoints hold the trained
    # text-encoder parameters and `unlearn-jax export` writes text_encoder/ too.
    # Text encoder alone: --config.unlearn.params=none --config.unlearn.text_encoder=full.
    config.unlearn.text_encoder = "none"
    # Hyperparameters of the method; None keeps the preset's value (see UnlearnHParams).
    config.unlearn.hparams = ml_collections.ConfigDict()
    config.unlearn.hparams.eta = config_dict.placeholder(float)
    config.unlearn.hparams.target_model = config_dict.placeholder(str)
    config.unlearn.hparams.uncond_weight = config_dict.placeholder(float)
    config.unlearn.hparams.retain_weight = config_dict.placeholder(float)
    config.unlearn.hparams.strict = config_dict.placeholder(bool)
    config.unlearn.hparams.project_rounding = config_dict.placeholder(float)
    config.unlearn.hparams.erasediff_eta = config_dict.placeholder(float)
    config.unlearn.hparams.erasediff_lambda = config_dict.placeholder(float)
    config.unlearn.hparams.keep_fraction = config_dict.placeholder(float)

    config.train = ml_collections.ConfigDict()
    config.train.steps = 200  # raising it later extends the run in the same workdir
    config.train.batch_size = 8  # examples per term (forget and retain) per step
    config.train.grad_accum = 1  # micro-batches per step (batch_size must divide)
    config.train.remat = False  # recompute UNet block activations in the backward pass
    config.train.dtype = "float32"  # UNet compute dtype: float32 | bfloat16 (params stay f32)
    # θ0 (the teacher and the frozen weights) held in float32 or in the compute dtype
    # ("compute": a bfloat16 θ0 when train.dtype is bfloat16, half its memory; the
    # network casts parameters to the compute dtype anyway, so results are unchanged).
    config.train.frozen_dtype = "float32"  # float32 | compute
    # The step as one XLA program ("fused"), three compiled side by side ("split": the
    # forget and retain gradients, then the update), or "staged": one compiled UNet
    # forward and backward that every network call of the step runs through (least
    # compilation, slower steps). "auto": fused on GPUs and TPUs; on CPU, where XLA's
    # compile time grows faster than the program, staged for two-term methods in runs
    # of <= 200 steps, split otherwise.
    config.train.step_programs = "auto"  # auto | fused | split | staged
    config.train.log_every = 10
    config.train.force_resume = False  # resume a workdir although the run's fingerprint changed
    config.train.progress = True
    # TensorBoard scalars and integrity grids through clu, when TensorFlow is installed
    # (`pip install unlearn_jax[tensorboard]`); metrics.jsonl is written either way.
    config.train.tensorboard = True

    config.optim = ml_collections.ConfigDict()
    config.optim.name = "adam"  # adam | adamw | sgd
    config.optim.lr = 1e-5
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.mu_dtype = "float32"  # Adam's first moment: float32 | bfloat16 (half memory)
    config.optim.weight_decay = 0.0  # adamw only
    config.optim.momentum = 0.0  # sgd only
    config.optim.schedule = "constant"  # constant | cosine | linear
    config.optim.warmup_steps = 0
    config.optim.decay_steps = 0  # length of cosine/linear decay (independent of train.steps)
    config.optim.end_lr_fraction = 0.0
    config.optim.grad_clip = 1.0  # global-norm clipping; 0 = off

    # θ0's generations that serve as x0 where no images are given.
    config.sample = ml_collections.ConfigDict()
    config.sample.steps = 50
    config.sample.guidance = 7.5
    config.sample.esd_steps = 50  # ESD: DDIM steps of the partial trajectories
    config.sample.esd_guidance = 3.0
    config.sample.height = config_dict.placeholder(int)  # None: the model's native size
    config.sample.width = config_dict.placeholder(int)
    config.sample.batch_size = 8

    config.eval = ml_collections.ConfigDict()
    config.eval.every = 0  # periodic evaluation every N steps; 0 = none
    config.eval.final = True
    config.eval.integrity = True
    config.eval.prompts = None  # held-out retain prompts; None: the retain prompts
    config.eval.forget_prompts = None  # for the forget rate; None: the forget prompts
    config.eval.seeds = 4
    config.eval.steps = 50
    config.eval.guidance = 7.5
    config.eval.seed = 0
    config.eval.batch_size = 8
    config.eval.lpips_net = "vgg"
    config.eval.classifier = ""  # a registered forget classifier; "" = no forget rate
    # Metrics of the integrity image pairs, comma-separated registered names (see
    # unlearn_jax.trainer.evaluation), e.g. "world" (FID + retain accuracy on the embedded world).
    config.eval.retain_metrics = ""
    # Periodic evaluations (eval.every) use every k-th prompt of eval.prompts and
    # eval.forget_prompts, so that a run's curve is cheap; the final evaluation uses all.
    config.eval.periodic_prompt_stride = 1
    # Adversarial recovery of the forgotten concept, run at the final evaluation (never
    # at periodic ones) when method is set; needs eval.classifier and forget.concept.
    # See unlearn_jax.attacks: the forget rate under attack is reported beside the
    # forget rate ("forget_rate_attacked"); a large gap means hidden, not forgotten.
    config.eval.attack = ml_collections.ConfigDict()
    config.eval.attack.method = ""  # "" = off; "embedding" (textual inversion) or "context"
    config.eval.attack.steps = 100
    config.eval.attack.tokens = 1  # k learned tokens in place of the concept's word
    config.eval.attack.lr = 5e-3
    config.eval.attack.batch_size = 8
    config.eval.attack.epsilon = 0.1  # context attack: ||δ|| <= epsilon ||c|| per token
    config.eval.attack.init_word = ""  # v*'s starting word; "" = the concept itself
    config.eval.attack.seed = 0

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every = 100
    config.checkpoint.keep = 2

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # -1: all devices not used by fsdp
    config.mesh.fsdp = 1

    if args.runlocal:
        config.train.steps = 4
        config.train.batch_size = 2
        config.train.log_every = 1
        config.optim.lr = 1e-4
        config.forget.images_per_prompt = 2
        config.retain.images_per_prompt = 1
        config.sample.steps = 4
        config.sample.esd_steps = 4
        config.sample.batch_size = 4
        config.eval.seeds = 1
        config.eval.steps = 4
        config.eval.batch_size = 4
        config.checkpoint.every = 2
    return config
