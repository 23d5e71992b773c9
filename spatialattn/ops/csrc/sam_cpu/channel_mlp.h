// CBAM's channel MLP gate, forward and backward.
//
// Part of sam_cpu.cpp: the parts are included in order into one translation unit, each in the
// unit's anonymous namespace, and each uses the ones before it (see sam_cpu.cpp for the overview).
#pragma once

namespace {

// ================================================================ CBAM channel MLP gate
//
// gate [N, C] = sigmoid(sum_p mlp(pooled[p])), pooled [P, N, C] (the global_pool maps, in
// pool order), mlp = fc2(relu(fc1(v))) or, without fc2, fc1(v) alone (ultralytics' C -> C
// layer). Float32 / float64 (the pooled maps are in the compute dtype already). Each
// matrix-vector product is a dot product in kLanes lanes summed in a fixed order, and
// every parallel loop owns its outputs (no cross-thread sums): results do not depend on
// the thread count. Tiny problems (a few 100k multiply-adds) stay on one thread, where
// waking the pool would cost more than the work.

constexpr int64_t kMlpGrain = 1 << 15;  // multiply-adds per thread chunk, at least

// The MLP's vectors: mlp_vec_t<T>, kLanes (64 bytes) of T. AVX2 builds (SAM_AVX2_HALVES) have
// no register for a 64-byte vec_t: GCC kept the accumulators (then in lincomb) on the stack and moved
// every lane through xmm and general registers (perf: channel_mlp_backward at 1.3 G
// multiply-adds/s on one thread). There mlp_vec_t is VecHalves, the same lanes as two 32-byte
// vectors (lanes 0 to L/2 - 1, then the rest) that do have registers, with the same
// operations per lane; a lane sum starts with lo + hi as hreduce does, and reduce16 folds
// the halves in its order, so the bits are those of vec_t. The memory layout is vec_t's (64
// bytes, lanes in order).
#if SAM_AVX2_HALVES
template <typename T>
using mlp_vec_t = VecHalves<T>;
template <typename T>
inline T mlp_sum(VecHalves<T> v) {
  return hreduce<T, 32>(v.lo + v.hi, false);
}
template <typename T>
inline VecHalves<T> mlp_load(const T* p) {  // a half at a time (one 64-byte memcpy went
  VecHalves<T> v;                           // through the stack in 16-byte pieces)
  std::memcpy(&v.lo, p, 32);
  std::memcpy(&v.hi, p + 32 / sizeof(T), 32);
  return v;
}
#else
template <typename T>
using mlp_vec_t = vec_t<T>;
template <typename T>
inline T mlp_sum(vec_t<T> v) {
  return hreduce<T, 64>(v, false);
}
template <typename T>
inline vec_t<T> mlp_load(const T* p) {
  return vload(p);
}
#endif

template <typename T>
inline T dot_lanes(const T* a, const T* b, int64_t n) {
  using V = mlp_vec_t<T>;
  constexpr int64_t L = lanes<T>();
  V acc0 = V{}, acc1 = V{};
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    acc0 += mlp_load(a + i) * mlp_load(b + i);
    acc1 += mlp_load(a + i + L) * mlp_load(b + i + L);
  }
  if (i + L <= n) {
    acc0 += mlp_load(a + i) * mlp_load(b + i);
    i += L;
  }
  T s = mlp_sum<T>(acc0 + acc1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// AVX-512 builds: 32 vector registers hold the accumulators of more outputs than the 16 of
// AVX2 (VecHalves: two registers a vector). The MLP's products are bound by loads there
// (perf, 32x2048x128 on Zen 4: layer 1 stalled on its loads, 8 loads to 6 multiply-adds),
// so the kernels below share each load between more outputs.
#if defined(__AVX512F__)
constexpr bool kMlpWide = true;
#else
constexpr bool kMlpWide = false;
#endif

// An opaque use of v in a vector register: GCC then keeps a loaded vector in its register
// instead of loading it again at every use (which it did with the rows of dot_lanes_jk:
// twice the loads, perf)
template <typename V>
inline void in_register(V& v) {
#if defined(__AVX512F__)
  asm("" : "+v"(v));
#else
  (void)v;
#endif
}

// a scalar weight as the operand of products with vectors V: in AVX-512 builds broadcast once
// into a register (for several products), in AVX2 builds the scalar itself (VecHalves
// broadcast it per half; a broadcast first was 1.06x slower there)
template <typename V, typename T>
inline auto mlp_weight(T w) {
  if constexpr (kMlpWide) {
    V v = V{} + w;
    in_register(v);
    return v;
  } else {
    return w;
  }
}

// out[j * K + k] = dot_lanes(a + j * lda, b + k * ldb, n) for j < J, k < K, each with the
// order of sums of dot_lanes (the same bits); a load of a row of a serves K products, a load
// of b J
template <int J, int K, typename T>
inline void dot_lanes_jk(const T* a, int64_t lda, const T* b, int64_t ldb, int64_t n, T* out) {
  using V = mlp_vec_t<T>;
  constexpr int64_t L = lanes<T>();
  V acc[J][K][2];  // set one by one: `= {}` on the array zeroed a stack copy with rep stos
#pragma GCC unroll 4
  for (int j = 0; j < J; ++j)
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) acc[j][k][0] = acc[j][k][1] = V{};
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    V a0[J], a1[J];
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) {
      a0[j] = mlp_load(a + j * lda + i);
      a1[j] = mlp_load(a + j * lda + i + L);
      if constexpr (J > 1) {  // (one row: pinned, 1.17x slower at 1x1024x64)
        in_register(a0[j]);
        in_register(a1[j]);
      }
    }
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) {
      V b0 = mlp_load(b + k * ldb + i), b1 = mlp_load(b + k * ldb + i + L);
      if constexpr (J > 1) {
        in_register(b0);
        in_register(b1);
      }
#pragma GCC unroll 4
      for (int j = 0; j < J; ++j) {
        acc[j][k][0] += a0[j] * b0;
        acc[j][k][1] += a1[j] * b1;
      }
    }
  }
  const bool odd = i + L <= n;
  for (int j = 0; j < J; ++j)
    for (int k = 0; k < K; ++k) {
      const T* aj = a + j * lda;
      const T* bk = b + k * ldb;
      if (odd) acc[j][k][0] += mlp_load(aj + i) * mlp_load(bk + i);
      T s = mlp_sum<T>(acc[j][k][0] + acc[j][k][1]);
      for (int64_t m = i + (odd ? L : 0); m < n; ++m) s += aj[m] * bk[m];
      out[j * K + k] = s;
    }
}

