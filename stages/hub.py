"""Stage `hub@<step>`: the foundational hub after training step <step> — an index over the experts of
steps 1..<step> (keys, class names, datasets, offsets, where each expert is stored), never a copy of
their tensors — with the settings the pipeline composes with, so `moder classify` can use it later."""

from __future__ import annotations

import argparse
from pathlib import Path

from moder.hub import ExpertHub, HubEntry
from moder.params import Params
from moder.tasks import benchmark_tasks
from stages.common import check_task, parser, run_cli
from stages.files import expert_file, load_frozen_clip, made_by, read_classes, read_task_experts

USES_DEVICE = False  # it reads the backbone's identity only


def hub_settings(params: Params) -> dict:
    """What the hub keeps of the params: how experts are built and how prototypes are composed."""
    return {
        "expert": params.expert.model_dump(mode="json"),
        "retrieval": params.retrieval.model_dump(mode="json"),
        "composition": params.composition.model_dump(mode="json"),
        "templates": list(params.templates),
        "protocol": params.benchmark.protocol,
    }


def hub(params: Params, step: str, model: Path, features: Path, experts: Path, out: Path) -> ExpertHub:
    """Reads the zero-shot prototypes (<features>/<dataset>/classes.parquet) and experts
    (<experts>/<dataset>/split-<i>.safetensors) of steps 1..<step>; writes the hub index to `out`."""
    check_task(params, step)
    identity = load_frozen_clip(params, model).identity.to_json()
    position = list(params.tasks).index(step)
    datasets = dict.fromkeys(task.dataset for task in list(params.tasks.values())[: position + 1])
    classes = {dataset: read_classes(features, dataset, identity) for dataset in datasets}
    tasks = benchmark_tasks(params, {dataset: len(table.class_names) for dataset, table in classes.items()})
    built = ExpertHub(identity)
    for task in tasks[: position + 1]:
        table = classes[task.dataset]
        names = [table.class_names[i] for i in task.classes]
        path = expert_file(experts / task.dataset, params.tasks[task.name].split)
        with made_by(f"train@{task.dataset}"):
            task_experts, trained = read_task_experts(path, names, task.name, identity)
        entry = HubEntry(
            task.step, task.name, task.dataset, path.relative_to(experts).as_posix(), tuple(trained.offsets.tolist())
        )
        built.append(task.step, names, table.vectors[task.classes], task_experts, entry, trained.prototypes)
    built.save_index(out, experts, hub_settings(params))
    print(f"hub after {step}: {len(built)} classes from {position + 1} step(s)")
    return built


def cli() -> argparse.ArgumentParser:
    cli = parser(
        __doc__,
        ("model", "the backbone CLIP checkpoint"),
        ("features", "the directory of feature directories"),
        ("experts", "the directory of experts directories"),
        ("out", "the hub index to write", ".parquet"),
    )
    cli.add_argument("--step", required=True, help="the task after whose training the hub is built")
    return cli


def run(args: argparse.Namespace, params: Params) -> None:
    hub(params, args.step, args.model, args.features, args.experts, args.out)


def main() -> None:
    run_cli(run, cli().parse_args())


if __name__ == "__main__":
    main()
