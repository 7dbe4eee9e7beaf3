"""The extraction engine: images -> model + target layers -> exact accumulators -> ERF maps.

* :mod:`.measure` — :func:`measure_erf`, its settings :class:`MeasureConfig`, the measurement loop, results;
* :mod:`.engine` — one batch: forward to the targets, input gradients, per-sample maps, the precision policy;
* :mod:`.objective` — the centre-unit objective and the protocol's sign and RGB rules;
* :mod:`.accumulate` — :class:`ExactSum` and :class:`ERFAccumulator` (order- and grouping-independent sums);
* :mod:`.partial` — checkpoints of a running measurement, resume;
* :mod:`.fastpaths` — exact transformations of a private model copy (layout, BN folding, FFT, re-parameterisation);
* :mod:`.windows` — input windows for early targets;
* :mod:`.scheduling` — batches, loader threads, prefetching, worker threads, lazy per-shard input streams;
* :mod:`.memory` — peak-memory replay on the meta device and the largest batch that fits (``batch_size="max"``);
* :mod:`.batch_tuning` — ``batch_size="auto"``: the batch size chosen by measured throughput within that;
* :mod:`.distributed` — images sharded over processes, accumulators all-reduced exactly.
"""
from .accumulate import ERFAccumulator, ExactSum
from .engine import PRECISIONS, ERFEngine
from .fastpaths import exact_fast_paths, prepare_model
from .measure import MeasureConfig, Measurement, measure_erf, measure_with_config, run_measurement

__all__ = [
    "ERFAccumulator", "ERFEngine", "ExactSum", "MeasureConfig", "Measurement", "PRECISIONS", "exact_fast_paths",
    "measure_erf", "measure_with_config", "prepare_model", "run_measurement",
]
