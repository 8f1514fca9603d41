"""The run report: one self-contained HTML file with tables and inline PNG plots."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np

from medtl.runio import atomic_write_text

__all__ = ["write_report", "figure_to_data_uri"]


def figure_to_data_uri(fig: Any) -> str:
    """Encode a matplotlib figure as an inline PNG data URI and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(width: float = 5.0, height: float = 3.5) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def _curves_plot(history: list[dict[str, Any]]) -> str | None:
    if not history:
        return None
    fig, ax = _figure()
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h.get("loss") for h in history], label="train loss")
    if any("val_loss" in h for h in history):
        ax.plot(epochs, [h.get("val_loss") for h in history], label="val loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if any(h.get("val_auc") is not None for h in history):
        ax2 = ax.twinx()
        ax2.plot(epochs, [h.get("val_auc") for h in history], color="tab:green", label="val AUC")
        ax2.set_ylabel("val AUC")
        ax2.set_ylim(0, 1)
    ax.legend(loc="upper right")
    return figure_to_data_uri(fig)


def _roc_plot(all_preds: list[Any]) -> str | None:
    from sklearn.metrics import roc_curve

    fig, ax = _figure(4.5, 4.0)
    drawn = 0
    for preds in all_preds:
        labels, probs = preds["label"], preds["probs"]
        mask = labels >= 0
        if probs.ndim != 2 or probs.shape[1] != 2 or len(np.unique(labels[mask])) < 2:
            continue
        sites = np.unique(preds["site"])
        for site in sites:
            sel = mask & (preds["site"] == site)
            if len(np.unique(labels[sel])) < 2:
                continue
            fpr, tpr, _ = roc_curve(labels[sel], probs[sel, 1])
            ax.plot(fpr, tpr, label=f"{site} ({preds.get('split', '')})")
            drawn += 1
    if not drawn:
        import matplotlib.pyplot as plt

        plt.close(fig)
        return None
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right")
    return figure_to_data_uri(fig)


def _metrics_table(metrics: dict[str, Any], split: str) -> str:
    per_site = metrics.get(split, {})
    names: list[str] = []
    for values in per_site.values():
        for key in values:
            if key not in names and key not in ("notes",):
                names.append(key)
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = []
    for site, values in per_site.items():
        cells = []
        for n in names:
            v = values.get(n)
            cells.append(f"<td>{'n/a' if v is None else (f'{v:.3f}' if isinstance(v, float) else html.escape(str(v)))}</td>")
        rows.append(f"<tr><th>{html.escape(site)}</th>{''.join(cells)}</tr>")
    return f"<table><tr><th>site</th>{head}</tr>{''.join(rows)}</table>"


def write_report(ctx: Any, metrics: dict[str, Any], all_preds: list[Any], labels: list[str]) -> None:
    """Write ``report.html`` into the run folder."""
    study = ctx.study
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>medtl report: {html.escape(study.name)}</title>",
        "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px}</style>",
        "</head><body>",
        f"<h1>Study {html.escape(study.name)}</h1>",
        "<h2>Summary</h2><ul>",
        f"<li>Backbone: {html.escape(study.model.backbone.name)}; pooling: {html.escape(study.model.pooling.name)}; "
        f"strategy: {html.escape(study.strategy.name)}</li>",
        f"<li>Seed: {study.seed}; epochs: {study.train.epochs}; best epoch: {metrics.get('best_epoch')}</li>",
        f"<li>Labels: {html.escape(', '.join(labels))}</li>",
        f"<li>Manifest SHA-256: {html.escape(str(metrics.get('data', {}).get('manifest_sha256', '')))}</li>",
        f"<li>Skipped files: {metrics.get('skipped', {}).get('count', 0)}</li>",
        "</ul>",
    ]
    for split in study.evaluation.splits:
        parts.append(f"<h2>Metrics per site ({html.escape(split)})</h2>")
        parts.append(_metrics_table(metrics, split))
    curves = _curves_plot(metrics.get("history", []))
    if curves:
        parts.append(f"<h2>Training curves</h2><img alt='training curves' src='{curves}'>")
    roc = _roc_plot(all_preds)
    if roc:
        parts.append(f"<h2>ROC curves</h2><img alt='ROC curves' src='{roc}'>")
    parts.append("</body></html>")
    atomic_write_text(ctx.path("report.html"), "\n".join(parts))
