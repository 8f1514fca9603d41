"""The study file: a YAML document validated into typed pydantic objects.

Nothing in a study file is evaluated as code: YAML is read with ``yaml.safe_load``
and every value is checked against the schema below. Unknown keys are errors, so a
typo never passes silently.
"""

from __future__ import annotations

import copy
import types
from pathlib import Path
from typing import Any, Literal, Mapping, Union, get_args, get_origin, overload

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from medtl.errors import ConfigError, did_you_mean
from medtl.orientation import check_axcodes

__all__ = [
    "Study",
    "load_study",
    "parse_override",
    "apply_overrides",
    "study_from_dict",
    "override_note",
    "recorded_study_defaults",
    "DEFAULT_STUDY",
]

#: The study that ``medtl run`` runs when no file is given.
DEFAULT_STUDY = Path("sample_data") / "study.yaml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SplitConfig(_Section):
    """Fractions of patients for the validation and test splits, and the image-split fallback."""

    val: float = Field(0.15, ge=0.0, lt=1.0, description="fraction of patients for validation")
    test: float = Field(0.2, ge=0.0, lt=1.0, description="fraction of patients for testing")
    allow_image_split: bool = Field(
        False, description="split by image when the manifest has no patient_id column"
    )

    @model_validator(mode="after")
    def _check_sum(self) -> "SplitConfig":
        if self.val + self.test >= 1.0:
            raise ValueError(f"val + test must be below 1, got {self.val} + {self.test}")
        return self


class DataConfig(_Section):
    manifest: str = Field(..., description="CSV manifest (path,label,site,patient_id[,split]) or a MedMNIST .npz")
    image_size: list[int] = Field(default_factory=lambda: [64, 64])
    spatial_dims: Literal[2, 3] = 2
    channels: int = Field(1, ge=1)
    labels: list[str] | None = Field(None, description="class names in label order; inferred when missing")
    site: str | None = Field(None, description="site name for a manifest without a site column, such as a .npz")
    split: SplitConfig = Field(default_factory=SplitConfig)
    sources: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="options per source name, passed to medtl.create('source', ...). dicom: invert_monochrome1, "
        "voi, window, series (largest|only), series_number, series_description, geometry (warn|fail), "
        "spacing_tolerance. nifti: orientation (RAS), volume, nan_policy (fail|zero|min). Each source "
        "validates its own options; see DicomOptions and NiftiOptions in medtl_plugins",
    )
    orientation: str | None = Field(
        "auto", description="axis codes, such as RAS or LPS, that every image whose source reports an affine "
        "(dicom, nifti) is reoriented to right after reading, a 2D image as one slice. auto (the default) is "
        "RAS for 3D studies and PLS for 2D studies: PLS is the row and column order of a DICOM image in its "
        "(nominal) patient frame, so 2D DICOM images keep pydicom's pixel_array order, radiographs keep their "
        "display orientation, and 2D NIfTI files are brought into that order. null keeps each source's axis "
        "order: pydicom's pixel_array order for dicom, the orientation option for nifti",
    )
    intensity: Literal["minmax", "zscore", "none"] = "minmax"
    cache: bool = Field(True, description="keep decoded, preprocessed images on disk between runs")
    cache_dir: str | None = Field(
        None, description="cache folder, relative to the study file; default: the folder 'cache' under output.dir"
    )
    on_bad_file: Literal["fail", "skip"] = Field(
        "fail", description="fail on the first unreadable image, or skip it with one log line and count it "
        "in metrics.json and the report"
    )

    @field_validator("orientation")
    @classmethod
    def _check_orientation(cls, value: str | None) -> str | None:
        if value is None or value.lower() == "auto":
            return None if value is None else "auto"
        return check_axcodes(value)

    @property
    def orientation_codes(self) -> str | None:
        """Return the axis codes that ``orientation`` stands for in this study, or None."""
        if self.orientation == "auto":
            return "RAS" if self.spatial_dims == 3 else "PLS"
        return self.orientation

    @model_validator(mode="after")
    def _check_size(self) -> "DataConfig":
        if len(self.image_size) != self.spatial_dims:
            raise ValueError(
                f"image_size has {len(self.image_size)} values but spatial_dims is {self.spatial_dims}"
            )
        if any(s < 1 for s in self.image_size):
            raise ValueError(f"image_size values must be positive, got {self.image_size}")
        return self


