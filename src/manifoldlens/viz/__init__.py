"""Figures. Every function returns a :class:`matplotlib.figure.Figure` built without pyplot,
so no GUI backend is touched; save it with ``fig.savefig`` or :meth:`Run.save_figure`.

One module per subject: :mod:`.information` (the local data matrix G, the Jacobian
correlation matrix, training curves, paths), :mod:`.flows` (normalizing flows) and
:mod:`.attribution` (attributions and the data manifold); :mod:`.style` holds what they share.
"""

from __future__ import annotations

from .attribution import (
    plot_attribution_decomposition,
    plot_fraction_by_method,
    plot_fraction_over_training,
    plot_principal_angles,
    plot_roar,
)
from .flows import flow_density_2d, flow_volume_change, interpolation_strips, sample_grid
from .information import (
    plot_curves,
    plot_eigenvectors,
    plot_gram,
    plot_gram_spectrum,
    plot_path_grid,
    plot_path_strip,
    plot_rank_counts,
    plot_residual_histogram,
    plot_spectra,
    plot_trace_histogram,
    plot_trace_of_g,
    plot_training,
    save_path_gif,
)

# the colours stay importable from manifoldlens.viz, as before the split (outside __all__)
from .style import BLUE as BLUE
from .style import GREY as GREY
from .style import PURPLE as PURPLE
from .style import RED as RED

__all__ = [
    "plot_trace_of_g",
    "plot_trace_histogram",
    "plot_spectra",
    "plot_rank_counts",
    "plot_gram",
    "plot_gram_spectrum",
    "plot_eigenvectors",
    "plot_training",
    "plot_path_strip",
    "save_path_gif",
    "plot_path_grid",
    "plot_curves",
    "plot_residual_histogram",
    "flow_density_2d",
    "flow_volume_change",
    "sample_grid",
    "interpolation_strips",
    "plot_attribution_decomposition",
    "plot_fraction_by_method",
    "plot_fraction_over_training",
    "plot_roar",
    "plot_principal_angles",
]
