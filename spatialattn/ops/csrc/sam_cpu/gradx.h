// Backward pass B: grad_x and the channel-scale gradient.
//
// Part of sam_cpu.cpp: the parts are included in order into one translation unit, each in the
// unit's anonymous namespace, and each uses the ones before it (see sam_cpu.cpp for the overview).
#pragma once

namespace {

// ---------------------------------------------------------------- backward pass B
// gx' = g * a + [x' == mx] * fmax + fmean ;  gx = gx' * s ;  gs[n, c] = sum_p gx' * x.
// Any of g (with a), mx (with fmax), fmean may be null; gx / gs may be null.

// gradx_segment's inputs `next` elements further on (a later channel row), prefetched into
// L2: the gradient's row, and x's where the pass reads it (see rows.h)
template <bool G, bool GC, bool M, bool MB, bool S, typename X>
inline void prefetch_next_rows(const X* xr, const X* gr, int64_t next, int64_t k) {
  if constexpr (G && !GC) __builtin_prefetch(gr + next + k, 0, 2);
  if constexpr ((M && !MB) || S) __builtin_prefetch(xr + next + k, 0, 2);
}

// NCHW: `len` pixels of one channel row (scale sc); returns sum gx' * x if S, else 0 (the
// sum is skipped: measured ~6 % off the 1x1024x13x13 backward, within noise on the large
// maps, which wait on memory); buf: len scratch. MB (not with S): the max channels from
// the row of max bits `mb` (pixel q0 + k at bit k), and x is not read. PF: the rows `next`
// elements further on prefetched (a template argument: a test in the loop cost 5-10 %).
#if SAM_AVX2_HALVES
// gradx_segment's vectors for float32 in AVX2 builds: the same operations per element in
// 256-bit vectors (MB: the max channels from the bits, x not read); len >= 8. Without S, the
// whole row (its tail one vector overlapping the last full one); returns len. S (the
// channel-scale sum): the generic code's 16-lane accumulator as two halves, 16 elements per
// step, its lanes added to t in order; returns the first element left to gradx_segment's
// scalar loop, as there, so the sum keeps its bits.
template <bool G, bool GC, bool M, bool F, bool MB, bool S, bool PF, typename X>
inline int64_t gradx_segment_avx2(const X* xr, const X* gr, float gv, float sc, const float* an, const float* mn,
                                  const float* fm, const float* fa, int64_t len, X* gx, bool stream, float* gp,
                                  const uint8_t* mb, int64_t q0, float& t, int64_t next, bool& direct) {
  const __m256 vg = _mm256_set1_ps(gv), vs = _mm256_set1_ps(sc);
  auto value = [&](int64_t k) {  // gx' at k .. k + 7
    if constexpr (PF) prefetch_next_rows<G, GC, M, MB, S>(xr, gr, next, k);
    __m256 v = _mm256_setzero_ps();
    if constexpr (G) v = _mm256_mul_ps(GC ? vg : ld8(gr + k), _mm256_loadu_ps(an + k));
    if constexpr (M && MB)
      v = _mm256_add_ps(v, where_bits8(get_bits<8>(mb, q0 + k), _mm256_loadu_ps(fm + k)));
    else if constexpr (M)
      v = _mm256_add_ps(v, _mm256_and_ps(_mm256_cmp_ps(_mm256_mul_ps(ld8(xr + k), vs), _mm256_loadu_ps(mn + k),
                                                       _CMP_EQ_OQ),
                                         _mm256_loadu_ps(fm + k)));
    if constexpr (F) v = _mm256_add_ps(v, _mm256_loadu_ps(fa + k));
    return v;
  };
  auto step = [&](int64_t k) {
    const __m256 v = value(k);
    if (stream || !gx) _mm256_storeu_ps(gp + k, v);
    else st8(gx + k, _mm256_mul_ps(v, vs));
    return v;
  };
  int64_t i = 0;
  // streamed float32: non-temporal stores straight from the sweep from the first 32-byte
  // boundary h of gx, plain ones before it and after the last whole vector (see
  // gradx_segment's AVX-512 path; the same values as mul_row's (gx' * sc) * 1). Not for
  // float16 / bfloat16 storage: with their conversions in the same loop the bfloat16
  // backward took 1.17-1.33x the time of the scratch row and mul_row's copy (measured)
  direct = std::is_same_v<X, float> && stream && gx;
  const int64_t h = direct ? elems_to_boundary(gx, 32) : 0;
  if constexpr (S) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    if constexpr (std::is_same_v<X, float>) {
      if (direct) {
        // with the channel-scale sum, whose vectors stay at k = 0, 8, 16, ... (its bits): each
        // aligned block of gx joins the end of one vector and the start of the next (join8);
        // the end of the last whole vector with plain stores, the rest in gradx_segment's
        // scalar loop
        const __m256i idx = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(int(h)));
        const __m256 from_next = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7)));
        __m256 prev = _mm256_setzero_ps();
        auto put = [&](int64_t k, __m256 w) {  // gx' * sc at k .. k + 7
          if (h == 0) st8_nt(gx + k, w);
          else if (k == 0) store_lanes8(gx, w, 0, h);
          else st8_nt(gx + k - 8 + h, join8(prev, w, idx, from_next));
          prev = w;
        };
        for (; i + 16 <= len; i += 16) {
          const __m256 v0 = value(i), v1 = value(i + 8);
          a0 = _mm256_add_ps(a0, _mm256_mul_ps(v0, ld8(xr + i)));
          a1 = _mm256_add_ps(a1, _mm256_mul_ps(v1, ld8(xr + i + 8)));
          put(i, _mm256_mul_ps(v0, vs));
          put(i + 8, _mm256_mul_ps(v1, vs));
        }
        if (h > 0 && i > 0) store_lanes8(gx + i - 8, prev, h, 8);  // the end of the last whole vector
      }
    }
    if (!direct) {
      for (; i + 16 <= len; i += 16) {
        const __m256 v0 = step(i), v1 = step(i + 8);
        a0 = _mm256_add_ps(a0, _mm256_mul_ps(v0, ld8(xr + i)));
        a1 = _mm256_add_ps(a1, _mm256_mul_ps(v1, ld8(xr + i + 8)));
      }
    }
    float l[16];
    _mm256_storeu_ps(l, a0);
    _mm256_storeu_ps(l + 8, a1);
    for (int j = 0; j < 16; ++j) t += l[j];
    return i;
  } else {
    if constexpr (std::is_same_v<X, float>) {
      if (direct) {
        if (h > 0) store_lanes8(gx, _mm256_mul_ps(value(0), vs), 0, h);
        for (i = h; i + 8 <= len; i += 8) st8_nt(gx + i, _mm256_mul_ps(value(i), vs));
        if (i < len) store_lanes8(gx + len - 8, _mm256_mul_ps(value(len - 8), vs), i - (len - 8), 8);
        return len;
      }
    }
    for (; i + 8 <= len; i += 8) step(i);
    if (i < len) step(len - 8);  // overlapping the last full vector: the same values again
    return len;
  }
}
#endif

