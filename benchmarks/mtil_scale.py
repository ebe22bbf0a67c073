"""Real scale: a real benchmark sequence's shapes through the DVC stage functions, with each stage's cost.

`--sequence mtil-order1` (11 datasets, 1,201 classes) or `classil-imagenet-r` (200 classes, 80 templates,
10 tasks). Real: ViT-B-16 (seeded random weights: time and memory do not depend on their values), every
dataset's catalog class names and CLIP templates, the preset's tasks, params.yaml's expert, train, retrieval
and composition settings, and the stage functions dvc.yaml runs (backbone, extract's prototypes, train,
finetune, hub, evaluate, report), each in a fresh process as under DVC (benchmarks/_stage_runner.py).
Generated: the image features (a few per class around each class's zero-shot prototype), so the image tower
never runs. `--device cuda` runs the encoders on a GPU (model.device).

Per stage: wall and CPU time, peak RSS, prompts the text tower encoded (with / without gradient), training
steps. Then the experts' trainable parameters and size on disk, and ViT-B-16 expert sizes for each form
params.yaml allows. A stage that needs more than `--memory-cap-gb` fails fast and is reported; a failed train
stage is replaced by untrained experts of the real shapes so that the later stages are still measured.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from _stage_runner import GB, StageResult, StageRunner, group_rows, header, memory_now
from safetensors import safe_open

from flows.graph import pipeline
from flows.runner import run_call
from moder.clip import load_clip, save_backbone
from moder.compose import expert_prototypes
from moder.datasets import catalog
from moder.experts import expert_parameters, load_experts, save_experts
from moder.factory import ExpertFactory
from moder.features import FeatureTable, write_features
from moder.io import atomic_directory
from moder.params import LORA_MODULES, ExpertParams, Params, load_params, parse_params
from moder.prompts import zeroshot_prototypes
from moder.tasks import dataset_tasks
from moder.text import TextTower
from moder.world import seed_for
from stages.compose import compose_data
from stages.extract import templates_of
from stages.files import expert_file, load_frozen_clip, read_classes

ROOT = Path(__file__).resolve().parents[1]
SEQUENCES = ("mtil-order1", "classil-imagenet-r")
TARGET_RSS_GB = 6.0
TARGET_MTIL_MINUTES = 20.0
SHIFT, NOISE = 1.0, 0.5  # generated features: dataset shift and per-image noise, in units of the class spread


def build_params(
    sequence: str,
    work: Path,
    checkpoint: Path,
    epochs: int | None,
    templates_per_step: int | None = None,
    device: str = "cpu",
) -> Params:
    """params.yaml as `dvc exp run -S benchmark=<sequence>` composes it, on a local ViT-B-16 on `device`."""
    data = compose_data(ROOT / "conf", [f"benchmark={sequence}"])
    data["model"] = {**data["model"], "architecture": "ViT-B-16", "pretrained": None, "checkpoint": str(checkpoint)}
    data["model"]["device"] = device
    for spec in data["datasets"].values():  # validation wants a root; no image is read, the features are generated
        spec["root"] = str(work / "no-images")
    if epochs is not None:
        data["train"] = {**data["train"], "epochs": epochs}
    if templates_per_step is not None:
        data["train"] = {**data["train"], "templates_per_step": templates_per_step}
    return parse_params(data, f"conf/ with benchmark={sequence}")


def generated_features(
    prototypes: torch.Tensor, per_class: int, direction: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image features around each class's prototype, moved by the dataset's shift: zero-shot is imperfect,
    so training has something to fit (the idea of tests/synthetic.py's shifted_features)."""
    spread = (prototypes - prototypes.mean(dim=0)).norm(dim=-1).mean()
    labels = torch.arange(prototypes.shape[0]).repeat_interleave(per_class)
    noise = (
        torch.randn(len(labels), prototypes.shape[1], generator=generator) * spread * NOISE / prototypes.shape[1] ** 0.5
    )
    return F.normalize(prototypes[labels] + spread * SHIFT * direction + noise, dim=-1), labels


