// Channel pooling (max / mean over channels of x * s).
//
// Part of sam_cpu.cpp: the parts are included in order into one translation unit, each in the
// unit's anonymous namespace, and each uses the ones before it (see sam_cpu.cpp for the overview).
#pragma once

namespace {

// ---------------------------------------------------------------- pooling
// NCHW pooling: eight channels per sweep where the accumulators exceed this (see pool_chunk;
// adjustable for tests through set_pool_wide_bytes, a negative value restores the default)
constexpr int64_t kPoolWideDefault = 16384;
int64_t kPoolWideBytes = kPoolWideDefault;

// f(std::integral_constant<int, J>{}) for J = 0 .. N - 1: array indices that are constants
// from the start. GCC replaces a local array of vectors by registers (and spill slots) only
// where every index is a constant before its scalar-replacement pass, which runs before the
// loop unroller; a `for (int j ...)` over the array keeps it in memory, zero-initialised per
// call by `rep stos` (41 % of reduce_pixel_avx2's time at C = 64, perf). Not applied to
// pool_pixel_avx2, whose arrays start from loads (no memset): written so, it was 1.02-1.15x
// slower (channels_last forward, C = 64-512, paired).
template <typename F, int... J>
inline void each_index(F&& f, std::integer_sequence<int, J...>) {
  (f(std::integral_constant<int, J>{}), ...);
}
template <int N, typename F>
inline void each_index(F&& f) {
  each_index(f, std::make_integer_sequence<int, N>{});
}

// NCHW pooling of short runs in registers (AVX-512 builds): `len` of 1 to kPoolShortVectors
// vectors, each vector's max and sum held in registers over all C channels, the last vector
// ending at len (overlapping the one before it where len is not a multiple of the lanes: the
// overlapped lanes get the same values twice). pool_chunk's sweeps keep the accumulators in
// memory, and there the last vector's load of them overlaps the store of the vector before it
// for every four channels, a load the store-to-load forwarding cannot serve (perf of the
// pooling of 8x2048x7x7, rows of 49 pixels: about half of its samples after that load).
// The same channel groups and steps as pool_chunk, so the same bits. Runs of more vectors
// go in pieces of kPoolShortVectors, up to kPoolShortMax elements; longer runs take the
// sweeps (their one overlapped vector is a small part of them; in pieces, measured paired,
// 2 threads: the pooling 1.03x the time at 26x26, 0.92x at 28x28 and 20x20, 1.39x at 52x52,
// 1.85x at 104x104, the forward 1.0-1.17x). set_pool_short: off (tests).
constexpr int kPoolShortVectors = 8;
constexpr int64_t kPoolShortMax = 256;
bool kPoolShort = true;
// a run the register paths take (pooling and backward pass A), vectors of `lanes` elements
inline bool short_run(int64_t len, int64_t lanes_) { return kPoolShort && len >= lanes_ && len <= kPoolShortMax; }

template <int NV, typename T, typename X>
void pool_short(const X* x, const T* s, int64_t C, int64_t HW, int64_t len, T* mp, T* sp, int64_t prefetch) {
  using V = vec_t<T>;
  constexpr int64_t L = lanes<T>();
  auto off = [len](auto j) { return std::min<int64_t>(decltype(j)::value * L, len - L); };
  V m[NV], a[NV];
  {
    const T sc = s ? s[0] : T(1);
    each_index<NV>([&](auto j) {
      m[j] = vld(x + off(j)) * sc;
      a[j] = m[j];
    });
  }
  const int64_t ahead = prefetch_rows_ahead(prefetch, 4, len, int64_t(sizeof(X)));
  int64_t c = 1;
  for (; c + 4 <= C; c += 4) {
    const X* r = x + c * HW;
    const T s0 = s ? s[c] : T(1), s1 = s ? s[c + 1] : T(1), s2 = s ? s[c + 2] : T(1), s3 = s ? s[c + 3] : T(1);
    if (ahead > 0 && has_group_ahead(c, 4, ahead, C))
      each_index<NV>([&](auto j) { prefetch_group<4>(x, c, HW, ahead, off(j)); });
    each_index<NV>([&](auto j) {
      const int64_t k = off(j);
      const V v0 = vld(r + k) * s0, v1 = vld(r + HW + k) * s1, v2 = vld(r + 2 * HW + k) * s2,
              v3 = vld(r + 3 * HW + k) * s3;
      m[j] = vmax(vmax(m[j], v0), vmax(vmax(v1, v2), v3));  // pool_chunk's step4
      a[j] = a[j] + v0 + v1 + v2 + v3;
    });
  }
  for (; c < C; ++c) {
    const X* r = x + c * HW;
    const T sc = s ? s[c] : T(1);
    each_index<NV>([&](auto j) {
      const V v = vld(r + off(j)) * sc;
      m[j] = vmax(m[j], v);
      a[j] = a[j] + v;
    });
  }
  each_index<NV>([&](auto j) {
    vstore(mp + off(j), m[j]);
    vstore(sp + off(j), a[j]);
  });
}

#if SAM_AVX2_HALVES
// pool_short for float in AVX2 builds: 8-lane __m256 vectors (a 64-byte vec_t has no register
// of its own there), at most kPoolShortVectorsAvx2 per piece (sixteen ymm registers: the
// accumulators, four rows and four scales), the steps of pool_chunk's AVX2 path (step8).
constexpr int kPoolShortVectorsAvx2 = 4;

template <int NV, typename X>
void pool_short_avx2(const X* x, const float* s, int64_t C, int64_t HW, int64_t len, float* mp, float* sp,
                     int64_t prefetch) {
  auto off = [len](auto j) { return std::min<int64_t>(decltype(j)::value * 8, len - 8); };
  __m256 m[NV], a[NV];
  {
    const __m256 sc = _mm256_set1_ps(s ? s[0] : 1.f);
    each_index<NV>([&](auto j) {
      m[j] = _mm256_mul_ps(ld8(x + off(j)), sc);
      a[j] = m[j];
    });
  }
  const int64_t ahead = prefetch_rows_ahead(prefetch, 4, len, int64_t(sizeof(X)));
  int64_t c = 1;
  for (; c + 4 <= C; c += 4) {
    const X* r = x + c * HW;
    const __m256 s0 = _mm256_set1_ps(s ? s[c] : 1.f), s1 = _mm256_set1_ps(s ? s[c + 1] : 1.f),
                 s2 = _mm256_set1_ps(s ? s[c + 2] : 1.f), s3 = _mm256_set1_ps(s ? s[c + 3] : 1.f);
    if (ahead > 0 && has_group_ahead(c, 4, ahead, C))
      each_index<NV>([&](auto j) { prefetch_group<4>(x, c, HW, ahead, off(j)); });
    each_index<NV>([&](auto j) {
      const int64_t k = off(j);
      const __m256 v0 = _mm256_mul_ps(ld8(r + k), s0), v1 = _mm256_mul_ps(ld8(r + HW + k), s1),
                   v2 = _mm256_mul_ps(ld8(r + 2 * HW + k), s2), v3 = _mm256_mul_ps(ld8(r + 3 * HW + k), s3);
      m[j] = vmax8(vmax8(m[j], v0), vmax8(vmax8(v1, v2), v3));  // pool_chunk's step8
      a[j] = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a[j], v0), v1), v2), v3);
    });
  }
  for (; c < C; ++c) {
    const X* r = x + c * HW;
    const __m256 sc = _mm256_set1_ps(s ? s[c] : 1.f);
    each_index<NV>([&](auto j) {
      const __m256 v = _mm256_mul_ps(ld8(r + off(j)), sc);
      m[j] = vmax8(m[j], v);
      a[j] = _mm256_add_ps(a[j], v);
    });
  }
  each_index<NV>([&](auto j) {
    _mm256_storeu_ps(mp + off(j), m[j]);
    _mm256_storeu_ps(sp + off(j), a[j]);
  });
}
#endif

