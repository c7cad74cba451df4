"""Atrous convolution layers: ``AtrousConvBNReLU`` and DeepLab's ``ASPP``.

Yu & Koltun, "Multi-Scale Context Aggregation by Dilated Convolutions" (ICLR 2016); Chen et al.,
"DeepLab: Semantic Image Segmentation with Deep Convolutional Nets, Atrous Convolution, and Fully
Connected CRFs" (TPAMI 2017; ASPP v2) and "Rethinking Atrous Convolution for Semantic Image
Segmentation" (2017; ASPP v3 with image pooling and batch normalisation).

In training mode the layers run plain PyTorch (F.conv2d, nn.BatchNorm2d, F.relu), so BatchNorm
keeps its exact semantics: batch statistics, running-stat updates, momentum. In eval mode BatchNorm
is folded into the per-channel scale and shift of ``fastseg.atrous_conv2d``'s fused epilogue.
"""
import contextlib
import numbers

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .. import _backends
from .._checks import is_plain_batch
from .._layout import output_memory_format
from ._kept import KeepsDerived, cached, runs_submodules
from ..ops import atrous as atrous_ops
from ..ops._reference import atrous as reference_atrous
from ..ops.atrous import _cudnn_forward, _padding, atrous_conv2d, atrous_output_size

__all__ = ["AtrousConvBNReLU", "ASPP"]


