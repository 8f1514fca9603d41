"""The study report: one self-contained HTML file with tables and inline PNG plots.

The report is drawn from ``metrics.json`` alone (plus the run record and the
resolved study), so every number it shows is in that file, and ``medtl evaluate``
and ``medtl shift`` can redraw it after adding their sections. Plots are PNG data
URIs and the page loads nothing from the network; its Content-Security-Policy
forbids it. A small inline script records load errors and the number of decoded
images on the ``<body>`` element, which the browser test reads.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path
from typing import Any

from medtl.methods import AUTHOR_TODO, MethodsSection, build_methods, methods_markdown
from medtl.runio import atomic_write_json, atomic_write_text

__all__ = ["write_report", "write_run_report", "render_report", "render_comparison", "figure_to_data_uri",
           "update_metrics", "flatten_numbers"]

logger = logging.getLogger(__name__)

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

_STYLE = (
    "body{font-family:sans-serif;max-width:1040px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0;font-size:0.92em}"
    "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th:first-child{text-align:left}"
    "caption{text-align:left;font-weight:bold;margin-bottom:4px}"
    "img{max-width:100%;display:block;margin:0.5em 0}.todo{color:#a33;font-style:italic}"
    ".note{color:#555;font-size:0.9em}"
)

# Records script errors and decoded images on <body>; headless browsers read them from the DOM.
_CHECK_SCRIPT = """<script>
window.medtlErrors = 0;
window.addEventListener('error', function () { window.medtlErrors += 1; }, true);
window.addEventListener('load', function () {
  var images = document.images, decoded = 0;
  for (var i = 0; i < images.length; i++) {
    if (images[i].complete && images[i].naturalWidth > 0) { decoded += 1; }
  }
  document.body.setAttribute('data-images', String(images.length));
  document.body.setAttribute('data-images-decoded', String(decoded));
  document.body.setAttribute('data-errors', String(window.medtlErrors));
});
</script>"""


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def figure_to_data_uri(fig: Any) -> str:
    """Encode a matplotlib figure as an inline PNG data URI and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _subplots(rows: int = 1, cols: int = 1, width: float = 5.0, height: float = 3.5) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=(width, height), squeeze=False)


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _esc(value)
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def _with_ci(value: Any, ci: Any) -> str:
    if ci:
        return f"{_num(value)} <span class='note'>({_num(ci[0])} to {_num(ci[1])})</span>"
    return _num(value)


def _table(header: list[str], rows: list[list[str]], caption: str = "") -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    cap = f"<caption>{_esc(caption)}</caption>" if caption else ""
    return f"<table>{cap}<tr>{head}</tr>{body}</table>"


def _image(uri: str | None, alt: str) -> str:
    return f"<img alt='{_esc(alt)}' src='{uri}'>" if uri else ""


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------


def _curves_plot(history: list[dict[str, Any]]) -> str | None:
    if not history:
        return None
    fig, axes = _subplots()
    ax = axes[0, 0]
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h.get("loss") for h in history], marker="o", label="train loss")
    if any("val_loss" in h for h in history):
        ax.plot(epochs, [h.get("val_loss") for h in history], marker="o", label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if any(h.get("val_auc") is not None for h in history):
        ax2 = ax.twinx()
        ax2.plot(epochs, [h.get("val_auc") for h in history], color="tab:green", marker="s", label="validation AUC")
        ax2.set_ylabel("validation AUC")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="lower right")
    ax.legend(loc="upper right")
    return figure_to_data_uri(fig)


def _roc_plot(sites: dict[str, Any]) -> str | None:
    curves = {name: v["roc"] for name, v in sites.items() if v.get("roc")}
    if not curves:
        return None
    fig, axes = _subplots(width=4.5, height=4.2)
    ax = axes[0, 0]
    for name, roc in curves.items():
        ax.plot(roc["fpr"], roc["tpr"], label=f"{name} ({sites[name]['role']}, AUC {_num(sites[name].get('auc'))})")
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right", fontsize=8)
    return figure_to_data_uri(fig)


