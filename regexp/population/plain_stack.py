"""What the engine reads of a stacked model without MLP sites (StackedCNN, StackedTransformer).

Such a model has one architecture for all members (the same parameter names), no
hand-written step and no member-by-member form. What the MLP population's regularizer paths
read of it: its dropout sites (:attr:`site_sizes`, :attr:`site_weights`), the hidden
activations a forward with ``record`` keeps (``hidden``, ``head_input``, ``unit_mask``), and
where each member's lone weights and head features sit in its slices (``weight_corners``,
``head_columns``).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch


class PlainStack:
    """Members' parameters as stacked tensors ``params`` under one list of ``names``."""

    manual_step = None  # no hand-written backward: the engine's autograd step (engine._manual_ok)
    loop = False
    # the batched form only (tuning.choose_loop measures no member-by-member loop for it)
    fancy = True
    record = False
    hidden: List[torch.Tensor] = []
    names: List[str]
    params: List[torch.Tensor]
    widths: torch.Tensor

    @property
    def site_units(self):
        """The mask of real units the activity penalties weigh the recorded sites with (None
        without padding; a CNN's: one per stage)."""
        return self.unit_mask

    def eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward the probes differentiate, as a lone model's eval mode computes it. Given no
        dropout masks and no weight noise, the plain forward is that already for a model without
        batch norm (the Transformer); StackedCNN, whose batch norm must read its running
        statistics, overrides it."""
        return self.forward(x)

    def _stack(self, j: int, tensors: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def site_sizes(self) -> Tuple[List[List[int]], List[int]]:
        """Units per example of each hidden dropout site: each member's, and the bucket's (padded)."""
        return self.layer_widths, self.hidden_widths

    @property
    def site_weights(self) -> List[int]:
        """The weight (in :attr:`weights` order) each dropout site feeds, the input's first: a
        CNN's input feeds its first convolution, stage s's site the next stage or the head."""
        return list(range(len(self.weights)))

    @property
    def member_names(self) -> List[List[str]]:
        """Each member's parameter names (one architecture: the same for all)."""
        return [self.names] * len(self.widths)

    @property
    def state_names(self) -> List[str]:
        """The names of :attr:`state_tensors` in a member's state_dict."""
        return self.names

    @property
    def state_tensors(self) -> List[torch.Tensor]:
        """Everything a member's state_dict holds, stacked (no buffers: its parameters)."""
        return self.params

    def stack_states(self, states: Sequence[Dict[str, torch.Tensor]]) -> List[torch.Tensor]:
        """Members' state_dicts, stacked like :attr:`state_tensors`."""
        return [self._stack(j, [st[n] for st in states], p)
                for j, (n, p) in enumerate(zip(self.state_names, self.state_tensors))]


class GridStack(PlainStack):
    """A PlainStack whose members' lone tensors sit inside their stacked slices at the advanced
    indices :meth:`_grid` gives (a Transformer's head-by-head embedding, a GRU's gate blocks):
    stacking, unstacking and the padding masks follow from those indices alone."""

    def _member_shape(self, j: int, i: int) -> Tuple[int, ...]:
        """Member i's lone shape of parameter j."""
        raise NotImplementedError

    def _grid(self, j: int, i: int) -> Tuple[torch.Tensor, ...]:
        """Advanced indices of member i's lone tensor of parameter j inside its slice."""
        raise NotImplementedError

    @staticmethod
    def _pair(idx: List[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        """The (rows, cols) grid of one or two index lists (a 1-D tensor is stored (1, n))."""
        if len(idx) == 1:
            return (torch.zeros(1, dtype=torch.long), idx[0])
        return (idx[0][:, None], idx[1][None, :])

    def _stack(self, j: int, tensors: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(like, requires_grad=False)
        for i, t in enumerate(tensors):
            grid = self._grid(j, i)
            out[i][grid] = t.to(out.device, out.dtype).reshape(out[i][grid].shape)
        return out

    def stack(self, tensors: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """The members' lone tensors of one parameter, stacked and zero-padded into ``like``'s
        shape (``like`` is one of :attr:`params`): the inverse of :meth:`member_state`."""
        j = next((k for k, p in enumerate(self.params) if p is like), None)
        if j is None:
            raise ValueError(f"{type(self).__name__}.stack: 'like' is none of its parameters")
        return self._stack(j, tensors, like)

    def member_state(self, i: int, tensors: Optional[List[torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """Member ``i``'s unpadded tensors under nn.Module names (default: its parameters)."""
        tensors = tensors if tensors is not None else self.params
        return {name: t[i].detach()[self._grid(j, i)].reshape(self._member_shape(j, i)).cpu().clone()
                for j, (name, t) in enumerate(zip(self.names, tensors))}

    def real_entries(self) -> List[torch.Tensor]:
        """Each parameter's real entries (bool, its stored shape) per member."""
        m = len(self.widths)
        return [self._stack(j, [torch.ones(self._member_shape(j, i)) for i in range(m)], p) > 0
                for j, p in enumerate(self.params)]
