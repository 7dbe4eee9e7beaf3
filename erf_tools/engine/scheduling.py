"""Feeding the engine: batches (inputs prepared on loader threads), a background prefetch thread, concurrent workers,
lazy per-shard input streams."""
from __future__ import annotations

import collections
import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from erf_tools.images import ImageSource, Preprocessing, iter_inputs, open_image_source, preprocessing_for
from erf_tools.protocols import ERFOptions

__all__ = ["LazyPreprocess", "Prefetcher", "batches", "compute_batches", "input_stream"]


def batches(stream: Iterator[tuple[str, torch.Tensor]], batch_size: int | Callable[[], int], *,
            loader_threads: int = 1) -> Iterator[tuple[list, torch.Tensor]]:
    """(ids, stacked tensors) of consecutive batches; ``batch_size`` is a size, or a function called for the size of
    each new batch (:class:`~erf_tools.engine.batch_tuning.ThroughputTuner`).

    Lazily prepared items (thunks, see :func:`input_stream`) are evaluated on ``loader_threads`` threads, up to
    ``4 × loader_threads`` items ahead, and taken in stream order, so the batches are those of one thread. Why:
    generating a synthetic image or resizing a photograph to 1024² costs milliseconds of one core, which on an
    accelerator is longer than the ERF pass of the image; the painter, PIL and torch release the GIL for it.
    """
    if not isinstance(loader_threads, int) or loader_threads < 1:
        raise ValueError(f"loader_threads must be a positive integer, got {loader_threads!r}")
    size_of_next = batch_size if callable(batch_size) else (lambda: batch_size)
    with contextlib.ExitStack() as stack:
        prepared = _prepared_in_order(stream, loader_threads, stack) if loader_threads > 1 else (
            (image_id, tensor() if callable(tensor) else tensor) for image_id, tensor in stream)
        ids, tensors = [], []
        wanted = size_of_next()
        for image_id, tensor in prepared:
            ids.append(image_id)
            tensors.append(tensor)
            if len(ids) == wanted:
                yield ids, torch.stack(tensors)
                ids, tensors = [], []
                wanted = size_of_next()
        if ids:
            yield ids, torch.stack(tensors)