def _calibration_plot(sites: dict[str, Any]) -> str | None:
    bins = {name: v["reliability"] for name, v in sites.items() if v.get("reliability")}
    if not bins:
        return None
    fig, axes = _subplots(1, len(bins), width=3.6 * len(bins), height=3.6)
    for ax, (name, rel) in zip(axes[0], bins.items()):
        centers = [(lo + hi) / 2 for lo, hi in zip(rel["lower"], rel["upper"])]
        accuracy = [a if a is not None else 0.0 for a in rel["accuracy"]]
        width = rel["upper"][0] - rel["lower"][0]
        ax.bar(centers, accuracy, width=width * 0.9, color="tab:blue", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name} (ECE {_num(sites[name].get('ece'))})", fontsize=9)
    axes[0, 0].legend(loc="upper left", fontsize=7)
    return figure_to_data_uri(fig)


def _embedding_plot(embedding: dict[str, Any]) -> str | None:
    import numpy as np

    views = [("PCA", embedding.get("pca"))]
    if embedding.get("tsne"):
        views.append(("t-SNE", embedding["tsne"]))
    arrays = [(title, np.asarray(points)) for title, points in views if points]
    if not arrays:
        return None
    fig, axes = _subplots(len(arrays), 2, width=9.0, height=3.8 * len(arrays))
    for row, (title, points) in enumerate(arrays):
        for col, key in enumerate(("group", "label")):
            ax = axes[row, col]
            values = embedding.get(key, [])
            for value in sorted(set(values)):
                sel = np.array([v == value for v in values])
                ax.scatter(points[sel, 0], points[sel, 1], s=10, alpha=0.7, label=str(value))
            ax.set_title(f"{title}, colored by {'site and split' if key == 'group' else 'label'}", fontsize=9)
            ax.legend(fontsize=7, markerscale=1.5)
            ax.set_xticks([])
            ax.set_yticks([])
    return figure_to_data_uri(fig)


def _histogram_plot(histograms: dict[str, Any]) -> str | None:
    if not histograms:
        return None
    fig, axes = _subplots(width=5.5, height=3.5)
    ax = axes[0, 0]
    for name, hist in histograms.items():
        edges = hist["edges"]
        centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
        ax.plot(centers, hist["density"], label=f"{name} (mean {_num(hist['mean'], 2)})")
    ax.set_xlabel("intensity after preprocessing")
    ax.set_ylabel("density")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    return figure_to_data_uri(fig)


def _stress_plot(stress: dict[str, Any]) -> str | None:
    shifts = stress.get("shifts", {})
    if not shifts:
        return None
    fig, axes = _subplots(width=5.5, height=3.8)
    ax = axes[0, 0]
    for name, curve in shifts.items():
        aucs = [float("nan") if v is None else v for v in curve["auc"]]
        ax.plot(curve["severity"], aucs, marker="o", label=name)
    ax.set_xlabel("severity (0: unshifted)")
    ax.set_ylabel("AUC")
    ax.set_ylim(0, 1)
    ax.axhline(0.5, color="k", linestyle=":", linewidth=0.8)
    ax.legend(fontsize=8)
    return figure_to_data_uri(fig)


# ---------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------


