"""Rendering results: aligned tables for people, JSON for scripts."""

from __future__ import annotations

import enum
import json
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["Output", "print_fields", "print_json", "print_table", "report_error"]


class Output(enum.StrEnum):
    """``--output``: ``table`` for people, ``json`` for scripts."""

    table = "table"
    json = "json"


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def print_fields(fields: Sequence[tuple[str, Any]]) -> None:
    """``name  value`` lines, the values aligned: one record for people to read."""
    width = max((len(name) for name, _ in fields), default=0)
    for name, value in fields:
        print(f"{name + ':':<{width + 1}}  {value}")


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """An aligned table; colour and bold only on a terminal."""
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    # Off a terminal (a pipe, a file) nothing limits the width: never fold a row.
    width = None if sys.stdout.isatty() else 100_000
    Console(soft_wrap=True, width=width).print(table)


def report_error(message: str) -> None:
    """One line on stderr, red on a terminal."""
    text = " ".join(message.split())  # a server's detail may span lines
    first = text.split(" ", 1)[0]
    if first.isalpha() and first.islower():  # a sentence, not a key, path or name
        text = text[:1].upper() + text[1:]
    if sys.stderr.isatty():
        sys.stderr.write(f"\x1b[31mError:\x1b[0m {text}\n")
    else:
        sys.stderr.write(f"Error: {text}\n")
