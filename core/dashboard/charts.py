"""Charts as inline SVG drawn on the server from `Driver.history`: no script, no library.

Only numbers and escaped labels go into the markup.
"""

from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup, escape

from core.queue.drivers.base import MinuteCounts

__all__ = ["throughput_chart", "wait_chart"]

_W = 240  # view box width: 4 units per minute over an hour
_H = 48


def _frame(kind: str, label: str, body: str, width: int, height: int) -> Markup:
    return Markup(
        f'<svg class="chart {kind}" viewBox="0 0 {_W} {_H}" width="{width}" height="{height}" '
        f'role="img" aria-label="{escape(label)}" preserveAspectRatio="none">'
        f"<title>{escape(label)}</title>"
        f'<line class="axis" x1="0" y1="{_H - 0.5}" x2="{_W}" y2="{_H - 0.5}"/>{body}</svg>'
    )


def throughput_chart(
    queue: str, history: Sequence[MinuteCounts], width: int = 240, height: int = 48
) -> Markup:
    """Jobs ended per minute: succeeded (bottom) and failed, cancelled or expired (on top)."""
    top = max((m.ended for m in history), default=0) or 1
    step = _W / max(len(history), 1)
    bars = []
    for index, minute in enumerate(history):
        x = index * step
        good = minute.succeeded / top * (_H - 2)
        bad = (minute.ended - minute.succeeded) / top * (_H - 2)
        if good:
            bars.append(
                f'<rect class="ok" x="{x:.1f}" y="{_H - good:.1f}" '
                f'width="{step * 0.8:.1f}" height="{good:.1f}"/>'
            )
        if bad:
            bars.append(
                f'<rect class="bad" x="{x:.1f}" y="{_H - good - bad:.1f}" '
                f'width="{step * 0.8:.1f}" height="{bad:.1f}"/>'
            )
    total = sum(m.ended for m in history)
    label = f"{queue}: {total} jobs ended over the last {len(history)} minutes (peak {top}/min)"
    return _frame("throughput", label, "".join(bars), width, height)


def wait_chart(
    queue: str, history: Sequence[MinuteCounts], width: int = 240, height: int = 48
) -> Markup:
    """Mean dispatch-to-start wait per minute (gaps where nothing started)."""
    waits = [m.mean_wait for m in history]
    top = max((w for w in waits if w is not None), default=0.0) or 1.0
    step = _W / max(len(history), 1)
    points: list[str] = []
    segments: list[list[str]] = []
    for index, wait in enumerate(waits):
        if wait is None:
            if points:
                segments.append(points)
                points = []
            continue
        points.append(f"{index * step + step / 2:.1f},{_H - wait / top * (_H - 2):.1f}")
    if points:
        segments.append(points)
    lines = "".join(
        f'<polyline class="wait" fill="none" points="{" ".join(seg)}"/>'
        if len(seg) > 1
        else f'<circle class="wait" r="1.5" cx="{seg[0].split(",")[0]}" '
        f'cy="{seg[0].split(",")[1]}"/>'
        for seg in segments
    )
    label = f"{queue}: mean wait from dispatch to start per minute (peak {top:.3g}s)"
    return _frame("wait", label, lines, width, height)
