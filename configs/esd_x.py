r"""ESD-x: negatively guided target ε0(∅) − η(ε0(c_f) − ε0(∅)), cross-attention only.

x_t from partial θ0 DDIM trajectories (guidance 3) of the forget prompts; η = 1.

  unlearn-jax unlearn --config configs/esd_x.py --workdir runs/esd_x \
      --config.model.path=/data/stable-diffusion-v1-5 \
      --config.forget.prompts=prompts/forget.txt --config.retain.prompts=prompts/retain.txt

CPU smoke test: `--config configs/esd_x.py:runlocal` with a tiny model. Runtime and
expected results as in configs/base.py.
"""

from unlearn_jax.trainer.config_file import import_config_module

base = import_config_module(__file__, "base.py")


def get_config(arg=None):
    config = base.get_config(arg)
    config.unlearn.method = "esd_x"
    config.unlearn.hparams.eta = 1.0
    return config
