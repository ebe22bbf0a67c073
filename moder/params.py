"""The one schema of params.yaml. Unknown keys and bad values fail naming the key and what is allowed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import ErrorDetails

from moder.datasets import ADAPTERS
from moder.evaluation import EvaluationSettings
from moder.experts import LORA_MODULES, LoraModule
from moder.factory import ExpertSpec
from moder.names import check_templates
from moder.pretrain import PretrainConfig
from moder.train import TrainConfig
from moder.world import SHAPES, Domain, Shape, World

# Names that become parts of output paths (data/<benchmark>/features/<dataset>, ...): one plain
# path component each, so no name can lead a stage's writes out of its own directory.
_PATH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def path_name(name: str, what: str) -> str:
    """`name` if it is safe as one path component, else a ValueError naming `what` it is."""
    if not _PATH_NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"{what} {name!r} becomes a directory name: use letters, digits, '.', '_' and '-' "
            "(no '/', no '..', not starting with '.')"
        )
    return name


def _with_slot(templates: list[str]) -> list[str]:
    check_templates(templates)
    return templates


class ParamsError(ValueError):
    """params.yaml (or an override) is invalid; the message names each key at fault."""


class _Section(BaseModel):
    # allow_inf_nan: a non-finite number is never a meaningful setting
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelParams(_Section):
    architecture: str = "moder-tiny-clip"
    pretrained: str | None = None
    checkpoint: str | None = None
    cache_dir: str | None = None
    device: str = "cpu"

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        try:
            torch.device(device)
        except RuntimeError:
            raise ValueError(f"unknown device {device!r}; e.g. cpu, cuda, cuda:1, mps") from None
        return device

    @model_validator(mode="after")
    def _one_weights_source(self) -> ModelParams:
        if self.pretrained and self.checkpoint:
            raise ValueError("set either pretrained (an open_clip tag) or checkpoint (a local file), not both")
        return self


class ContextParams(_Section):
    init: str = Field("a photo of a", min_length=1)


class LoraParams(_Section):
    rank: int = Field(1, ge=1, le=256)
    alpha: float = Field(8.0, gt=0)
    # None: every layer of the text encoder; negative indices count from the end. The default, rank 1 on the
    # last layer, is 8,192 parameters per class on ViT-B-16 (9.8 M for MTIL's 1,201 classes): BENCHMARKS.md.
    layers: list[int] | None = Field(default_factory=lambda: [-1])
    modules: list[LoraModule] = Field(default_factory=lambda: list(LORA_MODULES), min_length=1)


class ExpertParams(_Section):
    kind: Literal["context", "lora"] = "lora"
    context: ContextParams = ContextParams()
    lora: LoraParams = LoraParams()

    def spec(self) -> ExpertSpec:
        return ExpertSpec(
            kind=self.kind,
            context_init=self.context.init,
            lora_rank=self.lora.rank,
            lora_alpha=self.lora.alpha,
            lora_layers=None if self.lora.layers is None else tuple(self.lora.layers),
            lora_modules=tuple(self.lora.modules),
        )


class TrainParams(_Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    logit_scale: float = Field(100.0, gt=0)
    reg_zeroshot: float = Field(0.0, ge=0)
    # Textual alignment: weight of mean (1 - cos(prototype, the class's mean image feature)) beside cross-entropy.
    align: float = Field(0.0, ge=0)
    # Weight of cross-entropy on each earlier split's classes' mean image feature (stored when that split was
    # trained; no image kept), labelled with its stored prototype among the negatives: the new prototypes
    # must not attract earlier classes' images. Needs negatives earlier or dataset.
    anchor_earlier: float = Field(3.0, ge=0)
    # Templates each class reads per optimisation step, drawn afresh every step (seeded); null = all.
    # Prototypes at inference always use the whole ensemble.
    templates_per_step: int | None = Field(None, ge=1)
    # Extra logit columns while training a task (text only, no image replayed), same dataset:
    # earlier = the stored prototypes of classes trained in earlier tasks; dataset = those plus the
    # zero-shot prototypes of the classes not trained yet (class names are known from step 1, as the
    # protocol evaluates future tasks with them).
    negatives: Literal["none", "earlier", "dataset"] = "earlier"

    @model_validator(mode="after")
    def _anchors_need_earlier_prototypes(self) -> TrainParams:
        if self.anchor_earlier > 0 and self.negatives == "none":
            raise ValueError(
                "anchor_earlier > 0 labels earlier centroids with their stored prototypes: "
                "set negatives to earlier or dataset (or anchor_earlier to 0)"
            )
        return self

    def config(self, seed: int) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            logit_scale=self.logit_scale,
            reg_zeroshot=self.reg_zeroshot,
            align=self.align,
            anchor_earlier=self.anchor_earlier,
            templates_per_step=self.templates_per_step,
            seed=seed,
        )


class RetrievalParams(_Section):
    k: int = Field(16, ge=1)
    temperature: float = Field(0.3, gt=0)
    null_score: float | None = Field(None, ge=-1, le=1)
    # Compose a class only if its zero-shot prototype is at least this similar (cosine) to its closest hub
    # key; otherwise it keeps its zero-shot prototype. null: always compose.
    gate: float | None = Field(None, ge=-1, le=1)


class CompositionParams(_Section):
    space: Literal["parameter", "output"] = "parameter"
    alpha: float = Field(0.8, ge=0, le=1)  # trained classes: alpha * own expert + (1 - alpha) * zero-shot
    alpha_unseen: float = Field(0.5, ge=0, le=1)  # composed classes: the same, toward their zero-shot prototype
    # Lower trained classes' scores by their prototype offsets (moder.train.prototype_offsets):
    # none | mean (the hub's mean offset, only where untrained classes compete) | task (each class its
    # task's mean offset, everywhere; the oracle too). See moder.evaluation.Calibration.
    calibrate: Literal["none", "mean", "task"] = "mean"

    @field_validator("calibrate", mode="before")
    @classmethod
    def _boolean_calibrate(cls, value: object) -> object:
        """Hub indexes written before the modes existed say true/false."""
        return {True: "mean", False: "none"}.get(value, value) if isinstance(value, bool) else value


class DomainParams(_Section):
    """How a rendered dataset draws its images (moder.world.Domain); defaults: the clean domain."""

    background: tuple[float, float] = (0.0, 0.3)
    texture: float = Field(0.0, ge=0, le=1)
    tint: float = Field(0.0, ge=0, le=2)
    own_tint: bool = False  # tint along this dataset's own directions, shared with no other dataset
    outline: float = Field(0.0, ge=0, le=1)
    noise: float = Field(0.02, ge=0, le=1)
    blur: float = Field(0.0, ge=0, le=8)
    contrast: float = Field(1.0, gt=0, le=2)
    scale: tuple[float, float] = (0.45, 0.75)

    @field_validator("background", "scale")
    @classmethod
    def _range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= value[0] <= value[1] <= 1:
            raise ValueError("need 0 <= low <= high <= 1")
        return value

    def domain(self) -> Domain:
        return Domain(**self.model_dump(include=set(DomainParams.model_fields)))


DATASET_SOURCES = ("embedded", *ADAPTERS)


class DatasetParams(DomainParams):
    """A downstream dataset: rendered from the embedded world (its own class subset and shift),
    or read from disk by one of moder.datasets' adapters (`source`, `root`)."""

    source: str = "embedded"
    root: str | None = None  # where an image dataset lies on disk (see docs/datasets.md)
    templates: list[str] | None = None  # None: the dataset's catalog templates, else params.yaml templates
    classes: int | None = Field(None, ge=2)  # embedded: how many of the world's classes; None: all
    # embedded: None draws the dataset's classes for it alone; an integer takes positions class_offset ..
    # class_offset + classes - 1 of one seeded order of the world's classes shared by every dataset, so
    # datasets with ranges that do not overlap share no class name (moder.world.dataset_classes)
    class_offset: int | None = Field(None, ge=0)
    splits: int = Field(1, ge=1)  # Class-IL: into how many tasks its classes are cut
    class_order: Literal["shuffled", "sequential"] = "shuffled"  # sequential: label order, as mammoth's splits

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: str) -> str:
        if source not in DATASET_SOURCES:
            raise ValueError(f"unknown dataset source {source!r}; allowed: {', '.join(DATASET_SOURCES)}")
        return source

    @field_validator("templates")
    @classmethod
    def _templates_have_slot(cls, templates: list[str] | None) -> list[str] | None:
        return None if templates is None else _with_slot(templates)

    @model_validator(mode="after")
    def _fields_fit_source(self) -> DatasetParams:
        if self.source == "embedded":
            if self.root is not None:
                raise ValueError("root is for image datasets read from disk; source embedded renders its images")
            if self.class_offset is not None and self.classes is None:
                raise ValueError("class_offset takes a range of `classes` classes: set classes too")
            return self
        if self.root is None:
            raise ValueError(f"source {self.source} needs root: the directory that holds the dataset")
        # compared with the defaults, not "was it given": a full dump of the params must parse again
        rendering = [
            name
            for name in (*DomainParams.model_fields, "classes", "class_offset")
            if getattr(self, name) != DatasetParams.model_fields[name].default
        ]
        if rendering:
            raise ValueError(f"{', '.join(rendering)}: only for source embedded (rendered datasets), not {self.source}")
        return self


