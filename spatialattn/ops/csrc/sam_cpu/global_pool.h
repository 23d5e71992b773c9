// Global (spatial) pooling of CBAM's channel gate, forward and backward.
//
// Part of sam_cpu.cpp: the parts are included in order into one translation unit, each in the
// unit's anonymous namespace, and each uses the ones before it (see sam_cpu.cpp for the overview).
#pragma once

namespace {

// ---------------------------------------------------------------- global (spatial) pooling
// NCHW rows of at most this many pixels have their lane reductions done sixteen rows at a
// time (GlobalPool::rows16). Measured (global pooling alone, 8 images, 2 threads, float32,
// paired): 0.88-0.91x the time at 7x7, 0.92x at 5x5, 0.96-0.97x at 9x9 / 10x10; longer rows
// lost (11x11 1.04x, 13x13 1.10x, 26x26 1.07x): there the reductions weigh little beside the
// rest of a row, and the sixteen rows' lanes wait on the stack.
constexpr int64_t kRows16MaxHW = 100;

// NCHW backward of the global pooling: rows in blocks of about this many bytes of x (see
// k_global_pool_backward); settable for measurements (set_gp_backward_block_bytes)
constexpr int64_t kGpBackwardBlockDefault = 16384;
int64_t kGpBackwardBlockBytes = kGpBackwardBlockDefault;
// ... and its rows of at most this many pixels, added into a gradient, in lane blocks (see
// k_global_pool_backward); settable for tests (set_gp_lane_block_max_hw, 0: rows only)
constexpr int64_t kGpLaneBlockDefault = 100;
int64_t kGpLaneBlockMaxHW = kGpLaneBlockDefault;

// GlobalPool: for CBAM's channel gate: max and mean over H*W of each (n, c) in one read of x.
// mx / mean: [N, C] outputs (either may be null). cnt (channels_last only, with mx): [N, C]
// number of elements equal to the max, counted in the same read (the backward then needs no
// counting pass over x; NCHW counts each row while it is in L1 anyway).
// Two phases, each a range of independent items that any thread may take (k_global_pool runs
// them through at::parallel_for; cbam_forward's one parallel region splits them by hand):
// run(b, e) reads x (NCHW: items are the N * C rows; channels_last: N * nb pixel blocks into
// partial accumulators, or with nb = 1 (`direct`) whole images straight into the outputs),
// then, channels_last with nb > 1 only, combine(b, e) sums the partials of the N * C outputs.
// The bits depend on nb (set from the thread count), not on the split.
template <typename T, typename X>
struct GlobalPool {
  using V = vec_t<T>;
  static constexpr int64_t L = lanes<T>();
  const X* x;
  int64_t N, C, HW;
  bool nhwc;
  T *mx, *mean, *cnt;
  int64_t nb = 1, block = 0, tp = 1;  // channels_last: blocks per image, pixels per block / per tile
  bool prefetch = false, counting = false, direct = false;
  std::vector<T> pm, ps, pc;  // channels_last partials [N * nb, C] (not with `direct`)

  GlobalPool(const X* x_, int64_t N_, int64_t C_, int64_t HW_, bool nhwc_, T* mx_, T* mean_, T* cnt_)
      : x(x_), N(N_), C(C_), HW(HW_), nhwc(nhwc_), mx(mx_), mean(mean_), cnt(cnt_) {
    if (!nhwc) return;
    // one contiguous pass over the pixels of an image (or of a block of them when there are
    // fewer images than threads), accumulating all C channels
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    nb = N >= threads ? 1 : std::min(HW, (threads + N - 1) / N);
    block = (HW + nb - 1) / nb;
    counting = cnt && mx;
    // one block per image: its accumulators are the thread's own (run), finished straight into
    // the outputs; partials [N * nb, C] and the combine pass only where images are split
    direct = nb == 1;
    if (!direct) {
      pm.resize(N * nb * C);
      ps.resize(N * nb * C);
      pc.resize(counting ? N * nb * C : 0);
    }
    // pixels per tile (see the sweep below), and whether the next tile is prefetched: not
    // where each thread's share of x fits in half an L2 (1x1024x13x13: 1.04-1.10x the time
    // with the prefetches, which then only cost instructions)
    tp = std::max<int64_t>(1, kGpTileBytes / std::max<int64_t>(1, C * int64_t(sizeof(X))));
    prefetch = N * HW * C * int64_t(sizeof(X)) > threads * (int64_t(1) << 19);
  }

