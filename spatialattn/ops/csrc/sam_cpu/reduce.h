// Backward pass A: the gradient of the gate, the max-tie counts and max channels.
//
// Part of sam_cpu.cpp: the parts are included in order into one translation unit, each in the
// unit's anonymous namespace, and each uses the ones before it (see sam_cpu.cpp for the overview).
#pragma once

namespace {

// ---------------------------------------------------------------- backward pass A
// ga[p] = sum_c g * x'   (if ga);   cnt[p] = #{c : x' == mx[p]}   (if cnt);
// channels_last only: ix[p] = the last channel c with x' == mx[p], -1 if none (a T holding
// an integer). Where cnt == 1, pass B finds the max channel from ix without reading x.
// mx has batch stride mbs. gc: g is one value broadcast to every element (e.g. the
// gradient of y.sum()). Explicit vectors: the tie count (a compare) would otherwise
// keep the compiler from vectorising the loop.
// mb (with M; may be null): max bits, channel rows of mbs bytes, written at pixels q0 + [0, len).
//
// reduce_chunk reads four channel rows per sweep (one pass over the accumulators for four
// rows), except where its rows are one contiguous run (len == HW: a whole NCHW image, or the
// flat blocks below), short (at most kOneStreamRowBytes) and the image's x exceeds the L2:
// then one row per sweep, so that x and g are each read as one stream from start to end
// instead of four short runs restarting every row. The same operations in the same order
// either way (sums and counts add channels in sequence), so the same bits. Measured (raw
// NCHW backward, 2 threads, batch 8, float32, paired in one process, the order alternated
// per round; Zen 4 VM): 0.84x the time at 512x26x26 (1.4 MB image, 2.7 KB rows), 0.71-0.78x
// at 1024x20x20, 0.76-0.81x at 2048x13x13, 0.88x at 512x32x32, 0.79x at 768x24x24, 0.86-0.92x
// at 384x26x26, 0.88x at 1024x16x16 (1 thread alike: 0.81x, 0.72x, 0.86x); where the image fits
// the L2 four rows stay ahead (1.02-1.10x at 256x26x26, 1024x13x13, 128x28x28), and so they do
// for longer rows (1.07x at 256x38x38, 1.13-1.26x at 52x52, 1.12-1.22x at 104x104). Two rows
// per sweep were slower than four everywhere. bfloat16 (same build): 0.82x at 2048x20x20,
// 0.98x at 1024x26x26, 1.02x at 4096x13x13. The forward's pooling (one input) keeps its
// groups: one row per sweep there was 1.2x slower at 512x26x26. AVX-512 builds only: in the
// AVX2 build (reduce_chunk_avx2's groups against the generic one-row loop) one row per sweep
// was 1.2-1.5x slower at the same shapes.
// Settable (set_one_stream_reduce): -1 the rule, 0 never, 1 wherever len == HW (tests).
constexpr int64_t kOneStreamRowBytes = 4096;
int kOneStreamReduce = -1;
inline bool one_stream_reduce(int64_t C, int64_t HW, int64_t len, int64_t elem_bytes) {
  if (kOneStreamReduce == 0 || len != HW) return false;
  if (kOneStreamReduce > 0) return true;
#if defined(__AVX512F__)
  return HW * elem_bytes <= kOneStreamRowBytes && C * HW * elem_bytes > l2_bytes();
#else
  (void)C;
  (void)elem_bytes;
  return false;
#endif
}

#if SAM_AVX2_HALVES
// reduce_chunk's groups of four channel rows for float32 in AVX2 builds: the same operations
// per element in 256-bit vectors, the tail as one vector ending at len whose overlapped lanes
// keep their sums and counts (and get their max bits again, the same); returns the first
// channel left
template <bool G, bool GC, bool M, typename X>
inline int64_t reduce_chunk_avx2(const X* x, const float* s, const X* g, float gv, const float* mp, int64_t C,
                                 int64_t HW, int64_t len, float* ap, float* cp, uint8_t* mb, int64_t mbs,
                                 int64_t q0, int64_t prefetch) {
  if (len < 8) return 0;
  const int64_t ahead = prefetch_rows_ahead(prefetch, 4, len, int64_t(sizeof(X)) * (G && !GC ? 2 : 1));
  const __m256 one = _mm256_set1_ps(1.f), vg = _mm256_set1_ps(gv);
  const __m256 lane = _mm256_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f);
  const int64_t full = len / 8 * 8;
  // the tail vector's lanes not yet swept (lane >= full - (len - 8))
  const __m256 keep = _mm256_cmp_ps(lane, _mm256_set1_ps(float(full - (len - 8))), _CMP_GE_OQ);
  int64_t c = 0;
  for (; c + 4 <= C; c += 4) {
    const X* x0 = x + c * HW;
    const X* g0 = g + c * HW;
    const __m256 s0 = _mm256_set1_ps(s ? s[c] : 1.f), s1 = _mm256_set1_ps(s ? s[c + 1] : 1.f),
                 s2 = _mm256_set1_ps(s ? s[c + 2] : 1.f), s3 = _mm256_set1_ps(s ? s[c + 3] : 1.f);
    auto sweep = [&](int64_t k, bool tail) {
      const __m256 v0 = _mm256_mul_ps(ld8(x0 + k), s0), v1 = _mm256_mul_ps(ld8(x0 + HW + k), s1),
                   v2 = _mm256_mul_ps(ld8(x0 + 2 * HW + k), s2), v3 = _mm256_mul_ps(ld8(x0 + 3 * HW + k), s3);
      if constexpr (G) {
        const __m256 a0 = _mm256_loadu_ps(ap + k);
        __m256 a = a0;
        if constexpr (GC) {
          a = _mm256_add_ps(a, _mm256_mul_ps(vg, v0));
          a = _mm256_add_ps(a, _mm256_mul_ps(vg, v1));
          a = _mm256_add_ps(a, _mm256_mul_ps(vg, v2));
          a = _mm256_add_ps(a, _mm256_mul_ps(vg, v3));
        } else {
          a = _mm256_add_ps(a, _mm256_mul_ps(ld8(g0 + k), v0));
          a = _mm256_add_ps(a, _mm256_mul_ps(ld8(g0 + HW + k), v1));
          a = _mm256_add_ps(a, _mm256_mul_ps(ld8(g0 + 2 * HW + k), v2));
          a = _mm256_add_ps(a, _mm256_mul_ps(ld8(g0 + 3 * HW + k), v3));
        }
        _mm256_storeu_ps(ap + k, tail ? _mm256_blendv_ps(a0, a, keep) : a);
      }
      if constexpr (M) {
        const __m256 m = _mm256_loadu_ps(mp + k), n0 = _mm256_loadu_ps(cp + k);
        const __m256 e0 = _mm256_cmp_ps(v0, m, _CMP_EQ_OQ), e1 = _mm256_cmp_ps(v1, m, _CMP_EQ_OQ),
                     e2 = _mm256_cmp_ps(v2, m, _CMP_EQ_OQ), e3 = _mm256_cmp_ps(v3, m, _CMP_EQ_OQ);
        __m256 n1 = _mm256_add_ps(n0, _mm256_and_ps(e0, one));
        n1 = _mm256_add_ps(n1, _mm256_and_ps(e1, one));
        n1 = _mm256_add_ps(n1, _mm256_and_ps(e2, one));
        n1 = _mm256_add_ps(n1, _mm256_and_ps(e3, one));
        _mm256_storeu_ps(cp + k, tail ? _mm256_blendv_ps(n0, n1, keep) : n1);
        if (mb) {
          uint8_t* b0 = mb + c * mbs;
          put_bits<8>(b0, q0 + k, uint32_t(_mm256_movemask_ps(e0)));
          put_bits<8>(b0 + mbs, q0 + k, uint32_t(_mm256_movemask_ps(e1)));
          put_bits<8>(b0 + 2 * mbs, q0 + k, uint32_t(_mm256_movemask_ps(e2)));
          put_bits<8>(b0 + 3 * mbs, q0 + k, uint32_t(_mm256_movemask_ps(e3)));
        }
      }
    };
    with_prefetch(has_group_ahead(c, 4, ahead, C), [&](auto pf_t) {
      for (int64_t k = 0; k < full; k += 8) {
        if constexpr (decltype(pf_t)::value) {
          prefetch_group<4>(x, c, HW, ahead, k);
          if constexpr (G && !GC) prefetch_group<4>(g, c, HW, ahead, k);
        }
        sweep(k, false);
      }
    });
    if (full < len) sweep(len - 8, true);
  }
  return c;
}
#endif

