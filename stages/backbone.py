"""Stage `backbone`: the frozen CLIP every later stage uses, saved as one safetensors file.

With `model.pretrained` (an open_clip tag) or `model.checkpoint` (a local file) set, those weights
are loaded (a tag is fetched into `model.cache_dir`); otherwise the embedded benchmark's tiny CLIP
is pre-trained contrastively on the clean rendered domain.

`dvc repro` runs it through the content-addressed store the Prefect flow uses (`--store`, out/store of
the project): when the flow, or an earlier run of this stage, made the backbone for the same params and
code, its files are restored from there instead of pre-training again; otherwise what this stage makes
is put there, and the flow finds it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from flows.calls import BACKBONE, BACKBONE_SUMMARY, reuse_or_run, stage_calls
from flows.store import Store, StoreError, project_store
from moder.clip import LoadedClip, ModelLoadError, load_clip, save_backbone
from moder.io import atomic_path
from moder.params import Params
from moder.pretrain import pretrain_clip
from moder.progress import Progress
from moder.text import TextTower
from stages.common import parser, run_cli


def backbone(params: Params, out: Path, summary: Path, progress: Progress = True) -> LoadedClip:
    model = params.model
    if model.pretrained or model.checkpoint:
        clip = load_clip(
            model.architecture,
            pretrained=model.pretrained,
            checkpoint=model.checkpoint,
            cache_dir=model.cache_dir,
            device=model.device,
            seed=params.seed,
        )
        source = clip.identity.weights
        figures: dict = {"architecture": model.architecture, "weights": source}
    else:
        clip = load_clip(model.architecture, device=model.device, seed=params.seed)
        if clip.identity.image_size != params.world.image_size:
            raise ModelLoadError(
                f"world.image_size is {params.world.image_size} but {model.architecture} takes "
                f"{clip.identity.image_size}-pixel images; make them equal in conf/ (params.yaml)"
            )
        result = pretrain_clip(
            clip.model,
            TextTower(clip.model, clip.tokenizer),
            params.world.world(params.seed),
            params.pretrain.domain.domain(),
            params.pretrain.captions,
            params.pretrain.config(params.seed),
            mean=clip.identity.mean,
            std=clip.identity.std,
            progress=progress,
        )
        source = f"pretrained on the embedded world, seed {params.seed}"
        figures = {"clean_zeroshot_accuracy": round(result.accuracy, 2), "final_loss": round(result.losses[-1], 4)}
        print(f"pretrained {model.architecture}: zero-shot accuracy {result.accuracy:.1f}% on the clean domain")
    save_backbone(clip, out, source)
    with atomic_path(summary) as temporary:
        temporary.write_text(json.dumps(figures, indent=2) + "\n")
    return clip


def backbone_through_store(params: Params, out: Path, summary: Path, store: str, dvc_yaml: Path) -> bool:
    """`backbone`, or its files restored from `store` when it holds them for the same params and code (the
    flow's cache key for this stage of `dvc_yaml`); True when restored."""
    call = stage_calls(dvc_yaml, params.model_dump(mode="json"))["backbone"]
    files = {BACKBONE: out, BACKBONE_SUMMARY: summary}
    try:
        restored = reuse_or_run(call, Store(store), files, lambda: backbone(params, out, summary))
    except StoreError as error:  # a tampered or damaged store: one line naming the file, nothing written
        sys.exit(f"error: {error}")
    if restored:
        print(f"backbone: restored from {store} (made by the Prefect flow or an earlier run, same params and code)")
    return restored


def main() -> None:
    cli = parser(__doc__, ("out", "the checkpoint to write", ".safetensors"), ("summary", "what it is", ".json"))
    cli.add_argument("--store", default=project_store(), help="the store shared with the flow (default: %(default)s)")
    cli.add_argument("--dvc-yaml", default=Path("dvc.yaml"), type=Path, help="the pipeline the cache key comes from")
    run_cli(
        lambda args, params: backbone_through_store(params, args.out, args.summary, args.store, args.dvc_yaml),
        cli.parse_args(),
    )


if __name__ == "__main__":
    main()
