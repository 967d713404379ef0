r"""EraseDiff: retain step + λ·forget, λ = max(η − cos(g_r, g_f), 0) (first-order bilevel).

Pseudo-prompt target from the current model (SalUn/EraseDiff style).

  unlearn-jax unlearn --config configs/erasediff.py --workdir runs/erasediff \
      --config.model.path=/data/stable-diffusion-v1-5 \
      --config.forget.prompts=prompts/forget.txt --config.retain.prompts=prompts/retain.txt

CPU smoke test: `--config configs/erasediff.py:runlocal` with a tiny model. Runtime and
expected results as in configs/base.py.
"""

from unlearn_jax.trainer.config_file import import_config_module

base = import_config_module(__file__, "base.py")


def get_config(arg=None):
    config = base.get_config(arg)
    config.unlearn.method = "erasediff"
    return config