// The run in pieces of at most `vectors` vectors of `lanes` elements, each through
// piece(std::integral_constant<int, NV>, offset, length) with NV its vectors (the last
// overlapping where the piece is not whole vectors); a remainder under a vector joins the
// piece before it as its overlapping last vector.
template <int Vectors, typename F>
void short_pieces(int64_t len, int64_t lanes_, F&& piece) {
  for (int64_t p = 0; p < len;) {
    int64_t n = std::min<int64_t>(len - p, Vectors * lanes_);
    if (len - p - n > 0 && len - p - n < lanes_) n -= lanes_;
    const int64_t nv = (n + lanes_ - 1) / lanes_;
    each_index<Vectors>([&](auto j) {
      if (decltype(j)::value + 1 == nv) piece(std::integral_constant<int, decltype(j)::value + 1>{}, p, n);
    });
    p += n;
  }
}

// pool_short (pool_short_avx2 for float in AVX2 builds) over the run; false where it does
// not apply (off, the baseline build or double in AVX2 builds, a run shorter than a vector or
// longer than kPoolShortMax)
template <typename T, typename X>
bool pool_short_run(const X* x, const T* s, int64_t C, int64_t HW, int64_t len, T* mp, T* sp, int64_t prefetch) {
#if defined(__AVX512F__)
  constexpr int64_t L = lanes<T>();
  if (!short_run(len, L)) return false;
  short_pieces<kPoolShortVectors>(len, L, [&](auto nv, int64_t p, int64_t n) {
    pool_short<decltype(nv)::value, T, X>(x + p, s, C, HW, n, mp + p, sp + p, prefetch);
  });
  return true;
#elif SAM_AVX2_HALVES
  if constexpr (std::is_same_v<T, float>) {
    if (!short_run(len, 8)) return false;
    short_pieces<kPoolShortVectorsAvx2>(len, 8, [&](auto nv, int64_t p, int64_t n) {
      pool_short_avx2<decltype(nv)::value, X>(x + p, s, C, HW, n, mp + p, sp + p, prefetch);
    });
    return true;
  }
  (void)x, (void)s, (void)C, (void)HW, (void)len, (void)mp, (void)sp, (void)prefetch;
  return false;
#else
  (void)x, (void)s, (void)C, (void)HW, (void)len, (void)mp, (void)sp, (void)prefetch;
  return false;
#endif
}