class WorldParams(_Section):
    image_size: int = Field(32, ge=8, le=256)
    colours: dict[str, tuple[float, float, float]] = Field(
        default_factory=lambda: {
            "red": (0.9, 0.15, 0.15),
            "orange": (1.0, 0.55, 0.1),
            "yellow": (0.95, 0.9, 0.15),
            "green": (0.2, 0.75, 0.25),
            "cyan": (0.15, 0.8, 0.85),
            "blue": (0.15, 0.3, 0.95),
            "purple": (0.55, 0.2, 0.8),
            "pink": (1.0, 0.45, 0.75),
        },
        min_length=2,
    )
    shapes: list[Shape] = Field(
        default_factory=lambda: list(SHAPES),
        min_length=2,
    )

    @field_validator("colours")
    @classmethod
    def _rgb(cls, colours: dict[str, tuple[float, float, float]]) -> dict[str, tuple[float, float, float]]:
        for name, rgb in colours.items():
            if not all(0 <= v <= 1 for v in rgb):
                raise ValueError(f"colour {name!r} needs RGB values in [0, 1], got {list(rgb)}")
        return colours

    @field_validator("shapes")
    @classmethod
    def _distinct(cls, shapes: list[str]) -> list[str]:
        if len(set(shapes)) != len(shapes):
            raise ValueError(f"shapes must be distinct, got {shapes}")
        return shapes

    def world(self, seed: int) -> World:
        return World(dict(self.colours), tuple(self.shapes), self.image_size, seed)


