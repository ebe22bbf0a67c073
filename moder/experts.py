"""Per-class textual experts: learnable context tokens or LoRA on the text encoder.

A set of E experts is stored as stacked tensors so that N classes, each with its own
expert, are encoded in one batched forward (see `moder.text.TextTower.encode`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from moder.errors import UserError
from moder.params import LORA_MODULES
from moder.tensors import TensorFileError, load_tensors, save_tensors


class ExpertFileError(UserError, ValueError):
    """An experts file is missing, malformed or belongs to another backbone; the message names it."""


def _gather(stacked: Tensor, rows: Tensor) -> Tensor:
    """Rows of `stacked`, repeats allowed, wherever `rows` lives. index_select, not `stacked[rows]`: its
    backward adds the gradients of repeated rows in a fixed order on the CPU, where indexing's backward
    adds them in thread order, so the same seed would not give the same experts."""
    return torch.index_select(stacked, 0, rows.to(stacked.device))


@dataclass
class ContextExperts:
    """E sets of n_ctx token embeddings that replace the prompt's leading words."""

    ctx: Tensor  # [E, n_ctx, width]
    kind: Literal["context"] = field(default="context", init=False)

    def __len__(self) -> int:
        return self.ctx.shape[0]

    @property
    def first_layer(self) -> int:
        """The first text block the experts change: the embedding's tokens reach every block."""
        return 0

    def select(self, rows: Tensor) -> ContextExperts:
        return ContextExperts(_gather(self.ctx, rows))

    def parameters(self) -> list[Tensor]:
        return [self.ctx]

    def with_parameters(self, parameters: list[Tensor]) -> ContextExperts:
        """The same experts holding `parameters` (in the order of `parameters()`)."""
        (ctx,) = parameters
        return ContextExperts(ctx)

    def to(self, device: torch.device | str) -> ContextExperts:
        """The same experts on `device` (differentiable: gradients reach the originals)."""
        return self.with_parameters([p.to(device) for p in self.parameters()])

    def tensors(self) -> dict[str, Tensor]:
        return {"ctx": self.ctx}

    def describe(self) -> dict:
        return {"kind": self.kind, "n_ctx": self.ctx.shape[1]}


@dataclass
class LoraExperts:
    """E low-rank updates W + scaling * B @ A per targeted linear map.

    Targets are named "<layer>.<module>", module one of LORA_MODULES. Experts of
    different rank batch together by zero-padding the rank dimension.
    """

    a: dict[str, Tensor]  # target -> [E, R, in]
    b: dict[str, Tensor]  # target -> [E, out, R]
    scaling: float
    kind: Literal["lora"] = field(default="lora", init=False)

    def __len__(self) -> int:
        return next(iter(self.a.values())).shape[0]

    @property
    def first_layer(self) -> int:
        """The first text block the experts change; the blocks before it see what the frozen model sees."""
        return min(int(target.split(".")[0]) for target in self.a)

    @property
    def rank(self) -> int:
        return next(iter(self.a.values())).shape[1]

    def select(self, rows: Tensor) -> LoraExperts:
        return LoraExperts(
            {t: _gather(v, rows) for t, v in self.a.items()},
            {t: _gather(v, rows) for t, v in self.b.items()},
            self.scaling,
        )

    def parameters(self) -> list[Tensor]:
        return [*self.a.values(), *self.b.values()]

    def with_parameters(self, parameters: list[Tensor]) -> LoraExperts:
        """The same experts holding `parameters` (in the order of `parameters()`)."""
        n = len(self.a)
        return LoraExperts(
            dict(zip(self.a, parameters[:n], strict=True)), dict(zip(self.b, parameters[n:], strict=True)), self.scaling
        )

    def to(self, device: torch.device | str) -> LoraExperts:
        """The same experts on `device` (differentiable: gradients reach the originals)."""
        return self.with_parameters([p.to(device) for p in self.parameters()])

    def tensors(self) -> dict[str, Tensor]:
        return {**{f"lora_a.{t}": v for t, v in self.a.items()}, **{f"lora_b.{t}": v for t, v in self.b.items()}}

    def describe(self) -> dict:
        return {"kind": self.kind, "rank": self.rank, "scaling": self.scaling, "targets": sorted(self.a)}


