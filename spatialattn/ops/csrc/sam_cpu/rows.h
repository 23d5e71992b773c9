// Memory: the last-level cache size and non-temporal stores, the row product
// d = (x * s) * a, pixel chunks of the work split, the layout of the max bits.
//
// Part of sam_cpu.cpp: the parts are included in order into one translation unit, each in the
// unit's anonymous namespace, and each uses the ones before it (see sam_cpu.cpp for the overview).
#pragma once

namespace {

// Non-temporal stores pay once input + output do not fit in the last-level cache
// (PERF-NOTES: 2.7x -> 1.35x clone there) and hurt when they do (measured here: the
// 11 MB forward became 1.5-2.5x slower with them). The threshold is the
// last-level cache size the C library reports (32 MiB if it does not); adjustable at
// run time (spatialattn.ops._cpp.get().set_stream_bytes, a negative value restores
// the default) for measurements.
int64_t kStreamBytes = -1;

// Size of the level-`level` cache one core sees (`fallback` if the system does not say).
// sysconf(_SC_LEVEL3_CACHE_SIZE) is not it: on AMD EPYC virtual machines it reports the whole
// socket (320 MiB where a core shares 32 MiB), so Linux's per-instance sysfs entry comes first.
inline int64_t cache_bytes(int level, int64_t fallback) {
  for (int i = 0; i < 8; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    std::ifstream lvf(dir + "level"), size(dir + "size");
    int lv = 0;
    std::string sz;
    if (!(lvf >> lv) || !(size >> sz)) continue;
    if (lv != level || sz.empty()) continue;
    int64_t v = std::atoll(sz.c_str());
    const char unit = sz.back();
    if (unit == 'K') v <<= 10;
    if (unit == 'M') v <<= 20;
    if (v > 0) return v;
  }
  return fallback;
}
inline int64_t llc_bytes() { return cache_bytes(3, int64_t(32) << 20); }
inline int64_t l2_bytes() {
  static const int64_t l2 = cache_bytes(2, int64_t(1) << 20);
  return l2;
}

inline int64_t stream_threshold() {
  if (kStreamBytes >= 0) return kStreamBytes;
  static const int64_t llc = llc_bytes();
  return llc;
}

// `tensors` tensors of `elems` elements each fit in the last-level cache together
template <typename T>
inline bool fit_llc(int64_t elems, int64_t tensors) {
  return tensors * elems * int64_t(sizeof(T)) <= stream_threshold();
}

// input + output of `elems` elements each do not fit in the last-level cache. Not for an
// output the kernel reads before writing it (output_read: added into in place): each of its
// lines has just come into the cache, and a non-temporal store from there is the slow way
// (the global pooling's backward into CBAM's gradient: 1.6-1.9x the time of plain stores at
// 8x256x52x52 / 8x128x104x104).
template <typename T>
inline bool use_stream(int64_t elems, bool output_read = false) {
  return !output_read && !fit_llc<T>(elems, 2);
}

inline void stream_fence(bool stream) {
#if defined(__SSE2__)
  if (stream) _mm_sfence();
#else
  (void)stream;
#endif
}

// Software prefetch of NCHW channel rows. The pooling (pool_chunk) and the backward's pass A
// (reduce_chunk) sweep groups of four or eight channel rows at a time, each a run as long as
// the pixels of the chunk or band, a channel stride apart; pass B (gradx_segment) goes
// through the channel rows of a band one after the other. Every short run restarts the
// hardware prefetchers, whose first lines of each run then come late. Where x (and the
// gradient) come from memory or a far L3, these loops ask for the rows of a group (a row)
// kPrefetchAhead bytes of work ahead into L2 as they sweep the current one. Measured (2
// threads, float32, NCHW, the rule forced on and off in one build, alternated; Zen 4 VM,
// L2 1 MiB, L3 32 MiB): see docs/performance-log.md ("Software prefetch of the channel rows").
// The pooling and pass A take it where x exceeds a quarter of the LLC; pass B where the
// gradient is written with stream stores (x and the gradient exceed the LLC): at 8x512x26x26
// and 8x768x26x26 (11-17 MB, L3) it made pass B 1.07-1.10x slower. Settable
// (set_row_prefetch): -1 the rule, 0 never, 1 always (tests).
constexpr int64_t kPrefetchAhead = 12288;
int kRowPrefetch = -1;
template <typename X>
inline int64_t row_prefetch_bytes(int64_t elems) {
  static const int64_t llc = llc_bytes();
  if (kRowPrefetch == 0 || (kRowPrefetch < 0 && 4 * elems * int64_t(sizeof(X)) <= llc)) return 0;
  return kPrefetchAhead;
}
// The rows [c, c + nc) a channel stride HW apart at element k, prefetched into L2 `ahead`
// rows further on. At every vector step, also where a step covers half a line (bfloat16,
// AVX2): a test of k before the prefetches made GCC 12 drop them from the loop altogether.
template <int nc, typename X>
inline void prefetch_group(const X* x, int64_t c, int64_t HW, int64_t ahead, int64_t k) {
  const X* r = x + (c + ahead) * HW + k;
  for (int j = 0; j < nc; ++j) __builtin_prefetch(r + j * HW, 0, 2);
}
// how many rows ahead (whole groups of nc, at least one) make `prefetch` bytes of work when a
// group reads nc runs of `len` elements of `elem_bytes` (0: none)
inline int64_t prefetch_rows_ahead(int64_t prefetch, int nc, int64_t len, int64_t elem_bytes) {
  if (prefetch <= 0 || len <= 0) return 0;
  const int64_t group = nc * len * elem_bytes;
  return nc * std::max<int64_t>(1, (prefetch + group - 1) / group);
}
// the group of nc rows at channel c has a group `ahead` rows on among the C channels
inline bool has_group_ahead(int64_t c, int64_t nc, int64_t ahead, int64_t C) {
  return ahead > 0 && c + ahead + nc <= C;
}
// f(std::true_type{}) where `on`, else f(std::false_type{}): a loop's prefetching and plain
// variants, chosen once outside it (a test inside cost 5-10 %, see above)
template <typename F>
inline decltype(auto) with_prefetch(bool on, F&& f) {
  return on ? f(std::true_type{}) : f(std::false_type{});
}
// pass B's rows ahead (one row of `len` elements at a time): where the gradient is streamed (the
// rule), or always / never when set; 0: none
inline int64_t pass_b_rows_ahead(bool stream, int64_t len, int64_t elem_bytes) {
  const bool on = kRowPrefetch < 0 ? stream : kRowPrefetch > 0;
  return on ? prefetch_rows_ahead(kPrefetchAhead, 1, len, elem_bytes) : 0;
}
// channel rows [0, C) one after the other, as f(pf, c0, c1): with the row `ahead` on prefetched
// (pf = std::true_type) while there is one, the rest plain
template <typename F>
inline void rows_with_row_ahead(int64_t C, int64_t ahead, F&& f) {
  const int64_t cp = ahead > 0 ? std::max<int64_t>(0, C - ahead) : 0;
  f(std::true_type{}, int64_t(0), cp);
  f(std::false_type{}, cp, C);
}

// d[i] = (x[i] * s) * a with s = sv[i] or ss, a = av[i] or as; (x * s) is rounded first,
// as in the reference (in T; d and x in their storage types). With `stream`, float32 /
// float16 / bfloat16 rows use non-temporal stores.
#if SAM_AVX2_HALVES
// mul_row for float32 in AVX2 builds (see SAM_AVX2_HALVES), not in place, n >= 8: 256-bit
// vectors; cached: a head vector, aligned vectors from the first 32-byte boundary of d,
// the tail as one vector ending at n (overlapped elements written again, the same values);
// with `stream`, non-temporal stores from that boundary (the generic code streams only in
// AVX-512 builds).
// (x * s) * a for 8 elements from x: the product of the AVX2 multiply loops (mul_row_avx2 and
// mul_rows' channels_last run), in one order so that both give the same bits
template <typename X>
inline __m256 prod8(const X* x, __m256 s, __m256 a) {
  return _mm256_mul_ps(_mm256_mul_ps(ld8(x), s), a);
}

template <bool HS, bool HA, typename XD, typename XS>
inline void mul_row_avx2(XD* d, const XS* x, const float* sv, float ss, const float* av, float as, int64_t n,
                         bool stream) {
  const __m256 vss = _mm256_set1_ps(ss), vas = _mm256_set1_ps(as);
  auto at = [&](int64_t k) {
    return prod8(x + k, HS ? _mm256_loadu_ps(sv + k) : vss, HA ? _mm256_loadu_ps(av + k) : vas);
  };
  auto one = [&](int64_t k) { d[k] = XD((float(x[k]) * (HS ? sv[k] : ss)) * (HA ? av[k] : as)); };
  constexpr uintptr_t vb = 8 * sizeof(XD);  // bytes of d per vector
  int64_t i = elems_to_boundary(d, vb);
  if (stream) {
    for (int64_t k = 0; k < i && k < n; ++k) one(k);
    for (; i + 8 <= n; i += 8) st8_nt(d + i, at(i));
    for (; i < n; ++i) one(i);
    return;
  }
  st8(d, at(0));
  if (i == 0) i = 8;
  for (; i + 8 <= n; i += 8) st8(d + i, at(i));
  if (i < n) st8(d + n - 8, at(n - 8));
}
#endif

template <typename T, typename XD, typename XS>
inline void mul_row(XD* d, const XS* x, const T* sv, T ss, const T* av, T as, int64_t n, bool stream) {
  using V = vec_t<T>;
  constexpr int64_t L = lanes<T>();
  int64_t i = 0;
#if SAM_AVX2_HALVES
  if constexpr (std::is_same_v<T, float>) {
    if (n >= 8 && static_cast<const void*>(d) != static_cast<const void*>(x)) {
      if (sv && av) mul_row_avx2<true, true>(d, x, sv, ss, av, as, n, stream);
      else if (sv) mul_row_avx2<true, false>(d, x, sv, ss, av, as, n, stream);
      else if (av) mul_row_avx2<false, true>(d, x, sv, ss, av, as, n, stream);
      else mul_row_avx2<false, false>(d, x, sv, ss, av, as, n, stream);
      return;
    }
  }
#endif
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    if (stream) {
      for (const int64_t h = std::min(n, elems_to_boundary(d, L * sizeof(XD))); i < h; ++i)
        d[i] = XD((T(x[i]) * (sv ? sv[i] : ss)) * (av ? av[i] : as));
      const V vss = V{} + ss, vas = V{} + as;
      for (; i + L <= n; i += L) {
        const V xs = vld(x + i) * (sv ? vload(sv + i) : vss);
        vst_nt(d + i, xs * (av ? vload(av + i) : vas));
      }
    }
  }
#endif
  (void)stream;
  if constexpr (!std::is_same<XD, T>::value || !std::is_same<XS, T>::value) {
    // a half format on either side: explicit vectors (the conversions keep the compiler
    // from vectorising the scalar loops below)
    const V vss = V{} + ss, vas = V{} + as;
    auto run = [&](auto s_t, auto a_t) SA_INLINE {  // the vector / scalar choices out of the loop
      constexpr bool HS = decltype(s_t)::value, HA = decltype(a_t)::value;
      for (; i + L <= n; i += L) vst(d + i, (vld(x + i) * (HS ? vload(sv + i) : vss)) * (HA ? vload(av + i) : vas));
    };
    using Y = std::true_type;
    using No = std::false_type;
    if (sv && av) run(Y{}, Y{}); else if (sv) run(Y{}, No{}); else if (av) run(No{}, Y{}); else run(No{}, No{});
    for (; i < n; ++i) d[i] = XD((T(x[i]) * (sv ? sv[i] : ss)) * (av ? av[i] : as));
    return;
  }
  if constexpr (std::is_same<XD, T>::value && std::is_same<XS, T>::value) {
    if (i == 0 && n >= L && static_cast<const void*>(d) != static_cast<const void*>(x)) {
      // explicit vectors, the row's tail as one vector ending at n (its overlapped elements
      // are written again with the same values; not in place, where they would be read back
      // as outputs). Measured (with the pooling tails below): the NCHW forward 0.94-0.98x the
      // time at 13x13 and 26x26; plain unaligned vectors had been 1.19x slower at 26x26.
      const V vss = V{} + ss, vas = V{} + as;
      // (SA_INLINE: with more code elsewhere in the unit GCC left these loops out of line,
      // a call per row; the small-map forward took 1.12-1.29x the time, thirty-eighth session)
      auto run = [&](auto s_t, auto a_t) SA_INLINE {
        constexpr bool HS = decltype(s_t)::value, HA = decltype(a_t)::value;
        auto at = [&](int64_t k) SA_INLINE {
          vstore(d + k, (vload(x + k) * (HS ? vload(sv + k) : vss)) * (HA ? vload(av + k) : vas));
        };
        // a head vector, then vectors from the first 64-byte boundary of d (stores that
        // split a cache line cost), then the tail
        at(0);
        i = elems_to_boundary(d, 64);
        if (i == 0) i = L;
        for (; i + L <= n; i += L) at(i);
        if (i < n) at(n - L);
      };
      using Y = std::true_type;
      using No = std::false_type;
      if (sv && av) run(Y{}, Y{}); else if (sv) run(Y{}, No{}); else if (av) run(No{}, Y{}); else run(No{}, No{});
      return;
    }
  }
  if (sv && av) {
    for (; i < n; ++i) d[i] = (x[i] * sv[i]) * av[i];
  } else if (sv) {
    for (; i < n; ++i) d[i] = (x[i] * sv[i]) * as;
  } else if (av) {
    for (; i < n; ++i) d[i] = (x[i] * ss) * av[i];
  } else {
    for (; i < n; ++i) d[i] = (x[i] * ss) * as;
  }
}

