"""Pure tensor math of lightning_phases: per-sample gradients and every statistic of SPEC.md.

This sub-package depends on torch, numpy, scikit-learn and torchmetrics only;
it never imports Lightning, so it can be used from any training loop.
"""

from lightning_phases.functional.cleansing import (
    CleansingDecision,
    CleansingTracker,
    class_wise_flags,
    default_max_fraction,
    excess_class_dependence,
    logit_margin,
)
from lightning_phases.functional.ensemble import (
    OrderParameters,
    derived_seed,
    effective_dimension,
    make_generator,
    minibatch_variance_factor,
    noise_spectrum,
    order_parameters,
)
from lightning_phases.functional.label_noise import add_target_noise, flip_labels
from lightning_phases.functional.mixture import (
    DetectionMetrics,
    LossMixture,
    class_dependence,
    detection_metrics,
    fit_loss_mixture,
    mixture_threshold,
    symmetric_noise_class_dependence,
)
from lightning_phases.functional.noise_split import (
    SegmentGradients,
    SplitOrderParameters,
    segment_gradients,
    segment_groups,
    segment_statistics,
    segment_statistics_from_groups,
    single_logit_loss,
    split_order_parameters,
)
from lightning_phases.functional.per_sample import (
    ForwardFn,
    LossFn,
    ParamSelection,
    default_forward,
    default_loss,
    eval_mode,
    gradient_gram,
    grouped_gradient_gram,
    per_sample_grads,
    per_sample_grads_and_losses,
    reduce_gram_to_groups,
    select_parameters,
)
from lightning_phases.functional.phases import PHASE_MODELS, PHASE_NAMES, PhaseTracker, PhaseTransition
from lightning_phases.functional.two_layer import NeuronStatistics, neuron_statistics

__all__ = [
    "LossFn",
    "ForwardFn",
    "ParamSelection",
    "default_loss",
    "default_forward",
    "eval_mode",
    "select_parameters",
    "per_sample_grads",
    "per_sample_grads_and_losses",
    "gradient_gram",
    "grouped_gradient_gram",
    "reduce_gram_to_groups",
    "OrderParameters",
    "order_parameters",
    "noise_spectrum",
    "effective_dimension",
    "minibatch_variance_factor",
    "make_generator",
    "derived_seed",
    "SplitOrderParameters",
    "split_order_parameters",
    "SegmentGradients",
    "segment_statistics",
    "segment_statistics_from_groups",
    "segment_groups",
    "segment_gradients",
    "single_logit_loss",
    "LossMixture",
    "fit_loss_mixture",
    "mixture_threshold",
    "class_dependence",
    "symmetric_noise_class_dependence",
    "DetectionMetrics",
    "detection_metrics",
    "CleansingTracker",
    "CleansingDecision",
    "class_wise_flags",
    "excess_class_dependence",
    "logit_margin",
    "default_max_fraction",
    "PhaseTracker",
    "PhaseTransition",
    "PHASE_MODELS",
    "PHASE_NAMES",
    "flip_labels",
    "add_target_noise",
    "NeuronStatistics",
    "neuron_statistics",
]
