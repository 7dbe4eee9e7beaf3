"""Synthetic (dead-leaves) image generation against PIL decoding a JPEG of the same size (issue 17).

For each size S the loop alternates, per repeat: generate image ``i`` of the synthetic source at S×S, decode a
quality-90 JPEG of S×S pixels (a scikit-image photograph resized, so its content is photographic), and decode the same
JPEG and bring it to the network input like a photograph (``Preprocessing`` warp to S×S from an ImageNet-sized
500×375 JPEG). Everything runs on one thread, so CPU time (``time.process_time``) is the cost; it is what the
table reports (medians), because the wall time on a shared machine mostly measures the other jobs. Interleaving
keeps conditions (caches, frequency) the same for all three.

    python bench/bench_images.py --sizes 224 512 1024 --repeats 15 --markdown
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import time
from importlib import resources

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from erf_tools.images import Preprocessing, to_rgb  # noqa: E402
from erf_tools.synthetic_images import synthetic_image  # noqa: E402


def jpeg_bytes(width: int, height: int, quality: int = 90) -> bytes:
    """A photograph (scikit-image's astronaut) resized to width×height, encoded as JPEG."""
    with resources.as_file(resources.files("skimage.data") / "astronaut.png") as path, Image.open(path) as image:
        photo = to_rgb(image).resize((width, height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def timed(function) -> float:
    """CPU seconds of one call (one thread: the cost, independent of other jobs sharing the machine)."""
    start = time.process_time()
    function()
    return time.process_time() - start


def bench_size(size: int, repeats: int) -> dict[str, float]:
    same_size = jpeg_bytes(size, size)
    imagenet_like = jpeg_bytes(500, 375)
    preprocess = Preprocessing(size=(size, size))
    synthetic_image(0, 0, size, size)  # warm-up (imports, allocator)
    generate, jpeg, photo_pipeline, synthetic_pipeline = [], [], [], []
    for i in range(repeats):
        generate.append(timed(lambda: synthetic_image(0, i + 1, size, size)))
        jpeg.append(timed(lambda: decode(same_size)))
        photo_pipeline.append(timed(lambda: preprocess(decode(imagenet_like))))
        synthetic_pipeline.append(timed(lambda: preprocess(Image.fromarray(synthetic_image(0, i + 1, size, size)))))
    median = statistics.median
    return {"size": size, "generate_ms": 1e3 * median(generate), "jpeg_ms": 1e3 * median(jpeg),
            "ratio": median(generate) / median(jpeg),
            "synthetic_input_ms": 1e3 * median(synthetic_pipeline), "photo_input_ms": 1e3 * median(photo_pipeline),
            "input_ratio": median(synthetic_pipeline) / median(photo_pipeline)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512, 1024])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"numpy {np.__version__}, torch {torch.__version__}, Pillow {Image.__version__}, 1 thread, "
          f"{platform.machine()}, load average {load:.1f} at start; CPU time, medians of {args.repeats} interleaved "
          "repeats")
    rows = [bench_size(size, args.repeats) for size in args.sizes]
    if args.markdown:
        print("| size | generate (CPU ms) | decode JPEG S×S (CPU ms) | generate / decode | synthetic → input tensor "
              "(CPU ms) | 500×375 JPEG → input tensor (CPU ms) | synthetic / photo input |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['size']}² | {r['generate_ms']:.1f} | {r['jpeg_ms']:.1f} | {r['ratio']:.1f}× | "
                  f"{r['synthetic_input_ms']:.1f} | {r['photo_input_ms']:.1f} | {r['input_ratio']:.1f}× |")
    else:
        for r in rows:
            print(r)


if __name__ == "__main__":
    main()
