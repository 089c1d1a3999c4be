// CPU fake-quant kernels: one read and one write of the tensor per call.
//
// Each op reproduces a pure-torch reference in nemo_quant/numerics/ bit for bit, so the
// arithmetic below follows the reference's operation order exactly (x / scale, never
// x * (1 / scale); (q * s) * g, never q * (s * g)) and the build disables FMA contraction.
// Layout of every op: x is contiguous, viewed as [rows, cols] (cols = last dim); scales come
// per block of `block` consecutive columns of a row, ragged last block included. An amax
// tensor of one element applies to the whole tensor; otherwise it is [rows, ceil(cols/block)].
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

using at::Tensor;

struct MiniFloat {
  int man_bits;
  float min_normal;  // 2^(1 - bias): below it the grid is uniform (subnormals)
  float max_value;
};

// Element formats, in the order of nemo_quant/kernels/formats.py MINIFLOATS (their ids).
constexpr MiniFloat kMiniFloats[] = {
    {3, 0.015625f, 448.0f},          // e4m3
    {2, 6.103515625e-05f, 57344.0f},  // e5m2
    {1, 1.0f, 6.0f},                  // e2m1
};

inline float pow2(int e) { return std::ldexp(1.0f, e); }

inline uint32_t bits_of(float v) { return std::bit_cast<uint32_t>(v); }
inline float float_of(uint32_t b) { return std::bit_cast<float>(b); }

// Exponent of a normal fp32 value, read from its bits (exact, unlike a rounded log2).
inline int normal_exponent(float v) { return static_cast<int>((bits_of(v) >> 23) & 0xff) - 127; }

// Round to the nearest grid value (ties to even), saturating at +-max. The grid step at
// |x| is 2^(e - man_bits), e = exponent of max(|x|, min_normal); step and 1/step are built
// from exponent bits (both normal fp32 for these formats), and x * (1/step) is exact.
inline float round_minifloat(float x, const MiniFloat& f) {
  float mag = std::fabs(x);
  mag = mag > f.max_value ? f.max_value : mag;
  const float floor_mag = mag < f.min_normal ? f.min_normal : mag;
  const uint32_t step_bits = (bits_of(floor_mag) & 0x7f800000u) - (static_cast<uint32_t>(f.man_bits) << 23);
  const float step = float_of(step_bits), inv_step = float_of((254u << 23) - step_bits);
  float q = std::nearbyint(mag * inv_step) * step;
  q = q > f.max_value ? f.max_value : q;
  return std::copysign(q, x);
}

template <typename T>
inline float load(const T* p, int64_t i) { return static_cast<float>(p[i]); }
template <typename T>
inline void store(T* p, int64_t i, float v) { p[i] = static_cast<T>(v); }

// A scale computed from an amax the way the reference does: amax > 0 ? amax / div : 1.
inline float scale_of(float amax, float div) { return amax > 0.0f ? amax / div : 1.0f; }

struct Geometry {
  int64_t rows, cols, block, nblocks;
  Geometry(const Tensor& x, int64_t block_size) {
    cols = x.dim() ? x.size(-1) : 1;
    rows = cols ? x.numel() / cols : 0;
    block = block_size > 0 ? block_size : cols;
    nblocks = block ? (cols + block - 1) / block : 0;
  }
};

// Runs fn(row, block_index, col_begin, col_end) over every block, rows split across threads.
template <typename Fn>
void for_each_block(const Geometry& g, Fn fn) {
  if (g.rows == 0 || g.cols == 0) return;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(g.cols, 1));
  at::parallel_for(0, g.rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t b = 0; b < g.nblocks; ++b) {
        const int64_t c0 = b * g.block;
        fn(r, b, c0, std::min(c0 + g.block, g.cols));
      }
  });
}

// Work with one shared scale (or one whole-tensor maximum) on a few long rows would run on
// one thread: re-view it as [chunks, 4096]. The last chunk may be ragged; callers bound their
// loops by numel.
Geometry spread_long_rows(Geometry g, int64_t numel) {
  if (g.rows < 64 && g.cols > 4096) {
    g.rows = (numel + 4095) / 4096;
    g.cols = g.block = 4096;
    g.nblocks = 1;
  }
  return g;
}

