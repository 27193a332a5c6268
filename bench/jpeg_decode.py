"""JPEG decoding throughput: can the CPU keep up with training, or should decoding move to the GPU?

    python bench/jpeg_decode.py --images 256 --image-size 640 --workers 1 2 4 8 --train-rate 120 --real-photos

Decodes the same JPEG bytes, held in memory, in each of these ways:
- PIL: Image.open + convert("RGB") + pil_to_tensor, the torchvision reference's path; one process.
- torchvision.io.decode_jpeg on the CPU (libjpeg-turbo, our shard reader's path); one process, one thread.
- either of them in a pool of W worker processes of one thread each, as W DataLoader workers would decode.
  Only decoding is timed (no file reads, no hand-over of the pixels to the main process), so this is the
  upper bound of what W loader workers can deliver.
- torchvision.io.decode_jpeg(list of images, device="cuda") in batches (nvJPEG), when a CUDA device is
  visible; timed from the bytes in CPU memory to decoded images on the GPU, ending on a synchronisation.

The sets: synthetic product images from data_prep.synth (long side --image-size, COCO-like sizes at 640) and,
with --real-photos, the photos that ship with scikit-image and matplotlib (the PNGs re-encoded as JPEG at
quality 90), cycled to --images. Each figure is the median of --repeats passes over the set. A row "keeps up"
when its images/s reaches --train-rate (the training images/s to feed, e.g. from bench/gpu_train.py).
Prints markdown tables and appends the result as one JSON line to --out.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing import get_context
from pathlib import Path

import torch
import torchvision
from PIL import Image
from results import append_result
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.functional import pil_to_tensor

from data_prep.synth import write_synthetic_coco

REAL_JPEGS = ("skimage:rocket.jpg", "skimage:hubble_deep_field.jpg", "skimage:retina.jpg",
              "matplotlib:grace_hopper.jpg")
REAL_PNGS = ("skimage:astronaut.png", "skimage:chelsea.png", "skimage:coffee.png",
             "skimage:motorcycle_left.png")
REENCODE_QUALITY = 90
POOL_CHUNK = 8  # images per task handed to a pool worker, about one loader batch


# ---- the sets --------------------------------------------------------------------------------------------
def synthetic_jpegs(num_images: int, image_size: int) -> list[bytes]:
    with tempfile.TemporaryDirectory(prefix="bench-jpeg-") as root:
        write_synthetic_coco(root, num_images=num_images, image_size=image_size, seed=0,
                             num_workers=min(8, os.cpu_count() or 1))
        return [path.read_bytes() for path in sorted(Path(root, "images").glob("*.jpg"))]


def _sample_file(spec: str) -> Path:
    package, name = spec.split(":")
    if package == "skimage":
        import skimage

        return Path(skimage.__file__).parent / "data" / name
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / name


def real_photo_jpegs(num_images: int) -> list[bytes]:
    """The packaged photos as JPEG bytes, cycled to num_images."""
    photos = []
    for spec in REAL_JPEGS + REAL_PNGS:
        path = _sample_file(spec)
        if not path.is_file():
            raise FileNotFoundError(f"sample photo {spec} not found at {path} (is scikit-image / matplotlib "
                                    "installed?); run without --real-photos")
        if path.suffix == ".jpg":
            photos.append(path.read_bytes())
        else:
            buffer = io.BytesIO()
            Image.open(path).convert("RGB").save(buffer, format="JPEG", quality=REENCODE_QUALITY)
            photos.append(buffer.getvalue())
    return [photos[i % len(photos)] for i in range(num_images)]


def megapixels(data: bytes) -> float:
    width, height = Image.open(io.BytesIO(data)).size
    return width * height / 1e6


# ---- the decoders ----------------------------------------------------------------------------------------
def decode_pil(data: bytes) -> torch.Tensor:
    return pil_to_tensor(Image.open(io.BytesIO(data)).convert("RGB"))


def decode_torchvision(data: bytes) -> torch.Tensor:
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


DECODERS: dict[str, Callable[[bytes], torch.Tensor]] = {"PIL": decode_pil, "decode_jpeg": decode_torchvision}

_POOL_JPEGS: list[bytes] = []  # set before the pool forks: workers inherit the bytes, none are sent to them


def _pool_worker_init() -> None:
    torch.set_num_threads(1)  # as in DataLoader workers


def _pool_decode(task: tuple[str, int, int]) -> int:
    decoder, start, stop = task
    for data in _POOL_JPEGS[start:stop]:
        DECODERS[decoder](data)
    return stop - start


def rate_in_process(decoder: str, jpegs: list[bytes], repeats: int) -> float:
    torch.set_num_threads(1)
    decode = DECODERS[decoder]
    decode(jpegs[0])
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for data in jpegs:
            decode(data)
        rates.append(len(jpegs) / (time.perf_counter() - start))
    return statistics.median(rates)


def rate_in_pool(decoder: str, jpegs: list[bytes], workers: int, repeats: int) -> float:
    global _POOL_JPEGS
    _POOL_JPEGS = jpegs
    starts = range(0, len(jpegs), POOL_CHUNK)
    tasks = [(decoder, start, min(start + POOL_CHUNK, len(jpegs))) for start in starts]
    rates = []
    with get_context("fork").Pool(workers, initializer=_pool_worker_init) as pool:
        pool.map(_pool_decode, [(decoder, 0, 1)] * workers)  # start every worker before the clock does
        for _ in range(repeats):
            start = time.perf_counter()
            decoded = sum(pool.imap_unordered(_pool_decode, tasks))
            rates.append(decoded / (time.perf_counter() - start))
    return statistics.median(rates)


def rate_on_gpu(jpegs: list[bytes], batch_size: int, repeats: int) -> float:
    inputs = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
    batches = [inputs[i:i + batch_size] for i in range(0, len(inputs), batch_size)]
    decode_jpeg(batches[0], mode=ImageReadMode.RGB, device="cuda")  # nvJPEG handles and buffers
    torch.cuda.synchronize()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            decode_jpeg(batch, mode=ImageReadMode.RGB, device="cuda")
        torch.cuda.synchronize()
        rates.append(len(inputs) / (time.perf_counter() - start))
    return statistics.median(rates)


# ---- the report ------------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def decode_row(
    decoder: str, where: str, workers: int, rate: float, mean_mp: float, train_rate: float | None
) -> dict:
    keeps_up = None if train_rate is None else rate >= train_rate
    return {"decoder": decoder, "where": where, "workers": workers, "images_per_s": rate,
            "megapixels_per_s": rate * mean_mp, "keeps_up": keeps_up}


def measure_cpu(name: str, jpegs: list[bytes], args: argparse.Namespace) -> dict:
    mean_mp = statistics.mean(megapixels(data) for data in jpegs)
    rows = []
    for decoder in DECODERS:
        rate = rate_in_process(decoder, jpegs, args.repeats)
        rows.append(decode_row(decoder, "CPU, 1 process", 0, rate, mean_mp, args.train_rate))
        for workers in args.workers:
            rate = rate_in_pool(decoder, jpegs, workers, args.repeats)
            rows.append(decode_row(decoder, "CPU, worker pool", workers, rate, mean_mp, args.train_rate))
    return {"set": name, "images": len(jpegs), "mean_megapixels": mean_mp, "rows": rows}


def add_gpu_row(image_set: dict, jpegs: list[bytes], args: argparse.Namespace) -> None:
    rate = rate_on_gpu(jpegs, args.gpu_batch, args.repeats)
    image_set["rows"].append(decode_row(f"decode_jpeg batched x{args.gpu_batch}", "GPU (nvJPEG)", 0, rate,
                                        image_set["mean_megapixels"], args.train_rate))


def markdown(result: dict) -> str:
    train_rate = result["train_rate"]
    lines = [
        f"CPU: {result['cpu']} ({result['cpu_cores']} cores); GPU: {result['gpu'] or 'none visible'}; "
        f"torch {result['torch']}, torchvision {result['torchvision']}; median of {result['repeats']} passes",
    ]
    for image_set in result["sets"]:
        keeps = "keeps up (no --train-rate)" if train_rate is None else f"keeps up with {train_rate:g} img/s"
        lines += [
            "",
            f"**{image_set['set']}**: {image_set['images']} images, "
            f"mean {image_set['mean_megapixels']:.2f} MP",
            "",
            f"| decoder | where | workers | images/s | MP/s | {keeps} |",
            "| --- | --- | ---: | ---: | ---: | --- |",
        ]
        for row in image_set["rows"]:
            verdict = "-" if row["keeps_up"] is None else ("yes" if row["keeps_up"] else "no")
            lines.append(f"| {row['decoder']} | {row['where']} | {row['workers'] or '-'} "
                         f"| {row['images_per_s']:.0f} | {row['megapixels_per_s']:.1f} | {verdict} |")
    if result["gpu"] is None:
        lines += ["", "No CUDA device: the GPU row (decode_jpeg device='cuda') is left out; run this on a "
                  "GPU machine for it."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=640, help="long side of the synthetic images")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8], help="pool sizes to measure")
    parser.add_argument("--train-rate", type=float, help="training images/s the decoding must keep up with")
    parser.add_argument("--gpu-batch", type=int, default=32, help="images per decode_jpeg call on the GPU")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--real-photos", action="store_true",
                        help="also the photos shipped with scikit-image and matplotlib")
    parser.add_argument("--out", type=Path, default=Path("docs/bench_results/jpeg_decode.jsonl"),
                        help="JSON lines file the result is appended to")
    args = parser.parse_args(argv)
    for name in ("images", "image_size", "gpu_batch", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.workers) < 1:
        parser.error(f"--workers: pool sizes must be >= 1, got {args.workers}")
    if args.train_rate is not None and args.train_rate <= 0:
        parser.error(f"--train-rate must be > 0, got {args.train_rate}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sets = [(f"synthetic, long side {args.image_size}", synthetic_jpegs(args.images, args.image_size))]
    if args.real_photos:
        sets.append((f"real photos (scikit-image, matplotlib; PNGs as JPEG q{REENCODE_QUALITY})",
                     real_photo_jpegs(args.images)))
    measured = [measure_cpu(name, jpegs, args) for name, jpegs in sets]
    if torch.cuda.is_available():  # after every CPU row, so that no pool forks a process that has used CUDA
        for image_set, (_, jpegs) in zip(measured, sets, strict=True):
            add_gpu_row(image_set, jpegs, args)
    result = {
        "benchmark": "jpeg_decode",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "repeats": args.repeats,
        "train_rate": args.train_rate,
        "sets": measured,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    print(markdown(result))
    append_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