#if defined(__AVX512F__)
// reduce_chunk of a short run (AVX-512 builds; pieces as pool_short_run's, at most
// kPoolShortMax elements): the sums and counts of each vector in registers over all C
// channels, the last vector ending at len. In memory (the sweeps below) the last vector's
// load of the accumulators overlaps the store of the vector before it for every group of
// channels, a load store-to-load forwarding cannot serve. Rows in groups of four, then one at
// a time, with reduce_chunk's operations in its order (the sums and counts add the channels in
// sequence, whether four or one per sweep), so the same bits; the max bits of overlapped
// lanes are written twice, the same. Where the runs are a whole image's contiguous rows the
// groups read x and g front to back (one_stream_reduce's concern). set_pool_short switches
// this and the pooling's registers together (tests).
template <int NV, typename T, typename X, bool G, bool GC, bool M>
void reduce_short(const X* x, const T* s, const X* g, T gv, const T* mp, int64_t C, int64_t HW, int64_t len, T* ap,
                  T* cp, uint8_t* mb, int64_t mbs, int64_t q0, int64_t prefetch) {
  using V = vec_t<T>;
  constexpr int64_t L = lanes<T>();
  const V one = V{} + T(1), zero = V{};
  auto off = [len](auto j) { return std::min<int64_t>(decltype(j)::value * L, len - L); };
  V a[NV], n[NV];
  each_index<NV>([&](auto j) {
    a[j] = zero;
    n[j] = zero;
  });
  const int64_t ahead = prefetch_rows_ahead(prefetch, 4, len, int64_t(sizeof(X)) * (G && !GC ? 2 : 1));
  int64_t c = 0;
  for (; c + 4 <= C; c += 4) {
    const X* x0 = x + c * HW;
    const X* g0 = g + c * HW;
    const T s0 = s ? s[c] : T(1), s1 = s ? s[c + 1] : T(1), s2 = s ? s[c + 2] : T(1), s3 = s ? s[c + 3] : T(1);
    if (ahead > 0 && has_group_ahead(c, 4, ahead, C))
      each_index<NV>([&](auto j) {
        prefetch_group<4>(x, c, HW, ahead, off(j));
        if constexpr (G && !GC) prefetch_group<4>(g, c, HW, ahead, off(j));
      });
    each_index<NV>([&](auto j) {
      const int64_t k = off(j);
      const V v0 = vld(x0 + k) * s0, v1 = vld(x0 + HW + k) * s1, v2 = vld(x0 + 2 * HW + k) * s2,
              v3 = vld(x0 + 3 * HW + k) * s3;
      if constexpr (G) {
        if constexpr (GC) {
          a[j] = a[j] + gv * v0 + gv * v1 + gv * v2 + gv * v3;
        } else {
          a[j] = a[j] + vld(g0 + k) * v0 + vld(g0 + HW + k) * v1 + vld(g0 + 2 * HW + k) * v2 +
                 vld(g0 + 3 * HW + k) * v3;
        }
      }
      if constexpr (M) {
        const V m = vload(mp + k);
        const auto e0 = vcmp<kEq, T>(v0, m), e1 = vcmp<kEq, T>(v1, m), e2 = vcmp<kEq, T>(v2, m),
                   e3 = vcmp<kEq, T>(v3, m);
        n[j] = n[j] + vsel<T>(e0, one, zero) + vsel<T>(e1, one, zero) + vsel<T>(e2, one, zero) +
               vsel<T>(e3, one, zero);
        if (mb) {
          uint8_t* b0 = mb + c * mbs;
          put_bits<L>(b0, q0 + k, lane_bits<T>(e0));
          put_bits<L>(b0 + mbs, q0 + k, lane_bits<T>(e1));
          put_bits<L>(b0 + 2 * mbs, q0 + k, lane_bits<T>(e2));
          put_bits<L>(b0 + 3 * mbs, q0 + k, lane_bits<T>(e3));
        }
      }
    });
  }
  for (; c < C; ++c) {
    const X* x0 = x + c * HW;
    const X* g0 = g + c * HW;
    const T s0 = s ? s[c] : T(1);
    each_index<NV>([&](auto j) {
      const int64_t k = off(j);
      const V v0 = vld(x0 + k) * s0;
      if constexpr (G) a[j] = a[j] + (GC ? V{} + gv : vld(g0 + k)) * v0;
      if constexpr (M) {
        const auto e0 = vcmp<kEq, T>(v0, vload(mp + k));
        n[j] = n[j] + vsel<T>(e0, one, zero);
        if (mb) put_bits<L>(mb + c * mbs, q0 + k, lane_bits<T>(e0));
      }
    });
  }
  each_index<NV>([&](auto j) {
    vstore(ap + off(j), a[j]);
    vstore(cp + off(j), n[j]);
  });
}
#endif

