"""Where the CPU time of ``make demo`` goes: each part of the demo pipeline measured on its own
in CPU seconds (``time.process_time``, all threads of this process), so the figures hold on a
shared machine where wall time does not.

Parts, each with its count in the demo (from ``pipelines/demo_fmnist``'s CPU settings):

- ``step <stage>``: one training step (forward, backward, AdamW, the method's EMA updates) on a
  batch of the demo's training images, per stage: ``mae``, ``maect/head`` (stage 2),
  ``maect/tune`` (stage 3), ``can``; the share of it spent in matrix products (torch profiler:
  ``mm``, ``addmm``, ``bmm``, ``linear`` and attention kernels);
- ``data <stage>``: reading and augmenting one batch (the loader workers' work);
- ``monitor``: one online k-NN evaluation (1000 + 500 images), run after every epoch;
- ``checkpoint``: writing one checkpoint (model + AdamW state), twice per epoch in the demo;
- ``evaluate``: one ``maect evaluate`` of a ViT-T with the demo's evaluation settings, four in
  the demo (pixels counted as an encoder: an upper bound);
- ``gemm``: the fp32 and bf16 matrix-product rate of one thread (GFLOP per CPU second) at the
  shape of the encoder's MLP, to compare machines (PyTorch's fp32 products run in MKL, which
  takes an AVX2 path on AMD CPUs; bf16 ones in oneDNN), and the fp32 rate in oneDNN.

The sum is the demo's CPU work; on an idle 2-core machine the wall time is at least half of it.
``--bf16`` also times the steps under bf16 autocast (``trainer.precision=bf16-mixed``).
``--cpu-matmul`` applies ``trainer.cpu_matmul`` to the modules as training does (default ``auto``,
the demo's setting; ``default`` for PyTorch's MKL products, ``onednn`` for oneDNN's).

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/demo_profile.py [--steps 3] [--bf16] [--no-eval]
        [--stages mae,maect/head,maect/tune,can] [--cpu-matmul auto|onednn|default]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import command_line, git_commit, load_average
from torch.profiler import ProfilerActivity, profile
from train_step import make_bench

from maect.checkpoints import save_encoder
from maect.config import load_config
from maect.data.loader import build_loader
from maect.engine import training_dataset
from maect.evaluation.command import evaluate, load_eval_config
from maect.evaluation.monitor import build_monitor
from maect.methods import METHOD_CLASSES
from maect.methods.base import arch_from_config
from maect.methods.maect import ContrastiveTuning, NNCLRHeadTraining
from maect.models.cpu_linear import apply_cpu_matmul
from maect.models.vit import build_encoder
from maect.pipeline import cpu_name, load_pipeline, stage_config

MATMUL_OPS = ("mm", "addmm", "bmm", "linear", "matmul", "scaled_dot_product", "_mkl", "mkldnn")


def cpu_seconds(fn: Callable[[], object], repeats: int = 1) -> float:
    """CPU seconds (all threads) per call of ``fn``, after one untimed call."""
    fn()
    start = time.process_time()
    for _ in range(repeats):
        fn()
    return (time.process_time() - start) / repeats


def matmul_share(fn: Callable[[], object]) -> float:
    """Fraction of the CPU time of one call of ``fn`` spent in matrix-product kernels."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(
        e.self_cpu_time_total for e in events if any(op in e.key.lower() for op in MATMUL_OPS)
    )
    return matmul / total if total else float("nan")


def gemm_rate(
    dtype: torch.dtype, m: int = 12800, k: int = 192, n: int = 768, onednn: bool = False
) -> float:
    """GFLOP per CPU second of one thread for ``[m, k] @ [k, n]`` (``onednn``: through
    oneDNN's linear op instead of ``torch.mm``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        lp = torch.ops.mkldnn._linear_pointwise
        product = (lambda: lp(a, b, None, "none", [], "")) if onednn else (lambda: a @ b.T)
        return 2 * m * k * n / cpu_seconds(product, repeats=5) / 1e9
    finally:
        torch.set_num_threads(threads)


def demo_stages(out: Path) -> dict[str, tuple]:
    """``{label: (cfg, module, epochs)}`` of the demo's training stages (CPU settings)."""
    spec, stages, _ = load_pipeline("demo_fmnist")
    parts = {}
    for stage in stages:
        cfg = stage_config(spec, stage, out, [])
        if stage.command == "pretrain":
            parts[stage.name] = (cfg, METHOD_CLASSES[cfg.method](cfg), cfg.trainer.epochs)
            continue
        encoder = build_encoder(arch_from_config(cfg))
        head = NNCLRHeadTraining(cfg, encoder)
        parts[f"{stage.name}/head"] = (head.cfg, head, cfg.maect.head_epochs)
        tuning = ContrastiveTuning(cfg, build_encoder(arch_from_config(cfg)))
        parts[f"{stage.name}/tune"] = (cfg, tuning, cfg.trainer.epochs)
    return parts