#if defined(__AVX512F__)
// lanes idx[m] of (a, b) side by side (idx[m] < 16: a's lane, else b's lane idx[m] - 16)
inline vec_t<float> join_lanes(vec_t<float> a, __m512i idx, vec_t<float> b) {
  __m512 fa, fb;
  std::memcpy(&fa, &a, sizeof(fa));
  std::memcpy(&fb, &b, sizeof(fb));
  const __m512 r = _mm512_permutex2var_ps(fa, idx, fb);
  vec_t<float> out;
  std::memcpy(&out, &r, sizeof(out));
  return out;
}
#endif

template <typename T, typename X, bool G, bool GC, bool M, bool F, bool S, bool MB = false, bool PF = false>
inline T gradx_segment(const X* xr, const X* gr, T gv, T sc, const T* an, const T* mn, const T* fm, const T* fa,
                       int64_t len, X* gx, bool stream, T* gp, const uint8_t* mb = nullptr, int64_t q0 = 0,
                       int64_t next = 0) {
  static_assert(!(MB && S), "the channel-scale gradient reads x");
  using V = vec_t<T>;
  constexpr int64_t L = lanes<T>();
  int64_t i = 0;
  T t = 0;
  // direct: streamed gx written from the sweep (not through gp and mul_row)
  bool vectors_done = false, direct = false;
#if SAM_AVX2_HALVES
  if constexpr (std::is_same_v<T, float>) {
    if (len >= 8) {
      i = gradx_segment_avx2<G, GC, M, F, MB, S, PF, X>(xr, gr, gv, sc, an, mn, fm, fa, len, gx, stream, gp, mb, q0,
                                                        t, next, direct);
      vectors_done = true;
    }
  }
#endif
  if (!vectors_done) {
    V acc = {};
    auto value = [&](int64_t k) {  // gx' at k .. k + L - 1
      if constexpr (PF) prefetch_next_rows<G, GC, M, MB, S>(xr, gr, next, k);
      V v = {};
      if (G) v = (GC ? V{} + gv : vld(gr + k)) * vload(an + k);
      if constexpr (M && MB) v += where_bits<T>(get_bits<L>(mb, q0 + k), vload(fm + k));
      else if (M) v += vsel<T>(vcmp<kEq, T>(vld(xr + k) * sc, vload(mn + k)), vload(fm + k), V{});
      if (F) v += vload(fa + k);
      return v;
    };
    auto step = [&](int64_t k) {
      const V v = value(k);
      if (stream || !gx) {
        vstore(gp + k, v);
      } else {
        vst(gx + k, v * sc);  // cached stores: write directly, no second pass
      }
      return v;
    };
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float>) {
      // streamed rows (float32, float16, bfloat16): non-temporal stores straight from the
      // sweep, from the first boundary h of gx at a vector's storage size (64 / 32 bytes; the
      // elements before it and after the last whole vector with plain stores), instead of the
      // row through gp and mul_row's streaming copy; the same values (mul_row's (gx' * sc) * 1,
      // its head rounded element by element as here)
      direct = stream && gx && len >= L;
      const int64_t h = direct ? elems_to_boundary(gx, L * sizeof(X)) : 0;
      if constexpr (!S) {
        if (direct) {
          if (h > 0) store_lanes(gx, value(0) * sc, 0, h);
          for (i = h; i + L <= len; i += L) vst_nt(gx + i, value(i) * sc);
          if (i < len) store_lanes(gx + len - L, value(len - L) * sc, i - (len - L), L);
          i = len;
        }
      } else if (direct) {
        // with the channel-scale sum, whose vectors stay at k = 0, L, 2L, ... (its bits): each
        // aligned block of gx joins the end of one vector and the start of the next (a
        // two-source lane permute); the end of the last whole vector with plain stores, the
        // scalar tail below
        const __m512i idx = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(int(h)));
        V prev = {};
        auto put = [&](int64_t k, V w) {  // gx' * sc at k .. k + L - 1
          if (h == 0) vst_nt(gx + k, w);
          else if (k == 0) store_lanes(gx, w, 0, h);
          else vst_nt(gx + k - L + h, join_lanes(prev, idx, w));
          prev = w;
        };
        for (; i + L <= len; i += L) {
          const V v = value(i);
          acc += v * vld(xr + i);
          put(i, v * sc);
        }
        if (h > 0) store_lanes(gx + i - L, prev, h, L);  // the end of the last whole vector
      }
    }
