r"""The attributes the parts of :class:`~second.laplace.Laplace` share, declared for type checkers.

``Laplace`` is assembled from mixins (:class:`~second.laplace._marglik.MarginalLikelihood`,
:class:`~second.laplace._predictive.Predictive`, :class:`~second.laplace._saving.Saving`) that
read what ``Laplace.__init__`` and ``Laplace.fit`` set. :class:`LaplaceState` names those
attributes and their types once; it holds annotations only, so it sets nothing at run time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:
    from ..data import Task
    from ._structures import KronStructure, _Structure

__all__ = ["LaplaceState"]


class LaplaceState:
    """What the Laplace mixins read and write (set by :class:`~second.laplace.Laplace`)."""

    model: nn.Module
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    task: Task  # how a batch runs the model and where its targets are
    likelihood: str  # "classification" or "regression"
    link: str
    structure_name: str
    curvature: str
    fisher: str
    subset: str  # "all", "last_layer" or "params"
    temperature: float
    sigma_noise: float
    prior_precision: Tensor  # checked on assignment (Laplace.prior_precision)
    prior_mean: Tensor
    params: list[Tensor]
    groups: list[str]
    num_params: int
    _group_index: Tensor
    _last: nn.Module | None  # the last layer (subset="last_layer"), else None
    _structure: _Structure | None  # None until fitted
    mean: Tensor  # the mode, set by fit
    loss: float
    num_data: int
    num_outputs: int

    if TYPE_CHECKING:

        def _fitted(self) -> _Structure: ...

        def _kron_structure(self, blocks, diagonals, layout) -> KronStructure: ...
