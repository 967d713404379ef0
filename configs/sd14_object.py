r"""SD-1.4, object class: forget one Imagenette class (tench), keep the other nine.

Model (`model.path`, required): a local diffusers folder of Stable Diffusion v1.4
(hub id CompVis/stable-diffusion-v1-4, downloaded beforehand on a machine that
is online, e.g. `huggingface-cli download CompVis/stable-diffusion-v1-4
--exclude "*.ckpt" "*.bin" --local-dir /data/stable-diffusion-v1-4`). Nothing
is downloaded by this config.

Config args (after the colon, comma-separated):
  method=NAME   any preset (configs/<NAME>.py, with its own hyperparameters);
                default distill_project
  prompts=DIR   the folder written by step 1; default prompts/imagenette_tench
  runlocal      CPU smoke test on a tiny model (native size, few steps, float32)

  # 1. Prompt sets (deterministic): 8 forget + 72 retain prompts (the 9 other
  #    classes) + 100 COCO-style captions, held-out eval prompts, one anchor per forget
  #    prompt for the remap methods (forget_anchors.txt: "a photo of a tench" ->
  #    "a photo of a fish"), and the 10-class label set for a CLIP zero-shot forget
  #    rate (labels.json).
  python -m unlearn_jax.data.prompt_sets imagenette --concept tench --general 100 \
      --out prompts/imagenette_tench

  # 2. Unlearn (resumes in the same workdir; ends with the integrity evaluation on
  #    eval_retain.txt into WORKDIR/eval/). One GPU or one host:
  unlearn-jax unlearn --config configs/sd14_object.py:method=distill_project \
      --workdir runs/sd14_tench_distill_project \
      --config.model.path=/data/stable-diffusion-v1-4
  #    SLURM GPU cluster (workdir on a shared file system), TPU pod, any cluster:
  sbatch --nodes=1 launch/slurm_gpu.sbatch unlearn \
      --config configs/sd14_object.py:method=esd_x --workdir /shared/runs/sd14_tench_esd_x \
      --config.model.path=/shared/stable-diffusion-v1-4
  TPU_NAME=my-v4-8 ZONE=us-central2-b launch/tpu_pod.sh unlearn \
      --config configs/sd14_object.py --workdir gs://bucket/runs/sd14_tench \
      --config.model.path=/data/stable-diffusion-v1-4
  COORDINATOR=host0:12355 NUM_PROCESSES=2 PROCESS_ID=$RANK launch/multinode.sh unlearn \
      --config configs/sd14_object.py --workdir /shared/runs/sd14_tench \
      --config.model.path=/shared/stable-diffusion-v1-4

  # 3. Export a diffusers folder, then measure integrity again with other settings
  #    (the same held-out prompts; same prompts and noise for both models):
  unlearn-jax export --workdir runs/sd14_tench_distill_project \
      --out runs/sd14_tench_distill_project/model
  unlearn-jax integrity --original /data/stable-diffusion-v1-4 \
      --unlearned runs/sd14_tench_distill_project/model \
      --prompts prompts/imagenette_tench/eval_retain.txt --seeds 4 --steps 50 \
      --out runs/sd14_tench_distill_project/integrity

Expected runtime (an ESTIMATE from FLOPs, not a measurement): one SD-1.x UNet
forward at 512x512 is ~0.8 TFLOP per image (1.59 TFLOP measured for batch 2);
an H100 peaks at ~989 TFLOP/s dense bf16, assumed used at ~40% (~400 TFLOP/s);
a backward pass costs ~2 forwards.
  * θ0's x0 generations: (8 forget x 8 + 172 retain x 2) images x 50 DDIM steps
    x 2 (guidance) ≈ 41k image-forwards ≈ 33 PFLOP ≈ 1.4 min.
  * Training: distill_project is ~12 image-forwards per example (student
    forward+backward on the forget and on both retain contexts, teacher on the
    anchor and both retain contexts) x batch 8 ≈ 77 TFLOP ≈ 0.2 s/step; 200
    steps ≈ 40 s. ESD-x: ~5 per example, ≈ 0.1 s/step.
  * Final integrity: 154 held-out prompts x 4 seeds x 2 models x 50 steps x 2
    ≈ 123k image-forwards ≈ 99 PFLOP ≈ 4 min (VAE decoding and LPIPS add a few %).
  Total on one H100 ≈ 7 min of compute plus compilation and loading (a few
  minutes): ~10-12 min. On 8 GPUs the generation and evaluation scale ~8x; the
  train step at batch 8 does not (raise train.batch_size with the device count).
Expected results: not measured yet at this scale (no SD weights on the machines
this project is developed on); the README's results table is the embedded model's.
"""

import os

from unlearn_jax.trainer.config_file import import_config_module
from unlearn_jax.unlearn.registry import PRESETS

base = import_config_module(__file__, "base.py")


def preset_config(arg, *, method: str, prompts: str):
    """The method's preset config (its hyperparameters) with a prompt-set folder's files.

    `arg` takes runlocal, method=NAME and prompts=DIR (defaults: the keyword arguments).
    """
    args = base.parse_arg(arg, runlocal=False, method=method, prompts=prompts)
    if args.method not in PRESETS:
        raise ValueError(f"unknown method {args.method!r}; valid: {', '.join(PRESETS)}")
    preset = import_config_module(__file__, f"{args.method}.py")
    config = preset.get_config("runlocal" if args.runlocal else None)
    folder = args.prompts
    config.forget.prompts = os.path.join(folder, "forget.txt")
    # The remap methods' anchors, one per forget prompt (ignored by ESD and neggrad).
    config.forget.anchor_prompts = os.path.join(folder, "forget_anchors.txt")
    config.retain.prompts = os.path.join(folder, "retain.txt")
    config.eval.prompts = os.path.join(folder, "eval_retain.txt")  # held out: integrity
    config.eval.forget_prompts = os.path.join(folder, "eval_forget.txt")
    return config, args


def sd_scale(config, args, *, size: int):
    """Settings of a Stable Diffusion run on accelerators; runlocal keeps the CPU smoke test."""
    config.train.dtype = "bfloat16"  # UNet compute; parameters and optimizer stay float32
    config.retain.images_per_prompt = 2
    config.sample.height = config.sample.width = size
    config.sample.batch_size = 16
    config.eval.batch_size = 16
    config.eval.seeds = 4
    config.checkpoint.every = 100
    if args.runlocal:
        config.train.dtype = "float32"
        config.retain.images_per_prompt = 1
        config.sample.height = config.sample.width = None  # the tiny model's native size
        config.sample.batch_size = config.eval.batch_size = 4
        config.checkpoint.every = 2
    return config


def get_config(arg=None):
    # Remap methods map "a photo of a tench" to θ0's prediction for "a photo of a fish".
    config, args = preset_config(arg, method="distill_project", prompts="prompts/imagenette_tench")
    return sd_scale(config, args, size=512)
