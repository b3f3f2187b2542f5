"""RemoteSwitchMixtureOfExperts: top-1 routing (Switch Transformer style) over the remote expert grid, with the
load-balancing loss that keeps the router from sending every sample to the same few experts."""

from __future__ import annotations

import torch

from hiveengine.errors import ConfigurationError
from hiveengine.moe.client.moe import RemoteMixtureOfExperts, _RemoteMixture


class RemoteSwitchMixtureOfExperts(RemoteMixtureOfExperts):
    """Each sample goes to its single best alive expert; the output is scaled by the router's probability of that
    expert (the product over grid dimensions of the softmax of its coordinate), so the router learns. Returns
    (output, balancing_loss); add `balancing_loss` times a small coefficient to the training loss."""

    def __init__(self, in_features: int, *args, **kwargs):
        kwargs.setdefault("k_best", 1)
        super().__init__(in_features, *args, **kwargs)
        if self.k_best != 1:
            raise ConfigurationError(f"a switch layer routes each sample to one expert; got k_best={self.k_best}")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Route each row to its top-1 expert; return (output scaled by the router probability, load-balancing
        loss to add to the training loss)."""
        grid_scores, coords, dispatch = self.route(x)
        answer = _RemoteMixture.apply(torch.zeros_like(coords[..., 0], dtype=x.dtype), x, self, dispatch)
        probs = [torch.softmax(s, dim=-1) for s in grid_scores]
        gate = torch.ones(x.shape[0], 1, device=x.device, dtype=x.dtype)
        for level, p in enumerate(probs):
            gate = gate * p.gather(1, coords[:, :1, level])
        output = answer * gate.view(-1, *([1] * (answer.dim() - 1)))
        routed = dispatch.mask(dispatch.responded)[:, 0].to(x.device)
        loss = x.new_zeros(())
        for level, (p, size) in enumerate(zip(probs, self.grid_size, strict=True)):
            counts = torch.zeros(size, device=x.device, dtype=x.dtype)
            counts.index_add_(0, coords[routed, 0, level], torch.ones_like(coords[routed, 0, level], dtype=x.dtype))
            fraction = counts / routed.sum().clamp_min(1)
            loss = loss + size * (fraction * p.mean(dim=0)).sum()
        return output, loss
