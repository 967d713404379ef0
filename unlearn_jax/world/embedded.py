"""Where the embedded default lives: the shipped tiny world model and its evaluator.

Both are package data under `unlearn_jax/world/assets/` (no `__init__.py` there;
setup.py's `package_data` ships it), located through `importlib.resources` so
they are found the same way in an editable checkout and in an installed wheel.
They are produced by `python -m unlearn_jax.world.pretrain --config configs/pretrain_world.py`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

EMBEDDED_MODEL = "tiny_world"
CLASSIFIER_WEIGHTS = "world_classifier.safetensors"


def assets_path() -> Path:
    """The world package's `assets/` folder."""
    return Path(str(resources.files("unlearn_jax.world").joinpath("assets")))


def embedded_model_path() -> Path:
    """The shipped diffusers folder of the tiny world model (loads with `load_pipeline`)."""
    path = assets_path() / EMBEDDED_MODEL
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the embedded model is missing from {path}. Fix: reinstall unlearn_jax (the "
            "wheel ships it), or rebuild it with `python -m unlearn_jax.world.pretrain "
            "--config configs/pretrain_world.py --workdir /tmp/pretrain_world --install`."
        )
    return path


def classifier_weights_path() -> Path:
    """The shipped safetensors of the world classifier (`world.classifier`)."""
    return assets_path() / CLASSIFIER_WEIGHTS