class SiteConfig(_Section):
    role: Literal["source", "target"] = Field(
        "source", description="source sites are labeled for training; target sites are only adapted to"
    )


class TransformConfig(_Section):
    preset: str = "default"
    options: dict[str, Any] = Field(default_factory=dict)


class ComponentConfig(_Section):
    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class BackboneConfig(ComponentConfig):
    weights: str | None = Field(None, description="local .pt, .pth or .safetensors file with starting weights")
    strict: bool = False


class HeadConfig(_Section):
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class ModelConfig(_Section):
    backbone: BackboneConfig = Field(default_factory=lambda: BackboneConfig(name="resnet18"))
    pooling: ComponentConfig = Field(default_factory=lambda: ComponentConfig(name="avg"))
    head: HeadConfig = Field(default_factory=HeadConfig)


class StrategyConfig(_Section):
    name: str = "finetune"
    options: dict[str, Any] = Field(default_factory=dict)


class OptimizerConfig(_Section):
    name: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)


class ScheduleConfig(_Section):
    name: Literal["constant", "cosine", "dann"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    alpha: float = Field(10.0, ge=0, description="dann annealing: lr = lr0 / (1 + alpha * p) ** beta")
    beta: float = Field(0.75, ge=0)


class TrainConfig(_Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(
        32, ge=1, description="global batch size; under torchrun each of N processes takes batch_size / N"
    )
    steps_per_epoch: int | None = Field(None, ge=1, description="default: one pass over the labeled training set")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per training process")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N; auto takes CUDA when available")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="bf16 autocast runs on CPU and CUDA; fp16 (with a gradient scaler) needs CUDA"
    )
    channels_last: bool = Field(False, description="store the model and batches in channels-last memory format")
    select_metric: str = Field("auc", description="validation metric that picks the best checkpoint")
    select: str | None = Field(
        None, description="label-free validator (snd, dev, iwv, entropy) that picks the best checkpoint "
        "from the target sites' validation images instead of select_metric"
    )
    select_options: dict[str, Any] = Field(default_factory=dict, description="options of the select validator")
    grad_clip: float | None = Field(None, gt=0)
    find_unused_parameters: bool = Field(
        False, description="DistributedDataParallel option for strategies that skip some parameters in a step"
    )


class EvaluationConfig(_Section):
    metrics: list[str] = Field(default_factory=lambda: ["auc", "accuracy", "balanced_accuracy"])
    splits: list[str] = Field(default_factory=lambda: ["test"])
    bootstrap: int = Field(1000, ge=0, description="patient bootstrap resamples for confidence intervals; 0 disables")
    tta_flip_axes: list[int] = Field(
        default_factory=list, description="test-time augmentation: each spatial axis listed (0 is the first "
        "spatial axis, so [0, 1] for a 2D study flips rows, then columns) adds a prediction on the image flipped "
        "along it, and the class probabilities of all views are averaged. It applies to validation (and so "
        "to checkpoint selection), to the test evaluation and to medtl evaluate")

    @field_validator("tta_flip_axes")
    @classmethod
    def _check_flip_axes(cls, value: list[int]) -> list[int]:
        if any(axis < 0 for axis in value) or len(set(value)) != len(value):
            raise ValueError(f"must list distinct spatial axes counted from 0, got {value}")
        return value


class OutputConfig(_Section):
    dir: str = "runs"
    name: str | None = Field(None, description="run folder name; default: study name and timestamp")


class PluginsConfig(_Section):
    block: list[str] = Field(default_factory=list)
    allow: list[str] | None = None
    modules: list[str] = Field(
        default_factory=list,
        description="local plugin modules: dotted names, looked up in the study file's folder first, "
        "or .py files relative to that folder",
    )
    strict: bool = False


class StageConfig(_Section):
    """One stage of a chained study: sections that replace or extend the study's own.

    Each section given here is merged key by key into the study's section of the
    same name, so a stage states only what differs (usually the strategy). A stage
    that names another strategy replaces the whole strategy section, options included.
    """

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="stage name, used as its run folder")
    init: str = Field(
        "previous",
        description="backbone weights to start from: 'previous' (the stage before, or the study's own "
        "model.backbone.weights for the first stage), 'study' (the study's own weights) or a stage name",
    )
    strategy: dict[str, Any] | None = None
    optimizer: dict[str, Any] | None = None
    schedule: dict[str, Any] | None = None
    train: dict[str, Any] | None = None
    model: dict[str, Any] | None = None
    transforms: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    sites: dict[str, Any] | None = None


