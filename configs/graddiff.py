r"""Gradient difference: neggrad on the forget set + the denoising loss on retain data.

retain_weight (λ in g = g_f + λ g_r) trades forgetting against integrity.

  unlearn-jax unlearn --config configs/graddiff.py --workdir runs/graddiff \
      --config.model.path=/data/stable-diffusion-v1-5 \
      --config.forget.prompts=prompts/forget.txt --config.retain.prompts=prompts/retain.txt

CPU smoke test: `--config configs/graddiff.py:runlocal` with a tiny model. Runtime and
expected results as in configs/base.py.
"""

from unlearn_jax.trainer.config_file import import_config_module

base = import_config_module(__file__, "base.py")


def get_config(arg=None):
    config = base.get_config(arg)
    config.unlearn.method = "graddiff"
    return config
