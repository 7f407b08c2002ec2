"""Models used by the worked problems."""

from innerloop.models.mlp import MLP

__all__ = ["MLP"]