  int64_t items() const { return nhwc ? N * nb : N * C; }
  int64_t grain() const { return nhwc ? 1 : std::max<int64_t>(1, 16384 / std::max<int64_t>(HW, 1)); }

  void run(int64_t b, int64_t e) {
    if (!nhwc) {
      int64_t r = b;
      if (std::is_same_v<T, float> && HW >= L && HW <= kRows16MaxHW)
        for (; r + 16 <= e; r += 16) rows16(r);
      for (; r < e; ++r) row(r);
    } else if (direct) {  // whole images: an image's accumulators in the thread's scratch (L1)
      std::unique_ptr<T[]> acc(new T[3 * C]);
      for (int64_t n = b; n < e; ++n) {
        // prefetching on into the next images of this range (they follow in memory): an image
        // of one or a few tiles would otherwise start every time without its lines in flight
        pixel_block(n, acc.get(), acc.get() + C, counting ? acc.get() + 2 * C : nullptr, (e - n) * HW);
        for (int64_t c = 0; c < C; ++c) finish_output(n, c, acc[c], acc[C + c], counting ? acc[2 * C + c] : T(0));
      }
    } else {
      for (int64_t t = b; t < e; ++t) pixel_block(t, pm.data() + t * C, ps.data() + t * C,
                                                  counting ? pc.data() + t * C : nullptr, -1);
    }
  }

#if SAM_AVX2_HALVES
  // a row's lane maxima / lane sums before their reduction: in AVX2 builds two 256-bit halves
  using RowLanes = std::conditional_t<std::is_same_v<T, float>, VecHalves<float>, V>;
#else
  using RowLanes = V;
#endif

  // NCHW row r with HW >= L: its lane maxima lm and lane sums ls. Two vector accumulator
  // pairs, the row's last HW % L elements as one vector ending at HW (for the sum, its lanes
  // already counted masked to +0, which adds exactly: no lane of a sum started at +0 is ever
  // -0); the lanes are reduced by the caller, in hreduce's tree (one row: row(); sixteen
  // together: rows16()). The lane-by-lane reduction and scalar tail they replace were about
  // 100 dependent steps per row: 0.45x the time at 2x2048x7x7, 0.71x at 13x13, 0.86x at 26x26.
  void row_lanes(int64_t r, RowLanes& lm, RowLanes& ls) const {
    const X* row = x + r * HW;
    int64_t i = 0;
#if SAM_AVX2_HALVES
    if constexpr (std::is_same_v<T, float>) {  // each 64-byte vector as two 256-bit halves
      __m256 m0l = ld8(row), m0h = ld8(row + 8), m1l = m0l, m1h = m0h;
      __m256 a0l = _mm256_setzero_ps(), a0h = a0l, a1l = a0l, a1h = a0l;
      for (; i + 2 * L <= HW; i += 2 * L) {
        const __m256 v0l = ld8(row + i), v0h = ld8(row + i + 8), v1l = ld8(row + i + L), v1h = ld8(row + i + L + 8);
        m0l = vmax8(m0l, v0l);
        m0h = vmax8(m0h, v0h);
        m1l = vmax8(m1l, v1l);
        m1h = vmax8(m1h, v1h);
        a0l = _mm256_add_ps(a0l, v0l);
        a0h = _mm256_add_ps(a0h, v0h);
        a1l = _mm256_add_ps(a1l, v1l);
        a1h = _mm256_add_ps(a1h, v1h);
      }
      if (i + L <= HW) {
        const __m256 v0l = ld8(row + i), v0h = ld8(row + i + 8);
        m0l = vmax8(m0l, v0l);
        m0h = vmax8(m0h, v0h);
        a0l = _mm256_add_ps(a0l, v0l);
        a0h = _mm256_add_ps(a0h, v0h);
        i += L;
      }
      if (i < HW) {
        const __m256 v1l = ld8(row + HW - L), v1h = ld8(row + HW - L + 8);
        const __m256 lane = _mm256_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f);
        const __m256 d = _mm256_set1_ps(float(i - (HW - L)));
        m1l = vmax8(m1l, v1l);
        m1h = vmax8(m1h, v1h);
        a1l = _mm256_add_ps(a1l, _mm256_and_ps(_mm256_cmp_ps(lane, d, _CMP_GE_OQ), v1l));
        a1h = _mm256_add_ps(a1h, _mm256_and_ps(_mm256_cmp_ps(_mm256_add_ps(lane, _mm256_set1_ps(8.f)), d, _CMP_GE_OQ), v1h));
      }
      using H = typename VecHalves<float>::H;
      lm = {H(vmax8(m0l, m1l)), H(vmax8(m0h, m1h))};
      ls = {H(_mm256_add_ps(a0l, a1l)), H(_mm256_add_ps(a0h, a1h))};
      return;
    } else
#endif
    {
      V m0 = vld(row), m1 = m0, a0 = {}, a1 = {};
      for (; i + 2 * L <= HW; i += 2 * L) {
        const V v0 = vld(row + i), v1 = vld(row + i + L);
        m0 = vmax(m0, v0);
        m1 = vmax(m1, v1);
        a0 += v0;
        a1 += v1;
      }
      if (i + L <= HW) {
        const V v0 = vld(row + i);
        m0 = vmax(m0, v0);
        a0 += v0;
        i += L;
      }
      if (i < HW) {
        const V v1 = vld(row + HW - L);
        m1 = vmax(m1, v1);
        a1 += vsel<T>(vcmp<kGe, T>(lane_index<T>(), V{} + T(i - (HW - L))), v1, V{});
      }
      lm = vmax(m0, m1);
      ls = a0 + a1;
    }
  }

