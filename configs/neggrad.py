r"""Gradient ascent on the forget denoising loss (no retain term).

The crudest baseline: it forgets fast and damages everything else (watch the loss).

  unlearn-jax unlearn --config configs/neggrad.py --workdir runs/neggrad \
      --config.model.path=/data/stable-diffusion-v1-5 \
      --config.forget.prompts=prompts/forget.txt --config.retain.prompts=prompts/retain.txt

CPU smoke test: `--config configs/neggrad.py:runlocal` with a tiny model. Runtime and
expected results as in configs/base.py.
"""

from unlearn_jax.trainer.config_file import import_config_module

base = import_config_module(__file__, "base.py")


def get_config(arg=None):
    config = base.get_config(arg)
    config.unlearn.method = "neggrad"
    return config
