"""A micro Stable Diffusion pipeline and configs for the train-loop tests.

The UNet has a single cross-attention level (plus the mid block), the fewest
operations an SD UNet can have: compiling a train step (two UNet backward
passes) costs about half of what the two-level `tiny_sd` UNet costs, and the
train-loop tests are dominated by that compilation.
"""

from __future__ import annotations

from pathlib import Path

from tiny_sd import MAX_LENGTH, WORDS, text_encoder_config

from unlearn_jax.testing.tiny_model import build_sd_pipeline, save_sd_folder, two_level_vae
from unlearn_jax.trainer.config_file import load_config

REPO = Path(__file__).resolve().parents[1]
FORGET = ["a red circle", "a photo of a cat"]
RETAIN = ["a blue square", "a green dog", "a small grey square"]
HELD_OUT = ["a large blue circle on a grey background"]


def save_micro_pipeline(path: Path, seed: int = 0) -> Path:
    """Writes the micro pipeline (diffusers layout, safetensors float32); returns the folder."""
    unet = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16,),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    pipe = build_sd_pipeline(
        seed=seed,
        unet=unet,
        vae=two_level_vae((8, 16), 16),
        text_encoder=text_encoder_config(sd2=False),
        words=WORDS,
        max_length=MAX_LENGTH,
    )
    return save_sd_folder(pipe, path, WORDS, MAX_LENGTH)


def config_fields(model: Path) -> dict[str, str]:
    """The `--config.a.b=value` fields of a quiet micro-model run without evaluation."""
    return {
        "model.path": str(model),
        "forget.prompts": repr(FORGET),
        "retain.prompts": repr(RETAIN),
        "eval.prompts": repr(HELD_OUT),
        "eval.final": "false",
        "train.progress": "false",
        "train.steps": "4",
        "checkpoint.every": "2",
    }


def make_config(model: Path, preset: str = "distill_project", **overrides):
    """`configs/<preset>.py:runlocal` on the micro model, no evaluation, quiet.

    Keyword overrides use '__' for '.', e.g. train__steps=2.
    """
    fields = config_fields(model)
    fields.update({k.replace("__", "."): str(v) for k, v in overrides.items()})
    return load_config(f"{REPO / 'configs' / preset}.py:runlocal", list(fields.items()))
