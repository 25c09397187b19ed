"""Data-path throughput: images/s per loader worker against the GPU step rate.

A loader worker runs one thread; each case below reads and transforms images the way a worker
does (``dataset[i]`` under a per-sample seed) from a synthetic ImageFolder of ImageNet-size JPEGs
(500 x 375 and 375 x 500, quality 90, written to a temporary folder) and from the streaming
shards of the same folder (``maect shards``), for ViT-B/16 at 224 px:

- ``decode``: the image only (PIL, as ``ImageFolderDataset``); ``decode (torchvision.io)`` is
  the alternative decoder, for reference (maect does not use it);
- ``mae loader``: decode + MAE's crop, flip and normalisation (``data.augment_on=loader``);
- ``mae device``: decode + crop only, flip and normalisation left to the device (``device``);
- ``byol loader`` / ``byol device``: the same for MAE-CT's two BYOL views (colour jitter,
  grayscale, blur, solarisation per sample in the worker, or batched on the device).

``op ...`` rows time single steps of a worker on one decoded 500 x 375 image (the crop, a
resize of the whole image to a fixed size, flip + normalisation, colour jitter, blur).
``ratio`` is the case's rate over the row named in ``vs`` (shards over the ImageFolder path;
device over loader augmentation). ``workers`` is how many workers feed ``--step-rate`` images/s
(default: ViT-B/16 MAE on an H200, estimated as 3 x the measured ViT-L/16 MAE rate of 2146
images/s at batch 256). ``batched device aug`` times :class:`BatchAugment` on ``--device`` for a
batch of ``--batch`` images x 2 BYOL views (images/s of the device, all CPU threads on CPU).

Usage::

    python benchmarks/data.py [--device cuda] [--rounds 5] [--append]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import tempfile
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np
import torch
from _common import (
    append_rows,
    command_line,
    device_name,
    git_commit,
    load_average,
    machine,
    step_times,
)
from PIL import Image
from torchvision.io import decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from maect.data.datasets import build_dataset, normalization_stats
from maect.data.device_augment import BatchAugment, CropsForDevice
from maect.data.loader import SeededItems
from maect.data.shards import write_shards
from maect.data.transforms import (
    VIEW_PAIRS,
    blur_kernel,
    loader_views,
    random_resized_crop,
    to_normalized,
)

IMG_SIZE = 224
SCALE = (0.2, 1.0)
STEP_RATE = 3 * 2146  # ViT-B/16 MAE estimate: 3 x ViT-L/16 MAE on one H200, batch 256, bf16
SECTION = "### Data path per loader worker (`benchmarks/data.py`)"
HEADER = (
    "| date | commit | machine | load | torch | case | images/s | ms/image | vs | ratio "
    "| workers for step rate | args |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def jpeg_folder(root: Path, per_class: int) -> None:
    """``train/`` and ``val/`` with two classes of ImageNet-size JPEGs (smooth gradients, edges
    and noise, so the files compress like photographs: about 60-90 kB)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                h, w = (375, 500) if i % 3 else (500, 375)
                yy, xx = np.mgrid[0:h, 0:w]
                base = np.stack(
                    [xx * 255 / w, yy * 255 / h, 127 + 100 * np.sin((xx + 2 * yy) / 25.0)], -1
                )
                noisy = base + rng.normal(0, 12, (h, w, 3))
                pixels = noisy.clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)


def reader(dataset, transform, batch: int) -> Callable[[], None]:
    """Reads the next ``batch`` items of ``dataset`` with ``transform`` as a worker does."""
    dataset.transform = transform
    items = SeededItems(dataset)
    position = [0]

    def read() -> None:
        for _ in range(batch):
            index = position[0] % len(dataset)
            items[(index, position[0])]
            position[0] += 1

    return read


def decode_torchvision(files: list[str], batch: int) -> Callable[[], None]:
    """Reads and decodes the next ``batch`` JPEG files with ``torchvision.io.decode_jpeg``."""
    position = [0]

    def read() -> None:
        for _ in range(batch):
            data = Path(files[position[0] % len(files)]).read_bytes()
            decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            position[0] += 1

    return read


def operations(width: int, mean, std) -> dict[str, Callable[[torch.Tensor], object]]:
    """Single steps of a worker on a decoded image of width ``width`` (uint8, 1 thread)."""
    crop = random_resized_crop(IMG_SIZE, SCALE)
    at_size = T.CenterCrop(IMG_SIZE)
    whole = T.Resize((IMG_SIZE, IMG_SIZE), interpolation=InterpolationMode.BICUBIC, antialias=True)
    normalise = T.Compose([T.RandomHorizontalFlip(), to_normalized(mean, std)])
    jitter = T.ColorJitter(0.4, 0.4, 0.2, 0.1)
    blur = T.GaussianBlur(blur_kernel(IMG_SIZE), (0.1, 2.0))
    return {
        f"crop + resize to {IMG_SIZE} (RandomResizedCrop)": crop,
        f"resize whole {width}-wide image to {IMG_SIZE}x{IMG_SIZE}": whole,
        "flip + normalise (224 px)": lambda x: normalise(at_size(x)),
        "colour jitter (224 px)": lambda x: jitter(at_size(x)),
        f"Gaussian blur, kernel {blur_kernel(IMG_SIZE)} (224 px)": lambda x: blur(at_size(x)),
    }


