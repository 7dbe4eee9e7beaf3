"""Published checkpoints: where each registered model's trained weights are, whether they are on disk, and fetching.

Every family declares its official checkpoints as timm pretrained configs (``default_cfgs``: Hugging Face hub id and
file, or URL, or only the official file name when the release is a Google-Drive / Baidu link that cannot be fetched
by a program). :func:`pretrained_source` reads them into a :class:`PretrainedSource`; :func:`find_cached` looks in
the usual caches (Hugging Face hub cache, torch hub ``checkpoints/``, the same places timm uses); :func:`download`
fetches through ``huggingface_hub`` / ``torch.hub`` with a progress bar. Offline (``HF_HUB_OFFLINE=1`` or
``ERF_TOOLS_OFFLINE=1``, or the host not answering within ``connect_timeout`` seconds) it fails at once with a
:class:`WeightsUnavailableError` naming the file, where it is published and where to put it.
"""
from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

#: Seconds to wait for the download host to answer before declaring the machine offline.
CONNECT_TIMEOUT = 3.0
#: Seconds a stalled download may stay silent before it is abandoned.
READ_TIMEOUT = 30.0
#: Files timm looks for on a Hugging Face repo that names no file, in timm's order.
HF_DEFAULT_FILES = ("model.safetensors", "pytorch_model.bin")
OFFLINE_VARIABLES = ("ERF_TOOLS_OFFLINE", "HF_HUB_OFFLINE")


