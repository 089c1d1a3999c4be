"""Triton fake-quant kernels for CUDA tensors: one read and one write per element.

They reproduce the pure-torch references of nemo_quant.numerics bit for bit, so:
- divisions are IEEE round-to-nearest (`div_rn`; Triton's `/` is approximate on GPUs),
  FMA fusion is off, and the reference's operation order is kept ((q * s) * g);
- round-half-to-even is (v + 1.5 * 2^23) - 1.5 * 2^23, exact for |v| < 2^22 (values are
  clamped into that range first, which cannot change the clamped result);
- grid steps and MX scales are built from exponent bits, never from a rounded log2.
The same code runs on CPU tensors under TRITON_INTERPRET=1, which is how CI (no GPU)
checks it against the reference; on a GPU the `gpu`-marked tests check it again.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from nemo_quant.kernels.backend import KernelBackend, ScaleLayout
from nemo_quant.kernels.formats import MINIFLOATS
from nemo_quant.numerics.minifloat import E4M3, MiniFloat
from nemo_quant.numerics.nf4 import NF4_CODEBOOK, NF4_MIDPOINTS

FLAT_BLOCK = 1024
LAUNCH = {"enable_fp_fusion": False}


@triton.jit
def _rint(v):
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _round_minifloat(x, MAN_BITS: tl.constexpr, MIN_NORMAL: tl.constexpr, MAX_VALUE: tl.constexpr):
    mag = tl.minimum(tl.abs(x), MAX_VALUE)
    floor_mag = tl.maximum(mag, MIN_NORMAL)
    step_bits = (floor_mag.to(tl.int32, bitcast=True) & 0x7F800000) - (MAN_BITS << 23)
    step = step_bits.to(tl.float32, bitcast=True)
    inv_step = ((254 << 23) - step_bits).to(tl.float32, bitcast=True)
    q = tl.minimum(_rint(mag * inv_step) * step, MAX_VALUE)
    return tl.where(x.to(tl.int32, bitcast=True) < 0, -q, q)  # copysign, -0.0 included


@triton.jit
def _load(ptr, offs, mask):
    """Load as fp32; bf16 widened from its bits (exact, subnormals included, on both)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = tl.load(ptr.to(tl.pointer_type(tl.int16)) + offs, mask=mask, other=0)
        return (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store(ptr, offs, v, mask):
    """Store fp32 `v` in ptr's dtype, rounding to nearest even (bf16 rounded by hand: the
    interpreter's cast truncates, the GPU's rounds; explicit bits agree on both)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        b = v.to(tl.int32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        tl.store(ptr + offs, r.to(tl.int16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offs, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_of(amax, DIV: tl.constexpr):
    return tl.where(amax > 0, tl.math.div_rn(amax, DIV), 1.0)


@triton.jit
def _scaled_kernel(x_ptr, out_ptr, amax_ptr, n, cols, nblocks, block,
                   SHARED: tl.constexpr, IS_INT: tl.constexpr, QMAX: tl.constexpr,
                   MAN_BITS: tl.constexpr, MIN_NORMAL: tl.constexpr, MAX_VALUE: tl.constexpr,
                   BLOCK: tl.constexpr):
    """INT (IS_INT) or FP8 fake quantization with per-tensor or per-(row, block) amax."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = _load(x_ptr, offs, mask)
    if SHARED:
        amax = tl.load(amax_ptr)
    else:
        idx = (offs // cols) * nblocks + (offs % cols) // block
        amax = tl.load(amax_ptr + idx, mask=mask, other=1.0)
    if IS_INT:
        scale = _scale_of(amax, QMAX)
        v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -QMAX - 2.0), QMAX + 1.0)
        out = tl.minimum(tl.maximum(_rint(v), -QMAX - 1.0), QMAX) * scale
    else:
        scale = _scale_of(amax, MAX_VALUE)
        v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -MAX_VALUE), MAX_VALUE)
        out = _round_minifloat(v, MAN_BITS, MIN_NORMAL, MAX_VALUE) * scale
    _store(out_ptr, offs, out, mask)


