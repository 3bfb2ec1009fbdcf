"""A self-contained HTML report of a run: text, tables of numbers and embedded figures."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Section", "write_report"]


@dataclass
class Section:
    title: str
    text: str = ""
    figures: Sequence[tuple[str, str]] = ()  #: (file relative to the run directory, caption)
    table: dict[str, Any] = field(default_factory=dict)


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


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return html.escape(json.dumps(v))
    return html.escape(str(v))


def _table(rows: dict[str, Any]) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>"
                   for k, v in rows.items())
    return f"<table>{body}</table>"


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
        doc = json.loads(meta.read_text())
        env = doc.get("environment", {})
        parts.append("<h2>Run</h2>")
        parts.append(_table({
            "command": " ".join(doc.get("argv", [])) or doc.get("command"),
            "started": doc.get("started"),
            "wall time (s, so far)": doc.get("wall_time_s"),
            "seed": doc.get("seed"),
            **{f"config.{k}": v for k, v in doc.get("config", {}).items()},
            **{f"env.{k}": v for k, v in env.items()},
        }))
    parts.append("</body></html>")
    out = run_dir / filename
    out.write_text("\n".join(parts))
    return out