// t[(c0 + j) * ld + q] = dot(W[c0 + j, :R], h[q, :R]) + bias[c0 + j] for j < 16 (float32,
// R a multiple of 16): the sixteen dot products reduced together
template <typename T>
inline bool dots16(const T* W, const T* hq, int64_t R, const T* bias, int64_t c0, T* t, int64_t ld, int64_t q) {
#ifdef SA_HAVE_REDUCE16
  if constexpr (std::is_same<T, float>::value) {
    using V = mlp_vec_t<float>;
    V acc[16];
    for (int j = 0; j < 16; ++j) {
      const float* w = W + (c0 + j) * R;
      V s0 = V{}, s1 = V{};
      int64_t r = 0;
      for (; r + 32 <= R; r += 32) {
        s0 += mlp_load(w + r) * mlp_load(hq + r);
        s1 += mlp_load(w + r + 16) * mlp_load(hq + r + 16);
      }
      if (r < R) s0 += mlp_load(w + r) * mlp_load(hq + r);
      acc[j] = s0 + s1;
    }
    float out[16];
    vstore(out, reduce16(acc, LaneSum{}));
    for (int j = 0; j < 16; ++j) t[(c0 + j) * ld + q] = out[j] + (bias ? bias[c0 + j] : 0.f);
    return true;
  }
#endif
  return false;
}