template <typename T, typename X, bool G, bool GC, bool M>
void reduce_chunk(const X* x, const T* s, const X* g, T gv, const T* mp, int64_t C, int64_t HW, int64_t len,
                  T* ap, T* cp, uint8_t* mb = nullptr, int64_t mbs = 0, int64_t q0 = 0, int64_t prefetch = 0) {
  using V = vec_t<T>;
  [[maybe_unused]] constexpr int64_t L = lanes<T>();
  const V one = V{} + T(1), zero = V{};
#if defined(__AVX512F__)
  if (short_run(len, L)) {  // short runs in registers (reduce_short)
    short_pieces<kPoolShortVectors>(len, L, [&](auto nv, int64_t p, int64_t n) {
      reduce_short<decltype(nv)::value, T, X, G, GC, M>(x + p, s, GC ? g : g + p, gv, M ? mp + p : nullptr, C, HW,
                                                        n, ap + p, cp + p, mb, mbs, q0 + p, prefetch);
    });
    return;
  }
#endif
  std::fill(ap, ap + len, T(0));
  std::fill(cp, cp + len, T(0));
  // the tail through vector_sweeps: overlapped lanes keep their sums and counts
  auto kept = [](auto tail_t, auto keep, V updated, V old) {
    if constexpr (decltype(tail_t)::value) return vsel<T>(keep, updated, old);
    else return updated;
  };
  // the groups of four channel rows run up to c4: none where one_stream_reduce
  const int64_t c4 = one_stream_reduce(C, HW, len, int64_t(sizeof(X))) ? 0 : C;
  int64_t c = 0;
#if SAM_AVX2_HALVES
  if constexpr (std::is_same_v<T, float>) {
    if (c4 > 0) c = reduce_chunk_avx2<G, GC, M, X>(x, s, g, gv, mp, C, HW, len, ap, cp, mb, mbs, q0, prefetch);
  }
#endif
  // the rows `ahead` further on prefetched (prefetch: bytes of work ahead, 0 none; see rows.h)
  const int64_t ahead = prefetch_rows_ahead(prefetch, 4, len, int64_t(sizeof(X)) * (G && !GC ? 2 : 1));
  for (; c + 4 <= c4; c += 4) {
    const X* x0 = x + c * HW;
    const X* g0 = g + c * HW;
    const T s0 = s ? s[c] : T(1), s1 = s ? s[c + 1] : T(1), s2 = s ? s[c + 2] : T(1), s3 = s ? s[c + 3] : T(1);
    auto sweep = [&](auto pf_t) {
      return vector_sweeps<T>(len, [&](int64_t k, auto tail_t, auto keep) {
        if constexpr (decltype(pf_t)::value) {
          prefetch_group<4>(x, c, HW, ahead, k);
          if constexpr (G && !GC) prefetch_group<4>(g, c, HW, ahead, k);
        }
        const V v0 = vld(x0 + k) * s0, v1 = vld(x0 + HW + k) * s1, v2 = vld(x0 + 2 * HW + k) * s2,
                v3 = vld(x0 + 3 * HW + k) * s3;
        if (G) {
          const V a0 = vload(ap + k);
          V a = a0;
          if (GC) {
            a = a + gv * v0 + gv * v1 + gv * v2 + gv * v3;
          } else {
            a = a + vld(g0 + k) * v0 + vld(g0 + HW + k) * v1 + vld(g0 + 2 * HW + k) * v2 + vld(g0 + 3 * HW + k) * v3;
          }
          vstore(ap + k, kept(tail_t, keep, a, a0));
        }
        if (M) {
          const V m = vload(mp + k), n0 = vload(cp + k);
          const auto e0 = vcmp<kEq, T>(v0, m), e1 = vcmp<kEq, T>(v1, m), e2 = vcmp<kEq, T>(v2, m),
                     e3 = vcmp<kEq, T>(v3, m);
          const V n1 = n0 + vsel<T>(e0, one, zero) + vsel<T>(e1, one, zero) + vsel<T>(e2, one, zero) +
                       vsel<T>(e3, one, zero);
          vstore(cp + k, kept(tail_t, keep, n1, n0));
          if (mb) {  // (the tail's overlapped lanes get their bits again, the same)
            uint8_t* b0 = mb + c * mbs;
            put_bits<L>(b0, q0 + k, lane_bits<T>(e0));
            put_bits<L>(b0 + mbs, q0 + k, lane_bits<T>(e1));
            put_bits<L>(b0 + 2 * mbs, q0 + k, lane_bits<T>(e2));
            put_bits<L>(b0 + 3 * mbs, q0 + k, lane_bits<T>(e3));
          }
        }
      });
    };
    int64_t i = with_prefetch(has_group_ahead(c, 4, ahead, C), sweep);
    for (; i < len; ++i) {
      const T v0 = T(x0[i]) * s0, v1 = T(x0[HW + i]) * s1, v2 = T(x0[2 * HW + i]) * s2, v3 = T(x0[3 * HW + i]) * s3;
      if (G)
        ap[i] = GC ? ap[i] + gv * v0 + gv * v1 + gv * v2 + gv * v3
                   : ap[i] + T(g0[i]) * v0 + T(g0[HW + i]) * v1 + T(g0[2 * HW + i]) * v2 + T(g0[3 * HW + i]) * v3;
      if (M) {
        cp[i] = cp[i] + (v0 == mp[i] ? T(1) : T(0)) + (v1 == mp[i] ? T(1) : T(0)) + (v2 == mp[i] ? T(1) : T(0)) +
                (v3 == mp[i] ? T(1) : T(0));
        if (mb) {
          uint8_t* b0 = mb + c * mbs;
          put_bit(b0, q0 + i, v0 == mp[i]);
          put_bit(b0 + mbs, q0 + i, v1 == mp[i]);
          put_bit(b0 + 2 * mbs, q0 + i, v2 == mp[i]);
          put_bit(b0 + 3 * mbs, q0 + i, v3 == mp[i]);
        }
      }
    }
  }
  // the channels left one at a time: the same operations per element as the scalar loop. Where
  // this is the one-stream path (whole images of short rows), the rows `ahead1` further on are
  // prefetched: the hardware's stream prefetchers stop at every 4 KiB page, which the software
  // prefetch crosses (raw backward 0.85x the time at 8x512x26x26, 0.92-0.96x at 8x2048x26x26,
  // 32x2048x13x13, 16x1024x20x20)
  const int64_t ahead1 = prefetch_rows_ahead(prefetch, 1, len, int64_t(sizeof(X)) * (G && !GC ? 2 : 1));
  for (; c < C; ++c) {
    const X* x0 = x + c * HW;
    const X* g0 = g + c * HW;
    const T s0 = s ? s[c] : T(1);
    auto sweep = [&](auto pf_t) {
      return vector_sweeps<T>(len, [&](int64_t k, auto tail_t, auto keep) {
        if constexpr (decltype(pf_t)::value) {
          prefetch_group<1>(x, c, HW, ahead1, k);
          if constexpr (G && !GC) prefetch_group<1>(g, c, HW, ahead1, k);
        }
        const V v0 = vld(x0 + k) * s0;
        if (G) {
          const V a0 = vload(ap + k);
          vstore(ap + k, kept(tail_t, keep, a0 + (GC ? V{} + gv : vld(g0 + k)) * v0, a0));
        }
        if (M) {
          const V n0 = vload(cp + k);
          const auto e0 = vcmp<kEq, T>(v0, vload(mp + k));
          vstore(cp + k, kept(tail_t, keep, n0 + vsel<T>(e0, one, zero), n0));
          if (mb) put_bits<L>(mb + c * mbs, q0 + k, lane_bits<T>(e0));
        }
      });
    };
    int64_t i = with_prefetch(has_group_ahead(c, 1, ahead1, C), sweep);
    for (; i < len; ++i) {
      const T v0 = T(x0[i]) * s0;
      if (G) ap[i] += (GC ? gv : T(g0[i])) * v0;
      if (M) {
        cp[i] += v0 == mp[i] ? T(1) : T(0);
        if (mb) put_bit(mb + c * mbs, q0 + i, v0 == mp[i]);
      }
    }
  }
}