#endif
    for (; i + L <= len; i += L) {
      const V v = step(i);
      if (S) acc += v * vld(xr + i);
    }
    // the tail as one vector ending at len, overlapping the last full one: its elements are
    // written again with the same values (without S, which would count them twice)
    if (!S && i < len && len >= L) {
      step(len - L);
      i = len;
    }
    if (S)
      for (int64_t l = 0; l < L; ++l) t += acc[l];
  }
  for (; i < len; ++i) {
    T v = 0;
    if (G) v = (GC ? gv : T(gr[i])) * an[i];
    if (M) v += (MB ? get_bit(mb, q0 + i) : T(xr[i]) * sc == mn[i]) ? fm[i] : T(0);
    if (F) v += fa[i];
    if (S) t += v * T(xr[i]);
    gp[i] = v;
    if (gx && (!stream || direct)) gx[i] = X(v * sc);
  }
  if (gx && stream && !direct) mul_row<T>(gx, gp, nullptr, sc, nullptr, T(1), len, stream);
  return t;
}

// NCHW pass B of whole images whose rows are short (the blocks of reduce_rows_flat), without a
// channel scale or its gradient: each block of `rows` channel rows (and the rows left after
// the last whole block) goes through gradx_segment as one row against the pixel maps tiled to
// the block (tile_block_maps); MB: the flat max bits. The same values element for element
// as row by row.

// buf (5 blocks) <- attn, mx (without MB), dmax, dmean, each tiled to a block; a block of
// gx' after them
template <typename T, bool M, bool F, bool MB>
void tile_block_maps(const T* attn, const T* mx, const T* dmax, const T* dmean, int64_t HW, int64_t rows, T* buf) {
  const int64_t B = rows * HW;
  tile_rows(attn, HW, rows, buf);
  if (M && !MB) tile_rows(mx, HW, rows, buf + B);
  if (M) tile_rows(dmax, HW, rows, buf + 2 * B);
  if (F) tile_rows(dmean, HW, rows, buf + 3 * B);
}

