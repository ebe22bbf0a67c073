"""The one schema of params.yaml: every setting's type and bounds, declared once. The values live in conf/
(composed into params.yaml, stages/compose.py); the library takes these sections as they are. Unknown keys
and bad values fail naming the key and what is allowed. Imports nothing from the library, so every module
can import it (it is the bottom of the import graph)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

Protocol = Literal["mtil", "classil"]
Shape = Literal["circle", "square", "triangle", "star", "diamond", "cross", "hexagon", "ring"]
SHAPES: tuple[Shape, ...] = get_args(Shape)  # what moder.world's renderer draws
LoraModule = Literal["attn_in", "attn_out", "mlp_fc", "mlp_proj"]
LORA_MODULES: tuple[LoraModule, ...] = get_args(LoraModule)  # the text encoder's linear maps a LoRA can adapt
# How trained classes' scores are lowered by their prototype offsets (moder.evaluation.calibration_offsets)
Calibration = Literal["none", "mean", "task"]
# where a dataset's images come from: rendered from the embedded world, or read by an adapter of moder.datasets
DatasetSource = Literal[
    "embedded",
    "aircraft",
    "caltech101",
    "cifar100",
    "dtd",
    "eurosat",
    "flowers",
    "food",
    "mnist",
    "pets",
    "cars",
    "sun397",
    "imagenet-r",
    "cub200",
    "imagefolder",
    "csv",
]
DATASET_SOURCES: tuple[DatasetSource, ...] = get_args(DatasetSource)
# torch's device types, with an index where they take one: checked here without importing torch
_DEVICE = re.compile(r"(cpu|cuda|mps|xpu|xla|hpu|mtia|privateuseone|meta)(:\d+)?")
_SLOT = "\x00class\x00"


class ParamsError(ValueError):
    """params.yaml (or an override) is invalid; the message names each key at fault."""


def check_templates(templates: list[str]) -> list[str]:
    """Each template must put the class name into its text exactly once (`str.format` with one `{}`):
    "{{}}" formats to a literal "{}", "{0} {0}" repeats it, "{name}" fails, and a template without a
    slot gives every class the same prompt. ValueError naming the template otherwise."""
    if not templates:
        raise ValueError("no templates: at least one prompt template with a '{}' slot is needed")
    for template in templates:
        try:
            filled = template.format(_SLOT)
        except (IndexError, KeyError, ValueError):
            filled = ""
        if filled.count(_SLOT) != 1:
            raise ValueError(
                f"template {template!r} does not insert the class name once: "
                "it needs exactly one '{}' slot (and '{{'/'}}' for literal braces)"
            )
    return templates


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


Int = Annotated[int, Field(strict=True)]  # a boolean is not a number of epochs
Float = Annotated[float, Field(strict=True)]  # an integer is a float, a boolean is not


class _Section(BaseModel):
    # allow_inf_nan: a non-finite number is never a meaningful setting. The values are conf/'s: a section
    # has no default but where a field is optional by nature (a dataset's shifts default to the clean domain)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelParams(_Section):
    architecture: str
    pretrained: str | None  # an open_clip pretrained tag
    checkpoint: str | None  # or a local weights file
    cache_dir: str | None
    device: str

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not _DEVICE.fullmatch(device):
            raise ValueError(f"unknown device {device!r}; e.g. cpu, cuda, cuda:1, mps")
        return device

    @model_validator(mode="after")
    def _one_weights_source(self) -> ModelParams:
        if self.pretrained and self.checkpoint:
            raise ValueError("set either pretrained (an open_clip tag) or checkpoint (a local file), not both")
        return self


class ContextParams(_Section):
    init: str = Field(min_length=1)  # the leading words a context expert replaces


class LoraParams(_Section):
    rank: Int = Field(ge=1, le=256)
    alpha: Float = Field(gt=0)  # scaling = alpha / rank
    # None: every layer of the text encoder; negative indices count from the end. Rank 1 on the last layer is
    # 8,192 parameters per class on ViT-B-16 (9.8 M for MTIL's 1,201 classes): BENCHMARKS.md.
    layers: list[Int] | None
    modules: list[LoraModule] = Field(min_length=1)


class ExpertParams(_Section):
    kind: Literal["context", "lora"]
    context: ContextParams
    lora: LoraParams


class TrainParams(_Section):
    epochs: Int = Field(ge=1)
    batch_size: Int = Field(ge=1)
    lr: Float = Field(gt=0)
    weight_decay: Float = Field(ge=0)
    logit_scale: Float = Field(gt=0)
    reg_zeroshot: Float = Field(ge=0)  # weight of mean (1 - cos(prototype, zero-shot prototype))
    # Textual alignment: weight of mean (1 - cos(prototype, the class's mean image feature)) beside cross-entropy.
    align: Float = Field(ge=0)
    # Weight of cross-entropy on each earlier split's classes' mean image feature (stored when that split was
    # trained; no image kept), labelled with its stored prototype among the negatives: the new prototypes
    # must not attract earlier classes' images. Needs negatives earlier or dataset.
    anchor_earlier: Float = Field(ge=0)
    # Templates each class reads per optimisation step, drawn afresh every step (seeded); null = all.
    # Prototypes at inference always use the whole ensemble.
    templates_per_step: Int | None = Field(ge=1)
    # Extra logit columns while training a task (text only, no image replayed), same dataset:
    # earlier = the stored prototypes of classes trained in earlier tasks; dataset = those plus the
    # zero-shot prototypes of the classes not trained yet (class names are known from step 1, as the
    # protocol evaluates future tasks with them).
    negatives: Literal["none", "earlier", "dataset"]

    @model_validator(mode="after")
    def _anchors_need_earlier_prototypes(self) -> TrainParams:
        if self.anchor_earlier > 0 and self.negatives == "none":
            raise ValueError(
                "anchor_earlier > 0 labels earlier centroids with their stored prototypes: "
                "set negatives to earlier or dataset (or anchor_earlier to 0)"
            )
        return self


class RetrievalParams(_Section):
    k: Int = Field(ge=1)
    temperature: Float = Field(gt=0)
    null_score: Float | None = Field(ge=-1, le=1)  # the frozen model competes for weight with this score
    # Compose a class only if its zero-shot prototype is at least this similar (cosine) to its closest hub
    # key; otherwise it keeps its zero-shot prototype. null: always compose.
    gate: Float | None = Field(ge=-1, le=1)


class CompositionParams(_Section):
    # How a class not yet trained gets its prototype from its k retrieved hub classes: parameter (their experts'
    # weights mixed, the class's prompts encoded), output (each expert encodes the prompts, the prototypes mixed)
    # or displacement (no encoding: the class's zero-shot prototype moved as the retrieved classes' own experts
    # moved theirs, moder.compose.displace_prototypes)
    space: Literal["parameter", "output", "displacement"]
    alpha: Float = Field(ge=0, le=1)  # trained classes: alpha * own expert + (1 - alpha) * zero-shot
    alpha_unseen: Float = Field(ge=0, le=1)  # composed classes: the same, toward their zero-shot prototype
    # Lower trained classes' scores by their prototype offsets (moder.train.prototype_offsets):
    # none | mean (the hub's mean offset, only where untrained classes compete) | task (each class its
    # task's mean offset, everywhere; the oracle too). See moder.evaluation.calibration_offsets.
    calibrate: Calibration

    @field_validator("calibrate", mode="before")
    @classmethod
    def _boolean_calibrate(cls, value: object) -> object:
        """Hub indexes written before the modes existed say true/false."""
        return {True: "mean", False: "none"}.get(value, value) if isinstance(value, bool) else value


class EvaluationSettings(_Section):
    """How prototypes are composed and scored: from params.yaml (Params.evaluation_settings), or from the
    settings a hub index keeps (moder classify)."""

    protocol: Protocol
    retrieval: RetrievalParams
    composition: CompositionParams


class DomainParams(_Section):
    """How a rendered dataset draws its images (moder.world.render); the defaults are the clean domain."""

    background: tuple[float, float] = (0.0, 0.3)  # grey level range of the background
    texture: Float = Field(0.0, ge=0, le=1)  # amplitude of random stripes on the background
    tint: Float = Field(0.0, ge=0, le=2)  # how far each colour moves along its tint direction
    own_tint: StrictBool = False  # tint along this dataset's own directions, shared with no other dataset
    outline: Float = Field(0.0, ge=0, le=1)  # fraction of the shapes drawn as outlines
    noise: Float = Field(0.02, ge=0, le=1)  # std of Gaussian pixel noise
    blur: Float = Field(0.0, ge=0, le=8)  # sigma (pixels) of a Gaussian blur
    contrast: Float = Field(1.0, gt=0, le=2)  # 1 keeps contrast, < 1 pulls every pixel toward mid grey
    scale: tuple[float, float] = (0.45, 0.75)  # object radius as a fraction of the half image

    @field_validator("background", "scale")
    @classmethod
    def _range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= value[0] <= value[1] <= 1:
            raise ValueError("need 0 <= low <= high <= 1")
        return value


class DatasetParams(DomainParams):
    """A downstream dataset: rendered from the embedded world (its own class subset and shift),
    or read from disk by one of moder.datasets' adapters (`source`, `root`)."""

    source: DatasetSource = "embedded"
    root: str | None = None  # where an image dataset lies on disk (see docs/datasets.md)
    templates: list[str] | None = None  # None: the dataset's catalog templates, else params.yaml templates
    classes: Int | None = Field(None, ge=2)  # embedded: how many of the world's classes; None: all
    # embedded: None draws the dataset's classes for it alone; an integer takes positions class_offset ..
    # class_offset + classes - 1 of one seeded order of the world's classes shared by every dataset, so
    # datasets with ranges that do not overlap share no class name (moder.world.dataset_classes)
    class_offset: Int | None = Field(None, ge=0)
    splits: Int = Field(1, ge=1)  # Class-IL: into how many tasks its classes are cut
    class_order: Literal["shuffled", "sequential"] = "shuffled"  # sequential: label order, as mammoth's splits

    @field_validator("templates")
    @classmethod
    def _templates_have_slot(cls, templates: list[str] | None) -> list[str] | None:
        return None if templates is None else check_templates(templates)

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
    """The embedded world: every class is "<colour> <shape>" (moder.world.World)."""

    image_size: Int = Field(ge=8, le=256)  # must equal the model's input size
    colours: dict[str, tuple[float, float, float]] = Field(min_length=2)  # name -> RGB in [0, 1]
    shapes: list[Shape] = Field(min_length=2)

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


