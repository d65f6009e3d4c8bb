"""Markdown tables for the report and the decoder comparison, with one number format for both."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

# The table of every trial, in this order (columns a sweep lacks are left out).
TABLE_COLUMNS = [
    "config",
    "status",
    "parameters",
    "flops_per_frame",
    "steps",
    "step_budget",
    "final_nll",
    "test_nats_per_frame",
    "test_floor_nats_per_frame",
    "excess",
    "iterations_to_converge",
    "plateaus",
    "steps_per_second",
    "error",
    "run_id",
]


def format_cell(value: Any) -> str:
    """A value as a table shows it: "-" for none, yes/no, integers with thousands separated, 4 significant
    digits (an exponent from 1e5), plateaus as "first-last" ranges."""
    if isinstance(value, (list, tuple)):
        return ", ".join(f"{a}-{b}" for a, b in value) if value else "none"
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"  # parameters and FLOPs: thousands separated
    if isinstance(value, (float, np.floating)) and float(value).is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"  # integer columns that pandas holds as float because of a NaN
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def md_text(value: Any) -> str:
    """Text from outside the report (a trial's error, a label) as markdown shows it verbatim: one line,
    and no link, image or code span it could open (brackets, backticks and backslashes escaped). Raw
    HTML needs no escape here: the HTML page is rendered with it off (pipeline.report.build.to_html)."""
    text = " ".join(str(value).split())
    for ch in ("\\", "`", "[", "]", "*"):
        text = text.replace(ch, "\\" + ch)
    return text


def markdown_table(df: pd.DataFrame, columns: Sequence[str] | Mapping[str, str]) -> str:
    """One row per row of df. columns: the columns to show, each headed by its name, or {column: header};
    columns df lacks are left out. A status other than FINISHED is bold."""
    headers = dict(columns) if isinstance(columns, Mapping) else {c: c for c in columns}
    cols = [c for c in headers if c in df.columns]
    lines = ["| " + " | ".join(headers[c] for c in cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        cells = []
        for c in cols:
            text = format_cell(row[c]).replace("|", "/")  # a cell holds no table syntax
            if isinstance(row[c], str):
                text = md_text(text)
            if c == "status" and row[c] != "FINISHED":
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