// channel rows [c0, c1) of one image (c0 at a block); buf: tile_block_maps'
template <typename T, typename X, bool GC, bool M, bool F, bool MB>
void gradx_block_rows(const X* x, const X* g, T gv, const T* buf, int64_t c0, int64_t c1, int64_t HW, int64_t rows,
                      X* gx, bool stream, T* row, const uint8_t* mb) {
  const int64_t B = rows * HW;
  for (int64_t c = c0; c < c1; c += rows)
    gradx_segment<T, X, true, GC, M, F, false, MB>(x + c * HW, GC ? nullptr : g + c * HW, gv, T(1), buf, buf + B,
                                                   buf + 2 * B, buf + 3 * B, std::min(rows, c1 - c) * HW,
                                                   gx + c * HW, stream, row, mb, c * HW);
}

#if defined(__AVX512F__)
// the sum of a vector's lanes (a tree)
inline float lane_sum(vec_t<float> v) {
  __m512 r;
  std::memcpy(&r, &v, sizeof(r));
  return _mm512_reduce_add_ps(r);
}
inline double lane_sum(vec_t<double> v) {
  __m512d r;
  std::memcpy(&r, &v, sizeof(r));
  return _mm512_reduce_add_pd(r);
}

// gradx_block_rows with a channel scale s (the image's, by lanes: BlockScales; ri:
// row_index_tile(HW, rows)) and, with S, its gradient gs (the image's, [C]): gx = gx' * s[c]
// (the same values element for element as gradx_segment on the rows) and gs[c] = sum_p gx' * x.
// gs sums each row in the block's lanes: a vector accumulator over the row's vectors (the
// lanes of a vector that two rows share go to each row by a lane mask), its lanes summed
// where the row ends (a tree), then the row's elements after the last whole vector; so the
// same sums in another order than gradx_segment's, close. Streamed float32 output goes out
// with non-temporal stores where the block starts at a vector's storage size (as it does
// wherever the image does: a block is a whole number of vectors), else through `work` (a
// block) and mul_row.
template <typename T, typename X, bool GC, bool M, bool F, bool S, bool MB>
void gradx_blocks_scaled(const X* x, const T* s, const int32_t* ri, const X* g, T gv, const T* buf, int64_t c0,
                         int64_t c1, int64_t HW, int64_t rows, X* gx, T* gs, bool stream, T* work,
                         const uint8_t* mb) {
  static_assert(!(MB && S), "the channel-scale gradient reads x");
  using V = vec_t<T>;
  constexpr int64_t L = lanes<T>();
  const int64_t B = rows * HW;
  const T *an = buf, *mn = buf + B, *fm = buf + 2 * B, *fa = buf + 3 * B;
  for (int64_t c = c0; c < c1; c += rows) {
    const int64_t nr = std::min(rows, c1 - c), len = nr * HW;
    const X* xr = x + c * HW;
    const X* gr = GC ? nullptr : g + c * HW;
    X* out = gx ? gx + c * HW : nullptr;
    bool direct = false;
    if constexpr (std::is_same_v<T, float>) direct = out && stream && elems_to_boundary(out, L * sizeof(X)) == 0;
    const BlockScales<T> sb(s + c, nr);
    if (S) std::fill(gs + c, gs + c + nr, T(0));
    V acc = {};
    int32_t cur = 0;  // the row that acc sums
    int64_t k = 0;
    for (; k + L <= len; k += L) {
      const V sl = sb.at(ri, k), xv = vld(xr + k);
      V v = (GC ? V{} + gv : vld(gr + k)) * vload(an + k);
      if constexpr (M && MB) v += where_bits<T>(get_bits<L>(mb, c * HW + k), vload(fm + k));
      else if (M) v += vsel<T>(vcmp<kEq, T>(xv * sl, vload(mn + k)), vload(fm + k), V{});
      if (F) v += vload(fa + k);
      if constexpr (S) {
        const V p = v * xv;
        const int32_t last = ri[k + L - 1];
        if (last == cur) {
          acc += p;
        } else {  // rows cur .. last share this vector
          for (int32_t j = cur; j <= last; ++j) {
            const V part = row_lanes(p, ri, k, j);
            if (j == cur) {
              gs[c + j] += lane_sum(acc + part);
            } else if (j < last) {
              gs[c + j] += lane_sum(part);
            } else {
              acc = part;
            }
          }
          cur = last;
        }
      }
      if (out) {
        if constexpr (std::is_same_v<T, float>) {
          if (direct) {
            vst_nt(out + k, v * sl);
            continue;
          }
        }
        if (stream) vstore(work + k, v * sl);
        else vst(out + k, v * sl);
      }
    }
    if (S) gs[c + cur] += lane_sum(acc);
    for (; k < len; ++k) {
      const T sc = s[c + ri[k]];
      T v = (GC ? gv : T(gr[k])) * an[k];
      if (M) v += (MB ? get_bit(mb, c * HW + k) : T(xr[k]) * sc == mn[k]) ? fm[k] : T(0);
      if (F) v += fa[k];
      if (S) gs[c + ri[k]] += v * T(xr[k]);
      if (out) {
        if (stream && !direct) work[k] = v * sc;
        else out[k] = X(v * sc);
      }
    }
    if (out && stream && !direct) mul_row<T>(out, work, nullptr, T(1), nullptr, T(1), len, stream);
  }
}
#endif