def write_dataset_features(
    params: Params, dataset: str, tower: TextTower, identity: str, out: Path, limit: int | None, per_split: dict
) -> None:
    """<out>/{train,test,classes}.parquet as stages.extract writes them; the prototypes are real."""
    spec = params.datasets[dataset]
    names = catalog(spec.source).class_names[:limit]
    templates = templates_of(params, spec)
    prototypes = zeroshot_prototypes(tower, names, templates)
    generator = torch.Generator().manual_seed(seed_for(params.seed, "scale-features", dataset))
    # the shift lies in the span of the class differences: a random direction would miss every boundary
    centred = prototypes - prototypes.mean(dim=0)
    direction = F.normalize(torch.randn(len(names), generator=generator) @ centred, dim=-1)
    with atomic_directory(out, owner="extract") as directory:
        for split, per_class in per_split.items():
            features, labels = generated_features(prototypes, per_class, direction, generator)
            write_features(directory / f"{split}.parquet", FeatureTable(features, labels, names, dataset, identity))
        write_features(
            directory / "classes.parquet",
            FeatureTable(prototypes, torch.arange(len(names)), names, dataset, identity, tuple(templates)),
        )


def write_features_of(params: Params, dataset: str, model: Path, out: Path, limit: int | None, per_split: dict) -> None:
    """What extract@<dataset> writes, the image features generated (the identity the later stages check is the
    backbone's, as stages.extract's)."""
    clip = load_frozen_clip(params, model)
    write_dataset_features(
        params, dataset, TextTower(clip.model, clip.tokenizer), clip.identity.to_json(), out, limit, per_split
    )


def untrained_experts(params: Params, dataset: str, model: Path, features: Path, out: Path) -> None:
    """Stand-in for a train stage that failed: fresh experts of the real shapes, offsets zero, so evaluation
    (whose cost does not depend on the experts' values) can still be measured."""
    clip = load_frozen_clip(params, model)
    identity = clip.identity.to_json()
    classes = read_classes(features, dataset, identity)
    factory = ExpertFactory(TextTower(clip.model, clip.tokenizer), params.expert, list(classes.templates))
    with atomic_directory(out, owner="train") as directory:
        for task in dataset_tasks(params, dataset, len(classes.class_names)):
            names = [classes.class_names[i] for i in task.classes]
            experts = factory.new(len(names), torch.Generator().manual_seed(task.step))
            extra = {"dataset": dataset, "split": task.step, "offsets": [0.0] * len(names)}
            prototypes = classes.vectors[task.classes]  # untrained experts encode to about the zero-shot prototypes
            save_experts(expert_file(directory, task.step), experts, names, identity, extra, prototypes=prototypes)


def reencode_own_prototypes(params: Params, model: Path, features: Path, experts: Path) -> None:
    """What evaluate@<step> did at every step before train@ stored the prototypes: every class of the
    sequence encoded with its own expert (the oracle's and the seen classes' prototypes). Now paid once,
    in training; measured here once to show the per-step cost evaluation no longer pays."""
    clip = load_frozen_clip(params, model)
    identity = clip.identity.to_json()
    tower = TextTower(clip.model, clip.tokenizer)
    for dataset in params.datasets:
        classes = read_classes(features, dataset, identity)
        factory = ExpertFactory(tower, params.expert, list(classes.templates))
        for task in dataset_tasks(params, dataset, len(classes.class_names)):
            stored = load_experts(expert_file(experts / dataset, task.step), identity)
            expert_prototypes(tower, factory.prompts(stored.class_names), stored.experts)


