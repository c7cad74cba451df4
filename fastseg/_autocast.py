"""torch.autocast for fastseg's convolution ops: under autocast they cast as F.conv2d does."""
import torch


def enabled(device_type):
    """Whether autocast is on for ``device_type``."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch before 2.4 takes no device type
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    except RuntimeError:  # a device type without autocast (meta): nothing casts there
        return False


def _dtype(device_type):
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type)
    return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()


def lower_precision(x, *tensors):
    """``tensors`` as autocast's lower-precision ops (F.conv2d) take them: when autocast is on for
    x's device, every floating tensor but a float64 one cast to autocast's dtype (float64 stays,
    so a float64 call is refused as a dtype mismatch, as F.conv2d refuses it); else as given."""
    if not isinstance(x, torch.Tensor) or not enabled(x.device.type):
        return tensors
    dtype = _dtype(x.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)
