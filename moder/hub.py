"""The foundational hub: every trained expert, keyed by its class's zero-shot prototype.

On disk a hub is an index, one Parquet file per step: a row per hub class (step, task, dataset,
class name, key, prototype offset) saying which experts file holds its expert and at which row.
The index never copies expert tensors (at MTIL scale they are large): each step's hub points at the
experts files of steps 1..t, and records each file's SHA-256 so a retrained file is never mixed in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import Tensor

from moder.errors import UserError
from moder.experts import ExpertFileError, Experts, ExpertsFile, concat_experts, expert_parameters, load_experts
from moder.io import atomic_path, file_digest

NULL_EXPERT = -1
_IDENTITY, _FILES, _EXPERTS, _SETTINGS = b"moder.identity", b"moder.experts_files", b"moder.experts", b"moder.settings"


class HubFileError(UserError, ValueError):
    """A hub index is missing, malformed, stale or made on another backbone; the message names the file."""


@dataclass(frozen=True)
class Retrieval:
    indices: Tensor  # [Q, k] hub rows, NULL_EXPERT for the frozen model
    weights: Tensor  # [Q, k] softmax weights, rows sum to 1
    scores: Tensor  # [Q, k] cosine similarities (null_score for the null expert)


@dataclass(frozen=True)
class HubEntry:
    """Where one class of a hub step comes from."""

    step: int  # 1-based position of its task in the sequence
    task: str
    dataset: str
    experts_file: str  # relative POSIX path under the experts root
    offsets: tuple[float, ...] = field(default=())  # per class (moder.train.prototype_offsets)


@dataclass(frozen=True)
class HubCost:
    """What a hub costs: its classes, their experts' trainable parameters and the experts files' bytes."""

    classes: int
    parameters: int
    bytes: int


def _index_metadata(path: Path | str, *keys: bytes) -> tuple[list, int]:
    """The values of `keys` in a hub index's metadata (the identity as text, the others decoded from
    JSON) and its number of rows, from the Parquet footer alone."""
    try:
        footer = pq.ParquetFile(path)
        stored = footer.schema_arrow.metadata or {}
        values = [stored[key].decode() if key == _IDENTITY else json.loads(stored[key]) for key in keys]
        return values, footer.metadata.num_rows
    except FileNotFoundError:
        raise HubFileError(f"hub index not found: {path}") from None
    except (KeyError, ValueError, pa.ArrowInvalid, OSError) as error:
        raise HubFileError(f"{path}: not a MoDER hub index ({error})") from None


def hub_cost(index: Path | str, experts_root: Path) -> HubCost:
    """The cost of the hub a saved index describes, from its experts files' headers (no tensor is read)."""
    (files,), rows = _index_metadata(index, _FILES)
    parameters = size = 0
    for name in sorted(files):
        path = experts_root / name
        if not path.is_file():
            raise HubFileError(f"{index} points at {path}, which does not exist (re-run the train stage)")
        parameters += expert_parameters(path)
        size += path.stat().st_size
    return HubCost(rows, parameters, size)


