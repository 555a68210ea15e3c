r"""Saving and loading a fitted Laplace approximation."""

from __future__ import annotations

from ._state import LaplaceState
from ._structures import DiagStructure, FullStructure, LowRankStructure

__all__ = ["Saving"]


class Saving(LaplaceState):
    """The saving part of :class:`~second.laplace.Laplace` (a mixin)."""

    def state_dict(self) -> dict:
        """Everything a fitted approximation needs, to save with :func:`torch.save`.

        Returns:
            A dict of tensors and settings; the model's own parameters are not included.
        """
        st = self._fitted()
        return {
            "version": 1,
            "likelihood": self.likelihood,
            "structure": self.structure_name,
            "subset": self.subset,
            "curvature": self.curvature,
            "fisher": self.fisher,
            "mean": self.mean,
            "prior_precision": self.prior_precision,
            "prior_mean": self.prior_mean,
            "sigma_noise": self.sigma_noise,
            "temperature": self.temperature,
            "loss": self.loss,
            "num_data": self.num_data,
            "num_outputs": self.num_outputs,
            "groups": list(self.groups),
            "fitted": st.state(),
        }

    def load_state_dict(self, state: dict):
        """Restore a fitted approximation saved with :meth:`state_dict`.

        The object must be built for the same model, loss, subset and structure (with
        ``data=None``); the KFAC layout is rebuilt from the model.

        Args:
            state: what :meth:`state_dict` returned.

        Returns:
            ``self``.

        Raises:
            ValueError: a state saved for another structure, subset, likelihood or size.
        """
        for key, mine in (
            ("likelihood", self.likelihood),
            ("structure", self.structure_name),
            ("subset", self.subset),
            ("groups", list(self.groups)),
        ):
            if state.get(key) != mine:
                raise ValueError(f"the state was saved with {key}={state.get(key)!r}, not {mine!r}")
        if state["mean"].numel() != self.num_params:
            raise ValueError(
                f"the state has {state['mean'].numel()} parameters, the subset {self.num_params}"
            )
        self.curvature, self.fisher = state["curvature"], state["fisher"]
        self.mean = state["mean"].clone()
        self.prior_precision = state["prior_precision"]
        self.prior_mean = state["prior_mean"]
        self.sigma_noise, self.temperature = (
            float(state["sigma_noise"]),
            float(state["temperature"]),
        )
        self.loss, self.num_data = float(state["loss"]), int(state["num_data"])
        self.num_outputs = int(state["num_outputs"])
        fitted, gi = state["fitted"], self._group_index
        name = self.structure_name
        if name == "full":
            self._structure = FullStructure(fitted["H"], gi)
        elif name == "diag":
            self._structure = DiagStructure(fitted["h"], gi)
        elif name == "lowrank":
            self._structure = LowRankStructure(fitted["U"], fitted["evals"], gi)
        else:
            self._structure = self._kron_from_state(fitted)
        return self

    def _kron_from_state(self, fitted: dict):
        from ..kfac import BlockLayout, DiagonalBlock, EigenBlock, find_layers

        module = self._last if self._last is not None else self.model
        rules = find_layers(module, self.params)
        owned = {id(p) for layer in rules for p in layer.params()}
        fallback = [p for p in self.params if id(p) not in owned]
        layout = BlockLayout(self.params, rules, fallback)
        blocks = [
            EigenBlock(b["lA"], b["QA"], b["lG"], b["QG"], b["eigenvalues"])
            for b in fitted["blocks"]
        ]
        diagonals = [DiagonalBlock(d) for d in fitted["diagonals"]]
        return self._kron_structure(blocks, diagonals, layout)
