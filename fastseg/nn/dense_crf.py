import math
import numbers

import torch

from .._backends import BACKENDS
from ..ops.dense_crf import check_options, dense_crf

_KERNELS = ("gaussian", "bilateral")


class DenseCRF(torch.nn.Module):
    """Dense-CRF mean-field refinement as a layer (Kraehenbuehl & Koltun, NIPS 2011); see
    ``fastseg.dense_crf`` for the parameters. ``forward(scores, image)``: scores (B, L, H, W),
    image (B, C, H, W) uint8 or float; returns the marginals Q (B, L, H, W), float32.

    With ``learnable=True`` it is CRF-as-RNN (Zheng et al., "Conditional Random Fields as
    Recurrent Neural Networks", ICCV 2015): mean field unrolled for ``iterations`` steps and trained
    end to end with the segmentation head below it. Learnable: one weight per kernel
    (``gaussian_weight``, ``bilateral_weight``, initialised to the kernel's ``compat`` number) and
    one label compatibility ``compat`` (num_labels x num_labels) that both kernels share, Potts-
    initialised as in the paper (mu = 1 - I: differing labels pay the kernel's weight), so kernel m
    adds weight_m * mu @ F_m(Q) to the energy. At initialisation this is exactly the fixed layer's
    model: 1 - I and densecrf's -I differ by a per-pixel constant, which the softmax never sees. The
    kernel widths (sxy, srgb) stay fixed, as in the paper. ``checkpoint=True`` recomputes the
    mean-field iterates in backward instead of keeping them (see ``fastseg.dense_crf``).

    Example:
        >>> images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
        >>> logits, target = torch.randn(2, 21, 32, 32), torch.randint(0, 21, (2, 32, 32))
        >>> crf = fastseg.nn.DenseCRF(iterations=10)
        >>> crf(logits, images).shape
        torch.Size([2, 21, 32, 32])
        >>> crf = fastseg.nn.DenseCRF(iterations=5, num_labels=21, learnable=True)
        >>> loss = torch.nn.functional.nll_loss(torch.log(crf(logits, images) + 1e-8), target)
    """

    def __init__(self, iterations=5, gaussian=dict(sxy=3, compat=3), bilateral=dict(sxy=80, srgb=13, compat=10),
                 unary="logits", *, num_labels=None, learnable=False, checkpoint=False, backend="auto"):
        super().__init__()
        # The options are checked here, not at the first forward, so a typo fails where it was made.
        iterations, gaussian, bilateral = check_options(iterations, gaussian, bilateral, unary, checkpoint, "DenseCRF")
        if not isinstance(learnable, bool):
            raise TypeError(f"DenseCRF: learnable must be a bool, got {learnable!r}")
        if backend not in ("auto",) + BACKENDS:
            raise ValueError(f"DenseCRF: backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
        if num_labels is not None and (not isinstance(num_labels, numbers.Integral) or isinstance(num_labels, bool)
                                       or num_labels < 2):
            raise ValueError(f"DenseCRF: num_labels must be an int >= 2 or None, got {num_labels!r}")
        self.iterations = iterations
        self.gaussian = None if gaussian is None else dict(gaussian)
        self.bilateral = None if bilateral is None else dict(bilateral)
        self.unary = unary
        self.num_labels = None if num_labels is None else int(num_labels)
        self.learnable = learnable
        self.checkpoint = checkpoint
        self.backend = backend
        if not self.learnable:
            return
        if num_labels is None:
            raise ValueError("DenseCRF: learnable=True needs num_labels (the size of the learnable compatibility)")
        for name in _KERNELS:
            kernel = getattr(self, name)
            if kernel is None:
                continue
            weight = kernel.get("compat", 3 if name == "gaussian" else 10)
            if not isinstance(weight, numbers.Real) or isinstance(weight, bool) or not math.isfinite(weight):
                raise ValueError(f"DenseCRF: with learnable=True, {name}['compat'] is the kernel's initial weight "
                                 f"and must be a number (the shared compatibility is learnt), got {weight!r}")
            self.register_parameter(f"{name}_weight", torch.nn.Parameter(torch.tensor(float(weight))))
        self.compat = torch.nn.Parameter(1.0 - torch.eye(num_labels))

    def forward(self, scores, image=None):
        if self.num_labels is not None and isinstance(scores, torch.Tensor) and scores.dim() in (3, 4) \
                and scores.shape[-3] != self.num_labels:
            raise ValueError(f"DenseCRF: scores has {scores.shape[-3]} labels (dimension -3, shape "
                             f"{tuple(scores.shape)}) but the layer was built with num_labels={self.num_labels}")
        kernels = {"gaussian": self.gaussian, "bilateral": self.bilateral}
        if self.learnable:
            for name, kernel in kernels.items():
                if kernel is not None:
                    kernels[name] = dict(kernel, compat=getattr(self, f"{name}_weight") * self.compat)
        return dense_crf(scores, image, iterations=self.iterations, unary=self.unary, checkpoint=self.checkpoint,
                         backend=self.backend, **kernels)

    def extra_repr(self):
        extra = f", num_labels={self.num_labels}, learnable=True" if self.learnable else ""
        return (f"iterations={self.iterations}, gaussian={self.gaussian}, bilateral={self.bilateral}, "
                f"unary={self.unary!r}{extra}")