// The backward's blocks of short NCHW rows (below) have at most this many elements (rows *
// HW). Measured (raw backward, 2 threads, batch 8, float32,
// blocks vs rows, paired): 3x3 0.11x (a 9-pixel row is a scalar loop), 5x5 0.57x, 6x6
// 0.77x, 7x7 0.62x, 9x9 0.80x, 10x10 0.83x, 14x14 0.82-0.89x (blocks of 4 rows), 18x18 1.0x;
// blocks of 1936 - 3600 elements 0.94-1.2x (11x11, 13x13, 15x15, 17x17, 19x19, 22x22, 26x26:
// five block-sized maps no longer fit L1). Settable: set_flat_backward_max_block (0: off,
// negative: default).
constexpr int64_t kFlatBackwardBlockDefault = 1600;
int64_t kFlatBackwardMaxBlock = kFlatBackwardBlockDefault;

// NCHW pass A of whole images whose rows are short (rows = backward_block_rows(...) > 0).
// An image's channel rows are one contiguous run, so each block of `rows` rows (a whole
// number of vectors) goes through reduce_chunk as one row (with a channel scale through
// reduce_blocks_scaled, each lane scaled by its row's scale),
// against the max map tiled to the block (four blocks per sweep, as four channel rows),
// accumulating sum g * x and the tie counts per element of the block. The blocks go in units
// of `ub` blocks (the rows left after the last whole block: one unit more), each unit's sums
// from zero; then the units' rows are added per pixel in unit and row order. The gate's
// gradient thus sums its channels in another order than reduce_chunk's rows (as close). The
// max bits are flat: element (c, p) at bit c * HW + p of the image's bits. Units cost: each
// starts from zeroed sums and adds a block of sums to the fold (measured, raw backward at
// 8x2048x7x7: units of 8 blocks as slow as the rows, of 32 blocks 0.76x the rows' time, one
// unit 0.65x), so the whole-image backward takes one unit and the phases (k_reduce_blocks_impl)
// only as many as the batch needs.
inline int64_t block_units(int64_t C, int64_t rows, int64_t ub) {
  return (C / rows + ub - 1) / ub + (C % rows > 0 ? 1 : 0);
}
// With a channel scale (or its gradient) the blocks take rows of at most kScaledBlockMaxHW
// pixels: there each vector also permutes the block's scales into its lanes, and the scale's
// gradient splits at the rows' ends. Measured (raw backward with the scale's gradient, 2
// threads, float32, blocks vs rows, paired builds): 0.43-0.48x the time at 8x1024-2048x5x5,
// 0.53x 8x256x3x3, 0.67x 8x512x6x6, 0.69-0.78x 8x2048x7x7 and 512x256x7x7, 0.80x 8x512x10x10,
// 0.96x 8x512x9x9 (a block of 1296), but 0.87-1.24x at 14x14 (blocks of 4 rows of 12
// vectors each, whose rows lose little to their ends); below 128 channels at 7x7 1.02-1.06x
// (tiling the maps costs about what the blocks save).
constexpr int64_t kScaledBlockMaxHW = 100;

