r"""SalUn: remap to the current model's anchor prediction + α retain denoising, saliency-masked.

Only the top keep_fraction (0.5) of parameters by |forget gradient| train; the
mask is accumulated over the forget set once, before step 0.

  unlearn-jax unlearn --config configs/salun.py --workdir runs/salun \
      --config.model.path=/data/stable-diffusion-v1-5 \
      --config.forget.prompts=prompts/forget.txt --config.retain.prompts=prompts/retain.txt

CPU smoke test: `--config configs/salun.py:runlocal` with a tiny model. Runtime and
expected results as in configs/base.py.
"""

from unlearn_jax.trainer.config_file import import_config_module

base = import_config_module(__file__, "base.py")


def get_config(arg=None):
    config = base.get_config(arg)
    config.unlearn.method = "salun"
    return config