def _summary_section(study: Any, record: dict[str, Any], metrics: dict[str, Any]) -> str:
    data = metrics.get("data", {})
    counts = data.get("counts", {})
    labels = record.get("labels") or sorted({lab for s in counts.values() for split in s.values() for lab in split})
    rows = []
    for site, per_split in sorted(counts.items()):
        for split, per_label in sorted(per_split.items()):
            rows.append([_esc(site), _esc(split)] + [str(per_label.get(lab, 0)) for lab in labels]
                        + [str(sum(per_label.values()))])
    parts = ["<h2>Study summary</h2>", "<ul>",
             f"<li>Model: backbone {_esc(study.model.backbone.name)}, pooling {_esc(study.model.pooling.name)}, "
             f"initial weights {_esc(study.model.backbone.weights or 'random')}</li>",
             f"<li>Strategy: {_esc(study.strategy.name)} {_esc(study.strategy.options or '')}</li>",
             f"<li>Seed {study.seed}; {study.train.epochs} epoch(s); best epoch {_num(metrics.get('best_epoch'))}</li>",
             f"<li>Training sites: {_esc(', '.join(record.get('source_sites', [])) or 'n/a')}; target sites: "
             f"{_esc(', '.join(record.get('target_sites', [])) or 'none')}</li>",
             f"<li>Manifest SHA-256: <code>{_esc(data.get('manifest_sha256', 'n/a'))}</code></li>",
             f"<li>Skipped files: {metrics.get('skipped', {}).get('count', 0)}</li>",
             "</ul>"]
    if rows:
        parts.append(_table(["site", "split", *labels, "total"], rows, "Images per site, split and label"))
    skipped = metrics.get("skipped", {}).get("files", [])
    if skipped:
        parts.append(_table(["manifest row", "site", "reason"],
                            [[str(s["row"] + 2), _esc(s["site"]), _esc(s["reason"])] for s in skipped[:50]],
                            "Skipped files"))
    versions = record.get("versions", {})
    if versions:
        plugin_rows = [[_esc(k), _esc(v or "registered")] for k, v in sorted(versions.get("plugins", {}).items())]
        library_rows = [[_esc(k), _esc(v)] for k, v in versions.items() if k != "plugins"]
        parts.append(_table(["software", "version"], library_rows + plugin_rows, "Software and plugin versions"))
    return "\n".join(parts)


