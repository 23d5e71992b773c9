// The small maps: conv, norm and sigmoid of the pooled maps, and their backward.
//
// Part of sam_cpu.cpp: the parts are included in order into one translation unit, each in the
// unit's anonymous namespace, and each uses the ones before it (see sam_cpu.cpp for the overview).
#pragma once

namespace {

// ---------------------------------------------------------------- small maps
// The [N, P, H, W] pooled maps go through a k x k conv, an optional affine norm and
// the sigmoid. Written with GCC/Clang vector extensions (one 64-byte vector = one
// AVX-512 register, two AVX2 ones, ...) on zero-padded copies of the maps, so that
// every tap is an unmasked vector load; four output rows share a sweep over the taps
// (independent accumulators hide the FMA latency).
// sigmoid of a float vector: exp by Cephes' range reduction and degree-6 polynomial
// (branch-free, vectorised; ~1 ulp), NaN propagates.
#if SAM_AVX2_HALVES
// vsigmoid below for one 256-bit half, the same operations (AVX2 builds, see SAM_AVX2_HALVES)
inline __m256 vsigmoid8(__m256 z) {
  auto c = [](float v) { return _mm256_set1_ps(v); };
  __m256 x = _mm256_sub_ps(_mm256_setzero_ps(), z);
  x = _mm256_blendv_ps(x, c(-87.3f), _mm256_cmp_ps(x, c(-87.3f), _CMP_LT_OQ));
  x = _mm256_blendv_ps(x, c(88.7f), _mm256_cmp_ps(x, c(88.7f), _CMP_GT_OQ));
  const __m256 n = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(x, c(1.44269504088896341f)), c(12582912.0f)),
                                 c(12582912.0f));
  __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(n, c(0.693359375f)));
  r = _mm256_sub_ps(r, _mm256_mul_ps(n, c(-2.12194440e-4f)));
  __m256 p = c(1.9875691500e-4f);
  p = _mm256_add_ps(_mm256_mul_ps(p, r), c(1.3981999507e-3f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), c(8.3334519073e-3f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), c(4.1665795894e-2f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), c(1.6666665459e-1f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), c(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p, r), r), r), c(1.0f));
  const __m256 two_n =
      _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23));
  return _mm256_div_ps(c(1.0f), _mm256_add_ps(c(1.0f), _mm256_mul_ps(p, two_n)));
}
#endif
inline vec_t<float> vsigmoid(vec_t<float> z) {
#if SAM_AVX2_HALVES
  __m256 h[2];
  std::memcpy(h, &z, sizeof(h));
  h[0] = vsigmoid8(h[0]);
  h[1] = vsigmoid8(h[1]);
  vec_t<float> out;
  std::memcpy(&out, h, sizeof(out));
  return out;
#endif
  typedef int32_t ivec __attribute__((vector_size(64)));
  vec_t<float> x = -z;
  x = vsel<float>(vcmp<kLt, float>(x, vec_t<float>{} - 87.3f), vec_t<float>{} - 87.3f, x);
  x = vsel<float>(vcmp<kGt, float>(x, vec_t<float>{} + 88.7f), vec_t<float>{} + 88.7f, x);
  const vec_t<float> n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  vec_t<float> r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vec_t<float> p = vec_t<float>{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const ivec e = (__builtin_convertvector(n, ivec) + 127) << 23;
  vec_t<float> two_n;
  std::memcpy(&two_n, &e, sizeof(two_n));
  return 1.0f / (1.0f + p * two_n);
}
inline vec_t<double> vsigmoid(vec_t<double> z) {
  vec_t<double> a;
  for (int64_t l = 0; l < lanes<double>(); ++l) a[l] = 1.0 / (1.0 + std::exp(-z[l]));
  return a;
}

// Geometry of the zero-padded maps: [P, Hp, Wp], map (h, w) at (h + ph, w + pw);
// rows are wide enough for whole vectors at every tap.
struct Pad {
  int64_t H, W, KH, KW, dil, ph, pw, Hp, Wp;
};

template <typename T>
Pad make_pad(int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t dil) {
  const int64_t L = lanes<T>();
  Pad g{H, W, KH, KW, dil, (KH / 2) * dil, (KW / 2) * dil, 0, 0};
  g.Hp = H + 2 * g.ph;
  g.Wp = (W + L - 1) / L * L + 2 * g.pw;
  return g;
}

// padded rows [hp0, hp1) of every slot of pad [P, Hp, Wp] <- maps [P, H*W] (P maps of one
// image; zeros outside the image)
template <typename T>
void pad_rows(const T* maps, int64_t P, const Pad& g, T* pad, int64_t hp0, int64_t hp1) {
  for (int64_t p = 0; p < P; ++p)
    for (int64_t hp = hp0; hp < hp1; ++hp) {
      T* row = pad + (p * g.Hp + hp) * g.Wp;
      std::fill(row, row + g.Wp, T(0));
      const int64_t h = hp - g.ph;
      if (h >= 0 && h < g.H) std::copy(maps + (p * g.H + h) * g.W, maps + (p * g.H + h + 1) * g.W, row + g.pw);
    }
}

// pad [P, Hp, Wp] <- maps [P, H*W] (P maps of one image)
template <typename T>
void pad_maps(const T* maps, int64_t P, const Pad& g, T* pad) {
  pad_rows<T>(maps, P, g, pad, 0, g.Hp);
}

// One callable out of several lambdas (each keeps its own operator()).
template <class... F>
struct Overload : F... {
  using F::operator()...;
};
template <class... F>
Overload(F...) -> Overload<F...>;

#if SAM_AVX2_HALVES
// The 256-bit halves of a 16-lane output vector that hold any of the `left` outputs still
// wanted in its row: the upper half only where more than eight are left. The callbacks store
// the first min(16, left) lanes, so a half past the row's end is never computed (it was an
// eighth of the conv at 56x56, 52x52, 104x104, half of it at 7x7) and is handed on as zeros.
inline int halves_needed(int64_t left) { return left > 8 ? 2 : 1; }

// Hands a 16-lane float output held as two 256-bit halves to emit: as the halves where emit
// takes them, emit(h, w0, lo, hi), else as one vec_t. GCC moves a 64-byte generic vector
// through the stack in 8- and 16-byte pieces in AVX2 builds; at a few channels that traffic
// in the sigmoid and the stores of the small maps was most of the forward's conv stage.
template <typename Emit>
inline void emit_halves(Emit& emit, int64_t h, int64_t w0, __m256 lo, __m256 hi) {
  if constexpr (std::is_invocable_v<Emit&, int64_t, int64_t, __m256, __m256>) {
    emit(h, w0, lo, hi);
  } else {
    vec_t<float> o;
    std::memcpy(&o, &lo, 32);
    std::memcpy(reinterpret_cast<char*>(&o) + 32, &hi, 32);
    emit(h, w0, o);
  }
}
#endif

// Correlation of the padded maps with w [P, KH, KW] (flipped taps if `flip`), output
// rows [h0, h1): emit(h, w0, acc) receives the raw sums of lanes w0 .. w0 + L - 1.
template <typename T, typename Emit>
inline void correlate_rows(const T* pad, int64_t P, const Pad& g, const T* w, bool flip, int64_t h0,
                           int64_t h1, Emit&& emit) {
  constexpr int64_t L = lanes<T>();
  const int64_t KK = g.KH * g.KW;
  // Every path sums the taps in the same order (map p, then tap column j, then tap row i),
  // so an output's bits do not depend on how the rows were split into calls and blocks
  // (bands, thread shares).
  auto tap = [&](int64_t p, int64_t i, int64_t j) {
    return flip ? w[p * KK + (g.KH - 1 - i) * g.KW + (g.KW - 1 - j)] : w[p * KK + i * g.KW + j];
  };
  int64_t h = h0;
  if (g.dil == 1 && g.KH == 7) {
    // 7 tap rows (CBAM's 7x7), dilation 1: eight output rows per sweep; per tap column the
    // fourteen input rows they reach are loaded once into registers and each is used by
    // every output row it reaches (14 loads per 56 multiply-adds instead of 56). Measured:
    // the small-map part 0.70-0.78x the time (forward of 8x1x104x104 / 8x1x26x26)
    constexpr int R = 8, KH = 7;
#if SAM_AVX2_HALVES
    if constexpr (std::is_same_v<T, float>) {
      // AVX2 builds (see SAM_AVX2_HALVES): each 16-lane output vector as two 256-bit halves,
      // input row by input row (each loaded once per tap column, used by the up to seven
      // output rows it reaches, in the same tap order per output), then handed to emit
      for (; h + R <= h1; h += R) {
        for (int64_t w0 = 0; w0 < g.W; w0 += L) {
          __m256 a[2][R];
          const int nh = halves_needed(g.W - w0);
          for (int k = 0; k < R; ++k) a[1][k] = _mm256_setzero_ps();
          for (int hh = 0; hh < nh; ++hh) {
            __m256 acc[R];
#pragma GCC unroll 8
            for (int k = 0; k < R; ++k) acc[k] = _mm256_setzero_ps();
            for (int64_t p = 0; p < P; ++p) {
              const T* base = pad + (p * g.Hp + h) * g.Wp + w0 + 8 * hh;
              for (int64_t j = 0; j < g.KW; ++j) {
#pragma GCC unroll 14
                for (int r = 0; r < KH + R - 1; ++r) {
                  const __m256 v = _mm256_loadu_ps(base + r * g.Wp + j);
#pragma GCC unroll 8
                  for (int k = 0; k < R; ++k)
                    if (r - k >= 0 && r - k < KH)
                      acc[k] = _mm256_add_ps(acc[k], _mm256_mul_ps(_mm256_set1_ps(tap(p, r - k, j)), v));
                }
              }
            }
            for (int k = 0; k < R; ++k) a[hh][k] = acc[k];
          }
          for (int k = 0; k < R; ++k) emit_halves(emit, h + k, w0, a[0][k], a[1][k]);
        }
      }
    }
#endif
    for (; h + R <= h1; h += R) {
      for (int64_t w0 = 0; w0 < g.W; w0 += L) {
        vec_t<T> a[R] = {};
        for (int64_t p = 0; p < P; ++p) {
          const T* base = pad + (p * g.Hp + h) * g.Wp + w0;
          for (int64_t j = 0; j < g.KW; ++j) {
            vec_t<T> v[KH + R - 1];
#pragma GCC unroll 14
            for (int r = 0; r < KH + R - 1; ++r) v[r] = vload(base + r * g.Wp + j);
#pragma GCC unroll 7
            for (int i = 0; i < KH; ++i) {
              const T wv = tap(p, i, j);
#pragma GCC unroll 8
              for (int k = 0; k < R; ++k) a[k] += wv * v[i + k];
            }
          }
        }
        for (int k = 0; k < R; ++k) emit(h + k, w0, a[k]);
      }
    }
  }
#if SAM_AVX2_HALVES
  if constexpr (std::is_same_v<T, float>) {
    // AVX2 builds: the four-row and one-row paths below as 256-bit halves, any kernel size
    // and dilation, the same tap order per output (channels_last bands are often fewer than
    // eight rows, so these carry most of its conv)
    auto rows = [&](auto r_t) {
      constexpr int R = decltype(r_t)::value;
      for (; h + R <= h1; h += R) {
        for (int64_t w0 = 0; w0 < g.W; w0 += L) {
          __m256 out[2][R];
          const int nh = halves_needed(g.W - w0);
          for (int k = 0; k < R; ++k) out[1][k] = _mm256_setzero_ps();
          for (int hh = 0; hh < nh; ++hh) {
            __m256 acc[R];
#pragma GCC unroll 4
            for (int k = 0; k < R; ++k) acc[k] = _mm256_setzero_ps();
            for (int64_t p = 0; p < P; ++p)
              for (int64_t j = 0; j < g.KW; ++j)
                for (int64_t i = 0; i < g.KH; ++i) {
                  const __m256 wv = _mm256_set1_ps(tap(p, i, j));
                  const T* src = pad + (p * g.Hp + h + i * g.dil) * g.Wp + w0 + j * g.dil + 8 * hh;
#pragma GCC unroll 4
                  for (int k = 0; k < R; ++k) acc[k] = _mm256_add_ps(acc[k], _mm256_mul_ps(wv, _mm256_loadu_ps(src + k * g.Wp)));
                }
            for (int k = 0; k < R; ++k) out[hh][k] = acc[k];
          }
          for (int k = 0; k < R; ++k) emit_halves(emit, h + k, w0, out[0][k], out[1][k]);
        }
      }
    };
    rows(std::integral_constant<int, 4>{});
    rows(std::integral_constant<int, 1>{});
  }
#endif
  for (; h + 4 <= h1; h += 4) {
    for (int64_t w0 = 0; w0 < g.W; w0 += L) {
      vec_t<T> a0 = {}, a1 = {}, a2 = {}, a3 = {};
      for (int64_t p = 0; p < P; ++p)
        for (int64_t j = 0; j < g.KW; ++j)
          for (int64_t i = 0; i < g.KH; ++i) {
            const T wv = tap(p, i, j);
            const T* src = pad + (p * g.Hp + h + i * g.dil) * g.Wp + w0 + j * g.dil;
            a0 += wv * vload(src);
            a1 += wv * vload(src + g.Wp);
            a2 += wv * vload(src + 2 * g.Wp);
            a3 += wv * vload(src + 3 * g.Wp);
          }
      emit(h, w0, a0);
      emit(h + 1, w0, a1);
      emit(h + 2, w0, a2);
      emit(h + 3, w0, a3);
    }
  }
  for (; h < h1; ++h) {
    for (int64_t w0 = 0; w0 < g.W; w0 += L) {
      vec_t<T> a0 = {};
      for (int64_t p = 0; p < P; ++p)
        for (int64_t j = 0; j < g.KW; ++j)
          for (int64_t i = 0; i < g.KH; ++i)
            a0 += tap(p, i, j) * vload(pad + (p * g.Hp + h + i * g.dil) * g.Wp + w0 + j * g.dil);
      emit(h, w0, a0);
    }
  }
}

// Small-map parameters of one SAM: conv weight [P, KH, KW], bias, affine norm.
template <typename T>
struct Gate {
  const T* w;
  int64_t P;
  Pad g;
  const T* bias;  // [1] or null
  const T* ns;    // norm scale [1] or null (then nsh is null too)
  const T* nsh;
};

// logits / attn rows [h0, h1) of one image from its padded pooled maps
template <typename T>
void gate_rows(const Gate<T>& q, const T* pad, int64_t h0, int64_t h1, T* logits, T* attn) {
  constexpr int64_t L = lanes<T>();
  const T b = q.bias ? q.bias[0] : T(0);
  const T ns = q.ns ? q.ns[0] : T(1), nsh = q.ns ? q.nsh[0] : T(0);
  const int64_t W = q.g.W;
  auto emit = [&](int64_t h, int64_t w0, vec_t<T> acc) {
    vec_t<T> l = acc + b;
    vec_t<T> a = vsigmoid(q.ns ? l * ns + nsh : l);
    const int64_t len = std::min<int64_t>(L, W - w0);
    if (len == L) {  // whole vectors stored as such (the lane loop became two memcpy calls)
      vstore(logits + h * W + w0, l);
      vstore(attn + h * W + w0, a);
      return;
    }
    for (int64_t k = 0; k < len; ++k) {
      logits[h * W + w0 + k] = l[k];
      attn[h * W + w0 + k] = a[k];
    }
  };
#if SAM_AVX2_HALVES
  if constexpr (std::is_same_v<T, float>) {
    // the same operations on the two halves (vsigmoid is vsigmoid8 per half in these builds)
    const __m256 vb = _mm256_set1_ps(b), vns = _mm256_set1_ps(ns), vnsh = _mm256_set1_ps(nsh);
    auto emit8 = [&](int64_t h, int64_t w0, __m256 lo, __m256 hi) {
      const __m256 l[2] = {_mm256_add_ps(lo, vb), _mm256_add_ps(hi, vb)};
      __m256 a[2];
      for (int i = 0; i < 2; ++i) a[i] = vsigmoid8(q.ns ? _mm256_add_ps(_mm256_mul_ps(l[i], vns), vnsh) : l[i]);
      float* lr = logits + h * W + w0;
      float* ar = attn + h * W + w0;
      const int64_t len = std::min<int64_t>(L, W - w0);
      if (len == L) {
        for (int i = 0; i < 2; ++i) _mm256_storeu_ps(lr + 8 * i, l[i]), _mm256_storeu_ps(ar + 8 * i, a[i]);
        return;
      }
      float lt[16], at[16];
      for (int i = 0; i < 2; ++i) _mm256_storeu_ps(lt + 8 * i, l[i]), _mm256_storeu_ps(at + 8 * i, a[i]);
      std::copy(lt, lt + len, lr);
      std::copy(at, at + len, ar);
    };
    correlate_rows<T>(pad, q.P, q.g, q.w, false, h0, h1, Overload{emit, emit8});
    return;
  }
#endif
  correlate_rows<T>(pad, q.P, q.g, q.w, false, h0, h1, emit);
}

// Backward of the small maps, in pieces that work on a band of rows.
// d logits of rows [h0, h1) into the zero-padded dlpad; adds the rows' shares of the
// bias / norm-scale / norm-shift gradients to par[0..2].
template <typename T>
void dlogits_rows(const Gate<T>& q, const T* dA, const T* attn, const T* logits, int64_t h0, int64_t h1, T* dlpad,
                  double* par) {
  const Pad& g = q.g;
  const T ns = q.ns ? q.ns[0] : T(1);
  double s_b = 0, s_ns = 0, s_nsh = 0;
  for (int64_t h = h0; h < h1; ++h) {
    T* drow = dlpad + (h + g.ph) * g.Wp + g.pw;
    for (int64_t w = 0; w < g.W; ++w) {
      const int64_t k = h * g.W + w;
      const T a = attn[k];
      const T dz = dA[k] * ((T(1) - a) * a);
      const T d = q.ns ? dz * ns : dz;
      s_nsh += double(dz);
      s_ns += double(dz) * double(logits[k]);
      s_b += double(d);
      drow[w] = d;
    }
  }
  par[0] += s_b;
  par[1] += s_ns;
  par[2] += s_nsh;
}

// grad weight share of d-logit rows [h0, h1): per tap, sum dl[h, w] * pooled[p, h + (i - rh) dil,
// w + (j - rw) dil] (pad: the padded pooled maps), added to gw[P * KH * KW]
template <typename T>
void dweight_rows(const Gate<T>& q, const T* pad, const T* dlpad, int64_t h0, int64_t h1, double* gw) {
  using V = vec_t<T>;
  constexpr int64_t L = lanes<T>();
  const Pad& g = q.g;
  const int64_t KK = g.KH * g.KW, Wr = g.Wp - 2 * g.pw;  // Wr: W rounded up to whole vectors
  // taps j0 .. j0 + NJ - 1 of tap row i, slot p, side by side: each tap's products in its own
  // pair of accumulators in the order of one tap alone (rows, then pairs of vectors, then
  // the last vector), the d-logit vectors loaded once for the NJ taps instead of once per tap
  // (two loads per multiply-add were the limit); per tap a0 + a1, its lanes summed in order,
  // so the same bits. Measured (raw backward, 1 thread, float32, paired, 36th session): 0.64-0.79x
  // the time at 8x1x26x26 - 8x1x104x104 (this function was 37 % of it at 8x1x56x56); AVX2
  // build 0.76-0.88x
  auto taps = [&](int64_t p, int64_t i, int64_t j0, auto nj_t) {
    constexpr int NJ = decltype(nj_t)::value;
    V a0[NJ], a1[NJ];
    for (int k = 0; k < NJ; ++k) a0[k] = a1[k] = V{};
    for (int64_t h = h0; h < h1; ++h) {
      const T* dr = dlpad + (h + g.ph) * g.Wp + g.pw;
      const T* pr = pad + (p * g.Hp + h + i * g.dil) * g.Wp + j0 * g.dil;
      int64_t w0 = 0;
      for (; w0 + 2 * L <= Wr; w0 += 2 * L) {
        const V d0 = vload(dr + w0), d1 = vload(dr + w0 + L);
#pragma GCC unroll 7
        for (int k = 0; k < NJ; ++k) {
          a0[k] += d0 * vload(pr + k * g.dil + w0);
          a1[k] += d1 * vload(pr + k * g.dil + w0 + L);
        }
      }
      for (; w0 < Wr; w0 += L) {
        const V d0 = vload(dr + w0);
#pragma GCC unroll 7
        for (int k = 0; k < NJ; ++k) a0[k] += d0 * vload(pr + k * g.dil + w0);
      }
    }
    for (int k = 0; k < NJ; ++k) {
      const V a = a0[k] + a1[k];
      double t = 0;
      for (int64_t l = 0; l < L; ++l) t += double(a[l]);
      gw[p * KK + i * g.KW + j0 + k] += t;
    }
  };
  for (int64_t p = 0; p < q.P; ++p)
    for (int64_t i = 0; i < g.KH; ++i) {
      int64_t j = 0;
#if SAM_AVX2_HALVES
      if constexpr (std::is_same_v<T, float>) {
        // AVX2 builds (see SAM_AVX2_HALVES): each 16-lane accumulator as two 256-bit halves,
        // the same sums per lane; the taps side by side as above, in blocks of 4 and 3 (16
        // registers), one half of the lanes per sweep. The generic `taps` here (its 7-tap
        // block needs 28 such registers) took 2.2-2.4x the time of a one-channel backward and
        // 1.24x at 8x64x56x56 (37th session, paired)
        auto taps8 = [&](int64_t j0, auto nj_t) {
          constexpr int NJ = decltype(nj_t)::value;
          float lanes16[NJ][16];
          for (int hh = 0; hh < 2; ++hh) {
            __m256 a0[NJ], a1[NJ];
            for (int k = 0; k < NJ; ++k) a0[k] = a1[k] = _mm256_setzero_ps();
            for (int64_t h = h0; h < h1; ++h) {
              const T* dr = dlpad + (h + g.ph) * g.Wp + g.pw + 8 * hh;
              const T* pr = pad + (p * g.Hp + h + i * g.dil) * g.Wp + j0 * g.dil + 8 * hh;
              int64_t w0 = 0;
              for (; w0 + 2 * L <= Wr; w0 += 2 * L) {
                const __m256 d0 = _mm256_loadu_ps(dr + w0), d1 = _mm256_loadu_ps(dr + w0 + L);
#pragma GCC unroll 4
                for (int k = 0; k < NJ; ++k) {
                  a0[k] = _mm256_add_ps(a0[k], _mm256_mul_ps(d0, _mm256_loadu_ps(pr + k * g.dil + w0)));
                  a1[k] = _mm256_add_ps(a1[k], _mm256_mul_ps(d1, _mm256_loadu_ps(pr + k * g.dil + w0 + L)));
                }
              }
              for (; w0 < Wr; w0 += L) {
                const __m256 d0 = _mm256_loadu_ps(dr + w0);
#pragma GCC unroll 4
                for (int k = 0; k < NJ; ++k)
                  a0[k] = _mm256_add_ps(a0[k], _mm256_mul_ps(d0, _mm256_loadu_ps(pr + k * g.dil + w0)));
              }
            }
            for (int k = 0; k < NJ; ++k) _mm256_storeu_ps(lanes16[k] + 8 * hh, _mm256_add_ps(a0[k], a1[k]));
          }
          for (int k = 0; k < NJ; ++k) {
            double t = 0;
            for (int l = 0; l < 16; ++l) t += double(lanes16[k][l]);
            gw[p * KK + i * g.KW + j0 + k] += t;
          }
        };
        for (; j + 4 <= g.KW; j += 4) taps8(j, std::integral_constant<int, 4>{});
        for (; j + 3 <= g.KW; j += 3) taps8(j, std::integral_constant<int, 3>{});
        for (; j < g.KW; ++j) taps8(j, std::integral_constant<int, 1>{});
      }
#endif
      for (; j + 7 <= g.KW; j += 7) taps(p, i, j, std::integral_constant<int, 7>{});
      for (; j + 3 <= g.KW; j += 3) taps(p, i, j, std::integral_constant<int, 3>{});
      for (; j < g.KW; ++j) taps(p, i, j, std::integral_constant<int, 1>{});
    }
}

// gradient of the max / mean maps, rows [h0, h1) (needs d logits of rows up to h1 + ph):
// transposed conv of dl (correlation with the flipped taps), summed over the slots of
// each kind, then divided by the tie count (max) or by C (mean). dmax / dmean: image maps.
template <typename T>
void dpooled_rows(const Gate<T>& q, const std::vector<int64_t>& kinds, const T* dlpad, const T* cnt, int64_t C,
                  int64_t h0, int64_t h1, T* dmax, T* dmean) {
  constexpr int64_t L = lanes<T>();
  const Pad& g = q.g;
  const int64_t W = g.W, KK = g.KH * g.KW;
  if (dmax) std::fill(dmax + h0 * W, dmax + h1 * W, T(0));
  if (dmean) std::fill(dmean + h0 * W, dmean + h1 * W, T(0));
  for (int64_t p = 0; p < q.P; ++p) {
    T* dst = kinds[p] == 0 ? dmax : dmean;
    auto emit = [&](int64_t h, int64_t w0, vec_t<T> acc) {
      const int64_t len = std::min<int64_t>(L, W - w0);
      for (int64_t k = 0; k < len; ++k) dst[h * W + w0 + k] += acc[k];
    };
#if SAM_AVX2_HALVES
    if constexpr (std::is_same_v<T, float>) {
      auto emit8 = [&](int64_t h, int64_t w0, __m256 lo, __m256 hi) {
        float* d = dst + h * W + w0;
        const int64_t len = std::min<int64_t>(L, W - w0);
        if (len == L) {
          _mm256_storeu_ps(d, _mm256_add_ps(_mm256_loadu_ps(d), lo));
          _mm256_storeu_ps(d + 8, _mm256_add_ps(_mm256_loadu_ps(d + 8), hi));
          return;
        }
        float t[16];
        _mm256_storeu_ps(t, lo);
        _mm256_storeu_ps(t + 8, hi);
        for (int64_t k = 0; k < len; ++k) d[k] += t[k];
      };
      correlate_rows<T>(dlpad, 1, g, q.w + p * KK, true, h0, h1, Overload{emit, emit8});
      continue;
    }
#endif
    correlate_rows<T>(dlpad, 1, g, q.w + p * KK, true, h0, h1, emit);
  }
  if (dmax)
    for (int64_t k = h0 * W; k < h1 * W; ++k) dmax[k] = dmax[k] / cnt[k];
  if (dmean)
    for (int64_t k = h0 * W; k < h1 * W; ++k) dmean[k] = dmean[k] / T(C);
}


}  // namespace