class Study(_Section):
    """A whole study file."""

    name: str = "study"
    seed: int = 0
    data: DataConfig
    sites: dict[str, SiteConfig] = Field(default_factory=dict)
    transforms: TransformConfig = Field(default_factory=TransformConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    plugins: PluginsConfig = Field(default_factory=PluginsConfig)
    trackers: list[str] = Field(
        default_factory=list,
        description="experiment trackers to log to, such as tensorboard or mlflow; each needs its extra installed",
    )
    seeds: list[int] | None = Field(
        None, min_length=1, description="run the study once per seed and report the mean and standard deviation"
    )
    stages: list[StageConfig] = Field(
        default_factory=list, description="chained stages (for example pretrain, then adapt), run in order"
    )

    #: folder of the study file; relative paths in it resolve against this folder
    base_dir: str = Field(".", exclude=True)
    #: key path -> the ``--set key.path=value`` text that set it, filled by :func:`load_study`
    _overrides: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("sites")
    @classmethod
    def _check_sites(cls, value: dict[str, SiteConfig]) -> dict[str, SiteConfig]:
        if value and not any(s.role == "source" for s in value.values()):
            raise ValueError("at least one site needs role: source, because training needs labels")
        return value

    @model_validator(mode="after")
    def _check_stages(self) -> "Study":
        names = [stage.name for stage in self.stages]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"stage names must be unique, got {duplicates} more than once")
        for i, stage in enumerate(self.stages):
            if stage.init not in ("previous", "study") and stage.init not in names[:i]:
                raise ValueError(f"stage {stage.name!r} has init {stage.init!r}, which is not 'previous', "
                                 f"'study' or an earlier stage ({names[:i]})")
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        too_large = [axis for axis in self.evaluation.tta_flip_axes if axis >= self.data.spatial_dims]
        if too_large:
            raise ValueError(f"evaluation.tta_flip_axes lists {too_large}, but a study with data.spatial_dims "
                             f"{self.data.spatial_dims} has spatial axes 0 to {self.data.spatial_dims - 1}")
        return self

    @overload
    def resolve_path(self, path: str) -> Path: ...

    @overload
    def resolve_path(self, path: None) -> None: ...

    def resolve_path(self, path: str | None) -> Path | None:
        """Resolve a path from the study file against the study file's folder."""
        if path is None:
            return None
        p = Path(path).expanduser()
        return p if p.is_absolute() else (Path(self.base_dir) / p)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def override_note(self, key: str, text: str) -> str:
        """Append to a problem's ``text`` which ``--set`` option set ``key``, if any (see :func:`override_note`)."""
        return override_note(key, text, self._overrides)


# ---------------------------------------------------------------------------
# Loading and overrides
# ---------------------------------------------------------------------------


def override_note(key: str, text: str, overrides: Mapping[str, str]) -> str:
    """Append to ``text`` a sentence that names the ``--set`` option behind a problem at ``key``.

    ``overrides`` maps key paths to the ``--set`` text that set them. An option that
    set ``key`` or a section above it supplied the value. An option that set a key
    below ``key`` changed the section that a section-level check rejected. Without
    such an option ``text`` is returned unchanged.
    """
    note = ""
    for path, option in reversed(list(overrides.items())):
        if key == path or key.startswith(path + "."):
            note = f"The value came from --set {option!r}."
            break
    else:
        for path, option in reversed(list(overrides.items())):
            if path.startswith(key + "."):
                note = f"--set {option!r} changed this section."
                break
    if not note:
        return text
    return f"{text} {note}" if text.endswith(".") else f"{text}. {note}"


def _strip_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        options = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(options) == 1:
            return options[0]
    return annotation


def _section_at(path: tuple[Any, ...]) -> type[BaseModel] | None:
    """Return the schema class of the section at ``path`` (keys and list indexes), or None."""
    node: Any = Study
    for part in path:
        node = _strip_optional(node)
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = node.model_fields.get(str(part))
            if field is None:
                return None
            node = field.annotation
        elif get_origin(node) in (dict, list):
            # ``part`` is a mapping key (a site name) or a list index (a stage)
            node = get_args(node)[-1]
        else:
            return None
    node = _strip_optional(node)
    return node if isinstance(node, type) and issubclass(node, BaseModel) else None