// The end of pool_chunk: sp (the sums) divided into means, mp (the maxima) NaN where a channel
// is. vmax drops NaN; a NaN among the channels makes the sum NaN, and only then they are
// scanned. Whole vectors first (the same IEEE division per lane; as a scalar loop, with the
// NaN test's branch and call, this was the largest item after the conv in perf of a
// one-channel forward), then the rest one by one.
template <typename T, typename X>
void pool_finish(const X* x, const T* s, int64_t C, int64_t HW, int64_t len, T* mp, T* sp) {
  using V = vec_t<T>;
  constexpr int64_t L = lanes<T>();
  auto finish = [&](int64_t i) {
    if (sp[i] != sp[i] && any_nan(x + i, s, C, HW)) mp[i] = std::numeric_limits<T>::quiet_NaN();
    sp[i] = sp[i] / T(C);
  };
  const V vc = V{} + T(C);
  int64_t i = 0;
  for (; i + L <= len; i += L) {
    const V a = vload(sp + i);
    if (lane_bits<T>(vcmp<kNe, T>(a, a)) != 0) {
      for (int64_t k = i; k < i + L; ++k) finish(k);
    } else {
      vstore(sp + i, a / vc);
    }
  }
  for (; i < len; ++i) finish(i);
}

constexpr int64_t kGpTileDefault = 65536;
int64_t kGpTileBytes = kGpTileDefault;  // channels_last global pooling: bytes of x per tile
// One image, NCHW: max and sum over the C channels (channel stride HW, x' = x * s) of
// `len` consecutive pixels starting at x. Four (or eight) channels per sweep over the
// accumulators; the sum keeps the sequential channel order (((s + v0) + v1) + v2) + v3.
// mp / sp: max and mean out (the mean divides like torch: sum / C). prefetch: bytes of work
// to prefetch ahead (row_prefetch_bytes; 0: none).
template <typename T, typename X>
void pool_chunk(const X* x, const T* s, int64_t C, int64_t HW, int64_t len, T* mp, T* sp, int64_t prefetch = 0) {
  using V = vec_t<T>;
  [[maybe_unused]] constexpr int64_t L = lanes<T>();
  if (pool_short_run<T, X>(x, s, C, HW, len, mp, sp, prefetch)) {  // short runs: every channel in registers
    pool_finish<T, X>(x, s, C, HW, len, mp, sp);
    return;
  }
  {
    const T sc = s ? s[0] : T(1);
    for (int64_t i = 0; i < len; ++i) {
      const T v = T(x[i]) * sc;
      mp[i] = v;
      sp[i] = v;
    }
  }
  // one four-channel step on a vector or a scalar: max and sum updated in channel order
  auto step4 = [](auto& m, auto& a, auto v0, auto v1, auto v2, auto v3) {
    m = vmax(vmax(m, v0), vmax(vmax(v1, v2), v3));
    a = a + v0 + v1 + v2 + v3;
  };
  // the accumulators at vector k after `steps` (see vector_sweeps for tail / keep)
  auto update = [&](int64_t k, auto tail_t, auto keep, auto steps) {
    const V m0 = vload(mp + k), a0 = vload(sp + k);
    V m = m0, a = a0;
    steps(m, a);
    if constexpr (decltype(tail_t)::value) {
      m = vsel<T>(keep, m, m0);
      a = vsel<T>(keep, a, a0);
    }
    vstore(mp + k, m);
    vstore(sp + k, a);
  };
  int64_t c = 1;
#if SAM_AVX2_HALVES
  if constexpr (std::is_same_v<T, float>) {
    if (len >= 8) {
      // AVX2 builds (see SAM_AVX2_HALVES): the same steps per element in 256-bit vectors,
      // the tail as one vector ending at len whose overlapped lanes keep their values
      const bool wide = len * int64_t(2 * sizeof(T)) > kPoolWideBytes;
      const int64_t full = len / 8 * 8;
      const __m256 lane = _mm256_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f);
      const __m256 keep = _mm256_cmp_ps(lane, _mm256_set1_ps(float(full - (len - 8))), _CMP_GE_OQ);
      auto step8 = [](__m256& m, __m256& a, __m256 v0, __m256 v1, __m256 v2, __m256 v3) {
        m = vmax8(vmax8(m, v0), vmax8(vmax8(v1, v2), v3));
        a = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a, v0), v1), v2), v3);
      };
      auto run = [&](int64_t k, bool tail, auto steps) {
        const __m256 m0 = _mm256_loadu_ps(mp + k), a0 = _mm256_loadu_ps(sp + k);
        __m256 m = m0, a = a0;
        steps(k, m, a);
        _mm256_storeu_ps(mp + k, tail ? _mm256_blendv_ps(m0, m, keep) : m);
        _mm256_storeu_ps(sp + k, tail ? _mm256_blendv_ps(a0, a, keep) : a);
      };
      auto rows = [&](auto nc_t, auto steps) {  // every vector of the chunk, then the tail
        constexpr int nc = decltype(nc_t)::value;
        const int64_t ahead = prefetch_rows_ahead(prefetch, nc, len, int64_t(sizeof(X)));
        for (; c + nc <= C; c += nc) {
          with_prefetch(has_group_ahead(c, nc, ahead, C), [&](auto pf_t) {
            for (int64_t k = 0; k < full; k += 8) {
              if constexpr (decltype(pf_t)::value) prefetch_group<nc>(x, c, HW, ahead, k);
              run(k, false, steps);
            }
          });
          if (full < len) run(len - 8, true, steps);
        }
      };
      if (wide)
        rows(std::integral_constant<int, 8>{}, [&](int64_t k, __m256& m, __m256& a) {
          const X* r = x + c * HW + k;
          __m256 v[8];
          for (int j = 0; j < 8; ++j) v[j] = _mm256_mul_ps(ld8(r + j * HW), _mm256_set1_ps(s ? s[c + j] : 1.f));
          step8(m, a, v[0], v[1], v[2], v[3]);
          step8(m, a, v[4], v[5], v[6], v[7]);
        });
      rows(std::integral_constant<int, 4>{}, [&](int64_t k, __m256& m, __m256& a) {
        const X* r = x + c * HW + k;
        auto sv = [&](int j) { return _mm256_set1_ps(s ? s[c + j] : 1.f); };
        step8(m, a, _mm256_mul_ps(ld8(r), sv(0)), _mm256_mul_ps(ld8(r + HW), sv(1)),
              _mm256_mul_ps(ld8(r + 2 * HW), sv(2)), _mm256_mul_ps(ld8(r + 3 * HW), sv(3)));
      });
    }
  }