// one image (the fused backward of whole images); s: its channel scales or null (then ri:
// row_index_tile(HW, rows)); gs: its channel-scale gradient [C] (with S)
template <typename T, typename X, bool GC, bool M, bool F, bool MB, bool S = false>
void gradx_rows_flat(const X* x, const T* s, const int32_t* ri, const X* g, T gv, const T* attn, const T* mx,
                     const T* dmax, const T* dmean, int64_t C, int64_t HW, int64_t rows, X* gx, T* gs, bool stream,
                     const uint8_t* mb, std::vector<T>& buf) {
  const int64_t B = rows * HW;
  buf.resize(5 * B);
  tile_block_maps<T, M, F, MB>(attn, mx, dmax, dmean, HW, rows, buf.data());
#if defined(__AVX512F__)
  if (s) {
    gradx_blocks_scaled<T, X, GC, M, F, S, MB>(x, s, ri, g, gv, buf.data(), 0, C, HW, rows, gx, gs, stream,
                                               buf.data() + 4 * B, mb);
    return;
  }
#else
  (void)s;
  (void)ri;
  (void)gs;
#endif
  gradx_block_rows<T, X, GC, M, F, MB>(x, g, gv, buf.data(), 0, C, HW, rows, gx, stream, buf.data() + 4 * B, mb);
}

// channels_last: one pixel (its C channels); ps[c] += gx' * x (if ps, X only); buf: C scratch.
// XM (mask from x): the max channels are those with x' == m. Without XM, `ix` (from pass A,
// only where the tie count is 1) is the max channel (or < 0: none), patched after the
// sweep, and x is not read at all: one input stream less (measured: the channels_last
// backward 9-10 % faster at 8x512x26x26 and 8x256x52x52). The channel-scale gradient
// (sum gx' * x) needs x, so callers take X with it. NCHW takes max bits instead (see
// kMaxBits): there the index map's cost in pass A ate the gain (measured within noise).
#if SAM_AVX2_HALVES
// gradx_pixel's vector loop for float32 in AVX2 builds: the same operations per element in
// 256-bit vectors; returns the first channel left to the scalar loop
template <bool G, bool GC, bool M, bool F, bool XM, typename X>
inline int64_t gradx_pixel_avx2(const X* xr, const X* gr, float gv, float av, const float* sr, float m, float f,
                                float fa, int64_t C, float* ps, X* gx, bool stream, float* gp) {
  const __m256 gav = _mm256_set1_ps(gv * av), vav = _mm256_set1_ps(av), vfa = _mm256_set1_ps(fa),
               vm = _mm256_set1_ps(m), vf = _mm256_set1_ps(f);
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    __m256 v = F ? vfa : _mm256_setzero_ps();
    if constexpr (G) v = _mm256_add_ps(GC ? gav : _mm256_mul_ps(ld8(gr + c), vav), v);
    if constexpr (M && XM) {
      const __m256 xv = ld8(xr + c);
      const __m256 xs = sr ? _mm256_mul_ps(xv, _mm256_loadu_ps(sr + c)) : xv;
      v = _mm256_add_ps(v, _mm256_and_ps(_mm256_cmp_ps(xs, vm, _CMP_EQ_OQ), vf));
    }
    if (XM && ps) _mm256_storeu_ps(ps + c, _mm256_add_ps(_mm256_loadu_ps(ps + c), _mm256_mul_ps(v, ld8(xr + c))));
    if (stream || !gx) _mm256_storeu_ps(gp + c, v);
    else st8(gx + c, sr ? _mm256_mul_ps(v, _mm256_loadu_ps(sr + c)) : v);
  }
  return c;
}
#endif

