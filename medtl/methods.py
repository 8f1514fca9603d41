"""A methods section that follows CLAIM, filled from the run record.

CLAIM is the Checklist for Artificial Intelligence in Medical Imaging (Mongan,
Moy and Kahn, Radiology: Artificial Intelligence 2020; updated by Tejani et al.
in 2024). The section covers its data, ground-truth, partition, model, training
and evaluation topics. Items that a run cannot fill in (eligibility criteria,
how labels were made) are marked and listed for the authors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["MethodsItem", "MethodsSection", "build_methods", "methods_markdown", "AUTHOR_TODO"]

#: Text that marks an item the authors must complete.
AUTHOR_TODO = "To be completed by the authors"


@dataclass
class MethodsItem:
    """One checklist topic and its text; ``text`` is None when the authors must write it."""

    topic: str
    text: str | None
    hint: str = ""


@dataclass
class MethodsSection:
    title: str
    items: list[MethodsItem] = field(default_factory=list)


def _fmt(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _with_ci(values: dict[str, Any], metric: str) -> str:
    ci = (values.get("ci") or {}).get(metric)
    text = _fmt(values.get(metric))
    return f"{text} (95% CI {_fmt(ci[0])} to {_fmt(ci[1])})" if ci else text


def _count_sentence(counts: dict[str, Any]) -> str:
    parts = []
    for site, per_split in sorted(counts.items()):
        totals: dict[str, int] = {}
        for labels in per_split.values():
            for label, n in labels.items():
                totals[label] = totals.get(label, 0) + n
        described = ", ".join(f"{n} {label}" for label, n in sorted(totals.items()))
        parts.append(f"site {site}: {sum(totals.values())} images ({described})")
    return "; ".join(parts)


def _data_section(study: Any, record: dict[str, Any], metrics: dict[str, Any]) -> MethodsSection:
    data = metrics.get("data", {})
    counts = data.get("counts", {})
    sources = record.get("source_sites", [])
    targets = record.get("target_sites", [])
    skipped = metrics.get("skipped", {}).get("count", 0)
    augment = study.transforms.preset
    options = ", ".join(f"{k}={v}" for k, v in sorted(study.transforms.options.items())) or "default options"
    return MethodsSection("Data", [
        MethodsItem("Data sources",
                    f"Images came from {len(counts)} site(s): {_count_sentence(counts)}. "
                    f"Labeled training sites: {', '.join(sources) or 'none'}; "
                    f"sites used only as external or unlabeled target data: {', '.join(targets) or 'none'}. "
                    f"The manifest's SHA-256 is {data.get('manifest_sha256', 'n/a')}."),
        MethodsItem("Eligibility criteria and study dates", None,
                    "inclusion and exclusion criteria, recruitment period and setting per site"),
        MethodsItem("Image acquisition", None, "scanners, protocols and acquisition parameters per site"),
        MethodsItem("Preprocessing",
                    f"Each image was converted to {study.data.channels} channel(s), resized to "
                    f"{' x '.join(str(s) for s in study.data.image_size)} pixels ({study.data.spatial_dims}D) "
                    f"and intensity-normalized with the '{study.data.intensity}' method "
                    f"({record.get('preprocessing', 'n/a')}). Training images were augmented with "
                    f"the '{augment}' preset ({options}); evaluation images were not augmented."),
        MethodsItem("Missing or unusable data",
                    f"{skipped} file(s) could not be used and were left out (policy data.on_bad_file: "
                    f"{study.data.on_bad_file}); the reasons are listed in metrics.json."),
        MethodsItem("De-identification",
                    "medtl keeps patient identifiers out of its logs, reports and metrics, but it does not "
                    "de-identify the source images. " + AUTHOR_TODO + ": describe how the images were "
                    "de-identified and under which ethics approval they were used."),
    ])


def _ground_truth_section() -> MethodsSection:
    return MethodsSection("Ground truth", [
        MethodsItem("Reference standard", None, "definition of each label and why it was chosen"),
        MethodsItem("Annotators", None, "number, qualifications and experience of the readers"),
        MethodsItem("Annotation procedure and tools", None, "instructions, software and blinding"),
        MethodsItem("Inter-reader variability", None, "how disagreement was measured and resolved"),
    ])


def _partition_section(study: Any) -> MethodsSection:
    split = study.data.split
    unit = "image (the manifest has no patient identifiers)" if split.allow_image_split else "patient"
    return MethodsSection("Data partitions", [
        MethodsItem("Assignment to partitions",
                    f"Each site was split separately into training, validation ({split.val:.0%}) and internal "
                    f"test ({split.test:.0%}) sets, stratified by label where class counts allowed, with "
                    f"seed {study.seed}. Rows with a split in the manifest kept it."),
        MethodsItem("Level of disjointness",
                    f"Partitions are disjoint at the level of the {unit}: all images of one patient are in "
                    "one partition."),
        MethodsItem("Intended sample size", None, "how the sample size was chosen (power analysis, availability)"),
    ])


def _model_section(study: Any, record: dict[str, Any]) -> MethodsSection:
    backbone = study.model.backbone
    options = ", ".join(f"{k}={v}" for k, v in sorted(backbone.options.items()))
    weights = record.get("weights")
    if backbone.weights:
        initial = (f"Backbone weights were initialized from the local file {backbone.weights.split('/')[-1]}"
                   + (f" ({weights.get('loaded', 'n/a')} tensors loaded, {len(weights.get('missing', []))} missing)"
                      if isinstance(weights, dict) else "")
                   + f"; non-matching keys were {'rejected' if backbone.strict else 'skipped'}. "
                   + AUTHOR_TODO + ": name the dataset these weights were trained on.")
    else:
        initial = "All weights were randomly initialized; no pretrained weights were used."
    versions = record.get("versions", {})
    libraries = ", ".join(f"{k} {v}" for k, v in versions.items() if k in ("medtl", "torch", "monai", "numpy", "python"))
    plugins = versions.get("plugins", {})
    return MethodsSection("Model", [
        MethodsItem("Architecture",
                    f"The classifier is the '{backbone.name}' backbone ({options or 'default options'}), "
                    f"'{study.model.pooling.name}' pooling, dropout {study.model.head.dropout} and a linear "
                    f"layer with one output per class."),
        MethodsItem("Initialization", initial),
        MethodsItem("Software",
                    f"medtl with {libraries or 'n/a'}; plugins: "
                    + (", ".join(f"{k} ({v or 'registered'})" for k, v in sorted(plugins.items())) or "n/a") + "."),
    ])


def _training_section(study: Any, metrics: dict[str, Any]) -> MethodsSection:
    t, opt, sched = study.train, study.optimizer, study.schedule
    strategy_options = ", ".join(f"{k}={v}" for k, v in sorted(study.strategy.options.items()))
    return MethodsSection("Training", [
        MethodsItem("Training procedure",
                    f"The model was trained with the '{study.strategy.name}' strategy "
                    f"({strategy_options or 'default options'}) for {t.epochs} epoch(s) with batch size "
                    f"{t.batch_size}, the {opt.name} optimizer (learning rate {opt.lr}, weight decay "
                    f"{opt.weight_decay}), a {sched.name} schedule with {sched.warmup_epochs} warm-up epoch(s), "
                    f"{t.precision} precision"
                    + (f" and gradient clipping at {t.grad_clip}" if t.grad_clip else "") + "."),
        MethodsItem("Model selection",
                    f"The checkpoint with the best validation {t.select_metric} was kept "
                    f"(epoch {metrics.get('best_epoch', 'n/a')})."
                    + _tta_sentence(study.evaluation.tta_flip_axes)),
        MethodsItem("Reproducibility",
                    f"Python, NumPy, PyTorch and MONAI were seeded with {study.seed}; the resolved "
                    "configuration is saved as config.yaml in the run folder."),
    ])


def _tta_sentence(axes: list[int]) -> str:
    if not axes:
        return ""
    names = ", ".join(f"spatial axis {axis}" for axis in axes)
    return (f" Validation and test predictions average the class probabilities of each image and its "
            f"copies flipped along {names} (test-time augmentation).")


def _evaluation_section(metrics: dict[str, Any]) -> MethodsSection:
    evaluation = metrics.get("evaluation") or {}
    items = []
    boot = evaluation.get("bootstrap", {})
    threshold = evaluation.get("threshold", {})
    if threshold.get("method") == "youden":
        rule = (f"a threshold of {_fmt(threshold.get('value'))} on the positive-class probability, chosen on "
                "the validation set by maximizing Youden's J")
    elif threshold.get("method") == "argmax":
        rule = "the most probable class (one-vs-rest for sensitivity and specificity, macro-averaged)"
    else:
        rule = f"a threshold of {_fmt(threshold.get('value'))}"
    items.append(MethodsItem(
        "Metrics",
        "Per site we report the area under the ROC curve (one-vs-rest macro average for more than two classes), "
        f"accuracy, balanced accuracy, and sensitivity and specificity at {rule}."))
    if boot.get("resamples"):
        uncertainty = (f"95% confidence intervals are percentile intervals of {boot['resamples']} bootstrap "
                       "resamples of patients (all images of a resampled patient are kept together). The drop "
                       "from internal test to each external site resamples both groups independently.")
    else:
        uncertainty = "No bootstrap was run, so no confidence intervals are reported."
    items.append(MethodsItem("Statistical uncertainty", uncertainty))

    sites = evaluation.get("sites", {})
    if sites:
        lines = [f"site {name} ({v['role']}, {v['n_images']} images of {v['n_patients']} patients): "
                 f"AUC {_with_ci(v, 'auc')}, sensitivity {_with_ci(v, 'sensitivity')}, "
                 f"specificity {_with_ci(v, 'specificity')}" for name, v in sites.items()]
        items.append(MethodsItem("Results per site", "; ".join(lines) + "."))
    external = [n for n, v in sites.items() if v["role"] == "external"]
    drops = evaluation.get("drops", {})
    if external:
        parts = []
        for name in external:
            drop = drops.get(name, {}).get("auc", {})
            ci = drop.get("ci")
            parts.append(f"site {name}: AUC drop {_fmt(drop.get('value'))}"
                         + (f" (95% CI {_fmt(ci[0])} to {_fmt(ci[1])})" if ci else ""))
        items.append(MethodsItem("External validation",
                                 "The model was tested on site(s) whose labels were never used for training: "
                                 + "; ".join(parts) + "."))
    else:
        items.append(MethodsItem("External validation", None, "no external site was evaluated in this run"))
    if sites:
        items.append(MethodsItem("Calibration",
                                 "Calibration was measured by the top-label expected calibration error with 10 "
                                 "equal-width bins: " + "; ".join(f"site {n}: {_with_ci(v, 'ece')}"
                                                                   for n, v in sites.items()) + "."))
    items.append(_failure_item(metrics))
    items.append(MethodsItem("Explainability", None, "saliency or other explanation methods, if any"))
    return MethodsSection("Evaluation", items)


def _failure_item(metrics: dict[str, Any]) -> MethodsItem:
    parts = []
    shift = metrics.get("shift")
    if shift:
        values = []
        for name, c in shift.get("comparisons", {}).items():
            pad, mmd = c.get("proxy_a_distance"), c.get("mmd")
            values.append(f"{name}: proxy A-distance {_fmt(pad['pad'] if pad else None, 2)}, MMD p = "
                          f"{_fmt(mmd['p_value'] if mmd else None)}")
        parts.append("Feature-space shift from the training split, measured by the proxy A-distance of a "
                     "cross-validated logistic-regression domain classifier and a Gaussian-kernel MMD "
                     "permutation test: " + "; ".join(values) + ".")
    stress = metrics.get("stress")
    if stress and stress.get("shifts"):
        worst = []
        for name, curve in stress["shifts"].items():
            aucs = curve.get("auc", [])
            if aucs and aucs[0] is not None and aucs[-1] is not None:
                worst.append((aucs[0] - aucs[-1], name, aucs[-1]))
        worst.sort(reverse=True)
        if worst:
            parts.append(f"Under simulated site shifts at five severities on the {stress.get('images')}, the "
                         "largest AUC losses at the highest severity were "
                         + ", ".join(f"{n} (AUC {_fmt(a)}, a drop of {_fmt(d)})" for d, n, a in worst[:3]) + ".")
    if not parts:
        return MethodsItem("Failure analysis", None, "run `medtl shift` to add shift and stress-test results")
    return MethodsItem("Failure analysis", " ".join(parts)
                       + " " + AUTHOR_TODO + ": review misclassified cases with a clinical reader.")


def build_methods(study: Any, record: dict[str, Any], metrics: dict[str, Any]) -> list[MethodsSection]:
    """Build the methods sections of a run from its study, run record and metrics."""
    return [
        _data_section(study, record, metrics),
        _ground_truth_section(),
        _partition_section(study),
        _model_section(study, record),
        _training_section(study, metrics),
        _evaluation_section(metrics),
    ]


def methods_markdown(sections: list[MethodsSection]) -> str:
    """Render methods sections as Markdown, with a closing list of items left to the authors."""
    lines = ["# Methods", "",
             "Structured after CLAIM, the Checklist for Artificial Intelligence in Medical Imaging "
             "(Mongan et al., Radiology: Artificial Intelligence 2020; 2024 update). Generated by medtl "
             "from the run record.", ""]
    todo = []
    for section in sections:
        lines += [f"## {section.title}", ""]
        for item in section.items:
            if item.text is None:
                todo.append(f"{section.title}: {item.topic} ({item.hint})")
                lines += [f"**{item.topic}.** *{AUTHOR_TODO}: {item.hint}.*", ""]
            else:
                lines += [f"**{item.topic}.** {item.text}", ""]
                if AUTHOR_TODO in item.text:
                    todo.append(f"{section.title}: {item.topic}")
    lines += ["## Items for the authors to complete", ""]
    lines += [f"- {t}" for t in todo] or ["- none"]
    return "\n".join(lines) + "\n"