void check_amax(const Tensor& amax, const Geometry& g, const char* op) {
  TORCH_CHECK(amax.scalar_type() == at::kFloat && amax.is_contiguous(), op, ": amax must be contiguous fp32");
  TORCH_CHECK(amax.numel() == 1 || amax.numel() == g.rows * g.nblocks, op, ": amax has ", amax.numel(),
              " elements, expected 1 or rows * blocks = ", g.rows * g.nblocks);
}

template <typename Elem>
Tensor elementwise(const Tensor& x_in, const Tensor& amax, int64_t block, float amax_div, const char* op, Elem elem) {
  const Tensor x = x_in.contiguous();
  Tensor out = at::empty_like(x);
  const Geometry g = amax.numel() == 1 ? spread_long_rows(Geometry(x, block), x.numel()) : Geometry(x, block);
  check_amax(amax, g, op);
  const float* a = amax.data_ptr<float>();
  const bool shared = amax.numel() == 1;
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "nemo_quant_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    for_each_block(g, [&](int64_t r, int64_t b, int64_t c0, int64_t c1) {
      const float scale = scale_of(a[shared ? 0 : r * g.nblocks + b], amax_div);
      const int64_t base = r * g.cols;
      const int64_t end = std::min(base + c1, n);
      for (int64_t i = base + c0; i < end; ++i) store(op_, i, elem(load(xp, i), scale));
    });
  });
  return out;
}

// --- ops -----------------------------------------------------------------------------------

Tensor fake_quant_int(const Tensor& x, const Tensor& amax, int64_t bits, int64_t block) {
  const float qmax = static_cast<float>((1 << (bits - 1)) - 1), qmin = -qmax - 1.0f;
  return elementwise(x, amax, block, qmax, "fake_quant_int", [=](float v, float scale) {
    float c = std::nearbyint(v / scale);
    c = c < qmin ? qmin : (c > qmax ? qmax : c);
    return c * scale;
  });
}

Tensor fake_quant_fp8(const Tensor& x, const Tensor& amax, int64_t fmt, int64_t block) {
  const MiniFloat f = kMiniFloats[fmt];
  return elementwise(x, amax, block, f.max_value, "fake_quant_fp8", [=](float v, float scale) {
    float s = v / scale;
    s = s < -f.max_value ? -f.max_value : (s > f.max_value ? f.max_value : s);
    return round_minifloat(s, f) * scale;
  });
}

// |x| maxima are taken on the bits: with the sign bit cleared, IEEE magnitudes order like
// unsigned integers and every NaN sorts above infinity, so an integer max (which
// vectorizes) is exact and propagates NaN.
template <typename T> struct MagnitudeBits;
template <> struct MagnitudeBits<float> {
  using U = uint32_t;
  static constexpr U mask = 0x7fffffffu;
  static float value(U b) { return std::bit_cast<float>(b); }
};
template <> struct MagnitudeBits<double> {
  using U = uint64_t;
  static constexpr U mask = 0x7fffffffffffffffull;
  static float value(U b) { return static_cast<float>(std::bit_cast<double>(b)); }
};
template <> struct MagnitudeBits<c10::BFloat16> {
  using U = uint16_t;
  static constexpr U mask = 0x7fff;
  static float value(U b) { return static_cast<float>(c10::BFloat16(b, c10::BFloat16::from_bits())); }
};
template <> struct MagnitudeBits<c10::Half> {
  using U = uint16_t;
  static constexpr U mask = 0x7fff;
  static float value(U b) { return static_cast<float>(c10::Half(b, c10::Half::from_bits())); }
};

// Block amax of the real (non-padded) elements of each block, NaN-propagating.
template <typename scalar_t>
inline float block_absmax(const scalar_t* row, int64_t c0, int64_t c1) {
  using B = MagnitudeBits<scalar_t>;
  const auto* bits = reinterpret_cast<const typename B::U*>(row);
  typename B::U m = 0;
  for (int64_t c = c0; c < c1; ++c) {
    const typename B::U v = bits[c] & B::mask;
    m = v > m ? v : m;
  }
  return B::value(m);
}

