"""`edgeprune report RUN_DIR --readme README.md [--block NAME]`: the run's results table between the run-table
markers of a README (or of the block NAME, `<!-- run-table:NAME:start -->`, in any Markdown file). Does NOT write the report itself (edgeprune/report.py).
"""

from __future__ import annotations

import re
from pathlib import Path

from edgeprune.errors import EdgePruneError
from edgeprune.report import md_table, method_summary, summary_rows

README_START = "<!-- run-table:start -->"
README_END = "<!-- run-table:end -->"


def readme_table(data: dict) -> str:
    header, rows = summary_rows(data)
    m = data.get("models", {}).get("baseline") or {}
    p = (data.get("prune") or {}).get("config") or {}
    lines = [f"Model `{data.get('model')}`, {method_summary(p)}, ratio {p.get('ratio', 0):g}; device profile "
             f"`{data.get('device')}`" + (f"; PPL on {m['ppl_text']}, seq {m['ppl_seq_len']}, first "
                                          f"{m['ppl_tokens']:,} tokens" if m else "") + ". Changes are relative "
             "to the unpruned model in the same runtime and dtype.", ""]
    lines += md_table(header, rows)
    return "\n".join(lines).rstrip() + "\n"


def markers(block: str = "") -> tuple[str, str]:
    """The start and end markers of the run-table block named ``block`` ("" = the README's one block)."""
    if not block:
        return README_START, README_END
    if not re.fullmatch(r"[A-Za-z0-9._-]+", block):
        raise EdgePruneError(f"--block {block!r}: use letters, digits, '.', '_' and '-'")
    return f"<!-- run-table:{block}:start -->", f"<!-- run-table:{block}:end -->"


def update_readme(readme: str | Path, data: dict, block: str = "") -> None:
    """Replace the block between the run-table markers (of the block named ``block``, when given) of ``readme``
    with this run's results table, so that several runs' tables can live in one file (BENCHMARKS.md)."""
    start, end = markers(block)
    path = Path(readme)
    try:
        text = path.read_text()
    except OSError as e:
        raise EdgePruneError(f"cannot read {path}: {e.strerror}") from None
    # the markers on lines of their own (prose may mention them)
    m = re.search(rf"^{re.escape(start)}[ \t]*\n(?:.*\n)*?{re.escape(end)}[ \t]*$", text, re.M)
    if m is None:
        raise EdgePruneError(f"{path} has no '{start}' ... '{end}' block (each marker on a line of its own)")
    command = f"edgeprune report {data['run_dir']} --readme {path.name}" + (f" --block {block}" if block else "")
    new = f"{start}\n<!-- written by `{command}`; do not edit by hand -->\n{readme_table(data)}{end}"
    path.write_text(text[:m.start()] + new + text[m.end():])
