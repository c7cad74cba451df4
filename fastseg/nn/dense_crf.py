import torch

from ..ops.dense_crf import dense_crf


class DenseCRF(torch.nn.Module):
    """Dense-CRF mean-field refinement as a layer (Kraehenbuehl & Koltun, NIPS 2011); see
    ``fastseg.dense_crf`` for the parameters. ``forward(scores, image)``: scores (B, L, H, W),
    image (B, C, H, W) uint8 or float; returns the marginals Q (B, L, H, W), float32.

    Example:
        >>> crf = fastseg.nn.DenseCRF(iterations=10)
        >>> q = crf(logits, images)
    """

    def __init__(self, iterations=5, gaussian=dict(sxy=3, compat=3), bilateral=dict(sxy=80, srgb=13, compat=10),
                 unary="logits", *, backend="auto"):
        super().__init__()
        self.iterations = iterations
        self.gaussian = None if gaussian is None else dict(gaussian)
        self.bilateral = None if bilateral is None else dict(bilateral)
        self.unary = unary
        self.backend = backend

    def forward(self, scores, image=None):
        return dense_crf(scores, image, iterations=self.iterations, gaussian=self.gaussian,
                         bilateral=self.bilateral, unary=self.unary, backend=self.backend)

    def extra_repr(self):
        return (f"iterations={self.iterations}, gaussian={self.gaussian}, bilateral={self.bilateral}, "
                f"unary={self.unary!r}")