// Ops whose scale is derived from each block's own amax (NVFP4 block scales, MX, NF4).
template <typename BlockFn>
Tensor blockwise(const Tensor& x_in, int64_t block, const char* op, BlockFn fn) {
  const Tensor x = x_in.contiguous();
  Tensor out = at::empty_like(x);
  const Geometry g(x, block);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "nemo_quant_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    for_each_block(g, [&](int64_t r, int64_t b, int64_t c0, int64_t c1) {
      const scalar_t* row = xp + r * g.cols;
      scalar_t* orow = op_ + r * g.cols;
      fn(row, orow, r * g.nblocks + b, c0, c1, block_absmax(row, c0, c1));
    });
  });
  return out;
}

Tensor fake_quant_nvfp4(const Tensor& x, const Tensor& amax, int64_t block) {
  TORCH_CHECK(amax.numel() == 1 && amax.scalar_type() == at::kFloat, "fake_quant_nvfp4: amax must be one fp32 value");
  const MiniFloat e2m1 = kMiniFloats[2], e4m3 = kMiniFloats[0];
  const float g = scale_of(amax.item<float>(), e2m1.max_value * e4m3.max_value);
  return blockwise(x, block, "fake_quant_nvfp4", [=](auto row, auto orow, int64_t, int64_t c0, int64_t c1, float bmax) {
    float s = bmax / e2m1.max_value / g;
    s = round_minifloat(s > e4m3.max_value ? e4m3.max_value : s, e4m3);
    s = s > 0.0f ? s : 1.0f;
    const float sg = s * g;
    for (int64_t c = c0; c < c1; ++c) store(orow, c, round_minifloat(load(row, c) / sg, e2m1) * s * g);
  });
}

Tensor fake_quant_mx(const Tensor& x, int64_t fmt, int64_t block) {
  const MiniFloat f = kMiniFloats[fmt];
  const int emax = normal_exponent(f.max_value);
  return blockwise(x, block, "fake_quant_mx", [=](auto row, auto orow, int64_t, int64_t c0, int64_t c1, float bmax) {
    // ilogb is exact for fp32 subnormals too (the clamp floor 2^-127 is one).
    const float floor_amax = bmax < pow2(-127) ? pow2(-127) : bmax;
    int e = std::ilogb(floor_amax) - emax;
    e = e < -127 ? -127 : (e > 127 ? 127 : e);
    const float scale = pow2(e);
    for (int64_t c = c0; c < c1; ++c) store(orow, c, round_minifloat(load(row, c) / scale, f) * scale);
  });
}

// NF4: codes from the block's own absmax, values from its double-quantized absmax `absmax_dq`.
// mids[i] is the midpoint between levels i and i+1; a value on a midpoint takes the lower
// level (torch.bucketize, right=False).
Tensor fake_quant_nf4(const Tensor& x, const Tensor& absmax_dq, const Tensor& codebook, const Tensor& mids, int64_t block) {
  TORCH_CHECK(codebook.numel() == 16 && mids.numel() == 15, "fake_quant_nf4: codebook of 16, mids of 15");
  const float* dq = absmax_dq.data_ptr<float>();
  float cb[16], md[15];
  std::memcpy(cb, codebook.data_ptr<float>(), sizeof cb);
  std::memcpy(md, mids.data_ptr<float>(), sizeof md);
  return blockwise(x, block, "fake_quant_nf4", [&](auto row, auto orow, int64_t bi, int64_t c0, int64_t c1, float bmax) {
    const float inv = 1.0f / std::max(bmax, 1e-38f);  // bnb scales by the reciprocal
    const float scale = dq[bi];
    for (int64_t c = c0; c < c1; ++c) {
      const float v = load(row, c) * inv;
      int code = 0;
      for (int j = 0; j < 15; ++j) code += v > md[j];
      store(orow, c, cb[code] * scale);
    }
  });
}