Experts = ContextExperts | LoraExperts


def lora_targets(n_layers: int, layers: list[int] | None, modules: list[str]) -> list[str]:
    """Target names for the given layers (None = all; negative indices count from the last layer, so
    [-1] is the last layer whatever the model's depth) and modules."""
    for layer in layers or []:
        if not -n_layers <= layer < n_layers:
            raise ValueError(f"LoRA layer {layer} is out of range for a text encoder with {n_layers} layers")
    chosen = range(n_layers) if layers is None else sorted({layer % n_layers for layer in layers})
    for module in modules:
        if module not in LORA_MODULES:
            raise ValueError(f"unknown LoRA module {module!r}; allowed: {', '.join(LORA_MODULES)}")
    return [f"{layer}.{module}" for layer in chosen for module in modules]


def init_lora_experts(
    n: int, shapes: dict[str, tuple[int, int]], rank: int, scaling: float, generator: torch.Generator
) -> LoraExperts:
    """A random, B zero: every new expert starts as the frozen model."""
    a, b = {}, {}
    for target, (out_features, in_features) in shapes.items():
        bound = 1.0 / math.sqrt(in_features)
        a[target] = (torch.rand(n, rank, in_features, generator=generator) * 2 - 1) * bound
        b[target] = torch.zeros(n, out_features, rank)
    return LoraExperts(a, b, scaling)


def init_context_experts(n: int, init_ctx: Tensor) -> ContextExperts:
    """Every class starts from the embeddings of the template's leading words."""
    return ContextExperts(init_ctx.detach().unsqueeze(0).repeat(n, 1, 1).clone())


def concat_experts(parts: list[Experts]) -> Experts:
    if not parts:
        raise ValueError("no experts to concatenate")
    first = parts[0]
    if any(p.kind != first.kind for p in parts):
        raise ValueError("cannot concatenate experts of different kinds")
    contexts = [p for p in parts if isinstance(p, ContextExperts)]
    if contexts:
        return ContextExperts(torch.cat([p.ctx for p in contexts]))
    loras = [p for p in parts if isinstance(p, LoraExperts)]
    if any(p.describe() != loras[0].describe() for p in loras):
        raise ValueError("cannot concatenate LoRA experts with different rank, scaling or targets")
    return LoraExperts(
        {t: torch.cat([p.a[t] for p in loras]) for t in loras[0].a},
        {t: torch.cat([p.b[t] for p in loras]) for t in loras[0].b},
        loras[0].scaling,
    )


def experts_from_tensors(tensors: dict[str, Tensor], description: dict) -> Experts:
    if description["kind"] == "context":
        return ContextExperts(tensors["ctx"])
    a = {k.removeprefix("lora_a."): v for k, v in tensors.items() if k.startswith("lora_a.")}
    b = {k.removeprefix("lora_b."): v for k, v in tensors.items() if k.startswith("lora_b.")}
    return LoraExperts(a, b, float(description["scaling"]))


_PROTOTYPES = "prototypes"


class ExpertsFile(NamedTuple):
    experts: Experts
    class_names: list[str]
    extra: dict
    prototypes: Tensor | None  # [n_classes, d]: each class encoded by its own expert, if stored


