"""``fisherlora report``: the closing summary table of an output directory (also printed by ``init``)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["print_summary", "run"]


def print_summary(report: dict, out_dir) -> None:
    from rich.console import Console
    from rich.table import Table

    from fisherlora.report import summary_rows

    table = Table(title=f"fisherlora → {out_dir}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in summary_rows(report):
        table.add_row(k, v)
    Console(stderr=False).print(table)


def run(args) -> int:
    path = Path(args.output) / "report.json"
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist: not a fisherlora output directory")
    try:
        report = json.loads(path.read_text())
        if not isinstance(report, dict) or not isinstance(report.get("layers"), list):
            raise ValueError("it is not a fisherlora report (no list of layers)")
        print_summary(report, args.output)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{str(path)!r} cannot be read as a fisherlora report: {exc}") from None
    return 0

