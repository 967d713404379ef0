"""The `unlearn-jax` command: thin argument parsing over importable, tested functions.

The command-line contract (DESIGN.md) is stable; other tools rely on it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import json
import logging
import math
import os
import sys
from pathlib import Path

import numpy as np

from unlearn_jax.attacks.command import add_attack_command
from unlearn_jax.planning import add_plan_command
from unlearn_jax.trainer.commands import (
    add_single_file_args,
    add_unlearn_commands,
    single_file_options,
)
from unlearn_jax.world.demo import add_demo_command

# Compiled programs are kept here across runs (a rerun of the same command on the
# same model skips XLA compilation), and in its tokenizers/ each tokenizer folder as
# transformers resolved it (`models.clip_tokenizer`). UNLEARN_JAX_COMPILATION_CACHE=DIR
# moves it, =off disables it; JAX_COMPILATION_CACHE_DIR, when set, wins (programs only).
COMPILATION_CACHE_ENV = "UNLEARN_JAX_COMPILATION_CACHE"
# Programs that took at least this long to compile are written to that cache. JAX's
# default (1 s) left the text encoder's and the VAE decoder's programs out: they compile
# in 0.8-0.9 s on a worker thread while the sampler traces, and a warm 16-image
# `sample` run took 8.1-8.6 s with them recompiled, 6.4-7.0 s with them cached.
CACHE_MIN_COMPILE_S = 0.1
# diffusion.solvers.SCHEDULERS, spelled out so that parsing arguments imports no JAX.
SCHEDULERS = ("ddim", "dpmpp_2m", "euler")
INTEGRITY_FILES = ("integrity.json", "pairs.npz", "grid.png")


def enable_compilation_cache() -> str | None:
    """Turns on JAX's persistent compilation cache for this process; returns its folder."""
    import jax

    from unlearn_jax.models import clip_tokenizer

    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    setting = os.environ.get(COMPILATION_CACHE_ENV, "")
    if setting.lower() in ("off", "0", "false", "no"):
        return None
    folder = Path(setting or Path.home() / ".cache" / "unlearn_jax" / "xla").expanduser()
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_S)
    # Tokenizers as transformers resolved them (JSON), so that warm runs skip its import.
    clip_tokenizer.set_cache_folder(folder / "tokenizers")
    return str(folder)


def _number(kind: type, low: float | None = None, high: float | None = None, above: bool = False):
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


POSITIVE_INT = _number(int, 1)
SEED = _number(int, 0, 2**32 - 1)
GUIDANCE = _number(float, 0.0)


def _out_folder(out: Path) -> None:
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


def _add_model_args(p: argparse.ArgumentParser) -> None:
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


def _add_sampling_args(p: argparse.ArgumentParser, steps: int = 50) -> None:
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


def _prompts(args: argparse.Namespace) -> list[str]:
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


def _dtype(args: argparse.Namespace):
    import jax.numpy as jnp

    return jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32


def _load(path: str | Path, args: argparse.Namespace, structure=None):
    from unlearn_jax.models.pipeline import load_pipeline

    return load_pipeline(
        path,
        dtype=_dtype(args),
        variant=args.variant,
        allow_pickle=args.allow_pickle,
        structure=structure,
        single_file_options=single_file_options(args),
    )


def _load_while_compiling(
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
        dtype=_dtype(args),
        single_file_options=single_file_options(args),
        allow_pickle=args.allow_pickle,
    )
    text_to_image.precompile(
        structure, num_images, num_prompts=num_prompts, **_sampler_settings(args, mesh)
    )
    return _load(folder, args, structure)


def _sampler_settings(args: argparse.Namespace, mesh) -> dict:
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


def _replica_bytes(folder: Path) -> int:
    """Upper bound of one in-memory copy of a pipeline's weights (half files load as float32)."""
    if folder.is_file():  # a single-file checkpoint
        return 2 * folder.stat().st_size
    files = [f for c in ("unet", "vae", "text_encoder") for f in (folder / c).glob("*.safetensors")]
    return 2 * sum(f.stat().st_size for f in files)


def _devices_for(model_paths: list[str], args: argparse.Namespace) -> tuple[list[Path], object]:
    """Resolves the models and lays out the devices: (local folders, mesh over all devices).

    Sampling shards each chunk's batch over every device. On a CPU-only host
    the cores first become separate devices (`distributed.split_cpu_into_devices`).
    """
    from unlearn_jax.diffusion.chunks import data_mesh
    from unlearn_jax.distributed import split_cpu_into_devices
    from unlearn_jax.models.pipeline import resolve_model_path

    folders = [resolve_model_path(p) for p in model_paths]
    split_cpu_into_devices(args.batch_size, sum(_replica_bytes(f) for f in folders))
    return folders, data_mesh()


