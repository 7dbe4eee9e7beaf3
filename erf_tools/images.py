"""Image sources and per-protocol preprocessing: the first step of the data flow (images -> model -> ERF maps).

Sources:

* a folder: every image file below it (recursive, common formats), in sorted path order; files that cannot be
  decoded are skipped and counted, never silently;
* ``"sample"``: natural photographs shipped inside scikit-image (works offline); beyond the bundled photographs,
  deterministic crops and flips of them (seeded by the image index) supply as many images as asked for;
* ``"noise"``: standard-normal tensors in the normalised input space (the convention of the conformance fixtures and
  of Luo et al.'s random-input experiments);
* ``"synthetic"`` (or ``"synthetic:S"``, ``"synthetic:HxW"``): images of the coloured dead-leaves model
  (:mod:`erf_tools.synthetic_images`), each independent, generated at the size the preprocessing maps onto the input
  without resampling (or at S×S / H×W px, then preprocessed like a photograph); ``"synthetic:tiled"`` (alone or with
  a size, ``"synthetic:512:tiled"``) draws them with the faster tiled sampler (other images of the same model);
* a tensor N×3×H×W of already preprocessed inputs.

Every image has a *source id* (:meth:`ImageSource.source_id`): images with the same one are not independent (the crops
and flips of one photograph), so intervals over images must count :meth:`ImageSource.num_independent` of them.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from erf_tools.synthetic_images import SAMPLERS, DeadLeavesModel, synthetic_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
#: Image sources that are generated or bundled rather than read from a folder.
IMAGE_SOURCE_NAMES = ("sample", "noise", "synthetic")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Photographs bundled with scikit-image (RGB first, then greyscale ones converted to RGB).
SAMPLE_FILES = (
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg",
    "camera.png", "coins.png", "moon.png", "grass.png", "gravel.png", "brick.png",
)


class ImageSourceError(ValueError):
    """An image source is missing, empty, or yields no usable image."""


def source_id_of(kind: str, image_id: str) -> str:
    """The independent source image of an image id of a source of this ``kind`` (``ImageSource.kind``, or
    ``"tensor"``): crops and flips of a bundled photograph share the photograph's id, every other image is its own."""
    if kind == "sample" and image_id.startswith("skimage:"):
        return image_id.split("#", 1)[0]
    return image_id


def count_independent(kind: str, image_ids) -> int:
    """How many independent source images the image ids of a source of this ``kind`` come from."""
    return len({source_id_of(kind, image_id) for image_id in image_ids})