class PretrainParams(_Section):
    steps: int = Field(900, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup: int = Field(100, ge=1)
    captions: list[str] = Field(
        default_factory=lambda: [
            "a {}.",
            "a photo of a {}.",
            "a drawing of a {}.",
            "a rendering of a {}.",
            "an image of a {}.",
            "a picture of the {}.",
        ],
        min_length=1,
    )
    domain: DomainParams = DomainParams()

    @field_validator("captions")
    @classmethod
    def _captions_have_slot(cls, captions: list[str]) -> list[str]:
        return _with_slot(captions)

    def config(self, seed: int) -> PretrainConfig:
        return PretrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            warmup=self.warmup,
            seed=seed,
        )


class ExtractParams(_Section):
    train_per_class: int = Field(32, ge=1)  # embedded datasets: images rendered per class
    test_per_class: int = Field(32, ge=1)
    batch_size: int = Field(256, ge=1)
    workers: int = Field(0, ge=0)  # DataLoader worker processes decoding image datasets
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast of the image tower (bf16/fp16: GPU)
    # An image file that cannot be decoded fails the stage naming it; true skips it and reports the count.
    skip_bad_images: bool = False


class BenchmarkParams(_Section):
    name: str = "embedded-mtil"
    preset: str = "embedded-mtil"  # the file of conf/benchmark/ this block came from (stages/compose.py)
    protocol: Literal["mtil", "classil"] = "mtil"

    @field_validator("name", "preset")
    @classmethod
    def _path_safe(cls, name: str, info: ValidationInfo) -> str:
        return path_name(name, f"benchmark {info.field_name}")


class TaskParams(_Section):
    dataset: str
    split: int = Field(1, ge=1)  # which part of the dataset's classes (Class-IL)


