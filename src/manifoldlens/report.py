"""A self-contained HTML report of a run: text, tables of numbers and embedded figures."""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Section", "percent", "quantity", "write_report"]


@dataclass
class Section:
    """One part of a report: a title, HTML text, figures with captions and a table whose
    numbers are rounded on the way out (:func:`quantity`); dicts and lists in it are written
    as text ("a: 1, b: 2"), never as JSON."""

    title: str
    text: str = ""
    figures: Sequence[tuple[str, str]] = ()  #: (file relative to the run directory, caption)
    table: dict[str, Any] = field(default_factory=dict)  #: row name → value (numbers rounded)


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:980px;margin:2em auto;
color:#222;line-height:1.45;padding:0 1em}
h1{font-size:1.6em;border-bottom:2px solid #1f5fa8;padding-bottom:.2em}
h2{font-size:1.2em;margin-top:1.8em;color:#1f5fa8}
figure{margin:1em 0;text-align:center}
figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.9em;color:#555;margin-top:.3em}
table{border-collapse:collapse;font-size:.9em;margin:.6em 0}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
th{background:#f4f6fa}
code{background:#f4f6fa;padding:0 .2em}
.meta{color:#666;font-size:.85em}
"""


def quantity(value: Any, unit: str = "", digits: int = 3) -> str:
    """A number for a reader: ``digits`` significant figures (scientific below 10⁻⁴ and from
    10⁶ on), then its unit; ``None`` is a dash.

    >>> quantity(111.398, "s"), quantity(35.09, "°", 2), quantity(2.6e-14), quantity(None)
    ('111 s', '35°', '2.60e-14', '—')
    """
    if value is None:
        return "—"
    if not isinstance(value, float) or not math.isfinite(value):
        text = str(value)
    elif value != 0 and not 1e-4 <= abs(value) < 1e6:
        mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
        text = f"{mantissa}e{int(exponent)}"
    else:  # '#' keeps trailing zeros (1.00); at 10^digits and above, a whole number
        text = f"{value:#.{digits}g}".rstrip(".")
        text = f"{value:.0f}" if "e" in text else text
    if not unit:
        return text
    return text + unit if unit in ("°", "×") else f"{text} {unit}"


def percent(fraction: float, digits: int = 1) -> str:
    """A fraction as a percentage.

    >>> percent(0.97222), percent(1 / 3, 0)
    ('97.2 %', '33 %')
    """
    return f"{100 * fraction:.{digits}f} %"


def _fmt(v: Any) -> str:
    """A table cell: numbers rounded, mappings and sequences as readable text, never JSON."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)) or v is None:
        return html.escape(quantity(v))
    if isinstance(v, dict):
        return ", ".join(f"{html.escape(str(k))}: {_fmt(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return html.escape(str(v))


def _table(rows: dict[str, Any]) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>"
                   for k, v in rows.items())
    return f"<table>{body}</table>"


def _run_tables(doc: dict[str, Any]) -> list[str]:
    """The run's command, settings and environment, from ``run.json``."""
    config = {k: v for k, v in doc.get("config", {}).items() if k not in ("command", "seed")}
    run = {
        "command": " ".join(doc.get("argv", [])) or doc.get("command"),
        "started": str(doc.get("started", "—")).replace("T", " "),
        "wall time (until the report)": quantity(doc.get("wall_time_s"), "s"),
        "seed": doc.get("seed"),
        **{k.replace("_", " "): v for k, v in config.items()},
    }
    names = {"python": "Python", "threads": "CPU threads", "device": "device"}
    env = {names.get(k, k): v for k, v in doc.get("environment", {}).items()}
    return ["<h2>Run</h2>", _table(run), "<h3>Environment</h3>", _table(env)]


def write_report(
    run_dir: str | Path,
    title: str,
    sections: Sequence[Section],
    *,
    intro: str = "",
    filename: str = "report.html",
) -> Path:
    """Write ``report.html`` into ``run_dir`` with figures embedded (one portable file).

    The run's ``run.json`` (config, environment, wall time) is summarised at the end.
    """
    run_dir = Path(run_dir)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             f"</title><style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    if intro:
        parts.append(f"<p>{intro}</p>")
    for sec in sections:
        parts.append(f"<h2>{html.escape(sec.title)}</h2>")
        if sec.text:
            parts.append(f"<p>{sec.text}</p>")
        if sec.table:
            parts.append(_table(sec.table))
        for rel, caption in sec.figures:
            path = run_dir / rel
            if not path.exists():
                continue
            data = base64.b64encode(path.read_bytes()).decode()
            parts.append(
                f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(rel)}'>"
                f"<figcaption>{caption} <span class='meta'>({html.escape(rel)})</span>"
                "</figcaption></figure>"
            )
    meta = run_dir / "run.json"
    if meta.exists():
        parts.extend(_run_tables(json.loads(meta.read_text())))
    parts.append("</body></html>")
    out = run_dir / filename
    out.write_text("\n".join(parts))
    return out