@triton.jit
def _block_tile(x_ptr, cols, nblocks, block, total, TILE: tl.constexpr, WIDTH: tl.constexpr):
    """A [TILE, WIDTH] tile holding TILE quantization blocks (block <= WIDTH), padded with 0."""
    k = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    start = (k // nblocks) * cols + (k % nblocks) * block
    width = tl.minimum(block, cols - (k % nblocks) * block)
    j = tl.arange(0, WIDTH)
    mask = (k < total)[:, None] & (j[None, :] < width[:, None])
    ptrs = start[:, None] + j[None, :]
    x = _load(x_ptr, ptrs, mask)
    return x, ptrs, mask, k


@triton.jit
def _nvfp4_kernel(x_ptr, out_ptr, amax_ptr, cols, nblocks, block, total, TILE: tl.constexpr, WIDTH: tl.constexpr):
    x, ptrs, mask, k = _block_tile(x_ptr, cols, nblocks, block, total, TILE, WIDTH)
    g = _scale_of(tl.load(amax_ptr), 2688.0)  # 6 (E2M1 max) * 448 (E4M3 max)
    s = tl.math.div_rn(tl.math.div_rn(tl.max(tl.abs(x), axis=1), 6.0), g)
    s = _round_minifloat(tl.minimum(s, 448.0), 3, 0.015625, 448.0)
    s = tl.where(s > 0, s, 1.0)
    q = _round_minifloat(tl.math.div_rn(x, (s * g)[:, None]), 1, 1.0, 6.0)
    _store(out_ptr, ptrs, q * s[:, None] * g, mask)


@triton.jit
def _mx_kernel(x_ptr, out_ptr, cols, nblocks, block, total, EMAX: tl.constexpr,
               MAN_BITS: tl.constexpr, MIN_NORMAL: tl.constexpr, MAX_VALUE: tl.constexpr,
               TILE: tl.constexpr, WIDTH: tl.constexpr):
    x, ptrs, mask, k = _block_tile(x_ptr, cols, nblocks, block, total, TILE, WIDTH)
    bmax = tl.maximum(tl.max(tl.abs(x), axis=1), 5.877471754111438e-39)  # 2^-127
    # floor(log2(bmax)) from the exponent bits; fp32 subnormals are scaled by 2^64 (exactly) first.
    tiny = bmax < 1.1754943508222875e-38
    scaled = tl.where(tiny, tl.where(tiny, bmax, 0.0) * 18446744073709551616.0, bmax)
    e = ((scaled.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127 - tl.where(tiny, 64, 0) - EMAX
    e = tl.minimum(tl.maximum(e, -127), 127)
    scale = tl.where(e >= -126, (e + 127) << 23, 0x00400000).to(tl.float32, bitcast=True)
    q = _round_minifloat(tl.math.div_rn(x, scale[:, None]), MAN_BITS, MIN_NORMAL, MAX_VALUE)
    _store(out_ptr, ptrs, q * scale[:, None], mask)


@triton.jit
def _nf4_kernel(x_ptr, out_ptr, absmax_dq_ptr, codebook_ptr, mids_ptr, cols, nblocks, block, total,
                TILE: tl.constexpr, WIDTH: tl.constexpr):
    x, ptrs, mask, k = _block_tile(x_ptr, cols, nblocks, block, total, TILE, WIDTH)
    bmax = tl.max(tl.abs(x), axis=1)
    v = x * tl.math.div_rn(1.0, tl.maximum(bmax, 1e-38))[:, None]  # bnb scales by the reciprocal
    code = tl.zeros(x.shape, tl.int32)
    for j in tl.static_range(15):  # number of midpoints below v = the nearest level
        code += (v > tl.load(mids_ptr + j)).to(tl.int32)
    scale = tl.load(absmax_dq_ptr + k, mask=k < total, other=0.0)
    out = tl.load(codebook_ptr + code, mask=mask, other=0.0) * scale[:, None]
    _store(out_ptr, ptrs, out, mask)


@triton.jit
def _nf4_dequantize_kernel(packed_ptr, out_ptr, absmax_ptr, codebook_ptr, n_bytes, half_block, BLOCK: tl.constexpr):
    # One byte holds two consecutive weights, the first in the high nibble (bitsandbytes' layout).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_bytes
    byte = tl.load(packed_ptr + offs, mask=mask, other=0).to(tl.int32)
    scale = tl.load(absmax_ptr + offs // half_block, mask=mask, other=0.0)
    hi = tl.load(codebook_ptr + (byte >> 4), mask=mask, other=0.0) * scale
    lo = tl.load(codebook_ptr + (byte & 15), mask=mask, other=0.0) * scale
    _store(out_ptr, 2 * offs, hi, mask)
    _store(out_ptr, 2 * offs + 1, lo, mask)


@triton.jit
def _absmax_kernel(x_ptr, out_ptr, cols, nblocks, block, total, TILE: tl.constexpr, CHUNK: tl.constexpr):
    """|x| maximum of each block (any size: chunks of CHUNK), NaN if the block has one."""
    k = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    start = (k // nblocks) * cols + (k % nblocks) * block
    width = tl.minimum(block, cols - (k % nblocks) * block)
    m = tl.zeros([TILE], tl.float32)
    nan = tl.zeros([TILE], tl.int32)
    for off in range(0, block, CHUNK):
        j = off + tl.arange(0, CHUNK)
        mask = (k < total)[:, None] & (j[None, :] < width[:, None])
        v = tl.abs(_load(x_ptr, start[:, None] + j[None, :], mask))
        m = tl.maximum(m, tl.max(v, axis=1))
        nan = tl.maximum(nan, tl.max((v != v).to(tl.int32), axis=1))
    tl.store(out_ptr + k, tl.where(nan > 0, float("nan"), m), mask=k < total)


def _element(e: MiniFloat) -> dict:
    """The constexpr arguments that describe an element format to `_round_minifloat`."""
    return {"MAN_BITS": e.man_bits, "MIN_NORMAL": 2.0 ** e.min_normal_exp, "MAX_VALUE": e.max_value}


@functools.cache
def _nf4_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 codebook and midpoints on `device`, copied there once (not on every call)."""
    return NF4_CODEBOOK.to(device), NF4_MIDPOINTS.to(device)


def _tile(block: int, max_width: int = 256) -> tuple[int, int]:
    width = triton.next_power_of_2(min(block, max_width))
    return max(1, 2048 // width), width


class TritonKernels(KernelBackend):
    name = "triton"
    description = "Triton kernels (kernels/triton_ops.py)"

    @staticmethod
    def _geometry(x: torch.Tensor, block: int) -> tuple[int, int, int, int]:
        cols = x.shape[-1] if x.dim() else 1
        rows = x.numel() // cols
        block = block or cols
        nblocks = -(-cols // block)
        return rows, cols, block, nblocks

    def _scaled(self, x, layout: ScaleLayout, is_int: bool, qmax: float, elem=E4M3):
        out = torch.empty_like(x)
        rows, cols, block, nblocks = self._geometry(x, layout.block)
        shared = layout.amax.numel() == 1
        grid = (triton.cdiv(x.numel(), FLAT_BLOCK),)
        _scaled_kernel[grid](x, out, layout.amax.to(x.device), x.numel(), cols, nblocks, block, SHARED=shared,
                             IS_INT=is_int, QMAX=qmax, BLOCK=FLAT_BLOCK, **_element(elem), **LAUNCH)
        return out

    def int_(self, x, layout, bits):
        return self._scaled(x, layout, True, float(2 ** (bits - 1) - 1))

    def fp8(self, x, layout, fmt_id):
        return self._scaled(x, layout, False, 0.0, MINIFLOATS[fmt_id])

    def _blockwise(self, kernel, x, block, *args, **consts):
        out = torch.empty_like(x)
        rows, cols, block, nblocks = self._geometry(x, block)
        total = rows * nblocks
        tile, width = _tile(block, max_width=block)
        kernel[(triton.cdiv(total, tile),)](x, out, *args, cols, nblocks, block, total, **consts,
                                            TILE=tile, WIDTH=width, **LAUNCH)
        return out

    def nvfp4(self, x, amax, block):
        return self._blockwise(_nvfp4_kernel, x, block, amax.to(x.device))

    def mx(self, x, fmt_id, block):
        e = MINIFLOATS[fmt_id]
        return self._blockwise(_mx_kernel, x, block, EMAX=e.emax, **_element(e))

    def nf4(self, x, absmax_dq, block):
        return self._blockwise(_nf4_kernel, x, block, absmax_dq.to(x.device), *_nf4_tables(x.device))

    def nf4_dequantize(self, packed, absmax, block, dtype):
        packed = packed.contiguous()
        rows, cols = packed.shape[0], packed.shape[1] * 2
        out = torch.empty((rows, cols), dtype=dtype, device=packed.device)
        grid = (triton.cdiv(packed.numel(), FLAT_BLOCK),)
        _nf4_dequantize_kernel[grid](packed, out, absmax.float().contiguous(), _nf4_tables(packed.device)[0],
                                     packed.numel(), block // 2, BLOCK=FLAT_BLOCK, **LAUNCH)
        return out

    def absmax(self, x, block):
        if block == 0:  # whole tensor: maxima of 4096-element chunks, then of those
            partial = self.absmax(x.reshape(1, -1), 4096)
            return partial.amax()
        rows, cols, block, nblocks = self._geometry(x, block)
        total = rows * nblocks
        out = torch.empty(rows, nblocks, dtype=torch.float32, device=x.device)
        tile, chunk = _tile(block)
        _absmax_kernel[(triton.cdiv(total, tile),)](x, out, cols, nblocks, block, total, TILE=tile, CHUNK=chunk, **LAUNCH)
        return out