  // row r's outputs from its max and sum (NaN restored: the lane maxima drop it)
  void finish_row(int64_t r, T m, T sum) {
    if (sum != sum && any_nan<X, T>(x + r * HW, nullptr, HW, 1)) m = std::numeric_limits<T>::quiet_NaN();
    if (mx) mx[r] = m;
    if (mean) mean[r] = sum / T(HW);
  }

  // hreduce of one row's lanes
  static T lanes_reduced(const RowLanes& v, bool is_max) {
#if SAM_AVX2_HALVES
    if constexpr (std::is_same_v<T, float>) return hreduce8(__m256(v.lo), __m256(v.hi), is_max);
    else
#endif
      return hreduce<T, 64>(v, is_max);
  }

  // NCHW: max and mean of row r
  void row(int64_t r) {
    if (HW >= L) {
      RowLanes lm, ls;
      row_lanes(r, lm, ls);
      finish_row(r, lanes_reduced(lm, true), lanes_reduced(ls, false));
      return;
    }
    const X* row = x + r * HW;
    T m = T(row[0]), sum = 0;
    for (int64_t i = 0; i < HW; ++i) {
      m = vmax(m, T(row[i]));
      sum += T(row[i]);
    }
    finish_row(r, m, sum);
  }

  // NCHW float32 rows r .. r + 15 with HW >= L: row() for each, their lane reductions done
  // together (reduce16: the same tree, so the same bits). Short rows are a few vectors each,
  // and two reductions of four dependent levels per row cost as much as the loads (2x2048x7x7:
  // 49-pixel rows).
  void rows16(int64_t r) {
#ifdef SA_HAVE_REDUCE16
    if constexpr (std::is_same_v<T, float>) {
      RowLanes lm[16], ls[16];
      for (int j = 0; j < 16; ++j) row_lanes(r + j, lm[j], ls[j]);
      float m[16], s[16];
      vstore(m, reduce16(lm, LaneMax{}));
      vstore(s, reduce16(ls, LaneSum{}));
      bool nan = false;
      for (int j = 0; j < 16; ++j) nan |= s[j] != s[j];
      if (!nan) {  // finish_row for the sixteen, as vectors (a NaN sum: row by row, which restores a NaN max)
        if (mx) std::copy(m, m + 16, mx + r);
        if (mean)
          for (int j = 0; j < 16; ++j) mean[r + j] = s[j] / float(HW);
        return;
      }
      for (int j = 0; j < 16; ++j) finish_row(r + j, m[j], s[j]);
      return;
    }
#endif
    for (int j = 0; j < 16; ++j) row(r + j);
  }