// Linear combinations of the same rows: out[m * os + j] = sum_k coef[m * cm + k * cs] * rows[k * rs + j]
// for m < M, j < width, k < K. Every lane is summed in order of k, from zero, or with `resume`
// from the value already in out (so a sum over k split into blocks of k, each resuming where
// the last stopped, has the bits of one pass). The M outputs share each load of a row; two
// vectors of width per output keep 4M accumulators (AVX2: 4M ymm registers) out of memory.
template <int M, typename T>
inline void lincomb_m(const T* coef, int64_t cs, int64_t cm, const T* rows, int64_t rs, int64_t K, int64_t width,
                      T* out, int64_t os, bool resume) {
  using V = mlp_vec_t<T>;
  constexpr int64_t L = lanes<T>();
  int64_t j = 0;
  for (; j + 2 * L <= width; j += 2 * L) {
    V acc[M][2];  // set one by one: `= {}` on the array zeroed a stack copy with rep stos
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      acc[m][0] = resume ? mlp_load(out + m * os + j) : V{};
      acc[m][1] = resume ? mlp_load(out + m * os + j + L) : V{};
    }
    const T* row = rows + j;
    const T* c = coef;
    for (int64_t k = 0; k < K; ++k, row += rs, c += cs) {
      const V r0 = mlp_load(row), r1 = mlp_load(row + L);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const T a = c[m * cm];
        acc[m][0] += a * r0;
        acc[m][1] += a * r1;
      }
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      vstore(out + m * os + j, acc[m][0]);
      vstore(out + m * os + j + L, acc[m][1]);
    }
  }
  if (j + L <= width) {
    V acc[M];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc[m] = resume ? mlp_load(out + m * os + j) : V{};
    const T* row = rows + j;
    const T* c = coef;
    for (int64_t k = 0; k < K; ++k, row += rs, c += cs) {
      const V r0 = mlp_load(row);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[m] += c[m * cm] * r0;
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) vstore(out + m * os + j, acc[m]);
    j += L;
  }
  for (; j < width; ++j)
    for (int m = 0; m < M; ++m) {
      T acc = resume ? out[m * os + j] : T(0);
      for (int64_t k = 0; k < K; ++k) acc += coef[m * cm + k * cs] * rows[k * rs + j];
      out[m * os + j] = acc;
    }
}

// lincomb_m for outputs [m0, m1): coefficients coef + m * cm, outputs out + m * os, in pairs
template <typename T>
inline void lincomb_rows(int64_t m0, int64_t m1, const T* coef, int64_t cs, int64_t cm, const T* rows, int64_t rs,
                         int64_t K, int64_t width, T* out, int64_t os, bool resume = false) {
  int64_t m = m0;
  for (; m + 2 <= m1; m += 2) lincomb_m<2>(coef + m * cm, cs, cm, rows, rs, K, width, out + m * os, os, resume);
  if (m < m1) lincomb_m<1>(coef + m * cm, cs, cm, rows, rs, K, width, out + m * os, os, resume);
}

inline int64_t mlp_grain(int64_t per_item) { return std::max<int64_t>(1, kMlpGrain / std::max<int64_t>(1, per_item)); }

// The channel MLP's forward in phases of independent items (channel_mlp_forward runs each
// through at::parallel_for; cbam_forward's one parallel region splits them by hand), every
// item writing its own outputs: layer1 (hidden units r), transpose (pooled vectors q, where
// layer 2 runs as lanes over q), layer2 (output channels, or blocks of 16 of them), combine
// (the gate logits of a range of channels, summed over the pooled kinds in pool order; no
// sigmoid).
template <typename T>
struct ChannelMlp {
  static constexpr int64_t L = lanes<T>();
  const T *v, *W1, *B1, *W2, *B2;  // pooled [Q, C], weight1 [R, C], bias1 [R], weight2 [C, R], bias2 [C]
  T *h, *g;                        // hidden [Q, R] (after the relu with two layers), gate logits [N, C]
  int64_t P, N, C, R, Q, Qp;
  bool two, by_q, blocks;
  // h transposed in blocks of L rows; layer 2 outputs [C][Qp] (lanes over q). Not zero-filled
  // (1 MB of t at 512 images: the memset was a tenth of the forward, perf): transpose writes
  // hT's lanes q < Q, layer 2 every element of t that combine reads. hT's padding lanes are
  // zeroed: their products land in t's padding, never read, but must not be slow denormals.
  std::unique_ptr<T[]> hT, t;

  ChannelMlp(const T* v_, const T* W1_, const T* B1_, const T* W2_, const T* B2_, T* h_, T* g_, int64_t P_,
             int64_t N_, int64_t C_, int64_t R_)
      : v(v_), W1(W1_), B1(B1_), W2(W2_), B2(B2_), h(h_), g(g_), P(P_), N(N_), C(C_), R(R_), Q(P_ * N_) {
    two = W2 != nullptr;
    Qp = (Q + L - 1) / L * L;
    // layer 2 as lanes over q (h transposed) where q fills the lanes, else as dot
    // products over r (few pooled vectors: one image)
    by_q = two && 2 * Q >= L;
    blocks = R % 16 == 0;
    if (by_q) {
      hT.reset(new T[Qp * R]);
      for (int64_t q = Q; q < Qp; ++q)
        for (int64_t r = 0; r < R; ++r) hT[((q / L) * R + r) * L + q % L] = T(0);
    }
    if (two) t.reset(new T[C * Qp]);
  }

