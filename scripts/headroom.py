"""Where the oracle's Transfer headroom goes, on validation seeds: per case, Transfer (over all images and over
new names) when the classes not yet trained get each of these prototypes, everything else as MoDER has it:

    frozen     the frozen model's prototype (MoDER without composition: the headroom is oracle - frozen)
    moder      the k retrieved experts composed (today's composition)
    shared     a component shared by the class's dataset: the mean of every trained expert of that dataset,
               composed like k retrieved experts with equal weights; zero-shot where the dataset has none yet
    hindsight  the k hub experts whose prototype for the class (each alone) is closest to the class's own
               expert's prototype, weighted as retrieval weights them: what a perfect choice of k could reach
    offset     the class's zero-shot prototype moved by the mean of what their own experts did to the prototypes
               of its dataset's trained classes (own - zero-shot); zero-shot where there are none
    displaced  the same with the k retrieved classes' moves, weighted by retrieval: composition.space
               displacement (moder.compose.displace_prototypes), through moder.evaluation.compose_unseen
    oracle     the class's own expert (trained ahead of time)

Every one of them is moved toward zero-shot by `composition.alpha_unseen` and calibrated as MoDER's composed
prototypes are, so the figures differ only by the untrained classes' prototypes. Shares of the headroom
(oracle - frozen): `shared` - frozen what a dataset-level component recovers, oracle - shared what the class's own
part adds, hindsight - moder what retrieval misses.

    python scripts/headroom.py --seeds 100 101 102 --json out/headroom.json

Runs the stages through the flow's store as scripts/validate.py does (what validation made is reused).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flows.graph import pipeline  # noqa: E402
from flows.runner import inputs_of, run_graph  # noqa: E402
from flows.store import Store  # noqa: E402
from moder.compose import compose_prototypes, displace_prototypes, expert_prototypes, smooth_toward_zeroshot  # noqa: E402
from moder.evaluation import ClassKey, accuracy_rows, class_keys, compose_unseen, step_prototypes  # noqa: E402
from moder.factory import ExpertFactory  # noqa: E402
from moder.hub import ExpertHub  # noqa: E402
from moder.params import EvaluationSettings, Params  # noqa: E402
from moder.prompts import PromptSet  # noqa: E402
from moder.results import AccuracyRow, accuracy_matrices, method_figures  # noqa: E402
from moder.tasks import TaskData  # noqa: E402
from moder.train import TrainedTask  # noqa: E402
from scripts.validate import case_params, parse_validation_args, validation_parser  # noqa: E402
from stages import evaluate  # noqa: E402

VARIANTS = ("frozen", "moder", "shared", "hindsight", "offset", "displaced", "oracle")


def dataset_mean(hub: ExpertHub, dataset: str, queries: int) -> tuple[Tensor, Tensor] | None:
    """Retrieval of every hub row of `dataset` with equal weights, for each of `queries` (None: it has none)."""
    rows = torch.tensor([r for r, name in enumerate(hub.datasets) if name == dataset], dtype=torch.long)
    if len(rows) == 0:
        return None
    return rows.expand(queries, -1), torch.full((queries, len(rows)), 1.0 / len(rows))


def shared_prototypes(factory: ExpertFactory, prompts: PromptSet, hub: ExpertHub, dataset: str) -> Tensor | None:
    """Each query class under the mean of every hub expert of `dataset` (None where the hub has none)."""
    mean = dataset_mean(hub, dataset, prompts.n_classes)
    if mean is None:
        return None
    indices, weights = mean
    return compose_prototypes(factory.tower, prompts, hub.experts, factory.null(), indices, weights, "parameter")


def hindsight_prototypes(
    factory: ExpertFactory,
    prompts: PromptSet,
    hub: ExpertHub,
    own: Tensor,
    zeroshot: Tensor,
    k: int,
    temperature: float,
) -> Tensor:
    """Each query class composed from the k hub experts whose single-expert prototype of it is closest to `own`
    (its own expert's prototype), weighted softmax(key similarity / temperature) as retrieval weighs."""
    experts = hub.experts
    assert experts is not None and hub.keys is not None  # only asked of a hub with rows
    queries = prompts.n_classes
    closeness = torch.empty(queries, len(hub))
    for row in range(len(hub)):
        single = expert_prototypes(factory.tower, prompts, experts.select(torch.full((queries,), row)))
        closeness[:, row] = (F.normalize(single, dim=-1) * F.normalize(own, dim=-1)).sum(dim=1)
    indices = closeness.topk(min(k, len(hub)), dim=1).indices
    similarity = F.normalize(zeroshot.float(), dim=-1) @ hub.keys.T
    weights = torch.softmax(similarity.gather(1, indices) / temperature, dim=1)
    return compose_prototypes(factory.tower, prompts, experts, factory.null(), indices, weights, "parameter")


def variant_rows(
    factory: ExpertFactory,
    sequence: list[TaskData],
    trained: list[TrainedTask],
    hub: ExpertHub,
    step: int,
    settings: EvaluationSettings,
) -> list[AccuracyRow]:
    """Every task's accuracy after `step` for each variant (method = the variant's name)."""
    base = step_prototypes(factory, sequence, trained, hub, step, settings)
    alpha = settings.composition.alpha_unseen
    tables: dict[str, dict[ClassKey, Tensor]] = {
        "frozen": base.no_composition,
        "moder": base.moder,
        "oracle": base.oracle,
        "shared": dict(base.no_composition),
        "hindsight": dict(base.no_composition),
        "offset": dict(base.no_composition),
        "displaced": dict(base.no_composition),
    }
    displacement = settings.model_copy(
        update={"composition": settings.composition.model_copy(update={"space": "displacement"})}
    )
    for data, task in zip(sequence[step + 1 :], trained[step + 1 :], strict=True):
        keys = class_keys(data)
        prompts = factory.prompts(data.class_names, list(data.templates))
        shared = shared_prototypes(factory, prompts, hub, data.task.dataset)
        if shared is not None:
            tables["shared"].update(zip(keys, smooth_toward_zeroshot(shared, data.zeroshot, alpha), strict=True))
        retrieval = settings.retrieval
        hindsight = hindsight_prototypes(
            factory, prompts, hub, task.prototypes, data.zeroshot, retrieval.k, retrieval.temperature
        )
        tables["hindsight"].update(zip(keys, smooth_toward_zeroshot(hindsight, data.zeroshot, alpha), strict=True))
        mean = dataset_mean(hub, data.task.dataset, len(keys))
        if mean is not None:
            offset = displace_prototypes(data.zeroshot, hub.moves(), *mean)
            tables["offset"].update(zip(keys, smooth_toward_zeroshot(offset, data.zeroshot, alpha), strict=True))
        displaced = compose_unseen(factory, prompts, hub, data.zeroshot, displacement).prototypes
        tables["displaced"].update(zip(keys, displaced, strict=True))
    protocol = settings.protocol
    return [
        row
        for name, table in tables.items()
        for row in accuracy_rows(sequence, step, protocol, name, table, base.offsets)
    ]


def case_figures(params: Params, store: Store) -> dict[str, dict[str, float]]:
    """Each variant's Transfer over all images and over new names for one case and seed."""
    calls = pipeline(Path("dvc.yaml"), params.model_dump(mode="json"))
    steps = [f"evaluate@{step}" for step in params.tasks]
    records = run_graph(calls, params, store, {u for label in steps for i in calls[label].inputs for u in i.upstream})
    rows: list[AccuracyRow] = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for label in steps:
            for path, record in inputs_of(calls[label], records).items():
                store.materialise(record, root, f"{label} input {path}")
            args = evaluate.cli().parse_args(list(calls[label].argv))
            inputs = evaluate.load_step_inputs(
                params, args.step, root / args.model, root / args.features, root / args.experts, root / args.hub
            )
            rows += variant_rows(
                inputs.factory, inputs.sequence, inputs.trained, inputs.hub, inputs.step, params.evaluation_settings()
            )
    matrices = accuracy_matrices(rows, list(params.tasks))
    figures = {name: method_figures(matrices, name, params.benchmark.protocol) for name in VARIANTS}
    return {name: {key: figures[name][key] for key in ("transfer", "transfer_new")} for name in VARIANTS}


def main() -> None:
    parser = validation_parser(__doc__, Path("out/headroom.json"))
    parser.add_argument("--overrides", default="", help="space-separated Hydra overrides (as scripts/validate.py)")
    args = parse_validation_args(parser)
    store = Store(args.store)
    results: dict[str, list[dict[str, dict[str, float]]]] = {}
    print(f"{'case':30s} {'':6s} " + " ".join(f"{name:>9s}" for name in VARIANTS) + "   shared  own part  missed")
    for case in args.cases:
        results[case] = [case_figures(case_params(case, seed, args.overrides), store) for seed in args.seeds]
        for metric in ("transfer", "transfer_new"):
            mean = {name: statistics.mean(seed[name][metric] for seed in results[case]) for name in VARIANTS}
            headroom = mean["oracle"] - mean["frozen"]
            shares = (
                (mean["shared"] - mean["frozen"]) / headroom,
                (mean["oracle"] - mean["shared"]) / headroom,
                (mean["hindsight"] - mean["moder"]) / headroom,
            )
            print(
                f"{case:30s} {'new' if metric == 'transfer_new' else 'all':6s} "
                + " ".join(f"{mean[name]:9.1f}" for name in VARIANTS)
                + "   "
                + "  ".join(f"{share:6.0%}" for share in shares),
                flush=True,
            )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
