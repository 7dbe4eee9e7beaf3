"""Published checkpoints: cache lookup, downloads (monkeypatched), offline failure within seconds, the default
weights decision, weight labels and the ``erf models`` on-disk column. Nothing here touches the network."""
from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from erf_tools import catalogue, pretrained, runs
from erf_tools.pretrained import WeightsUnavailableError, fetch, find_cached, pretrained_source
from erf_tools.weights import load_model
from erf_tools.weights_choice import default_weights, weights_label


def fake_hub_file(repo_id: str, filename: str, write) -> Path:
    """Put ``filename`` of ``repo_id`` into the Hugging Face cache layout (refs/main -> snapshots/<rev>/file)."""
    root = Path(pretrained.hub_cache_dir()) / ("models--" + repo_id.replace("/", "--"))
    revision = "0" * 40
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    path = root / "snapshots" / revision / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path)
    return path


def test_resnet_state(seed: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model, _ = load_model("test_resnet", "active", seed=seed)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


test_resnet_state.__test__ = False  # a helper, not a test


@pytest.fixture
def online(monkeypatch):
    """Downloads allowed and every host 'reachable' (the download functions themselves are monkeypatched)."""
    monkeypatch.delenv("ERF_TOOLS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(pretrained, "unreachable_reason", lambda host, timeout=0: None)


@pytest.fixture
def no_network(monkeypatch):
    """Downloads allowed by the environment, but DNS and connections hang (a dead network)."""
    monkeypatch.delenv("ERF_TOOLS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def hang(*args, **kwargs):
        time.sleep(30)
        raise OSError("unreachable")

    monkeypatch.setattr(socket, "getaddrinfo", hang)
    monkeypatch.setattr(socket, "create_connection", hang)
    monkeypatch.setattr(socket.socket, "connect", hang)


def test_families_declare_their_official_checkpoints():
    uniconvnet = pretrained_source("uniconvnet_t")
    assert (uniconvnet.tag, uniconvnet.filename, uniconvnet.hf_hub_id) == (
        "in1k", "uniconvnet_t_1k_224_ema.pth", "ai-modelwithcode/UniConvNet")
    assert pretrained_source("uniconvnet_xl", "in22k").filename == "uniconvnet_xl_22k_224.pth"
    mm = pretrained_source("replknet_31b", "mmpretrain_in1k")
    assert mm.url.endswith("replknet-31B_3rdparty_in1k_20221118-fd08e268.pth") and mm.downloadable
    official = pretrained_source("replknet_31b", "in1k")
    assert official.filename == "RepLKNet-31B_ImageNet-1K_224.pth" and not official.downloadable
    xl = pretrained_source("replknet_xl")
    assert xl.mean == (0.5, 0.5, 0.5)
    with pytest.raises(WeightsUnavailableError, match="no pretrained tag 'nope'; its tags: in1k"):
        pretrained_source("uniconvnet_t", "nope")
    with pytest.raises(WeightsUnavailableError, match="no checkpoint with a download address.*ParC-Net"):
        pretrained_source("parc_convnext_xt")


def test_offline_pretrained_fails_at_once_with_file_origin_and_destination():
    started = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as caught:
        load_model("uniconvnet_t", "pretrained")
    assert time.perf_counter() - started < 5
    message = str(caught.value)
    assert "uniconvnet_t_1k_224_ema.pth" in message and "ERF_TOOLS_OFFLINE is set" in message
    assert "https://huggingface.co/ai-modelwithcode/UniConvNet" in message
    assert pretrained.hub_cache_dir() in message and "--weights /path/to/uniconvnet_t_1k_224_ema.pth" in message


def test_a_dead_network_fails_within_the_connect_timeout(no_network):
    source = pretrained_source("uniconvnet_t")
    started = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match=r"huggingface.co cannot be reached \(its name did not "
                                                      r"resolve within 0.3 s; offline\?\)"):
        pretrained.download(source, connect_timeout=0.3)
    assert time.perf_counter() - started < 2.0  # DNS and connect both hang: bounded, never stuck
    started = time.perf_counter()
    decision = default_weights("uniconvnet_t", connect_timeout=0.3)
    assert decision.weights == "active" and time.perf_counter() - started < 2.0
    assert "cannot be reached" in decision.sentence and "architecture probe" in decision.sentence


def test_a_refused_connection_is_reported(monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [])

    def refuse(*args, **kwargs):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    assert pretrained.unreachable_reason("example.org", 0.2) == (
        "example.org cannot be reached (no connection within 0.2 s: Connection refused; offline?)")


def test_manual_release_says_where_to_put_the_file():
    with pytest.raises(WeightsUnavailableError) as caught:
        fetch("replknet_31b", "in1k")
    message = str(caught.value)
    assert "not published at an address a program can download from" in message
    assert "Google Drive id 1azQUiCxK9feYVkkrPqwVPBtNsTzDrX7S" in message
    destination = pretrained.torch_checkpoint_dir() / "RepLKNet-31B_ImageNet-1K_224.pth"
    assert str(destination) in message


def test_cached_hub_checkpoint_loads_and_is_labelled():
    state = test_resnet_state()
    fake_hub_file("timm/test_resnet.r160_in1k", "model.safetensors", lambda p: save_file(state, str(p)))
    model, info = load_model("test_resnet", "pretrained")
    assert info.source == "pretrained" and info.tag == "test_resnet.r160_in1k" and info.file == "model.safetensors"
    assert info.layout == "native" and info.converter is None
    assert torch.equal(model.state_dict()["fc.weight"], state["fc.weight"])
    assert weights_label(info.to_dict()) == "trained (model.safetensors)"
    decision = default_weights("test_resnet")
    assert decision.weights == "pretrained:r160_in1k" and decision.kind == "trained"
    assert "found on disk" in decision.sentence
    (row,) = catalogue.models_table("test_resnet", parameters=False)
    assert row["on_disk"] == "r160_in1k"


def test_family_checkpoint_in_the_hub_cache_is_found_without_network():
    path = fake_hub_file("ai-modelwithcode/UniConvNet", "uniconvnet_a_1k_224.pth", lambda p: p.write_bytes(b"x"))
    source, found = fetch("uniconvnet_a")
    assert found == path and source.name == "uniconvnet_a.in1k"
    assert find_cached(pretrained_source("uniconvnet_t")) is None
    on_disk = pretrained.checkpoints_on_disk("uniconvnet_a")
    assert [(s.tag, f.name) for s, f in on_disk] == [("in1k", "uniconvnet_a_1k_224.pth")]


def test_hub_download_goes_through_huggingface_hub(online, monkeypatch):
    state = test_resnet_state()
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs.get("etag_timeout")))
        return str(fake_hub_file(repo_id, filename, lambda p: save_file(state, str(p))))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    decision = default_weights("test_resnet", connect_timeout=1.5)
    assert decision.kind == "trained" and "downloaded" in decision.sentence
    assert calls == [("timm/test_resnet.r160_in1k", "model.safetensors", 1.5)]
    _, info = load_model("test_resnet", "default")  # now on disk: no second download
    assert len(calls) == 1 and info.source == "pretrained" and "found on disk" in info.decision


