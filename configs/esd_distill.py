r"""ESD's negatively guided target + distillation to θ0 on the retain set.

ESD's forgetting with the retain distribution held to the original.

  unlearn-jax unlearn --config configs/esd_distill.py --workdir runs/esd_distill \
      --config.model.path=/data/stable-diffusion-v1-5 \
      --config.forget.prompts=prompts/forget.txt --config.retain.prompts=prompts/retain.txt

CPU smoke test: `--config configs/esd_distill.py:runlocal` with a tiny model. Runtime and
expected results as in configs/base.py.
"""

from unlearn_jax.trainer.config_file import import_config_module

base = import_config_module(__file__, "base.py")


def get_config(arg=None):
    config = base.get_config(arg)
    config.unlearn.method = "esd_distill"
    config.unlearn.hparams.eta = 1.0
    return config
