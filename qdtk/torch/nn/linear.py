"""`BCQLinear`: a Linear whose weight stays packed (docs/FORMAT.md section 3) in memory.

Its buffers are the file's tensors of module M, with the same names and dtypes (`orders`
uint8, `planes` uint32, `row_scale` and `col_scale` float16), so `state_dict()` gives back the
file's bytes and transformers loads a packed checkpoint into it by name; `bias` is the
original Linear's. A rotated module (docs/FORMAT.md, qdtk.math.rotation) first rotates its input,
x -> x Q (the fast Walsh-Hadamard transform; Q comes from the config, it is not a buffer).
The arithmetic is qdtk's (qdtk.math.bcq_matmul on the CPU, qdtk.math.bcq_matmul_cuda on a GPU) on
the tensors' own memory; torch only glues and runs the BLAS product of a tile.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from torch import nn

from qdtk.formats.packed import PackedBCQ, PlaneLayout, bcq_expected, plane_layout
from qdtk.math import bcq_matmul as kernels
from qdtk.math.rotation import Rotation

# Up to this many tokens the product reads the packed bytes only (`kernels.matmul_packed`);
# beyond, tiles of What are dequantised and multiplied with BLAS. bench_infer's crossover
# table as CPU time on one core of the shared machine (load 4-5), ms, packed words / tiles
# (AVX-512 table lookups, 32 rows a call, tables of a chunk of tokens kept in L2):
#   4096 x 4096:  T=1 0.82 / 13.7, T=16 8.1 / 17.6, T=24 11.7 / 18.8, T=32 16.5 / 20.6,
#                 T=48 23.5 / 25.0, T=64 33.9 / 33.0
#   4096 x 12288: T=16 39 / 78, T=32 56 / 82, T=48 86 / 104
# and on both cores (wall time) 4096 x 4096 T=32 28.4 / 40.2, T=48 48.9 / 45.7. The words'
# cost grows with T, the tiles' hardly: they cross between T = 32 and 48 (32: the words won
# in every run).
FEW_TOKENS = 32
# Rows per float32 tile of What (the dense weight never exists whole beyond one tile). The
# tile is BLAS's second operand, and BLAS repacks x for every call: fewer, taller tiles repack
# it less. 4096 x 12288 at T = 256, one core (CPU ms, dense 190-220): 341 rows 300, 1024 rows
# 277, 1365 rows 274; with the tile reused instead of allocated per call, 1024 rows 231.
TILE_ROWS = 1024
_scratch = threading.local()  # one tile buffer per thread, grown on demand, reused

_TORCH_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.uint32): torch.uint32,
                 np.dtype(np.float16): torch.float16}


SCALES = ("row_scale", "col_scale")  # the float16 buffers


class BCQLinear(nn.Module):
    """y = x What^T + bias with What kept as sign planes and float16 scales."""

    def __init__(self, in_features: int, out_features: int, orders, bias: bool = True,
                 dtype: torch.dtype = torch.float32, device=None,
                 rotation: Rotation | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rotation = rotation  # Q: the planes code W Q, so inputs go in as x Q
        orders = np.asarray(orders, np.uint8)
        for name, (dt, shape) in bcq_expected((out_features, in_features), orders).items():
            self.register_buffer(name, torch.empty(shape, dtype=_TORCH_DTYPES[dt], device=device))
        self.orders = torch.from_numpy(orders.copy()).to(device)
        b = torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        self.bias = nn.Parameter(b, requires_grad=False) if bias else None
        self._layouts: dict = {}
        self._cpu: tuple | None = None  # `_cpu_arrays`' views and conversions of the buffers

    @classmethod
    def from_packed(cls, packed: PackedBCQ, bias: torch.Tensor | None = None) -> BCQLinear:
        """The module of a packed layer; its buffers share the arrays' memory (no copy)."""
        n, m = packed.shape
        mod = cls(m, n, packed.orders, bias is not None, device="meta",
                  dtype=bias.dtype if bias is not None else torch.float32,
                  rotation=packed.rotation)
        for name in PackedBCQ.FIELDS:
            setattr(mod, name, torch.from_numpy(np.ascontiguousarray(getattr(packed, name))))
        if bias is not None:
            mod.bias = nn.Parameter(bias, requires_grad=False)
        return mod

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"planes={self.row_scale.shape[0]}, bias={self.bias is not None}"
                + (f", rotation={self.rotation.kind}" if self.rotation else ""))

    def _apply(self, fn, recurse=True):
        """.to(), .float(), .bfloat16() and the like: the float16 scales move with the module
        but keep their dtype (they are the stored bits, read as such by the kernels; a cast
        would change what they mean, and bfloat16 would round them); the bias follows."""
        self._cpu = None  # the buffers are replaced: let the old ones go
        scales = {k: self._buffers[k] for k in SCALES}
        super()._apply(fn, recurse)
        for k, old in scales.items():
            if self._buffers[k].dtype != old.dtype:
                self._buffers[k] = old.to(self._buffers[k].device)
        return self

    def __getstate__(self) -> dict:
        # derived from the buffers (views, device arrays), not state: a copy makes its own
        return {**super().__getstate__(), "_cpu": None, "_layouts": {}}

    def layout(self) -> PlaneLayout:
        """Where each plane lives, from `orders` (recomputed when a load replaces it)."""
        key = ("cpu", self.orders.data_ptr(), self.orders._version)
        if key not in self._layouts:
            self._layouts = {key: plane_layout(self.orders.cpu().numpy(), self.in_features)}
        return self._layouts[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # inference only: the kernels have no backward. detach(), not torch.no_grad(): at one
        # token the decorator's Python cost a tenth of the product's time
        x2 = x.detach().reshape(-1, self.in_features)  # [T, m]
        if x2.dtype != torch.float32 or not x2.is_contiguous():  # each torch call counts at T=1
            x2 = x2.to(torch.float32).contiguous()
        if self.rotation is not None:  # x Q: Numba on the CPU, torch's own ops on a GPU
            x2 = (self.rotation.apply(x2) if x2.is_cuda
                  else torch.from_numpy(self.rotation.apply(x2.numpy())))
        y = _matmul_cuda(self, x2) if x2.is_cuda else _matmul_cpu(self, x2)  # [T, n] float32
        if self.bias is not None:
            y += self.bias
        if x.dtype != torch.float32:
            y = y.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)


