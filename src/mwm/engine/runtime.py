"""Device, precision and Lightning Fabric in one place.

``make_fabric`` turns pretraining's hardware options (accelerator, devices, nodes, strategy, precision) into a
Fabric; ``device_fabric`` does it for the transfer tasks, which run on one device named by one string
(``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``gpu``, ``mps``) and are launched at once. A combination Fabric refuses
is an :class:`~mwm.errors.MWMError` naming the options, never a Lightning traceback.
"""

from __future__ import annotations

from typing import Literal, get_args

from ..errors import MWMError

__all__ = ["Precision", "PRECISIONS", "AutoDevice", "check_device", "split_device", "make_fabric", "device_fabric"]

Precision = Literal["32-true", "bf16-mixed", "16-mixed"]
PRECISIONS: tuple[str, ...] = get_args(Precision)

# what ``device="auto"`` may pick: Fabric's own order (cuda, then mps, then cpu), or cuda else cpu (detection:
# torchvision's Mask R-CNN ops are not all implemented on MPS)
AutoDevice = Literal["fabric", "cuda_or_cpu"]


def check_device(value: str) -> str:
    """A config validator: ``value`` stripped and lower-cased; ``kind:N`` needs an integer index."""
    v = str(value).strip().lower()
    if ":" in v and not v.split(":", 1)[1].isdigit():
        raise ValueError(f"a device is 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'; got '{v}'")
    return v


def split_device(device: str) -> tuple[str, int | list[int]]:
    """``cuda:1`` → ``("cuda", [1])`` (Fabric's accelerator and devices); ``cpu`` → ``("cpu", 1)``."""
    if ":" in device:
        acc, idx = device.split(":", 1)
        if not idx.isdigit():
            raise MWMError(f"device {device!r}: expected e.g. cuda:1")
        return acc, [int(idx)]
    return device, 1


def make_fabric(accelerator: str = "auto", devices: int | str | list[int] = 1, num_nodes: int = 1,
                strategy: str = "auto", precision: str = "32-true"):
    """A Lightning Fabric for these hardware options (not launched); a bad combination is an :class:`MWMError`."""
    from lightning.fabric import Fabric

    try:
        return Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                      precision=precision)
    except Exception as e:  # Fabric raises ValueError/RuntimeError/MisconfigurationException for these
        raise MWMError(f"cannot run on accelerator={accelerator} devices={devices} num_nodes={num_nodes} "
                       f"strategy={strategy} precision={precision}: {e}") from e


def _auto_accelerator(device: str, auto: AutoDevice) -> str:
    if device != "auto" or auto == "fabric":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_fabric(device: str = "auto", precision: str = "32-true", auto: AutoDevice = "fabric"):
    """A launched one-device Fabric for a transfer task: ``device`` as :func:`check_device` accepts it.

    ``auto`` says what ``device="auto"`` means (see :data:`AutoDevice`). Raises :class:`MWMError` saying the device
    and precision when Fabric cannot run them here (e.g. ``cuda`` on a machine without CUDA).
    """
    from lightning.fabric import Fabric

    acc, devices = split_device(_auto_accelerator(device, auto))
    try:
        fabric = Fabric(accelerator=acc, devices=devices, precision=precision)
        fabric.launch()
    except Exception as e:
        raise MWMError(f"cannot run on device={device} precision={precision}: {e}") from e
    return fabric
