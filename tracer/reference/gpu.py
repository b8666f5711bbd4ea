"""The reference substrate's optional GPU step: dense float32 matrix products on a CUDA device.

Kimera can run with GPU acceleration; this step gives the reference substrate something the
GPU does inside one span, so a trace shows a GPU track on a machine with a GPU. It runs only
when asked for (`python -m tracer.reference --gpu`, `Takwin.enable_gpu()`) and only where a
CUDA device and a GPU array library are present: CuPy, else PyTorch with CUDA. Otherwise it is
skipped and `GpuWork.reason` says why.

The step's result is a checksum of the GPU's output, checked against nothing and kept out of the
cycle's digest: digests are the same with and without a GPU (floating-point sums on a GPU are
not bit-reproducible across devices, and the digest must be).

Per call it allocates a scratch buffer (so the process's GPU memory rises inside the span),
multiplies two matrices until `work_ms` have passed, waits for the device to finish (so no GPU
work leaks past the span's end), then frees the buffer and returns the memory to the driver.
"""

from __future__ import annotations

import time
from typing import Any, Optional

N = 4096  # matrix side: one product is 137 GFLOP, milliseconds on any recent GPU
SCRATCH_BYTES = 256 << 20


class GpuWork:
    def __init__(self, work_ms: float = 400.0) -> None:
        self.work_ms = float(work_ms)
        self.backend = ""  # "cupy" | "torch"
        self.device = ""
        self._xp: Any = None
        self._a: Any = None
        self._b: Any = None
        self.reason = self._detect()  # why the step cannot run here ("" when it can)

    def _detect(self) -> str:
        why = []
        try:
            import cupy  # noqa: PLC0415

            n = cupy.cuda.runtime.getDeviceCount()
            if n > 0:
                self.backend, self._xp = "cupy", cupy
                props = cupy.cuda.runtime.getDeviceProperties(0)
                name = props.get("name", b"")
                self.device = name.decode() if isinstance(name, bytes) else str(name)
                return ""
            why.append("CuPy sees no CUDA device")
        except ImportError:
            why.append("CuPy not installed")
        except Exception as e:  # noqa: BLE001 - CUDA runtime errors of every kind mean: no GPU
            why.append(f"CuPy: {type(e).__name__}: {e}")
        try:
            import torch  # noqa: PLC0415

            if torch.cuda.is_available():
                self.backend, self._xp = "torch", torch
                self.device = torch.cuda.get_device_name(0)
                return ""
            why.append("PyTorch sees no CUDA device")
        except ImportError:
            why.append("PyTorch not installed")
        except Exception as e:  # noqa: BLE001
            why.append(f"PyTorch: {type(e).__name__}: {e}")
        return "no GPU array library with a CUDA device (" + "; ".join(why) + ")"

    def warm_up(self) -> None:
        """Create the CUDA context and the input matrices, outside any span: the first CUDA
        call takes seconds and would otherwise land in the first GPU step."""
        if self.backend == "cupy":
            cp = self._xp
            rng = cp.random.default_rng(1)
            self._a = rng.standard_normal((N, N), dtype=cp.float32)
            self._b = rng.standard_normal((N, N), dtype=cp.float32)
        else:
            torch = self._xp
            g = torch.Generator(device="cuda").manual_seed(1)
            self._a = torch.randn((N, N), device="cuda", dtype=torch.float32, generator=g)
            self._b = torch.randn((N, N), device="cuda", dtype=torch.float32, generator=g)
        self.run(0)

    def _sync(self) -> None:
        if self.backend == "cupy":
            self._xp.cuda.Device().synchronize()
        else:
            self._xp.cuda.synchronize()

    def run(self, seed: int) -> float:
        """Keep the GPU busy for about `work_ms`; returns a checksum of the last product."""
        if self._a is None:
            raise RuntimeError("GpuWork.run before warm_up")
        xp = self._xp
        if self.backend == "cupy":
            scratch = xp.full(SCRATCH_BYTES // 4, float(seed % 7), dtype=xp.float32)
        else:
            scratch = xp.full((SCRATCH_BYTES // 4,), float(seed % 7), dtype=xp.float32, device="cuda")
        c: Optional[Any] = None
        deadline = time.perf_counter() + self.work_ms / 1000.0
        while True:
            for _ in range(4):  # queue a few products, then wait: the queue stays short
                c = self._a @ self._b
            self._sync()
            if time.perf_counter() >= deadline:
                break
        total = float(c[0, :8].sum()) + float(scratch[0])
        del scratch, c
        self._sync()
        if self.backend == "cupy":
            xp.get_default_memory_pool().free_all_blocks()
        else:
            xp.cuda.empty_cache()
        return total
