"""Synthetic (dead-leaves) image generation against PIL decoding a JPEG of the same size (issue 17).

For each size S the loop alternates, per repeat: generate image ``i`` of the synthetic source at S×S with the NumPy
reference painter and with the compiled one (the same image, bit for bit; checked on every repeat) and with the tiled
sampler (``DeadLeavesModel(sampler="tiled")``: the same model, other images), decode a
quality-90 JPEG of S×S pixels (a scikit-image photograph resized, so its content is photographic) and a quality-90
JPEG of a generated S×S image (the same size and content as what is generated), and decode the same
JPEG and bring it to the network input like a photograph (``Preprocessing`` warp to S×S from an ImageNet-sized
500×375 JPEG) against the compiled synthetic image brought to the input (its array, as the engine passes it).
Everything runs on one thread, so CPU time (``time.process_time``) is the cost; it is what the table reports
(medians), because the wall time on a shared machine mostly measures the other jobs. Interleaving keeps conditions (caches, frequency) the same for all.

``--profile S`` then runs cProfile over compiled generations at S×S and prints where the time goes.

    python bench/bench_images.py --sizes 224 512 1024 --repeats 15 --markdown --profile 1024
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import statistics
import time
from importlib import resources

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from erf_tools.images import Preprocessing, to_rgb  # noqa: E402
from erf_tools.synthetic_images import (  # noqa: E402
    DeadLeavesModel,
    compiled_painter_available,
    generator_backend,
    synthetic_image,
)


def jpeg_bytes(width: int, height: int, quality: int = 90) -> bytes:
    """A photograph (scikit-image's astronaut) resized to width×height, encoded as JPEG."""
    with resources.as_file(resources.files("skimage.data") / "astronaut.png") as path, Image.open(path) as image:
        photo = to_rgb(image).resize((width, height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def array_jpeg_bytes(image: np.ndarray, quality: int = 90) -> bytes:
    """An RGB array encoded as JPEG."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
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


TILED = DeadLeavesModel(sampler="tiled")


def generate(backend: str, index: int, size: int) -> np.ndarray:
    """Image ``index`` at size×size: the front-to-back sampler's painter ``reference`` (NumPy) or ``compiled``, or
    the ``tiled`` sampler (other images of the same model)."""
    if backend == "tiled":
        return synthetic_image(0, index, size, size, TILED)
    with generator_backend.use(backend):
        return synthetic_image(0, index, size, size)


def bench_size(size: int, repeats: int) -> dict[str, float]:
    same_size = jpeg_bytes(size, size)
    # The generated picture itself as a JPEG: the same size and detail at every scale, as a photograph taken at that
    # resolution has (the resized photograph above has nothing finer than its native 512 px, so its JPEG is sparser
    # and decodes faster at 1024 px).
    same_content = array_jpeg_bytes(generate("tiled", 0, size))
    imagenet_like = jpeg_bytes(500, 375)
    preprocess = Preprocessing(size=(size, size))
    for backend in ("reference", "compiled", "tiled"):
        generate(backend, 0, size)  # warm-up (imports, allocator, extension)
    times: dict[str, list[float]] = {k: [] for k in ("reference", "compiled", "tiled", "jpeg", "jpeg_content", "photo",
                                                     "synthetic", "tiled_input")}
    for i in range(repeats):
        images = {}
        for backend in ("reference", "compiled", "tiled"):
            start = time.process_time()
            images[backend] = generate(backend, i + 1, size)
            times[backend].append(time.process_time() - start)
        if not np.array_equal(images["reference"], images["compiled"]):
            raise AssertionError(f"the compiled painter differs from NumPy at {size} px, image {i + 1}")
        times["jpeg"].append(timed(lambda: decode(same_size)))
        times["jpeg_content"].append(timed(lambda: decode(same_content)))
        times["photo"].append(timed(lambda: preprocess(decode(imagenet_like))))
        times["synthetic"].append(timed(lambda: preprocess(generate("compiled", i + 1, size))))  # as the engine does
        times["tiled_input"].append(timed(lambda: preprocess(generate("tiled", i + 1, size))))
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return {"size": size, "reference_ms": ms["reference"], "compiled_ms": ms["compiled"], "tiled_ms": ms["tiled"],
            "jpeg_ms": ms["jpeg"], "jpeg_content_ms": ms["jpeg_content"], "jpeg_content_kb": len(same_content) / 1e3,
            "jpeg_kb": len(same_size) / 1e3, "tiled_content_ratio": ms["tiled"] / ms["jpeg_content"],
            "reference_ratio": ms["reference"] / ms["jpeg"],
            "compiled_ratio": ms["compiled"] / ms["jpeg"], "tiled_ratio": ms["tiled"] / ms["jpeg"],
            "speedup": ms["reference"] / ms["compiled"], "tiled_speedup": ms["compiled"] / ms["tiled"],
            "synthetic_input_ms": ms["synthetic"], "tiled_input_ms": ms["tiled_input"],
            "photo_input_ms": ms["photo"], "input_ratio": ms["synthetic"] / ms["photo"],
            "tiled_input_ratio": ms["tiled_input"] / ms["photo"]}


def profile(size: int, count: int = 20, top: int = 16) -> None:
    """cProfile of ``count`` compiled generations at size×size: the functions with the most own time."""
    generate("compiled", 0, size)
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(count):
        generate("compiled", i + 1, size)
    profiler.disable()
    print(f"\nProfile: {count} compiled generations at {size}×{size} (own time per call of synthetic_image)\n")
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, primitive calls, own, cumulative, callers)
    rows = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
    total = sum(value[2] for value in stats.values())
    print("| function | own CPU ms per image | share |")
    print("|---|---|---|")
    for (file, line, name), (_, _, own, _, _) in rows:
        where = name if file == "~" else f"{name} ({os.path.basename(file)}:{line})"
        print(f"| `{where}` | {1e3 * own / count:.2f} | {100 * own / total:.0f} % |")
    print(f"| all | {1e3 * total / count:.2f} | 100 % |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512, 1024])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--profile", type=int, metavar="S", help="then profile compiled generation at S×S")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not compiled_painter_available():
        raise SystemExit("the compiled dead-leaves painter cannot be built here")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"numpy {np.__version__}, torch {torch.__version__}, Pillow {Image.__version__}, 1 thread, "
          f"{platform.machine()}, load average {load:.1f} at start; CPU time, medians of {args.repeats} interleaved "
          "repeats")
    rows = [bench_size(size, args.repeats) for size in args.sizes]
    if args.markdown:
        print("| size | NumPy (CPU ms) | compiled (CPU ms) | tiled (CPU ms) | decode JPEG S×S (CPU ms) | "
              "decode JPEG of a generated image (CPU ms) | compiled / decode | tiled / decode | tiled / decode of a "
              "generated image | compiled / tiled | compiled → input (CPU ms) | tiled → input "
              "(CPU ms) | 500×375 JPEG → input (CPU ms) | compiled / photo input | tiled / photo input |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['size']}² | {r['reference_ms']:.1f} | {r['compiled_ms']:.2f} | {r['tiled_ms']:.2f} | "
                  f"{r['jpeg_ms']:.2f} ({r['jpeg_kb']:.0f} KB) | "
                  f"{r['jpeg_content_ms']:.2f} ({r['jpeg_content_kb']:.0f} KB) | {r['compiled_ratio']:.1f}× | {r['tiled_ratio']:.2f}× | {r['tiled_content_ratio']:.2f}× | "
                  f"{r['tiled_speedup']:.1f}× | {r['synthetic_input_ms']:.1f} | {r['tiled_input_ms']:.1f} | "
                  f"{r['photo_input_ms']:.1f} | {r['input_ratio']:.1f}× | {r['tiled_input_ratio']:.2f}× |")
    else:
        for r in rows:
            print(r)
    if args.profile:
        profile(args.profile)


if __name__ == "__main__":
    main()
