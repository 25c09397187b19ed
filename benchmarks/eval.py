"""Evaluation speed: feature extraction, k-NN, k-means and the linear-probe sweep against peers.

Feature banks (``--banks``):

- ``fmnist``: normalised Fashion-MNIST pixels, 60k bank x 10k queries x 784 (``benchmarks/knn.py``'s
  loader; class-structured random features of that shape when the files are absent).
- ``features:<dir>``: a feature cache written by ``maect evaluate`` (the ``train-*.pt`` and
  ``test-*.pt`` of one encoder, e.g. ``runs/reproduce_fmnist/mae/features``): the k-NN target's
  "cached features".
- ``synthetic``: class-structured random features (Gaussian class centres plus noise), 200k x 384
  with 10k queries and 100 classes on CPU, 1.28M x 1024 with 50k queries and 1000 classes on CUDA.

Tasks, each timed once after a small warm-up call (maect on ``--device``, peers as noted):

- ``extract``: images/s of ``extract_features`` (data loader, eval transform, encoder under
  ``inference_mode``, bf16 autocast on CUDA) over ``--extract-images`` images, against the
  encoder alone on resident batches (the ratio is the share of the model-only speed reached);
  on CPU also against the same extraction with MKL's products (``cpu_matmul="default"``; the
  default routes the linear layers through oneDNN on AMD processors).
- ``knn``: ``knn_predict`` (k=20, T=0.07; ``knn_accuracy`` is it plus a comparison) vs
  scikit-learn's brute-force cosine ``KNeighborsClassifier`` with the same ``exp(cos / T)`` vote
  (CPU; beyond ``--sklearn-queries`` queries timed on that many and scaled linearly), vs lightly's
  ``knn_predict`` (same device, 512 queries per call, a validation batch each), vs FAISS's exact
  flat search (``IndexFlatIP`` on the normalised bank, the same k and vote; CPU, with torch's
  thread count; faiss-cpu is a benchmark-only dependency: ``pip install -e '.[bench]'``), timed
  ``--rounds`` times each, interleaved, best round reported, with the share of queries whose
  neighbour sets are identical; and vs itself with the whole bank in one block per query chunk
  (``tile_rows`` = bank size). (Measured and not kept: bf16 candidate searches,
  docs/performance.md.)
- ``kmeans``: ``kmeans`` vs scikit-learn ``KMeans`` (k-means++, Lloyd, same k, restarts, iteration
  cap and tolerance) on the L2-normalised bank, inertia reported for both.
- ``linear``: ``linear_probe``'s one-pass sweep over its 10 learning rates vs the same protocol
  run one learning rate at a time (timed for one rate, scaled by the rates + 1 refit).

``--append`` adds the rows to ``docs/benchmarks.md``. Measures, never asserts.

Usage::

    python benchmarks/eval.py                       # CPU: fmnist + 200k x 384 synthetic bank
    python benchmarks/eval.py --device cuda --banks synthetic --tasks knn --append  # 1.28M bank
    python benchmarks/eval.py --banks features:runs/demo_fmnist/mae/features --tasks knn
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import append_rows, command_line, device_name, git_commit, load_average, timed
from knn import load_features
from lightly.utils.benchmarking.knn import knn_predict as lightly_knn_predict
from sklearn.cluster import KMeans
from sklearn.neighbors import KNeighborsClassifier

from maect.config import load_config
from maect.data.datasets import TensorImageDataset, normalization_stats
from maect.data.transforms import eval_transform
from maect.evaluation import kmeans, knn_predict, linear_probe
from maect.evaluation.features import encode, extract_features
from maect.evaluation.knn import knn_neighbours
from maect.evaluation.linear import DEFAULT_LRS
from maect.methods.base import arch_from_config
from maect.models.vit import build_encoder

SECTION = "### Evaluation speed: maect vs peers (`benchmarks/eval.py`)"
HEADER = (
    "| date | commit | machine | load | torch | device | bank | task | implementation | seconds "
    "| result | vs | speed-up | args |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)
LIGHTLY_CHUNK = 512


@dataclasses.dataclass
class Row:
    """One timed implementation; ``speed_up`` is the time of ``vs`` over this one's."""

    bank: str
    task: str
    impl: str
    seconds: float
    result: str
    vs: str = ""
    speed_up: float | None = None


