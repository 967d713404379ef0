"""What the commands share: argument types and groups, output folders, loading models.

`unlearn-jax sample`, `integrity`, `attack` and the other commands parse the same
model and sampling arguments, refuse the same bad `--out` folders before any
model loads, and lay out devices and load pipelines the same way. Parsing
imports no JAX; the loaders import it when called.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from pathlib import Path

from unlearn_jax.trainer.commands import add_single_file_args, single_file_options

# diffusion.solvers.SCHEDULERS, spelled out so that parsing arguments imports no JAX.
SCHEDULERS = ("ddim", "dpmpp_2m", "euler")


def number(kind: type, low: float | None = None, high: float | None = None, above: bool = False):
    """An argparse `type=` that accepts finite numbers in [low, high] ((low, high] if `above`)."""
    show = lambda x: str(int(x)) if float(x).is_integer() else f"{x:g}"
    if low is None:
        valid = f"<= {show(high)}"
    else:
        valid = f"{'>' if above else '>='} {show(low)}"
        valid += f" and <= {show(high)}" if high is not None else ""
    name = "an integer" if kind is int else "a finite number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name} {valid}, got {text!r}") from None
        ok = math.isfinite(value)
        ok = ok and (low is None or (value > low if above else value >= low))
        ok = ok and (high is None or value <= high)
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {name} {valid}, got {text!r}")
        return value

    return parse


POSITIVE_INT = number(int, 1)
SEED = number(int, 0, 2**32 - 1)
GUIDANCE = number(float, 0.0)


def check_out_folder(out: Path) -> None:
    """Refuses an --out that cannot be a folder we write into (before any model loads)."""
    if out.exists() and not out.is_dir():
        raise SystemExit(
            f"error: --out {out} is a file, not a folder. Fix: pass a folder path for --out."
        )
    parent = next((p for p in [out, *out.parents] if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise SystemExit(
            f"error: --out {out} lies under {parent}, which is a file. Fix: pass a folder path."
        )
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise SystemExit(
            f"error: --out {out}: {parent} is not writable. Fix: choose a folder you can write."
        )


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--variant, --allow-pickle, --dtype, --batch-size and the single-file options."""
    p.add_argument("--variant", default=None, help="weight-file variant, e.g. fp16")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="permit pickled .bin weights (they can run code when loaded)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="compute dtype of the UNet/VAE/text encoder",
    )
    p.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="images per compiled chunk")
    add_single_file_args(p)


def add_sampling_args(p: argparse.ArgumentParser, steps: int = 50) -> None:
    """--prompt/--prompts, --steps, --guidance, --height, --width, --scheduler."""
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", type=Path, help="text file, one prompt per line")
    p.add_argument("--steps", type=POSITIVE_INT, default=steps, help="denoising steps (>= 1)")
    p.add_argument(
        "--guidance",
        type=GUIDANCE,
        default=7.5,
        help="classifier-free guidance weight (finite, >= 0); <= 1 disables guidance",
    )
    p.add_argument("--height", type=POSITIVE_INT, default=None)
    p.add_argument("--width", type=POSITIVE_INT, default=None)
    p.add_argument(
        "--scheduler",
        default="ddim",
        choices=SCHEDULERS,
        help="sampler, built from the model's scheduler config as diffusers does",
    )


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of --prompt or --prompts; exits with a message when none or an empty one."""
    if args.prompt and args.prompts:
        raise SystemExit("error: give --prompt or --prompts, not both")
    from unlearn_jax.data.prompts import PromptSetError, read_prompt_file

    try:
        prompts = (
            list(args.prompt)
            if args.prompt
            else (read_prompt_file(args.prompts) if args.prompts else [])
        )
    except PromptSetError as e:
        raise SystemExit(f"error: --prompts: {e}") from None
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise SystemExit(
            f"error: --prompt number {empty[0] + 1} is empty. Fix: give a non-empty prompt "
            "(the empty prompt is what guidance uses as its unconditional branch)."
        )
    if not prompts:
        raise SystemExit(
            "error: no prompts: pass --prompt TEXT or --prompts FILE (one prompt per line)"
        )
    return prompts


def compute_dtype(args: argparse.Namespace):
    """The jnp dtype of --dtype."""
    import jax.numpy as jnp

    return jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32


def load_model(path: str | Path, args: argparse.Namespace, structure=None):
    """`load_pipeline` with the command's --dtype, --variant, --allow-pickle, single file."""
    from unlearn_jax.models.pipeline import load_pipeline

    return load_pipeline(
        path,
        dtype=compute_dtype(args),
        variant=args.variant,
        allow_pickle=args.allow_pickle,
        structure=structure,
        single_file_options=single_file_options(args),
    )