class WeightsUnavailableError(ValueError):
    """Trained weights were asked for but are neither on disk nor downloadable now (``reason``: why, briefly)."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


@dataclass(frozen=True)
class PretrainedSource:
    """One published checkpoint of a model: its timm tag, file, where it is published and its data config."""

    architecture: str
    tag: str
    filename: str | None
    hf_hub_id: str | None = None
    url: str | None = None
    license: str | None = None
    origin_url: str | None = None
    notes: tuple[str, ...] = ()
    input_size: tuple[int, ...] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    hf_candidates: tuple[str, ...] = field(default=(), repr=False)

    @property
    def name(self) -> str:
        return f"{self.architecture}.{self.tag}"

    @property
    def downloadable(self) -> bool:
        return bool(self.hf_hub_id or self.url)

    @property
    def host(self) -> str | None:
        if self.hf_hub_id:
            return urlparse(_hf_endpoint()).hostname
        return urlparse(self.url).hostname if self.url else None

    def published_at(self) -> str:
        """Where a person can fetch the file by hand."""
        if self.hf_hub_id:
            return f"{_hf_endpoint()}/{self.hf_hub_id}"
        if self.url:
            return self.url
        notes = "; ".join(self.notes)
        return (self.origin_url or "the model's official repository") + (f" ({notes})" if notes else "")

    def cache_path(self) -> Path:
        """Where erf-tools (and timm) look for the file: the torch hub ``checkpoints/`` folder, or for hub files
        the Hugging Face cache folder of the repository."""
        if self.hf_hub_id:
            return Path(hub_cache_dir()) / ("models--" + self.hf_hub_id.replace("/", "--"))
        return torch_checkpoint_dir() / (self.filename or "?")

    def to_dict(self) -> dict:
        return {"name": self.name, "filename": self.filename, "hf_hub_id": self.hf_hub_id, "url": self.url,
                "license": self.license, "published_at": self.published_at()}


def hub_cache_dir() -> str:
    """The Hugging Face hub cache (``HF_HUB_CACHE`` / ``HF_HOME`` are read at call time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def torch_checkpoint_dir() -> Path:
    """torch hub's ``checkpoints`` folder (``TORCH_HOME``), where timm caches URL downloads."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def _hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline_reason() -> str | None:
    """Why downloads are switched off (an environment variable), or None."""
    for variable in OFFLINE_VARIABLES:
        if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{variable} is set"
    return None


# ----------------------------------------------------------------------------------------------------- the configs
def _source_from_cfg(architecture: str, tag: str, cfg) -> PretrainedSource:
    candidates = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HF_DEFAULT_FILES if cfg.hf_hub_id else ()
    # the file that will be fetched: the hub's when there is a hub id (timm prefers the hub), else the URL's
    filename = candidates[0] if candidates else (Path(cfg.file).name if cfg.file else None) or (
        Path(urlparse(cfg.url).path).name if cfg.url else None)
    notes = cfg.notes if isinstance(cfg.notes, (list, tuple)) else ((cfg.notes,) if cfg.notes else ())
    return PretrainedSource(
        architecture=architecture, tag=tag, filename=filename, hf_hub_id=cfg.hf_hub_id or None,
        url=cfg.url or None, license=cfg.license, origin_url=cfg.origin_url, notes=tuple(notes),
        input_size=tuple(cfg.input_size) if cfg.input_size else None, mean=tuple(cfg.mean) if cfg.mean else None,
        std=tuple(cfg.std) if cfg.std else None, crop_pct=cfg.crop_pct, interpolation=cfg.interpolation,
        hf_candidates=tuple(candidates))


def pretrained_sources(model: str) -> list[PretrainedSource]:
    """Every published checkpoint of ``model`` (an architecture name), default tag first."""
    import timm
    import timm.models

    import erf_tools.models  # noqa: F401  (registers the project's families)

    architecture = model.split(".", 1)[0]
    default = timm.models.get_pretrained_cfg(architecture)
    default_tag = getattr(default, "tag", None) if default is not None else None
    sources = []
    for tagged in timm.list_pretrained(f"{architecture}.*"):
        tag = tagged.split(".", 1)[1]
        cfg = timm.models.get_pretrained_cfg(tagged)
        if cfg is not None:
            sources.append(_source_from_cfg(architecture, tag, cfg))
    sources.sort(key=lambda s: s.tag != default_tag)
    return sources


def no_checkpoint_note(model: str) -> str:
    """Why ``model`` has no fetchable or named checkpoint, from its default config (origin and notes)."""
    import timm.models

    import erf_tools.models  # noqa: F401  (registers the project's families)

    architecture = model.split(".", 1)[0]
    cfg = timm.models.get_pretrained_cfg(architecture)
    notes = "; ".join(cfg.notes) if cfg is not None and isinstance(cfg.notes, (list, tuple)) else (
        cfg.notes if cfg is not None and cfg.notes else "")
    origin = cfg.origin_url if cfg is not None and cfg.origin_url else None
    where = f" (official code: {origin}{'; ' + notes if notes else ''})" if origin else (f" ({notes})" if notes else "")
    return f"{architecture} declares no checkpoint with a download address or file name{where}"


def pretrained_source(model: str, tag: str | None = None) -> PretrainedSource:
    """The checkpoint ``model.tag`` (the default tag when ``tag`` is None and ``model`` names none)."""
    architecture, _, named = model.partition(".")
    tag = tag or named or None
    sources = pretrained_sources(architecture)
    if not sources:
        raise WeightsUnavailableError(
            f"{no_checkpoint_note(architecture)}; use --weights PATH for a local file, or --weights active for the "
            "architecture probe")
    if tag is None:
        return sources[0]
    for source in sources:
        if source.tag == tag:
            return source
    raise WeightsUnavailableError(f"{architecture} has no pretrained tag {tag!r}; its tags: "
                                  + ", ".join(s.tag for s in sources))


# ------------------------------------------------------------------------------------------------------ on disk
def find_cached(source: PretrainedSource) -> Path | None:
    """The checkpoint file when it is already on disk (no network access), else None."""
    if source.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in source.hf_candidates or (source.filename,):
            found = try_to_load_from_cache(source.hf_hub_id, filename, cache_dir=hub_cache_dir())
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    names = [source.filename] if source.filename and not source.hf_hub_id else []
    if source.url:  # timm's URL downloads land in torch hub's checkpoints folder under the URL's file name
        names.append(Path(urlparse(source.url).path).name)
    for name in names:
        candidate = torch_checkpoint_dir() / name
        if candidate.is_file():
            return candidate
    return None


# ------------------------------------------------------------------------------------------------------ download
def _resolve_within(host: str, timeout: float) -> str | None:
    """DNS lookup in a daemon thread, so that a dead resolver cannot block longer than ``timeout``; the reason it
    failed, or None."""
    outcome: dict[str, str | None] = {}

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, 443)
            outcome["error"] = None
        except OSError as exc:
            outcome["error"] = f"its name does not resolve: {exc.strerror or exc}"

    thread = threading.Thread(target=lookup, daemon=True, name="erf-dns")
    thread.start()
    thread.join(timeout)
    return outcome.get("error", f"its name did not resolve within {timeout:g} s")


def unreachable_reason(host: str, timeout: float = CONNECT_TIMEOUT) -> str | None:
    """Why ``host`` cannot be reached on port 443 within ``timeout`` seconds (DNS, then TCP), or None if it can."""
    failed = _resolve_within(host, timeout)
    if failed is None:
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                return None
        except OSError as exc:
            failed = f"no connection within {timeout:g} s: {exc.strerror or type(exc).__name__}"
    return f"{host} cannot be reached ({failed}; offline?)"


def unavailable_message(source: PretrainedSource, reason: str) -> str:
    """One paragraph: what is missing, why it cannot be fetched, where it is published and where to put it."""
    file = source.filename or "the checkpoint"
    if source.hf_hub_id:
        put = (f"put it in the Hugging Face cache (on a connected machine: `hf download {source.hf_hub_id} {file}`, "
               f"then copy {source.cache_path()}) or pass --weights /path/to/{file}")
    else:
        put = f"put it at {source.cache_path()} or pass --weights /path/to/{file}"
    return (f"trained weights {source.name} ({file}) are not on disk and cannot be downloaded: {reason}. "
            f"The file is published at {source.published_at()}; download it and {put}.")


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # torch.hub's urllib download has no timeout of its own; this bounds every blocking socket call in it.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def download(source: PretrainedSource, *, progress: bool = True, connect_timeout: float = CONNECT_TIMEOUT,
             read_timeout: float = READ_TIMEOUT) -> Path:
    """Fetch ``source`` into the usual cache (progress bar on stderr) and return the file.

    Fails within about ``connect_timeout`` seconds when offline, with :func:`unavailable_message`.
    """
    if not source.downloadable:
        reason = "it is not published at an address a program can download from"
        raise WeightsUnavailableError(unavailable_message(source, reason), reason)
    reason = offline_reason() or unreachable_reason(source.host, connect_timeout)
    if reason is not None:
        raise WeightsUnavailableError(unavailable_message(source, reason), reason)
    try:
        if source.hf_hub_id:
            return _download_hf(source, progress, connect_timeout)
        return _download_url(source, progress, read_timeout)
    except WeightsUnavailableError:
        raise
    except Exception as exc:  # noqa: BLE001 - hub, HTTP and socket errors vary
        detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        reason = f"the download failed ({detail[:200]})"
        raise WeightsUnavailableError(unavailable_message(source, reason), reason) from exc


def _download_hf(source: PretrainedSource, progress: bool, timeout: float) -> Path:
    from huggingface_hub import hf_hub_download

    last: Exception | None = None
    for filename in source.hf_candidates or (source.filename,):
        try:
            kwargs = {} if progress else {"tqdm_class": _SilentTqdm}
            return Path(hf_hub_download(source.hf_hub_id, filename, cache_dir=hub_cache_dir(),
                                        etag_timeout=timeout, **kwargs))
        except Exception as exc:  # noqa: BLE001 - try timm's next file name
            last = exc
    raise last if last is not None else WeightsUnavailableError(f"{source.name}: no file to download")


def _download_url(source: PretrainedSource, progress: bool, timeout: float) -> Path:
    import torch.hub

    target = torch_checkpoint_dir() / source.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    with _socket_timeout(timeout):
        torch.hub.download_url_to_file(source.url, str(target), progress=progress)
    return target


class _SilentTqdm:
    """A tqdm stand-in without output (``progress=False``)."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def fetch(model: str, tag: str | None = None, *, download_missing: bool = True, progress: bool = True,
          connect_timeout: float = CONNECT_TIMEOUT) -> tuple[PretrainedSource, Path]:
    """The checkpoint of ``model.tag`` on disk: from the cache, else downloaded (unless ``download_missing=False``,
    then :class:`WeightsUnavailableError`). Without a tag, the first published checkpoint already on disk, else the
    first downloadable one (official releases on Google Drive / Baidu cannot be fetched by a program)."""
    if tag is None and "." not in model:
        source, cached = _preferred(model)
    else:
        source = pretrained_source(model, tag)
        cached = find_cached(source)
    if cached is not None:
        return source, cached
    if not download_missing:
        raise WeightsUnavailableError(unavailable_message(source, "downloads were not allowed"),
                                      "downloads were not allowed")
    return source, download(source, progress=progress, connect_timeout=connect_timeout)


def _preferred(model: str) -> tuple[PretrainedSource, Path | None]:
    """Without a tag: the first published checkpoint on disk, else the first downloadable one, else the default."""
    sources = pretrained_sources(model)
    if not sources:
        pretrained_source(model)  # raises: no published checkpoints
    for source in sources:
        cached = find_cached(source)
        if cached is not None:
            return source, cached
    return next((s for s in sources if s.downloadable), sources[0]), None


def checkpoints_on_disk(model: str) -> list[tuple[PretrainedSource, Path]]:
    """(source, file) of every published checkpoint of ``model`` that is already on disk."""
    found = []
    for source in pretrained_sources(model):
        path = find_cached(source)
        if path is not None:
            found.append((source, path))
    return found
