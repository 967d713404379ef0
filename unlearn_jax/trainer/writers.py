"""Metric writers of a run: `metrics.jsonl` always, TensorBoard through clu when available.

clu's writer (`clu.metric_writers.create_default_writer`) writes TensorBoard
scalars and images through TensorFlow (`pip install unlearn_jax[tensorboard]`);
without TensorFlow the run still logs every scalar to `<workdir>/metrics.jsonl`
(one JSON object per line: {"step": s, "name": value, ...}) and to the Python
log, and images only reach disk as PNG files. Only process 0 writes files.
`train.tensorboard=False` turns TensorBoard off (it spares TensorFlow's import).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax

from unlearn_jax import atomic_files

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class JsonlWriter:
    """Appends {"step": s, **scalars} lines to a file (resumed runs keep appending)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = self.path.open("a", encoding="utf-8")

    def resume_at(self, step: int) -> None:
        """Drops rows of steps after `step` (logged before a crash, recomputed on resume).

        A resumed run repeats the steps after its checkpoint; without this the
        file held those steps twice. The file is rewritten atomically.
        """
        self._file.flush()
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if not line.strip() or json.loads(line)["step"] <= step]
        if len(kept) == len(lines):
            return
        self._file.close()
        atomic_files.write_text(self.path, "".join(kept))
        self._file = self.path.open("a", encoding="utf-8")

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        row = {"step": int(step)}
        for name, value in scalars.items():
            value = float(value)
            row[name] = value if math.isfinite(value) else str(value)
        self._file.write(json.dumps(row) + "\n")

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        del step, images  # images are PNG files next to the evaluation reports

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class LoggingWriter:
    """Writes scalars to the Python log, one line per call."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        text = ", ".join(f"{k}={float(v):.6g}" for k, v in sorted(scalars.items()))
        log.info("step %d: %s", step, text)

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        del step, images

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class MultiWriter:
    """Fans every call out to several writers."""

    def __init__(self, writers: list[Any]):
        self.writers = writers

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for writer in self.writers:
            writer.write_scalars(step, scalars)

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """images: name -> uint8 or [0, 1] float array [N, H, W, C] (or [H, W, C])."""
        images = {k: v if v.ndim == 4 else v[None] for k, v in images.items()}
        for writer in self.writers:
            writer.write_images(step, images)

    def resume_at(self, step: int) -> None:
        """Forgets what was logged after `step` where a writer can (metrics.jsonl)."""
        for writer in self.writers:
            if hasattr(writer, "resume_at"):
                writer.resume_at(step)

    def flush(self) -> None:
        for writer in self.writers:
            writer.flush()

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def _tensorboard_writer(workdir: Path) -> Any | None:
    try:
        from clu import metric_writers
    except ImportError as e:  # clu's summary writer needs TensorFlow
        log.info("TensorBoard summaries off (%s); scalars go to %s", e, METRICS_FILE)
        return None
    return metric_writers.create_default_writer(str(workdir), asynchronous=False)


def create_writer(workdir: str | Path, tensorboard: bool = True) -> MultiWriter:
    """The run's writer: JSONL + TensorBoard (when available) on process 0, logging elsewhere."""
    workdir = Path(workdir)
    if jax.process_index() != 0:
        return MultiWriter([LoggingWriter()])
    writers: list[Any] = [JsonlWriter(workdir / METRICS_FILE)]
    board = _tensorboard_writer(workdir) if tensorboard else None
    # clu's default writer logs as well; without it, log ourselves.
    writers.append(board if board is not None else LoggingWriter())
    return MultiWriter(writers)


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    """All rows of `<workdir>/metrics.jsonl`, in order."""
    path = Path(workdir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
