"""Atomic result files: write to a temporary file beside the target, then rename over it.

An interrupted run (Ctrl-C, a killed job) leaves either the old file or the new one, never half of one; a file
that a rerun finds damaged or foreign is refused by name (``read_json_result``), never overwritten.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` to produce the file, then move it to ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private (0600); results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json_result(path: str | Path, what: str) -> Any:
    """The JSON that an earlier run left in ``path`` (None where there is no file). A file that cannot be read as
    JSON is a ValueError naming it, ``what`` it should have been, and what to do."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:   # ValueError: not UTF-8, not JSON
        raise not_a_result(path, what, f"it cannot be read as JSON: {e}") from None
    if result is None:   # JSON null: a file, not "no file" (a run would write over it)
        raise not_a_result(path, what, "it holds null")
    return result


def not_a_result(path: str | Path, what: str, why: str) -> ValueError:
    """The error for a file in an output folder that a rerun cannot continue from."""
    return ValueError(f"{path} is not {what} ({why}): delete it or choose another --out")
