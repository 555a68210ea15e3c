"""Batches and data passes: the one owner of how ``second`` reads your data.

A **batch** is whatever the data yields (an ``(X, y)`` pair, a dict of tensors, or anything a
:class:`Task` knows how to run); **data** is one batch, an iterable of batches or a map-style
``Dataset``. The curvature operators and :class:`~second.Influence` read data through
:func:`iterate_batches` (with checks) and :class:`SamePassCheck` (the same batches on every
pass), and run the model through a :class:`Task`:

- ``task.py``: what a batch is and how a model runs on one (:class:`Task`, :func:`as_task`,
  :func:`call_model`, :func:`map_batch`, :func:`tensor_leaves`);
- ``batches.py``: data passes (:func:`iterate_batches`, :func:`batch_count`,
  :func:`refuse_one_shot`);
- ``determinism.py``: the same data and model on every pass (:func:`batch_fingerprint`,
  :class:`SamePassCheck`, :func:`stochastic_modules`, :func:`batch_coupled_modules`,
  :func:`refuse_stochastic`) and an
  operator's private random samples (:func:`sample_generator`).
"""

from __future__ import annotations

from . import batches, determinism, task
from .batches import *  # noqa: F403
from .determinism import *  # noqa: F403
from .task import *  # noqa: F403

__all__ = [*task.__all__, *batches.__all__, *determinism.__all__]