  // channels_last: block t (image t / nb, pixels of its share t % nb) into the accumulators m,
  // sm and (counting) ct, C each; the software prefetches run up to pixel pf_limit from the
  // image's first (past its end: into the images after it), or to the block's end where -1
  void pixel_block(int64_t t, T* m, T* sm, T* ct, int64_t pf_limit) {
    const int64_t n = t / nb, p0 = (t % nb) * block, p1 = std::min(HW, p0 + block);
    const X* base = x + n * HW * C;
    if (p0 >= p1) {
      std::fill(sm, sm + C, T(0));
      std::fill(m, m + C, -std::numeric_limits<T>::infinity());
      if (counting) std::fill(ct, ct + C, T(0));
      return;
    }
    std::copy(base + p0 * C, base + (p0 + 1) * C, m);
    std::copy(base + p0 * C, base + (p0 + 1) * C, sm);  // 0 + v exactly: the same sums
    if (counting) std::fill(ct, ct + C, T(1));
    const V one = V{} + T(1), zero = V{};
    // Tiles of tp pixels (about kGpTileBytes of x), swept once per block of NB channel
    // vectors whose accumulators stay in registers over the whole tile (the sum still
    // adds the pixels in order, so every tiling gives the same bits). With counting, a
    // larger value restarts the count at 1 and an equal one adds 1 (NaN does neither: a
    // NaN max is restored below, and no element equals it in backward). Within a tile
    // the reads jump from pixel to pixel, which the hardware prefetchers do not follow
    // from memory; so the next tile's lines are prefetched into L2 in address order
    // along the current one (without them: 1.35-1.6x the time at 8x256x52x52,
    // 8x512x26x26 and 2x1024x52x52, the same at 8x128x104x104). NB = 4 where a pixel
    // spans a 4 KiB page (8 was slower there). Against the previous sweeps of one pixel
    // (four where x was cache-resident) over accumulator rows in L1, which were bound by
    // their stores: see docs/performance-log.md ("CBAM's global pooling" sections).
    auto tile = [&](auto count_t, int64_t p, int64_t np) {
      constexpr bool CNT = decltype(count_t)::value;
      const X* row = base + p * C;
      const char* pf = reinterpret_cast<const char*>(row + np * C);
      const char* pf_end = reinterpret_cast<const char*>(base + std::min(pf_limit < 0 ? p1 : pf_limit, p + np + tp) * C);
      int64_t c = 0;
      auto sweep = [&](auto nb_t) {
        constexpr int NB = decltype(nb_t)::value;
        for (; c + NB * L <= C; c += NB * L) {
          V mo[NB], a[NB], k[NB];
#pragma GCC unroll 8
          for (int i = 0; i < NB; ++i) {
            mo[i] = vload(m + c + i * L);
            a[i] = vload(sm + c + i * L);
            k[i] = CNT ? vload(ct + c + i * L) : V{};
          }
          const X* r = row + c;
          for (int64_t j = 0; j < np; ++j, r += C) {
            if (prefetch && pf < pf_end) {
#pragma GCC unroll 8
              for (int i = 0; i < NB; ++i) __builtin_prefetch(pf + i * 64, 0, 2);
              pf += NB * 64;
            }
#pragma GCC unroll 8
            for (int i = 0; i < NB; ++i) {
              const V v = vld(r + i * L);
              if (CNT)
                k[i] = vsel<T>(vcmp<kGt, T>(v, mo[i]), one, k[i] + vsel<T>(vcmp<kEq, T>(v, mo[i]), one, zero));
              mo[i] = vmax(mo[i], v);
              a[i] += v;
            }
          }
#pragma GCC unroll 8
          for (int i = 0; i < NB; ++i) {
            vstore(m + c + i * L, mo[i]);
            vstore(sm + c + i * L, a[i]);
            if (CNT) vstore(ct + c + i * L, k[i]);
          }
        }
      };
#if SAM_AVX2_HALVES
      if constexpr (std::is_same_v<T, float>) {
        // AVX2 builds (see SAM_AVX2_HALVES): the same sweep in 256-bit vectors, four per
        // block (with counting, twelve accumulators in registers); per channel the same
        // operations on the pixels in the same order, so the same bits
        auto sweep8 = [&](auto nb_t) {
          constexpr int NB = decltype(nb_t)::value;
          constexpr int PF = int((NB * 8 * sizeof(X) + 63) / 64);  // lines of x per pixel and block
          const __m256 one8 = _mm256_set1_ps(1.f);
          for (; c + NB * 8 <= C; c += NB * 8) {
            __m256 mo[NB], a[NB], k[NB];
#pragma GCC unroll 4
            for (int i = 0; i < NB; ++i) {
              mo[i] = _mm256_loadu_ps(m + c + i * 8);
              a[i] = _mm256_loadu_ps(sm + c + i * 8);
              k[i] = CNT ? _mm256_loadu_ps(ct + c + i * 8) : _mm256_setzero_ps();
            }
            const X* r = row + c;
            for (int64_t j = 0; j < np; ++j, r += C) {
              if (prefetch && pf < pf_end) {
#pragma GCC unroll 4
                for (int i = 0; i < PF; ++i) __builtin_prefetch(pf + i * 64, 0, 2);
                pf += PF * 64;
              }
#pragma GCC unroll 4
              for (int i = 0; i < NB; ++i) {
                const __m256 v = ld8(r + i * 8);
                if (CNT)
                  k[i] = _mm256_blendv_ps(_mm256_add_ps(k[i], _mm256_and_ps(_mm256_cmp_ps(v, mo[i], _CMP_EQ_OQ), one8)),
                                          one8, _mm256_cmp_ps(v, mo[i], _CMP_GT_OQ));
                mo[i] = vmax8(mo[i], v);
                a[i] = _mm256_add_ps(a[i], v);
              }
            }
#pragma GCC unroll 4
            for (int i = 0; i < NB; ++i) {
              _mm256_storeu_ps(m + c + i * 8, mo[i]);
              _mm256_storeu_ps(sm + c + i * 8, a[i]);
              if (CNT) _mm256_storeu_ps(ct + c + i * 8, k[i]);
            }
          }
        };
        sweep8(std::integral_constant<int, 4>{});
        sweep8(std::integral_constant<int, 1>{});
      }
#endif
      if (C * int64_t(sizeof(X)) < 4096) sweep(std::integral_constant<int, 8>{});
      sweep(std::integral_constant<int, 4>{});
      sweep(std::integral_constant<int, 1>{});
      for (; c < C; ++c)
        for (int64_t j = 0; j < np; ++j) {
          const T v = T(row[j * C + c]);
          if (CNT) ct[c] = v > m[c] ? T(1) : ct[c] + (v == m[c] ? T(1) : T(0));
          m[c] = vmax(m[c], v);
          sm[c] += v;
        }
    };
    auto run_tiles = [&](auto count_t) {
      for (int64_t p = p0 + 1; p < p1; p += tp) tile(count_t, p, std::min(tp, p1 - p));
    };
    if (counting) {
      run_tiles(std::true_type{});
    } else {
      run_tiles(std::false_type{});
    }
  }

