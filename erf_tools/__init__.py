"""erf-tools: effective receptive field extraction, Gaussian (AGD) analysis and comparison figures."""
__version__ = "0.1.0"
