// Transposes and column writes. The RHN backward's weight-gradient products
// dR^i = dp^T (s^i * m_h) run fastest through oneDNN with both operands column-major (dp^T
// [2H, N] as the left operand, (s * m)^T [H, N] packed as the weight), so each step's rows
// are also written into column-major chunk buffers (rhn_backward.cpp); the training loss's
// gradient is written column-major the same way (cross_entropy.cpp), and the transposed
// copy of the recurrent weights goes through transpose_into.
#pragma once

#include "common.h"

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include <cstdint>

namespace rhn {

// dst[j * ldd + b] = src[b * lds + j] (* mul[b][j]) for b < rows <= 16, j < cols <= 16
// (mul: a row pointer per source row, or none).
template <typename T>
inline void transpose_tile(const T* src, int64_t lds, const T* const* mul, int64_t rows,
                           int64_t cols, T* dst, int64_t ldd) {
  for (int64_t j = 0; j < cols; ++j)
    for (int64_t b = 0; b < rows; ++b)
      dst[j * ldd + b] = mul ? src[b * lds + j] * mul[b][j] : src[b * lds + j];
}

#if defined(CPU_CAPABILITY_AVX512)
// 16 x 16 in registers (unpack, 64-bit shuffle, two 128-bit lane shuffles), partial
// tiles through masked loads and stores.
template <>
__attribute__((always_inline)) inline void transpose_tile<float>(
    const float* src, int64_t lds, const float* const* mul, int64_t rows, int64_t cols,
    float* dst, int64_t ldd) {
  const __mmask16 in_mask = cols == 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 out_mask = rows == 16 ? 0xFFFF : static_cast<__mmask16>((1u << rows) - 1);
  __m512 r[16], t[16];
  if (rows == 16 && cols == 16 && !mul) {
    for (int k = 0; k < 16; ++k) r[k] = _mm512_loadu_ps(src + k * lds);
  } else {
    for (int k = 0; k < 16; ++k) {
      r[k] = k < rows ? _mm512_maskz_loadu_ps(in_mask, src + k * lds) : _mm512_setzero_ps();
      if (mul && k < rows) r[k] = _mm512_mul_ps(r[k], _mm512_maskz_loadu_ps(in_mask, mul[k]));
    }
  }
  for (int k = 0; k < 16; k += 2) {
    t[k] = _mm512_unpacklo_ps(r[k], r[k + 1]);
    t[k + 1] = _mm512_unpackhi_ps(r[k], r[k + 1]);
  }
  for (int k = 0; k < 16; k += 4) {
    r[k] = _mm512_shuffle_ps(t[k], t[k + 2], 0x44);
    r[k + 1] = _mm512_shuffle_ps(t[k], t[k + 2], 0xEE);
    r[k + 2] = _mm512_shuffle_ps(t[k + 1], t[k + 3], 0x44);
    r[k + 3] = _mm512_shuffle_ps(t[k + 1], t[k + 3], 0xEE);
  }
  for (int h = 0; h < 16; h += 8)
    for (int k = 0; k < 4; ++k) {
      t[h + k] = _mm512_shuffle_f32x4(r[h + k], r[h + k + 4], 0x88);
      t[h + k + 4] = _mm512_shuffle_f32x4(r[h + k], r[h + k + 4], 0xDD);
    }
  for (int k = 0; k < 8; ++k) {
    r[k] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0x88);
    r[k + 8] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0xDD);
  }
  const bool lines = ((reinterpret_cast<uintptr_t>(dst) | (ldd * sizeof(float))) & 63) == 0;
  if (rows == 16 && cols == 16 && lines) {  // whole cache lines: past the caches
    for (int k = 0; k < 16; ++k) _mm512_stream_ps(dst + k * ldd, r[k]);
  } else if (rows == 16 && cols == 16) {
    for (int k = 0; k < 16; ++k) _mm512_storeu_ps(dst + k * ldd, r[k]);
  } else {
    for (int64_t j = 0; j < cols; ++j) _mm512_mask_storeu_ps(dst + j * ldd, out_mask, r[j]);
  }
}
#endif

// Non-temporal stores are weakly ordered: fence them before another thread (or the
// products that read the columns) can look.
inline void fence_streaming_stores() {
#if defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

// The [rows, cols] block at src (row stride lds) transposed into dst (row stride ldd),
// column blocks [begin, end) of 16, each through all rows, so that every destination
// row is written in one contiguous run. With mul, source row b is first multiplied by
// mul row b % period (row stride ldm): the state mask of the row's batch entry.
template <typename T>
void transpose_columns(const T* src, int64_t lds, int64_t rows, int64_t cols, T* dst,
                       int64_t ldd, int64_t begin, int64_t end, const T* mul = nullptr,
                       int64_t ldm = 0, int64_t period = 1) {
  const T* mul_rows[16];
  for (int64_t block = begin; block < end; ++block) {
    const int64_t j = block * 16, nj = std::min<int64_t>(16, cols - j);
    for (int64_t b = 0; b < rows; b += 16) {
      const int64_t nb = std::min<int64_t>(16, rows - b);
      if (mul)
        for (int64_t k = 0; k < nb; ++k) mul_rows[k] = mul + ((b + k) % period) * ldm + j;
      transpose_tile<T>(src + b * lds + j, lds, mul ? mul_rows : nullptr, nb, nj,
                        dst + j * ldd + b, ldd);
    }
  }
}

// Entry points (transpose.cpp).

// dst[..., j, i] = src[..., i, j]: [n, m] matrices (or a batch of them) with unit column
// stride into [m, n] ones.
void transpose_into(Tensor dst, const Tensor& src);

// Hands the whole pages inside a contiguous CPU tensor's memory back to the system; the
// bytes released (0 where the system has no such call).
int64_t release(const Tensor& tensor);

}  // namespace rhn
