"""Receptive-field geometry of every padding scheme, against analytic values and the empirical probe.

The probe (:mod:`erf_tools.rf_probe`) is the midpoint of the input-gradient support of a linearised, all-positive
copy of the network: exact whatever the padding rule, so engine and probe must agree to the pixel (tolerance 1e-9).
To cover a new family, add a :class:`ProbeCase` to ``FAMILY_CASES``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame, create_conv2d
from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame
from torch import nn

import erf_tools.models  # noqa: F401  (registers the families)
from erf_tools import measure_erf
from erf_tools.rf_probe import ProbeError, probe_geometry, probe_receptive_field, receptive_field_geometry

EXACT = 1e-9


def assert_geometry(model: nn.Module, size, target: str | None, offset=None, stride=None) -> None:
    """Engine geometry == probe geometry (and == the analytic ``offset`` / ``stride`` when given)."""
    engine = receptive_field_geometry(model, size, target)
    probe = probe_geometry(model, size, target)
    assert engine.offset == pytest.approx(probe.offset, abs=EXACT)
    assert engine.stride == pytest.approx(probe.stride, abs=EXACT)
    assert engine.centre == pytest.approx(probe.centre, abs=EXACT)
    if offset is not None:
        assert engine.offset == pytest.approx(offset, abs=EXACT)
    if stride is not None:
        assert engine.stride == pytest.approx(stride, abs=EXACT)


class Chain(nn.Sequential):
    """A named chain whose last layer is the target ``out``."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__(*layers[:-1])
        self.out = layers[-1]