  // channels_last: output (n, c) from its max mc, sum sc and the count k of elements equal to mc
  // (NaN restored after the count: the lane maxima drop it; where it is, no element equals the
  // max in backward and the count goes unused)
  void finish_output(int64_t n, int64_t c, T mc, T sc, T k) {
    const int64_t i = n * C + c;
    if (counting) cnt[i] = mc == mc ? k : T(0);
    if (sc != sc && any_nan<X, T>(x + n * HW * C + c, nullptr, HW, C)) mc = std::numeric_limits<T>::quiet_NaN();
    if (mx) mx[i] = mc;
    if (mean) mean[i] = sc / T(HW);
  }

  // channels_last: outputs [b, e) of the N * C (partials summed in block order); nothing to do
  // with `direct` (run wrote them)
  void combine(int64_t b, int64_t e) {
    if (direct) return;
    for (int64_t n = b / C; n * C < e; ++n) {
      const int64_t c1 = std::min(C, e - n * C);
      for (int64_t c = std::max<int64_t>(0, b - n * C); c < c1; ++c) {
        T mc = pm[n * nb * C + c], sc = ps[n * nb * C + c];
        for (int64_t k = 1; k < nb; ++k) {
          mc = vmax(mc, pm[(n * nb + k) * C + c]);
          sc += ps[(n * nb + k) * C + c];
        }
        T k = 0;
        if (counting)
          for (int64_t j = 0; j < nb; ++j)
            if (pm[(n * nb + j) * C + c] == mc) k += pc[(n * nb + j) * C + c];
        finish_output(n, c, mc, sc, k);
      }
    }
  }
};

