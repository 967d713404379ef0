"""The `unlearn`, `evaluate` and `export` subcommands of `unlearn-jax`.

    unlearn-jax unlearn  --config FILE.py[:ARGS] --workdir DIR [--config.a.b=value ...]
    unlearn-jax evaluate --config FILE.py[:ARGS] --workdir DIR [--config.a.b=value ...]
    unlearn-jax export   (--workdir DIR | --model PATH) --out PATH
                         [--format folder|single-file] [--unet-only]

`add_unlearn_commands(subparsers)` registers them on the CLI's argparse
subparsers; each parser's `func(args, extra)` runs the command, where
`extra` are the arguments argparse did not know (the `--config.*`
overrides, collected with `parse_known_args`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from unlearn_jax.atomic_files import dumps

log = logging.getLogger(__name__)


def _config_from(args: argparse.Namespace, extra: Sequence[str]):
    # Imported here: ml_collections (with absl and yaml) would cost every other
    # command's start-up 40-80 ms.
    from unlearn_jax.trainer.config_checks import check_config_values
    from unlearn_jax.trainer.config_file import load_config, split_overrides

    quiet_library_logs()
    overrides, rest = split_overrides(extra)
    if rest:
        raise SystemExit(f"unrecognized arguments: {' '.join(rest)}")
    config = load_config(args.config, overrides)
    check_config_values(config)
    return config


def _run_unlearn(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from unlearn_jax.trainer.train import train_and_evaluate

    result = train_and_evaluate(_config_from(args, extra), args.workdir)
    print(dumps(result, indent=2, default=str))
    return 0


def _run_evaluate(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from unlearn_jax.trainer.train import evaluate

    result = evaluate(_config_from(args, extra), args.workdir)
    print(dumps(result, indent=2, default=str))
    return 0


def _run_export(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from unlearn_jax.trainer.restore import convert_model
    from unlearn_jax.trainer.train import export

    if extra:
        raise SystemExit(f"unrecognized arguments: {' '.join(extra)}")
    if (args.workdir is None) == (args.model is None):
        raise SystemExit(
            "error: export takes --workdir DIR (an unlearning run's result) or --model PATH "
            "(convert a model), not both"
            if args.workdir
            else "error: export needs --workdir DIR (an unlearning run) or --model PATH"
        )
    quiet_library_logs()
    model_flags = [
        flag
        for flag, value in (
            ("--model-config", args.model_config),
            ("--prediction-type", args.prediction_type),
            ("--ema", args.ema),
            ("--variant", args.variant),
            ("--allow-pickle", args.allow_pickle),
        )
        if value
    ]
    if args.workdir is not None and model_flags:
        raise SystemExit(
            f"error: {', '.join(model_flags)} apply to --model; a run's export reads how its "
            "model was loaded from the run (run.json). Fix: drop them."
        )
    if args.workdir is not None:
        print(export(args.workdir, args.out, format=args.format, unet_only=args.unet_only))
        return 0
    print(
        convert_model(
            args.model,
            args.out,
            format=args.format,
            unet_only=args.unet_only,
            options=single_file_options(args),
            variant=args.variant,
            allow_pickle=args.allow_pickle,
        )
    )
    return 0


def add_single_file_args(p: argparse.ArgumentParser) -> None:
    """--model-config, --prediction-type and --ema: how a single-file --model is read."""
    p.add_argument(
        "--model-config",
        default=None,
        metavar="DIR",
        help="for a single-file model: a diffusers folder (or its unet/, vae/, text_encoder/ "
        "configs) giving the architecture; default: read from the tensors' shapes",
    )
    p.add_argument(
        "--prediction-type",
        default=None,
        choices=["epsilon", "v_prediction"],
        help="for a single-file model: what its UNet predicts (SD 2.x 768-v: v_prediction); "
        "required unless --model-config has a scheduler/ config",
    )
    p.add_argument(
        "--ema",
        action="store_true",
        help="for a single-file model: load the UNet from its model_ema.* weights",
    )


def single_file_options(args: argparse.Namespace):
    """The `SingleFileOptions` of the flags `add_single_file_args` registers."""
    from unlearn_jax.models.single_file import SingleFileOptions

    return SingleFileOptions(
        model_config=args.model_config, prediction_type=args.prediction_type, ema=args.ema
    )


def quiet_library_logs() -> None:
    """Orbax logs every checkpoint step at INFO through absl; keep the run's own log readable."""
    logging.getLogger("absl").setLevel(logging.WARNING)


_CONFIG_HELP = (
    "experiment config FILE.py[:ARGS] (get_config(ARGS)); override any field with "
    "--config.a.b=value, e.g. --config.model.path=DIR --config.forget.prompts=forget.txt"
)


def add_unlearn_commands(subparsers: argparse._SubParsersAction) -> None:
    """Registers `unlearn`, `evaluate` and `export`; each sets `func(args, extra) -> int`."""
    unlearn = subparsers.add_parser(
        "unlearn",
        help="unlearn a concept (resumes the run in --workdir)",
        description="Unlearn with a config; re-running in the same workdir continues the run "
        "from its latest checkpoint, raising train.steps extends it, and a workdir holding "
        "a different run is refused.",
    )
    unlearn.add_argument("--config", required=True, help=_CONFIG_HELP)
    unlearn.add_argument("--workdir", required=True, help="run folder (checkpoints, metrics, eval)")
    unlearn.set_defaults(func=_run_unlearn)

    evaluate = subparsers.add_parser("evaluate", help="metrics of the latest checkpoint of a run")
    evaluate.add_argument("--config", required=True, help=_CONFIG_HELP)
    evaluate.add_argument("--workdir", required=True, help="the run's folder")
    evaluate.set_defaults(func=_run_evaluate)

    export = subparsers.add_parser(
        "export",
        help="write the latest checkpoint as a diffusers folder or a single-file checkpoint",
        description="Writes a run's latest checkpoint (--workdir), or converts a model "
        "(--model), as a diffusers folder (default) or as one LDM-layout .safetensors file "
        "that AUTOMATIC1111, ComfyUI, InvokeAI and diffusers' from_single_file load.",
    )
    export.add_argument("--workdir", default=None, help="the run's folder")
    export.add_argument(
        "--model",
        default=None,
        help="instead of a run: a model to convert (diffusers folder, FILE.safetensors, hub id)",
    )
    export.add_argument(
        "--out",
        required=True,
        help="new folder (--format folder) or new FILE.safetensors (--format single-file)",
    )
    export.add_argument(
        "--format",
        default="folder",
        choices=["folder", "single-file"],
        help="folder: a diffusers pipeline folder; single-file: one LDM-layout .safetensors",
    )
    export.add_argument(
        "--unet-only",
        action="store_true",
        help="single-file from a single-file model: only the UNet is written; every other "
        "tensor is copied byte for byte from the original file",
    )
    export.add_argument("--variant", default=None, help="with --model: weight-file variant")
    export.add_argument(
        "--allow-pickle",
        action="store_true",
        help="with --model: permit pickled .bin/.ckpt weights (they can run code when loaded)",
    )
    add_single_file_args(export)
    export.set_defaults(func=_run_export)


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry (`python -m unlearn_jax.trainer.commands ...`), same as the CLI's."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="unlearn-jax")
    add_unlearn_commands(parser.add_subparsers(dest="command", required=True))
    args, extra = parser.parse_known_args(argv)
    return args.func(args, extra)


if __name__ == "__main__":
    sys.exit(main())
