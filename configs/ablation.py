r"""Concept Ablation (model-based): predict for c_f what the frozen θ0 predicts for c_a.

Set forget.anchor to the anchor concept (e.g. 'a photo of a dog' for 'grumpy cat').

  unlearn-jax unlearn --config configs/ablation.py --workdir runs/ablation \
      --config.model.path=/data/stable-diffusion-v1-5 \
      --config.forget.prompts=prompts/forget.txt --config.retain.prompts=prompts/retain.txt

CPU smoke test: `--config configs/ablation.py:runlocal` with a tiny model. Runtime and
expected results as in configs/base.py.
"""

from unlearn_jax.unlearn.config_file import import_config_module

base = import_config_module(__file__, "base.py")


def get_config(arg=None):
    config = base.get_config(arg)
    config.unlearn.method = "ablation"
    return config
