"""Time and peak memory of one optimisation step: a 100-class task, the committed experts, ViT-B-16 text tower.

Baseline: the naive step, which runs one forward per class (each with its own expert)
before a single backward. Runs on the CPU; peak memory is the growth of the process's peak
resident set during the measured steps, each variant in a fresh process.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from _common import CLASS_NAMES, TEMPLATE, committed, lora_label, vit_b16

from moder.factory import ExpertFactory
from moder.prompts import encode_prototypes
from moder.train import train_experts

STEPS = 3
BATCH = 64


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(variant: str) -> None:
    """Run STEPS steps of one variant in this process; print 'ms_per_step peak_growth_mib'."""
    _, tower = vit_b16()
    factory = ExpertFactory(tower, committed().expert, [TEMPLATE])
    prompts = factory.prompts(CLASS_NAMES)
    n = len(CLASS_NAMES)
    generator = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(STEPS * BATCH, 512, generator=generator), dim=-1)
    labels = torch.randint(0, n, (STEPS * BATCH,), generator=generator)
    config = committed().train.model_copy(update={"epochs": 1, "batch_size": BATCH})
    experts = factory.new(n, generator)
    before = peak_rss_mib()
    start = time.perf_counter()
    if variant == "batched":
        train_experts(tower, prompts, experts, features, labels, config, seed=0)
    else:
        parameters = [p.requires_grad_(True) for p in experts.parameters()]
        optimizer = torch.optim.AdamW(parameters, lr=config.lr)
        one = torch.zeros(1, dtype=torch.long)
        for step in range(STEPS):
            prototypes = torch.cat(
                [
                    encode_prototypes(tower, prompts.select(torch.tensor([c])), experts.select(torch.tensor([c])), one)
                    for c in range(n)
                ]
            )
            batch = slice(step * BATCH, (step + 1) * BATCH)
            loss = F.cross_entropy(config.logit_scale * features[batch] @ prototypes.T, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    print((time.perf_counter() - start) / STEPS * 1000, peak_rss_mib() - before)


def main() -> None:
    results = {}
    for variant in ("loop", "batched"):
        output = subprocess.run([sys.executable, __file__, variant], capture_output=True, text=True, check=True).stdout
        results[variant] = [float(v) for v in output.split()[-2:]]
    (loop_ms, loop_mib), (batch_ms, batch_mib) = results["loop"], results["batched"]
    print(
        f"training step, {len(CLASS_NAMES)} classes, {lora_label(committed().expert.lora)} of the ViT-B-16 text tower, "
        f"batch {BATCH}, mean of {STEPS} steps, {torch.get_num_threads()} threads, each variant in a fresh process"
    )
    print(f"  baseline per-class loop  : {loop_ms:8.1f} ms/step, peak RSS growth {loop_mib:7.1f} MiB")
    print(f"  batched (moder)          : {batch_ms:8.1f} ms/step, peak RSS growth {batch_mib:7.1f} MiB")
    print(f"  speed-up (loop / batched): {loop_ms / batch_ms:6.2f}x")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        measure(sys.argv[1])
    else:
        main()