  int64_t layer1_grain() const { return mlp_grain(Q * C); }
  // h[q + k, r] for k < k3 from the dot products a[k] (bias, then the relu with two layers)
  void out_hidden(int64_t q, int64_t k3, int64_t r, const T* a) {
    const T bias = B1 ? B1[r] : T(0);
    for (int64_t k = 0; k < k3; ++k) {
      const T z = a[k] + bias;
      h[(q + k) * R + r] = two ? (z > T(0) ? z : (z != z ? z : T(0))) : z;  // relu keeps NaN
    }
  }
  // hidden units [r0, r1): each weight row's dot products with up to three pooled vectors at a
  // time (one load of the row for three: with four, the 16 accumulators spilled in AVX2
  // builds; AVX-512 builds take two rows against three vectors); the rows in blocks of about
  // 256 KB, each block (in L2) passed by every group of pooled vectors (in L1) in turn, so
  // neither is read from memory once per row
  void layer1(int64_t r0, int64_t r1) {
    const int64_t rb = std::max<int64_t>(1, (256 << 10) / (int64_t(sizeof(T)) * std::max<int64_t>(1, C)));
    T a[3];
    for (int64_t rs = r0; rs < r1; rs += rb) {
      const int64_t re = std::min(r1, rs + rb);
      for (int64_t q = 0; q < Q; q += 3) {
        const int64_t k3 = std::min<int64_t>(3, Q - q);
        int64_t r = rs;
        if (kMlpWide && k3 == 3) {  // two rows at a time (12 accumulators)
          T a2[6];
          for (; r + 2 <= re; r += 2) {
            dot_lanes_jk<2, 3>(W1 + r * C, C, v + q * C, C, C, a2);
            out_hidden(q, 3, r, a2);
            out_hidden(q, 3, r + 1, a2 + 3);
          }
        }
        for (; r < re; ++r) {
          switch (k3) {
            case 3: dot_lanes_jk<1, 3>(W1 + r * C, C, v + q * C, C, C, a); break;
            case 2: dot_lanes_jk<1, 2>(W1 + r * C, C, v + q * C, C, C, a); break;
            default: a[0] = dot_lanes(W1 + r * C, v + q * C, C);
          }
          out_hidden(q, k3, r, a);
        }
      }
    }
  }

