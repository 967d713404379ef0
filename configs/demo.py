r"""The demo's experiment: one (method, learning rate, seed) of `unlearn-jax demo`.

The shipped tiny world model forgets "circle": each forget prompt is remapped onto
the same prompt with "square" (the remap family), evaluated on the world's held-out
retain prompts with the world classifier, sized for a CPU. `unlearn-jax demo` runs
this config over its grid of methods, learning rates and seeds; any single point
can be reproduced or extended on its own:

  unlearn-jax unlearn --config configs/demo.py:method=distill,lr=2e-4,eval_every=40 \
      --workdir runs/demo_distill

Args (comma-separated key=value): method (a preset, default distill), lr (2e-4),
steps (120), seed (0), eval_every (0: only the final evaluation), eval_seeds
(images per evaluation prompt, 1), stride (periodic evaluations use every k-th
evaluation prompt, 1).
"""

from unlearn_jax.trainer.config_file import import_config_module
from unlearn_jax.world.demo.protocol import ANCHOR_CONCEPT, CONCEPT, split_prompts
from unlearn_jax.world.embedded import embedded_model_path

base = import_config_module(__file__, "base.py")


def get_config(arg=None):
    args = base.parse_arg(
        arg,
        method="distill",
        lr=2e-4,
        steps=120,
        seed=0,
        eval_every=0,
        eval_seeds=1,
        stride=1,
    )
    prompts = split_prompts(CONCEPT)
    config = base.get_config(f"method={args.method}")
    config.seed = args.seed
    config.model.path = str(embedded_model_path())
    config.forget.prompts = prompts["forget"]
    config.forget.concept = CONCEPT
    config.forget.anchor_concept = ANCHOR_CONCEPT
    config.retain.prompts = prompts["retain"]
    config.forget.images_per_prompt = 2
    config.retain.images_per_prompt = 1
    config.train.steps = args.steps
    config.train.batch_size = 8
    config.train.log_every = 10
    config.train.progress = False
    config.train.tensorboard = False  # the report is the demo's output; spares TF's import
    config.optim.lr = args.lr
    config.checkpoint.every = args.eval_every or args.steps
    config.checkpoint.keep = 0  # all: the headline point may be any evaluated step
    config.sample.steps = 10  # θ0's training images, as good at 10 DDIM steps as its evaluations
    config.sample.guidance = 4.0
    config.sample.esd_steps = 20
    config.sample.batch_size = 48
    config.eval.every = args.eval_every
    config.eval.prompts = prompts["eval_retain"]
    config.eval.forget_prompts = prompts["forget"]
    config.eval.seeds = args.eval_seeds
    # 10 DDIM steps: the original still draws every forget prompt's circle and every retain
    # prompt's shape and colour (measured), at half the cost of 20 per curve point.
    config.eval.steps = 10
    config.eval.guidance = 4.0
    # 24: the forget set exactly, the 18 held-out retain prompts with little padding.
    config.eval.batch_size = 24
    config.eval.classifier = "world_shape"
    config.eval.retain_metrics = "world"
    config.eval.periodic_prompt_stride = args.stride
    return config
