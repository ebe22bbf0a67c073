"""The foundational hub: every trained expert, keyed by its class's zero-shot prototype."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import Tensor

from moder.experts import Experts, concat_experts, experts_from_tensors
from moder.io import atomic_path, load_tensors, save_tensors

NULL_EXPERT = -1


@dataclass(frozen=True)
class Retrieval:
    indices: Tensor  # [Q, k] hub rows, NULL_EXPERT for the frozen model
    weights: Tensor  # [Q, k] softmax weights, rows sum to 1
    scores: Tensor  # [Q, k] cosine similarities (null_score for the null expert)


class ExpertHub:
    """Grows step after step; rows are (step, class) pairs, never modified once appended."""

    def __init__(self, identity: str) -> None:
        self.identity = identity  # ModelIdentity JSON of the CLIP the experts were trained on
        self.keys: Tensor | None = None
        self.class_names: list[str] = []
        self.steps: list[int] = []
        self.experts: Experts | None = None

    def __len__(self) -> int:
        return len(self.class_names)

    def append(self, step: int, class_names: list[str], keys: Tensor, experts: Experts) -> None:
        if not len(class_names) == keys.shape[0] == len(experts):
            raise ValueError(
                f"{len(class_names)} classes, {keys.shape[0]} keys and {len(experts)} experts do not match"
            )
        if step in self.steps:
            raise ValueError(f"step {step} is already in the hub")
        keys = F.normalize(keys.detach().float(), dim=-1)
        self.keys = keys if self.keys is None else torch.cat([self.keys, keys])
        self.experts = experts if self.experts is None else concat_experts([self.experts, experts])
        self.class_names += list(class_names)
        self.steps += [step] * len(class_names)

    def query(self, queries: Tensor, k: int, temperature: float, null_score: float | None = None) -> Retrieval:
        """Top-k hub rows by cosine similarity, weights softmax(similarity / temperature).

        With `null_score`, the frozen model competes as one more candidate with that fixed
        score, so a query with no close neighbour keeps most weight on zero-shot.
        """
        if k < 1 or temperature <= 0:
            raise ValueError(f"need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
        queries = F.normalize(queries.float(), dim=-1)
        scores = queries.new_empty(queries.shape[0], 0) if self.keys is None else queries @ self.keys.T
        if null_score is not None:
            scores = torch.cat([scores, scores.new_full((queries.shape[0], 1), null_score)], dim=1)
        if scores.shape[1] == 0:
            raise ValueError("the hub is empty and no null expert was allowed: nothing to retrieve")
        top, rows = scores.topk(min(k, scores.shape[1]), dim=1)
        rows = torch.where(rows == len(self), NULL_EXPERT, rows)
        return Retrieval(rows, torch.softmax(top / temperature, dim=1), top)

    def save(self, tensors_path: Path | str, manifest_path: Path | str) -> None:
        """Keys and experts as safetensors, one manifest row per expert as Parquet; both atomic."""
        if self.experts is None or self.keys is None:
            raise ValueError("cannot save an empty hub")
        save_tensors(
            tensors_path,
            {"keys": self.keys, **self.experts.tensors()},
            {"backbone": self.identity, "experts": self.experts.describe()},
        )
        table = pa.table({"row": list(range(len(self))), "class_name": self.class_names, "step": self.steps})
        table = table.replace_schema_metadata({b"backbone": self.identity.encode()})
        with atomic_path(manifest_path) as temporary:
            pq.write_table(table, temporary)

    @classmethod
    def load(cls, tensors_path: Path | str, manifest_path: Path | str, identity: str | None = None) -> ExpertHub:
        tensors, metadata = load_tensors(tensors_path)
        metadata = metadata or {}
        if "backbone" not in metadata or "experts" not in metadata:
            raise ValueError(f"{tensors_path}: not a hub file (metadata lacks backbone/experts)")
        if identity is not None and metadata["backbone"] != identity:
            raise ValueError(f"{tensors_path}: hub was built on backbone {metadata['backbone']}, not {identity}")
        manifest = pq.read_table(manifest_path).to_pydict()
        if manifest["row"] != list(range(tensors["keys"].shape[0])):
            raise ValueError(
                f"{manifest_path}: manifest rows do not match the {tensors['keys'].shape[0]} keys in {tensors_path}"
            )
        hub = cls(metadata["backbone"])
        hub.keys = tensors.pop("keys")
        hub.experts = experts_from_tensors(tensors, metadata["experts"])
        hub.class_names, hub.steps = manifest["class_name"], manifest["step"]
        return hub
