"""The Kronecker rule of ``nn.MultiheadAttention``: the Q, K, V projections and ``out_proj``.

A :class:`~second.kfac.rules.LayerRule` registered for ``nn.MultiheadAttention`` (see
:mod:`second.kfac.rules`); the capture records the projections inside the attention's
functional forward.
"""

from __future__ import annotations

from typing import cast

from torch import Tensor, nn

from .rules import LayerRule, _initialized

__all__ = ["AttentionProjectionRule"]


class AttentionProjectionRule(LayerRule, module_type=nn.MultiheadAttention):
    """``nn.MultiheadAttention``: the Q, K and V projections and ``out_proj`` as four blocks.

    The attention never calls its ``out_proj`` module: it hands ``in_proj_weight`` (or
    ``q/k/v_proj_weight``) and ``out_proj.weight`` to
    :func:`torch.nn.functional.multi_head_attention_forward`, which applies them with
    ``F.linear``. The capture (:class:`~second.kfac.Capture`) records those calls while
    the module runs: the Q, K and V blocks own rows ``[0, E)``, ``[E, 2E)`` and
    ``[2E, 3E)`` of ``in_proj_weight``/``in_proj_bias`` (or a whole ``*_proj_weight``),
    with the query, key and value as inputs; ``out_proj`` has the attention's output.
    Inputs are stored batch-first ``[N, T, d]``, gradients arrive sequence-first.
    ``bias_k``/``bias_v`` (``add_bias_kv``) stay outside (a diagonal block).

    Example:
        >>> mha = torch.nn.MultiheadAttention(4, 2)
        >>> " ".join(f"{r.name}:{r.d_G}x{r.d_A}" for r in AttentionProjectionRule.build("att", mha, "expand"))
        'att.q:4x5 att.k:4x5 att.v:4x5 att.out_proj:4x5'
    """

    functional = True

    def __init__(
        self,
        name: str,
        module: nn.Module,
        weight: Tensor,
        bias: Tensor | None,
        w_rows: slice | None,
        b_rows: slice | None,
        weight_sharing: str,
    ):
        self._setup(
            name, module, weight, bias, w_rows=w_rows, b_rows=b_rows, weight_sharing=weight_sharing
        )
        self.d_G, self.d_in = self.w_shape
        self.d_A = self.d_in + int(self.has_bias)

    @classmethod
    def supports(cls, module: nn.Module) -> bool:  # noqa: D102
        m = cast(nn.MultiheadAttention, module)
        return _initialized(*(p for _, p in m.named_parameters(recurse=False)))

    @classmethod
    def build(cls, name: str, module: nn.Module, weight_sharing: str) -> list[LayerRule]:  # noqa: D102
        m = cast(nn.MultiheadAttention, module)
        E, prefix = m.embed_dim, f"{name}." if name else ""
        b = m.in_proj_bias
        out: list[LayerRule] = []
        for i, part in enumerate("qkv"):
            rows = slice(i * E, (i + 1) * E)
            if m._qkv_same_embed_dim:
                w, w_rows = cast(Tensor, m.in_proj_weight), rows
            else:
                w, w_rows = cast(Tensor, getattr(m, f"{part}_proj_weight")), None
            out.append(cls(prefix + part, m, w, b, w_rows, rows, weight_sharing))
        o = m.out_proj
        out.append(cls(prefix + "out_proj", m, o.weight, o.bias, None, None, weight_sharing))
        return out

    def positions(self, g: Tensor) -> Tensor:  # noqa: D102
        # the functional forward is sequence-first: [K, T, N, d_G] (out_proj: [K, T*N, d_G]
        # is reshaped by the capture)
        return g.transpose(1, 2)

    def span(self) -> tuple[int, int]:
        """The rows ``[start, stop)`` of ``weight`` this block owns."""
        if self.w_rows is None:
            return 0, self.weight.shape[0]
        return self.w_rows.start, self.w_rows.stop
