"""REPORT.md for `msif reproduce`: one table with the paper's number beside msif's, then each figure."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig

from msif import __version__
from msif.io import atomic_write_text


@dataclass
class Entry:
    """One experiment's row of the report."""

    id: str
    title: str
    paper: str
    measured: str
    settings: str
    compute: float  # seconds the runs it used took when they were computed (recorded in their folders)
    figures: list[str]
    runs: list[str]
    note: str = ""
    wall: float = 0.0  # seconds this invocation spent on it (small when the runs were reused)
    validation: dict[str, dict[str, str]] | None = None  # row (data set, case) -> {VALIDATION_COLUMNS key: cell}


# The validation table's columns, in order: the key each experiment kind fills (reproduce's handlers) -> its header.
VALIDATION_COLUMNS = {
    "loo": "leave-one-out r [95% CI]",
    "ceiling": "noise ceiling",
    "stability": "stability r (top-100 overlap)",
    "identity": "identity r; msif − identity [95% CI]",
    "lds": "LDS [95% CI]",
    "lds_baselines": "LDS identity; single-stage",
    "faults": "planted faults in the top 10%: by score magnitude; by pretrain loss",
}


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def seconds(x: float) -> str:
    """Seconds for a table: one decimal below 10 s (a fast run is not "0"), whole seconds above."""
    return f"{x:,.1f}" if x < 10 else f"{x:,.0f}"


def validation_table(entries: list[Entry]) -> list[str]:
    """The validation table (one row per data set and case) from the experiments that fill it, as markdown lines;
    none when no experiment does. *this run* adds up the seconds this invocation spent on the row's experiments."""
    rows: dict[str, dict[str, str]] = {}
    spent: dict[str, float] = {}
    for e in entries:
        for row, cells in (e.validation or {}).items():
            if unknown := set(cells) - set(VALIDATION_COLUMNS):
                raise ValueError(f"{e.id}: validation cells {sorted(unknown)} are not columns of the table")
            rows.setdefault(row, {}).update(cells)
            spent[row] = spent.get(row, 0.0) + e.wall
    if not rows:
        return []
    columns = [c for c in VALIDATION_COLUMNS if any(c in cells for cells in rows.values())]
    lines = [
        "## Validation table",
        "",
        "| data set, case | " + " | ".join(VALIDATION_COLUMNS[c] for c in columns) + " | this run (s) |",
        "|---|" + "---|" * len(columns) + "---:|",
    ]
    for row, cells in rows.items():
        lines.append(
            f"| {_cell(row)} | " + " | ".join(_cell(cells.get(c, "–")) for c in columns) + f" | {seconds(spent[row])} |"
        )
    return [*lines, ""]


def write_report(folder: Path, plan: DictConfig, entries: list[Entry], compute: float, wall: float) -> Path:
    """Write folder/REPORT.md (atomically) and return its path."""
    lines = [
        f"# msif reproduction report: plan `{plan.name}`",
        "",
        f"{plan.description}".strip(),
        "",
        f"Generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} by `msif reproduce plan={plan.name}` "
        f"(msif {__version__}, commit {_commit()}) on {platform.machine()} with {os.cpu_count()} CPU cores, "
        f"profile `{plan.profile}`.",
        "",
        "*compute* is what the runs an experiment used took when they were computed (recorded in their run folders; "
        "a run shared by two experiments counts for both here and once in the total); *this run* is what this "
        "invocation spent (small when finished runs were reused).",
        "",
        "| experiment | paper | msif | settings | compute (s) | this run (s) |",
        "|---|---|---|---|---:|---:|",
    ]
    for e in entries:
        lines.append(
            f"| {_cell(e.title)} | {_cell(e.paper)} | {_cell(e.measured)} | {_cell(e.settings)} | "
            f"{seconds(e.compute)} | {seconds(e.wall)} |"
        )
    lines += [
        "",
        f"Total compute of the distinct runs behind this report: {compute:,.0f} s ({compute / 3600:.2f} h); "
        f"this invocation: {wall:,.0f} s.",
        "",
    ]
    lines += validation_table(entries)
    for e in entries:
        lines += [f"## {e.title}", "", f"Paper: {e.paper}. msif: {e.measured}.", "", f"Settings: {e.settings}.", ""]
        if e.note:
            lines += [e.note.strip(), ""]
        lines += [f"![{e.id}](figures/{name})" for name in e.figures]
        lines += ["", "Run folders: " + ", ".join(f"`{r}`" for r in e.runs), ""]
    for title, text in (plan.get("not_reproduced") or {}).items():
        lines += [f"## {title} (not reproduced)", "", str(text).strip(), ""]
    path = Path(folder) / "REPORT.md"
    atomic_write_text("\n".join(lines), path)
    return path