// NF4 dequantization of packed codes [rows, cols/2] (two per byte, the first in the high
// nibble: bitsandbytes' layout) with one fp32 absmax per `block` weights of a row.
Tensor nf4_dequantize(const Tensor& packed_in, const Tensor& absmax_in, const Tensor& codebook, int64_t block, at::ScalarType dtype) {
  const Tensor packed = packed_in.contiguous();
  const Tensor absmax = absmax_in.contiguous();
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2, "nf4_dequantize: packed codes must be uint8 [rows, cols/2]");
  TORCH_CHECK(absmax.scalar_type() == at::kFloat, "nf4_dequantize: absmax must be float32");
  const int64_t rows = packed.size(0), cols = packed.size(1) * 2;
  TORCH_CHECK(block > 0 && block % 2 == 0 && cols % block == 0, "nf4_dequantize: cols must be a multiple of an even block");
  const int64_t nblocks = cols / block;
  TORCH_CHECK(absmax.numel() == rows * nblocks, "nf4_dequantize: one absmax per block");
  Tensor out = at::empty({rows, cols}, packed.options().dtype(dtype));
  const uint8_t* cp = packed.data_ptr<uint8_t>();
  const float* a = absmax.data_ptr<float>();
  float cb[16];
  std::memcpy(cb, codebook.data_ptr<float>(), sizeof cb);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "nf4_dequantize", [&] {
    scalar_t* op_ = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows * nblocks, 16, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const float scale = a[k];
        const uint8_t* src = cp + k * (block / 2);
        scalar_t* dst = op_ + k * block;
        for (int64_t j = 0; j < block / 2; ++j) {
          const uint8_t byte = src[j];
          dst[2 * j] = static_cast<scalar_t>(cb[byte >> 4] * scale);
          dst[2 * j + 1] = static_cast<scalar_t>(cb[byte & 15] * scale);
        }
      }
    });
  });
  return out;
}

// abs-max per block ([rows, blocks], fp32), or of the whole tensor when block == 0.
Tensor absmax(const Tensor& x_in, int64_t block) {
  const Tensor x = x_in.contiguous();
  const bool whole = block == 0;
  const Geometry g = whole ? spread_long_rows(Geometry(x, 0), x.numel()) : Geometry(x, block);
  Tensor out = at::empty({g.rows, g.nblocks}, x.options().dtype(at::kFloat));
  float* op_ = out.data_ptr<float>();
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "absmax", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    for_each_block(g, [&](int64_t r, int64_t b, int64_t c0, int64_t c1) {
      const int64_t base = r * g.cols;
      op_[r * g.nblocks + b] = block_absmax(xp + base, c0, std::min(c1, n - base));
    });
  });
  if (!whole) return out;
  const float* p = op_;
  float m = 0.0f;
  for (int64_t i = 0; i < out.numel(); ++i) m = (p[i] > m || p[i] != p[i]) ? p[i] : m;
  Tensor scalar = at::empty({}, x.options().dtype(at::kFloat));
  *scalar.data_ptr<float>() = m;
  return scalar;
}

}  // namespace

TORCH_LIBRARY(nemo_quant_cpu, m) {
  m.def("fake_quant_int(Tensor x, Tensor amax, int bits, int block) -> Tensor", &fake_quant_int);
  m.def("fake_quant_fp8(Tensor x, Tensor amax, int fmt, int block) -> Tensor", &fake_quant_fp8);
  m.def("fake_quant_nvfp4(Tensor x, Tensor amax, int block) -> Tensor", &fake_quant_nvfp4);
  m.def("fake_quant_mx(Tensor x, int fmt, int block) -> Tensor", &fake_quant_mx);
  m.def("fake_quant_nf4(Tensor x, Tensor absmax_dq, Tensor codebook, Tensor mids, int block) -> Tensor", &fake_quant_nf4);
  m.def("nf4_dequantize(Tensor codes, Tensor absmax, Tensor codebook, int block, ScalarType dtype) -> Tensor", &nf4_dequantize);
  m.def("absmax(Tensor x, int block) -> Tensor", &absmax);
}