// the rows of a block (flat_block_rows) where NCHW images of C channels and HW pixels take
// the blocks; 0 where they keep the rows (a block would exceed kFlatBackwardMaxBlock elements,
// or C is below a block; with a channel scale or its gradient (`scaled`), rows longer than
// kScaledBlockMaxHW and builds without kLaneScales)
inline int64_t backward_block_rows(bool nhwc, bool scaled, int64_t C, int64_t HW) {
  const bool lanes_ok = !scaled || (kLaneScales && HW <= kScaledBlockMaxHW);
  const int64_t rows = (!nhwc && lanes_ok) ? flat_block_rows(HW, kFlatBackwardMaxBlock) : 0;
  return rows * HW <= kFlatBackwardMaxBlock && C >= rows ? rows : 0;
}

#if defined(__AVX512F__)
// reduce_chunk's rows with the channel scales by lanes: `nblk` blocks of `rows` channel rows
// (block j at x + j * B, its scales at s + j * rows), `len` elements of each (B, or the rows
// left after the last whole block); ri: row_index_tile(HW, rows). Each element gets the same
// operations in the same order as in reduce_chunk's rows (x * s[c], then added to the sums and
// counts block after block), so the same values as reduce_chunk on the blocks of x * s.
template <typename T, typename X, bool GC, bool M>
void reduce_blocks_scaled(const X* x, const T* s, const X* g, T gv, const T* mp, const int32_t* ri, int64_t rows,
                          int64_t nblk, int64_t B, int64_t len, T* ap, T* cp, uint8_t* mb, int64_t mbs, int64_t q0) {
  using V = vec_t<T>;
  constexpr int64_t L = lanes<T>();
  const V one = V{} + T(1), zero = V{};
  std::fill(ap, ap + len, T(0));
  std::fill(cp, cp + len, T(0));
  const int64_t nr = len == B ? rows : len / (B / rows);  // the rows of each block swept (their scales)
  // NB blocks from block c per sweep: four (as reduce_chunk's groups), or one where reduce_chunk
  // takes one row per sweep
  auto sweep = [&](auto nb_t, int64_t c) {
    constexpr int NB = decltype(nb_t)::value;
    const X* xb[NB];
    const X* gb[NB];
    BlockScales<T> sb[NB];
    for (int j = 0; j < NB; ++j) {
      sb[j] = BlockScales<T>(s + (c + j) * rows, nr);
      xb[j] = x + (c + j) * B;
      gb[j] = g + (c + j) * B;
    }
    int64_t k = 0;
    for (; k + L <= len; k += L) {
      V v[NB];
      for (int j = 0; j < NB; ++j) v[j] = vld(xb[j] + k) * sb[j].at(ri, k);
      const V a0 = vload(ap + k);
      V a = a0;
      for (int j = 0; j < NB; ++j) a = a + (GC ? V{} + gv : vld(gb[j] + k)) * v[j];
      vstore(ap + k, a);
      if (M) {
        const V m = vload(mp + k);
        V n = vload(cp + k);
        for (int j = 0; j < NB; ++j) {
          const auto e = vcmp<kEq, T>(v[j], m);
          n = n + vsel<T>(e, one, zero);
          if (mb) put_bits<L>(mb + (c + j) * mbs, q0 + k, lane_bits<T>(e));
        }
        vstore(cp + k, n);
      }
    }
    for (; k < len; ++k) {
      for (int j = 0; j < NB; ++j) {
        const T v = T(xb[j][k]) * s[(c + j) * rows + ri[k]];
        ap[k] = ap[k] + (GC ? gv : T(gb[j][k])) * v;
        if (M) {
          cp[k] = cp[k] + (v == mp[k] ? T(1) : T(0));
          if (mb) put_bit(mb + (c + j) * mbs, q0 + k, v == mp[k]);
        }
      }
    }
  };
  int64_t c = 0;
  if (!one_stream_reduce(nblk, B, len, int64_t(sizeof(X))))
    for (; c + 4 <= nblk; c += 4) sweep(std::integral_constant<int, 4>{}, c);
  for (; c < nblk; ++c) sweep(std::integral_constant<int, 1>{}, c);
}
#endif
// bytes of one image's flat max bits (room for get_bits' 4-byte reads); at most the bytes
// of MaxBitsLayout(N, C, HW) per image (C rows of at least ceil(HW / 8) + 8 bytes), so the
// phases' max-bit buffers (phase_max_bits) hold them as they are
inline int64_t flat_bits_image(int64_t C, int64_t HW) { return (C * HW + 7) / 8 + 8; }

