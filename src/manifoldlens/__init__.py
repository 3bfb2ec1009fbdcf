"""manifoldlens: the geometry a trained classifier sees in its data.

Input Jacobians, the local data matrix G(x) and the foliation it induces, held against the
data manifold. The functional core is batched on the first axis and device/dtype agnostic.
"""

from . import denoise, flows, generative, ood, resnet
from ._version import __version__
from .attribution import METHODS, TangentFraction, explain
from .foliation import (
    InvolutivityResult,
    PathResult,
    horizontal_path,
    involutivity_residual,
    leaf_crossing_path,
)
from .information import (
    LocalDataMatrix,
    LocalFisherMatrix,
    local_data_matrix,
    local_fisher_matrix,
    trace_estimate,
)
from .jacobian import (
    class_correlation,
    gram_spectrum,
    jacobian,
    jacobian_gram,
    jacobian_gram_plan,
    jacobian_neighbors,
    kernel_target_alignment,
)
from .tangent import TangentSpace, principal_angles, random_fraction_baseline

__all__ = [
    "__version__",
    "denoise",
    "flows",
    "generative",
    "ood",
    "resnet",
    "METHODS",
    "TangentFraction",
    "TangentSpace",
    "explain",
    "principal_angles",
    "random_fraction_baseline",
    "InvolutivityResult",
    "PathResult",
    "horizontal_path",
    "involutivity_residual",
    "leaf_crossing_path",
    "LocalDataMatrix",
    "LocalFisherMatrix",
    "class_correlation",
    "gram_spectrum",
    "jacobian",
    "jacobian_gram",
    "jacobian_gram_plan",
    "jacobian_neighbors",
    "kernel_target_alignment",
    "local_data_matrix",
    "local_fisher_matrix",
    "trace_estimate",
]
