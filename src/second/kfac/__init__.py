r"""Kronecker-factored curvature: KFAC and eigenvalue-corrected KFAC (EK-FAC).

The package, in the order data flows through it:

* :mod:`~second.kfac.rules`: one :class:`LayerRule` per layer type, registered by module
  type (add a layer type by writing one rule class);
* :mod:`~second.kfac.capture`: the hooks (:class:`Capture`, :func:`watch_forward`);
* :mod:`~second.kfac.columns`: the output-curvature columns of each Fisher type;
* :mod:`~second.kfac.stats`: factor statistics as sums plus counts (:class:`FactorStats`);
* :mod:`~second.kfac.eigen`, :mod:`~second.kfac.damping`, :mod:`~second.kfac.blocks`: the
  blocks (:class:`KroneckerBlock`, :class:`EigenBlock`, :class:`DiagonalBlock`), damped at
  call time, exactly or pi-split;
* :mod:`~second.kfac.correction`: EK-FAC's eigen-corrections;
* :mod:`~second.kfac.operators`: :class:`KFACOperator` (its blocks mapped to parameter
  order by :class:`BlockLayout`); :mod:`~second.kfac.ekfac`: :class:`EKFACOperator`;
  :mod:`~second.kfac.inverse`: their inverses.

``second.optim.KFAC`` uses the same parts with running averages of the statistics.

For a layer with weight matrix :math:`W` (bias appended as a last column), input rows
:math:`a_{it}` and output rows :math:`z_{it}` (example :math:`i`, position :math:`t`:
a token of a sequence, a pixel of a convolution's output, or ``T = 1`` for a plain
:class:`torch.nn.Linear` on vectors), the curvature block of the dataset objective is
approximated by a Kronecker product

.. math::

    B \approx A \otimes G,\qquad
    A = \frac{1}{N T}\sum_{i,t} a_{it} a_{it}^\top,\qquad
    G = w \sum_{i} \sum_k \sum_t g_{ikt} g_{ikt}^\top,\qquad
    g_{ikt} = \frac{\partial (s_{ik}^\top f_i)}{\partial z_{it}},

where :math:`f_i` is the network output, :math:`s_{ik}` are columns of a square root of
the per-example output curvature (:math:`\sum_k s_{ik} s_{ik}^\top \approx \nabla^2_f \ell_i`)
and :math:`w = 1/N` for a mean-reduced loss, :math:`1` for a sum-reduced one.

**Scaling convention.** All the loss' scale sits in :math:`G`, :math:`A` is a plain
mean. The approximation therefore has the scale of :func:`second.exact_ggn` of the
training loss as written (``nn.MSELoss()`` averages over the outputs too, so its GGN
is :math:`2/C` times the one of the sum of squares), and for a deep linear network
with one datum ``KFAC`` equals the exact GGN block of every layer. Libraries that
drop the factor 2 of the squared error, or the :math:`1/C`, differ from ours by it.

**Ordering.** ``W`` is flattened row-major (``[out, in]``), so in the parameter
ordering the weight block is ``kron(G, A)``; :meth:`KFACOperator.to_dense` follows
the order of ``model.parameters()``.

The curvature square roots :math:`s_{ik}` (``fisher=``):

* ``"type2"`` (default): the exact factorization of :math:`\nabla^2_f\ell_i`, one
  backward column per output (MSE: :math:`\sqrt{2a}\,I`; BCE-with-logits:
  :math:`\mathrm{diag}\sqrt{a\,\sigma(1-\sigma)}`; cross-entropy:
  :math:`\sqrt{a}\,(\mathrm{diag}\sqrt{p} - p\sqrt{p}^\top)`, per spatial position),
  so :math:`G` is built from the GGN itself.
* ``"mc"``: :math:`s_{ik} = \nabla_f \ell(f_i, \tilde y_{ik}) / \sqrt{a K}` with targets
  sampled from the model (``mc_samples = K``), an unbiased estimate of the same.
* ``"empirical"``: :math:`s_i = \nabla_f \ell(f_i, y_i)` with the observed targets
  (the empirical Fisher; no :math:`a`).

Here :math:`a` is the loss' scale relative to a negative log-likelihood (see
:mod:`second._losses`).

**Layers** (:mod:`~second.kfac.rules`; a rule covers its module type and every subclass
that keeps the type's ``forward``). Kronecker blocks: :class:`~torch.nn.Linear` (any
leading dimensions as positions), :class:`~torch.nn.Conv1d`, :class:`~torch.nn.Conv2d`
and :class:`~torch.nn.Conv3d` (any padding; patches channel-major like the weight, output
pixels as positions: KFC, Grosse & Martens 2016; a block per group of a grouped one),
:class:`~torch.nn.ConvTranspose1d`/:class:`~torch.nn.ConvTranspose2d` (as the equivalent
convolution), :class:`~torch.nn.Embedding` (one-hot inputs, so
:math:`A` is diagonal) and :class:`~torch.nn.MultiheadAttention` (the Q, K and V rows of
``in_proj_weight`` as three blocks, ``out_proj`` as a fourth). Layers applied at several
positions of an example use KFAC-expand (default) or KFAC-reduce (``weight_sharing=``,
Eschenhagen et al. 2023). :class:`~torch.nn.LayerNorm`, :class:`~torch.nn.RMSNorm`,
:class:`~torch.nn.GroupNorm`, BatchNorm and a convolution with more than
:data:`~second.kfac.layers.MAX_KRONECKER_GROUPS` groups get their exact diagonal
(:math:`w\sum_{i,k} (\partial s_{ik}^\top f_i / \partial\theta)^2` from per-example
gradients). Every other parameter, and a parameter tied between two different layers,
gets a diagonal block (``fallback="diagonal"``: an unbiased Rademacher estimate of the
same diagonal, exact with one datum) or a zero block (``fallback="identity"``: only the
damping acts there, the inverse is ``I / damping``). ``approximations()`` on the
operators and on ``second.optim.KFAC`` reports what each parameter got.

References:
    J. Martens, R. Grosse. Optimizing neural networks with Kronecker-factored
    approximate curvature. ICML 2015.
    R. Grosse, J. Martens. A Kronecker-factored approximate Fisher matrix for
    convolution layers. ICML 2016.
    T. George et al. Fast approximate natural gradient descent in a Kronecker-factored
    eigenbasis. NeurIPS 2018.
    R. Eschenhagen et al. Kronecker-factored approximate curvature for modern neural
    network architectures. NeurIPS 2023.
"""

