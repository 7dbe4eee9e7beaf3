"""Preparing network inputs on loader threads (``measure_erf(..., loader_threads=k)``) against one thread.

For each source and size the loop alternates, per repeat, the engine's input pipeline alone (the image stream with
lazy preprocessing, then ``batches`` in batches of 8) with 1 and with each ``--threads`` count, and checks that every
count gives the same tensors. Sources: ``synthetic`` (dead-leaves images generated at S×S, normalised) and a folder
of quality-90 500×375 JPEGs made from scikit-image's colour photographs (decoded in order, bicubic-warped to S×S and
normalised on the loader threads). Wall time per image (medians); this is what an accelerator waiting for inputs
sees. Torch runs one intra-op thread per loader thread. A second table times the last step alone, an RGB image to a
normalised tensor, as torchvision's ``to_tensor`` + ``normalize`` and as :func:`erf_tools.images.normalised_tensor`
(one buffer, the same numbers), alternating.

    python bench/bench_input_pipeline.py --sizes 512 1024 --images 24 --repeats 3 --threads 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from importlib import resources
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from erf_tools.engine.scheduling import LazyPreprocess, batches  # noqa: E402
from erf_tools.images import (IMAGENET_MEAN, IMAGENET_STD, Preprocessing, iter_inputs, normalised_tensor,  # noqa: E402
                              open_image_source, to_rgb)

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")


def jpeg_folder(root: Path, count: int) -> Path:
    """``count`` ImageNet-sized (500×375) quality-90 JPEGs cycling through scikit-image's colour photographs."""
    for index in range(count):
        name = PHOTOS[index % len(PHOTOS)]
        with resources.as_file(resources.files("skimage.data") / name) as path, Image.open(path) as image:
            photo = to_rgb(image).resize((500, 375), Image.Resampling.BICUBIC)
        photo.save(root / f"{index:04d}.jpg", "JPEG", quality=90)
    return root


def pipeline(source, size: int, count: int, threads: int) -> tuple[float, torch.Tensor]:
    """(wall seconds, all input tensors) of preparing ``count`` inputs of size×size with ``threads`` threads."""
    preprocess = LazyPreprocess(Preprocessing(size=(size, size)))
    start = time.perf_counter()
    out = [batch for _, batch in batches(iter_inputs(source, preprocess, num_images=count), 8,
                                         loader_threads=threads)]
    return time.perf_counter() - start, torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[os.cpu_count() or 1])
    args = parser.parse_args()
    torch.set_num_threads(1)
    counts = [1] + [t for t in args.threads if t > 1]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{os.cpu_count()} CPUs, load average {load:.1f} at start; wall ms per image, medians of {args.repeats} "
          f"interleaved repeats of {args.images} images\n")
    header = " | ".join(f"{t} thread{'s' if t > 1 else ''}" for t in counts)
    print(f"| source | size | {header} | speed-up |")
    print("|---|---|" + "---|" * len(counts) + "---|")
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"synthetic": open_image_source("synthetic", num_images=args.images, seed=0),
                   "500×375 JPEG": open_image_source(str(jpeg_folder(Path(tmp), args.images)))}
        for name, source in sources.items():
            for size in args.sizes:
                pipeline(source, size, 2, 1)  # warm-up (extension build, allocator)
                times: dict[int, list[float]] = {t: [] for t in counts}
                for _ in range(args.repeats):
                    reference = None
                    for threads in counts:
                        seconds, tensors = pipeline(source, size, args.images, threads)
                        times[threads].append(seconds)
                        if reference is None:
                            reference = tensors
                        elif not torch.equal(reference, tensors):
                            raise AssertionError(f"{threads} loader threads changed the inputs ({name}, {size})")
                ms = {t: 1e3 * statistics.median(v) / args.images for t, v in times.items()}
                cells = " | ".join(f"{ms[t]:.1f}" for t in counts)
                print(f"| {name} | {size}² | {cells} | {ms[1] / ms[counts[-1]]:.2f}× |")
    normalisation_table(args.sizes)


def normalisation_table(sizes: list[int], repeats: int = 20) -> None:
    """CPU ms of an RGB image to a normalised tensor: torchvision's two steps against :func:`normalised_tensor`."""
    from torchvision.transforms import functional as TF

    print("\n| size | to_tensor + normalize (ms) | normalised_tensor (ms) | ratio |")
    print("|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for size in sizes:
        image = Image.fromarray(torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=generator).numpy())
        times: dict[str, list[float]] = {"torchvision": [], "ours": []}
        for _ in range(repeats):
            for name, convert in (("torchvision", lambda: TF.normalize(TF.to_tensor(image), list(IMAGENET_MEAN),
                                                                       list(IMAGENET_STD))),
                                  ("ours", lambda: normalised_tensor(image, IMAGENET_MEAN, IMAGENET_STD))):
                start = time.process_time()
                convert()
                times[name].append(time.process_time() - start)
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        print(f"| {size}² | {ms['torchvision']:.2f} | {ms['ours']:.2f} | {ms['torchvision'] / ms['ours']:.2f}× |")


if __name__ == "__main__":
    main()