@dataclass(frozen=True)
class Preprocessing:
    """How a decoded image becomes a network input; recorded in every result.

    resize: ``warp`` (resize to exactly size×size, aspect ratio not kept; RepLKNet) or ``resize_crop`` (resize the
    shorter side to size/crop_pct, then centre-crop size×size; timm eval transform).
    """

    size: tuple[int, int]
    resize: str = "warp"
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __call__(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        from torchvision.transforms import functional as TF
        from torchvision.transforms import InterpolationMode

        if isinstance(image, np.ndarray):
            if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8 and \
                    tuple(image.shape[:2]) == tuple(self.native_size()):
                # no resampling to do (a synthetic image made at the native size): normalise the array directly and
                # crop the tensor, the same numbers as the PIL path without its three copies of the image
                tensor = normalised_tensor(image, self.mean, self.std)
                return tensor if self.resize == "warp" else TF.center_crop(tensor, list(self.size)).contiguous()
            image = Image.fromarray(np.asarray(image))
        mode = InterpolationMode(self.interpolation)
        image = to_rgb(image)
        if self.resize == "warp":
            image = TF.resize(image, list(self.size), interpolation=mode)
        else:
            scaled = [int(s / self.crop_pct) for s in self.size]
            image = TF.resize(image, min(scaled) if self.size[0] == self.size[1] else scaled, interpolation=mode)
            image = TF.center_crop(image, list(self.size))
        return normalised_tensor(image, self.mean, self.std)

    def native_size(self) -> tuple[int, int]:
        """The (height, width) of an image that this preprocessing maps onto the input without resampling."""
        if self.resize == "warp":
            return tuple(self.size)
        return tuple(int(s / self.crop_pct) for s in self.size)


def normalised_tensor(image: Image.Image | np.ndarray, mean: tuple[float, ...],
                      std: tuple[float, ...]) -> torch.Tensor:
    """An RGB image (PIL, or a uint8 H×W×3 array) as a float32 3×H×W tensor (value / 255 − mean) / std, in one
    buffer.

    The same operations as torchvision's ``to_tensor`` then ``normalize``, so the same numbers bit for bit; those
    allocate four full-size tensors, and at 1024² (12 MB each) the page faults of fresh buffers cost about as much
    as the arithmetic, more so with several loader threads."""
    array = np.asarray(image, dtype=np.uint8)
    with warnings.catch_warnings():  # PIL's array is read-only; it is only read here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        pixels = torch.from_numpy(array)
    if pixels.dim() != 3 or pixels.shape[2] != len(mean) or len(std) != len(mean):
        raise ValueError(f"expected an H×W×{len(mean)} image, got shape {tuple(pixels.shape)}")
    out = torch.empty((pixels.shape[2], pixels.shape[0], pixels.shape[1]), dtype=torch.float32)
    out.copy_(pixels.permute(2, 0, 1))
    out.div_(255)
    mean_t = torch.as_tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.as_tensor(std, dtype=torch.float32)[:, None, None]
    if not torch.all(std_t != 0):
        raise ValueError(f"std must not contain zeros, got {tuple(std)}")
    return out.sub_(mean_t).div_(std_t)


def to_rgb(image: Image.Image) -> Image.Image:
    """Greyscale, palette, RGBA (composited on black) and 16-bit images as 8-bit RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        high = array.max() if array.size else 0.0
        scale = 255.0 / (65535.0 if high > 255 else max(high, 1.0) if image.mode == "F" else 255.0)
        image = Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8))
    if image.mode == "RGBA" or image.mode == "LA" or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


class PreprocessingWarning(UserWarning):
    """The protocol preprocesses images differently from how the model's weights were trained."""


def model_data_config(model: torch.nn.Module | None) -> dict[str, Any]:
    """The model's own data config (timm ``pretrained_cfg``: input size, mean/std, interpolation, crop)."""
    import timm.data

    return timm.data.resolve_data_config({}, model=model) if model is not None else {}


def preprocessing_for(rule: str, model: torch.nn.Module | None, input_size: int | None) -> Preprocessing | None:
    """The preprocessing of a protocol: ``replknet`` warp, ``timm`` data config of ``model``, ``model`` (the
    ``replknet`` warp to the protocol's size with the model's own mean/std and interpolation), or ``none``."""
    if rule == "none":
        return None
    if rule in ("replknet", "model"):
        size = input_size or 1024
        if rule == "replknet":
            return Preprocessing(size=(size, size), resize="warp", interpolation="bicubic")
        config = model_data_config(model)
        return Preprocessing(size=(size, size), resize="warp",
                             interpolation=str(config.get("interpolation", "bicubic")),
                             mean=tuple(config.get("mean", IMAGENET_MEAN)), std=tuple(config.get("std", IMAGENET_STD)))
    config = model_data_config(model)
    native = tuple(config.get("input_size", (3, 224, 224))[1:])
    size = (input_size, input_size) if input_size else native
    return Preprocessing(
        size=size,
        resize="resize_crop",
        crop_pct=float(config.get("crop_pct", 0.875)) if size == native else 1.0,
        interpolation=str(config.get("interpolation", "bicubic")),
        mean=tuple(config.get("mean", IMAGENET_MEAN)),
        std=tuple(config.get("std", IMAGENET_STD)),
    )


def preprocessing_mismatch(preprocess: Preprocessing | None, model: torch.nn.Module | None) -> list[str]:
    """How ``preprocess`` differs from the model's own data config: normalisation and interpolation (one phrase
    each; empty when they agree). The resize geometry is the protocol's choice and is not compared."""
    if preprocess is None or model is None:
        return []
    config = model_data_config(model)
    differences = []

    def rounded(values) -> tuple[float, ...]:
        return tuple(round(float(v), 4) for v in values)

    for name in ("mean", "std"):
        theirs = config.get(name)
        if theirs is not None and rounded(theirs) != rounded(getattr(preprocess, name)):
            differences.append(f"{name} {rounded(getattr(preprocess, name))} instead of the model's {rounded(theirs)}")
    interpolation = config.get("interpolation")
    if interpolation and str(interpolation) != preprocess.interpolation:
        differences.append(f"{preprocess.interpolation} resizing instead of the model's {interpolation}")
    return differences


def warn_preprocessing_mismatch(rule: str, preprocess: Preprocessing | None, model: torch.nn.Module | None,
                                model_name: str = "the model") -> list[str]:
    """Warn (:class:`PreprocessingWarning`) when the protocol's preprocessing differs from the model's data config
    (only meaningful for trained weights); return the differences."""
    differences = preprocessing_mismatch(preprocess, model)
    if differences and rule != "timm":
        warnings.warn(
            f"the {rule!r} preprocessing feeds {model_name} images with {'; '.join(differences)} (its trained "
            "weights expect the model's own data config): pass preprocessing='model' (CLI --option "
            "preprocessing=model) to keep the protocol's resize with the model's normalisation",
            PreprocessingWarning, stacklevel=2)
    return differences


#: What each kind of source is, for the result's record (``describe()["description"]``).
SOURCE_DESCRIPTIONS = {
    "folder": "image files of a folder; each file counts as one independent image",
    "sample": (f"the {len(SAMPLE_FILES)} photographs bundled with scikit-image ({', '.join(SAMPLE_FILES)}; the last "
               f"six greyscale or texture patches); images {len(SAMPLE_FILES)} and up are seeded crops (50-100 % of "
               "each side) and flips of the same photographs, so at most "
               f"{len(SAMPLE_FILES)} of them are independent"),
    "noise": "standard-normal inputs in the normalised input space; each independent",
    "synthetic": ("coloured, shaded dead-leaves images (occluding discs, radii ∝ r^-3, 1/f² power spectrum, colours "
                  "from a Gaussian fit to photograph pixels); each independent, seeded by (seed, index)"),
}


@dataclass
class ImageSource:
    """A named, ordered set of images. ``skipped`` collects (id, reason) of files that could not be decoded.

    image_size: for ``synthetic`` sources, the (height, width) to generate; None = the preprocessing's
    :meth:`Preprocessing.native_size` (no resampling). model: the synthetic image model.
    """

    kind: str
    ids: list[str]
    root: str | None = None
    seed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    image_size: tuple[int, int] | None = None
    model: DeadLeavesModel | None = None

    def describe(self) -> dict[str, Any]:
        # ``skipped`` is the live list, so a description taken before reading still reports every skipped file.
        description = {"kind": self.kind, "root": self.root, "seed": self.seed, "candidates": len(self.ids),
                       "independent_candidates": self.num_independent(),
                       "description": SOURCE_DESCRIPTIONS.get(self.kind, self.kind), "skipped": self.skipped}
        if self.kind == "synthetic":
            description |= {"image_size": list(self.image_size) if self.image_size else "input",
                            "model": (self.model or DeadLeavesModel()).to_dict()}
        return description

    def source_id(self, index: int) -> str:
        """The independent source image of image ``index``: equal ids mean the same photograph (crops, flips)."""
        if not 0 <= index < len(self.ids):
            raise IndexError(f"image index {index} out of range for {len(self.ids)} images")
        if self.kind == "sample":
            return f"skimage:{SAMPLE_FILES[index % len(SAMPLE_FILES)]}"
        return self.ids[index]

    def source_id_of(self, image_id: str) -> str:
        """The source id of an image id of this source (what the engine records in ``ERFResult.image_ids``)."""
        return source_id_of(self.kind, image_id)

    def count_independent(self, image_ids) -> int:
        """How many independent source images the given image ids come from (e.g. a result's ``image_ids``)."""
        return count_independent(self.kind, image_ids)

    def num_independent(self, n: int | None = None) -> int:
        """How many independent source images the first ``n`` images (default: all) come from."""
        count = len(self.ids) if n is None else n
        if count < 0:
            raise ValueError(f"the number of images must be non-negative, got {count}")
        count = min(count, len(self.ids))
        return len({self.source_id(i) for i in range(count)})

    def load(self, index: int, size: tuple[int, int] | None = None) -> Image.Image:
        """Image ``index`` as a PIL image; ``size`` (height, width) is the size synthetic sources generate at
        when they have no ``image_size`` of their own."""
        if self.kind == "folder":
            with Image.open(Path(self.root) / self.ids[index]) as image:
                image.load()
                return image.copy()
        if self.kind == "sample":
            return _sample_image(index, self.seed)
        if self.kind == "synthetic":
            return Image.fromarray(self.synthetic_array(index, size))
        raise TypeError(f"{self.kind} sources yield tensors, not images")

    def synthetic_array(self, index: int, size: tuple[int, int] | None = None) -> np.ndarray:
        """Synthetic image ``index`` as an RGB uint8 H×W×3 array (:meth:`load` without the PIL copy)."""
        if self.kind != "synthetic":
            raise TypeError(f"{self.kind} sources are not synthetic")
        height, width = self.image_size or size or (None, None)
        if height is None:
            raise ImageSourceError("synthetic images need a size: give image_size or a preprocessing rule")
        return synthetic_image(self.seed, index, height, width, self.model)


#: Images of a generative source (``noise``, ``synthetic``) when no count is given.
DEFAULT_GENERATED_IMAGES = 16


def open_image_source(spec: str | Path, *, num_images: int | None = None, seed: int = 0,
                      model: DeadLeavesModel | None = None) -> ImageSource:
    """``"sample"``, ``"noise"``, ``"synthetic"`` or a folder path as an :class:`ImageSource`. ``"synthetic"`` takes
    options after colons, in any order: a size (``"synthetic:S"``, ``"synthetic:HxW"``: generated at that size) and a
    sampler (``"synthetic:tiled"``); ``model`` overrides the synthetic image model's defaults (a sampler named in the
    spec replaces the model's)."""
    if str(spec) == "synthetic" or str(spec).startswith("synthetic:"):
        count = num_images if num_images is not None else DEFAULT_GENERATED_IMAGES
        size, sampler = _synthetic_options(str(spec))
        model = model or DeadLeavesModel()
        if sampler is not None:
            model = dataclasses.replace(model, sampler=sampler)
        return ImageSource("synthetic", [f"synthetic[{seed}:{i}]" for i in range(count)], seed=seed,
                           image_size=size, model=model)
    if str(spec) == "sample":
        count = num_images if num_images is not None else len(SAMPLE_FILES)
        return ImageSource("sample", [_sample_id(i) for i in range(count)], seed=seed)
    if str(spec) == "noise":
        count = num_images if num_images is not None else DEFAULT_GENERATED_IMAGES
        return ImageSource("noise", [f"noise[{seed}:{i}]" for i in range(count)], seed=seed)
    root = Path(spec)
    if not root.exists():
        raise ImageSourceError(f"image folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise ImageSourceError(
            f"{str(root)!r} is not a folder (give a folder of images, 'sample', 'synthetic' or 'noise')"
        )
    files = sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise ImageSourceError(
            f"image folder {str(root)!r} contains no image files ({', '.join(IMAGE_EXTENSIONS)})"
        )
    return ImageSource("folder", files, root=str(root), seed=seed)


def iter_inputs(
    source: ImageSource, preprocess: Preprocessing | None, *, num_images: int | None = None, start: int = 0
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (id, 3×H×W tensor) for up to ``num_images`` decodable images, skipping the first ``start`` valid ones."""
    wanted = num_images if num_images is not None else len(source.ids)
    produced = 0
    if source.kind == "noise":
        if preprocess is None:
            raise ImageSourceError("noise images need an input size: give input_size or a preprocessing rule")
        for index in range(start, wanted):
            generator = torch.Generator().manual_seed(source.seed * 1_000_003 + index)
            yield source.ids[index], torch.randn((3, *preprocess.size), generator=generator)
        return
    if source.kind == "synthetic":
        # Every index is an image (nothing to skip), so a resumed or sharded stream starts at ``start`` directly.
        native_size = getattr(preprocess, "native_size", None)
        size = native_size() if native_size is not None else None
        # A deferring preprocessing (the engine's lazy one) also defers the generation, so that it can run on loader
        # threads with the resize: nothing about a synthetic image depends on what came before it.
        defer = getattr(preprocess, "defer", None)
        for index in range(start, min(wanted, len(source.ids))):
            if defer is not None:
                yield source.ids[index], defer(functools.partial(source.synthetic_array, index, size))
                continue
            # a Preprocessing takes the array as it is (no PIL copies); anything else gets the PIL image
            image = (source.synthetic_array(index, size) if isinstance(preprocess, Preprocessing)
                     else source.load(index, size))
            yield source.ids[index], (preprocess(image) if preprocess is not None
                                      else torch.from_numpy(np.asarray(image)))
        return
    for index, image_id in enumerate(source.ids):
        if produced >= wanted:
            break
        try:
            image = source.load(index)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            source.skipped.append((image_id, reason))
            warnings.warn(f"skipped {image_id!r}: not a readable image ({reason})", stacklevel=2)
            continue
        produced += 1
        if produced <= start:
            continue
        yield image_id, preprocess(image) if preprocess is not None else torch.from_numpy(np.asarray(image))
    if produced == 0:
        raise ImageSourceError(
            f"no readable image in {source.root or source.kind!r}: all {len(source.skipped)} files were skipped"
        )


def _synthetic_options(spec: str) -> tuple[tuple[int, int] | None, str | None]:
    """The (size, sampler) of ``synthetic[:OPTION[:OPTION]]``: OPTION a size, ``S`` -> (S, S) or ``HxW`` -> (H, W),
    or a sampler name; what is not given is None (the input's size, the model's sampler)."""
    size: tuple[int, int] | None = None
    sampler: str | None = None
    for option in spec.split(":")[1:]:
        name = option.strip().lower()
        if name in SAMPLERS:
            if sampler is not None:
                raise ImageSourceError(f"{spec!r} names two samplers: give one of {', '.join(SAMPLERS)}")
            sampler = name
            continue
        parts = name.split("x")
        try:
            dims = tuple(int(p) for p in parts)
        except ValueError:
            dims = ()
        if len(dims) not in (1, 2) or min(dims) < 1:
            raise ImageSourceError(f"bad synthetic image option {option!r} in {spec!r}: give a size (synthetic:S or "
                                   f"synthetic:HxW, pixels) and/or a sampler ({', '.join(SAMPLERS)})")
        if size is not None:
            raise ImageSourceError(f"{spec!r} gives two sizes: give one (synthetic:S or synthetic:HxW)")
        size = (dims[0], dims[-1])
    return size, sampler


def _sample_id(index: int) -> str:
    base = SAMPLE_FILES[index % len(SAMPLE_FILES)]
    return f"skimage:{base}" if index < len(SAMPLE_FILES) else f"skimage:{base}#crop{index}"


def _sample_image(index: int, seed: int) -> Image.Image:
    name = SAMPLE_FILES[index % len(SAMPLE_FILES)]
    with resources.as_file(resources.files("skimage.data") / name) as path, Image.open(path) as image:
        image = to_rgb(image)
    if index < len(SAMPLE_FILES):
        return image
    # Deterministic augmentation: a crop of 50-100 % of each side at a seeded position, flipped half the time.
    rng = np.random.default_rng([seed, index])
    width, height = image.size
    side = rng.uniform(0.5, 1.0)
    crop_w, crop_h = max(16, int(width * side)), max(16, int(height * side))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    image = image.crop((left, top, left + crop_w, top + crop_h))
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image
