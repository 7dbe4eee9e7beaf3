"""Operators and building blocks shared by the model families and the engine (the counterpart of ``timm.layers``).

* :mod:`.fft_conv` — same-padded depthwise convolution by FFT and the switch that makes a model use it;
* :mod:`.batchnorm` — BatchNorm folding into convolutions (re-parameterisation, exact fast paths);
* :mod:`.reparam` — kernel arithmetic of structural re-parameterisation (parallel and dilated branches);
* :mod:`.dcnv3` — UniConvNet's modified DCNv3 deformable convolution;
* :mod:`.parc` — ParC, the position-aware circular convolution (spatial and FFT forms);
* :mod:`.staged` — the timm interface of ``downsample_layers``/``stages`` backbones;
* :mod:`.helpers` — size pairs, device lookup, out-of-memory detection.
"""
# timm first: if this is the first import of timm, the families register with it (erf_tools/__init__.py) before any
# module of this package has started, so they can import every layer
import timm  # noqa: F401  isort: skip

from .batchnorm import fold_batchnorm, fuse_bn
from .dcnv3 import DCNv3, dcnv3_core
from .fft_conv import FFT_DEPTHWISE_MIN_KERNEL, fft_depthwise_conv2d, use_fft_depthwise
from .helpers import as_pair, is_out_of_memory, module_device
from .parc import ParC, set_parc_path
from .staged import NUM_STAGES, PrunableStagedBackbone, StagedBackbone

__all__ = [
    "DCNv3", "FFT_DEPTHWISE_MIN_KERNEL", "NUM_STAGES", "ParC", "PrunableStagedBackbone", "StagedBackbone", "as_pair",
    "dcnv3_core", "fft_depthwise_conv2d", "fold_batchnorm", "fuse_bn", "is_out_of_memory", "module_device",
    "set_parc_path", "use_fft_depthwise",
]