class Params(_Section):
    seed: int = Field(0, ge=0)
    templates: list[str] = Field(
        default_factory=lambda: ["a photo of a {}.", "a drawing of a {}.", "a rendering of a {}."], min_length=1
    )
    model: ModelParams = ModelParams()
    expert: ExpertParams = ExpertParams()
    train: TrainParams = TrainParams()
    retrieval: RetrievalParams = RetrievalParams()
    composition: CompositionParams = CompositionParams()
    benchmark: BenchmarkParams = BenchmarkParams()
    world: WorldParams = WorldParams()
    pretrain: PretrainParams = PretrainParams()
    extract: ExtractParams = ExtractParams()
    # The benchmark itself has no default: a params file without it is refused, not filled in.
    datasets: dict[str, DatasetParams] = Field(min_length=1)
    tasks: dict[str, TaskParams] = Field(min_length=1)

    @field_validator("templates")
    @classmethod
    def _templates_have_slot(cls, templates: list[str]) -> list[str]:
        return _with_slot(templates)

    def evaluation_settings(self) -> EvaluationSettings:
        return evaluation_settings(self.retrieval, self.composition, self.benchmark.protocol)

    @field_validator("datasets", "tasks")
    @classmethod
    def _path_safe_keys(cls, entries: dict[str, Any], info: Any) -> dict[str, Any]:
        for name in entries:
            path_name(name, f"{info.field_name} key")
        return entries

    @model_validator(mode="after")
    def _datasets_fit_world(self) -> Params:
        total = len(self.world.colours) * len(self.world.shapes)
        for name, spec in self.datasets.items():
            if spec.source != "embedded" or spec.classes is None:
                continue
            end = (spec.class_offset or 0) + spec.classes
            if end > total:
                key = "classes" if spec.class_offset is None else "class_offset"
                raise ValueError(
                    f"datasets.{name}.{key}: classes {(spec.class_offset or 0) + 1}..{end} asked of a world of "
                    f"{total} classes ({len(self.world.colours)} colours x {len(self.world.shapes)} shapes)"
                )
        return self

    @model_validator(mode="after")
    def _tasks_fit_protocol(self) -> Params:
        seen: set[tuple[str, int]] = set()
        for name, task in self.tasks.items():
            if task.dataset not in self.datasets:
                raise ValueError(
                    f"tasks.{name}.dataset: unknown dataset {task.dataset!r}; datasets: {', '.join(self.datasets)}"
                )
            splits = self.datasets[task.dataset].splits
            if task.split > splits:
                raise ValueError(f"tasks.{name}.split: {task.split} but datasets.{task.dataset}.splits is {splits}")
            if (task.dataset, task.split) in seen:
                raise ValueError(
                    f"tasks.{name}: split {task.split} of dataset {task.dataset!r} is already another task"
                )
            seen.add((task.dataset, task.split))
        splits_in_order: dict[str, int] = {}
        for name, task in self.tasks.items():  # train@<dataset> trains a dataset's splits in split order
            if task.split < splits_in_order.get(task.dataset, 0):
                raise ValueError(
                    f"tasks.{name}: split {task.split} of dataset {task.dataset!r} comes after split "
                    f"{splits_in_order[task.dataset]}; a dataset's tasks must follow its split order"
                )
            splits_in_order[task.dataset] = task.split
        used = {task.dataset for task in self.tasks.values()}
        if self.benchmark.protocol == "classil" and len(used) != 1:
            raise ValueError(f"benchmark.protocol classil splits one dataset into tasks; the tasks use {sorted(used)}")
        if self.benchmark.protocol == "mtil" and len(used) != len(self.tasks):
            raise ValueError("benchmark.protocol mtil gives each task its own dataset; two tasks share one")
        return self


def evaluation_settings(
    retrieval: RetrievalParams, composition: CompositionParams, protocol: Literal["mtil", "classil"]
) -> EvaluationSettings:
    """How prototypes are composed and scored: from params.yaml, or from a hub index's settings."""
    return EvaluationSettings(
        protocol=protocol,
        k=retrieval.k,
        temperature=retrieval.temperature,
        null_score=retrieval.null_score,
        gate=retrieval.gate,
        space=composition.space,
        alpha=composition.alpha,
        alpha_unseen=composition.alpha_unseen,
        calibrate=composition.calibrate,
    )


def _allowed(model: type[BaseModel] | None, location: tuple) -> str:
    """The keys allowed at `location`'s parent, for an 'unknown key' message."""
    for part in location[:-1]:
        field = model.model_fields.get(part) if model is not None else None
        model = field.annotation if field is not None and isinstance(field.annotation, type) else None
    if model is None or not issubclass(model, BaseModel):
        return ""
    return f"; allowed keys: {', '.join(model.model_fields)}"


def _describe(error: ErrorDetails) -> str:
    location = tuple(error["loc"])
    key = ".".join(str(part) for part in location) or "<root>"
    if error["type"] == "extra_forbidden":
        return f"unknown key '{key}'{_allowed(Params, location)}"
    message = error["msg"].removeprefix("Value error, ")
    if not location:  # a check across sections names its keys itself
        return message
    return f"key '{key}': {message} (got {error.get('input')!r})"


def parse_params(data: Any, source: str = "params.yaml") -> Params:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: expected a mapping of keys at the top level, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as error:
        problems = "\n  ".join(_describe(e) for e in error.errors())
        raise ParamsError(f"{source}: invalid params\n  {problems}") from None


def load_params(path: Path | str) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ParamsError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason})") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from None
    return parse_params(data, str(path))