def load_while_compiling(
    folder: Path, args: argparse.Namespace, num_images: int, mesh, num_prompts: int | None = None
):
    """Loads a pipeline while its sampler, decoder and (given `num_prompts`) text
    encoder compile on worker threads.

    The programs are compiled from the folder's configs alone (shapes), for
    exactly the settings `generate` is then called with, so that XLA's compile
    time overlaps reading the weights and tokenizing the prompts.
    """
    from unlearn_jax.diffusion import text_to_image
    from unlearn_jax.models.pipeline import read_structure

    structure = read_structure(
        folder,
        dtype=compute_dtype(args),
        single_file_options=single_file_options(args),
        allow_pickle=args.allow_pickle,
    )
    text_to_image.precompile(
        structure, num_images, num_prompts=num_prompts, **sampler_settings(args, mesh)
    )
    return load_model(folder, args, structure)


def sampler_settings(args: argparse.Namespace, mesh) -> dict:
    """What `generate` and `precompile` must agree on for the compiled programs to be reused."""
    return dict(
        steps=args.steps,
        guidance=args.guidance,
        height=args.height,
        width=args.width,
        batch_size=args.batch_size,
        eta=getattr(args, "eta", 0.0),  # integrity samples deterministically
        scheduler=args.scheduler,
        mesh=mesh,
    )


def replica_bytes(folder: Path) -> int:
    """Upper bound of one in-memory copy of a pipeline's weights (half files load as float32)."""
    if folder.is_file():  # a single-file checkpoint
        return 2 * folder.stat().st_size
    files = [f for c in ("unet", "vae", "text_encoder") for f in (folder / c).glob("*.safetensors")]
    return 2 * sum(f.stat().st_size for f in files)


def devices_for(model_paths: list[str], args: argparse.Namespace) -> tuple[list[Path], object]:
    """Resolves the models and lays out the devices: (local folders, mesh over all devices).

    Sampling shards each chunk's batch over every device. On a CPU-only host
    the cores first become separate devices (`distributed.split_cpu_into_devices`).
    """
    from unlearn_jax.diffusion.chunks import data_mesh
    from unlearn_jax.distributed import split_cpu_into_devices
    from unlearn_jax.models.diffusers_folder import resolve_model_path

    folders = [resolve_model_path(p) for p in model_paths]
    split_cpu_into_devices(args.batch_size, sum(replica_bytes(f) for f in folders))
    return folders, data_mesh()


def fresh_output(out: Path, names: list[str]) -> None:
    """Refuses to overwrite any file in `out` this command would write (its own or the user's).

    The folder itself is created only when the results are written, so an
    error before then leaves nothing behind.
    """
    check_out_folder(out)
    existing = [n for n in names if (out / n).exists()]
    if existing:
        shown = ", ".join(existing[:6]) + (
            f" and {len(existing) - 6} more" if len(existing) > 6 else ""
        )
        raise SystemExit(
            f"error: {out} already holds {shown}; refusing to "
            "overwrite. Fix: choose another --out or remove those files."
        )


@contextlib.contextmanager
def all_or_nothing(out: Path):
    """Collects the files a command writes into `out`; on failure removes them (and `out`
    if this command created it), so that a retry starts clean. Each file is written
    atomically; the files were checked not to exist before, so they are ours to delete."""
    created = not out.exists()
    written: list[Path] = []
    try:
        yield written
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