class FunctionalSame(nn.Module):
    """An unknown layer: TF 'same' padding decided at run time with F.pad, then a functional strided conv."""

    def __init__(self, channels: int, kernel: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, channels, kernel, kernel))
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for n in reversed(x.shape[-2:]):
            total = max((-(-n // self.stride) - 1) * self.stride + self.kernel - n, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, stride=self.stride)


# (name, layers, input size, analytic offset, analytic stride); the offset is c0 per axis (row, column)
SCHEMES = [
    # TF same, stride 2 on an even size: pad (0, 1), the centre moves +1 per layer versus symmetric padding
    ("Conv2dSame", lambda: Chain(Conv2dSame(3, 4, 3, stride=2), nn.Conv2d(4, 4, 1)), 32, (1.0, 1.0), (2.0, 2.0)),
    ("Conv2dSame odd size", lambda: Chain(Conv2dSame(3, 4, 3, stride=2), nn.Identity()), 33, (0.0, 0.0), (2.0, 2.0)),
    ("create_conv2d same", lambda: Chain(create_conv2d(3, 4, 5, stride=2, padding="same"), nn.Identity()), 32,
     (1.0, 1.0), (2.0, 2.0)),
    ("MaxPool2dSame", lambda: Chain(nn.Conv2d(3, 4, 1), MaxPool2dSame(3, stride=2)), 32, (1.0, 1.0), (2.0, 2.0)),
    ("AvgPool2dSame", lambda: Chain(nn.Conv2d(3, 4, 1), AvgPool2dSame(2, stride=2)), 32, (0.5, 0.5), (2.0, 2.0)),
    ("nn.Conv2d same, even kernel", lambda: Chain(nn.Conv2d(3, 4, 4, padding="same"), nn.Identity()), 32,
     (0.5, 0.5), (1.0, 1.0)),
    ("ZeroPad2d asymmetric", lambda: Chain(nn.ZeroPad2d((1, 0, 2, 0)), nn.Conv2d(3, 4, 2, stride=2), nn.Identity()),
     32, (-1.5, -0.5), (2.0, 2.0)),
    ("ConstantPad2d + pool", lambda: Chain(nn.Conv2d(3, 4, 1), nn.ConstantPad2d((0, 1, 0, 1), 0.0),
                                           nn.AvgPool2d(3, stride=2)), 32, (1.0, 1.0), (2.0, 2.0)),
    ("ReflectionPad2d", lambda: Chain(nn.ReflectionPad2d((2, 0, 2, 0)), nn.Conv2d(3, 4, 3), nn.Identity()), 32,
     (-1.0, -1.0), (1.0, 1.0)),
    ("functional F.pad + F.conv2d", lambda: Chain(FunctionalSame(3), FunctionalSame(3), nn.Identity()), 32,
     (3.0, 3.0), (4.0, 4.0)),
    ("max pool with dilation and ceil mode", lambda: Chain(nn.Conv2d(3, 4, 1),
                                                           nn.MaxPool2d(3, 2, 1, dilation=2, ceil_mode=True)), 31,
     (1.0, 1.0), (2.0, 2.0)),
    # o gathers input (o + p − d(k−1)/2)/s: c0 = 0 + 2·(1 − 1)/2 = 0, S = 2/2 (k = 3: both phases centred alike)
    ("ConvTranspose2d", lambda: Chain(nn.Conv2d(3, 4, 3, 2, 1), nn.ConvTranspose2d(4, 4, 3, 2, 1, output_padding=1)),
     32, (0.0, 0.0), (1.0, 1.0)),
]


@pytest.mark.parametrize("name, build, size, offset, stride", SCHEMES, ids=[s[0] for s in SCHEMES])
def test_padding_scheme_geometry(name, build, size, offset, stride):
    torch.manual_seed(0)
    assert_geometry(build().eval(), size, "out", offset, stride)


def test_phase_dependent_transposed_conv_warns():
    """k = 4, s = 2: even outputs are centred ½ px from odd ones; no single c0 + i·S, so a warning."""
    from erf_tools.receptive_field import GeometryWarning

    model = Chain(nn.Conv2d(3, 4, 3, 2, 1), nn.ConvTranspose2d(4, 4, 4, 2, 1)).eval()
    with pytest.warns(GeometryWarning, match="alternating phases"):
        receptive_field_geometry(model, 32, "out")


def test_module_whose_attributes_do_not_explain_its_output_warns():
    from erf_tools.receptive_field import GeometryWarning

    class Opaque(nn.Conv2d):  # resamples by itself, through no operator the log understands
        def forward(self, x):
            return x[..., ::2, ::2]

    with pytest.warns(GeometryWarning, match="do not explain"):
        receptive_field_geometry(Chain(Opaque(3, 3, 3, padding=1), nn.Identity()).eval(), 32, "out")


def test_fft_depthwise_conv_keeps_the_geometry():
    """An FFT-computed conv pads internally and crops back: recorded from its attributes, no padding offset."""
    from erf_tools.layers.fft_conv import use_fft_depthwise

    model = Chain(Conv2dSame(3, 8, 3, stride=2), nn.Conv2d(8, 8, 31, padding=15, groups=8), nn.Identity()).eval()
    direct = receptive_field_geometry(model, 64, "out")
    assert use_fft_depthwise(model, 27) == ["1"]
    fft = receptive_field_geometry(model, 64, "out")
    assert fft.offset == direct.offset == (1.0, 1.0) and fft.stride == direct.stride == (2.0, 2.0)
    assert fft.extent == direct.extent == (63, 63)


def test_probe_refuses_a_clipped_field():
    model = Chain(nn.Conv2d(3, 4, 9, padding=4), nn.Conv2d(4, 4, 9, padding=4), nn.Identity()).eval()
    with pytest.raises(ProbeError, match="reaches the border"):
        probe_receptive_field(model, 12, "out")
    field = probe_receptive_field(model, 24, "out")
    assert field.size == (17, 17) and field.centre == (12.0, 12.0)


# --- real networks ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeCase:
    """A model and the input sizes at which engine and probe must agree."""

    model: str
    sizes: tuple[int, ...] = (224, 288)
    kwargs: dict = field(default_factory=dict)
    target: str | None = None
    fixed_size: bool = False  # needs img_size = input (ViT, Swin): probed at that size without lengthening
    setup: object = None  # callable(model) run after creation (e.g. a ParC path)


def _spatial_parc(model: nn.Module) -> None:
    from erf_tools.layers.parc import set_parc_path

    set_parc_path(model, "spatial")  # FFT convolutions leave rounding noise where the exact gradient is zero


FAMILY_CASES = [
    ProbeCase("uniconvnet_a", (224, 256), dict(depths=(1, 1, 1, 1))),  # 7.7k px field with (2, 3, 9, 2)
    ProbeCase("replknet_31b", (224, 256), dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64))),
    # ParC's circular convolution along a whole axis has no centre: probe the last stage before it
    ProbeCase("parc_convnext_xt", (224, 256), target="stages.1", setup=_spatial_parc),
    ProbeCase("conv2former_n", (224, 256), dict(dims=(8, 16, 32, 64))),
    # SLaK's 51-px kernels and UniRepLKNet's dilated 13-px ones give fields wider than any test input: one block
    # per stage with smaller (same-padded, odd) kernels has the same centre formula
    ProbeCase("slak_t", (224, 256), dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), kernel_size=(7, 7, 7, 7, 3),
                                         width_factor=1.0)),
    ProbeCase("unireplknet_a", (224, 256), dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64),
                                                kernel_sizes=((3,), (3,), (7,), (3,)))),
]
TIMM_CASES = [
    ProbeCase("tf_efficientnet_lite0"),
    ProbeCase("tf_mobilenetv3_large_100"),
    ProbeCase("efficientnet_b0"),
    ProbeCase("convnext_tiny", kwargs=dict(dims=(8, 16, 32, 64))),  # the geometry does not depend on widths
    ProbeCase("vit_small_patch16_224", (224, 256), fixed_size=True),
    ProbeCase("swin_tiny_patch4_window7_224", (224, 256), fixed_size=True),
    # global response normalisation (spatial L2 norms; also in UniRepLKNet) must not spread the probe's support
    ProbeCase("convnextv2_atto", (224,), dict(dims=(8, 16, 32, 64))),
]


