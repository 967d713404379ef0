"""The `unlearn-jax` command: thin argument parsing over importable, tested functions.

The command-line contract (DESIGN.md) is stable; other tools rely on it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from unlearn_jax.demo import add_demo_command
from unlearn_jax.plan import add_plan_command
from unlearn_jax.unlearn.commands import add_unlearn_commands

# Compiled programs are kept here across runs (a rerun of the same command on the
# same model skips XLA compilation). UNLEARN_JAX_COMPILATION_CACHE=DIR moves it,
# =off disables it; JAX_COMPILATION_CACHE_DIR, when set, wins.
COMPILATION_CACHE_ENV = "UNLEARN_JAX_COMPILATION_CACHE"
# diffusion.solvers.SCHEDULERS, spelled out so that parsing arguments imports no JAX.
SCHEDULERS = ("ddim", "dpmpp_2m", "euler")


def enable_compilation_cache() -> str | None:
    """Turns on JAX's persistent compilation cache for this process; returns its folder."""
    import jax

    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    setting = os.environ.get(COMPILATION_CACHE_ENV, "")
    if setting.lower() in ("off", "0", "false", "no"):
        return None
    folder = Path(setting or Path.home() / ".cache" / "unlearn_jax" / "xla").expanduser()
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return str(folder)


def read_prompt_file(path: Path) -> list[str]:
    """Prompts from a text file, one per line; blank lines are skipped."""
    if not path.is_file():
        raise SystemExit(f"error: prompt file {path} does not exist")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


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
    p.add_argument("--batch-size", type=int, default=8, help="images per compiled chunk")


def _add_sampling_args(p: argparse.ArgumentParser, steps: int = 50) -> None:
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", type=Path, help="text file, one prompt per line")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument(
        "--guidance",
        type=float,
        default=7.5,
        help="classifier-free guidance weight; <= 1 disables guidance",
    )
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument(
        "--scheduler",
        default="ddim",
        choices=SCHEDULERS,
        help="sampler, built from the model's scheduler config as diffusers does",
    )


def _prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt and args.prompts:
        raise SystemExit("error: give --prompt or --prompts, not both")
    prompts = (
        list(args.prompt)
        if args.prompt
        else (read_prompt_file(args.prompts) if args.prompts else [])
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
    )


def _load_while_compiling(folder: Path, args: argparse.Namespace, num_images: int, mesh):
    """Loads a pipeline while its sampler and decoder compile on a worker thread.

    The programs are compiled from the folder's configs alone (shapes), for
    exactly the settings `generate` is then called with, so that XLA's compile
    time overlaps reading the weights and encoding the prompts.
    """
    from unlearn_jax.diffusion import text_to_image
    from unlearn_jax.models.pipeline import read_structure

    structure = read_structure(folder, dtype=_dtype(args))
    text_to_image.precompile(structure, num_images, **_sampler_settings(args, mesh))
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
    """Refuses to overwrite results a previous run left in `out`."""
    existing = [n for n in names if (out / n).exists()]
    if existing:
        raise SystemExit(
            f"error: {out} already holds {', '.join(existing)}; refusing to "
            "overwrite. Fix: choose another --out or remove those files."
        )
    out.mkdir(parents=True, exist_ok=True)


def cmd_sample(args: argparse.Namespace) -> None:
    """unlearn-jax sample: images from prompts, optionally from given initial noise."""
    from unlearn_jax.diffusion import text_to_image
    from unlearn_jax.metrics.visualize import save_png

    prompts = _prompts(args)
    _fresh_output(args.out, ["images.npz"])
    (folder,), mesh = _devices_for([args.model], args)
    pipe = _load_while_compiling(folder, args, len(prompts) * args.num_images_per_prompt, mesh)
    latents = None
    if args.latents is not None:
        latents = np.load(args.latents)
        if latents.ndim != 4:
            raise SystemExit(
                f"error: {args.latents} holds shape {latents.shape}; expected "
                "[N, C, H/8, W/8] (diffusers' latents layout)"
            )
        latents = latents.transpose(0, 2, 3, 1)  # diffusers NCHW -> our NHWC
    images = text_to_image.generate(
        pipe,
        prompts,
        num_images_per_prompt=args.num_images_per_prompt,
        seed=args.seed,
        latents=latents,
        **_sampler_settings(args, mesh),
    )
    np.savez(
        args.out / "images.npz",
        images=images.astype(np.float32),
        prompts=np.asarray(np.repeat(prompts, args.num_images_per_prompt)),
    )
    for i, image in enumerate(images):
        save_png(image, args.out / f"{i:05d}.png")
    print(f"wrote {len(images)} images to {args.out}")


def cmd_integrity(args: argparse.Namespace) -> None:
    """unlearn-jax integrity: mean LPIPS between two models' images from identical noise."""
    from flax import nnx

    from unlearn_jax.metrics.integrity import compute_integrity, write_integrity_report

    prompts = _prompts(args)
    _fresh_output(args.out, ["integrity.json", "pairs.npz", "grid.png"])
    folders, mesh = _devices_for([args.original, args.unlearned], args)
    original = _load_while_compiling(folders[0], args, len(prompts) * args.seeds, mesh)
    unlearned = _load(folders[1], args)
    if dict(original.unet.config) != dict(unlearned.unet.config):
        raise SystemExit(
            "error: the two models have different UNet configs; integrity "
            "compares a model with an unlearned copy of itself."
        )
    result = compute_integrity(
        original,
        nnx.state(original.unet),
        nnx.state(unlearned.unet),
        prompts,
        seeds=args.seeds,
        seed=args.seed,
        lpips_net=args.lpips_net,
        unlearned_pipe=unlearned,
        **{k: v for k, v in _sampler_settings(args, mesh).items() if k != "eta"},
    )
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
    p.add_argument("--model", required=True, help="diffusers folder or hub id")
    _add_sampling_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images-per-prompt", type=int, default=1)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
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
    p.add_argument("--original", required=True, help="diffusers folder or hub id")
    p.add_argument("--unlearned", required=True, help="diffusers folder (e.g. from export)")
    _add_sampling_args(p)
    p.add_argument("--seeds", type=int, default=4, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="root seed of the shared noise")
    p.add_argument("--lpips-net", default="vgg", choices=["vgg", "alex"])
    p.add_argument("--out", type=Path, required=True)
    _add_model_args(p)
    p.set_defaults(func=cmd_integrity)

    add_unlearn_commands(sub)
    add_demo_command(sub)
    add_plan_command(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
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
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
        # Bad input: one clear message, not a traceback.
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e


if __name__ == "__main__":
    main()
