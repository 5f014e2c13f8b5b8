"""What the engine reads of a stacked model without MLP sites (StackedCNN, StackedTransformer).

Such a model has one architecture for all members (the same parameter names), no
hand-written step and no member-by-member form. What the MLP population's regularizer paths
read of it: its dropout sites (:attr:`site_sizes`, :attr:`site_weights`), the hidden
activations a forward with ``record`` keeps (``hidden``, ``head_input``, ``unit_mask``), and
where each member's lone weights and head features sit in its slices (``weight_corners``,
``head_columns``).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

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