class ExpertHub:
    """Grows step after step; rows are (step, class) pairs, never modified once appended."""

    def __init__(self, identity: str) -> None:
        self.identity = identity  # ModelIdentity JSON of the CLIP the experts were trained on
        self.keys: Tensor | None = None
        self.class_names: list[str] = []
        self.steps: list[int] = []
        self.tasks: list[str] = []
        self.datasets: list[str] = []
        self.offsets: list[float] = []
        self._parts: list[Experts] = []  # one per appended step, concatenated once when first read
        self._own: list[Tensor | None] = []  # per appended step: each class's prototype under its own expert
        self._sources: list[tuple[str, int]] = []  # (experts file, row) per hub row, for the index

    def __len__(self) -> int:
        return len(self.class_names)

    @property
    def experts(self) -> Experts | None:
        """Every hub row's expert, stacked (None for an empty hub); built once, not at every append, which
        would copy the whole hub once per step."""
        if len(self._parts) > 1:
            self._parts = [concat_experts(self._parts)]
        return self._parts[0] if self._parts else None

    def append(
        self,
        step: int,
        class_names: list[str],
        keys: Tensor,
        experts: Experts,
        entry: HubEntry | None = None,
        own: Tensor | None = None,
    ) -> None:
        """Add one step's classes; `entry` says where their experts are stored (for `save_index`), `own` each
        class's prototype under its own expert (the experts file keeps them; the displacement space reads them)."""
        if not len(class_names) == keys.shape[0] == len(experts):
            raise ValueError(
                f"{len(class_names)} classes, {keys.shape[0]} keys and {len(experts)} experts do not match"
            )
        if own is not None and own.shape != keys.shape:
            raise ValueError(f"own prototypes of shape {list(own.shape)} for keys of shape {list(keys.shape)}")
        if step in self.steps:
            raise ValueError(f"step {step} is already in the hub")
        offsets = entry.offsets if entry is not None and entry.offsets else (0.0,) * len(class_names)
        if len(offsets) != len(class_names):
            raise ValueError(f"{len(offsets)} offsets for {len(class_names)} classes")
        keys = F.normalize(keys.detach().float(), dim=-1)
        self.keys = keys if self.keys is None else torch.cat([self.keys, keys])
        if self._parts and experts.describe() != self._parts[0].describe():
            raise ValueError("cannot add experts of another kind, rank, scaling or targets to the hub")
        self._parts.append(experts)
        self._own.append(None if own is None else own.detach().float())
        self.class_names += list(class_names)
        self.steps += [step] * len(class_names)
        self.tasks += [entry.task if entry else str(step)] * len(class_names)
        self.datasets += [entry.dataset if entry else ""] * len(class_names)
        self.offsets += [float(v) for v in offsets]
        self._sources += [(entry.experts_file if entry else "", row) for row in range(len(class_names))]

    def moves(self) -> Tensor:
        """[rows, d]: what each hub class's own expert did to its prototype (own minus its zero-shot key)."""
        if self.keys is None:
            return torch.empty(0, 0)
        # a step's experts file is the source of its first row; steps are appended in order, one `_own` each
        lacking = [
            self._sources[self.steps.index(step)][0] or f"step {step}"
            for step, own in zip(dict.fromkeys(self.steps), self._own, strict=True)
            if own is None
        ]
        if lacking:
            raise HubFileError(
                f"experts files {', '.join(lacking)} hold no own prototypes (written by an older version): "
                "re-run the train stage"
            )
        return torch.cat([own for own in self._own if own is not None]) - self.keys

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

    def save_index(self, path: Path | str, experts_root: Path, settings: dict) -> None:
        """The hub as an index over its experts files (atomic): every file's digest is recorded, and
        `settings` (JSON: how prototypes are composed with this hub) are kept beside it."""
        if not self._parts or self.keys is None:
            raise ValueError("cannot save an empty hub")
        files = sorted({name for name, _ in self._sources})
        if "" in files:
            raise ValueError("every step must say where its experts are stored (append with an entry)")
        digests = {name: file_digest(experts_root / name) for name in files}
        keys = self.keys.numpy()
        table = pa.table(
            {
                "step": pa.array(self.steps, pa.int32()),
                "task": self.tasks,
                "dataset": self.datasets,
                "class_name": self.class_names,
                "key": pa.FixedSizeListArray.from_arrays(pa.array(keys.reshape(-1), pa.float32()), keys.shape[1]),
                "offset": pa.array(self.offsets, pa.float64()),
                "experts_file": [name for name, _ in self._sources],
                "row": pa.array([row for _, row in self._sources], pa.int32()),
            }
        ).replace_schema_metadata(
            {
                _IDENTITY: self.identity.encode(),
                _FILES: json.dumps(digests, sort_keys=True).encode(),
                _EXPERTS: json.dumps(self._parts[0].describe(), sort_keys=True).encode(),
                _SETTINGS: json.dumps(settings, sort_keys=True).encode(),
            }
        )
        with atomic_path(path) as temporary:
            pq.write_table(table, temporary)

    @staticmethod
    def read_index_metadata(path: Path | str) -> tuple[str, dict]:
        """The identity of the backbone a hub index was built on, and its settings."""
        (identity, settings), _ = _index_metadata(path, _IDENTITY, _SETTINGS)
        return identity, settings

    @classmethod
    def load_index(cls, path: Path | str, experts_root: Path, identity: str | None = None) -> ExpertHub:
        """A hub saved by `save_index`, its experts read from the files it points at (each checked
        against the digest the index recorded, and against `identity`)."""
        path = Path(path)
        if not path.is_file():
            raise HubFileError(f"hub index not found: {path}")
        try:
            table = pq.read_table(path)
            metadata = table.schema.metadata or {}
            stored_identity, digests = metadata[_IDENTITY].decode(), json.loads(metadata[_FILES])
            rows = table.drop_columns(["key"]).to_pylist()
            keys = torch.from_numpy(table.column("key").combine_chunks().values.to_numpy().copy())
        except (KeyError, ValueError, pa.ArrowInvalid, OSError) as error:
            raise HubFileError(f"{path}: not a MoDER hub index ({error})") from None
        if identity is not None and stored_identity != identity:
            raise HubFileError(f"{path}: hub was built on backbone {stored_identity}, not {identity}")
        hub = cls(stored_identity)
        keys = keys.view(len(rows), -1) if rows else keys
        for step in sorted({row["step"] for row in rows}):
            members = [i for i, row in enumerate(rows) if row["step"] == step]
            first = rows[members[0]]
            name = first["experts_file"]
            stored = _read_step_experts(path, experts_root, name, digests.get(name), stored_identity)
            selected = torch.tensor([rows[i]["row"] for i in members])
            hub.append(
                step,
                [rows[i]["class_name"] for i in members],
                keys[members],
                stored.experts.select(selected),
                HubEntry(step, first["task"], first["dataset"], name, tuple(rows[i]["offset"] for i in members)),
                None if stored.prototypes is None else stored.prototypes[selected],
            )
        hub.keys = keys if rows else None  # stored normalised: normalising again could move the last bits
        return hub


def _read_step_experts(index: Path, experts_root: Path, name: str, digest: str | None, identity: str) -> ExpertsFile:
    """One experts file the index points at: inside the experts root, unchanged since the index was made."""
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts or digest is None:
        raise HubFileError(f"{index}: experts file {name!r} is not a plain path under the experts root")
    file = experts_root / relative
    if not file.is_file():
        raise HubFileError(f"{index} points at {file}, which does not exist (re-run the train stage)")
    if file_digest(file) != digest:
        raise HubFileError(
            f"{index} points at {file}, which has changed since the hub was built (re-run the hub stage)"
        )
    try:
        return load_experts(file, identity)
    except ExpertFileError as error:
        raise HubFileError(f"{index}: {error}") from None
