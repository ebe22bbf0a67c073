"""Classify images among any class names with a trained hub: the product MoDER promises.

A class the hub has trained uses its own expert; any other name gets a prototype composed from
the experts the hub retrieves for it, with the same settings the pipeline evaluated with (stored
in the hub index). Five lines:

    from moder.classifier import Classifier
    classifier = Classifier.from_files("data/backbone/clip.safetensors", "data/embedded-mtil/hub/fog.parquet")
    prediction = classifier.predict(["photo.png"], ["red star", "blue circle", "green ring"], top_k=2)
    print(prediction.labels[0], prediction.scores[0])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from moder.clip import LoadedClip, ModelIdentity, load_clip
from moder.compose import seen_prototypes
from moder.encode import encode_image_files
from moder.evaluation import calibration_offsets, compose_unseen
from moder.factory import ExpertFactory
from moder.hub import ExpertHub
from moder.metrics import cosine_scores
from moder.names import check_class_names
from moder.params import EvaluationSettings, ExpertParams
from moder.prompts import frozen_prototypes, zeroshot_prototypes
from moder.text import TextTower


@dataclass(frozen=True)
class HubSettings:
    """How the pipeline composed prototypes when it built the hub: kept in the hub index, so a hub
    answers the same way long after the run, with no params file."""

    expert: ExpertParams
    evaluation: EvaluationSettings
    templates: list[str]

    @classmethod
    def from_index(cls, settings: dict) -> HubSettings:
        evaluation = EvaluationSettings.model_validate(
            {key: settings[key] for key in ("protocol", "retrieval", "composition")}
        )
        return cls(ExpertParams.model_validate(settings["expert"]), evaluation, list(settings["templates"]))


@dataclass(frozen=True)
class Prediction:
    labels: list[list[str]]  # per input, the top-k class names, best first
    scores: Tensor  # [N, k] the matching scores (cosine similarity, minus the calibration offset)
    skipped: list[str]  # images that could not be decoded (only with skip_bad_images)


@dataclass(frozen=True)
class Head:
    """A zero-shot classifier head: logits = image_features @ weights + bias (features L2-normalised)."""

    weights: Tensor  # [d, C] the composed (or own) prototypes as columns
    bias: Tensor  # [C] minus each class's calibration offset (zeros where no calibration applies)
    class_names: list[str]


class Classifier:
    """A frozen CLIP plus a hub of experts, answering for any list of class names."""

    def __init__(self, clip: LoadedClip, hub: ExpertHub, settings: HubSettings, device: str = "cpu") -> None:
        if clip.identity.to_json() != hub.identity:
            raise ValueError(f"the hub was built on backbone {hub.identity}, not {clip.identity.to_json()}")
        self.clip, self.hub, self.settings, self.device = clip, hub, settings, device
        self.tower = TextTower(clip.model, clip.tokenizer)

    @classmethod
    def from_files(
        cls, backbone: Path | str, hub_index: Path | str, experts: Path | str | None = None, device: str = "cpu"
    ) -> Classifier:
        """The backbone checkpoint (the backbone stage's output), a hub index (the hub stage's), and
        the experts directory it points into (default: `experts/` beside the hub's directory)."""
        hub_index = Path(hub_index)
        root = hub_index.parent.parent / "experts" if experts is None else Path(experts)
        identity, settings = ExpertHub.read_index_metadata(hub_index)
        clip = load_clip(ModelIdentity.from_json(identity).architecture, checkpoint=backbone, device=device)
        hub = ExpertHub.load_index(hub_index, root, clip.identity.to_json())
        return cls(clip, hub, HubSettings.from_index(settings), device)

    @property
    def evaluation(self) -> EvaluationSettings:
        return self.settings.evaluation

    def head(self, class_names: list[str], templates: list[str] | None = None, dataset: str | None = None) -> Head:
        """The prototypes of `class_names` as a head. A name the hub has trained (in `dataset`, if
        given; else in any dataset, the latest step first) uses its own expert; any other is composed."""
        check_class_names(class_names)
        templates = list(templates or self.settings.templates)
        factory = ExpertFactory(self.tower, self.settings.expert, templates)
        # LoRA experts read the template prompts, whose frozen blocks are run once for zero-shot, own and composed
        prompts = factory.prompts(class_names, keep_prefix=True)
        if self.settings.expert.kind == "lora":
            zeroshot = frozen_prototypes(self.tower, prompts)
        else:
            zeroshot = zeroshot_prototypes(self.tower, class_names, templates)
        own = self._own_rows(class_names, dataset)
        prototypes = zeroshot.clone()
        known = [i for i, row in enumerate(own) if row is not None]
        unknown = [i for i, row in enumerate(own) if row is None]
        bias = torch.zeros(len(class_names))
        with torch.no_grad():
            if known and self.hub.experts is not None:  # a name is known only to a hub with experts
                experts = self.hub.experts.select(torch.tensor([own[i] for i in known]))
                prototypes[known] = seen_prototypes(
                    self.tower,
                    prompts.select(torch.tensor(known)),
                    experts,
                    zeroshot[known],
                    self.evaluation.composition.alpha,
                )
            if unknown:
                composed = compose_unseen(
                    factory,
                    prompts.select(torch.tensor(unknown)),
                    self.hub,
                    zeroshot[unknown],
                    self.evaluation,
                )
                prototypes[unknown] = composed.prototypes
        if known:  # trained classes lowered as evaluation lowers them
            rows = [row for row in own if row is not None]
            bias[known] = -torch.tensor(calibration_offsets(self.evaluation.composition.calibrate, self.hub, rows))
        return Head(prototypes.T.contiguous(), bias, list(class_names))

    def prototypes(
        self, class_names: list[str], templates: list[str] | None = None, dataset: str | None = None
    ) -> Tensor:
        """[C, d] one prototype per class name (see `head`)."""
        return self.head(class_names, templates, dataset).weights.T

    def predict(
        self,
        inputs: Tensor | Sequence[str | Path],
        class_names: list[str],
        top_k: int = 5,
        templates: list[str] | None = None,
        dataset: str | None = None,
        skip_bad_images: bool = False,
        batch_size: int = 64,
    ) -> Prediction:
        """Top-k class names for image features ([N, d], e.g. from the project's Parquet) or image files
        (decoded and preprocessed as the backbone's own transform does)."""
        skipped: list[str] = []
        if isinstance(inputs, Tensor):
            features = inputs
        else:
            features, skipped = encode_image_files(
                self.clip,
                [Path(p) for p in inputs],
                batch_size=batch_size,
                skip_bad_images=skip_bad_images,
                device=self.device,
            )
        head = self.head(class_names, templates, dataset)
        logits = cosine_scores(features, head.weights.T) + head.bias
        top = logits.topk(min(top_k, len(class_names)), dim=1)
        return Prediction([[class_names[i] for i in row] for row in top.indices.tolist()], top.values, skipped)

    def _own_rows(self, class_names: list[str], dataset: str | None) -> list[int | None]:
        """The hub row of each name's own expert, or None for names the hub has not trained."""
        latest: dict[str, int] = {}
        for row, (name, source) in enumerate(zip(self.hub.class_names, self.hub.datasets, strict=True)):
            if dataset is None or source == dataset:
                latest[name] = row  # rows grow with the steps: the last one is the latest expert
        return [latest.get(name) for name in class_names]
