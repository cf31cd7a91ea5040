"""Options and output helpers the commands share."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

StorageOpt = Annotated[
    str | None,
    typer.Option(
        "--storage",
        help="Storage URL (sqlite:///FILE or postgresql://...); default: "
        "$TLOPT_STORAGE, else sqlite:///studies/tlopt.db.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send what this process and its workers write to descriptor 1 to stderr (for --json)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):  # learning rates such as 3e-05 in scientific notation
            return f"{v:.4f}" if v == 0 or abs(v) >= 1e-3 else f"{v:.0e}"
        if isinstance(v, dict):
            return " ".join(f"{k}={fmt(x)}" for k, x in v.items())
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


DeviceOpt = Annotated[
    str, typer.Option(help="auto (the GPU when there is one), cpu, cuda or cuda:N.")
]
BatchOpt = Annotated[int, typer.Option(help="Images per forward pass.")]
ModelDirOpt = Annotated[Path, typer.Option("--model", help="Folder written by export-best.")]
ImagesOpt = Annotated[
    Path, typer.Option("--images", help="Image file or folder (any layout, recursive).")
]