// unit u of one image (x, g: the image's; mt: its max map tiled to a block; mb: its bits or
// null; s: its channel scales or null, then ri: row_index_tile(HW, rows)) -> part: the unit's
// sums [B] then counts [B] (B = rows * HW)
template <typename T, typename X, bool GC, bool M>
void reduce_block_unit(const X* x, const T* s, const int32_t* ri, const X* g, T gv, const T* mt, int64_t C,
                       int64_t HW, int64_t rows, int64_t ub, int64_t u, T* part, uint8_t* mb) {
  const int64_t B = rows * HW, nb = C / rows, b0 = std::min(u * ub, nb);
  // the unit's whole blocks, or (the unit after them) the rows left
  const int64_t nblk = b0 < nb ? std::min(ub, nb - b0) : 1, len = b0 < nb ? B : (C - nb * rows) * HW;
  uint8_t* bits = mb ? mb + (b0 < nb ? b0 * B / 8 : 0) : nullptr;
  const int64_t mbs = b0 < nb ? B / 8 : 0, q0 = b0 < nb ? 0 : nb * B;
#if defined(__AVX512F__)
  if (s) {
    reduce_blocks_scaled<T, X, GC, M>(x + b0 * B, s + b0 * rows, GC ? g : g + b0 * B, gv, mt, ri, rows, nblk, B, len,
                                      part, part + B, bits, mbs, q0);
    return;
  }
#else
  (void)s;
  (void)ri;
#endif
  reduce_chunk<T, X, true, GC, M>(x + b0 * B, nullptr, GC ? g : g + b0 * B, gv, mt, nblk, len, len, part, part + B,
                                  bits, mbs, q0);
}

// one image's units (part: block_units of them, 2 * B each) -> ga [HW], cnt [HW] (with M)
template <typename T, bool M>
void fold_block_units(const T* part, int64_t C, int64_t HW, int64_t rows, int64_t ub, T* ga, T* cnt) {
  const int64_t B = rows * HW, nb = C / rows, nu = block_units(C, rows, ub);
  for (int64_t p = 0; p < HW; ++p) {
    T a = part[p], k = part[B + p];
    for (int64_t u = 0; u < nu; ++u) {
      const T* acc = part + u * 2 * B;
      const int64_t nr = u * ub < nb ? rows : C - nb * rows;
      for (int64_t j = u == 0 ? 1 : 0; j < nr; ++j) {
        a += acc[j * HW + p];
        k += acc[B + j * HW + p];
      }
    }
    ga[p] = a;
    if (M) cnt[p] = k;
  }
}