template <typename T, typename X, bool G, bool GC, bool M, bool F, bool XM>
inline void gradx_pixel(const X* xr, const X* gr, T gv, T av, const T* sr, T m, T ix, T f, T fa, int64_t C, T* ps,
                        X* gx, bool stream, T* gp) {
  using V = vec_t<T>;
  constexpr int64_t L = lanes<T>();
  const V gav = V{} + gv * av;
  // the gradient of channels c .. c + L - 1 before the channel scale (the max term from x with
  // XM; ps accumulated)
  auto lanes_at = [&](int64_t c) {
    V v = F ? V{} + fa : V{};
    if (G) v = (GC ? gav : vld(gr + c) * av) + v;
    if (M && XM) {
      const V xs = sr ? vld(xr + c) * vload(sr + c) : vld(xr + c);
      v += vsel<T>(vcmp<kEq, T>(xs, V{} + m), V{} + f, V{});
    }
    if (XM && ps) vstore(ps + c, vload(ps + c) + v * vld(xr + c));
    return v;
  };
  int64_t c = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    if (stream && gx && C % L == 0 && reinterpret_cast<uintptr_t>(gx) % (L * sizeof(X)) == 0) {
      // streamed, whole aligned vectors: non-temporal stores straight from the sweep, the one
      // max channel's share added in its lane (the same sums as the patch below), instead of
      // the row through gp and mul_row's streaming copy (raw backward at 8x256x52x52: 0.58x
      // the time with a busy memory bus, 0.94x with a quiet one)
      const int64_t k = (M && !XM && ix >= T(0)) ? int64_t(ix) : int64_t(-1);
      for (; c < C; c += L) {
        V v = lanes_at(c);
        if (M && !XM && k >= c && k < c + L) v = vsel<T>(vcmp<kEq, T>(lane_index<T>(), V{} + T(k - c)), v + f, v);
        vst_nt(gx + c, sr ? v * vload(sr + c) : v);
      }
      return;
    }
  }
#endif
#if SAM_AVX2_HALVES
  if constexpr (std::is_same_v<T, float>)
    c = gradx_pixel_avx2<G, GC, M, F, XM, X>(xr, gr, gv, av, sr, m, f, fa, C, ps, gx, stream, gp);
#endif
  for (; c + L <= C; c += L) {
    const V v = lanes_at(c);
    if (stream || !gx) {
      vstore(gp + c, v);
    } else {
      vst(gx + c, sr ? v * vload(sr + c) : v);
    }
  }
  for (; c < C; ++c) {
    T v = F ? fa : T(0);
    if (G) v = (GC ? gv * av : T(gr[c]) * av) + v;
    if (M && XM) v += ((sr ? T(xr[c]) * sr[c] : T(xr[c])) == m) ? f : T(0);
    if (XM && ps) ps[c] += v * T(xr[c]);
    gp[c] = v;
    if (gx && !stream) gx[c] = X(sr ? v * sr[c] : v);
  }
  if (M && !XM && ix >= T(0)) {  // the one max channel
    const int64_t k = int64_t(ix);
    T v = F ? fa : T(0);
    if (G) v = (GC ? gv * av : T(gr[k]) * av) + v;
    v += f;
    gp[k] = v;
    if (gx && !stream) gx[k] = X(sr ? v * sr[k] : v);
  }
  if (gx && stream) mul_row<T>(gx, gp, sr, T(1), nullptr, T(1), C, stream);
}

// Pass B takes the max channel from pass A's index map (instead of comparing x with the
// max) only for channels_last, with a max slot, and without a channel-scale gradient
// (sum gx' * x reads x anyway); per pixel / band it still needs a tie count of 1.
inline bool max_by_index(bool has_max, bool nhwc, bool need_gs) { return has_max && nhwc && !need_gs; }

// true if some pixel of [0, n) has tied maxima (count > 1)
template <typename T>
inline bool any_ties(const T* cnt, int64_t n) {
  for (int64_t k = 0; k < n; ++k)
    if (cnt[k] > T(1)) return true;
  return false;
}