#endif
  if (len * int64_t(2 * sizeof(T)) > kPoolWideBytes) {
    // Eight channels per sweep where the two accumulator rows exceed half of a 32 KiB L1:
    // they then travel to L2 and back every sweep, and eight channels halve that. Each
    // half of the sweep is the four-channel step below, so the results are the same bits.
    const int64_t ahead = prefetch_rows_ahead(prefetch, 8, len, int64_t(sizeof(X)));
    for (; c + 8 <= C; c += 8) {
      const X* r = x + c * HW;
      T sc[8];
      for (int j = 0; j < 8; ++j) sc[j] = s ? s[c + j] : T(1);
      auto sweep = [&](auto pf_t) {
        return vector_sweeps<T>(len, [&](int64_t k, auto tail_t, auto keep) {
          if constexpr (decltype(pf_t)::value) prefetch_group<8>(x, c, HW, ahead, k);
          update(k, tail_t, keep, [&](V& m, V& a) {
            V v[8];
            for (int j = 0; j < 8; ++j) v[j] = vld(r + j * HW + k) * sc[j];
            step4(m, a, v[0], v[1], v[2], v[3]);
            step4(m, a, v[4], v[5], v[6], v[7]);
          });
        });
      };
      int64_t i = with_prefetch(has_group_ahead(c, 8, ahead, C), sweep);
      for (; i < len; ++i) {
        T v[8];
        for (int j = 0; j < 8; ++j) v[j] = T(r[j * HW + i]) * sc[j];
        step4(mp[i], sp[i], v[0], v[1], v[2], v[3]);
        step4(mp[i], sp[i], v[4], v[5], v[6], v[7]);
      }
    }
  }
  const int64_t ahead4 = prefetch_rows_ahead(prefetch, 4, len, int64_t(sizeof(X)));
  for (; c + 4 <= C; c += 4) {
    const X* r0 = x + c * HW;
    const X* r1 = r0 + HW;
    const X* r2 = r1 + HW;
    const X* r3 = r2 + HW;
    const T s0 = s ? s[c] : T(1), s1 = s ? s[c + 1] : T(1), s2 = s ? s[c + 2] : T(1), s3 = s ? s[c + 3] : T(1);
    auto sweep = [&](auto pf_t) {
      return vector_sweeps<T>(len, [&](int64_t k, auto tail_t, auto keep) {
        if constexpr (decltype(pf_t)::value) prefetch_group<4>(x, c, HW, ahead4, k);
        update(k, tail_t, keep, [&](V& m, V& a) {
          step4(m, a, vld(r0 + k) * s0, vld(r1 + k) * s1, vld(r2 + k) * s2, vld(r3 + k) * s3);
        });
      });
    };
    int64_t i = with_prefetch(has_group_ahead(c, 4, ahead4, C), sweep);
    for (; i < len; ++i) step4(mp[i], sp[i], T(r0[i]) * s0, T(r1[i]) * s1, T(r2[i]) * s2, T(r3[i]) * s3);
  }
  for (; c < C; ++c) {
    const X* row = x + c * HW;
    const T sc = s ? s[c] : T(1);
    for (int64_t i = 0; i < len; ++i) {
      const T v = T(row[i]) * sc;
      mp[i] = vmax(mp[i], v);
      sp[i] += v;
    }
  }
  pool_finish<T, X>(x, s, C, HW, len, mp, sp);
}

