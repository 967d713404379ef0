r"""Concept Ablation (model-based): predict for c_f what the frozen θ0 predicts for c_a.

Give each forget prompt its anchor (see configs/base.py, section forget): e.g.
--config.forget.concept='grumpy cat' --config.forget.anchor_concept=dog, or
--config.forget.anchor_prompts=prompts/anchors.txt (one per forget prompt).

  unlearn-jax unlearn --config configs/ablation.py --workdir runs/ablation \
      --config.model.path=/data/stable-diffusion-v1-5 \
      --config.forget.prompts=prompts/forget.txt --config.retain.prompts=prompts/retain.txt

CPU smoke test: `--config configs/ablation.py:runlocal` with a tiny model. Runtime and
expected results as in configs/base.py.
"""

from unlearn_jax.trainer.config_file import import_config_module

base = import_config_module(__file__, "base.py")


def get_config(arg=None):
    config = base.get_config(arg)
    config.unlearn.method = "ablation"
    return config