// ix / cnt (with M, batch stride HW; channels_last): index map and tie counts of pass A;
// null: the max mask comes from x everywhere.
template <typename T, typename X, bool G, bool GC, bool M, bool F>
void k_gradx_impl(const X* x, const T* s, const X* g, const T* a, const T* mx, int64_t mbs, const T* fmax,
                  const T* fmean, const T* ix, const T* cnt, int64_t N, int64_t C, int64_t HW, bool nhwc, X* gx,
                  T* gs, bool stream, const uint8_t* bits) {
  const T gv = (G && GC) ? T(g[0]) : T(0);
  const bool by_index = max_by_index(M, nhwc, gs != nullptr) && ix && cnt;
  if (!nhwc) {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(HW, 1));
    const MaxBitsLayout lay(N, C, HW);
    // the channel rows (contiguous over the images) `ahead` rows on prefetched where the
    // gradient is streamed (rows.h), as pass B of the bands does
    const int64_t ahead = pass_b_rows_ahead(stream, HW, int64_t(sizeof(X)));
    at::parallel_for(0, N * C, grain, [&](int64_t b, int64_t e) {
      std::vector<T> buf(HW);
      rows_with_row_ahead(e - b, ahead, [&](auto pf_t, int64_t i0, int64_t i1) {
        for (int64_t r = b + i0; r < b + i1; ++r) {
          const int64_t n = r / C;
          auto run = [&](auto s_t, auto b_t, int64_t p0, int64_t len, const uint8_t* mb) {
            return gradx_segment<T, X, G, GC, M, F, decltype(s_t)::value, decltype(b_t)::value,
                                 decltype(pf_t)::value>(
                x + r * HW + p0, (G && !GC) ? g + r * HW + p0 : nullptr, gv, s ? s[r] : T(1),
                G ? a + n * HW + p0 : nullptr, M ? mx + n * mbs + p0 : nullptr, M ? fmax + n * HW + p0 : nullptr,
                F ? fmean + n * HW + p0 : nullptr, len, gx ? gx + r * HW + p0 : nullptr, stream, buf.data(), mb, 0,
                ahead * HW);
          };
          if (gs) {
            gs[r] = run(std::true_type{}, std::false_type{}, 0, HW, nullptr);
          } else if (M && bits) {  // chunk by chunk, as k_reduce wrote the bits
            for (int64_t k = 0; k < lay.nchunks; ++k)
              run(std::false_type{}, std::true_type{}, k * lay.chunk, std::min(lay.chunk, HW - k * lay.chunk),
                  bits + lay.row(n, k, r - n * C));
          } else {
            run(std::false_type{}, std::false_type{}, 0, HW, nullptr);
          }
        }
      });
      stream_fence(stream);
    });
  } else {
    // Pixels in blocks; every block keeps its own partial sums of gs, added up at the end.
    const int64_t block = std::max<int64_t>(1, std::min<int64_t>(HW, 4096 / std::max<int64_t>(C, 1) + 1));
    const int64_t nblocks = (HW + block - 1) / block;
    std::vector<T> partial(gs ? N * nblocks * C : 0, T(0));
    at::parallel_for(0, N * nblocks, 1, [&](int64_t b, int64_t e) {
      std::vector<T> buf(C);
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = t / nblocks, q0 = (t % nblocks) * block;
        const int64_t q1 = std::min(HW, q0 + block);
        for (int64_t q = q0; q < q1; ++q) {
          const int64_t p = n * HW + q;
          auto run = [&](auto x_t) {
            gradx_pixel<T, X, G, GC, M, F, decltype(x_t)::value>(
                x + p * C, (G && !GC) ? g + p * C : nullptr, gv, G ? a[p] : T(0), s ? s + n * C : nullptr,
                M ? mx[n * mbs + q] : T(0), by_index ? ix[p] : T(-1), M ? fmax[p] : T(0), F ? fmean[p] : T(0), C,
                gs ? partial.data() + t * C : nullptr, gx ? gx + p * C : nullptr, stream, buf.data());
          };
          if (by_index && cnt[p] <= T(1)) run(std::false_type{}); else run(std::true_type{});
        }
      }
      stream_fence(stream);
    });
    if (gs) {
      at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          T* o = gs + n * C;
          std::fill(o, o + C, T(0));
          for (int64_t k = 0; k < nblocks; ++k) {
            const T* ps = partial.data() + (n * nblocks + k) * C;
            for (int64_t c = 0; c < C; ++c) o[c] += ps[c];
          }
        }
      });
    }
  }
}

