"""Checkpoints (orbax) and the run record that decides whether a workdir may be resumed.

Layout of a workdir:

  run.json          what the run is (the fingerprint) and its full config
  checkpoints/<step>/  orbax checkpoints of the `TrainState` (resume: the latest)
  checkpoints.incomplete/  step folders that were found half-written (moved aside,
                      deleted once a complete checkpoint of a later or equal step exists)

Orbax writes a step into a temporary folder and renames it when complete, so
a run killed while saving leaves either the previous steps only, or a
`<step>.orbax-checkpoint-tmp-*` folder that is never taken for a checkpoint.
As a second line of defence a step folder without orbax's metadata file is
treated as incomplete and moved aside before resuming.

The fingerprint lists every setting that changes what the run computes
(model, prompt sets, method, trained parameters, hyperparameters, optimizer,
seed, batch layout); `train.steps` is deliberately not in it, so raising it
extends a run. Resuming a workdir whose fingerprint differs is refused.

A checkpoint whose arrays are not laid out as this version's `TrainState`
(names and shapes; e.g. the flat optimizer state of versions before the
per-parameter state, see `unlearn.params`) is refused with
`CheckpointLayoutError` before orbax reads it; `restore_params` still reads
its parameters, which every layout keeps per parameter, so such a run can
be evaluated and exported.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from unlearn_jax import atomic_files
from unlearn_jax.trainer.state import TrainState

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
CHECKPOINT_DIR = "checkpoints"
INCOMPLETE_DIR = "checkpoints.incomplete"
_METADATA_FILE = "_CHECKPOINT_METADATA"  # written by orbax as part of every finished step
_TMP_MARK = ".orbax-checkpoint-tmp"


class FingerprintMismatchError(ValueError):
    """The workdir holds a different run than the config describes."""


class CheckpointLayoutError(ValueError):
    """A checkpoint's arrays are not laid out as the train state this version resumes."""


