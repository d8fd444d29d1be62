"""The `edgeprune` Typer application and what its command modules share: the consoles, the common argument and
option types, writing a command's JSON result. Not here: any command (cli.py, cli_devices.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Make LLMs small and fast enough for edge devices: score, prune, quantize, export, profile.",
)
console = Console(stderr=True)
out = Console()

ModelArg = Annotated[str, typer.Argument(help="'default', a local HF model directory, a .gguf file or a hub id")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="also write the result as JSON to this path")]


def write_result(path: Path | None, data: dict) -> None:
    """`--json PATH`: also write the command's result there (atomically)."""
    if path is not None:
        from edgeprune.io import write_json

        write_json(path, data)
        console.print(f"wrote {path}")