// the same over N images (after k_reduce_blocks_impl): its units in parallel;
// bits: its flat max bits (may be null: the max channels from x)
// s (may be null): the channel scales [N, C], then gs (with S): their gradient [N, C]
template <typename T, typename X, bool GC, bool M, bool F, bool MB, bool S = false>
void k_gradx_blocks_impl(const X* x, const T* s, const X* g, const T* a, const T* mx, int64_t mbs, const T* fmax,
                         const T* fmean, int64_t N, int64_t C, int64_t HW, int64_t rows, X* gx, T* gs, bool stream,
                         const uint8_t* bits) {
  const T gv = GC ? T(g[0]) : T(0);
  const int64_t B = rows * HW, nb = C / rows, CHW = C * HW, ub = phase_unit_blocks(N, C, rows);
  const int64_t nu = block_units(C, rows, ub), fb = flat_bits_image(C, HW);
  std::vector<int32_t> ri(s ? B : 0);
  if (s) row_index_tile(HW, rows, ri.data());
  at::parallel_for(0, N * nu, 1, [&](int64_t b, int64_t e) {
    std::vector<T> buf(5 * B);
    int64_t tiled = -1;
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / nu, b0 = (t % nu) * ub;  // the last unit: the rows left, if any
      if (tiled != n) {
        tile_block_maps<T, M, F, MB>(a + n * HW, M ? mx + n * mbs : nullptr, M ? fmax + n * HW : nullptr,
                                     F ? fmean + n * HW : nullptr, HW, rows, buf.data());
        tiled = n;
      }
      const int64_t c0 = std::min(b0, nb) * rows, c1 = b0 < nb ? std::min(nb, b0 + ub) * rows : C;
      const uint8_t* mb = MB ? bits + n * fb : nullptr;
#if defined(__AVX512F__)
      if (s) {
        gradx_blocks_scaled<T, X, GC, M, F, S, MB>(x + n * CHW, s + n * C, ri.data(), GC ? g : g + n * CHW, gv,
                                                   buf.data(), c0, c1, HW, rows, gx + n * CHW,
                                                   S ? gs + n * C : nullptr, stream, buf.data() + 4 * B, mb);
        continue;
      }
#endif
      gradx_block_rows<T, X, GC, M, F, MB>(x + n * CHW, GC ? g : g + n * CHW, gv, buf.data(), c0, c1, HW, rows,
                                           gx + n * CHW, stream, buf.data() + 4 * B, mb);
    }
    stream_fence(stream);
  });
}

// bits: k_reduce's max bits (NCHW; may be null): then x is not read for the max mask (not
// with gs, whose sum reads x). block_rows: k_reduce's (> 0: in blocks of rows,
// k_gradx_blocks_impl)
template <typename T, typename X>
void k_gradx(const X* x, const T* s, const X* g, bool gc, const T* a, const T* mx, int64_t mbs, const T* fmax,
             const T* fmean, int64_t N, int64_t C, int64_t HW, bool nhwc, X* gx, T* gs, bool stream,
             const T* ix = nullptr, const T* cnt = nullptr, const uint8_t* bits = nullptr,
             int64_t block_rows = 0) {
  const bool G = g != nullptr, M = mx != nullptr, F = fmean != nullptr;
  if (block_rows > 0 && G) {
    const bool MB = M && bits != nullptr;
#define SA_GRADX_BLOCKS(gc_, m_, f_, mb_)                                                                      \
  (gs ? k_gradx_blocks_impl<T, X, gc_, m_, f_, false, true>(x, s, g, a, mx, mbs, fmax, fmean, N, C, HW,        \
                                                            block_rows, gx, gs, stream, bits)                  \
      : k_gradx_blocks_impl<T, X, gc_, m_, f_, mb_>(x, s, g, a, mx, mbs, fmax, fmean, N, C, HW, block_rows, gx, \
                                                    gs, stream, bits))
#define SA_GRADX_BLOCKS_MF(gc_)                              \
  if (MB && F) SA_GRADX_BLOCKS(gc_, true, true, true);      \
  else if (MB) SA_GRADX_BLOCKS(gc_, true, false, true);     \
  else if (M && F) SA_GRADX_BLOCKS(gc_, true, true, false); \
  else if (M) SA_GRADX_BLOCKS(gc_, true, false, false);     \
  else if (F) SA_GRADX_BLOCKS(gc_, false, true, false);     \
  else SA_GRADX_BLOCKS(gc_, false, false, false);
    if (gc) {
      SA_GRADX_BLOCKS_MF(true)
    } else {
      SA_GRADX_BLOCKS_MF(false)
    }
#undef SA_GRADX_BLOCKS_MF
#undef SA_GRADX_BLOCKS
    return;
  }
#define SA_GRADX(g_, gc_, m_, f_)                                                                            \
  k_gradx_impl<T, X, g_, gc_, m_, f_>(x, s, g, a, mx, mbs, fmax, fmean, ix, cnt, N, C, HW, nhwc, gx, gs, stream, \
                                      bits)
#define SA_GRADX_MF(g_, gc_)                   \
  if (M && F) SA_GRADX(g_, gc_, true, true);   \
  else if (M) SA_GRADX(g_, gc_, true, false);  \
  else if (F) SA_GRADX(g_, gc_, false, true);  \
  else SA_GRADX(g_, gc_, false, false);
  if (G && gc) {
    SA_GRADX_MF(true, true)
  } else if (G) {
    SA_GRADX_MF(true, false)
  } else {
    SA_GRADX_MF(false, false)
  }
#undef SA_GRADX_MF
#undef SA_GRADX
}


}  // namespace