def test_url_download_lands_in_the_torch_hub_cache(online, monkeypatch):
    written = []

    def fake_url_download(url, dst, hash_prefix=None, progress=True):
        written.append((url, Path(dst).name, socket.getdefaulttimeout()))
        Path(dst).write_bytes(b"not a checkpoint")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_url_download)
    source, path = fetch("replknet_31b", "mmpretrain_in1k", connect_timeout=1.0)
    assert path == pretrained.torch_checkpoint_dir() / "replknet-31B_3rdparty_in1k_20221118-fd08e268.pth"
    assert written[0][0] == source.url and written[0][2] == pretrained.READ_TIMEOUT  # bounded socket reads
    assert socket.getdefaulttimeout() is None
    assert find_cached(source) == path


def test_failed_download_falls_back_to_the_probe(online, monkeypatch):
    import huggingface_hub

    def broken(*args, **kwargs):
        raise ConnectionError("connection reset")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", broken)
    decision = default_weights("uniconvnet_t")
    assert decision.weights == "active" and "connection reset" in decision.sentence


def test_weights_labels():
    assert weights_label({"source": "active", "seed": 0}) == "architecture probe (active init, seed 0)"
    assert weights_label({"source": "random", "seed": 0}) == "random init"
    assert weights_label({"source": "random", "silenced_branches": ["x"]}) == "random init (silenced branches)"
    assert weights_label({"source": "checkpoint", "path": "/a/uniconvnet_t_1k_224_ema.pth"}) == \
        "trained (uniconvnet_t_1k_224_ema.pth)"
    assert weights_label({"source": "checkpoint", "file": "e.pth", "converter": "lukemelas-efficientnet"}) == \
        "trained (e.pth, converted from lukemelas-efficientnet)"
    assert weights_label({"source": "module"}) == "module as given"


def test_default_weights_without_any_published_checkpoint_is_the_probe():
    decision = default_weights("parc_convnext_xt")
    assert decision.weights == "active" and "architecture probe" in decision.sentence
    settings = runs.measure_settings("parc_convnext_xt", weights="default", input_size=64, num_images=1)
    assert settings.weights == "active" and "weights: parc_convnext_xt declares no checkpoint" in settings.describe()