def save_experts(
    path: Path | str,
    experts: Experts,
    class_names: list[str],
    identity: str,
    extra: dict | None = None,
    *,
    prototypes: Tensor | None = None,
) -> None:
    """Write experts as safetensors; metadata holds class names, kind, rank and the identity of the
    CLIP they were trained on (`ModelIdentity` JSON, under the key "backbone"). `prototypes` (each
    class's prototype under its own expert) are stored beside them so evaluation never re-encodes them."""
    if len(class_names) != len(experts):
        raise ValueError(f"{len(class_names)} class names for {len(experts)} experts")
    if prototypes is not None and (prototypes.dim() != 2 or prototypes.shape[0] != len(experts)):
        raise ValueError(f"prototypes of shape {list(prototypes.shape)} for {len(experts)} experts")
    metadata = {"class_names": class_names, "experts": experts.describe(), "backbone": identity, "extra": extra or {}}
    stored = experts.tensors() if prototypes is None else {**experts.tensors(), _PROTOTYPES: prototypes.contiguous()}
    save_tensors(path, stored, metadata)


def load_experts(path: Path | str, identity: str | None = None) -> ExpertsFile:
    """Read experts written by `save_experts`; refuse those made on another backbone, and files whose
    tensors are damaged, non-finite or of shapes that do not fit together."""
    if not Path(path).is_file():
        raise ExpertFileError(f"experts file not found: {path}")
    try:
        tensors, metadata = load_tensors(path)
    except TensorFileError as error:
        raise ExpertFileError(str(error)) from None
    metadata = metadata or {}
    missing = {"class_names", "experts", "backbone", "extra"} - set(metadata)
    if missing:
        raise ExpertFileError(f"{path}: not an experts file (metadata lacks {', '.join(sorted(missing))})")
    if identity is not None and metadata["backbone"] != identity:
        raise ExpertFileError(f"{path}: experts were trained on backbone {metadata['backbone']}, not {identity}")
    prototypes = tensors.pop(_PROTOTYPES, None)
    n_classes = len(metadata["class_names"])
    problem = _shape_problem(tensors, metadata["experts"], n_classes)
    if prototypes is not None and (prototypes.dim() != 2 or prototypes.shape[0] != n_classes):
        problem = f"prototypes of shape {list(prototypes.shape)} for {n_classes} class names"
    if problem:
        raise ExpertFileError(f"{path}: {problem}")
    experts = experts_from_tensors(tensors, metadata["experts"])
    return ExpertsFile(experts, metadata["class_names"], metadata["extra"], prototypes)


def expert_parameters(path: Path | str) -> int:
    """Trainable parameters of the experts a file holds, from its header alone (stored prototypes excluded)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys() if name != _PROTOTYPES)
    except (OSError, SafetensorError) as error:
        raise ExpertFileError(f"{path}: not a safetensors experts file ({error})") from None


def _shape_problem(tensors: dict[str, Tensor], description: dict, n_classes: int) -> str | None:
    """Why these tensors cannot be `n_classes` experts of `description`'s kind (None if they can)."""
    kind = description.get("kind") if isinstance(description, dict) else None
    if kind == "context":
        ctx = tensors.get("ctx")
        if ctx is None or ctx.dim() != 3 or ctx.shape[0] != n_classes or set(tensors) != {"ctx"}:
            return f"expected one ctx tensor [{n_classes}, n_ctx, width], got {_shapes(tensors)}"
        return None
    if kind != "lora":
        return f"unknown expert kind {kind!r}"
    targets = {k.removeprefix("lora_a.") for k in tensors if k.startswith("lora_a.")}
    if not targets or set(tensors) != {f"lora_{side}.{t}" for t in targets for side in "ab"}:
        return f"expected lora_a.<target> and lora_b.<target> pairs, got {_shapes(tensors)}"
    for target in sorted(targets):
        a, b = tensors[f"lora_a.{target}"], tensors[f"lora_b.{target}"]
        if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[1] != b.shape[2]:
            return f"LoRA target {target}: A {list(a.shape)} and B {list(b.shape)} are not rank-matched experts"
        if a.shape[0] != n_classes:
            return f"LoRA target {target}: {a.shape[0]} experts for {n_classes} class names"
    return None


def _shapes(tensors: dict[str, Tensor]) -> str:
    return ", ".join(f"{name} {list(t.shape)}" for name, t in sorted(tensors.items())) or "no tensors"
