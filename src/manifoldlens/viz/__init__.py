"""Figures. Every function returns a :class:`matplotlib.figure.Figure` built without pyplot,
so no GUI backend is touched; save it with ``fig.savefig`` or :meth:`Run.save_figure`.

One module per subject: :mod:`.information` (the local data matrix G, the Jacobian
correlation matrix, training curves, paths), :mod:`.flows` (normalizing flows) and
:mod:`.attribution` (attributions and the data manifold), :mod:`.ood` (out-of-distribution
scores and denoising), :mod:`.sanity` (Bordt et al. §5: Theorem 1, sanity checks);
:mod:`.style` holds what they share.
"""

from __future__ import annotations

from . import attribution, flows, information, ood, sanity

# re-exported (``as`` marks them public); __all__ gathers the modules' own lists
from .attribution import decomposition_caption as decomposition_caption
from .attribution import decomposition_rows as decomposition_rows
from .attribution import plot_attribution_decomposition as plot_attribution_decomposition
from .attribution import plot_fraction_by_method as plot_fraction_by_method
from .attribution import plot_fraction_over_training as plot_fraction_over_training
from .attribution import plot_principal_angles as plot_principal_angles
from .attribution import plot_roar as plot_roar
from .flows import flow_density_2d as flow_density_2d
from .flows import flow_volume_change as flow_volume_change
from .flows import interpolation_strips as interpolation_strips
from .flows import sample_grid as sample_grid
from .information import plot_curves as plot_curves
from .information import plot_eigenvectors as plot_eigenvectors
from .information import plot_gram as plot_gram
from .information import plot_gram_spectrum as plot_gram_spectrum
from .information import plot_path_grid as plot_path_grid
from .information import plot_path_strip as plot_path_strip
from .information import plot_rank_counts as plot_rank_counts
from .information import plot_residual_histogram as plot_residual_histogram
from .information import plot_spectra as plot_spectra
from .information import plot_trace_histogram as plot_trace_histogram
from .information import plot_trace_of_g as plot_trace_of_g
from .information import plot_training as plot_training
from .information import save_path_gif as save_path_gif
from .ood import plot_auroc_table as plot_auroc_table
from .ood import plot_denoising as plot_denoising
from .ood import plot_roc_curves as plot_roc_curves
from .ood import plot_score_histograms as plot_score_histograms
from .sanity import plot_cascading_randomization as plot_cascading_randomization
from .sanity import plot_necessary_not_sufficient as plot_necessary_not_sufficient
from .sanity import plot_randomization_maps as plot_randomization_maps
from .sanity import plot_theorem1 as plot_theorem1

# the colours stay importable from manifoldlens.viz, as before the split (outside __all__)
from .style import BLUE as BLUE
from .style import GREY as GREY
from .style import PURPLE as PURPLE
from .style import RED as RED

__all__ = [*information.__all__, *flows.__all__, *attribution.__all__, *sanity.__all__,
           *ood.__all__]
