r"""SD-2.1 (768x768, v-prediction): forget one Imagenette class (tench), keep the other nine.

The same experiment and prompt sets as configs/sd14_object.py on Stable
Diffusion 2.1. v-prediction needs no setting: the model folder's
scheduler_config.json says `prediction_type: v_prediction`, and the losses,
targets and sampler read it from there. 768x768 images (96x96 latents) make
the UNet ~2.7x as expensive per image as SD-1.x at 512 and its self-attention
maps ~5x as large, so this config recomputes activations (train.remat) and
splits each batch of 8 into 2 micro-batches (train.grad_accum).

Model (`model.path`, required): a local diffusers folder of Stable Diffusion 2.1
(hub id stabilityai/stable-diffusion-2-1, downloaded beforehand on a machine
that is online). Nothing is downloaded by this config.

Config args: method=NAME (any preset; default distill_project), prompts=DIR
(default prompts/imagenette_tench), runlocal (CPU smoke test on a tiny model).

  # 1. Prompt sets (the same as for SD-1.4, forget_anchors.txt included):
  python -m unlearn_jax.data.prompt_sets imagenette --concept tench --general 100 \
      --out prompts/imagenette_tench

  # 2. Unlearn (one GPU; see configs/sd14_object.py for SLURM / TPU pod / multinode.sh):
  unlearn-jax unlearn --config configs/sd21_object.py:method=distill_project \
      --workdir runs/sd21_tench_distill_project \
      --config.model.path=/data/stable-diffusion-2-1
  #    8 GPUs: one example per GPU, so no micro-batches (each must split over all devices):
  sbatch --nodes=1 launch/slurm_gpu.sbatch unlearn \
      --config configs/sd21_object.py:method=esd_u --config.train.grad_accum=1 \
      --workdir /shared/runs/sd21_tench_esd_u --config.model.path=/shared/stable-diffusion-2-1

  # 3. Export and integrity on the held-out retain prompts (768x768 is the model's size):
  unlearn-jax export --workdir runs/sd21_tench_distill_project \
      --out runs/sd21_tench_distill_project/model
  unlearn-jax integrity --original /data/stable-diffusion-2-1 \
      --unlearned runs/sd21_tench_distill_project/model \
      --prompts prompts/imagenette_tench/eval_retain.txt --seeds 4 \
      --out runs/sd21_tench_distill_project/integrity

Expected runtime (an ESTIMATE from FLOPs): SD-1.x's ~0.8 TFLOP per 512x512
image-forward scales to ≈ 2.1 TFLOP at 768x768 (convolutions and projections
x2.25, the ~15% in self-attention maps x5); H100 at ~40% of 989 TFLOP/s bf16.
  * x0 generations: 408 images x 100 image-forwards ≈ 86 PFLOP ≈ 3.5 min.
  * Training: ~12 image-forwards per example for distill_project, +3 for remat
    (one per student pass), x batch 8 ≈ 250 TFLOP ≈ 0.6 s/step; 200 steps ≈ 2 min.
  * Final integrity: 154 prompts x 4 seeds x 2 models x 100 ≈ 123k image-forwards
    ≈ 260 PFLOP ≈ 11 min.
  Total on one H100 ≈ 17 min of compute plus compilation: ~20-25 min; on 8 GPUs
  generation and evaluation take ~1/8 of that.
Expected results: not measured yet at this scale.

Memory per device (planner estimate, XLA:CPU, 8 devices, 768 px, distill_project, bf16
compute, remat, batch 1 per device, FSDP: --config.mesh.data=1 --config.mesh.fsdp=8
--config.train.grad_accum=1; README "Planning a run"): arguments 1.62 GiB, temporaries
19.98 GiB, peak 21.60 GiB. Fits TPU v4 (32 GiB), v5p, v6e and 80 GB GPUs; not TPU v5e
(16 GiB). 31.5 TFLOP per step and device: a floor of 114 ms per step on v4, 32 ms on an
H100.
"""

from unlearn_jax.trainer.config_file import import_config_module

sd14_object = import_config_module(__file__, "sd14_object.py")


def get_config(arg=None):
    config, args = sd14_object.preset_config(
        arg, method="distill_project", prompts="prompts/imagenette_tench"
    )
    config = sd14_object.sd_scale(config, args, size=768)
    if not args.runlocal:
        config.train.remat = True
        config.train.grad_accum = 2
    return config