Row = tuple[str, float, int, str]  # part, CPU s per unit, units in the demo, note


def profile_stage(label: str, cfg, module, epochs: int, out: Path, args) -> list[Row]:
    """The data, step, checkpoint and monitor rows of one training stage."""
    steps = cfg.data.subset // cfg.data.batch_size * epochs
    dataset = training_dataset(cfg)
    dataset.transform = module.train_transform()
    batches = iter(build_loader(dataset, cfg.data.batch_size, 0, shuffle=True, drop_last=True))
    rows = [(f"data {label}", cpu_seconds(lambda: next(batches), args.steps), steps, "")]
    name = "maect_head" if label.endswith("/head") else cfg.method
    cpu = torch.device("cpu")
    bench = make_bench(
        name, {cfg.method: cfg}, cfg.data.batch_size, cpu, False, "fused", module=module
    )
    share = f"{matmul_share(bench.step):.0%} in matrix products"
    rows.append((f"step {label}", cpu_seconds(bench.step, args.steps), steps, share))
    if args.bf16:
        bf16 = make_bench(
            name, {cfg.method: cfg}, cfg.data.batch_size, cpu, True, "fused", module=module
        )
        rows.append((f"step {label}, bf16 autocast", cpu_seconds(bf16.step, args.steps), 0, ""))
    state = {"model": module.state_dict(), "optimizer": bench.optimizer.state_dict()}
    path = out / "checkpoint.pt"
    rows.append(
        (f"checkpoint {label}", cpu_seconds(lambda: torch.save(state, path)), 2 * epochs, "")
    )
    if not label.endswith("/head"):  # stage 2 has no monitor
        monitor = build_monitor(cfg, every=1)
        rows.append((f"monitor {label}", cpu_seconds(lambda: monitor.knn_top1(module)), epochs, ""))
    return rows


def profile_evaluation(out: Path) -> Row:
    """One ``maect evaluate`` of a ViT-T of the demo's architecture, demo settings."""
    spec, _, _ = load_pipeline("demo_fmnist")
    cfg = load_config("mae/fmnist_vit_t")
    save_encoder(build_encoder(arch_from_config(cfg)), out / "encoder" / "encoder.pt")
    items = [*spec.eval_overrides, "progress=false", "cache=false", f"out={out / 'eval'}"]
    start = time.process_time()
    evaluate(out / "encoder", load_eval_config(items))
    return ("evaluate (one source)", time.process_time() - start, len(spec.evaluate), "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per stage")
    parser.add_argument("--bf16", action="store_true", help="also time steps under bf16 autocast")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation part")
    parser.add_argument("--stages", default="", help="only these stages, e.g. mae,can/tune")
    parser.add_argument(
        "--cpu-matmul", choices=("auto", "onednn", "default"), default="auto", help="as trainer's"
    )
    args = parser.parse_args()
    load_before = load_average()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        chosen = [name for name in args.stages.split(",") if name]
        for label, (cfg, module, epochs) in demo_stages(Path(tmp)).items():
            if chosen and label not in chosen:
                continue
            apply_cpu_matmul(module, args.cpu_matmul, torch.device("cpu"))
            rows += profile_stage(label, cfg, module, epochs, Path(tmp), args)
            print(*rows[-3:], sep="\n", flush=True)
        if not args.no_eval:
            rows.append(profile_evaluation(Path(tmp)))
    fp32, bf16 = gemm_rate(torch.float32), gemm_rate(torch.bfloat16)
    onednn = gemm_rate(torch.float32, onednn=True)
    total = sum(seconds * units for _, seconds, units, _ in rows)
    print(
        f"\n{cpu_name()}, {torch.get_num_threads()} threads, load average {load_before:.1f} "
        f"-> {load_average():.1f}, commit {git_commit()}\n{command_line()}\n"
    )
    print("| part | CPU s per unit | units in the demo | CPU s in the demo | share | note |")
    print("|---|---|---|---|---|---|")
    for part, seconds, units, note in rows:
        share = f"{seconds * units / total:.0%}" if units else "–"
        count = units or "–"
        print(f"| {part} | {seconds:.3f} | {count} | {seconds * units:.0f} | {share} | {note} |")
    print(
        f"| total | | | {total:.0f} ({total / 60:.1f} CPU min; idle 2 cores: at least "
        f"{total / 120:.1f} min) | | |"
    )
    print(
        f"\nfp32 GEMM {fp32:.0f} GFLOP per CPU s, bf16 GEMM {bf16:.0f}, fp32 in oneDNN "
        f"{onednn:.0f} (one thread, [12800, 192] @ [192, 768])"
    )


if __name__ == "__main__":
    main()
