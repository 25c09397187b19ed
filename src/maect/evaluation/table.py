"""The headline numbers of an ``eval.json`` as a text table (``maect evaluate`` prints it).

Every section of ``eval.json`` names the protocol that produced it (``"protocol"``); the table
ends with those names, so that frozen-feature numbers are not mistaken for fine-tuning ones.
"""

from __future__ import annotations

from typing import Any

from maect.evaluation.config import PROTOCOLS

SECTIONS = (*PROTOCOLS, "layers")
TIMES = ("extract", "extract_robustness", "plot", "total")


def _number(value: Any, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _robustness_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = [("robustness", "clean top1", _number(r["clean"]))]
    rows.append(
        ("robustness", f"mean top1 ({len(r['corruptions'])} corruptions)", _number(r["mean"]))
    )
    rows += [("robustness", f"severity {s}", _number(v)) for s, v in r["per_severity"].items()]
    rows += [("robustness", c, _number(per["mean"])) for c, per in r["top1"].items()]
    if "mce" in r:
        rows.append(("robustness", "mCE (vs baseline)", _number(r["mce"])))
        rows.append(("robustness", "relative mCE", _number(r.get("relative_mce"))))
    return rows


def _layer_rows(layers: dict[str, Any]) -> list[tuple[str, str, str]]:
    """One row per block and protocol: its headline number (top1, or k-means ACC)."""
    rows = []
    for block, results in layers["blocks"].items():
        for protocol, r in results.items():
            headline = r.get("top1", r.get("acc", r.get("1")))
            rows.append(("layers", f"block {block} {protocol}", _number(headline)))
    return rows


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
            if key != "protocol" and not key.endswith("_std"):
                label = f"{key}-shot" if key.isdigit() else key.replace("pct", "% labels")
                std = r.get(f"{key}_std")
                rows.append(("lowshot", label, f"{v:.2f}" + (f" ± {std:.2f}" if std else "")))
    if "cluster" in result:
        for key, v in result["cluster"].items():
            if key != "protocol":
                digits = 3 if key in ("silhouette", "davies_bouldin") else 2
                rows.append(("cluster", key, _number(v, digits)))
    if "robustness" in result:
        rows += _robustness_rows(result["robustness"])
    if "layers" in result:
        rows += _layer_rows(result["layers"])
    return rows


def _header(f: dict[str, Any]) -> str:
    arch = f.get("arch") or {}
    shape = (
        f", ViT {arch['embed_dim']}x{arch['depth']} {arch['num_heads']} heads"
        if {"embed_dim", "depth", "num_heads"} <= set(arch)
        else ""
    )
    test = (
        f" (folder {f['test_folder']}, {f['test_classes']} classes)" if "test_folder" in f else ""
    )
    return (
        f"{f.get('source', '?')} on {f.get('dataset', '?')}: {f.get('n_train', '?')} train / "
        f"{f.get('n_test', '?')} test{test}, {f.get('pooling', '?')}"
        + (f" (block {f['layer']})" if f.get("layer") is not None else "")
        + (", standardised" if f.get("standardize") else "")
        + f", dim {f.get('dim', '?')}{shape}"
    )


def format_table(result: dict[str, Any]) -> str:
    """The headline numbers of an ``eval.json`` (and the seconds per protocol) as a text table,
    followed by the protocol that produced each section."""
    timing = result.get("timing", {})
    rows = _rows(result)
    seconds = {p: f"{timing[p]:.1f} s" for p in (*SECTIONS, *TIMES) if p in timing}
    lines = [_header(result.get("features", {}))]
    width = max([len(r[1]) for r in rows] + [6])
    lines.append(f"{'protocol':<10} {'metric':<{width}} {'value':>14} {'time':>9}")
    previous = None
    for protocol, metric, value in rows:
        first = protocol != previous
        name, time_ = (protocol, seconds.get(protocol, "")) if first else ("", "")
        lines.append(f"{name:<10} {metric:<{width}} {value:>14} {time_:>9}".rstrip())
        previous = protocol
    extra = [f"{p} {seconds[p]}" for p in TIMES if p in seconds]
    if extra:
        lines.append("time: " + ", ".join(extra))
    for section in SECTIONS:
        label = (result.get(section) or {}).get("protocol")
        if label:
            lines.append(f"{section}: {label}")
    return "\n".join(lines)
