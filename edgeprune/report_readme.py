"""`edgeprune report RUN_DIR --readme README.md`: the run's results table between the run-table markers of a
README. Does NOT write the report itself (edgeprune/report.py).
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


def update_readme(readme: str | Path, data: dict) -> None:
    """Replace the block between the run-table markers of ``readme`` with this run's results table."""
    path = Path(readme)
    try:
        text = path.read_text()
    except OSError as e:
        raise EdgePruneError(f"cannot read {path}: {e.strerror}") from None
    # the markers on lines of their own (prose may mention them)
    m = re.search(rf"^{re.escape(README_START)}[ \t]*\n(?:.*\n)*?{re.escape(README_END)}[ \t]*$", text, re.M)
    if m is None:
        raise EdgePruneError(f"{path} has no '{README_START}' ... '{README_END}' block (each marker on a line of "
                             "its own)")
    block = (f"{README_START}\n<!-- written by `edgeprune report {data['run_dir']} --readme {path.name}`; "
             f"do not edit by hand -->\n{readme_table(data)}{README_END}")
    path.write_text(text[:m.start()] + block + text[m.end():])
