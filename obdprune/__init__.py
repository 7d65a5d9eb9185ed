"""obdprune: make trained PyTorch CNNs smaller and faster with sparse regularization and Optimal Brain Damage.

One ``import obdprune`` gives the public API::

    import obdprune

    result = obdprune.prune(model, train_loader, val_loader, method="hybrid", max_drop=0.5)
    small = result.compact()                                   # physically smaller, same function
    obdprune.export_onnx(small, x[:1], "small.onnx", check_inputs=x[:64])

or, inside your own loop, :class:`Pruner` (``attach`` → train → ``step`` → fine-tune → ``compact``).
"""
__version__ = "0.1.0"

from obdprune.api import PruneResult, Pruner, prune
from obdprune.batches import Batches, as_batches
from obdprune.compact import compact, find_dead_units
from obdprune.constraints import StepConstraints
from obdprune.curvature import (CurvatureKind, NegativeCurvature, diag_empirical_fisher, diag_ggn, diag_hessian,
                                estimate_curvature)
from obdprune.data import Dataset, load_dataset
from obdprune.errors import (DataError, ModelFileError, ObdpruneError, OutputBusyError, OutputError, OutputExistsError,
                             TrainingDiverged, UsageError)
from obdprune.export import export_onnx, load_sparse, save_sparse
from obdprune.groups import Granularity, unit_groups
from obdprune.masking import MaskSet, Scope, masks_from_weights, prunable_weights
from obdprune.measure import (count_macs, count_weights, measure_models, measure_side_by_side, measured_sparsity,
                              speed_table)
from obdprune.models import MODELS, build_model
from obdprune.outputs import ResultsFolder, StudyFolder, claim_output
from obdprune.methods import Method, PruneConfig, PrunePoint, prune_model, sparsity_path
from obdprune.regularize import GroupLassoProximal, L1Mode, L1Proximal, Regularizer
from obdprune.runfile import LoadedRun, load_run, save_run
from obdprune.saliency import group_saliency, magnitude_saliency, obd_saliency
from obdprune.selection import Budget
from obdprune.train import TrainConfig, evaluate
from obdprune.web import export_web, measure_in_browser, serve

__all__ = [
    # pruning your own model
    "prune",
    "PruneResult",
    "Pruner",
    "PruneConfig",
    "PrunePoint",
    "Method",
    "Granularity",
    "Budget",
    "Scope",
    "sparsity_path",
    "prune_model",
    # data and reference models
    "Batches",
    "as_batches",
    "load_dataset",
    "Dataset",
    "build_model",
    "MODELS",
    # training with masks and the proximal step
    "evaluate",
    "TrainConfig",
    "StepConstraints",
    "Regularizer",
    "L1Proximal",
    "GroupLassoProximal",
    "L1Mode",
    # curvature
    "diag_ggn",
    "diag_empirical_fisher",
    "diag_hessian",
    "estimate_curvature",
    "CurvatureKind",
    "NegativeCurvature",
    # saliency
    "obd_saliency",
    "magnitude_saliency",
    "group_saliency",
    # masks
    "MaskSet",
    "masks_from_weights",
    "prunable_weights",
    "measured_sparsity",
    "unit_groups",
    # compaction and export
    "compact",
    "find_dead_units",
    "export_onnx",
    "save_sparse",
    "load_sparse",
    # measurement
    "measure_models",
    "measure_side_by_side",
    "speed_table",
    "count_macs",
    "count_weights",
    # in the browser
    "export_web",
    "serve",
    "measure_in_browser",
    # run folders and outputs (never overwritten unless asked, locked while written)
    "load_run",
    "save_run",
    "LoadedRun",
    "claim_output",
    "ResultsFolder",
    "StudyFolder",
    # errors
    "ObdpruneError",
    "UsageError",
    "DataError",
    "ModelFileError",
    "TrainingDiverged",
    "OutputError",
    "OutputExistsError",
    "OutputBusyError",
]