  // by_q: hT[(qb * R + r) * L + l] = h[qb * L + l, r] for q = qb * L + l in [q0, q1)
  void transpose(int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q)
      for (int64_t r = 0; r < R; ++r) hT[((q / L) * R + r) * L + q % L] = h[q * R + r];
  }

  // by_q, layer 2 of one channel (weight2's row w) for J blocks of q from qb: each block's
  // lanes summed over r in four accumulators (r % 4), added as ((0 + 1) + (2 + 3)) + bias,
  // whatever J (the same bits)
  template <int J>
  void layer2_blocks(const T* w, int64_t qb, T bias, T* tc) {
    using V = mlp_vec_t<T>;
    V acc[J][4];
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j)
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) acc[j][k] = V{};
    const T* hb = hT.get() + qb * R * L;
    int64_t r = 0;
    for (; r + 4 <= R; r += 4)
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) {
        const auto wk = mlp_weight<V>(w[r + k]);  // one operand for the J blocks
#pragma GCC unroll 4
        for (int j = 0; j < J; ++j) acc[j][k] += wk * mlp_load(hb + j * R * L + (r + k) * L);
      }
    // the last R % 4 rows into acc[j][0], [1], [2] (constant indices: the accumulators stay
    // in registers)
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) {
      const T* hj = hb + j * R * L;
      if (r < R) acc[j][0] += w[r] * mlp_load(hj + r * L);
      if (r + 1 < R) acc[j][1] += w[r + 1] * mlp_load(hj + (r + 1) * L);
      if (r + 2 < R) acc[j][2] += w[r + 2] * mlp_load(hj + (r + 2) * L);
      vstore(tc + (qb + j) * L, ((acc[j][0] + acc[j][1]) + (acc[j][2] + acc[j][3])) + bias);
    }
  }

  int64_t layer2_items() const { return !two ? 0 : by_q ? C : (C + 15) / 16; }
  int64_t layer2_grain() const { return by_q ? mlp_grain(Qp * R) : mlp_grain(16 * Q * R); }
  void layer2(int64_t b0, int64_t b1) {
    if (by_q) {
      for (int64_t c = b0; c < b1; ++c) {
        const T* w = W2 + c * R;
        const T bias = B2 ? B2[c] : T(0);
        T* tc = t.get() + c * Qp;
        const int64_t nqb = Qp / L;
        int64_t qb = 0;
        if constexpr (kMlpWide) {  // four blocks of q at a time, one load of w[r] for four (16 accumulators)
          for (; qb + 4 <= nqb; qb += 4) layer2_blocks<4>(w, qb, bias, tc);
          if (qb + 2 <= nqb) {
            layer2_blocks<2>(w, qb, bias, tc);
            qb += 2;
          }
        }
        for (; qb < nqb; ++qb) layer2_blocks<1>(w, qb, bias, tc);
      }
      return;
    }
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t q = 0; q < Q; ++q) {
        if (blocks && b * 16 + 16 <= C && dots16(W2, h + q * R, R, B2, b * 16, t.get(), Qp, q)) continue;
        for (int64_t c = b * 16; c < std::min(C, b * 16 + 16); ++c)
          t[c * Qp + q] = dot_lanes(W2 + c * R, h + q * R, R) + (B2 ? B2[c] : T(0));
      }
  }

  int64_t combine_grain() const { return std::max<int64_t>(16, mlp_grain(N * P * 8)); }
  // gate logits of channels [c0, c1) of every image: the sum over the pooled kinds, in pool
  // order (needs layer 2 of those channels only: cbam_forward runs it in the thread that
  // computed them). In tiles of 16 channels x 16 images: t's rows (channels) are Qp values
  // apart, 4 KB at 512 images (Qp 1024), so every row falls into the same L1 sets, and image
  // by image over all channels each line of t was read 16 times from L2, one element each
  // time (perf: a fifth of the forward at 512x256x7x7, 1024 pooled vectors).
  void combine(int64_t c0, int64_t c1) {
    constexpr int64_t TB = 16;
    T tile[TB * TB];
    for (int64_t cb = c0; cb < c1; cb += TB) {
      const int64_t ce = std::min(c1, cb + TB);
      for (int64_t nb = 0; nb < N; nb += TB) {
        const int64_t ne = std::min(N, nb + TB);
        if (two && ne - nb == TB) {  // the same sums, a row of the tile in vectors
          using V = vec_t<T>;
          for (int64_t c = cb; c < ce; ++c)
            for (int64_t j = 0; j < TB; j += L) {
              V s = vload(t.get() + c * Qp + nb + j);
              for (int64_t p = 1; p < P; ++p) s = s + vload(t.get() + c * Qp + p * N + nb + j);
              vstore(tile + (c - cb) * TB + j, s);
            }
        } else {
          for (int64_t c = cb; c < ce; ++c)
            for (int64_t n = nb; n < ne; ++n) {
              T s = 0;
              for (int64_t p = 0; p < P; ++p) {
                const int64_t q = p * N + n;
                const T v2 = two ? t[c * Qp + q] : h[q * R + c];
                s = p == 0 ? v2 : s + v2;
              }
              tile[(c - cb) * TB + (n - nb)] = s;
            }
        }
        for (int64_t n = nb; n < ne; ++n)
          for (int64_t c = cb; c < ce; ++c) g[n * C + c] = tile[(c - cb) * TB + (n - nb)];
      }
    }
  }
  // the first channel of layer-2 item b (C for b = layer2_items()): items [b0, b1) make
  // channels [item_channel(b0), item_channel(b1))
  int64_t item_channel(int64_t b) const { return by_q ? b : std::min(C, b * 16); }
};

