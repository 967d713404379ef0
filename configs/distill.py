r"""Remap c_f to θ0's anchor prediction + distillation to θ0 on the retain set (cond + ∅).

Integrity-preserving: the retain term is exactly zero at θ = θ0.

  unlearn-jax unlearn --config configs/distill.py --workdir runs/distill \
      --config.model.path=/data/stable-diffusion-v1-5 \
      --config.forget.prompts=prompts/forget.txt --config.retain.prompts=prompts/retain.txt

CPU smoke test: `--config configs/distill.py:runlocal` with a tiny model. Runtime and
expected results as in configs/base.py.
"""

from unlearn_jax.trainer.config_file import import_config_module

base = import_config_module(__file__, "base.py")


def get_config(arg=None):
    config = base.get_config(arg)
    config.unlearn.method = "distill"
    return config
