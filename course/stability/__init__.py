"""Training stably: statistics over seeds, initialization, monitoring, anomalies, hyperparameter tools.

Everything here plugs into the one loop (`course.train.train`) through its hooks and config:
- `seeds`: `over_seeds`, `compare`, `SeedStats` (mean, std, Student-t confidence interval);
- `init`: `init_weights(model, scheme)` (pytorch, gpt2, unscaled, large), `LayerStats` (per-block
  activation and gradient statistics by hooks);
- `monitor`: `Monitor` (update/weight ratio, activations, user metrics) and its dashboard;
- `anomalies`: `SpikeDetector`, `AnomalyGuard` (skip, lower_lr, rollback), `FaultInjector`;
- `hparams`: `lr_range_test` (Smith 2017 §3.3) and `GradientNoise` (Neelakantan et al. 2015).
Schedules (cosine, linear, constant, WSD) are `course.train.TrainConfig.schedule`.
"""
from .anomalies import FAULTS, POLICIES, AnomalyGuard, FaultInjector, SpikeDetector, flip_bit
from .hparams import GradientNoise, RangeTest, lr_range_test, range_lrs
from .init import INIT_SCHEMES, LayerStats, init_weights, layer_stats_at_init
from .monitor import Monitor
from .seeds import SeedStats, compare, over_seeds, separated, t_cdf, t_quantile

__all__ = ["FAULTS", "POLICIES", "AnomalyGuard", "FaultInjector", "SpikeDetector", "flip_bit", "GradientNoise",
           "RangeTest", "lr_range_test", "range_lrs", "INIT_SCHEMES", "LayerStats", "init_weights",
           "layer_stats_at_init", "Monitor", "SeedStats", "compare", "over_seeds", "separated", "t_cdf", "t_quantile"]