Tensor mlp_checked(const Tensor& t, at::ScalarType dtype, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.scalar_type() == dtype, "spatialattn: channel_mlp_gate: ", name, " has dtype ", t.scalar_type(),
              ", expected ", dtype);
  TORCH_CHECK(t.sizes() == shape, "spatialattn: channel_mlp_gate: ", name, " has shape ", t.sizes(),
              ", expected ", shape);
  return t.contiguous();
}

// the channel MLP's parameters, checked against C channels and `dtype`
struct MlpParams {
  Tensor w1, b1, w2, b2;  // contiguous; b1 / w2 / b2 undefined where absent
  int64_t R;
  bool two;
};

MlpParams mlp_params(at::ScalarType dtype, int64_t C, const Tensor& w1_in, const optional<Tensor>& b1_in,
                     const optional<Tensor>& w2_in, const optional<Tensor>& b2_in) {
  MlpParams m;
  m.two = w2_in.has_value() && w2_in->defined();
  TORCH_CHECK(w1_in.dim() == 2, "spatialattn: channel_mlp_gate: weight1 must be [R, C], got ", w1_in.sizes());
  m.R = w1_in.size(0);
  m.w1 = mlp_checked(w1_in, dtype, "weight1", {m.R, C});
  if (!m.two)
    TORCH_CHECK(m.R == C, "spatialattn: channel_mlp_gate: a single layer must map ", C, " channels to ", C,
                ", got weight1 of shape ", w1_in.sizes());
  if (b1_in.has_value() && b1_in->defined()) m.b1 = mlp_checked(*b1_in, dtype, "bias1", {m.R});
  if (m.two) m.w2 = mlp_checked(*w2_in, dtype, "weight2", {C, m.R});
  if (b2_in.has_value() && b2_in->defined()) {
    TORCH_CHECK(m.two, "spatialattn: channel_mlp_gate: bias2 without weight2");
    m.b2 = mlp_checked(*b2_in, dtype, "bias2", {C});
  }
  return m;
}

// -> {gate [N, C], hidden [P, N, R] after the relu (two layers and `keep_hidden`; else undefined)}
std::vector<Tensor> channel_mlp_forward(const Tensor& pooled_in, const Tensor& w1_in, const optional<Tensor>& b1_in,
                                        const optional<Tensor>& w2_in, const optional<Tensor>& b2_in,
                                        bool keep_hidden) {
  TORCH_CHECK(pooled_in.dim() == 3, "spatialattn: channel_mlp_gate: pooled must be [P, N, C], got ",
              pooled_in.sizes());
  TORCH_CHECK(pooled_in.scalar_type() == at::kFloat || pooled_in.scalar_type() == at::kDouble,
              "spatialattn: channel_mlp_gate: float32 or float64 only, got ", pooled_in.scalar_type());
  const Tensor pooled = pooled_in.contiguous();
  const int64_t P = pooled.size(0), N = pooled.size(1), C = pooled.size(2), Q = P * N;
  const MlpParams mp = mlp_params(pooled.scalar_type(), C, w1_in, b1_in, w2_in, b2_in);
  const Tensor &w1 = mp.w1, &b1 = mp.b1, &w2 = mp.w2, &b2 = mp.b2;
  const int64_t R = mp.R;
  const bool two = mp.two;
  Tensor gate = at::empty({N, C}, pooled.options());
  Tensor hidden = at::empty({Q, R}, pooled.options());  // layer 1 output (relu'd with two layers)
  if (N * C == 0) return {gate, two && keep_hidden ? hidden.view({P, N, R}) : Tensor()};
  AT_DISPATCH_FLOATING_TYPES(pooled.scalar_type(), "channel_mlp_forward", [&] {
    using T = scalar_t;
    ChannelMlp<T> mlp(pooled.data_ptr<T>(), w1.data_ptr<T>(), dptr<T>(b1), dptr<T>(w2), dptr<T>(b2),
                      hidden.data_ptr<T>(), gate.data_ptr<T>(), P, N, C, R);
    at::parallel_for(0, R, mlp.layer1_grain(), [&](int64_t b, int64_t e) { mlp.layer1(b, e); });
    if (mlp.by_q) mlp.transpose(0, Q);
    at::parallel_for(0, mlp.layer2_items(), mlp.layer2_grain(), [&](int64_t b, int64_t e) { mlp.layer2(b, e); });
    at::parallel_for(0, C, mlp.combine_grain(), [&](int64_t b, int64_t e) { mlp.combine(b, e); });
  });
  gate.sigmoid_();  // torch's own (vectorised) sigmoid: the same values as the reference
  return {gate, two && keep_hidden ? hidden.view({P, N, R}) : Tensor()};
}