def experts_on_disk(directory: Path) -> tuple[int, int, int]:
    """(trainable parameters, classes, bytes) of every experts file under `directory`, read from the headers."""
    parameters = classes = size = 0
    for path in sorted(directory.rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            classes += handle.get_slice(next(iter(handle.keys()))).get_shape()[0]  # tensors stack the classes
        parameters += expert_parameters(path)
        size += path.stat().st_size
    return parameters, classes, size


def sequence_classes(sequence: str) -> int:
    preset = compose_data(ROOT / "conf", [f"benchmark={sequence}"])
    return sum(len(catalog(spec["source"]).class_names) for spec in preset["datasets"].values())


def expert_forms(base: ExpertParams) -> list[tuple[str, ExpertParams]]:
    """Every expert form worth pricing: LoRA ranks on the last 1, 2 or all layers with module subsets, and
    context tokens."""
    depths = (("last layer", [-1]), ("last 2 layers", [-2, -1]), ("all layers", None))
    subsets = (
        ("4 modules", list(LORA_MODULES)),
        ("attn_out+mlp_proj", ["attn_out", "mlp_proj"]),
        ("attn_out", ["attn_out"]),
    )
    forms = [
        (f"LoRA r{rank}, {depth} x {subset}", {"rank": rank, "layers": layers, "modules": modules})
        for rank in (1, 2, 4)
        for depth, layers in depths
        for subset, modules in subsets
    ]
    priced = [
        (label, base.model_copy(update={"kind": "lora", "lora": base.lora.model_copy(update=change)}))
        for label, change in forms
    ]
    return [*priced, (f'context, "{base.context.init}"', base.model_copy(update={"kind": "context"}))]


def expert_size_table(tower: TextTower, base: ExpertParams) -> list[str]:
    totals = {sequence: sequence_classes(sequence) for sequence in SEQUENCES}
    lines = [
        f"Expert sizes on the ViT-B-16 text tower (fp32; from the real shapes, no training): {tower.n_layers} layers, "
        f"width {tower.width}",
        f"  {'form':<46}{'params/class':>14}{'MB/class':>10}"
        + "".join(f"{f'{s} ({n:,} cl.)':>30}" for s, n in totals.items()),
    ]
    for label, form in expert_forms(base):
        factory = ExpertFactory(tower, form, ["a photo of a {}."])
        per_class = sum(p.numel() for p in factory.new(1, torch.Generator().manual_seed(0)).parameters())
        cells = "".join(
            f"{f'{per_class * n / 1e6:,.1f} M = {per_class * n * 4 / GB:.2f} GB':>30}" for n in totals.values()
        )
        lines.append(f"  {label:<46}{per_class:>14,}{per_class * 4 / 1e6:>10.2f}{cells}")
    return lines


def write_backbone(params: Params, model: Path) -> list[str]:
    """What stages.backbone writes for a local checkpoint (the seed fixes the random weights); and, while the
    model is at hand, the expert sizes of every form on its text tower."""
    clip = load_clip(params.model.architecture, seed=params.seed)
    save_backbone(clip, model, f"random:seed={params.seed}")
    return expert_size_table(TextTower(clip.model, clip.tokenizer), params.expert)


def run_sequence(args: argparse.Namespace, work: Path) -> None:
    """dvc.yaml's stage instances in order (flows/graph.py), each in a fresh process with `work` as the project,
    but for what the benchmark generates instead: the backbone's random ViT-B-16 weights, and extraction's image
    features (the prototypes are real; no dataset is read, so `scan` has nothing to list)."""
    runner = StageRunner(args.memory_cap_gb)
    model = work / "data" / "backbone" / "clip.safetensors"
    params = build_params(args.sequence, work, model, args.epochs, args.templates_per_step, args.device)
    calls = pipeline(ROOT / "dvc.yaml", params.model_dump(mode="json"))
    data = work / "data" / params.benchmark.name
    features, experts = data / "features", data / "experts"
    per_split = {"train": args.train_per_class, "test": args.test_per_class}
    print(describe_run(args, params, work))
    print(header("stage"))
    run = runner.run
    sizes: list[str] = []
    for label, call in calls.items():
        group, _, key = label.partition("@")
        if group == "backbone":
            sizes = run("backbone", group, write_backbone, params, model, keep_value=True).value or []
            run("load_frozen_clip (alone)", "load", load_frozen_clip, params, model)
        elif group == "extract":
            run(
                f"extract@{key} (prototypes)",
                group,
                write_features_of,
                params,
                key,
                model,
                features / key,
                args.limit_classes,
                per_split,
            )
        elif group == "scan":
            continue
        elif group == "report" and any(r.failure for r in runner.results if r.group in ("finetune", "hub", "evaluate")):
            print("  report: not run, it needs every evaluate step and finetune")
        elif run(label, group, run_call, call, params, work).failure and group == "train":
            run(f"untrained stand-in@{key}", "stand-in", untrained_experts, params, key, model, features, experts / key)
    run("re-encode own prototypes", "no longer", reencode_own_prototypes, params, model, features, experts)
    target_epochs = build_params(args.sequence, work, model, None).train.epochs
    print("", *sizes, "", *summary(args, params, runner.results, data, target_epochs), sep="\n")


def describe_run(args: argparse.Namespace, params: Params, work: Path) -> str:
    classes = {d: len(catalog(s.source).class_names[: args.limit_classes]) for d, s in params.datasets.items()}
    prompts = sum(n * len(templates_of(params, params.datasets[d])) for d, n in classes.items())
    lora = params.expert.lora
    form = (
        f"rank {lora.rank} on {lora.layers or 'all'} layers x {len(lora.modules)} modules"
        if params.expert.kind == "lora"
        else f'context "{params.expert.context.init}"'
    )
    cap = f"{args.memory_cap_gb:g} GB per stage process" if memory_now() else "none (no /proc)"
    return "\n".join(
        [
            f"Real-scale run: {args.sequence} ({params.benchmark.protocol}), {len(classes)} dataset(s), "
            f"{sum(classes.values()):,} classes, {prompts:,} prompts (class x template), {len(params.tasks)} tasks"
            + (f" [--limit-classes {args.limit_classes}]" if args.limit_classes else ""),
            f"  experts: {params.expert.kind} ({form}); train: {params.train.epochs} epoch(s), batch "
            f"{params.train.batch_size}, templates per step {params.train.templates_per_step or 'all'}, "
            f"negatives {params.train.negatives}; retrieval k={params.retrieval.k}, "
            f"{params.composition.space}-space composition",
            f"  generated features per class: {args.train_per_class} train, {args.test_per_class} test; "
            f"encoders on {params.model.device}, {torch.get_num_threads()} CPU threads; memory cap {cap}; "
            f"work dir {work}",
            "  each stage in a fresh process (as under DVC); RSS: its peak (getrusage), imports included; "
            "s/step: inside train_experts",
        ]
    )


def summary(
    args: argparse.Namespace, params: Params, results: list[StageResult], data: Path, target_epochs: int
) -> list[str]:
    parameters, classes, size = experts_on_disk(data / "experts")
    hub_size = sum(path.stat().st_size for path in (data / "hub").glob("*.parquet"))
    pipeline = [r for r in results if r.group != "no longer"]
    measured = sum(r.seconds for r in pipeline)
    training = sum(r.counters.train_seconds for r in pipeline)
    peak = max(r.peak_rss for r in results)
    failed = [r.name for r in results if r.failure]
    lines = [
        f"Summary: {args.sequence}, measured",
        *group_rows(pipeline),
        f"  not in the times above: starting each stage's process and importing torch, moder and stages, median "
        f"{statistics.median(r.start_seconds for r in results):.1f} s per stage (DVC pays it too)",
        f"Experts on disk: {parameters:,} trainable parameters for {classes:,} classes = "
        f"{parameters // max(classes, 1):,} per class; {size / 1e6:,.1f} MB"
        + (", including untrained stand-ins" if any(r.group == "stand-in" for r in results) else ""),
        f"Hub indexes on disk: {hub_size / 1e6:,.2f} MB for {len(params.tasks)} steps (they point at the experts "
        "files; hub and evaluate load every expert of their step into memory)",
        *evaluation_before_after(results),
    ]
    # the run as DVC makes it: every stage's own wall and its process's start
    wall = measured + sum(r.start_seconds for r in pipeline)
    cut = [r for r in results if r.failure and r.group in ("train", "finetune")]
    if params.train.epochs < target_epochs:
        scale = target_epochs / params.train.epochs
        lines.append(
            f"EXTRAPOLATED: the training loops (train_experts, in train and finetune) at params.yaml's {target_epochs} "
            f"epochs ~ {training * scale:,.0f} s (measured {training:,.0f} s at {params.train.epochs} x {scale:g}, "
            f"linear in epochs); whole run ~ {(wall + training * (scale - 1)) / 60:,.1f} min"
            + (f" -- a LOWER BOUND: {len(cut)} training stage(s) failed part-way" if cut else "")
        )
    scope = f" (this run keeps {args.limit_classes} classes per dataset: the targets are for the full size)"
    lines += [
        "Targets" + (scope if args.limit_classes else "") + ":",
        f"  completes: {'yes' if not failed else f'NO, {len(failed)} stage(s) failed: ' + ', '.join(failed[:6])}"
        + (", ..." if len(failed) > 6 else ""),
        f"  peak RSS of the largest stage {peak / GB:.2f} GB, target <= {TARGET_RSS_GB:g} GB: "
        + ("met" if peak <= TARGET_RSS_GB * GB and not failed else "MISSED"),
    ]
    if args.sequence == "mtil-order1":
        verdict = "met" if wall <= TARGET_MTIL_MINUTES * 60 and not failed else "MISSED"
        lines.append(
            f"  wall {wall / 60:,.1f} min for {params.train.epochs} epoch(s), every stage and its process start, "
            f"target <= {TARGET_MTIL_MINUTES:g} min on this machine (one epoch): {verdict}"
        )
    return lines


def evaluation_before_after(results: list[StageResult]) -> list[str]:
    """Per-step evaluation time now, and as it was when every step re-encoded every class with its own expert."""
    evaluations = [r for r in results if r.group == "evaluate" and not r.failure]
    again = next((r for r in results if r.group == "no longer" and not r.failure), None)
    if not evaluations or again is None:
        return []
    now = sum(r.seconds for r in evaluations)
    before = now + again.seconds * len(evaluations)
    return [
        f"Evaluation, {len(evaluations)} steps: {now:,.1f} s now (a step encodes only the classes it composes: "
        f"{', '.join(f'{r.seconds:.1f}' for r in evaluations)} s); before trained prototypes were stored, "
        f"every step also re-encoded every class with its own expert ({again.seconds:.1f} s, measured above as "
        f"'{again.name}'): ~{before:,.1f} s, {before / now:.1f}x"
    ]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequence", choices=SEQUENCES, default="mtil-order1")
    parser.add_argument("--limit-classes", type=int, help="keep only the first N classes of each dataset")
    parser.add_argument("--epochs", type=int, help="override train.epochs (time is extrapolated to params.yaml's)")
    parser.add_argument(
        "--templates-per-step", type=int, help="override train.templates_per_step (templates drawn per class per step)"
    )
    parser.add_argument("--train-per-class", type=int, default=8, help="generated training features per class")
    parser.add_argument("--test-per-class", type=int, default=4, help="generated test features per class")
    parser.add_argument("--memory-cap-gb", type=float, default=8.0, help="memory cap per stage process (default 8)")
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one)")
    parser.add_argument("--device", default="cpu", help="where the stages run their encoders (model.device)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary working directory")
    parser.add_argument(
        "--sizes-only", action="store_true", help="print the ViT-B-16 expert sizes of every form (no run) and stop"
    )
    args = parser.parse_args()
    splits = max(
        s.get("splits", 1) for s in compose_data(ROOT / "conf", [f"benchmark={args.sequence}"])["datasets"].values()
    )
    if args.limit_classes is not None and args.limit_classes < max(splits, 2):
        parser.error(
            f"--limit-classes must be at least {max(splits, 2)} for {args.sequence} (its tasks split a dataset)"
        )
    return args


def main() -> None:
    args = parse_args()
    if args.sizes_only:
        clip = load_clip("ViT-B-16", seed=0)
        print(
            "\n".join(
                expert_size_table(TextTower(clip.model, clip.tokenizer), load_params(ROOT / "params.yaml").expert)
            )
        )
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="moder-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        run_sequence(args, work)
    finally:
        if args.work is None and not args.keep:
            shutil.rmtree(work)


if __name__ == "__main__":
    main()