@dataclasses.dataclass
class Bank:
    """Train features and labels, query features and labels."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def classes(self) -> int:
        return int(self.train_y.max()) + 1

    @property
    def label(self) -> str:
        n, d = self.train_x.shape
        return f"{self.name} {n} x {len(self.test_x)} x {d}"


def synthetic_bank(n: int, queries: int, dim: int, classes: int, seed: int = 0) -> Bank:
    """Gaussian class centres plus isotropic noise (3x the centre scale), float32."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=gen)
    parts = []
    for size in (n, queries):
        y = torch.randint(classes, (size,), generator=gen)
        x = centres[y]
        x += 3.0 * torch.randn(size, dim, generator=gen)
        parts += [x, y]
    return Bank("synthetic", *parts)


def versus(rows: list[Row], baseline: Row) -> list[Row]:
    """Mark each of ``rows`` with its speed-up over ``baseline``."""
    for row in rows:
        row.vs, row.speed_up = baseline.impl, baseline.seconds / row.seconds
    return rows


# --------------------------------------------------------------------------- tasks


def bench_extract(args: argparse.Namespace, device: torch.device) -> list[Row]:
    """End-to-end feature extraction vs the encoder alone, on random uint8 images."""
    cfg = load_config(f"mae/{args.extract_recipe}")
    m = cfg.model
    encoder = build_encoder(arch_from_config(cfg)).to(device).eval()
    mean, std = normalization_stats(cfg.data.name, m.in_chans)
    gen = torch.Generator().manual_seed(0)
    shape = (args.extract_images, m.in_chans, m.img_size, m.img_size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    dataset = TensorImageDataset(
        images,
        torch.zeros(len(images), dtype=torch.long),
        num_classes=1,
        transform=eval_transform(m.img_size, m.in_chans, mean, std),
    )
    batch = min(args.extract_batch, len(images))

    def run_extract(cpu_matmul: str = "auto") -> torch.Tensor:
        return extract_features(
            encoder,
            dataset,
            "cls",
            None,
            batch_size=batch,
            device=device,
            num_workers=args.workers,
            progress=False,
            cpu_matmul=cpu_matmul,
        )[0]

    resident = torch.randn(batch, m.in_chans, m.img_size, m.img_size, device=device)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")

    def run_model() -> None:
        with torch.inference_mode(), autocast:
            for _ in range(0, len(images), batch):
                encode(encoder, resident)

    run_model()  # warm-up
    _, t_model = timed(run_model, device)
    _, t_extract = timed(run_extract, device)
    what = f"{args.extract_recipe} ViT {m.embed_dim}x{m.depth} {m.img_size}px, batch {batch}"
    bank = f"{len(images)} random images"
    model = Row(bank, "extract", "encoder alone (resident batches)", t_model, "")
    full = Row(bank, "extract", f"extract_features ({args.workers} workers)", t_extract, "")
    for row in (model, full):
        row.result = f"{len(images) / row.seconds:.0f} images/s; {what}"
    rows = [model, *versus([full], model)]
    if device.type == "cpu":  # the default (oneDNN linear layers on AMD) vs MKL's products
        _, t_mkl = timed(lambda: run_extract("default"), device)
        impl = f"extract_features, MKL linear ({args.workers} workers)"
        mkl = Row(bank, "extract", impl, t_mkl, f"{len(images) / t_mkl:.0f} images/s; {what}")
        rows += [*versus([dataclasses.replace(full)], mkl), mkl]
    return rows


def faiss_rows(bank: Bank, args: argparse.Namespace, device: torch.device) -> list[Row]:
    """maect's neighbour search vs FAISS's exact flat inner-product search (CPU), both timed
    ``args.rounds`` times interleaved (best round), with identical-neighbour and prediction
    shares; no rows when faiss is not installed or the device is not the CPU."""
    try:
        import faiss
    except ImportError:
        print("faiss not installed: no FAISS rows (pip install faiss-cpu)")
        return []
    if device.type != "cpu":
        return []
    k, temp = args.k, args.temperature
    faiss.omp_set_num_threads(torch.get_num_threads())
    bank_x = F.normalize(bank.train_x.float(), dim=1)
    queries = F.normalize(bank.test_x.float(), dim=1)
    index = faiss.IndexFlatIP(bank_x.shape[1])
    index.add(bank_x.numpy())

    def faiss_search() -> tuple[torch.Tensor, torch.Tensor]:
        sims, ids = index.search(queries.numpy(), k)
        return torch.from_numpy(sims), torch.from_numpy(ids)

    def maect_search() -> tuple[torch.Tensor, torch.Tensor]:
        return knn_neighbours(bank_x, queries, k)

    best = {"faiss": float("inf"), "maect": float("inf")}
    for _ in range(args.rounds):
        for name, search in (("faiss", faiss_search), ("maect", maect_search)):
            result, seconds = timed(search, device)
            best[name] = min(best[name], seconds)
            if name == "faiss":
                faiss_result = result
            else:
                maect_result = result
    same_sets = (maect_result[1].sort(1).values == faiss_result[1].sort(1).values).all(1)

    def vote(sims: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        votes = torch.zeros(len(ids), bank.classes, dtype=torch.float64)
        return votes.scatter_add_(1, bank.train_y[ids], (sims.double() / temp).exp()).argmax(1)

    same_pred = (vote(*maect_result) == vote(*faiss_result)).double().mean()
    threads = torch.get_num_threads()
    ours = Row(
        bank.label,
        "knn search",
        f"maect neighbour search (cpu, best of {args.rounds})",
        best["maect"],
        f"{100 * float(same_sets.double().mean()):.2f}% same neighbour sets, "
        f"{100 * float(same_pred):.2f}% same predictions",
    )
    peer = Row(
        bank.label,
        "knn search",
        f"faiss IndexFlatIP ({threads} threads, best of {args.rounds})",
        best["faiss"],
        f"faiss {faiss.__version__}",
    )
    return [*versus([ours], peer), peer]


def bench_knn(bank: Bank, args: argparse.Namespace, device: torch.device) -> list[Row]:
    """maect's k-NN vs scikit-learn brute force (CPU), lightly's ``knn_predict`` and FAISS."""
    k, temp = args.k, args.temperature
    train_x, train_y, test_x = (t.to(device) for t in (bank.train_x, bank.train_y, bank.test_x))
    test_y = bank.test_y.to(device)
    knn_predict(train_x[:1000], train_y[:1000], test_x[:10], k, temp)  # warm-up
    ours, t_ours = timed(lambda: knn_predict(train_x, train_y, test_x, k, temp)[k], device)
    top1 = 100.0 * float((ours == test_y).double().mean())
    maect = Row(bank.label, "knn", f"maect knn_predict ({device.type})", t_ours, f"top1 {top1:.2f}")
    one_block = len(train_x)

    def untiled_predict() -> torch.Tensor:
        return knn_predict(train_x, train_y, test_x, k, temp, tile_rows=one_block)[k]

    pred, t_untiled = timed(untiled_predict, device)
    same = 100.0 * float((pred == ours).double().mean())
    untiled = Row(
        bank.label, "knn", "maect, whole bank per block", t_untiled, f"{same:.2f}% same predictions"
    )

    m = min(args.sklearn_queries, len(test_x))
    clf = KNeighborsClassifier(
        n_neighbors=k, algorithm="brute", metric="cosine", weights=lambda d: np.exp((1 - d) / temp)
    )

    def sklearn_predict() -> np.ndarray:
        clf.fit(bank.train_x.numpy(), bank.train_y.numpy())
        return clf.predict(bank.test_x[:m].numpy())

    pred, t_sk = timed(sklearn_predict, torch.device("cpu"))
    sk_top1 = 100.0 * float((pred == bank.test_y[:m].numpy()).mean())
    scaled = f", scaled from {m} queries" if m < len(test_x) else ""
    sklearn = Row(
        bank.label,
        "knn",
        f"sklearn brute cosine (cpu{scaled})",
        t_sk * len(test_x) / m,
        f"top1 {sk_top1:.2f}",
    )

    def lightly_predict() -> torch.Tensor:
        feature_bank = F.normalize(train_x, dim=1).T.contiguous()
        preds = []
        for start in range(0, len(test_x), LIGHTLY_CHUNK):
            queries = F.normalize(test_x[start : start + LIGHTLY_CHUNK], dim=1)
            preds.append(lightly_knn_predict(queries, feature_bank, train_y, bank.classes, k, temp))
        return torch.cat(preds)[:, 0]

    pred, t_lightly = timed(lightly_predict, device)
    result = f"top1 {100.0 * float((pred == test_y).double().mean()):.2f}"
    lightly = Row(bank.label, "knn", f"lightly knn_predict ({device.type})", t_lightly, result)

    return [
        *versus([maect], sklearn),
        sklearn,
        *versus([dataclasses.replace(maect)], lightly),
        lightly,
        *versus([dataclasses.replace(maect)], untiled),
        untiled,
        *faiss_rows(bank, args, device),
    ]


def bench_kmeans(bank: Bank, args: argparse.Namespace, device: torch.device) -> list[Row]:
    """maect's k-means vs scikit-learn's on the L2-normalised bank."""
    x = F.normalize(bank.train_x[: args.kmeans_size or None], dim=1)
    k = args.clusters or bank.classes

    def run() -> float:
        return kmeans(x.to(device), k, n_init=args.n_init, max_iter=args.max_iter)[2]

    kmeans(x[:1000].to(device), k, n_init=1, max_iter=2)  # warm-up
    inertia, t_ours = timed(run, device)
    sk = KMeans(k, init="k-means++", n_init=args.n_init, max_iter=args.max_iter, random_state=0)
    _, t_sk = timed(lambda: sk.fit(x.numpy()), torch.device("cpu"))
    setting = f"{len(x)} rows, k={k}, n_init={args.n_init}, max_iter={args.max_iter}"
    ours = Row(bank.label, "kmeans", f"maect kmeans ({device.type})", t_ours, "")
    ours.result = f"inertia {inertia:.5g}; {setting}"
    sklearn = Row(bank.label, "kmeans", "sklearn KMeans lloyd (cpu)", t_sk, "")
    sklearn.result = f"inertia {sk.inertia_:.5g}; {sk.n_iter_} iterations"
    return [*versus([ours], sklearn), sklearn]


def bench_linear(bank: Bank, args: argparse.Namespace, device: torch.device) -> list[Row]:
    """The one-pass learning-rate sweep vs the same protocol one rate at a time."""
    data = [t.to(device) for t in (bank.train_x, bank.train_y, bank.test_x, bank.test_y)]
    epochs = args.probe_epochs
    out, t_sweep = timed(lambda: linear_probe(*data, epochs=epochs), device)
    _, t_one = timed(lambda: linear_probe(*data, lrs=(out["best_lr"],), epochs=epochs), device)
    rates = len(DEFAULT_LRS)
    setting = f"{epochs} epochs, {rates} lrs"
    sweep = Row(bank.label, "linear", f"maect linear_probe sweep ({device.type})", t_sweep, "")
    sweep.result = f"top1 {out['top1']:.2f} at lr {out['best_lr']:g}; {setting}"
    separate = Row(
        bank.label,
        "linear",
        f"one lr at a time (one-lr run x {rates + 1} / 2)",
        t_one * (rates + 1) / 2,
        f"one-lr run {t_one:.1f} s (fit + refit)",
    )
    return [*versus([sweep], separate), separate]


# --------------------------------------------------------------------------- main


def cached_bank(directory: Path) -> Bank:
    """The train and test features of one ``maect evaluate`` feature cache directory."""
    parts = []
    for split in ("train", "test"):
        files = sorted(directory.glob(f"{split}-*.pt"))
        if len(files) != 1:
            raise SystemExit(
                f"expected one {split}-*.pt feature cache in {directory}, found {files}"
            )
        stored = torch.load(files[0], map_location="cpu", weights_only=True)
        parts += [stored["features"].float(), stored["labels"]]
    return Bank(f"cached features {directory}", *parts)


def load_bank(name: str, args: argparse.Namespace, device: torch.device) -> Bank:
    if name.startswith("features:"):
        return cached_bank(Path(name.removeprefix("features:")))
    if name == "fmnist":
        source, parts = load_features(60000, 10000)
        return Bank("fmnist pixels" if "fashion" in source else "fmnist-shaped random", *parts)
    cuda = device.type == "cuda"
    n = args.bank_size or (1_281_167 if cuda else 200_000)
    return synthetic_bank(
        n,
        args.queries or (50_000 if cuda else 10_000),
        args.dim or (1024 if cuda else 384),
        args.classes or (1000 if cuda else 100),
    )


def print_rows(rows: list[Row]) -> None:
    header = ["bank", "task", "implementation", "seconds", "result", "vs", "speed-up"]
    cells = [
        [
            r.bank,
            r.task,
            r.impl,
            f"{r.seconds:.2f}",
            r.result,
            r.vs or "-",
            f"{r.speed_up:.1f}x" if r.speed_up else "-",
        ]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
    for row in [header, *cells]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--banks", default="fmnist,synthetic", help="fmnist, synthetic, features:<dir>"
    )
    parser.add_argument("--tasks", default="extract,knn,kmeans,linear")
    parser.add_argument("--bank-size", type=int, default=0, help="synthetic bank rows")
    parser.add_argument("--queries", type=int, default=0, help="synthetic queries")
    parser.add_argument("--dim", type=int, default=0, help="synthetic feature width")
    parser.add_argument("--classes", type=int, default=0, help="synthetic classes")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds vs FAISS (best)")
    parser.add_argument(
        "--sklearn-queries", type=int, default=0, help="timed, then scaled (0: 10k CPU, 500 CUDA)"
    )
    parser.add_argument("--clusters", type=int, default=0, help="k-means k (0: classes)")
    parser.add_argument("--kmeans-size", type=int, default=-1, help="bank rows (0: all)")
    parser.add_argument("--n-init", type=int, default=1)
    parser.add_argument("--max-iter", type=int, default=30)
    parser.add_argument("--probe-epochs", type=int, default=2)
    parser.add_argument("--extract-recipe", default="", help="mae/<this> encoder")
    parser.add_argument("--extract-images", type=int, default=0)
    parser.add_argument("--extract-batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=-1, help="extraction loader workers")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--append", action="store_true", help="add rows to docs/benchmarks.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.extract_recipe = args.extract_recipe or ("in1k_vit_l16" if cuda else "fmnist_vit_t")
    args.extract_images = args.extract_images or (8192 if cuda else 4096)
    args.workers = args.workers if args.workers >= 0 else (8 if cuda else 0)
    args.sklearn_queries = args.sklearn_queries or (500 if cuda else 10_000)
    args.kmeans_size = args.kmeans_size if args.kmeans_size >= 0 else (50_000 if cuda else 0)
    command = command_line()
    loads = [load_average()]
    print(f"{command}\n{device_name(device)}, load average {loads[0]:.1f} at start")

    tasks = args.tasks.split(",")

    def report(rows: list[Row]) -> None:
        """Print (and with --append, record) rows as soon as a task ends, so a run stopped by a
        time limit keeps what it measured."""
        loads.append(load_average())
        print_rows(rows)
        if args.append:
            lead = [str(date.today()), git_commit(), device_name(device)]
            lead += [f"{loads[-1]:.1f}", torch.__version__, device.type]
            lines = []
            for r in rows:
                speed = f"{r.speed_up:.1f}x" if r.speed_up else "-"
                cells = [r.bank, r.task, r.impl, f"{r.seconds:.2f}", r.result, r.vs or "-", speed]
                lines.append("| " + " | ".join([*lead, *cells, f"`{command}`"]) + " |")
            append_rows(SECTION, HEADER, lines)
            print("appended to docs/benchmarks.md", flush=True)

    if "extract" in tasks:
        report(bench_extract(args, device))
    for name in args.banks.split(","):
        started = time.perf_counter()
        bank = load_bank(name, args, device)
        print(f"bank {bank.label} ready in {time.perf_counter() - started:.1f} s", flush=True)
        for task, bench in (("knn", bench_knn), ("kmeans", bench_kmeans), ("linear", bench_linear)):
            if task in tasks:
                print(f"{task} on {bank.label} ...", flush=True)
                report(bench(bank, args, device))
    print(f"load average {statistics.fmean(loads):.1f} mean over the run")


if __name__ == "__main__":
    main()
