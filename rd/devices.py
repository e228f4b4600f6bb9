"""The devices a model can run on, known without importing torch when torch is not loaded yet.

The studio's sidebar lists devices on its first paint, which otherwise needs no torch (importing
it costs about 2 s on this class of machine). Before torch is imported the CUDA driver is asked
directly; once torch is imported it answers itself. Both honour ``CUDA_VISIBLE_DEVICES``. (With a
CPU-only torch on a machine that has a driver the first answer can list a GPU torch cannot use:
choosing it then fails with the message of ``rd.model.resolve_device``.)
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys

CUDA_DRIVER_LIBRARIES = ("libcuda.so.1", "libcuda.so", "nvcuda.dll")


@functools.cache  # asked on every page run of the studio: the driver is loaded once
def _driver_gpu_count() -> int:
    for name in CUDA_DRIVER_LIBRARIES:
        try:
            driver = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    return 0


def gpu_count() -> int:
    """How many CUDA GPUs this process can use."""
    torch = sys.modules.get("torch")
    # Another thread may be importing torch right now (the studio loads a model in the
    # background): a partly initialised module is not asked.
    if torch is not None and not getattr(torch.__spec__, "_initializing", False):
        with contextlib.suppress(AttributeError):
            return torch.cuda.device_count()
    return _driver_gpu_count()


def device_choices() -> list[str]:
    """``cpu`` then ``cuda:0``, ``cuda:1``…: what a user may pick to run a model on."""
    return ["cpu", *(f"cuda:{index}" for index in range(gpu_count()))]