def _fresh_output(out: Path, names: list[str]) -> None:
    """Refuses to overwrite any file in `out` this command would write (its own or the user's).

    The folder itself is created only when the results are written, so an
    error before then leaves nothing behind.
    """
    _out_folder(out)
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
def _all_or_nothing(out: Path):
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


def cmd_sample(args: argparse.Namespace) -> None:
    """unlearn-jax sample: images from prompts, optionally from given initial noise."""
    from unlearn_jax.atomic_files import write_npz
    from unlearn_jax.diffusion import text_to_image
    from unlearn_jax.metrics.visualize import save_png

    prompts = _prompts(args)
    count = len(prompts) * args.num_images_per_prompt
    _fresh_output(args.out, ["images.npz", *(f"{i:05d}.png" for i in range(count))])
    latents = None if args.latents is None else _read_latents(args.latents)
    (folder,), mesh = _devices_for([args.model], args)
    pipe = _load_while_compiling(folder, args, count, mesh, num_prompts=len(prompts))
    images = text_to_image.generate(
        pipe,
        prompts,
        num_images_per_prompt=args.num_images_per_prompt,
        seed=args.seed,
        latents=latents,
        **_sampler_settings(args, mesh),
    )
    with _all_or_nothing(args.out) as written:
        for i, image in enumerate(images):
            written.append(args.out / f"{i:05d}.png")
            save_png(image, written[-1])
        written.append(args.out / "images.npz")
        write_npz(
            written[-1],
            images=images.astype(np.float32),
            prompts=np.asarray(np.repeat(prompts, args.num_images_per_prompt)),
        )
    print(f"wrote {len(images)} images to {args.out}")


def _read_latents(path: Path) -> np.ndarray:
    """--latents: a finite [N, C, H/8, W/8] .npy array, as NHWC; checked before any model loads."""
    try:
        latents = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --latents {path} is not a readable .npy array ({e})") from None
    if latents.ndim != 4:
        raise SystemExit(
            f"error: {path} holds shape {latents.shape}; expected "
            "[N, C, H/8, W/8] (diffusers' latents layout)"
        )
    if not np.issubdtype(latents.dtype, np.floating) or not np.isfinite(latents).all():
        bad = (
            "not floating point"
            if not np.issubdtype(latents.dtype, np.floating)
            else (f"{int(np.size(latents) - np.isfinite(latents).sum())} NaN/inf values")
        )
        raise SystemExit(
            f"error: --latents {path} holds {bad}; initial noise must be finite floats. "
            "Fix: regenerate the noise (e.g. np.random.standard_normal)."
        )
    return latents.transpose(0, 2, 3, 1)  # diffusers NCHW -> our NHWC


def cmd_integrity(args: argparse.Namespace) -> None:
    """unlearn-jax integrity: mean LPIPS between two models' images from identical noise."""

    from unlearn_jax.metrics.integrity import (
        IntegritySettings,
        compute_integrity,
        write_integrity_report,
    )

    prompts = _prompts(args)
    _fresh_output(args.out, list(INTEGRITY_FILES))
    folders, mesh = _devices_for([args.original, args.unlearned], args)
    original = _load_while_compiling(
        folders[0], args, len(prompts) * args.seeds, mesh, num_prompts=len(prompts)
    )
    unlearned = _load(folders[1], args)
    if dict(original.unet.config) != dict(unlearned.unet.config):
        raise SystemExit(
            "error: the two models have different UNet configs; integrity "
            "compares a model with an unlearned copy of itself."
        )
    sampling = {k: v for k, v in _sampler_settings(args, mesh).items() if k not in ("eta", "mesh")}
    settings = IntegritySettings(seeds=args.seeds, seed=args.seed, **sampling)
    result = compute_integrity(
        original, unlearned, prompts, settings, lpips_net=args.lpips_net, mesh=mesh
    )
    with _all_or_nothing(args.out) as written:
        written.extend(args.out / name for name in INTEGRITY_FILES)
        write_integrity_report(result, args.out)
    summary = {k: result.to_json()[k] for k in ("integrity_lpips", "ci95", "psnr", "ssim")}
    print(json.dumps(summary))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unlearn-jax",
        description="Concept unlearning for diffusers-format text-to-image models in JAX.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="generate images (DDIM by default, classifier-free guidance)")
    p.add_argument(
        "--model", required=True, help="diffusers folder, single-file FILE.safetensors or hub id"
    )
    _add_sampling_args(p)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--num-images-per-prompt", type=POSITIVE_INT, default=1)
    p.add_argument(
        "--eta",
        type=_number(float, 0.0, 1.0),
        default=0.0,
        help="DDIM eta in [0, 1] (0 = deterministic)",
    )
    p.add_argument(
        "--latents",
        type=Path,
        default=None,
        help=".npy initial noise [N, C, H/8, W/8], as diffusers' latents=",
    )
    p.add_argument("--out", type=Path, required=True)
    _add_model_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("integrity", help="LPIPS integrity of an unlearned model vs the original")
    p.add_argument("--original", required=True, help="diffusers folder, FILE.safetensors or hub id")
    p.add_argument(
        "--unlearned", required=True, help="diffusers folder or FILE.safetensors (from export)"
    )
    _add_sampling_args(p)
    p.add_argument("--seeds", type=POSITIVE_INT, default=4, help="images per prompt")
    p.add_argument("--seed", type=SEED, default=0, help="root seed of the shared noise")
    p.add_argument("--lpips-net", default="vgg", choices=["vgg", "alex"])
    p.add_argument("--out", type=Path, required=True)
    _add_model_args(p)
    p.set_defaults(func=cmd_integrity)

    add_unlearn_commands(sub)
    add_attack_command(sub)
    add_demo_command(sub)
    add_plan_command(sub)
    return parser


