r"""distill with conflicting forget-gradient components projected out (base.py's default).

When ⟨g_f, g_r⟩ < 0 the component of g_f along g_r is removed (PCGrad-style),
so a forget step cannot undo the retain objective to first order.

  unlearn-jax unlearn --config configs/distill_project.py --workdir runs/distill_project \
      --config.model.path=/data/stable-diffusion-v1-5 \
      --config.forget.prompts=prompts/forget.txt --config.retain.prompts=prompts/retain.txt

CPU smoke test: `--config configs/distill_project.py:runlocal` with a tiny model. Runtime and
expected results as in configs/base.py.
"""

from unlearn_jax.trainer.config_file import import_config_module

base = import_config_module(__file__, "base.py")


def get_config(arg=None):
    config = base.get_config(arg)
    config.unlearn.method = "distill_project"
    return config
