r"""Influence functions: which training points raised or lowered the loss on a test point.

Training-data attribution that matches leave-one-out retraining.

Convention and derivation
-------------------------
The model was trained on the objective

.. math:: R(\theta) = w \sum_{j=1}^{n} \ell_j(\theta) + \tfrac{\lambda}{2}\|\theta\|^2,
          \qquad w = 1/n \ (\texttt{reduction="mean"}),\ w = 1 \ (\texttt{"sum"}),

with :math:`\lambda` the weight decay of the training run.
Removing training point :math:`j` means giving it weight zero in the same objective,
:math:`R_{-j} = R - w\,\ell_j`. At the minimizer :math:`\hat\theta` of :math:`R`,
:math:`\nabla R_{-j}(\hat\theta) = -w\nabla\ell_j`, so one Newton step on :math:`R_{-j}`
moves the parameters by

.. math:: \Delta_j = (H_{-j})^{-1}\, w \nabla\ell_j, \qquad
          H_{-j} = H - w\nabla^2\ell_j, \qquad H = \nabla^2 R(\hat\theta),

and dropping :math:`w\nabla^2\ell_j` (it is :math:`O(1/n)`) gives the classical
first-order influence. The change in the loss on test point :math:`i` is then

.. math:: \texttt{scores[i, j]} = w\, \nabla\ell^{\mathrm{test}}_i{}^\top
          (C + \mu I)^{-1} \nabla\ell_j \;\approx\;
          \ell^{\mathrm{test}}_i(\hat\theta_{-j}) - \ell^{\mathrm{test}}_i(\hat\theta)

where :math:`C` is the curvature of the data term and :math:`\mu` the ``damping``: the
training run's :math:`\lambda` (the L2 term's Hessian is :math:`\lambda I`) plus any
numerical damping. **Positive means removing j would
raise the test loss: j helped.** Negative means j hurt that test point.

:meth:`Influence.newton_loo` keeps the :math:`w\nabla^2\ell_j` term and the
second-order term of the test loss,
:math:`\nabla\ell^{\mathrm{test}\top}\Delta_j
+ \tfrac12 \Delta_j^\top \nabla^2\ell^{\mathrm{test}} \Delta_j`,
which fixes the systematic under-statement of large effects by first-order influence.
"""

from ..func.per_example import per_example_gradients
from ._influence import Influence, TopK

__all__ = ["Influence", "TopK", "per_example_gradients"]