template <typename T, int B>
struct HalfOf {
  typedef T type __attribute__((vector_size(B)));
};
// tree reductions of a 64-byte vector (halves, then quarters, ...)
template <typename T, int B, typename V>
inline T hreduce(V v, bool is_max) {
  if constexpr (B == int(sizeof(T))) {
    return v[0];
  } else {
    typedef typename HalfOf<T, B / 2>::type H;
    H lo, hi;
    std::memcpy(&lo, &v, B / 2);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + B / 2, B / 2);
    return hreduce<T, B / 2>(is_max ? vmax(lo, hi) : lo + hi, is_max);
  }
}

#if SAM_AVX2_HALVES
// AVX2 builds: the per-pixel channel reductions of channels_last (pool_pixel, reduce_pixel)
// in 256-bit intrinsics. There a 64-byte vec_t has no register of its own: GCC keeps such
// variables on the stack and moves them through xmm and general registers around every
// compare, select and half taken for a lane reduction (perf: a third to a half of the
// channels_last forward and backward on those moves). Here each 64-byte accumulator of the
// generic code is two __m256 (its lanes 0-7 and 8-15), updated with the same operations in
// the same order, and the lane reductions follow hreduce's tree, so the results are the
// generic code's bits.
// pool_pixel's vector part for float: sets m, sum and c (the first channel left to the
// scalar loop)
template <typename X>
inline void pool_pixel_avx2(const X* x, const float* s, int64_t C, float& m, float& sum, int64_t& c) {
  auto ld = [&](int64_t k) { return s ? _mm256_mul_ps(ld8(x + k), _mm256_loadu_ps(s + k)) : ld8(x + k); };
  if (C >= 64) {  // four 64-byte accumulator pairs: halves 2j, 2j + 1 of vector j
    __m256 M[8], A[8];
    for (int j = 0; j < 8; ++j) M[j] = A[j] = ld(8 * j);
    for (c = 64; c + 64 <= C; c += 64) {
      for (int j = 0; j < 8; ++j) {
        const __m256 v = ld(c + 8 * j);
        M[j] = vmax8(M[j], v);
        A[j] = _mm256_add_ps(A[j], v);
      }
    }
    for (; c + 16 <= C; c += 16) {
      for (int j = 0; j < 2; ++j) {
        const __m256 v = ld(c + 8 * j);
        M[j] = vmax8(M[j], v);
        A[j] = _mm256_add_ps(A[j], v);
      }
    }
    m = hreduce8(vmax8(vmax8(M[0], M[2]), vmax8(M[4], M[6])), vmax8(vmax8(M[1], M[3]), vmax8(M[5], M[7])), true);
    sum = hreduce8(_mm256_add_ps(_mm256_add_ps(A[0], A[2]), _mm256_add_ps(A[4], A[6])),
                   _mm256_add_ps(_mm256_add_ps(A[1], A[3]), _mm256_add_ps(A[5], A[7])), false);
  } else {  // C >= 32: two
    __m256 M[4], A[4];
    for (int j = 0; j < 4; ++j) M[j] = A[j] = ld(8 * j);
    for (c = 32; c + 32 <= C; c += 32) {
      for (int j = 0; j < 4; ++j) {
        const __m256 v = ld(c + 8 * j);
        M[j] = vmax8(M[j], v);
        A[j] = _mm256_add_ps(A[j], v);
      }
    }
    m = hreduce8(vmax8(M[0], M[2]), vmax8(M[1], M[3]), true);
    sum = hreduce8(_mm256_add_ps(A[0], A[2]), _mm256_add_ps(A[1], A[3]), false);
  }
}

