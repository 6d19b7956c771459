"""The output folder of a run: built beside the target, state kept for resuming, moved into place at the end.

Reads: ``<out>.partial/run.json`` of an interrupted run. Writes: ``<out>.partial/`` (created, updated), then
renames it to ``<out>``. Invariant: ``<out>`` is never modified before :meth:`RunDir.commit`; it is replaced
only with ``force``; a partial run is resumed only by a run with the same settings (its fingerprint); a
``RunDir(..., write=False)`` (the ranks other than 0 of a distributed run) keeps its state in memory and
touches no file.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

__all__ = ["RunDir", "OutputExistsError", "write_atomic"]


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object], *, unique: bool = False) -> Path:
    """Write a file in one step: ``write(tmp)`` fills a temporary file beside ``path``, which then
    replaces ``path`` (:func:`os.replace`), so a reader or a crash sees the old file or the new one,
    never half of one. If ``write`` raises, the temporary file is removed and the error goes on.
    ``unique`` puts the process id in the temporary name, for several processes writing one path.
    Returns ``path``."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid() if unique else ''}")
    try:
        write(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class OutputExistsError(Exception):
    """The output (or a partial run with other settings) exists and the user did not allow replacing it."""


class RunDir:
    """The output folder of one run: built in ``<out>.partial/``, state in ``run.json``, moved at the end.

    With ``write=False`` it only holds ``state`` (set it to the writing process's state): :meth:`save`,
    :meth:`mark` and :meth:`commit` touch no file, and :meth:`open` must not be called.
    """

    def __init__(
        self,
        out: str | os.PathLike,
        fingerprint: dict,
        *,
        force: bool = False,
        restart: bool = False,
        write: bool = True,
    ):
        self.out = Path(out).expanduser().resolve()
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.shots = self.partial / "shots"
        self.fingerprint, self.force, self.restart, self.write = fingerprint, force, restart, write
        self.state: dict = {}

    def open(self) -> bool:
        """Check the output can be written, create or reopen the partial folder; True when resuming.

        Raises:
            OutputExistsError: the output exists without ``force``, or a partial run has other settings.
        """
        if not self.write:
            raise RuntimeError("RunDir(write=False) cannot open the output folder; copy the writer's state")
        if self.out.exists() and not self.force:
            raise OutputExistsError(f"{self.out} already exists; pass --force to replace it (at the end of the run)")
        if self.out.exists() and not self.out.is_dir():
            raise OutputExistsError(f"{self.out} exists and is not a folder; choose another --out")
        state_file = self.partial / "run.json"
        if self.partial.exists() and not self.restart:
            try:
                self.state = json.loads(state_file.read_text())
            except (OSError, ValueError) as e:
                raise OutputExistsError(
                    f"{self.partial} exists but holds no readable run.json; pass --restart to discard it"
                ) from e
            if self.state.get("fingerprint") != self.fingerprint:
                old = self.state.get("fingerprint", {})
                diff = {k: (old.get(k), v) for k, v in self.fingerprint.items() if old.get(k) != v}
                raise OutputExistsError(
                    f"{self.partial} holds an interrupted run with other settings {diff} (old, new); run the "
                    "same command to resume it, or pass --restart to discard it"
                )
            return True
        if self.partial.exists():
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)
        self.state = {"fingerprint": self.fingerprint, "done": {}, "points": {}}
        self.save()
        return False

    def save(self) -> None:
        if not self.write:
            return
        text = json.dumps(self.state, indent=1, default=str)
        write_atomic(self.partial / "run.json", lambda tmp: tmp.write_text(text))

    def done(self, stage: str):
        return self.state["done"].get(stage)

    def mark(self, stage: str, result) -> None:
        self.state["done"][stage] = result
        self.save()

    def commit(self) -> Path:
        """Drop the run state, move the partial folder to the output (replacing it with ``force``)."""
        if not self.write:
            return self.out
        shutil.rmtree(self.shots, ignore_errors=True)
        (self.partial / "run.json").unlink(missing_ok=True)
        if self.out.exists():
            old = self.out.with_name(f"{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
            os.replace(self.partial, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.partial, self.out)
        return self.out
