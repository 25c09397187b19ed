"""Training cost of CAN vs SimCLR vs MAE on the same ViT: FLOPs per image and images/s.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward of the
training loss (matrix products, convolutions and attention; element-wise operations, the optimizer
step and data augmentation are not counted). One *image* is one dataset sample: two views for CAN
and SimCLR, one view for MAE. Images/s is the median over timed optimizer steps (forward, backward,
AdamW) after warm-up, the methods taking turns, on synthetic batches; bf16 autocast on CUDA,
float32 on CPU.

SimCLR is CAN's configuration from the ``simclr`` recipe with the CAN recipe's model; MAE is the
MAE recipe of the same model.

Usage::

    python benchmarks/can_cost.py --model vit_t_fmnist --batch 32 --device cpu --append
    python benchmarks/can_cost.py --model vit_l16 --batch 2 --flops-only --append
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
from collections.abc import Callable

import torch
from _common import append_section, git_commit, images_per_second, machine, training_flops

from maect.config import RunConfig, load_config
from maect.methods import METHOD_CLASSES, PretrainMethod
from maect.models.masking import num_visible

# --model -> (CAN / MAE recipe suffix, SimCLR recipe)
MODELS = {
    "vit_t_fmnist": ("fmnist_vit_t", "simclr/fmnist_vit_t"),
    "vit_b16": ("in1k_vit_b16", "simclr/in1k_vit_b16"),
    "vit_l16": ("in1k_vit_l16", "simclr/in1k_vit_b16"),
}
PAPER_SIMCLR_OVER_CAN = "~1.7 for ViT-L"


def method_configs(model: str) -> dict[str, RunConfig]:
    """CAN, SimCLR and MAE configurations sharing the encoder of ``model``."""
    suffix, simclr_recipe = MODELS[model]
    can = load_config(f"can/{suffix}")
    same_model = [f"model.{k}={v}" for k, v in dataclasses.asdict(can.model).items()]
    return {
        "can": can,
        "simclr": load_config(simclr_recipe, same_model),
        "mae": load_config(f"mae/{suffix}", same_model),
    }


def synthetic_batch(cfg: RunConfig, batch: int, device: torch.device) -> dict:
    """A training batch of random normalised images (two views for CAN, one for MAE)."""
    m = cfg.model
    views = 2 if cfg.method == "can" else 1
    images = torch.randn(views, batch, m.in_chans, m.img_size, m.img_size, device=device)
    return {
        "image": list(images) if views == 2 else images[0],
        "label": torch.zeros(batch, dtype=torch.long, device=device),
    }


def training_step(module: PretrainMethod, batch: dict, device: torch.device) -> Callable[[], None]:
    """One optimizer step (forward, backward, AdamW) on ``batch``, synchronised on CUDA."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss = module.compute_losses(batch)["loss"]
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def run(args: argparse.Namespace) -> str:
    """Measure every method and return the markdown report."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    configs = method_configs(args.model)
    modules = {n: METHOD_CLASSES[c.method](c).to(device).train() for n, c in configs.items()}
    batches = {n: synthetic_batch(c, args.batch, device) for n, c in configs.items()}
    flops = {n: training_flops(modules[n], batches[n]) / args.batch for n in configs}
    speed = {}
    if not args.flops_only:
        steps = {n: training_step(modules[n], batches[n], device) for n in configs}
        speed = images_per_second(steps, args.batch, args.steps, args.warmup)
    rows = []
    for name, cfg in configs.items():
        ratio = cfg.can.mask_ratio if cfg.method == "can" else cfg.mae.mask_ratio
        views = 2 if cfg.method == "can" else 1
        tokens = modules[name].encoder.arch.num_patches
        cell = f"{speed[name]:.1f}" if speed else "-"
        rows.append(
            f"| {name} | {views} x {num_visible(tokens, ratio)}/{tokens} "
            f"| {flops[name] / 1e9:.3f} | {cell} |"
        )

    m = configs["can"].model
    lines = [
        f"### CAN training cost: {args.model} (ViT {m.embed_dim}x{m.depth}, patch {m.patch_size}, "
        f"{m.img_size}px; decoder {m.decoder_dim}x{m.decoder_depth}), batch {args.batch}, "
        f"{device.type}",
        "",
        f"{datetime.date.today().isoformat()}, commit {git_commit()}, {machine(device)}, "
        f"torch {torch.__version__}. Command: `python benchmarks/can_cost.py --model {args.model} "
        f"--batch {args.batch} --device {args.device}"
        + (" --flops-only`" if args.flops_only else f" --steps {args.steps}`"),
        "",
        "| method | views x visible/total tokens | train GFLOPs / image | images/s |",
        "|---|---|---|---|",
        *rows,
        "",
        f"SimCLR / CAN FLOPs: {flops['simclr'] / flops['can']:.2f} "
        f"(paper: {PAPER_SIMCLR_OVER_CAN}); CAN / MAE FLOPs: {flops['can'] / flops['mae']:.2f}",
    ]
    if speed:
        lines.append(
            f"CAN / SimCLR images/s: {speed['can'] / speed['simclr']:.2f}; "
            f"MAE / CAN images/s: {speed['mae'] / speed['can']:.2f}"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="vit_t_fmnist")
    parser.add_argument("--batch", type=int, default=32, help="images (not views) per step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--flops-only", action="store_true", help="count FLOPs, skip timing")
    parser.add_argument("--append", action="store_true", help="append to docs/benchmarks.md")
    args = parser.parse_args()
    report = run(args)
    print(report)
    if args.append:
        append_section(report)


if __name__ == "__main__":
    main()