// one image (the fused backward of whole images); s: its channel scales or null, then ri:
// row_index_tile(HW, rows); buf: scratch
template <typename T, typename X, bool GC, bool M>
void reduce_rows_flat(const X* x, const T* s, const int32_t* ri, const X* g, T gv, const T* mx, int64_t C,
                      int64_t HW, int64_t rows, T* dA, T* cnt, uint8_t* mb, std::vector<T>& buf) {
  const int64_t B = rows * HW, ub = C / rows, nu = block_units(C, rows, ub);
  buf.resize((1 + 2 * nu) * B);
  T *mt = buf.data(), *part = mt + B;
  if (M) tile_rows(mx, HW, rows, mt);
  for (int64_t u = 0; u < nu; ++u)
    reduce_block_unit<T, X, GC, M>(x, s, ri, g, gv, M ? mt : nullptr, C, HW, rows, ub, u, part + u * 2 * B, mb);
  fold_block_units<T, M>(part, C, HW, rows, ub, dA, cnt);
}

// one pixel, channels_last: returns sum_c g * x' and the tie count (and with I the last
// channel equal to the max). Four accumulators, then tree reductions across the lanes, as
// pool_pixel (the lane-by-lane scalar sums they replace were three 15-step dependency chains
// per pixel)
template <typename T, typename X, bool G, bool GC, bool M, bool I>
inline void reduce_pixel(const X* x, const T* s, const X* g, T gv, T m, int64_t C, T& ga, T& cnt, T& idx) {
  using V = vec_t<T>;
  constexpr int64_t L = lanes<T>();
  const V one = V{} + T(1), zero = V{}, none = V{} - T(1);
  V a[4] = {}, k[4] = {}, ix[4] = {none, none, none, none};
  const V lane = lane_index<T>();  // channel index of each lane, from c = 0
  auto step = [&](int j, int64_t c) {
    V v = vld(x + c);
    if (s) v = v * vload(s + c);
    if (G) a[j] += (GC ? V{} + gv : vld(g + c)) * v;
    if (M) {
      const auto e = vcmp<kEq, T>(v, V{} + m);
      k[j] += vsel<T>(e, one, zero);
      if (I) ix[j] = vsel<T>(e, lane + T(c), ix[j]);
    }
  };
  int64_t c = 0;
  T sa, sc, si;
#if SAM_AVX2_HALVES
  if constexpr (std::is_same_v<T, float>) {
    reduce_pixel_avx2<X, G, GC, M, I>(x, s, g, gv, m, C, sa, sc, si, c);
  } else
#endif
  {
    for (; c + 4 * L <= C; c += 4 * L) {
      step(0, c);
      step(1, c + L);
      step(2, c + 2 * L);
      step(3, c + 3 * L);
    }
    for (; c + L <= C; c += L) step(0, c);
    sa = G ? hreduce<T, 64>((a[0] + a[1]) + (a[2] + a[3]), false) : T(0);
    sc = M ? hreduce<T, 64>((k[0] + k[1]) + (k[2] + k[3]), false) : T(0);
    si = (M && I) ? hreduce<T, 64>(vmax(vmax(ix[0], ix[1]), vmax(ix[2], ix[3])), true) : T(-1);
  }
  for (; c < C; ++c) {
    const T v = s ? T(x[c]) * s[c] : T(x[c]);
    if (G) sa += (GC ? gv : T(g[c])) * v;
    if (M && v == m) {
      sc += T(1);
      if (I) si = T(c);
    }
  }
  ga = sa;
  cnt = sc;
  idx = si;
}

template <typename T, typename X, bool G, bool GC, bool M>
void k_reduce_impl(const X* x, const T* s, const X* g, const T* mx, int64_t mbs, int64_t N, int64_t C, int64_t HW,
                   bool nhwc, T* ga, T* cnt, T* ix, uint8_t* bits) {
  const T gv = (G && GC) ? T(g[0]) : T(0);
  if (!nhwc) {
    const MaxBitsLayout lay(N, C, HW);
    const int64_t chunk = lay.chunk, nchunks = lay.nchunks;
    const int64_t prefetch = row_prefetch_bytes<X>(N * C * HW);
    at::parallel_for(0, N * nchunks, 1, [&](int64_t b, int64_t e) {
      std::vector<T> acc(chunk), cn(chunk);
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = t / nchunks, p0 = (t % nchunks) * chunk;
        const int64_t len = std::min(chunk, HW - p0);
        reduce_chunk<T, X, G, GC, M>(x + n * C * HW + p0, s ? s + n * C : nullptr,
                                  (G && !GC) ? g + n * C * HW + p0 : g, gv, M ? mx + n * mbs + p0 : nullptr, C, HW,
                                  len, acc.data(), cn.data(), bits ? bits + lay.row(n, t % nchunks, 0) : nullptr,
                                  lay.stride, 0, prefetch);
        if (ga) std::copy(acc.data(), acc.data() + len, ga + n * HW + p0);
        if (cnt) std::copy(cn.data(), cn.data() + len, cnt + n * HW + p0);
      }
    });
  } else {
    at::parallel_for(0, N * HW, 64, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        const int64_t n = p / HW;
        T a, k, i;
        if (M && ix) {
          reduce_pixel<T, X, G, GC, M, true>(x + p * C, s ? s + n * C : nullptr, (G && !GC) ? g + p * C : g, gv,
                                          mx[n * mbs + (p - n * HW)], C, a, k, i);
          ix[p] = i;
        } else {
          reduce_pixel<T, X, G, GC, M, false>(x + p * C, s ? s + n * C : nullptr, (G && !GC) ? g + p * C : g, gv,
                                           M ? mx[n * mbs + (p - n * HW)] : T(0), C, a, k, i);
        }
        if (ga) ga[p] = a;
        if (cnt) cnt[p] = k;
      }
    });
  }
}

