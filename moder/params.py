"""The one schema of params.yaml. Unknown keys and bad values fail naming the key and what is allowed."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moder.experts import LORA_MODULES
from moder.factory import ExpertSpec
from moder.train import TrainConfig


class ParamsError(ValueError):
    """params.yaml (or an override) is invalid; the message names each key at fault."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelParams(_Section):
    architecture: str = "moder-tiny-clip"
    pretrained: str | None = None
    checkpoint: str | None = None
    cache_dir: str | None = None
    device: str = "cpu"

    @model_validator(mode="after")
    def _one_weights_source(self) -> "ModelParams":
        if self.pretrained and self.checkpoint:
            raise ValueError("set either pretrained (an open_clip tag) or checkpoint (a local file), not both")
        return self


class ContextParams(_Section):
    init: str = Field("a photo of a", min_length=1)


class LoraParams(_Section):
    rank: int = Field(4, ge=1, le=256)
    alpha: float = Field(8.0, gt=0)
    layers: list[int] | None = None  # None: every layer of the text encoder
    modules: list[Literal["attn_in", "attn_out", "mlp_fc", "mlp_proj"]] = Field(
        default_factory=lambda: list(LORA_MODULES), min_length=1
    )


class ExpertParams(_Section):
    kind: Literal["context", "lora"] = "context"
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
    prior_negatives: bool = False

    def config(self, seed: int) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            logit_scale=self.logit_scale,
            reg_zeroshot=self.reg_zeroshot,
            seed=seed,
        )


class RetrievalParams(_Section):
    k: int = Field(3, ge=1)
    temperature: float = Field(0.05, gt=0)
    null_score: float | None = Field(None, ge=-1, le=1)


class CompositionParams(_Section):
    space: Literal["parameter", "output"] = "parameter"
    alpha: float = Field(1.0, ge=0, le=1)


class DemoParams(_Section):
    colours: list[str] = Field(default_factory=lambda: ["red", "green", "blue", "yellow"], min_length=2)
    shapes: list[str] = Field(default_factory=lambda: ["circle", "square", "star", "triangle"], min_length=2)
    samples_per_class: int = Field(40, ge=2)
    shift: float = Field(1.0, ge=0)
    noise: float = Field(0.3, ge=0)


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
    demo: DemoParams = DemoParams()

    @field_validator("templates")
    @classmethod
    def _templates_have_slot(cls, templates: list[str]) -> list[str]:
        for template in templates:
            if "{}" not in template:
                raise ValueError(f"template {template!r} has no '{{}}' slot for the class name")
        return templates


def _allowed(model: type[BaseModel] | None, location: tuple) -> str:
    """The keys allowed at `location`'s parent, for an 'unknown key' message."""
    for part in location[:-1]:
        field = model.model_fields.get(part) if model is not None else None
        model = field.annotation if field is not None and isinstance(field.annotation, type) else None
    if model is None or not issubclass(model, BaseModel):
        return ""
    return f"; allowed keys: {', '.join(model.model_fields)}"


def _describe(error: dict) -> str:
    location = tuple(error["loc"])
    key = ".".join(str(part) for part in location) or "<root>"
    if error["type"] == "extra_forbidden":
        return f"unknown key '{key}'{_allowed(Params, location)}"
    return f"key '{key}': {error['msg']} (got {error.get('input')!r})"


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
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from None
    return parse_params(data, str(path))
