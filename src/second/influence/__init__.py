r"""Influence functions: which training points raised or lowered the loss on a test point.

Training-data attribution that matches leave-one-out retraining.

Convention and derivation
-------------------------
The model was trained on the objective

.. math:: R(\theta) = \sum_{j=1}^{n} w_j\, \ell_j(\theta) + \tfrac{\lambda}{2}\|\theta\|^2,

the loss torch computes on all the training data at once plus the weight decay
:math:`\lambda` of the training run, with :math:`\ell_j` the loss of example :math:`j`
alone (a batch of one) and :math:`w_j` its share: :math:`w_j = 1` for
``reduction="sum"``, and :math:`w_j = W_j / W` for ``"mean"``, where :math:`W_j` is what
torch's mean counts example :math:`j` as (1; for ``CrossEntropyLoss``/``NLLLoss`` with
class indices the class weights of its valid targets: its class weight, or its number of
non-ignored tokens) and :math:`W = \sum_j W_j`; a plain mean has :math:`w_j = 1/n`, an
example whose targets are all ignored (or of class weight 0) :math:`w_j = 0`.
Removing training point :math:`j` means giving it weight zero in the same objective,
:math:`R_{-j} = R - w_j\,\ell_j`. At the minimizer :math:`\hat\theta` of :math:`R`,
:math:`\nabla R_{-j}(\hat\theta) = -w_j\nabla\ell_j`, so one Newton step on :math:`R_{-j}`
moves the parameters by

.. math:: \Delta_j = (H_{-j})^{-1}\, w_j \nabla\ell_j, \qquad
          H_{-j} = H - w_j\nabla^2\ell_j, \qquad H = \nabla^2 R(\hat\theta),

and dropping :math:`w_j\nabla^2\ell_j` (it is :math:`O(1/n)`) gives the classical
first-order influence. The change in the loss on test point :math:`i` is then

.. math:: \texttt{scores[i, j]} = w_j\, \nabla\ell^{\mathrm{test}}_i{}^\top
          (C + \mu I)^{-1} \nabla\ell_j \;\approx\;
          \ell^{\mathrm{test}}_i(\hat\theta_{-j}) - \ell^{\mathrm{test}}_i(\hat\theta)

where :math:`C` is the curvature of the data term and :math:`\mu` the ``damping``: the
training run's :math:`\lambda` (the L2 term's Hessian is :math:`\lambda I`) plus any
numerical damping. **Positive means removing j would
raise the test loss: j helped.** Negative means j hurt that test point.

:meth:`Influence.newton_loo` keeps the :math:`w_j\nabla^2\ell_j` term and the
second-order term of the test loss,
:math:`\nabla\ell^{\mathrm{test}\top}\Delta_j
+ \tfrac12 \Delta_j^\top \nabla^2\ell^{\mathrm{test}} \Delta_j`,
which fixes the systematic under-statement of large effects by first-order influence.
"""

from ..func.per_example import per_example_gradients
from ._influence import Influence, TopK

__all__ = ["Influence", "TopK", "per_example_gradients"]