def write_json_atomic(path: Path, payload: Any) -> None:
    """Writes JSON to a temporary file and renames it: readers see the old or the new file."""
    atomic_files.write_json(path, payload, sort_keys=True, default=str)


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fingerprint_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Lines 'field: old -> new' for every field whose value differs (sorted by field)."""
    lines = []
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            lines.append(
                f"  {key}: {_short(old.get(key, '<absent>'))} -> {_short(new.get(key, '<absent>'))}"
            )
    return lines


def check_run_record(
    workdir: Path, fingerprint: dict[str, Any], config: dict[str, Any], *, force_resume: bool
) -> bool:
    """Refuses a workdir that holds another run; writes the record for a new one.

    Args:
      workdir: the run's folder.
      fingerprint: JSON-able dict of what the run is (see module docstring).
      config: the full config as a JSON-able dict (stored for `evaluate`/`export`).
      force_resume: resume despite differences (the record is then rewritten).
    Returns:
      True when the workdir already held this run (a resume), False for a new run.
    Raises:
      FingerprintMismatchError: naming the differing fields and the two ways out.
    """
    path = Path(workdir) / RUN_FILE
    record = {"fingerprint": fingerprint, "config": config}
    if not path.is_file():
        if jax.process_index() == 0:
            write_json_atomic(path, record)
        return False
    old = json.loads(path.read_text()).get("fingerprint", {})
    # Round-trip through JSON so tuples and lists compare equal.
    new = json.loads(json.dumps(fingerprint, default=str))
    differences = fingerprint_differences(old, new)
    if differences and not force_resume:
        raise FingerprintMismatchError(
            f"{workdir} holds a different run; refusing to resume it. Differing fields "
            "(workdir -> now):\n" + "\n".join(differences) + "\nFix: use a new --workdir for "
            "the new run, or pass --config.train.force_resume=True to continue this "
            "run's checkpoints under the new settings."
        )
    if differences:
        log.warning("force_resume: continuing despite changed fields:\n%s", "\n".join(differences))
    if jax.process_index() == 0:
        write_json_atomic(path, record)
    return True


def read_run_record(workdir: str | os.PathLike) -> dict[str, Any]:
    """{'fingerprint': ..., 'config': ...} stored by the run in `workdir` (for evaluate/export)."""
    path = Path(workdir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: {workdir} is not the workdir of an unlearning run. "
            "Fix: pass the --workdir given to `unlearn-jax unlearn`."
        )
    return json.loads(path.read_text())


def _is_complete(step_dir: Path) -> bool:
    return (step_dir / _METADATA_FILE).is_file()


def set_aside_incomplete(checkpoint_dir: Path) -> list[str]:
    """Moves half-written step folders out of `checkpoint_dir`; returns their names.

    Both orbax's temporary folders and step folders without its metadata file
    go to `<workdir>/checkpoints.incomplete/`, so that neither a restore nor a
    later save at the same step can trip over them. Nothing is deleted here;
    `Checkpoints.save` deletes them once a complete checkpoint supersedes them.
    """
    if not checkpoint_dir.is_dir() or jax.process_index() != 0:
        return []
    moved = []
    for entry in sorted(checkpoint_dir.iterdir()):
        if not entry.is_dir():
            continue
        step_like = entry.name.split(".")[0].isdigit()
        if step_like and (_TMP_MARK in entry.name or not _is_complete(entry)):
            target_dir = checkpoint_dir.parent / INCOMPLETE_DIR
            target_dir.mkdir(exist_ok=True)
            shutil.move(str(entry), str(target_dir / f"{entry.name}-{int(time.time())}"))
            moved.append(entry.name)
    if moved:
        log.warning(
            "ignored incomplete checkpoint(s) %s (an interrupted save); moved to %s",
            ", ".join(moved),
            checkpoint_dir.parent / INCOMPLETE_DIR,
        )
    return moved


class Checkpoints:
    """The run's orbax `CheckpointManager`: save every `every` steps, keep the last `keep`.

    Saves are synchronous on purpose: the NaN guard must know a state is good
    before it is written, and a save that returned is on disk.
    """

    def __init__(self, workdir: str | os.PathLike, *, keep: int = 2):
        self.directory = Path(workdir).absolute() / CHECKPOINT_DIR
        self.incomplete = set_aside_incomplete(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep and keep > 0 else None,
            create=True,
            enable_async_checkpointing=False,
        )
        # The handler up front (not inferred at the first save or restore), so that the
        # saved layout can be read (`saved_shapes`) before anything is restored.
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=ocp.StandardCheckpointHandler()
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        """{'/'-joined path: shape} of every array saved at `step`, read from its metadata."""
        return _leaf_shapes(self.manager.item_metadata(step).tree)

    def save(self, state: TrainState) -> int:
        """Writes `state` under its step (replacing nothing); returns the step."""
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return step
        try:
            self.manager.save(step, args=ocp.args.StandardSave(state.to_checkpoint()))
            self.manager.wait_until_finished()
        except OSError as e:
            # A full disk surfaced as dozens of orbax/tensorstore tracebacks; one line instead.
            # Orbax commits a step by renaming its temporary folder, so nothing half-written
            # is ever taken for a checkpoint.
            kept = self.latest_step()
            kept = f"the checkpoint of step {kept} is kept" if kept is not None else "none is kept"
            raise OSError(
                e.errno,
                f"could not write the checkpoint of step {step} ({e.strerror or e}); {kept}. "
                "Fix: free space in the workdir's filesystem, then rerun the same command to "
                "resume",
                str(self.directory),
            ) from e
        self._prune_incomplete(step)
        return step

    def _prune_incomplete(self, step: int) -> None:
        """Deletes set-aside half-written steps <= `step`: a complete checkpoint supersedes them.

        Only folders `set_aside_incomplete` moved into checkpoints.incomplete/ are
        touched (named '<step>...-<time>'); anything else there is left alone.
        """
        folder = self.directory.parent / INCOMPLETE_DIR
        if jax.process_index() != 0 or not folder.is_dir():
            return
        for entry in folder.iterdir():
            head = entry.name.split(".")[0].split("-")[0]
            if entry.is_dir() and head.isdigit() and int(head) <= step:
                shutil.rmtree(entry)
                log.info(
                    "deleted %s: superseded by the complete checkpoint of step %d", entry, step
                )
        if not any(folder.iterdir()):
            folder.rmdir()

    def restore(self, target: TrainState, step: int | None = None) -> TrainState:
        """The state saved at `step` (default: latest), laid out like `target`.

        Args:
          target: a TrainState of ShapeDtypeStructs with `.sharding` set (where
            each restored array should live).
        Raises:
          CheckpointLayoutError: the saved arrays differ from `target`'s (names or
            shapes), e.g. a checkpoint of the flat optimizer state.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        tree = target.to_checkpoint()
        _check_layout(self.directory / str(step), self.saved_shapes(step), _leaf_shapes(tree))
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(tree))
        return TrainState.from_checkpoint(restored)

    def restore_params(self, params: dict[str, Any], step: int) -> dict[str, jax.Array]:
        """The trainable parameters saved at `step`, laid out like `params` (ShapeDtypeStructs).

        The rest of the state is read as it was saved, whatever its layout, so this
        works for every checkpoint whose parameters match (`evaluate`, `export`).
        """
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        as_saved = lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)
        tree = jax.tree.map(as_saved, self.manager.item_metadata(step).tree)
        tree["params"] = params
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(tree))
        return restored["params"]

    def close(self) -> None:
        self.manager.close()


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{'/'-joined key path: shape} of the array leaves of a state tree (None: no leaf)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape)
        for path, leaf in leaves
    }


def _check_layout(
    step_dir: Path, saved: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]
) -> None:
    """Raises CheckpointLayoutError naming the problem and the fix unless `saved == expected`."""
    if saved == expected:
        return
    # A saved array where this version has one array per parameter under that path.
    flat = sorted(
        p for p in saved if p not in expected and any(q.startswith(p + "/") for q in expected)
    )
    if flat:
        what = "optimizer state and SalUn's mask" if "saliency" in flat else "optimizer state"
        vectors = ", ".join(f"{p} {saved[p]}" for p in flat)
        raise CheckpointLayoutError(
            f"{step_dir} holds the {what} as one flat vector of all trainable parameters "
            f"({vectors}), the layout of unlearn_jax before the train state went per "
            "parameter; this version keeps one array per parameter and cannot resume from "
            "it. Fix: run it again from step 0 in a new --workdir; `unlearn-jax export` and "
            "`unlearn-jax evaluate` still read this checkpoint's parameters."
        )
    differing = sorted(p for p in set(saved) | set(expected) if saved.get(p) != expected.get(p))
    lines = [
        f"  {p}: {saved.get(p, '<absent>')} -> {expected.get(p, '<absent>')}" for p in differing
    ]
    more = f"\n  ... and {len(lines) - 8} more" if len(lines) > 8 else ""
    raise CheckpointLayoutError(
        f"{step_dir} does not hold the train state this run resumes; differing arrays "
        "(saved -> expected):\n" + "\n".join(lines[:8]) + more + "\nFix: resume it with the "
        "settings and unlearn_jax version that wrote it, or run it again in a new --workdir."
    )
