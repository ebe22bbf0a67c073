"""Stage `pretrain`: contrastive pre-training of the embedded benchmark's tiny CLIP on the clean domain."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from moder.clip import ModelLoadError, load_clip
from moder.io import atomic_path
from moder.params import Params
from moder.pretrain import PretrainResult, pretrain_clip
from moder.text import TextTower
from stages.common import parser, run_cli


def pretrain(params: Params, out: Path, summary: Path) -> PretrainResult:
    clip = load_clip(params.model.architecture, device=params.model.device, seed=params.seed)
    if clip.identity.image_size != params.world.image_size:
        raise ModelLoadError(
            f"world.image_size is {params.world.image_size} but {params.model.architecture} takes "
            f"{clip.identity.image_size}-pixel images; make them equal in params.yaml"
        )
    result = pretrain_clip(
        clip.model, TextTower(clip.model, clip.tokenizer), params.world.world(params.seed),
        params.pretrain.domain.domain(), params.pretrain.captions, params.pretrain.config(params.seed),
        clip.identity.mean, clip.identity.std, progress=True,
    )
    with atomic_path(out) as temporary:
        save_file({k: v.detach().contiguous() for k, v in clip.model.state_dict().items()}, str(temporary))
    figures = {"clean_zeroshot_accuracy": round(result.accuracy, 2), "final_loss": round(result.losses[-1], 4)}
    with atomic_path(summary) as temporary:
        temporary.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"pretrained {params.model.architecture}: zero-shot accuracy {result.accuracy:.1f}% on the clean domain")
    return result


def main() -> None:
    cli = parser(__doc__, ("out", "the checkpoint to write (.safetensors)"), ("summary", "its accuracy, as JSON"))
    run_cli(lambda args, params: pretrain(params, args.out, args.summary), cli.parse_args())


if __name__ == "__main__":
    main()