from . import rules as _rules
from .blocks import DiagonalBlock, EigenBlock, KroneckerBlock, eigen_blocks
from .capture import Capture, ForwardWatch, watch_forward
from .columns import (
    FISHER_TYPES as FISHER_TYPES,  # the constants: public names, not in __all__
)
from .columns import (
    backprop_columns,
    check_loss,
    curvature_columns,
    nonfinite_rows,
    output_hessian_product,
    output_hessian_sqrt,
)
from .correction import eigen_corrections
from .damping import DAMPING_SPLITS as DAMPING_SPLITS
from .damping import check_damping, pi_factor, pi_split
from .eigen import sym_eigh
from .ekfac import EKFACOperator
from .inverse import EKFACInverseOperator, KFACInverseOperator
from .operators import (
    FALLBACKS as FALLBACKS,
)
from .operators import BlockLayout, KFACOperator
from .rules import *  # noqa: F403  (the layer rules: their names are rules.__all__)
from .rules import WEIGHT_SHARING as WEIGHT_SHARING
from .rules import WeightSharing as WeightSharing
from .stats import FactorStats, add_layer_statistics, batch_statistics

__all__ = [
    # operators
    "KFACOperator",
    "EKFACOperator",
    "KFACInverseOperator",
    "EKFACInverseOperator",
    "BlockLayout",
    # capture (the layer rules: rules.__all__, appended below)
    "Capture",
    "ForwardWatch",
    "watch_forward",
    # curvature columns
    "check_loss",
    "curvature_columns",
    "output_hessian_sqrt",
    "output_hessian_product",
    "backprop_columns",
    "nonfinite_rows",
    # statistics
    "FactorStats",
    "batch_statistics",
    "add_layer_statistics",
    # blocks, damping, eigen
    "KroneckerBlock",
    "EigenBlock",
    "DiagonalBlock",
    "eigen_blocks",
    "check_damping",
    "pi_factor",
    "pi_split",
    "sym_eigh",
    "eigen_corrections",
]
__all__ += _rules.__all__