def _matmul_cpu(mod: BCQLinear, x: torch.Tensor) -> torch.Tensor:
    """[T, n] float32 = x What^T, by token count (FEW_TOKENS)."""
    return (matmul_packed if x.shape[0] <= FEW_TOKENS else matmul_tiled)(mod, x)


def _cpu_arrays(mod: BCQLinear) -> tuple:
    """(planes, row_scale, col_scale, layout) for Numba: NumPy views of the buffers (no copies;
    float16 scales as their bits, col_scale [C] converted to float32: C is about 2 m, small).
    Made once per set of buffers (at one token, making them took a tenth of the product's
    time): a buffer replaced (load, assignment) or changed in place (its version) remakes them;
    the cache holds the buffers it was made of, so their ids stay theirs."""
    buffers = tuple(mod._buffers.values())  # orders, planes, row_scale, col_scale
    key = tuple((id(b), b._version) for b in buffers)
    if mod._cpu is None or mod._cpu[0] != key:
        arrays = (mod.planes.numpy(), mod.row_scale.numpy().view(np.uint16),  # [n, U], [P, n]
                  mod.col_scale.float().numpy(), mod.layout())  # [C]
        mod._cpu = (key, buffers, arrays)
    return mod._cpu[2]


def matmul_packed(mod: BCQLinear, x: torch.Tensor) -> torch.Tensor:
    """[T, n] float32 on the CPU from the packed bytes."""
    out = kernels.matmul_packed(x.numpy(), *_cpu_arrays(mod))
    return torch.from_numpy(out)


def matmul_tiled(mod: BCQLinear, x: torch.Tensor) -> torch.Tensor:
    """[T, n] float32 on the CPU: tiles of What (exact, L2-sized) times x through BLAS."""
    planes, row_scale, col_scale, L = _cpu_arrays(mod)
    n, m = mod.out_features, mod.in_features
    rows = min(n, TILE_ROWS)
    y = torch.empty(x.shape[0], n)
    tile = _tile_buffer(rows * m).view(rows, m)  # [rows, m] float32
    for r0 in range(0, n, rows):
        r = min(rows, n - r0)
        kernels.dequantize_rows(planes, row_scale, col_scale, L.start, L.width, L.word, L.col,
                                r0, tile.numpy()[:r])
        torch.mm(x, tile[:r].t(), out=y[:, r0 : r0 + r])
    return y


def _tile_buffer(numel: int) -> torch.Tensor:
    """This thread's float32 scratch of at least `numel` elements (allocating tens of MiB per
    call costs page faults every time)."""
    buf = getattr(_scratch, "cpu", None)
    if buf is None or buf.numel() < numel:
        buf = _scratch.cpu = torch.empty(numel)
    return buf[:numel]


def _matmul_cuda(mod: BCQLinear, x: torch.Tensor) -> torch.Tensor:
    """[T, n] float32 on the GPU: Numba CUDA kernels on the tensors via __cuda_array_interface__."""
    from numba import cuda

    from qdtk.math import bcq_matmul_cuda as kcuda

    dev = x.device
    key = (str(dev), mod.orders.data_ptr(), mod.orders._version)
    if key not in mod._layouts:
        host = kcuda.device_layout(mod.layout(), mod.orders.cpu().numpy())
        mod._layouts[key] = {k: cuda.as_cuda_array(torch.from_numpy(v).to(dev))
                             for k, v in host.items()}
    L = mod._layouts[key]
    planes = cuda.as_cuda_array(mod.planes)
    row_scale = cuda.as_cuda_array(mod.row_scale.view(torch.uint16))
    col_scale = cuda.as_cuda_array(mod.col_scale.float())
    n, m = mod.out_features, mod.in_features
    y = torch.empty(x.shape[0], n, device=dev)
    if x.shape[0] <= FEW_TOKENS:
        kcuda.matmul_packed(cuda.as_cuda_array(x), planes, row_scale, col_scale, L,
                            cuda.as_cuda_array(y))
        return y
    rows = min(n, 16 * TILE_ROWS)  # GPU tiles: bigger, for cuBLAS
    tile = torch.empty(rows, m, device=dev)
    orders = cuda.as_cuda_array(mod.orders)
    for r0 in range(0, n, rows):
        r = min(rows, n - r0)
        kcuda.dequantize_rows(planes, row_scale, col_scale, L, orders, r0,
                              cuda.as_cuda_array(tile[:r]))
        torch.mm(x, tile[:r].t(), out=y[:, r0 : r0 + r])
    return y