// gradients of channel_mlp_forward from the gradient [N, C] of its gate; `needs`: which of
// (pooled, weight1, bias1, weight2, bias2) want one -> those five (undefined where not asked)
std::vector<Tensor> channel_mlp_backward(const Tensor& grad_in, const Tensor& gate, const Tensor& pooled_in,
                                         const Tensor& w1_in, const optional<Tensor>& w2_in,
                                         const optional<Tensor>& hidden_in, std::vector<bool> needs) {
  TORCH_CHECK(needs.size() == 5, "spatialattn: channel_mlp_backward: needs five flags");
  const Tensor pooled = pooled_in.contiguous();
  const int64_t P = pooled.size(0), N = pooled.size(1), C = pooled.size(2), Q = P * N;
  const int64_t R = w1_in.size(0);
  const bool two = w2_in.has_value() && w2_in->defined();
  TORCH_CHECK(!two || (hidden_in.has_value() && hidden_in->defined()),
              "spatialattn: channel_mlp_backward: two layers need the saved hidden activations");
  const Tensor grad = mlp_checked(grad_in, pooled.scalar_type(), "grad", {N, C});
  const Tensor g = mlp_checked(gate, pooled.scalar_type(), "gate", {N, C});
  const Tensor w1 = mlp_checked(w1_in, pooled.scalar_type(), "weight1", {R, C});
  Tensor w2, hidden;
  if (two) {
    w2 = mlp_checked(*w2_in, pooled.scalar_type(), "weight2", {C, R});
    hidden = mlp_checked(*hidden_in, pooled.scalar_type(), "hidden", {P, N, R});
  }
  auto opts = pooled.options();
  Tensor gp = needs[0] ? at::empty({P, N, C}, opts) : Tensor();
  Tensor gw1 = needs[1] ? at::empty({R, C}, opts) : Tensor();
  Tensor gb1 = needs[2] ? at::empty({R}, opts) : Tensor();
  Tensor gw2 = two && needs[3] ? at::empty({C, R}, opts) : Tensor();
  Tensor gb2 = two && needs[4] ? at::empty({C}, opts) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(pooled.scalar_type(), "channel_mlp_backward", [&] {
    using T = scalar_t;
    // dl = d(logits) [N, C]; dh = d(layer 1 output) [Q, R]
    // (the loops over [N, C] in parallel or row by row, not down the columns: at 512 images the
    // serial, strided sums held the other thread waiting for most of the backward, perf)
    std::unique_ptr<T[]> dl(new T[N * C]);  // (every element written below: not zero-filled)
    std::vector<T> dh(Q * R, T(0));
    const T *gy = grad.data_ptr<T>(), *gt = g.data_ptr<T>();
    at::parallel_for(0, N * C, 1 << 14, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) dl[i] = gy[i] * (T(1) - gt[i]) * gt[i];
    });
    if (two) {
      const T *W2 = w2.data_ptr<T>(), *h = hidden.data_ptr<T>();
      std::vector<T> hs(N * R, T(0)), dhs(N * R);  // hidden summed over the pools
      for (int64_t q = 0; q < Q; ++q)
        for (int64_t r = 0; r < R; ++r) hs[(q % N) * R + r] += h[q * R + r];
      if (gb2.defined()) {  // o[c] = (sum over n in order, from zero) * P
        T* o = gb2.data_ptr<T>();
        at::parallel_for(0, C, 256, [&](int64_t c0, int64_t c1) {
          std::fill(o + c0, o + c1, T(0));
          for (int64_t n = 0; n < N; ++n)
            for (int64_t c = c0; c < c1; ++c) o[c] += dl[n * C + c];
          for (int64_t c = c0; c < c1; ++c) o[c] *= T(P);
        });
      }
      if (gw2.defined()) {  // gw2[c, :] = sum_n dl[n, c] hs[n, :]
        T* o = gw2.data_ptr<T>();
        at::parallel_for(0, C, mlp_grain(N * R), [&](int64_t c0, int64_t c1) {
          lincomb_rows(c0, c1, dl.get(), C, 1, hs.data(), R, N, R, o, R);
        });
      }
      if (needs[0] || needs[1] || needs[2]) {  // dhs[n, :] = sum_c dl[n, c] W2[c, :]
        // in blocks of rows of W2 that stay in the cache for every image of the chunk (W2 is
        // 1 MB at 2048 x 128: read once per chunk from memory, not once per image)
        const int64_t kb = std::max<int64_t>(16, (64 << 10) / (int64_t(sizeof(T)) * std::max<int64_t>(1, R)));
        at::parallel_for(0, N, mlp_grain(C * R), [&](int64_t n0, int64_t n1) {
          for (int64_t k0 = 0; k0 < C; k0 += kb)
            lincomb_rows(n0, n1, dl.get() + k0, 1, C, W2 + k0 * R, R, std::min(kb, C - k0), R, dhs.data(), R,
                         k0 > 0);
        });
        for (int64_t q = 0; q < Q; ++q)
          for (int64_t r = 0; r < R; ++r) dh[q * R + r] = h[q * R + r] > T(0) ? dhs[(q % N) * R + r] : T(0);
      }
    } else {
      for (int64_t q = 0; q < Q; ++q)  // one layer: the hidden width is C, dh the logits' gradient
        std::copy(dl.get() + (q % N) * C, dl.get() + (q % N + 1) * C, dh.begin() + q * R);
    }
    if (gb1.defined()) {
      T* o = gb1.data_ptr<T>();
      std::fill(o, o + R, T(0));  // o[r] = sum over q in order, from zero
      for (int64_t q = 0; q < Q; ++q)
        for (int64_t r = 0; r < R; ++r) o[r] += dh[q * R + r];
    }
    if (needs[0] || needs[1]) {
      // layer 1 in column blocks: each block owns its columns of grad_weight1 and grad_pooled
      const T *v = pooled.data_ptr<T>(), *W1 = w1.data_ptr<T>();
      T *ogp = dptr<T>(gp), *ogw = dptr<T>(gw1);
      // dh transposed (dhT[r, q]) so that both sums read their coefficients contiguously
      std::vector<T> dhT(R * Q);
      for (int64_t r = 0; r < R; ++r)  // (rows Q apart: written one row at a time)
        for (int64_t q = 0; q < Q; ++q) dhT[r * Q + q] = dh[q * R + r];
      constexpr int64_t kCols = 2 * lanes<T>();  // lincomb_m's widest step
      const int64_t nb = (C + kCols - 1) / kCols;
      at::parallel_for(0, nb, mlp_grain(Q * R * kCols * 2), [&](int64_t b0, int64_t b1) {
        // the block's columns of pooled and weight1 copied to contiguous rows where many rows
        // at a long stride are read by several outputs: at a row stride of C floats (8 KB at
        // C = 2048) every row falls into the same sets of L1, which then holds 8 of them, and
        // each pass over the rows came from L2
        const bool wide = C * int64_t(sizeof(T)) >= 2048;
        const bool pack_v = ogw && wide && Q > 8, pack_w = ogp && wide && R > 8 && Q >= 4;
        std::vector<T> vp(pack_v ? Q * kCols : 0), wp(pack_w ? R * kCols : 0);
        const auto rows_of = [&](const T* src, int64_t n, int64_t c0, int64_t w, std::vector<T>& buf) {
          if (buf.empty()) return std::make_pair(src + c0, C);
          for (int64_t i = 0; i < n; ++i) std::copy(src + i * C + c0, src + i * C + c0 + w, buf.data() + i * kCols);
          return std::make_pair(static_cast<const T*>(buf.data()), kCols);
        };
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t c0 = b * kCols, w = std::min(kCols, C - c0);
          if (ogw) {  // gw1[r, :] = sum_q dh[q, r] v[q, :]
            const auto [rows, rs] = rows_of(v, Q, c0, w, vp);
            lincomb_rows(0, R, dhT.data(), 1, Q, rows, rs, Q, w, ogw + c0, C);
          }
          if (ogp) {  // gp[q, :] = sum_r dh[q, r] W1[r, :]
            const auto [rows, rs] = rows_of(W1, R, c0, w, wp);
            lincomb_rows(0, Q, dh.data(), 1, R, rows, rs, R, w, ogp + c0, C);
          }
        }
      });
    }
  });
  return {gp, gw1, gb1, gw2, gb2};
}


}  // namespace
