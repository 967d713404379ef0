"""The `unlearn-jax` command: thin argument parsing over importable, tested functions.

The command-line contract (DESIGN.md) is stable; other tools rely on it.
"""

from __future__ import annotations

import argparse
import errno
import gc
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from unlearn_jax.attacks.command import add_attack_command
from unlearn_jax.command_args import (
    POSITIVE_INT,
    SEED,
    add_model_args,
    add_sampling_args,
    all_or_nothing,
    devices_for,
    fresh_output,
    load_model,
    load_while_compiling,
    number,
    read_prompts,
    sampler_settings,
)
from unlearn_jax.planning import add_plan_command
from unlearn_jax.trainer.commands import add_unlearn_commands
from unlearn_jax.world.demo import add_demo_command

# Compiled programs are kept here across runs (a rerun of the same command on the
# same model skips XLA compilation), in its tokenizers/ each tokenizer folder as
# transformers resolved it (`models.clip_tokenizer`), and in its exported/ the sampler,
# text encoder and decoder as traced (`exported_programs`).
# UNLEARN_JAX_COMPILATION_CACHE=DIR moves it, =off disables it; JAX_COMPILATION_CACHE_DIR,
# when set, wins (compiled programs only).
COMPILATION_CACHE_ENV = "UNLEARN_JAX_COMPILATION_CACHE"
# Programs that took at least this long to compile are written to that cache. JAX's
# default (1 s) left the text encoder's and the VAE decoder's programs out: they compile
# in 0.8-0.9 s on a worker thread while the sampler traces, and a warm 16-image
# `sample` run took 8.1-8.6 s with them recompiled, 6.4-7.0 s with them cached.
CACHE_MIN_COMPILE_S = 0.1
INTEGRITY_FILES = ("integrity.json", "pairs.npz", "grid.png")


def enable_compilation_cache() -> str | None:
    """Turns on JAX's persistent compilation cache for this process, the tokenizer cache
    in its `tokenizers/` and the traced sampling programs in its `exported/` (not in a
    JAX_COMPILATION_CACHE_DIR the user set); returns the compilation cache's folder."""
    import jax

    from unlearn_jax import exported_programs
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
    # The sampling programs as traced by an earlier run, so that warm runs skip tracing.
    exported_programs.set_folder(folder / "exported")
    return str(folder)


def cmd_sample(args: argparse.Namespace) -> None:
    """unlearn-jax sample: images from prompts, optionally from given initial noise."""
    from unlearn_jax.atomic_files import write_npz
    from unlearn_jax.diffusion import text_to_image
    from unlearn_jax.metrics.visualize import save_png

    prompts = read_prompts(args)
    count = len(prompts) * args.num_images_per_prompt
    fresh_output(args.out, ["images.npz", *(f"{i:05d}.png" for i in range(count))])
    latents = None if args.latents is None else _read_latents(args.latents)
    (folder,), mesh = devices_for([args.model], args)
    pipe = load_while_compiling(folder, args, count, mesh, num_prompts=len(prompts))
    images = text_to_image.generate(
        pipe,
        prompts,
        num_images_per_prompt=args.num_images_per_prompt,
        seed=args.seed,
        latents=latents,
        **sampler_settings(args, mesh),
    )
    with all_or_nothing(args.out) as written:
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

    prompts = read_prompts(args)
    fresh_output(args.out, list(INTEGRITY_FILES))
    folders, mesh = devices_for([args.original, args.unlearned], args)
    original = load_while_compiling(
        folders[0], args, len(prompts) * args.seeds, mesh, num_prompts=len(prompts)
    )
    unlearned = load_model(folders[1], args)
    if dict(original.unet.config) != dict(unlearned.unet.config):
        raise SystemExit(
            "error: the two models have different UNet configs; integrity "
            "compares a model with an unlearned copy of itself."
        )
    sampling = {k: v for k, v in sampler_settings(args, mesh).items() if k not in ("eta", "mesh")}
    settings = IntegritySettings(seeds=args.seeds, seed=args.seed, **sampling)
    result = compute_integrity(
        original, unlearned, prompts, settings, lpips_net=args.lpips_net, mesh=mesh
    )
    with all_or_nothing(args.out) as written:
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
    add_sampling_args(p)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--num-images-per-prompt", type=POSITIVE_INT, default=1)
    p.add_argument(
        "--eta",
        type=number(float, 0.0, 1.0),
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
    add_model_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("integrity", help="LPIPS integrity of an unlearned model vs the original")
    p.add_argument("--original", required=True, help="diffusers folder, FILE.safetensors or hub id")
    p.add_argument(
        "--unlearned", required=True, help="diffusers folder or FILE.safetensors (from export)"
    )
    add_sampling_args(p)
    p.add_argument("--seeds", type=POSITIVE_INT, default=4, help="images per prompt")
    p.add_argument("--seed", type=SEED, default=0, help="root seed of the shared noise")
    p.add_argument("--lpips-net", default="vgg", choices=["vgg", "alex"])
    p.add_argument("--out", type=Path, required=True)
    add_model_args(p)
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


# Python's first collection threshold in the `unlearn-jax` program (and in the benchmarks'
# workers that time our side as it runs): 700 allocations by default.
COLLECT_EVERY = 10_000


def collect_less() -> None:
    """Python's garbage collector as the `unlearn-jax` program runs it: the first
    generation collected every `COLLECT_EVERY` allocations instead of 700.

    Tracing a model makes millions of small objects; with Python's default
    thresholds the collector ran ~670 times in a warm 16-image `unlearn-jax
    sample` run (0.5-0.6 s of its 5-6 s), ~40 times (0.15-0.2 s) with this one.
    """
    gc.set_threshold(COLLECT_EVERY, *gc.get_threshold()[1:])


def console_main() -> None:
    """The `unlearn-jax` program: `main()` with less of Python's garbage collection
    (`collect_less`).

    Every output is written and closed when `main` returns; Python's last collection,
    which walks every object the process made (another 0.5 s), is skipped by freezing
    them (the OS reclaims the memory). Only for whole processes: tests call `main`
    in-process, where freezing would keep garbage alive.
    """
    collect_less()
    main()
    gc.freeze()


if __name__ == "__main__":
    console_main()