// the same over N images (the phases of the training-BatchNorm backward): the units of all
// images in parallel, then each image's fold; bits (may be null): image n's flat bits from
// byte n * flat_bits_image(C, HW). Units: about kPhaseUnits in all (one per image from that
// batch on), a number that depends on the batch and the shape only, so that the sums do not
// depend on the thread count; but units of at least kPhaseUnitMinBlocks blocks (or all of an
// image's): a unit's zeroed sums and its share of the fold cost as much as its blocks save
// where it has few. Measured (raw backward of one image, 2 threads, blocks / rows, with a
// channel scale and without): 1x256x7x7 (16 blocks) in 8 units of 2 blocks 1.29 / 1.21, in
// one unit 0.86 / 0.75; 1x128x5x5 1.25 / 1.41 against 0.81 / 0.85; 1x512x7x7 1.17 / 1.04
// against 0.92 / 0.76; units of 8 blocks in between (fortieth session).
constexpr int64_t kPhaseUnits = 8;
constexpr int64_t kPhaseUnitMinBlocks = 16;
inline int64_t phase_unit_blocks(int64_t N, int64_t C, int64_t rows) {
  const int64_t per_image = (kPhaseUnits + N - 1) / N, nb = C / rows;
  return std::max<int64_t>({int64_t(1), std::min(nb, kPhaseUnitMinBlocks), (nb + per_image - 1) / per_image});
}

template <typename T, typename X, bool GC, bool M>
void k_reduce_blocks_impl(const X* x, const T* s, const X* g, const T* mx, int64_t mbs, int64_t N, int64_t C,
                          int64_t HW, int64_t rows, T* ga, T* cnt, uint8_t* bits) {
  const T gv = GC ? T(g[0]) : T(0);
  const int64_t B = rows * HW, CHW = C * HW, ub = phase_unit_blocks(N, C, rows), nu = block_units(C, rows, ub);
  const int64_t fb = flat_bits_image(C, HW);
  // every unit's sums and counts (each unit sets its own: uninitialised here, where a zero fill
  // on one thread cost more than a tenth of the backward at 512x256x7x7)
  const std::unique_ptr<T[]> part(new T[N * nu * 2 * B]);
  std::vector<int32_t> ri(s ? B : 0);
  if (s) row_index_tile(HW, rows, ri.data());
  at::parallel_for(0, N * nu, 1, [&](int64_t b, int64_t e) {
    std::vector<T> mt(M ? B : 0);
    int64_t tiled = -1;
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / nu;
      if (M && tiled != n) {
        tile_rows(mx + n * mbs, HW, rows, mt.data());
        tiled = n;
      }
      reduce_block_unit<T, X, GC, M>(x + n * CHW, s ? s + n * C : nullptr, ri.data(), GC ? g : g + n * CHW, gv,
                                     M ? mt.data() : nullptr, C, HW, rows, ub, t % nu, part.get() + t * 2 * B,
                                     bits ? bits + n * fb : nullptr);
    }
  });
  at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n)
      fold_block_units<T, M>(part.get() + n * nu * 2 * B, C, HW, rows, ub, ga + n * HW, M ? cnt + n * HW : nullptr);
  });
}

// bits (NCHW, with mx and cnt; may be null): the max bits of every channel row, laid out as
// MaxBitsLayout(N, C, HW) (for k_gradx; channels_last ignores them). block_rows > 0 (the
// backward_block_rows of NCHW images; with g): in blocks of rows
// (k_reduce_blocks_impl), the bits then flat per image; k_gradx must get the same block_rows.
template <typename T, typename X>
void k_reduce(const X* x, const T* s, const X* g, bool gc, const T* mx, int64_t mbs, int64_t N, int64_t C,
              int64_t HW, bool nhwc, T* ga, T* cnt, T* ix = nullptr, uint8_t* bits = nullptr,
              int64_t block_rows = 0) {
  const bool G = g != nullptr && ga != nullptr, M = mx != nullptr && cnt != nullptr;
  if (!G && !M) return;
  if (block_rows > 0 && G) {
#define SA_REDUCE_BLOCKS(gc_, m_) \
  k_reduce_blocks_impl<T, X, gc_, m_>(x, s, g, mx, mbs, N, C, HW, block_rows, ga, cnt, bits)
    if (gc) {
      if (M) SA_REDUCE_BLOCKS(true, true); else SA_REDUCE_BLOCKS(true, false);
    } else {
      if (M) SA_REDUCE_BLOCKS(false, true); else SA_REDUCE_BLOCKS(false, false);
    }
#undef SA_REDUCE_BLOCKS
    return;
  }
#define SA_REDUCE(g_, gc_, m_) k_reduce_impl<T, X, g_, gc_, m_>(x, s, g, mx, mbs, N, C, HW, nhwc, ga, cnt, ix, bits)
  if (G && gc) {
    if (M) SA_REDUCE(true, true, true); else SA_REDUCE(true, true, false);
  } else if (G) {
    if (M) SA_REDUCE(true, false, true); else SA_REDUCE(true, false, false);
  } else {
    SA_REDUCE(false, false, true);
  }
#undef SA_REDUCE
}


}  // namespace
