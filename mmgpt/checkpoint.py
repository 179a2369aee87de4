"""Atomic checkpoints: everything is written into a temporary folder that is renamed only once complete.

A folder named `step-N` is therefore always whole; `.tmp-*` folders are leftovers of an interrupted write.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    folder = checkpoints_dir(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def temporary_folder(final: Path) -> Path:
    """Where `final` is written before it is renamed; the same path in every process of a run."""
    return final.parent / f".tmp-{final.name}"


def commit(tmp: Path, final: Path) -> Path:
    """Rename the complete folder `tmp` to `final`, replacing an older `final` only once the new one is whole."""
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def write_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a fresh temporary folder beside `final`, then rename it to `final`.

    If `write` fails (disk full, an error while saving) the temporary folder is removed and `final`, if it
    existed, is untouched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_folder(final)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        return commit(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_pickles(folder: Path) -> None:
    """Refuse a checkpoint whose pickled files (RNG states, optimizer, scheduler) hold anything but tensors and
    plain data, naming the file and what it holds.

    accelerate loads the optimizer and scheduler with `weights_only=True` but ends in torch's advice to retry
    with `weights_only=False`, and it swallows a failure to load the RNG states and goes on; here both are one
    error before anything is loaded. Memory-mapped, so an optimizer file is checked without being read.
    """
    from accelerate.utils import load  # torch.load(weights_only=True) that also admits numpy's RNG state

    for path in sorted([*folder.glob("*.pkl"), *folder.glob("*.bin")]):
        try:
            load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:
            found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(error))
            holds = f"it holds {found.group(1)}" if found else type(error).__name__
            raise ValueError(f"refusing to load {path}: not a plain tensor/state file ({holds})") from None


def save_trainer_state(folder: Path, state: dict) -> None:
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


def load_trainer_state(folder: Path) -> dict:
    return json.loads((folder / STATE_FILE).read_text())


def prune(output_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, and leftovers of interrupted writes."""
    for _, path in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    folder = checkpoints_dir(output_dir)
    for path in folder.glob(".tmp-*") if folder.is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)
