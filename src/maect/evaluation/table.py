"""The headline numbers of an ``eval.json`` as a text table (``maect evaluate`` prints it)."""

from __future__ import annotations

from typing import Any

from maect.evaluation.config import PROTOCOLS


def _rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(protocol, metric, value)`` rows of the headline numbers."""
    rows: list[tuple[str, str, str]] = []
    if "knn" in result:
        r = result["knn"]
        rows.append(("knn", f"top1 (k={r.get('k', '?')})", f"{r['top1']:.2f}"))
        rows += [("knn", key, f"{v:.2f}") for key, v in r.items() if key.startswith("top1@")]
    if "linear" in result:
        r = result["linear"]
        rows.append(("linear", "top1", f"{r['top1']:.2f}"))
        if "best_lr" in r:
            rows.append(("linear", "best lr (val top1)", f"{r['best_lr']:g} ({r['val_top1']:.2f})"))
    if "lowshot" in result:
        r = result["lowshot"]
        for key, v in r.items():
            if not key.endswith("_std"):
                label = f"{key}-shot" if key.isdigit() else key.replace("pct", "% labels")
                std = r.get(f"{key}_std")
                rows.append(("lowshot", label, f"{v:.2f}" + (f" ± {std:.2f}" if std else "")))
    if "cluster" in result:
        rows += [("cluster", key, f"{v:.2f}") for key, v in result["cluster"].items()]
    return rows


def format_table(result: dict[str, Any]) -> str:
    """The headline numbers of an ``eval.json`` (and the seconds per protocol) as a text table."""
    f = result.get("features", {})
    timing = result.get("timing", {})
    header = (
        f"{f.get('source', '?')} on {f.get('dataset', '?')}: {f.get('n_train', '?')} train / "
        f"{f.get('n_test', '?')} test, {f.get('pooling', '?')}"
        + (f" (block {f['layer']})" if f.get("layer") is not None else "")
        + (", standardised" if f.get("standardize") else "")
        + f", dim {f.get('dim', '?')}"
    )
    rows = _rows(result)
    names = (*PROTOCOLS, "extract", "plot", "total")
    seconds = {p: f"{timing[p]:.1f} s" for p in names if p in timing}
    lines = [header]
    width = max([len(r[1]) for r in rows] + [6])
    lines.append(f"{'protocol':<9} {'metric':<{width}} {'value':>14} {'time':>9}")
    previous = None
    for protocol, metric, value in rows:
        first = protocol != previous
        name, time_ = (protocol, seconds.get(protocol, "")) if first else ("", "")
        lines.append(f"{name:<9} {metric:<{width}} {value:>14} {time_:>9}".rstrip())
        previous = protocol
    extra = [f"{p} {seconds[p]}" for p in ("extract", "plot", "total") if p in seconds]
    if extra:
        lines.append("time: " + ", ".join(extra))
    return "\n".join(lines)
