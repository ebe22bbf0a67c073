"""Stage `backbone`: the frozen CLIP every later stage uses, saved as one safetensors file.

With `model.pretrained` (an open_clip tag) or `model.checkpoint` (a local file) set, those weights
are loaded (a tag is fetched into `model.cache_dir`); otherwise the embedded benchmark's tiny CLIP
is pre-trained contrastively on the clean rendered domain.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moder.clip import LoadedClip, ModelLoadError, load_clip, save_backbone
from moder.io import atomic_path
from moder.params import Params
from moder.pretrain import pretrain_clip
from moder.progress import PROGRESS
from moder.text import TextTower
from moder.world import World
from stages.common import parser, run_cli

USES_DEVICE = True  # its model runs on model.device (the Prefect flow caps such tasks at the GPU count)


def backbone(params: Params, out: Path, summary: Path) -> LoadedClip:
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
            World.of(params.world, params.seed),
            params.pretrain,
            seed=params.seed,
            mean=clip.identity.mean,
            std=clip.identity.std,
            progress=PROGRESS.get(),
        )
        source = f"pretrained on the embedded world, seed {params.seed}"
        figures = {"clean_zeroshot_accuracy": round(result.accuracy, 2), "final_loss": round(result.losses[-1], 4)}
        print(f"pretrained {model.architecture}: zero-shot accuracy {result.accuracy:.1f}% on the clean domain")
    save_backbone(clip, out, source)
    with atomic_path(summary) as temporary:
        temporary.write_text(json.dumps(figures, indent=2) + "\n")
    return clip


def cli() -> argparse.ArgumentParser:
    return parser(__doc__, ("out", "the checkpoint to write", ".safetensors"), ("summary", "what it is", ".json"))


def run(args: argparse.Namespace, params: Params) -> None:
    backbone(params, args.out, args.summary)


def main() -> None:
    run_cli(run, cli().parse_args())


if __name__ == "__main__":
    main()