// Split the HW pixels of each image into chunks: long enough for the
// prefetchers (a band of rows), short enough for the accumulators to stay in
// L1, and enough chunks in total to keep every thread busy.
inline int64_t pixel_chunk(int64_t N, int64_t HW) {
  // Long chunks: each channel row of a chunk is one sequential run in memory (a whole
  // plane when the chunk is the image), the two accumulator rows stay in L1/L2.
  int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t nch = (HW + 4095) / 4096;
  int64_t chunk = (HW + nch - 1) / nch;
  int64_t want = threads;
  if (N * nch < want) {
    int64_t per_image = (want + N - 1) / N;
    chunk = std::max<int64_t>(64, (HW + per_image - 1) / per_image);
  }
  chunk = (chunk + kLanes - 1) / kLanes * kLanes;
  return std::max<int64_t>(1, std::min(chunk, HW));
}

// The max bits of k_reduce / k_gradx (N images of C channel rows, NCHW): by pixel chunk of
// pixel_chunk(N, HW), each chunk's C rows of max_bits_stride(chunk) bytes together, so that the
// threads' chunks write apart (rows [N, C] of whole images: two threads writing into every row
// made 1x1024x13x13's backward 1.35x slower than the compare, from the lines they share).
struct MaxBitsLayout {
  int64_t N, C, chunk, nchunks, stride;
  MaxBitsLayout(int64_t N_, int64_t C_, int64_t HW)
      : N(N_), C(C_), chunk(pixel_chunk(N_, HW)), nchunks((HW + chunk - 1) / chunk), stride(max_bits_stride(chunk)) {}
  int64_t bytes() const { return N * nchunks * C * stride; }
  // the row of channel c of chunk k of image n
  int64_t row(int64_t n, int64_t k, int64_t c) const { return ((n * nchunks + k) * C + c) * stride; }
};

// the max bits for the phases k_reduce / k_gradx over N images (see max_bits_wanted; x_bytes:
// the size of their x), or an empty buffer where pass B compares
inline std::vector<uint8_t> phase_max_bits(bool has_max, bool nhwc, bool need_gs, int64_t x_bytes, int64_t N,
                                           int64_t C, int64_t HW) {
  return std::vector<uint8_t>(max_bits_wanted(has_max, nhwc, need_gs, x_bytes) ? MaxBitsLayout(N, C, HW).bytes() : 0);
}


}  // namespace