def _unknown_key_message(loc: tuple[Any, ...], value: Any) -> str:
    """Describe an unknown key with its value, the closest allowed key and all allowed keys."""
    key = str(loc[-1])
    value_text = repr(value)
    if len(value_text) > 60:
        value_text = value_text[:57] + "..."
    text = f"unknown key {key!r} (value {value_text})."
    section = _section_at(tuple(loc[:-1]))
    if section is None:
        return text + " Check the spelling against the study-file reference in README.md."
    allowed = sorted(name for name in section.model_fields if name != "base_dir")
    text += did_you_mean(key, allowed)
    where = "under " + ".".join(str(p) for p in loc[:-1]) if len(loc) > 1 else "at the top level"
    return f"{text} Allowed keys {where}: {', '.join(allowed)}."


def _format_errors(exc: ValidationError, overrides: Mapping[str, str]) -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        received = err.get("input")
        text = err["msg"]
        if err["type"] == "extra_forbidden":
            text = _unknown_key_message(err["loc"], received)
        elif not isinstance(received, dict):
            text = f"{text} (received {received!r})"
        problems.append((key, override_note(key, text, overrides)))
    return problems


def study_from_dict(raw: Any, base_dir: str | Path = ".", source: str = "study",
                    overrides: Mapping[str, str] | None = None) -> Study:
    """Validate a parsed study document.

    Args:
        raw: the parsed YAML document, with any ``--set`` overrides applied.
        base_dir: the folder that relative paths resolve against.
        source: what the document is, for messages, such as the study file's path.
        overrides: key path -> the ``--set`` text that set it, so that a problem in
            such a value names the option instead of only the study file.
    """
    overrides = dict(overrides or {})
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the study file must be a YAML mapping, got {type(raw).__name__}")
    try:
        study = Study.model_validate({**raw, "base_dir": str(base_dir)})
    except ValidationError as exc:
        problems = _format_errors(exc, overrides)
        from_options = sum(override_note(key, "", overrides) != "" for key, _ in problems)
        if from_options == len(problems):
            header = f"invalid --set override (study file {source})"
        elif from_options:
            header = f"{source}: invalid study file or --set override"
        else:
            header = f"{source}: invalid study file"
        raise ConfigError(header, problems) from None
    study._overrides = overrides
    return study


def read_study_dict(path: str | Path) -> dict[str, Any]:
    """Read a study file's YAML without validating it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file not found: {path}. Pass the path of a study YAML file.")
    try:
        with path.open(encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file; pass a study YAML file") from None
    return raw if raw is not None else {}


def load_study(path: str | Path, overrides: list[str] | None = None) -> Study:
    """Read, override and validate a study file.

    Args:
        path: the study YAML file.
        overrides: ``key.path=value`` strings, as given to ``--set``; values are
            parsed as YAML scalars or lists (``train.epochs=3``, ``data.image_size=[32,32]``).
    """
    path = Path(path)
    raw = read_study_dict(path)
    raw = apply_overrides(raw, overrides or [])
    set_by = {".".join(parse_override(text)[0]): text.strip() for text in overrides or []}
    # base_dir is absolute so that a run folder's saved study resolves from any directory.
    return study_from_dict(raw, base_dir=path.resolve().parent, source=str(path), overrides=set_by)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``key.path=value`` into the key path and the YAML-parsed value."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"invalid override --set {text!r}: expected key.path=value, for example "
                          "--set train.epochs=3")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        problem = " ".join(str(exc).split())
        raise ConfigError(f"invalid override --set {text!r}: the value is not valid YAML: {problem}") from None
    return key.split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``key.path=value`` override applied."""
    result = copy.deepcopy(raw)
    for text in overrides:
        keys, value = parse_override(text)
        node = result
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                where = ".".join(keys[: depth + 1])
                raise ConfigError(f"invalid override --set {text!r}: {where} is a value, not a section")
            node = child
        node[keys[-1]] = value
    return result


def recorded_study_defaults(raw: Any) -> Any:
    """Fill in a run folder's recorded study the values its run used for options added since.

    A run records every option of its time in config.yaml. An option added later would
    otherwise take its current default when the run is resumed or evaluated.
    """
    data = raw.get("data") if isinstance(raw, dict) else None
    if isinstance(data, dict) and "orientation" not in data:
        # Before data.orientation existed, every image kept its source's axis order. The
        # current default would feed the run's model reoriented images.
        data["orientation"] = None
    return raw
