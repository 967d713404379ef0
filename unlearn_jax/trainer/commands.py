"""The `unlearn`, `evaluate` and `export` subcommands of `unlearn-jax`.

    unlearn-jax unlearn  --config FILE.py[:ARGS] --workdir DIR [--config.a.b=value ...]
    unlearn-jax evaluate --config FILE.py[:ARGS] --workdir DIR [--config.a.b=value ...]
    unlearn-jax export   --workdir DIR --out PATH

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
from unlearn_jax.trainer.config_checks import check_config_values
from unlearn_jax.trainer.config_file import load_config, split_overrides

log = logging.getLogger(__name__)


def _config_from(args: argparse.Namespace, extra: Sequence[str]):
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
    from unlearn_jax.trainer.train import export

    if extra:
        raise SystemExit(f"unrecognized arguments: {' '.join(extra)}")
    quiet_library_logs()
    print(export(args.workdir, args.out))
    return 0


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
        "export", help="write the latest checkpoint as a diffusers folder"
    )
    export.add_argument("--workdir", required=True, help="the run's folder")
    export.add_argument("--out", required=True, help="new folder for the diffusers pipeline")
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