def _prepared_in_order(stream: Iterator, threads: int,
                       stack: contextlib.ExitStack) -> Iterator[tuple[str, torch.Tensor]]:
    """(id, tensor) of ``stream`` in order, its thunks evaluated by a pool of ``threads`` (closed with ``stack``:
    items not yet started are cancelled, running ones finish)."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="erf-loader")
    stack.callback(pool.shutdown, wait=True, cancel_futures=True)
    pending: collections.deque = collections.deque()
    for image_id, tensor in stream:
        pending.append((image_id, pool.submit(tensor) if callable(tensor) else tensor))
        if len(pending) >= 4 * threads:
            yield _resolved(pending.popleft())
    while pending:
        yield _resolved(pending.popleft())


def _resolved(item: tuple) -> tuple[str, torch.Tensor]:
    image_id, value = item
    return image_id, value if isinstance(value, torch.Tensor) else value.result()


_END = object()


class Prefetcher:
    """Decodes and preprocesses the next batches in a background thread while the device computes.

    Why: on a GPU the ERF pass of a batch takes milliseconds, less than decoding and bicubically resizing its
    images to 1024×1024 on one CPU core, so without overlap the accelerator waits on PIL. PIL and torch release
    the GIL for that work. On CUDA the batches are also pinned, so the copy to the device can be asynchronous.
    """

    def __init__(self, batches: Iterator, depth: int = 2, pin_memory: bool = False) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._pin = pin_memory
        self._thread = threading.Thread(target=self._run, args=(batches,), daemon=True, name="erf-prefetch")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, batches: Iterator) -> None:
        try:
            for ids, batch in batches:
                if self._pin:
                    batch = batch.pin_memory()
                if not self._put((ids, batch)):
                    return
            self._put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread and re-raised there
            self._put(exc)

    def __iter__(self) -> Iterator[tuple[list, torch.Tensor]]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def compute_batches(engines: list, batch_stream: Iterable, stack: contextlib.ExitStack) -> Iterator:
    """(ids, per-sample maps) of every batch, in order; with several engines (one
    :class:`~erf_tools.engine.engine.ERFEngine` per thread), batches run concurrently in threads.

    Why threads: some models spend most of their time in operators that use a single core whatever the thread
    count (UniConvNet's ``grid_sample``, see ``bench/RESULTS.md``); with one engine (model copy) per thread and the
    intra-op threads shared out, every core works on its own image. Torch operators release the GIL, and the
    autograd engine runs CPU backward passes on the calling thread. Results are yielded in submission order, so
    accumulation, checkpoints and progress are exactly those of the serial loop.
    """
    if len(engines) == 1:
        for ids, batch in batch_stream:
            yield ids, engines[0].process(batch)
        return
    from concurrent.futures import ThreadPoolExecutor

    threads = torch.get_num_threads()
    stack.callback(torch.set_num_threads, threads)
    torch.set_num_threads(max(1, threads // len(engines)))
    free: queue.Queue = queue.Queue()
    for engine in engines:
        free.put(engine)

    def run(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        engine = free.get()
        try:
            return engine.process(batch)
        finally:
            free.put(engine)

    pending: collections.deque = collections.deque()
    with ThreadPoolExecutor(max_workers=len(engines), thread_name_prefix="erf-worker") as pool:
        try:
            for ids, batch in batch_stream:
                pending.append((ids, pool.submit(run, batch)))
                if len(pending) >= len(engines):
                    ids_done, future = pending.popleft()
                    yield ids_done, future.result()
            while pending:
                ids_done, future = pending.popleft()
                yield ids_done, future.result()
        finally:
            for _ids, future in pending:
                future.cancel()


class LazyPreprocess:
    """Stands in for a :class:`Preprocessing` inside :func:`iter_inputs`: returns a thunk instead of a tensor.

    Why: a shard (rank r of w) only needs every w-th image, and a resumed run none of those already done, but which
    images count is decided by decoding (unreadable files are skipped). Decoding stays in order; the expensive part,
    the resize to the input size (1024² bicubic), then runs only for the images this process uses.
    """

    def __init__(self, preprocess: Preprocessing) -> None:
        self.preprocess = preprocess
        self.size = preprocess.size
        self.native_size = preprocess.native_size

    def __call__(self, image) -> Callable[[], torch.Tensor]:
        preprocess = self.preprocess
        return lambda: preprocess(image)

    def defer(self, load: Callable[[], Any]) -> Callable[[], torch.Tensor]:
        """A thunk that also loads the image (``load()``), for sources whose images do not depend on each other."""
        preprocess = self.preprocess
        return lambda: preprocess(load())


def input_stream(images, model, opts: ERFOptions, num_images: int | None, seed: int, shard: tuple[int, int]):
    """A function start -> iterator of (id, tensor or thunk) for this shard, the source description, the
    preprocessing."""
    rank, world = shard
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be an N×3×H×W tensor, got shape {tuple(images.shape)}")
        if not torch.is_floating_point(images):
            raise ValueError(f"images must be a float tensor of preprocessed inputs, got {images.dtype}")
        count = images.shape[0] if num_images is None else min(num_images, images.shape[0])
        indices = list(range(rank, count, world))
        description = {"kind": "tensor", "num_images": len(indices), "input_size": list(images.shape[-2:])}

        def tensor_stream(start: int) -> Iterator:
            return ((f"tensor[{i}]", images[i]) for i in indices[start:])

        return tensor_stream, description, None
    source = images if isinstance(images, ImageSource) else open_image_source(images, num_images=num_images, seed=seed)
    preprocess = preprocessing_for(opts.preprocessing, model, opts.input_size)
    if preprocess is None:
        raise ValueError("preprocessing='none' needs images given as a tensor")
    wanted = num_images if num_images is not None else len(source.ids)

    def source_stream(start: int) -> Iterator:
        stream = iter_inputs(source, LazyPreprocess(preprocess), num_images=wanted)
        shard_items = (item for i, item in enumerate(stream) if i % world == rank)
        return (item for i, item in enumerate(shard_items) if i >= start)

    description = source.describe() | {"num_images": len(range(rank, min(wanted, len(source.ids)), world)),
                                       "input_size": list(preprocess.size)}
    return source_stream, description, preprocess
