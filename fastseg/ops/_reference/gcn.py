"""The Global Convolutional Network block in plain PyTorch: the oracle and the fallback.

Peng et al., "Large Kernel Matters -- Improve Semantic Segmentation by Global Convolutional
Network" (CVPR 2017), Fig. 2(b): four F.conv2d calls and an add,

    left  = conv_1xk(conv_kx1(x, w_l1) + b_l1, w_l2) + b_l2
    right = conv_kx1(conv_1xk(x, w_r1) + b_r1, w_r2) + b_r2
    out   = left + right

each convolution 'same'-padded by dilation * (k - 1) / 2 along its long axis.
"""
from ..._layout import output_memory_format
from .atrous import conv2d


def branches(input, w_l1, w_l2, w_r1, w_r2, b_l1, b_l2, b_r1, b_r2, dilation):
    """(left, right) for input (B, Cin, H, W); the weights as in ``gcn_conv2d``."""
    k = w_l1.shape[2]
    p = dilation * (k - 1) // 2
    tall = dict(stride=(1, 1), padding=(p, 0), dilation=(dilation, 1), groups=1)  # k x 1
    wide = dict(stride=(1, 1), padding=(0, p), dilation=(1, dilation), groups=1)  # 1 x k
    left = conv2d(conv2d(input, w_l1, b_l1, **tall), w_l2, b_l2, **wide)
    right = conv2d(conv2d(input, w_r1, b_r1, **wide), w_r2, b_r2, **tall)
    return left, right


def gcn_conv2d(input, w_l1, w_l2, w_r1, w_r2, b_l1, b_l2, b_r1, b_r2, dilation):
    """input (B, Cin, H, W) -> (B, Cout, H, W) in input's memory format."""
    left, right = branches(input, w_l1, w_l2, w_r1, w_r2, b_l1, b_l2, b_r1, b_r2, dilation)
    return (left + right).contiguous(memory_format=output_memory_format(input))
