// The gate multiply y = (x * s) * a.
//
// Part of sam_cpu.cpp: the parts are included in order into one translation unit, each in the
// unit's anonymous namespace, and each uses the ones before it (see sam_cpu.cpp for the overview).
#pragma once

namespace {

// ---------------------------------------------------------------- y = (x * s) * a
// NCHW product of whole rows of at most this many pixels (and not a multiple of 16) by
// blocks of rows (mul_rows_flat). Measured (gate multiply alone, 2 threads, batch 8, float32,
// blocks vs rows): 0.46x the time at 5x5, 0.58-0.59x at 6x6 / 7x7, 0.84x at 9x9, 0.88x at
// 10x10; 11x11 1.15x, 12x12 - 14x14 1.0x, 19x19 1.43x and longer blocks slower everywhere
// (at 26x26 1.25-1.5x): a block's tiled attention is a third stream through L1, which pays
// only where the per-row overhead is large. Settable for measurements: set_flat_rows_max_hw
// (0: off, negative: default; at most the default, the size of mul_rows_flat's tiled buffer).
constexpr int64_t kFlatRowsDefault = 100;
int64_t kFlatRowsMaxHW = kFlatRowsDefault;

// The rows of one block for rows of HW pixels (16 / gcd(HW, 16): a whole number of 16-lane
// vectors), or 0 where rows of HW pixels are not short (a multiple of 16 or above `limit`).
inline int64_t flat_block_rows(int64_t HW, int64_t limit) {
  if (HW % 16 == 0 || HW > limit || HW <= 0) return 0;
  int64_t rows = 16;
  for (int64_t v = HW; v % 2 == 0 && rows > 1; v /= 2) rows /= 2;
  return rows;
}

// out [rows * HW] <- `rows` copies of the map [HW] (a pixel map tiled to a block of rows)
template <typename T>
inline void tile_rows(const T* map, int64_t HW, int64_t rows, T* out) {
  for (int64_t j = 0; j < rows; ++j) std::copy(map, map + HW, out + j * HW);
}

#if defined(__AVX512F__)
// y = (x * s) * a over `len` elements of a block (a whole number of vectors), each lane's scale
// from the block's (BlockScales; ri: row_index_tile); nt: non-temporal stores (float32
// compute, y at a vector's storage size)
template <typename T, typename X>
inline void mul_block_scaled(X* y, const X* x, const BlockScales<T>& sb, const int32_t* ri, const T* a, int64_t len,
                             bool nt) {
  using V = vec_t<T>;
  constexpr int64_t L = lanes<T>();
  for (int64_t k = 0; k < len; k += L) {
    const V v = (vld(x + k) * sb.at(ri, k)) * vload(a + k);
    if constexpr (std::is_same_v<T, float>) {
      if (nt) {
        vst_nt(y + k, v);
        continue;
      }
    }
    vst(y + k, v);
  }
}
#endif

// Rows [c0, c1) of one NCHW image, y = (x * s[c]) * attn (s: the image's channel scale, or
// null): the rows of 5x5 to 10x10 maps are short (a mul_row call, an alignment head and an
// overlapping tail vector per row: at 49 pixels 64 lanes of work for 49), but an image's rows
// are one contiguous run, so blocks of 16 / gcd(HW, 16) rows (a whole number of vectors) go
// through one mul_row call against the attention tiled to the block. With a scale, in AVX-512
// builds each lane's scale comes from the block's by a permute (mul_block_scaled: fortieth
// session); elsewhere, and for streamed output not at a vector's storage size, each row's scale
// repeated over its pixels in a scale block, only where the output is streamed: there (x and y
// beyond the LLC) the fused forward with a scale took 0.75-0.85x the time at 512x256x7x7 NCHW
// (CBAM on a detector head's RoI features), but 1.03-1.13x at L3-resident 7x7-10x10 maps,
// where writing the scale block costs more than the per-row calls it saves (paired, 2
// threads, thirty-eighth session). The same products element for element. Returns the first
// row not done (the caller multiplies the rest row by row); c0 where the rows are not short.
template <typename T, typename X>
int64_t mul_rows_flat(const X* x, const T* s, const T* attn, X* y, int64_t HW, int64_t c0, int64_t c1,
                      bool stream) {
  const int64_t rows = flat_block_rows(HW, kFlatRowsMaxHW);
  if (rows == 0 || c1 - c0 < rows) return c0;
  // with a scale by lanes: cached, or streamed with non-temporal stores where float32 output
  // starts at a vector's storage size; else a scale block, only where streamed
  const bool by_lanes = kLaneScales && s &&
                        (!stream || (std::is_same_v<T, float> && elems_to_boundary(y + c0 * HW, lanes<T>() * sizeof(X)) == 0));
  if (s && !stream && !by_lanes) return c0;
  T tiled[16 * kFlatRowsDefault];
  tile_rows(attn, HW, rows, tiled);
  int64_t c = c0;
#if defined(__AVX512F__)
  if (by_lanes) {
    int32_t ri[16 * kFlatRowsDefault];
    row_index_tile(HW, rows, ri);
    for (; c + rows <= c1; c += rows)
      mul_block_scaled<T, X>(y + c * HW, x + c * HW, BlockScales<T>(s + c, rows), ri, tiled, rows * HW, stream);
    return c;
  }
#endif
  if (!s) {  // (a literal null: mul_row's choices fold away)
    for (; c + rows <= c1; c += rows) mul_row<T>(y + c * HW, x + c * HW, nullptr, T(1), tiled, T(0), rows * HW, stream);
    return c;
  }
  T scales[16 * kFlatRowsDefault];
  for (; c + rows <= c1; c += rows) {
    for (int64_t j = 0; j < rows; ++j) std::fill(scales + j * HW, scales + (j + 1) * HW, s[c + j]);
    mul_row<T>(y + c * HW, x + c * HW, scales, T(1), tiled, T(0), rows * HW, stream);
  }
  return c;
}

template <typename T, typename X>
void k_mul(const X* x, const T* s, const T* a, X* y, int64_t N, int64_t C, int64_t HW, bool nhwc, bool stream) {
  if (!nhwc) {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(HW, 1));
    at::parallel_for(0, N * C, grain, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e;) {
        const int64_t n = r / C, end = std::min(e, (n + 1) * C);  // this image's rows of the range
        r = n * C + mul_rows_flat<T, X>(x + n * C * HW, s ? s + n * C : nullptr, a + n * HW, y + n * C * HW, HW,
                                        r - n * C, end - n * C, stream);
        for (; r < end; ++r)
          mul_row<T>(y + r * HW, x + r * HW, nullptr, s ? s[r] : T(1), a + n * HW, T(0), HW, stream);
      }
      stream_fence(stream);
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
    at::parallel_for(0, N * HW, grain, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        const int64_t n = p / HW;
        mul_row<T>(y + p * C, x + p * C, s ? s + n * C : nullptr, T(1), nullptr, a[p], C, stream);
      }
      stream_fence(stream);
    });
  }
}


}  // namespace
