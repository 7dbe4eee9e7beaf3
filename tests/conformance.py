"""Loading the conformance fixtures copied from the official code (tests/fixtures/conformance, see its README)."""
from __future__ import annotations

import ast
import json
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures" / "conformance"


def _maybe_literal(value):
    """Some JSON fields were stored as Python reprs of dicts; turn them back into objects."""
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


@lru_cache(maxsize=None)
def load_meta(relative: str) -> dict:
    """The JSON of a fixture, e.g. ``load_meta("refs/replknet_small")``, with repr-encoded fields decoded."""
    meta = json.loads((FIXTURES / f"{relative}.json").read_text())
    return {k: _maybe_literal(v) for k, v in meta.items()}


def load_tensors(relative: str) -> dict[str, torch.Tensor]:
    """All tensors of a fixture, merging split files (``tensor_files``)."""
    meta = load_meta(relative)
    tensors: dict[str, torch.Tensor] = {}
    for name in meta.get("tensor_files", [f"{relative}.safetensors"]):
        tensors.update(load_file(FIXTURES / name))
    return tensors


def state_dict_of(tensors: dict[str, torch.Tensor], prefix: str = "state_dict.") -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_manifest(name: str) -> dict:
    return json.loads((FIXTURES / "manifests" / f"{name}.json").read_text())


def assert_close_to_ref(actual: torch.Tensor, expected: torch.Tensor, tolerance: dict) -> None:
    """Elementwise ``|ours - ref| <= atol + rtol*|ref|`` with the fixture's suggested tolerance."""
    torch.testing.assert_close(actual, expected, rtol=tolerance["rtol"], atol=tolerance["atol"])


def assert_matches_manifest(model: torch.nn.Module, name: str) -> None:
    """Every key and shape of ``model.state_dict()`` equals the official manifest, in order."""
    manifest = load_manifest(name)
    ours = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    expected = [[k, list(s)] for k, s in manifest["state_dict"]]
    missing = sorted({k for k, _ in expected} - {k for k, _ in ours})
    unexpected = sorted({k for k, _ in ours} - {k for k, _ in expected})
    assert not missing and not unexpected, f"missing {missing[:10]}, unexpected {unexpected[:10]}"
    shapes = dict(expected)
    wrong = [(k, s, shapes[k]) for k, s in ours if shapes[k] != s]
    assert not wrong, f"shape mismatches (key, ours, official): {wrong[:10]}"
    assert [k for k, _ in ours] == [k for k, _ in expected], "state_dict order differs from the official one"
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == manifest["num_params"], (n_params, manifest["num_params"])