class PretrainParams(_Section):
    """Contrastive pre-training of the embedded benchmark's tiny CLIP on the clean domain."""

    steps: Int = Field(ge=1)
    batch_size: Int = Field(ge=2)
    lr: Float = Field(gt=0)
    weight_decay: Float = Field(ge=0)
    warmup: Int = Field(ge=1)
    captions: list[str] = Field(min_length=1)
    domain: DomainParams

    @field_validator("captions")
    @classmethod
    def _captions_have_slot(cls, captions: list[str]) -> list[str]:
        return check_templates(captions)


class ExtractParams(_Section):
    train_per_class: Int = Field(ge=1)  # embedded datasets: images rendered per class
    test_per_class: Int = Field(ge=1)
    batch_size: Int = Field(ge=1)
    workers: Int = Field(ge=0)  # DataLoader worker processes decoding image datasets
    # JPEG files decoded in the workers with PIL (open_clip's own), or on model.device (moder/encode.py)
    decode: Literal["workers", "device"]
    precision: Literal["fp32", "bf16", "fp16"]  # autocast of the image tower (bf16/fp16: GPU)
    # An image file that cannot be decoded fails the stage naming it; true skips it and reports the count.
    skip_bad_images: StrictBool
    # Few-shot protocols: training images kept per class, drawn from the seed (moder/shots.py); null: all.
    shots: Int | None = Field(None, ge=1)