def quiet_library_noise() -> None:
    """Silences two start-up lines every command printed that are not the user's problem.

    JAX logs "Unable to initialize backend 'tpu' ... libtpu.so" at INFO while
    probing platforms (the CLI's log level is INFO); transformers prints the
    advisory "PyTorch was not found" on import (the tokenizer needs no torch).
    """
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def main(argv: list[str] | None = None) -> None:
    quiet_library_noise()
    parser = build_parser()
    # `unlearn`/`evaluate` take --config.a.b=value overrides, which argparse cannot list.
    args, extra = parser.parse_known_args(argv)
    takes_overrides = args.command in ("unlearn", "evaluate", "export")
    if extra and not takes_overrides:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # force: an imported library may have installed a root handler already (INFO lost).
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True
    )
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
    from unlearn_jax.distributed import initialize_from_env

    initialize_from_env()  # multi-process jobs started by launch/*.sh; else a no-op
    enable_compilation_cache()
    try:
        if takes_overrides:
            args.func(args, extra)
        else:
            args.func(args)
    except (ValueError, OSError, FloatingPointError) as e:
        # Bad input, or a file that cannot be read or written (a full disk, a read-only
        # folder): one clear message, not a traceback. Outputs are written atomically,
        # so nothing half-written is left behind.
        print(f"error: {_describe(e)}", file=sys.stderr)
        raise SystemExit(2) from e
    except KeyboardInterrupt as e:
        print(f"interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        raise SystemExit(130) from e


def _describe(error: Exception) -> str:
    """The message of `error`; OS errors also say which file and what to do."""
    if isinstance(error, OSError) and "Fix:" in str(error.strerror):
        return f"{error.strerror} ({error.filename})" if error.filename else str(error.strerror)
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        where = f" writing {error.filename}" if error.filename else ""
        return (
            f"{error.strerror or error}{where}: the disk (or a quota/file-size limit) is full. "
            "Nothing half-written was kept. Fix: free space or choose another --out/--workdir, "
            "then rerun."
        )
    if isinstance(error, PermissionError):
        return f"{error}. Fix: choose a folder you can write, or fix its permissions."
    return str(error)


def console_main() -> None:
    """The `unlearn-jax` program: `main()` with less of Python's garbage collection.

    Tracing a model makes millions of small objects; with Python's default
    thresholds the collector ran ~670 times in a warm 16-image `unlearn-jax
    sample` run (0.5-0.6 s of its 5-6 s), ~40 times (0.15-0.2 s) with the first
    generation's threshold at 10,000 allocations instead of 700. Every output is
    written and closed when `main` returns; Python's last collection, which walks
    every object the process made (another 0.5 s), is skipped by freezing them
    (the OS reclaims the memory). Only for whole processes: tests call `main`
    in-process, where freezing would keep garbage alive.
    """
    gc.set_threshold(10_000, *gc.get_threshold()[1:])
    main()
    gc.freeze()


if __name__ == "__main__":
    console_main()