template <typename T, typename X>
void k_global_pool(const X* x, int64_t N, int64_t C, int64_t HW, bool nhwc, T* mx, T* mean, T* cnt = nullptr) {
  GlobalPool<T, X> gp(x, N, C, HW, nhwc, mx, mean, cnt);
  at::parallel_for(0, gp.items(), gp.grain(), [&](int64_t b, int64_t e) { gp.run(b, e); });
  if (nhwc && !gp.direct) at::parallel_for(0, N * C, C, [&](int64_t b, int64_t e) { gp.combine(b, e); });
}

// One run of n elements of the global-pool gradient: out[k] = (acc ? out[k] : 0) + f +
// [row[k] == m] * fm, the max term only with has_max. at(k, f, fm, m) sets the operands of
// element k, as T (one element) or vec_t<T> (lanes<T>() elements from k): an NCHW row
// broadcasts one value each, a channels_last pixel reads one per channel. With `stream`, the
// run goes to buf first and is copied out with non-temporal stores.
template <typename T, typename X, typename At>
inline void global_pool_grad_run(const X* row, int64_t n, bool has_max, bool acc, X* out, T* buf, bool stream,
                                 At at) {
  using V = vec_t<T>;
  constexpr int64_t L = lanes<T>();
  auto emit = [&](auto st_t) {  // ST: write to buf (a compile-time choice, out of the loop)
    constexpr bool ST = decltype(st_t)::value;
    int64_t k = 0;
#if SAM_AVX2_HALVES
    if constexpr (std::is_same_v<T, float>) {
      // AVX2 builds (see SAM_AVX2_HALVES): the same operations per element in 256-bit
      // vectors; at(k, f, fm, m) with __m256 operands gives 8 elements from k
      for (; k + 8 <= n; k += 8) {
        __m256 f, fm, m;
        at(k, f, fm, m);
        __m256 v = has_max ? _mm256_blendv_ps(f, _mm256_add_ps(f, fm), _mm256_cmp_ps(ld8(row + k), m, _CMP_EQ_OQ))
                           : f;
        if (acc) v = _mm256_add_ps(ld8(out + k), v);
        if constexpr (ST) _mm256_storeu_ps(buf + k, v); else st8(out + k, v);
      }
    }
#endif
    for (; k + L <= n; k += L) {
      V f, fm, m;
      at(k, f, fm, m);
      V v = has_max ? vsel<T>(vcmp<kEq, T>(vld(row + k), m), f + fm, f) : f;
      if (acc) v = vld(out + k) + v;
      if constexpr (ST) vstore(buf + k, v); else vst(out + k, v);
    }
    for (; k < n; ++k) {
      T f, fm, m;
      at(k, f, fm, m);
      const T v = (acc ? T(out[k]) : T(0)) + ((has_max && T(row[k]) == m) ? f + fm : f);
      if constexpr (ST) buf[k] = v; else out[k] = X(v);
    }
  };
  if (stream) {
    emit(std::true_type{});
    mul_row<T>(out, buf, nullptr, T(1), nullptr, T(1), n, true);
  } else {
    emit(std::false_type{});
  }
}