def _evaluation_section(evaluation: dict[str, Any]) -> str:
    sites = evaluation.get("sites", {})
    if not sites:
        return ""
    threshold = evaluation.get("threshold", {})
    boot = evaluation.get("bootstrap", {})
    names = ["auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "ece"]
    entries = dict(sites)
    if "internal" in evaluation and len([s for s in sites.values() if s["role"] == "internal"]) > 1:
        entries["internal (pooled)"] = evaluation["internal"]
    rows = []
    for name, v in entries.items():
        rows.append([_esc(name), _esc(v["role"]), str(v["n_images"]), str(v["n_patients"])]
                    + [_with_ci(v.get(m), (v.get("ci") or {}).get(m)) for m in names])
    cut = threshold.get("value")
    parts = ["<h2>Metrics per site</h2>",
             f"<p class='note'>Intervals: 95% percentile bootstrap over {boot.get('resamples', 0)} resamples of "
             f"patients. Sensitivity and specificity use the {_esc(threshold.get('method', 'n/a'))} threshold "
             f"{_num(cut)} chosen on {threshold.get('n', 0)} validation images.</p>",
             _table(["site", "role", "images", "patients", *names], rows)]
    drops = evaluation.get("drops", {})
    if drops:
        drop_rows = [[_esc(name)] + [_with_ci(d[m]["value"], d[m]["ci"]) for m in names] for name, d in drops.items()]
        parts.append(_table(["external site", *names], drop_rows,
                            "Drop from internal test to each external site (internal minus external)"))
    parts.append("<h3>ROC curves</h3>" + _image(_roc_plot(sites), "ROC curves per site"))
    parts.append("<h3>Calibration</h3>" + _image(_calibration_plot(sites), "reliability diagrams per site"))
    return "\n".join(parts)


def _shift_section(shift: dict[str, Any]) -> str:
    if not shift:
        return ""
    rows = []
    for name, c in shift.get("comparisons", {}).items():
        pad, mmd = c.get("proxy_a_distance") or {}, c.get("mmd") or {}
        rows.append([_esc(name), _esc(c.get("role", "")), str(c.get("n", "")), _num(pad.get("pad")),
                     _num(pad.get("error")), _num(mmd.get("mmd2"), 4), _num(mmd.get("p_value"))])
    reference = shift.get("reference", {})
    embedding = shift.get("embedding", {})
    note = embedding.get("tsne_note", "")
    return "\n".join([
        "<h2>Dataset shift</h2>",
        f"<p class='note'>Each group is compared with the training split ({reference.get('n', 'n/a')} images) in "
        "the model's pooled feature space. Proxy A-distance: 0 = indistinguishable, 2 = fully separable. "
        f"MMD: Gaussian kernel, {shift.get('settings', {}).get('permutations', 'n/a')} permutations.</p>",
        _table(["compared with train", "role", "images", "proxy A-distance", "domain error", "MMD²", "MMD p-value"],
               rows),
        "<h3>Feature embedding</h3>", _image(_embedding_plot(embedding), "feature embedding"),
        f"<p class='note'>{_esc(note)}</p>" if note else "",
        "<h3>Input intensities</h3>", _image(_histogram_plot(shift.get("histograms", {})),
                                             "intensity histograms per site"),
    ])


def _stress_section(stress: dict[str, Any]) -> str:
    if not stress or not stress.get("shifts"):
        return ""
    rows = []
    for name, curve in stress["shifts"].items():
        rows.append([_esc(name), _esc(curve["parameter_name"])]
                    + [f"{_num(p, 3)}: {_num(a)}" for p, a in zip(curve["parameter"], curve["auc"])])
    return "\n".join([
        "<h2>Stress test</h2>",
        f"<p class='note'>Simulated site shifts on the {_esc(stress.get('images'))} ({stress.get('n_images')} "
        "images); each cell is parameter: AUC.</p>",
        _table(["shift", "parameter", *[f"severity {s}" for s in range(6)]], rows),
        _image(_stress_plot(stress), "AUC against shift severity"),
    ])


def _methods_html(sections: list[MethodsSection]) -> str:
    parts = ["<h2>Methods (CLAIM)</h2>",
             "<p class='note'>Structured after CLAIM, the Checklist for Artificial Intelligence in Medical Imaging; "
             "also written as methods.md.</p>"]
    for section in sections:
        parts.append(f"<h3>{_esc(section.title)}</h3>")
        for item in section.items:
            if item.text is None:
                parts.append(f"<p><b>{_esc(item.topic)}.</b> <span class='todo'>{AUTHOR_TODO}: "
                             f"{_esc(item.hint)}.</span></p>")
            else:
                parts.append(f"<p><b>{_esc(item.topic)}.</b> {_esc(item.text)}</p>")
    return "\n".join(parts)


def _page(title: str, body: list[str]) -> str:
    return "\n".join([
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<meta http-equiv='Content-Security-Policy' content=\"{_CSP}\">",
        f"<title>{_esc(title)}</title><style>{_STYLE}</style>", _CHECK_SCRIPT, "</head><body>",
        *[part for part in body if part],
        "</body></html>",
    ])


# ---------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------


def render_report(study: Any, record: dict[str, Any], metrics: dict[str, Any]) -> str:
    """Render the run report as one HTML page from the study, run record and metrics."""
    body = [f"<h1>Study {_esc(study.name)}</h1>", _summary_section(study, record, metrics)]
    curves = _curves_plot(metrics.get("history", []))
    if curves:
        body.append("<h2>Training curves</h2>" + _image(curves, "training curves"))
    body.append(_evaluation_section(metrics.get("evaluation") or {}))
    body.append(_shift_section(metrics.get("shift") or {}))
    body.append(_stress_section(metrics.get("stress") or {}))
    body.append(_methods_html(build_methods(study, record, metrics)))
    return _page(f"medtl report: {study.name}", body)


def write_run_report(run_dir: str | Path, study: Any, record: dict[str, Any], metrics: dict[str, Any],
                     out_dir: str | Path | None = None) -> Path:
    """Write ``report.html`` and ``methods.md`` for a run and return the report's path.

    ``out_dir`` defaults to the run folder; ``medtl evaluate --data`` writes a
    report per external manifest into its own folder.
    """
    out = Path(out_dir or run_dir)
    atomic_write_text(out / "report.html", render_report(study, record, metrics))
    atomic_write_text(out / "methods.md", methods_markdown(build_methods(study, record, metrics)))
    logger.info("report written to %s", out / "report.html")
    return out / "report.html"


def write_report(ctx: Any, metrics: dict[str, Any], all_preds: Any = None, labels: Any = None) -> None:
    """Write the report of a run that just finished (called by the engine).

    ``all_preds`` and ``labels`` are accepted for the engine's call but unused: every
    number the report shows, ROC points included, is in ``metrics``.
    """
    write_run_report(ctx.run_dir, ctx.study, ctx.record, metrics)


def update_metrics(path: str | Path, section: str, values: dict[str, Any]) -> dict[str, Any]:
    """Set one top-level section of a ``metrics.json`` file and return the whole content."""
    path = Path(path)
    metrics = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    metrics[section] = values
    atomic_write_json(path, metrics)
    return metrics


# ---------------------------------------------------------------------------
# Comparison of several runs
# ---------------------------------------------------------------------------


def render_comparison(comparison: dict[str, Any]) -> str:
    """Render ``medtl compare`` output: a table of runs per site and the train-site x test-site matrix."""
    runs = comparison["runs"]
    sites = comparison["sites"]
    metric = comparison["metric"]
    header = ["run", "strategy", "seed", "training sites", *[f"{s} {metric}" for s in sites]]
    rows = []
    for run in runs:
        cells = [_esc(run["name"]), _esc(run["strategy"]), _num(run["seed"]), _esc("+".join(run["source_sites"]))]
        for site in sites:
            v = run["sites"].get(site)
            cells.append(_with_ci(v.get(metric), (v.get("ci") or {}).get(metric)) if v else "n/a")
        rows.append(cells)
    body = ["<h1>Comparison of runs</h1>", _table(header, rows, f"{metric} per site, with 95% patient bootstrap CI")]
    matrix = comparison.get("matrix", {})
    if matrix:
        columns = sorted({c for row in matrix.values() for c in row})
        matrix_rows = [[_esc(r)] + [_num(matrix[r].get(c, {}).get("mean")) + (
            f" <span class='note'>(n={matrix[r][c]['runs']})</span>" if c in matrix[r] else "") for c in columns]
            for r in matrix]
        body.append(_table(["trained on \\ tested on", *columns], matrix_rows,
                           f"Mean {metric}: training sites x test site"))
    body.append(_image(_comparison_plot(comparison), f"{metric} per run and site"))
    return _page("medtl comparison", body)


def _comparison_plot(comparison: dict[str, Any]) -> str | None:
    import numpy as np

    runs, sites, metric = comparison["runs"], comparison["sites"], comparison["metric"]
    if not runs or not sites:
        return None
    fig, axes = _subplots(width=max(5.0, 1.2 * len(runs) * len(sites)), height=3.8)
    ax = axes[0, 0]
    width = 0.8 / len(sites)
    for j, site in enumerate(sites):
        x = np.arange(len(runs)) + j * width
        values, low, high = [], [], []
        for run in runs:
            v = run["sites"].get(site) or {}
            value = v.get(metric)
            ci = (v.get("ci") or {}).get(metric)
            values.append(np.nan if value is None else value)
            low.append(0.0 if not ci or value is None else value - ci[0])
            high.append(0.0 if not ci or value is None else ci[1] - value)
        ax.bar(x, values, width=width, yerr=[low, high], capsize=3, label=site)
    ax.set_xticks(np.arange(len(runs)) + 0.4 - width / 2)
    ax.set_xticklabels([r["name"] for r in runs], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    return figure_to_data_uri(fig)


def flatten_numbers(metrics: dict[str, Any], skip: tuple[str, ...] = ("history",)) -> dict[str, float]:
    """Flatten the scalar numbers of a metrics dict into ``a.b.c`` keys, for trackers.

    Confidence intervals (``ci`` lists of two numbers) become ``.ci_low`` and ``.ci_high``;
    other lists (curves, embeddings) and the keys in ``skip`` are left out.
    """
    out: dict[str, float] = {}

    def walk(node: Any, path: list[str]) -> None:
        key = ".".join(path)
        if isinstance(node, dict):
            for name, value in node.items():
                if not path and name in skip:
                    continue
                walk(value, [*path, str(name)])
        elif isinstance(node, bool) or node is None:
            return
        elif isinstance(node, (int, float)):
            out[key] = float(node)
        elif isinstance(node, list) and len(path) >= 2 and path[-2] == "ci" and len(node) == 2:
            out[key + "_low"], out[key + "_high"] = float(node[0]), float(node[1])

    walk(metrics, [])
    return out
