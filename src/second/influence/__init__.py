"""Influence functions: training-data attribution that matches leave-one-out retraining."""

from ._grads import per_example_gradients
from ._influence import Influence, TopK

__all__ = ["Influence", "TopK", "per_example_gradients"]