def check_against_probe(case: ProbeCase, size: int) -> None:
    """The engine's RF centre and stride of ``case`` at ``size`` equal the probe's."""
    kwargs = dict(case.kwargs, img_size=size) if case.fixed_size else case.kwargs
    torch.manual_seed(0)
    model = timm.create_model(case.model, pretrained=False, **kwargs).eval()
    if case.setup is not None:
        case.setup(model)
    if not case.fixed_size:
        assert_geometry(model, size, case.target)
        return
    engine = receptive_field_geometry(model, size, case.target)
    probed = probe_receptive_field(model, size, case.target)
    assert probed.unit == engine.unit
    assert engine.centre == pytest.approx(probed.centre, abs=EXACT)


@pytest.mark.slow
@pytest.mark.parametrize("case, size", [(c, s) for c in FAMILY_CASES + TIMM_CASES for s in c.sizes],
                         ids=lambda v: v.model if isinstance(v, ProbeCase) else str(v))
def test_engine_centre_matches_the_probe(case, size):
    check_against_probe(case, size)


@pytest.mark.parametrize("size, centre", [(224, 127.0), (512, 287.0)])
def test_tf_efficientnet_lite0_centre(size, centre):
    """TF 'same' padding: 31 px up-left of the symmetric-padding answer (147 at 224, 307 at 512)."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    geometry = receptive_field_geometry(model, size)
    assert geometry.centre == (centre, centre) and geometry.stride == (32.0, 32.0)


def test_measure_erf_reports_the_tf_same_centre():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    result = measure_erf(model, torch.randn(1, 3, 224, 224), protocol="kim2023")
    assert result.receptive_field_centre == (127.0, 127.0) and result.total_stride == (32.0, 32.0)