def fold_batch_norm(bn, dtype):
    """(scale, shift) with bn(y) == scale * y + shift per channel, for bn in eval mode."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale.to(dtype), shift.to(dtype)


def folds_batch_norm(layer):
    """Whether a conv (+ BatchNorm) layer may run with its BatchNorm folded: the layer and its
    BatchNorm in eval mode with running statistics. A BatchNorm set to train on its own (as
    test-time adaptation does) or without running statistics normalises by the batch."""
    bn = layer.bn
    if layer.training:
        return False
    return bn is None or (not bn.training and bn.track_running_stats and bn.running_mean is not None)


def fusable_residual(conv, x, residual):
    """Whether the fused call can add ``residual`` to ``conv(x)``: a tensor of the output's shape,
    dtype and device (else it broadcasts, or differs, and is added after the call)."""
    if not isinstance(residual, torch.Tensor) or residual.dtype != x.dtype or residual.device != x.device:
        return False
    size = atrous_output_size(x.shape[-2:], conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    return tuple(residual.shape) == (*x.shape[:-3], conv.out_channels, *size)


class HandPadding(TorchFunctionMode):
    """Within it, each F.conv2d on the CPU pads the map by hand where the kernel reaches past it
    (``reference_atrous.reaches_past``), for the layers' own nn.Conv2d modules: those run where hooks
    or autocast need them, and keep their type (torch.ao.quantization, for one, maps modules by type)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d:
            out = _conv2d_padded_by_hand(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


def _as_pair(value):
    """An int, or a sequence of one or two ints (as F.conv2d takes them), as a pair."""
    if isinstance(value, int):
        return (value, value)
    value = tuple(value)
    return value * 2 if len(value) == 1 else value


def _conv2d_padded_by_hand(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """F.conv2d with the map zero-padded by F.pad and no padding argument, where the kernel reaches
    past the map along a padded axis (on the CPU); None elsewhere. 'same' pads as F.conv2d does,
    the odd pixel at the end."""
    if not isinstance(input, torch.Tensor) or not isinstance(weight, torch.Tensor) or input.dim() not in (3, 4):
        return None
    kernel, dilation = tuple(weight.shape[-2:]), _as_pair(dilation)
    if isinstance(padding, str):
        if padding != "same" or _as_pair(stride) != (1, 1):  # 'valid': nothing to pad; F.conv2d refuses
            return None                                         # 'same' with a stride
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        sides = [(t // 2, t - t // 2) for t in total]
    else:
        sides = [(p, p) for p in _as_pair(padding)]
    if len(sides) != 2 or len(dilation) != 2 or not reference_atrous.reaches_past(
            input, kernel, [max(side) for side in sides], dilation):
        return None  # F.conv2d itself (and its error for a malformed argument)
    (top, bottom), (left, right) = sides
    return F.conv2d(F.pad(input, (left, right, top, bottom)), weight, bias, stride, 0, dilation, groups)


def hand_padded(x):
    """HandPadding where it matters: on the CPU with autograd recording (the crash is in the backward)."""
    if isinstance(x, torch.Tensor) and x.device.type == "cpu" and torch.is_grad_enabled():
        return HandPadding()
    return contextlib.nullcontext()


def eager_conv(conv, x, own_module=False):
    """``conv(x)`` for a layer's eager path (training, or BatchNorm in its own mode). On the CPU, where
    the kernel reaches past the map along a padded axis, through the C++ ``atrous_conv2d`` instead
    (the same convolution): ATen's backward there (oneDNN's k x 1 weight gradient) crashes or returns
    garbage unless the map is padded by hand, which that op's backward does. ``own_module``: the
    module itself is called (its hooks see the call), under HandPadding."""
    if own_module:
        with hand_padded(x):
            return conv(x)
    if (_backends.EXTENSION_LOADED and isinstance(x, torch.Tensor) and x.dim() in (3, 4)
            and conv.padding_mode == "zeros"):
        padding = _padding(conv.padding, conv.kernel_size, conv.dilation)
        if reference_atrous.reaches_past(x, conv.kernel_size, padding, conv.dilation):
            return atrous_conv2d(x, conv.weight, conv.bias, stride=conv.stride, padding=padding,
                                 dilation=conv.dilation, groups=conv.groups, backend="cpp")
    return conv(x)


def _bn_tensors(bn):
    return (bn.weight, bn.bias, bn.running_mean, bn.running_var)


class AtrousConvBNReLU(KeepsDerived, nn.Module):
    """Conv2d (any dilation) -> BatchNorm2d -> (+ residual) -> ReLU, fused in eval mode.

    ``forward(x, residual=None)``: x (B, in_channels, H, W) -> (B, out_channels, Ho, Wo); the
    optional residual (the output's shape, or one that broadcasts to it) is added after BatchNorm
    and before ReLU (as in a ResNet block's last convolution). State-dict keys are those of a plain
    ``conv`` + ``bn`` pair. The fused call folds the BatchNorm's running statistics: it runs when
    the layer and ``bn`` are both in eval mode (a ``bn`` set to train on its own, as test-time
    adaptation does, normalises by the batch, eagerly).

    Example:
        >>> layer = fastseg.nn.AtrousConvBNReLU(2048, 256, 3, dilation=12).eval()
        >>> layer(torch.randn(1, 2048, 65, 65)).shape
        torch.Size([1, 256, 65, 65])
    """

    def __init__(self, in_channels, out_channels, kernel_size=3, *, dilation=1, stride=1, padding="same",
                 groups=1, bias=False, relu=True, eps=1e-5, momentum=0.1, backend="auto"):
        super().__init__()
        _backends.check_name("AtrousConvBNReLU", backend, atrous_ops._IMPLEMENTED)
        if isinstance(padding, str):
            k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
            d = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
            padding = _padding(padding, k, d)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum)
        self.relu = relu
        self.backend = backend

    def forward(self, x, residual=None):
        own_modules = runs_submodules(self, x)  # hooks: the modules themselves are called
        if not folds_batch_norm(self) or own_modules:  # eager: BatchNorm in its own mode
            y = self.bn(eager_conv(self.conv, x, own_modules))
            if residual is not None:
                y = y + residual
            return F.relu(y) if self.relu else y
        c = self.conv
        if not isinstance(x, torch.Tensor):  # the op says what is wrong
            return atrous_conv2d(x, c.weight, backend=self.backend)
        scale, shift = self.folded(x.dtype, x.device)
        if residual is not None and not fusable_residual(c, x, residual):
            # One that broadcasts (or another dtype or device): added after the fused call, as in training.
            y = atrous_conv2d(x, c.weight, stride=c.stride, padding=c.padding, dilation=c.dilation, groups=c.groups,
                              scale=scale, shift=shift, backend=self.backend) + residual
            return F.relu(y) if self.relu else y
        if x.is_cuda and x.dtype != torch.float64 and self.backend in ("auto", "cudnn"):
            # cuDNN's fused kernel takes the scale in the weights: that copy is kept too.
            fmt = output_memory_format(x)
            weight = cached(self, "weight", (c.weight, scale), (fmt,),
                            lambda: (c.weight * scale.view(-1, 1, 1, 1)).contiguous(memory_format=fmt))
            if residual is None and self._plain_call(x, weight, shift):
                # Small calls are host-bound on a GPU: a plain input for this layer's own, already
                # checked parameters goes straight to the kernel call.
                return _cudnn_forward(x, weight, None, shift, None, list(c.stride), list(c.padding), list(c.dilation),
                                      c.groups, self.relu)
            return atrous_conv2d(x, weight, stride=c.stride, padding=c.padding, dilation=c.dilation, groups=c.groups,
                                 shift=shift, residual=residual, activation="relu" if self.relu else None,
                                 backend="cudnn")
        return atrous_conv2d(
            x, c.weight, stride=c.stride, padding=c.padding, dilation=c.dilation, groups=c.groups,
            scale=scale, shift=shift, residual=residual, activation="relu" if self.relu else None,
            backend=self.backend,
        )

    def _plain_call(self, x, weight, shift):
        """Whether x is a batch this layer's convolution takes as it is (4-D, its dtype, device and
        channels, a non-empty output) with nothing traced or recorded: anything else goes through
        ``atrous_conv2d``'s checks and custom op."""
        if _backends.tracing() or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                                 or shift.requires_grad)):
            return False
        c = self.conv
        if not is_plain_batch(x, c.in_channels, weight):
            return False
        sizes = zip(x.shape[2:], c.kernel_size, c.stride, c.padding, c.dilation)
        return all((n + 2 * p - d * (k - 1) - 1) // s >= 0 for n, k, s, p, d in sizes)

    def folded(self, dtype, device):
        """(scale, shift) with relu(bn(conv(x) + bias)) = relu(scale * conv(x) + shift) in eval mode
        (the BatchNorm and the conv's bias folded), kept while the parameters are unchanged."""
        def compute():
            scale, shift = fold_batch_norm(self.bn, dtype)
            if self.conv.bias is not None:
                shift = shift + scale * self.conv.bias.to(dtype)
            return scale, shift

        return cached(self, "bn", _bn_tensors(self.bn) + (self.conv.bias,), (dtype, device, self.bn.eps), compute)

    def extra_repr(self):
        return f"relu={self.relu}"


class ASPP(KeepsDerived, nn.Module):
    """Atrous Spatial Pyramid Pooling, DeepLab v2 or v3.

    ``version='v2'`` (Chen et al., TPAMI 2017): parallel 3x3 convolutions (with bias) at
    ``rates`` (default 6/12/18/24), their outputs summed; out_channels is typically the number of
    classes. The branches accumulate into one output: each fused convolution adds the running sum
    as its residual, so no per-branch map is kept.

    ``version='v3'`` (Chen et al., 2017): a 1x1 convolution, 3x3 convolutions at ``rates``
    (default 6/12/18 at output stride 16, 12/24/36 at output stride 8) and image pooling (global
    average, 1x1 convolution, broadcast back), each with BatchNorm and ReLU, concatenated and
    projected by a 1x1 convolution with BatchNorm and ReLU. (The paper's dropout after the
    projection belongs to the head that uses it.) In eval mode the concatenation is never written:
    the projection is one fused 1x1 convolution per branch, each adding the sum so far, with the
    pooled branch's constant term folded in.

    On CUDA in eval mode with float16/bfloat16 and no gradient recorded (or backend='triton', also
    on CPU tensors under TRITON_INTERPRET=1) every branch comes from one GEMM of the input against
    all branches' taps (kernels/taps_conv.py; taps that never meet the map are left out): v2's sum
    is one pass over the taps' products, v3's concatenation one pass with each branch's BatchNorm
    and ReLU, then the projection through cuDNN's fused kernel. The packed weights are kept between
    calls (see ``cached``); float32 on CUDA runs cuDNN per branch (v3) or eager's sum (v2).

    ``forward(x)``: (B, in_channels, H, W) -> (B, out_channels, H, W).

    Example:
        >>> aspp = fastseg.nn.ASPP(2048, 256, version='v3', output_stride=8).eval()
        >>> aspp(torch.randn(1, 2048, 65, 65)).shape
        torch.Size([1, 256, 65, 65])
    """

    def __init__(self, in_channels, out_channels=256, *, version="v3", rates=None, output_stride=16,
                 image_pooling=True, backend="auto"):
        super().__init__()
        _backends.check_name("ASPP", backend, atrous_ops._IMPLEMENTED)
        if version not in ("v2", "v3"):
            raise ValueError(f"ASPP: version must be 'v2' or 'v3', got {version!r}")
        if output_stride not in (8, 16):
            raise ValueError(f"ASPP: output_stride must be 8 or 16, got {output_stride!r}")
        if rates is None:
            rates = (6, 12, 18, 24) if version == "v2" else (6, 12, 18)
            if version == "v3" and output_stride == 8:
                rates = tuple(2 * r for r in rates)
        if not isinstance(rates, (tuple, list)) or not rates or not all(
                isinstance(r, numbers.Integral) and not isinstance(r, bool) and r >= 1 for r in rates):
            raise ValueError(f"ASPP: rates must be a non-empty tuple of ints >= 1, got {rates!r}")
        rates = tuple(int(r) for r in rates)
        self.version, self.rates, self.backend = version, rates, backend
        self.image_pooling = image_pooling and version == "v3"
        if version == "v2":
            self.branches = nn.ModuleList(
                nn.Conv2d(in_channels, out_channels, 3, padding=r, dilation=r, bias=True) for r in rates
            )
            return
        self.branches = nn.ModuleList(
            [AtrousConvBNReLU(in_channels, out_channels, 1, backend=backend)]
            + [AtrousConvBNReLU(in_channels, out_channels, 3, dilation=r, backend=backend) for r in rates]
        )
        if self.image_pooling:
            self.pooling = AtrousConvBNReLU(in_channels, out_channels, 1, backend=backend)
        n = len(self.branches) + int(self.image_pooling)
        self.project = AtrousConvBNReLU(n * out_channels, out_channels, 1, backend=backend)

    def _folds(self):
        """Whether the eval-mode paths, which fold every BatchNorm, may run: this module and each
        conv+BN layer in eval mode with running statistics (a BatchNorm set to train on its own, as
        test-time adaptation does, normalises by the batch)."""
        if self.training:
            return False
        if self.version == "v2":
            return True
        layers = [*self.branches, self.project] + ([self.pooling] if self.image_pooling else [])
        return all(folds_batch_norm(layer) for layer in layers)

    def forward(self, x):
        own_modules = runs_submodules(self, x)
        folds = self._folds() and not own_modules
        if folds and isinstance(x, torch.Tensor) and x.dim() == 3:  # unbatched (C, H, W), as conv2d takes
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if folds and self._taps_route(x):
            return self._forward_taps(x)
        if self.version == "v2":
            out = None
            # On CUDA the fused residual chain is eager's kernels plus a Python op per branch:
            # 0.6x eager's own sum at batch 1 (float32, 21 classes; H200), so 'auto' runs eager's.
            eager = self.training or own_modules or (
                isinstance(x, torch.Tensor) and x.is_cuda and self.backend == "auto")
            for conv in self.branches:
                if eager:
                    y = eager_conv(conv, x, own_modules)
                    out = y if out is None else out + y
                else:  # sum accumulated through the fused residual add
                    out = atrous_conv2d(
                        x, conv.weight, conv.bias, padding=conv.padding, dilation=conv.dilation,
                        residual=out, backend=self.backend,
                    )
            return out
        outs = [branch(x) for branch in self.branches]
        pooled = self.pooling(F.adaptive_avg_pool2d(x, 1)) if self.image_pooling else None
        if folds:
            return self._project_without_concat(outs, pooled)
        if pooled is not None:
            outs.append(pooled.expand(-1, -1, *x.shape[-2:]))
        return self.project(torch.cat(outs, 1).contiguous(memory_format=output_memory_format(x)))

    def _project_without_concat(self, outs, pooled):
        # Eval: relu(bn(W @ concat)) = relu(sum_b (scale W_b) @ out_b + shift): one fused 1x1
        # convolution per branch, each adding the sum so far as its residual, and the pooled branch's
        # term (constant over the map) in the shift (one image) or the first residual. The
        # concatenated map is never written (at 2048 -> 256, 65x65: 286 ms against 304 with it).
        proj = self.project
        weight, shift = self._folded_projection(outs[0].dtype, outs[0].device)
        C = outs[0].shape[1]
        total = None
        if pooled is not None:
            term = F.conv2d(pooled, weight[:, len(outs) * C:])  # (B, out, 1, 1)
            if term.shape[0] == 1 and not _backends.tracing():  # a trace would freeze the branch
                shift = shift + term.flatten()
            else:
                total = term.expand(-1, -1, *outs[0].shape[-2:])
                total = total.contiguous(memory_format=output_memory_format(outs[0]))
        for i, out in enumerate(outs):
            last = i == len(outs) - 1
            total = atrous_conv2d(
                out, weight[:, i * C:(i + 1) * C], shift=shift if last else None, residual=total,
                activation="relu" if last and proj.relu else None, backend=self.backend,
            )
        return total

    def _taps_route(self, x):
        # GPU (or the interpreter with backend='triton'): every branch from one GEMM over the input
        # channels (kernels/taps_conv.py). 'auto' takes it for float16/bfloat16 on CUDA, where it
        # was measured; float32 there keeps cuDNN's convolutions (cuBLAS runs float32 GEMMs without
        # TF32 unless torch.backends.cuda.matmul.allow_tf32 is set).
        first = self.branches[0]
        weight = first.weight if self.version == "v2" else first.conv.weight
        if not is_plain_batch(x, weight.shape[1], weight):
            return False  # the per-branch path's checks name what is wrong (or handle an empty batch)
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False  # its kernels have no backward: autograd takes the per-branch ops
        if self.backend == "triton":
            return x.is_cuda or _backends.TRITON_INTERPRETED
        return self.backend == "auto" and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)

    def _forward_taps(self, x):
        from ..kernels import taps_conv

        if self.version == "v2":
            convs = list(self.branches)
            weights, dilations = [c.weight for c in convs], [c.dilation for c in convs]
            biases = [c.bias for c in convs]

            def pack():
                bias = None if biases[0] is None else sum(biases)
                return taps_conv.pack_sum(weights, dilations, bias, x.shape[-2:])

            packed = cached(self, "packed", weights + biases, (x.shape[-2:],), pack)
            return taps_conv.conv_sum(x, weights, dilations, packed=packed)
        weights, dilations = [b.conv.weight for b in self.branches], [b.conv.dilation for b in self.branches]
        folds = [b.folded(x.dtype, x.device) for b in self.branches]
        scales, shifts = [f[0] for f in folds], [f[1] for f in folds]
        packed = cached(self, "packed", weights + scales + shifts, (x.shape[-2:],),
                        lambda: taps_conv.pack_branches(weights, dilations, scales, shifts, x.shape[-2:]))
        concat = taps_conv.parallel_conv_bn_relu(x, weights, dilations, scales, shifts, packed=packed)
        proj = self.project
        n = concat.shape[1]
        weight, shift = self._folded_projection(x.dtype, x.device)
        main = cached(self, "project_main", (weight,), (),
                      lambda: weight[:, :n].contiguous(memory_format=torch.channels_last))
        residual = None
        if self.image_pooling:
            term = F.conv2d(self.pooling(F.adaptive_avg_pool2d(x, 1)), weight[:, n:])  # (B, out, 1, 1)
            if term.shape[0] == 1 and not _backends.tracing():  # a trace would freeze the branch
                shift = shift + term.flatten()
            else:
                residual = term.expand(-1, -1, *x.shape[-2:]).contiguous(memory_format=torch.channels_last)
        out = atrous_conv2d(concat, main, shift=shift, residual=residual, activation="relu" if proj.relu else None)
        return out.contiguous(memory_format=output_memory_format(x))

    def _folded_projection(self, dtype, device):
        """(weight, shift) of the projection with its BatchNorm (and bias) folded: relu(bn(W @ y)) =
        relu((scale W) @ y + shift), kept while the parameters are unchanged."""
        proj = self.project
        scale, shift = proj.folded(dtype, device)
        weight = cached(self, "project", (proj.conv.weight, scale), (),
                        lambda: proj.conv.weight * scale.view(-1, 1, 1, 1))
        return weight, shift

    def extra_repr(self):
        return f"version={self.version!r}, rates={self.rates}, image_pooling={self.image_pooling}"
