r"""SD-1.5, artistic style: forget Van Gogh's style, keep neighbouring painters' styles.

The retain set is the hard one: Monet, Cézanne, Gauguin, Seurat,
Toulouse-Lautrec, Munch, Picasso and Renoir over the same subjects as the
forget prompts ("a vase of sunflowers in the style of Claude Monet"); integrity
is measured on held-out subjects. Remap methods map each forget prompt to itself
with the style phrase removed ("a painting of a village church by Vincent van
Gogh" -> "a painting of a village church"; forget_anchors.txt of the prompt folder),
Concept Ablation's pairing for styles.

Model (`model.path`, required): a local diffusers folder of Stable Diffusion v1.5
(hub id stable-diffusion-v1-5/stable-diffusion-v1-5, downloaded beforehand on a
machine that is online). Nothing is downloaded by this config.

Config args: method=NAME (any preset; default distill_project), prompts=DIR
(default prompts/van_gogh), runlocal (CPU smoke test on a tiny model).

  # 1. Prompt sets: 24 forget prompts and their 24 anchors, 96 retain (+100
  #    COCO-style captions), 16 held-out forget and 64 (+100) held-out retain
  #    prompts, the artists' label set.
  python -m unlearn_jax.data.prompt_sets van_gogh --general 100 --out prompts/van_gogh

  # 2. Unlearn (one GPU; see configs/sd14_object.py for SLURM / TPU pod / multinode.sh):
  unlearn-jax unlearn --config configs/sd15_style.py:method=esd_x \
      --workdir runs/sd15_van_gogh_esd_x --config.model.path=/data/stable-diffusion-v1-5
  sbatch --nodes=1 launch/slurm_gpu.sbatch unlearn \
      --config configs/sd15_style.py:method=distill_project \
      --workdir /shared/runs/sd15_van_gogh_distill_project \
      --config.model.path=/shared/stable-diffusion-v1-5

  # 3. Export and integrity on the held-out retain prompts:
  unlearn-jax export --workdir runs/sd15_van_gogh_esd_x --out runs/sd15_van_gogh_esd_x/model
  unlearn-jax integrity --original /data/stable-diffusion-v1-5 \
      --unlearned runs/sd15_van_gogh_esd_x/model \
      --prompts prompts/van_gogh/eval_retain.txt --seeds 4 \
      --out runs/sd15_van_gogh_esd_x/integrity

Expected runtime (an ESTIMATE from FLOPs, as in configs/sd14_object.py: ~0.8
TFLOP per 512x512 UNet image-forward, H100 at ~40% of 989 TFLOP/s bf16):
  * x0 generations: (24 x 8 forget + 196 x 2 retain) x 50 steps x 2 ≈ 58k
    image-forwards ≈ 47 PFLOP ≈ 2 min (ESD-x: 192 forget trajectories only, ≈ 40 s).
  * Training: 200 steps at ~0.1-0.2 s ≈ 20-40 s.
  * Final integrity: 164 prompts x 4 seeds x 2 models x 100 ≈ 131k image-forwards
    ≈ 105 PFLOP ≈ 4.5 min.
  Total on one H100 ≈ 7 min of compute plus a few minutes of compilation: ~10-13 min.
Expected results: not measured yet at this scale.

Memory per device (planner estimates, XLA:CPU, 8 devices, 512 px, distill_project, bf16
compute, batch 1 per device; README "Planning a run"):

  mesh                           arguments  temporaries  peak       fits
  FSDP (1)                       1.61 GiB   11.53 GiB    13.14 GiB  TPU v5e, v4, v5p, v6e; GPUs
  data parallel, lean state (2)  9.61 GiB   12.27 GiB    21.88 GiB  TPU v4, v5p, v6e; GPUs (not v5e)

  (1) --config.mesh.data=1 --config.mesh.fsdp=8
  (2) --config.train.frozen_dtype=compute --config.optim.mu_dtype=bfloat16

"fits": peak <= 90% of the chip's memory; GPUs: A100 80GB, H100, H200. Attention in
these programs is 'blockwise' (flash attention in plain JAX); on GPU the trainer runs
cuDNN's kernel and on TPU Pallas's, which do not hold the logits either.
"""

from unlearn_jax.trainer.config_file import import_config_module

sd14_object = import_config_module(__file__, "sd14_object.py")


def get_config(arg=None):
    config, args = sd14_object.preset_config(
        arg, method="distill_project", prompts="prompts/van_gogh"
    )
    return sd14_object.sd_scale(config, args, size=512)