class BenchmarkParams(_Section):
    name: str  # data/<name>/ holds its outputs
    preset: str  # the file of conf/benchmark/ this block came from (stages/compose.py)
    protocol: Protocol

    @field_validator("name", "preset")
    @classmethod
    def _path_safe(cls, name: str, info: ValidationInfo) -> str:
        if info.field_name == "name" and name == "backbone":
            raise ValueError("data/backbone/ holds the backbone every benchmark shares: name the benchmark otherwise")
        return path_name(name, f"benchmark {info.field_name}")


class TaskParams(_Section):
    dataset: str
    split: Int = Field(1, ge=1)  # which part of the dataset's classes (Class-IL)


class Params(_Section):
    # what params.yaml is, as its first line says: composed from conf/, not a file to edit
    generated: str | None = None
    seed: Int = Field(ge=0)
    templates: list[str] = Field(min_length=1)  # zero-shot prototypes: the ensemble, also read by LoRA experts
    model: ModelParams
    expert: ExpertParams
    train: TrainParams
    retrieval: RetrievalParams
    composition: CompositionParams
    benchmark: BenchmarkParams
    world: WorldParams
    pretrain: PretrainParams
    extract: ExtractParams
    datasets: dict[str, DatasetParams] = Field(min_length=1)
    tasks: dict[str, TaskParams] = Field(min_length=1)

    @field_validator("templates")
    @classmethod
    def _templates_have_slot(cls, templates: list[str]) -> list[str]:
        return check_templates(templates)

    def evaluation_settings(self) -> EvaluationSettings:
        return EvaluationSettings(
            protocol=self.benchmark.protocol, retrieval=self.retrieval, composition=self.composition
        )

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
    if error["type"] == "missing":
        return f"missing key '{key}' (conf/ sets every key: compose params.yaml from it, python -m stages.compose)"
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


class _UniqueKeys(yaml.SafeLoader):
    """YAML as safe_load reads it, except that a key given twice in one mapping is an error (PyYAML keeps the
    last silently; DVC refuses such a file)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(text: str) -> Any:
    """YAML data, plain types only (as yaml.safe_load), refusing a key given twice; yaml.YAMLError otherwise."""
    return yaml.load(text, Loader=_UniqueKeys)  # noqa: S506 (a SafeLoader)


def load_params(path: Path | str) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        data = read_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ParamsError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason})") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    return parse_params(data, str(path))
