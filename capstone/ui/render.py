"""HTML of the Collections pages: Jinja templates and an inline-SVG chart, every asset in the package.

The CSS and JavaScript (``static/``) are inlined into each page, so that the pages need no other
route and no network (no CDN): deployments and tests may have no internet. Autoescaping is on: every
value from a database or a query is text, never markup.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cache
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from markupsafe import Markup, escape

if TYPE_CHECKING:
    import jinja2
    from starlette.requests import Request

    from capstone.ui.overview import CollectionSummary

__all__ = ["collection_page", "collections_page", "missing_page", "runs_chart", "verdict"]

_SERIES = (("embedded", "#3182ce"), ("deleted", "#e53e3e"), ("set_aside", "#d69e2e"))


def verdict(summary: Mapping[str, Any] | None) -> str:
    """``fail``, ``warn`` or ``pass`` of a validation summary (``none`` without one)."""
    if not summary:
        return "none"
    return "fail" if summary.get("failed") else "warn" if summary.get("warned") else "pass"


def _size(value: int | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def _iso(value: datetime | str | None) -> str:
    if value is None:
        return ""
    return value.isoformat() if isinstance(value, datetime) else str(value)


def _when(value: datetime | None) -> str:
    """A date as people read it in a table: ``2026-12-06 21:40 UTC``."""
    if value is None:
        return ""
    return value.strftime("%Y-%m-%d %H:%M %Z").strip()


def _params(value: Mapping[str, Any] | None) -> str:
    return ", ".join(f"{key}={item}" for key, item in (value or {}).items() if item is not None)


@cache
def _environment() -> jinja2.Environment:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("capstone.ui", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(size=_size, iso=_iso, when=_when, verdict=verdict, params=_params)
    static = files("capstone.ui") / "static"
    env.globals.update(
        css=Markup(static.joinpath("collections.css").read_text()),
        js=Markup(static.joinpath("collections.js").read_text()),
    )
    return env


def _root(request: Request) -> str:
    """Where the app is mounted (``/capstone``), for its own links."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def collections_page(request: Request, summaries: Sequence[CollectionSummary]) -> str:
    return _environment().get_template("collections.html").render(root=_root(request), summaries=summaries)


def missing_page(request: Request, dag_id: str) -> str:
    return _environment().get_template("missing.html").render(root=_root(request), dag_id=dag_id)


def collection_page(
    request: Request,
    summary: CollectionSummary,
    detail: Mapping[str, Any],
    query: Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
) -> str:
    statuses = {row["version"]: row["status"] for row in detail["versions"]}
    return (
        _environment()
        .get_template("collection.html")
        .render(
            root=_root(request),
            s=summary,
            detail=detail,
            query=query,
            results=results,
            statuses=statuses,
            chart=runs_chart(detail["runs"]),
        )
    )


def runs_chart(runs: Sequence[Mapping[str, Any]], width: int = 560, height: int = 120) -> Markup:
    """The runs' counts as stacked bars (embedded, deleted, set aside), oldest left, in inline SVG."""
    if not runs:
        return Markup("")
    top = max(sum(int(run.get(name) or 0) for name, _ in _SERIES) for run in runs) or 1
    slot = width / len(runs)
    bar = min(28.0, max(2.0, slot * 0.7))
    parts = [
        f'<svg class="chart" id="runs-chart" role="img" width="{width}" height="{height + 16}" '
        f'viewBox="0 0 {width} {height + 16}" aria-label="chunks per run">'
    ]
    for i, run in enumerate(runs):
        x, y = i * slot + (slot - bar) / 2, float(height)
        title = escape(
            f"{run.get('run_id')}: {run.get('embedded')} embedded, {run.get('deleted')} deleted, "
            f"{run.get('set_aside')} set aside ({run.get('state') or 'no run'})"
        )
        parts.append(f"<g><title>{title}</title>")
        for name, color in _SERIES:
            h = int(run.get(name) or 0) / top * (height - 4)
            if h > 0:
                y -= h
                box = f'x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}"'
                parts.append(f'<rect {box} fill="{color}"/>')
        parts.append("</g>")
    parts.append(f'<text x="0" y="{height + 13}">max {top:,} per run</text></svg>')
    return Markup("".join(parts))