// reduce_pixel's vector part for float (see there): sets sa, sc, si and c
template <typename X, bool G, bool GC, bool M, bool I>
inline void reduce_pixel_avx2(const X* x, const float* s, const X* g, float gv, float m, int64_t C, float& sa,
                              float& sc, float& si, int64_t& c) {
  const __m256 one = _mm256_set1_ps(1.f), vm = _mm256_set1_ps(m), vg = _mm256_set1_ps(gv);
  const __m256 lane = _mm256_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f);
  __m256 a[8], k[8], ix[8];
  each_index<8>([&](auto j) {
    a[j] = k[j] = _mm256_setzero_ps();
    ix[j] = _mm256_set1_ps(-1.f);
  });
  auto step = [&](auto j, int64_t c0) {  // 8 channels from c0 into half j (a constant)
    __m256 v = ld8(x + c0);
    if (s) v = _mm256_mul_ps(v, _mm256_loadu_ps(s + c0));
    if constexpr (G) a[j] = _mm256_add_ps(a[j], _mm256_mul_ps(GC ? vg : ld8(g + c0), v));
    if constexpr (M) {
      const __m256 e = _mm256_cmp_ps(v, vm, _CMP_EQ_OQ);
      k[j] = _mm256_add_ps(k[j], _mm256_and_ps(e, one));
      // generic: lane + c over 16 lanes; per half the same integers (exact in float)
      if constexpr (I) ix[j] = _mm256_blendv_ps(ix[j], _mm256_add_ps(lane, _mm256_set1_ps(float(c0))), e);
    }
  };
  c = 0;
  for (; c + 64 <= C; c += 64)
    each_index<8>([&](auto j) { step(j, c + 8 * j); });
  for (; c + 16 <= C; c += 16) {
    step(std::integral_constant<int, 0>{}, c);
    step(std::integral_constant<int, 1>{}, c + 8);
  }
  auto tree = [](const __m256 (&v)[8], auto h, bool is_max) {
    return is_max ? vmax8(vmax8(v[h], v[2 + h]), vmax8(v[4 + h], v[6 + h]))
                  : _mm256_add_ps(_mm256_add_ps(v[h], v[2 + h]), _mm256_add_ps(v[4 + h], v[6 + h]));
  };
  const std::integral_constant<int, 0> h0;
  const std::integral_constant<int, 1> h1;
  sa = G ? hreduce8(tree(a, h0, false), tree(a, h1, false), false) : 0.f;
  sc = M ? hreduce8(tree(k, h0, false), tree(k, h1, false), false) : 0.f;
  si = (M && I) ? hreduce8(tree(ix, h0, true), tree(ix, h1, true), true) : -1.f;
}
#endif