def repeat(op: Callable, image: torch.Tensor, batch: int) -> Callable[[], None]:
    """Applies ``op`` to ``image`` ``batch`` times."""

    def run() -> None:
        for _ in range(batch):
            op(image)

    return run


def worker_rates(root: Path, shards: Path | None, args: argparse.Namespace) -> dict[str, float]:
    """Images/s of every worker case, interleaved in rounds, with one torch thread."""
    mean, std = normalization_stats("imagefolder", 3)
    mae, byol = [{}], list(VIEW_PAIRS["byol"])
    transforms = {
        "decode": None,
        "mae loader": loader_views(mae, IMG_SIZE, 3, mean, std, SCALE),
        "mae device": CropsForDevice(mae, IMG_SIZE, 3, SCALE),
        "byol loader": loader_views(byol, IMG_SIZE, 3, mean, std, SCALE),
        "byol device": CropsForDevice(byol, IMG_SIZE, 3, SCALE),
    }
    steps: dict[str, Callable[[], None]] = {}
    sources = [("imagefolder", "", root)] + ([("shards", "shards ", shards)] if shards else [])
    for source, name, location in sources:
        for case, transform in transforms.items():
            dataset = build_dataset(source, str(location), train=True)
            steps[f"{name}{case}"] = reader(dataset, transform, args.images)
    files = build_dataset("imagefolder", str(root), train=True).files
    steps["decode (torchvision.io)"] = decode_torchvision(files, args.images)
    image = build_dataset("imagefolder", str(root), train=True).load_image(1)  # 500 x 375
    for name, op in operations(image.shape[-1], mean, std).items():
        steps[f"op {name}"] = repeat(op, image, args.images)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = step_times(steps, args.rounds, warmup=1)
    finally:
        torch.set_num_threads(before)
    return {name: args.images / statistics.median(t) for name, t in times.items()}


def device_rate(args: argparse.Namespace) -> float:
    """Images/s of :class:`BatchAugment` on ``args.device`` for BYOL's two views of a batch."""
    device = torch.device(args.device)
    byol = list(VIEW_PAIRS["byol"])
    crops = CropsForDevice(byol, IMG_SIZE, 3, SCALE)
    source = torch.randint(0, 256, (3, 375, 500), dtype=torch.uint8)
    items = []
    for seed in range(args.batch):
        torch.manual_seed(seed)
        items.append(crops(source))
    views = [
        {key: torch.stack([item[v][key] for item in items]).to(device) for key in items[0][v]}
        for v in range(2)
    ]
    augment = BatchAugment(byol, IMG_SIZE, *normalization_stats("imagefolder", 3))
    times = step_times({"aug": lambda: augment(views)}, args.rounds, warmup=2, device=device)
    return args.batch / statistics.median(times["aug"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=16, help="images per timed call")
    parser.add_argument("--per-class", type=int, default=24, help="JPEGs per class and split")
    parser.add_argument("--batch", type=int, default=256, help="batch of the device augmentation")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--step-rate", type=float, default=STEP_RATE, help="GPU images/s to feed")
    parser.add_argument("--append", action="store_true", help="add rows to docs/benchmarks.md")
    args = parser.parse_args()
    args.command = command_line()
    print(f"{args.command}\n{machine(torch.device('cpu'))} at start")
    with tempfile.TemporaryDirectory() as tmp:
        root, shards = Path(tmp) / "jpeg", Path(tmp) / "shards"
        jpeg_folder(root, args.per_class)
        if importlib.util.find_spec("litdata") is None:
            print("litdata is not installed: the shards cases are left out")
            shards = None
        else:
            write_shards(str(root), shards)
        rates = worker_rates(root, shards, args)
    rows: list[tuple[str, float, str]] = []
    for name, rate in rates.items():
        if name.startswith("shards "):
            rows.append((name, rate, name.removeprefix("shards ")))
        elif name.endswith("device"):
            rows.append((name, rate, name.replace("device", "loader")))
        else:
            rows.append((name, rate, ""))
    aug = device_rate(args)
    rows.append((f"batched device aug, byol x2, batch {args.batch}", aug, ""))
    cpu, dev = device_name(torch.device("cpu")), device_name(torch.device(args.device))
    print(f"load average {load_average():.1f} at end; workers feed {args.step_rate:.0f} images/s")
    header = ("case", "images/s", "ms/image", "vs", "ratio", "workers")
    table = [header]
    for name, rate, vs in rows:
        ratio = f"{rate / rates[vs]:.2f}" if vs else "-"
        whole = not name.startswith(("batched", "op "))
        workers = str(math.ceil(args.step_rate / rate)) if whole else "-"
        table.append((name, f"{rate:.0f}", f"{1000 / rate:.2f}", vs or "-", ratio, workers))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if args.append:
        lead = [str(date.today()), git_commit()]
        load = f"{load_average():.1f}"
        log = []
        for name, *cells in table[1:]:
            batched = name.startswith("batched")
            where = dev if batched else f"{cpu}, 1 thread per worker"
            if cells[-1] != "-":
                cells[-1] = f"{cells[-1]} for {args.step_rate:.0f}/s"
            row = [*lead, where, load, torch.__version__, name, *cells, f"`{args.command}`"]
            log.append("| " + " | ".join(row) + " |")
        append_rows(SECTION, HEADER, log)
        print("appended to docs/benchmarks.md")


if __name__ == "__main__":
    main()
