"""Atomic output writing: a file is either its old complete self or its new complete self, never half."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from sim.errors import PalsError


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    if path.is_dir():
        raise PalsError(f"{path}: is a folder; expected the path of a file to write (e.g. {path / 'table.csv'})")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise PalsError(f"cannot create output folder {path.parent}: a file of that name is in the way") from None
    except OSError as exc:
        raise PalsError(f"cannot create output folder {path.parent}: {exc.strerror or exc}") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write text to ``path`` atomically."""
    _atomic(Path(path), lambda p: p.write_text(text))


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON (NaN and infinities as null) atomically."""
    write_text_atomic(path, json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n")


def write_parquet_atomic(path: str | Path, df: pd.DataFrame) -> None:
    """Write a DataFrame as Parquet atomically."""
    _atomic(Path(path), lambda p: df.to_parquet(p, index=False, engine="pyarrow"))


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return x if x == x and abs(x) != float("inf") else None
    if hasattr(x, "item"):  # numpy scalars
        return _jsonable(x.item())
    return x