// Backward of the global pooling: gx[n, c, p] = fmean[n, c] + [x == mx[n, c]] * fmax[n, c]
// (fmean = d mean / HW; fmax = gmax / number of tied maxima, counted here). Either of
// gmax (with mx) / fmean may be null. With `acc`, added to what gx holds (one read-modify-
// write of gx instead of a new tensor that autograd would then add: CBAM's fused backward).
// counts (channels_last, from the forward): [N, C] tie counts, no counting pass; may be null.
// stream: use_stream's answer for gx (with `acc` gx is read first: see use_stream).
template <typename T, typename X>
void k_global_pool_backward(const X* x, const T* mx, const T* gmax, const T* fmean, int64_t N, int64_t C, int64_t HW,
                            bool nhwc, X* gx, bool stream, bool acc, const T* counts = nullptr) {
  using V = vec_t<T>;
  constexpr int64_t L = lanes<T>();
  const V one = V{} + T(1), zero = V{};
  if (!nhwc) {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(HW, 1));
    // rows in blocks of about 16 KB of x: the tie counts (and so the max's share) of a block
    // first, then its gradient, reading the block's x again from L1 / L2. Row by row, each
    // row's gradient waited for the division behind its count, which waited for the row's
    // loads: short rows streamed x and the gradient at a fraction of the cache's bandwidth.
    int64_t block = std::max<int64_t>(1, kGpBackwardBlockBytes / std::max<int64_t>(1, HW * int64_t(sizeof(X))));
    // Short rows added into gx (CBAM's fused backward: `acc`) in lane blocks (AVX-512 builds):
    // brows = flat_block_rows rows make a whole number of vectors, each lane's row share, max
    // share and max permuted in from the block's (BlockScales, as the SAM's scaled blocks), so
    // a 49-pixel row costs no partial vector and no scalar tail of its own. Per element the
    // operations of global_pool_grad_run with `acc` (same bits); without `acc` its scalar tail
    // adds the run to +0, which the vectors do not, so the rows stay.
    const int64_t brows = kLaneScales && acc && !stream ? flat_block_rows(HW, kGpLaneBlockMaxHW) : 0;
    // (the divisor's max: in builds without lane blocks brows is 0 at compile time, a division GCC warned of)
    if (brows) block = std::max(brows, block / std::max<int64_t>(brows, 1) * brows);
    at::parallel_for(0, N * C, grain, [&](int64_t b, int64_t e) {
      std::vector<T> buf(HW), fmb(mx ? std::min(block, e - b) : 0);
      std::vector<int32_t> ri(brows * HW);
      row_index_tile(HW, brows, ri.data());
      for (int64_t r0 = b; r0 < e; r0 += block) {
        const int64_t r1 = std::min(e, r0 + block);
        if (mx) {
          for (int64_t r = r0; r < r1; ++r) {
            // the number of elements equal to the max, from the bits of the compare masks (an
            // integer: the count of any order; as ones summed per lane and then lane by lane, it
            // was a chain of dependent adds in front of the division)
            const X* row = x + r * HW;
            const T m = mx[r];
            int64_t cnt = 0, i = 0;
            for (; i + L <= HW; i += L) cnt += __builtin_popcount(eq_bits<T>(row + i, m));
            if (i < HW && HW >= L) {  // the last HW % L elements: the vector ending at HW, its first lanes dropped
              cnt += __builtin_popcount(eq_bits<T>(row + HW - L, m) >> (i - (HW - L)));
            } else {
              for (; i < HW; ++i) cnt += T(row[i]) == m ? 1 : 0;
            }
            fmb[r - r0] = gmax[r] / T(cnt);
          }
        }
        int64_t r = r0;
#if defined(__AVX512F__)
        {
          const int64_t n = brows * HW;
          static const T zeros[16] = {};
          for (; brows && r + brows <= r1; r += brows) {
            const BlockScales<T> fa(fmean ? fmean + r : zeros, brows);
            BlockScales<T> fm, m;
            if (mx) fm = BlockScales<T>(fmb.data() + (r - r0), brows), m = BlockScales<T>(mx + r, brows);
            const X* xr = x + r * HW;
            X* out = gx + r * HW;
            for (int64_t k = 0; k < n; k += L) {
              const V f = fa.at(ri.data(), k);
              const V v = mx ? vsel<T>(vcmp<kEq, T>(vld(xr + k), m.at(ri.data(), k)), f + fm.at(ri.data(), k), f) : f;
              vst(out + k, vld(out + k) + v);
            }
          }
        }
#endif
        for (; r < r1; ++r) {
          const T fm = mx ? fmb[r - r0] : T(0), m = mx ? mx[r] : T(0), fa = fmean ? fmean[r] : T(0);
          global_pool_grad_run<T>(x + r * HW, HW, mx != nullptr, acc, gx + r * HW, buf.data(), stream,
                                  [&](int64_t, auto& f, auto& g, auto& mm) {
                                    if constexpr (std::is_same_v<std::decay_t<decltype(f)>, T>) {
                                      f = fa, g = fm, mm = m;
#if SAM_AVX2_HALVES
                                    } else if constexpr (std::is_same_v<std::decay_t<decltype(f)>, __m256>) {
                                      f = _mm256_set1_ps(fa), g = _mm256_set1_ps(fm), mm = _mm256_set1_ps(m);
#endif
                                    } else {
                                      f = V{} + fa, g = V{} + fm, mm = V{} + m;
                                    }
                                  });
        }
      }
      stream_fence(stream);
    });
  } else {
    // channels_last: per image, tie counts over its pixels, then the gradient. With fewer
    // images than threads, each image's pixels are split into blocks (partial counts summed
    // per image), so that every thread has work.
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    const int64_t nb = N >= threads ? 1 : std::min(HW, (threads + N - 1) / N);
    const int64_t block = (HW + nb - 1) / nb;
    const bool counting = mx && !counts;
    std::vector<T> cnt(counting ? N * nb * C : 0, T(0)), fm(N * C, T(0)), fa(N * C, T(0));
    if (counting) {
      at::parallel_for(0, N * nb, 1, [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; ++t) {
          const int64_t n = t / nb, p0 = (t % nb) * block, p1 = std::min(HW, p0 + block);
          const T* mn = mx + n * C;
          T* ct = cnt.data() + t * C;
          for (int64_t p = p0; p < p1; ++p) {
            const X* row = x + (n * HW + p) * C;
            int64_t c = 0;
            for (; c + L <= C; c += L)
              vstore(ct + c, vload(ct + c) + vsel<T>(vcmp<kEq, T>(vld(row + c), vload(mn + c)), one, zero));
            for (; c < C; ++c) ct[c] += T(row[c]) == mn[c] ? T(1) : T(0);
          }
        }
      });
    }
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) {
        fa[n * C + c] = fmean ? fmean[n * C + c] : T(0);
        if (mx) {
          T k = 0;
          if (counts) {
            k = counts[n * C + c];
          } else {
            for (int64_t j = 0; j < nb; ++j) k += cnt[(n * nb + j) * C + c];
          }
          fm[n * C + c] = gmax[n * C + c] / k;
        }
      }
    at::parallel_for(0, N * nb, 1, [&](int64_t b, int64_t e) {
      std::vector<T> buf(C);
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = t / nb, p0 = (t % nb) * block, p1 = std::min(HW, p0 + block);
        const T* mn = mx ? mx + n * C : nullptr;
        const T* fan = fa.data() + n * C;
        const T* fmn = fm.data() + n * C;
        for (int64_t p = p0; p < p1; ++p) {
          global_pool_grad_run<T>(x + (n * HW + p) * C, C, mn != nullptr, acc, gx + (n * HW + p) * C, buf.data(),
                                  stream, [&](int64_t c, auto& f, auto& g, auto& mm) {
                                    if constexpr (std::is_same_v<std::decay_t<decltype(f)>, T>) {
                                      f = fan[c], g = fmn[c], mm = mn ? mn[c] : T(0);
#if SAM_AVX2_HALVES
                                    } else if constexpr (std::is_same_v<std::decay_t<decltype(f)>, __m256>) {
                                      f = _mm256_loadu_ps(fan + c), g = _mm256_loadu_ps(fmn + c),
                                      mm = mn ? _mm256_loadu_ps(mn + c) : _mm256_setzero_ps();
#endif
                                    } else {
                                      f = vload(fan + c), g = vload(fmn + c), mm = mn ? vload(mn + c) : V{};
                                    }
                                  });
        }
      }
      stream_fence(stream);
    });
  }
}


}  // namespace