// One pixel, channels_last: max and mean of x' over its C contiguous channels. Four
// accumulator pairs, then tree reductions across the lanes (the sum order differs from the
// sequential one by rounding only; the lane-by-lane scalar reduction it replaces was a
// 15-step dependency chain per pixel: pooling 0.83x the time at 8x512x26x26, paired).
template <typename T, typename X>
inline void pool_pixel(const X* x, const T* s, int64_t C, T& mx, T& mean) {
  using V = vec_t<T>;
  constexpr int64_t L = lanes<T>();
  T m, sum;
  int64_t c = 0;
#if SAM_AVX2_HALVES
  if constexpr (std::is_same_v<T, float>) {
    if (C >= 2 * L) pool_pixel_avx2<X>(x, s, C, m, sum, c);
    else {
      m = s ? T(x[0]) * s[0] : T(x[0]);
      sum = m;
      c = 1;
    }
  } else
#endif
  if (C >= 4 * L) {
    auto ld = [&](int64_t k) { return s ? vld(x + k) * vload(s + k) : vld(x + k); };
    V m0 = ld(0), m1 = ld(L), m2 = ld(2 * L), m3 = ld(3 * L);
    V a0 = m0, a1 = m1, a2 = m2, a3 = m3;
    for (c = 4 * L; c + 4 * L <= C; c += 4 * L) {
      const V v0 = ld(c), v1 = ld(c + L), v2 = ld(c + 2 * L), v3 = ld(c + 3 * L);
      m0 = vmax(m0, v0);
      m1 = vmax(m1, v1);
      m2 = vmax(m2, v2);
      m3 = vmax(m3, v3);
      a0 += v0;
      a1 += v1;
      a2 += v2;
      a3 += v3;
    }
    for (; c + L <= C; c += L) {
      const V v0 = ld(c);
      m0 = vmax(m0, v0);
      a0 += v0;
    }
    m = hreduce<T, 64>(vmax(vmax(m0, m1), vmax(m2, m3)), true);
    sum = hreduce<T, 64>((a0 + a1) + (a2 + a3), false);
  } else if (C >= 2 * L) {
    V m0 = s ? vld(x) * vload(s) : vld(x);
    V m1 = s ? vld(x + L) * vload(s + L) : vld(x + L);
    V a0 = m0, a1 = m1;
    for (c = 2 * L; c + 2 * L <= C; c += 2 * L) {
      const V v0 = s ? vld(x + c) * vload(s + c) : vld(x + c);
      const V v1 = s ? vld(x + c + L) * vload(s + c + L) : vld(x + c + L);
      m0 = vmax(m0, v0);
      m1 = vmax(m1, v1);
      a0 += v0;
      a1 += v1;
    }
    m = hreduce<T, 64>(vmax(m0, m1), true);
    sum = hreduce<T, 64>(a0 + a1, false);
  } else {
    m = s ? T(x[0]) * s[0] : T(x[0]);
    sum = m;
    c = 1;
  }
  for (; c < C; ++c) {
    const T v = s ? T(x[c]) * s[c] : T(x[c]);
    m = vmax(m, v);
    sum += v;
  }
  if (sum != sum && any_nan(x, s, C, 1)) m = std::numeric_limits<T>::quiet_NaN();
  mx = m;
  mean = sum / T(C);
}

// pool_pixel over len consecutive channels_last pixels: mx[k] / mean[k] (either may be null).
// A function of its own, with everything it calls inlined (flatten): left to GCC, the AVX2
// part stayed out of line in the OpenMP bodies and the per-image passes, where its
// accumulator arrays lived on the stack, written in 16-byte halves and read back as 32-byte
// vectors (a failed store forward per accumulator per pixel). The channel pooling of
// 8x64x56x56 channels_last took twice as long on 2 threads (out of line) as on 1 (inlined
// in the serial call). Paired against the out-of-line calls: channel pooling 0.32-0.42x the
// time at 8x64x56x56 / 8x128x28x28, 0.59-0.85x at 8x256x14x14 to 8x256x52x52. (Inlined into
// the per-image forward itself, by always_inline, the forward became 1.17-1.24x slower at
// 7x7 to 28x28: hence a separate function, not inlined there.)
template <typename T, typename X>
__attribute__((noinline, flatten)) void pool_pixels(const X* x, const T* s, int64_t C, int64_t len, T* mx,
                                                    T* mean) {
  for (int64_t k = 0; k < len; ++k) {
    T m, a;
    pool_pixel<T, X>(x + k * C, s, C, m, a);
    if (mx) mx[k] = m;
    if (mean) mean[k] = a;
  }
}

// mx / mean: outputs with batch stride `obs` (HW each image); either may be null.
template <typename T, typename X>
void k_pool(const X* x, const T* s, int64_t N, int64_t C, int64_t HW, bool nhwc,
            T* mx, T* mean, int64_t obs) {
  if (!nhwc) {
    const int64_t chunk = pixel_chunk(N, HW);
    const int64_t nchunks = (HW + chunk - 1) / chunk;
    const int64_t prefetch = row_prefetch_bytes<X>(N * C * HW);
    at::parallel_for(0, N * nchunks, 1, [&](int64_t b, int64_t e) {
      std::vector<T> m(chunk), sm(chunk);
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = t / nchunks, p0 = (t % nchunks) * chunk;
        const int64_t len = std::min(chunk, HW - p0);
        pool_chunk<T, X>(x + n * C * HW + p0, s ? s + n * C : nullptr, C, HW, len, m.data(), sm.data(), prefetch);
        if (mx) std::copy(m.data(), m.data() + len, mx + n * obs + p0);
        if (mean) std::copy(sm.data(), sm.data() + len, mean + n * obs + p0);
      }
    });
  } else {
    at::parallel_for(0, N * HW, 64, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e;) {  // the pixels of [b, e) image by image
        const int64_t n = p / HW, q = p % HW, len = std::min(e - p, HW - q);
        pool_pixels<T, X>(x + p * C, s ? s + n * C : nullptr, C, len, mx ? mx + n * obs + q : nullptr,
                          mean ? mean + n * obs + q : nullptr);
        p += len;
      }
    });
  }
}


}  // namespace
