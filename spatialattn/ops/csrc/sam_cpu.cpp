// Fused CPU kernels for CBAM spatial attention (SAM).
//
// Built on first use by spatialattn.ops._cpp (torch.utils.cpp_extension.load).
// float32 / float64, NCHW-contiguous or channels_last-contiguous inputs. Plain
// loops written so that the compiler vectorises them (independent lanes, no
// reassociation needed, no -ffast-math: NaN must propagate); threads through
// at::parallel_for (torch's own OpenMP pool).
//
// Notation: x [N, C, H, W], s = optional channel scale [N, C] (x' = x * s),
// a = spatial gate [N, HW], "kinds" = pooling order, 0 = max, 1 = mean.
// Semantics follow spatialattn/ops/reference.py (amax: the gradient at ties is
// split evenly between the tied channels).

#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <unistd.h>
#include <vector>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace {

using at::Tensor;
using std::optional;

constexpr int64_t kLanes = 32;  // two AVX-512 float accumulators: breaks the add latency chain

template <typename T>
inline T vmax(T m, T v) {
  // compiles to a vector max; drops NaN (like maxps). NaN is restored afterwards:
  // a NaN in the channels makes the (always computed) sum NaN, and only then
  // the channels are scanned again (see fix_nan_max).
  return v > m ? v : m;
}

// x' at one pixel: channel c at x[c * cstride] * s[c]; true if one is NaN.
template <typename T>
bool any_nan(const T* x, const T* s, int64_t C, int64_t cstride) {
  for (int64_t c = 0; c < C; ++c) {
    T v = s ? x[c * cstride] * s[c] : x[c * cstride];
    if (v != v) return true;
  }
  return false;
}

// Non-temporal stores pay once input + output do not fit in the last-level cache
// (PERF-NOTES: 2.7x -> 1.35x clone there) and hurt when they do (measured here: an
// 11 MB multiply went from 1.2x to 2.2x clone with them). The threshold is the
// last-level cache size the C library reports (32 MiB if it does not); adjustable at
// run time (spatialattn.ops._cpp.get().set_stream_bytes, a negative value restores
// the default) for measurements.
int64_t kStreamBytes = -1;

inline int64_t stream_threshold() {
  if (kStreamBytes >= 0) return kStreamBytes;
  static const int64_t llc = [] {
    long v = -1;
#if defined(_SC_LEVEL3_CACHE_SIZE)
    v = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    return v > 0 ? int64_t(v) : int64_t(32) << 20;
  }();
  return llc;
}

// input + output of `elems` elements each do not fit in the last-level cache
template <typename T>
inline bool use_stream(int64_t elems) {
  return 2 * elems * int64_t(sizeof(T)) > stream_threshold();
}

inline void stream_fence(bool stream) {
#if defined(__SSE2__)
  if (stream) _mm_sfence();
#else
  (void)stream;
#endif
}

// d[i] = (x[i] * s) * a with s = sv[i] or ss, a = av[i] or as; (x * s) is rounded first,
// as in the reference. With `stream`, float rows use non-temporal stores.
template <typename T>
inline void mul_row(T* d, const T* x, const T* sv, T ss, const T* av, T as, int64_t n, bool stream) {
  int64_t i = 0;
#if defined(__AVX512F__)
  if (stream && std::is_same<T, float>::value) {
    float* df = reinterpret_cast<float*>(d);
    const float* xf = reinterpret_cast<const float*>(x);
    const float* svf = reinterpret_cast<const float*>(sv);
    const float* avf = reinterpret_cast<const float*>(av);
    for (; i < n && (reinterpret_cast<uintptr_t>(df + i) & 63); ++i)
      d[i] = (x[i] * (sv ? sv[i] : ss)) * (av ? av[i] : as);
    const __m512 vss = _mm512_set1_ps(float(ss)), vas = _mm512_set1_ps(float(as));
    for (; i + 16 <= n; i += 16) {
      __m512 xs = _mm512_mul_ps(_mm512_loadu_ps(xf + i), sv ? _mm512_loadu_ps(svf + i) : vss);
      _mm512_stream_ps(df + i, _mm512_mul_ps(xs, av ? _mm512_loadu_ps(avf + i) : vas));
    }
  }
#endif
  (void)stream;
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

// ---------------------------------------------------------------- pooling
// mx / mean: outputs with batch stride `obs` (HW each image); either may be null.
template <typename T>
void k_pool(const T* x, const T* s, int64_t N, int64_t C, int64_t HW, bool nhwc,
            T* mx, T* mean, int64_t obs) {
  // the mean divides like torch (sum / C), not by multiplying with 1 / C
  if (!nhwc) {
    const int64_t chunk = pixel_chunk(N, HW);
    const int64_t nchunks = (HW + chunk - 1) / chunk;
    at::parallel_for(0, N * nchunks, 1, [&](int64_t b, int64_t e) {
      std::vector<T> m(chunk), sm(chunk);
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = t / nchunks, p0 = (t % nchunks) * chunk;
        const int64_t len = std::min(chunk, HW - p0);
        const T* xn = x + n * C * HW + p0;
        T* mp = m.data();
        T* sp = sm.data();
        {
          const T sc = s ? s[n * C] : T(1);
          for (int64_t i = 0; i < len; ++i) {
            T v = xn[i] * sc;
            mp[i] = v;
            sp[i] = v;
          }
        }
        int64_t c = 1;
        // four channels per sweep over the accumulators; the sum keeps the
        // sequential channel order (((s + v0) + v1) + v2) + v3
        for (; c + 4 <= C; c += 4) {
          const T* r0 = xn + c * HW;
          const T* r1 = r0 + HW;
          const T* r2 = r1 + HW;
          const T* r3 = r2 + HW;
          const T* sn = s ? s + n * C + c : nullptr;
          const T s0 = sn ? sn[0] : T(1), s1 = sn ? sn[1] : T(1), s2 = sn ? sn[2] : T(1), s3 = sn ? sn[3] : T(1);
          for (int64_t i = 0; i < len; ++i) {
            T v0 = r0[i] * s0, v1 = r1[i] * s1, v2 = r2[i] * s2, v3 = r3[i] * s3;
            mp[i] = vmax(vmax(mp[i], v0), vmax(vmax(v1, v2), v3));
            sp[i] = sp[i] + v0 + v1 + v2 + v3;
          }
        }
        for (; c < C; ++c) {
          const T* row = xn + c * HW;
          const T sc = s ? s[n * C + c] : T(1);
          for (int64_t i = 0; i < len; ++i) {
            T v = row[i] * sc;
            mp[i] = vmax(mp[i], v);
            sp[i] += v;
          }
        }
        if (mx) {
          for (int64_t i = 0; i < len; ++i) {
            if (sp[i] != sp[i] && any_nan(xn + i, s ? s + n * C : nullptr, C, HW))
              mp[i] = std::numeric_limits<T>::quiet_NaN();
          }
          std::copy(mp, mp + len, mx + n * obs + p0);
        }
        if (mean) {
          T* o = mean + n * obs + p0;
          for (int64_t i = 0; i < len; ++i) o[i] = sp[i] / T(C);
        }
      }
    });
  } else {
    at::parallel_for(0, N * HW, 256, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        const int64_t n = p / HW, q = p % HW;
        const T* row = x + p * C;
        const T* sr = s ? s + n * C : nullptr;
        T m, sum;
        int64_t c = 0;
        if (C >= kLanes) {
          T ml[kLanes], sl[kLanes];
          for (int64_t l = 0; l < kLanes; ++l) {
            T v = sr ? row[l] * sr[l] : row[l];
            ml[l] = v;
            sl[l] = v;
          }
          for (c = kLanes; c + kLanes <= C; c += kLanes) {
            if (sr) {
              for (int64_t l = 0; l < kLanes; ++l) {
                T v = row[c + l] * sr[c + l];
                ml[l] = vmax(ml[l], v);
                sl[l] += v;
              }
            } else {
              for (int64_t l = 0; l < kLanes; ++l) {
                T v = row[c + l];
                ml[l] = vmax(ml[l], v);
                sl[l] += v;
              }
            }
          }
          m = ml[0];
          sum = sl[0];
          for (int64_t l = 1; l < kLanes; ++l) {
            m = vmax(m, ml[l]);
            sum += sl[l];
          }
        } else {
          m = sr ? row[0] * sr[0] : row[0];
          sum = m;
          c = 1;
        }
        for (; c < C; ++c) {
          T v = sr ? row[c] * sr[c] : row[c];
          m = vmax(m, v);
          sum += v;
        }
        if (sum != sum && any_nan(row, sr, C, 1)) m = std::numeric_limits<T>::quiet_NaN();
        if (mx) mx[n * obs + q] = m;
        if (mean) mean[n * obs + q] = sum / T(C);
      }
    });
  }
}

// ---------------------------------------------------------------- y = (x * s) * a
template <typename T>
void k_mul(const T* x, const T* s, const T* a, T* y, int64_t N, int64_t C, int64_t HW, bool nhwc, bool stream) {
  if (!nhwc) {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(HW, 1));
    at::parallel_for(0, N * C, grain, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t n = r / C;
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

// ---------------------------------------------------------------- backward pass A
// ga[p] = sum_c g * x'   (if g);   cnt[p] = #{c : x' == mx[p]}   (if mx).
template <typename T>
void k_reduce(const T* x, const T* s, const T* g, bool gc, const T* mx, int64_t mbs, int64_t N, int64_t C,
              int64_t HW, bool nhwc, T* ga, T* cnt) {
  // gc: g is one value broadcast to every element (e.g. the gradient of y.sum())
  const T gv = (g && gc) ? g[0] : T(0);
  if (!nhwc) {
    const int64_t chunk = pixel_chunk(N, HW);
    const int64_t nchunks = (HW + chunk - 1) / chunk;
    at::parallel_for(0, N * nchunks, 1, [&](int64_t b, int64_t e) {
      std::vector<T> acc(chunk), cn(chunk);
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = t / nchunks, p0 = (t % nchunks) * chunk;
        const int64_t len = std::min(chunk, HW - p0);
        T* ap = acc.data();
        T* cp = cn.data();
        std::fill(ap, ap + len, T(0));
        std::fill(cp, cp + len, T(0));
        const T* mp = mx ? mx + n * mbs + p0 : nullptr;
        int64_t c = 0;
        if (g && !gc && mp) {
          // four channels per sweep over the accumulators, sequential summation order
          for (; c + 4 <= C; c += 4) {
            const int64_t off = (n * C + c) * HW + p0;
            const T* x0 = x + off;
            const T* g0 = g + off;
            const T* sn = s ? s + n * C + c : nullptr;
            const T s0 = sn ? sn[0] : T(1), s1 = sn ? sn[1] : T(1), s2 = sn ? sn[2] : T(1), s3 = sn ? sn[3] : T(1);
            for (int64_t i = 0; i < len; ++i) {
              T v0 = x0[i] * s0, v1 = x0[i + HW] * s1, v2 = x0[i + 2 * HW] * s2, v3 = x0[i + 3 * HW] * s3;
              const T m = mp[i];
              ap[i] = ap[i] + g0[i] * v0 + g0[i + HW] * v1 + g0[i + 2 * HW] * v2 + g0[i + 3 * HW] * v3;
              cp[i] = cp[i] + ((v0 == m) ? T(1) : T(0)) + ((v1 == m) ? T(1) : T(0)) + ((v2 == m) ? T(1) : T(0)) +
                      ((v3 == m) ? T(1) : T(0));
            }
          }
        }
        for (; c < C; ++c) {
          const int64_t off = (n * C + c) * HW + p0;
          const T* xr = x + off;
          const T sc = s ? s[n * C + c] : T(1);
          if (g && !gc && mp) {
            const T* gr = g + off;
            for (int64_t i = 0; i < len; ++i) {
              T v = xr[i] * sc;
              ap[i] += gr[i] * v;
              cp[i] += (v == mp[i]) ? T(1) : T(0);
            }
          } else {
            if (g && !gc) {
              const T* gr = g + off;
              for (int64_t i = 0; i < len; ++i) ap[i] += gr[i] * (xr[i] * sc);
            } else if (g) {
              for (int64_t i = 0; i < len; ++i) ap[i] += gv * (xr[i] * sc);
            }
            if (mp) {
              for (int64_t i = 0; i < len; ++i) cp[i] += ((xr[i] * sc) == mp[i]) ? T(1) : T(0);
            }
          }
        }
        if (ga) std::copy(ap, ap + len, ga + n * HW + p0);
        if (cnt) std::copy(cp, cp + len, cnt + n * HW + p0);
      }
    });
  } else {
    at::parallel_for(0, N * HW, 256, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        const int64_t n = p / HW;
        const T* xr = x + p * C;
        const T* gr = (g && !gc) ? g + p * C : nullptr;
        const T* sr = s ? s + n * C : nullptr;
        const T m = mx ? mx[n * mbs + (p - n * HW)] : T(0);
        T al[kLanes] = {}, cl[kLanes] = {};
        int64_t c = 0;
        for (; c + kLanes <= C; c += kLanes) {
          for (int64_t l = 0; l < kLanes; ++l) {
            T v = sr ? xr[c + l] * sr[c + l] : xr[c + l];
            if (gr) {
              al[l] += gr[c + l] * v;
            } else if (g) {
              al[l] += gv * v;
            }
            cl[l] += (v == m) ? T(1) : T(0);
          }
        }
        for (; c < C; ++c) {
          T v = sr ? xr[c] * sr[c] : xr[c];
          if (gr) {
            al[0] += gr[c] * v;
          } else if (g) {
            al[0] += gv * v;
          }
          cl[0] += (v == m) ? T(1) : T(0);
        }
        T sa = al[0], sc = cl[0];
        for (int64_t l = 1; l < kLanes; ++l) {
          sa += al[l];
          sc += cl[l];
        }
        if (ga) ga[p] = sa;
        if (cnt) cnt[p] = sc;
      }
    });
  }
}

// ---------------------------------------------------------------- backward pass B
// gx' = g * a + [x' == mx] * fmax + fmean ;  gx = gx' * s ;  gs[n, c] = sum_p gx' * x.
// Any of g (with a), mx (with fmax), fmean may be null; gx / gs may be null.
template <typename T>
void k_gradx(const T* x, const T* s, const T* g, bool gc, const T* a, const T* mx, int64_t mbs, const T* fmax,
             const T* fmean, int64_t N, int64_t C, int64_t HW, bool nhwc, T* gx, T* gs, bool stream) {
  const T gv = (g && gc) ? g[0] : T(0);
  if (!nhwc) {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(HW, 1));
    at::parallel_for(0, N * C, grain, [&](int64_t b, int64_t e) {
      std::vector<T> buf(HW);
      T* gp = buf.data();
      for (int64_t r = b; r < e; ++r) {
        const int64_t n = r / C;
        const T* xr = x + r * HW;
        const T sc = s ? s[r] : T(1);
        const T* an = a ? a + n * HW : nullptr;
        const T* mn = mx ? mx + n * mbs : nullptr;
        const T* fm = fmax ? fmax + n * HW : nullptr;
        const T* fa = fmean ? fmean + n * HW : nullptr;
        if (g && gc) {
          for (int64_t i = 0; i < HW; ++i) gp[i] = gv * an[i];
        } else if (g) {
          const T* gr = g + r * HW;
          for (int64_t i = 0; i < HW; ++i) gp[i] = gr[i] * an[i];
        } else {
          std::fill(gp, gp + HW, T(0));
        }
        if (mn) {
          for (int64_t i = 0; i < HW; ++i) gp[i] += ((xr[i] * sc) == mn[i] ? T(1) : T(0)) * fm[i];
        }
        if (fa) {
          for (int64_t i = 0; i < HW; ++i) gp[i] += fa[i];
        }
        if (gs) {
          T al[kLanes] = {};
          int64_t i = 0;
          for (; i + kLanes <= HW; i += kLanes)
            for (int64_t l = 0; l < kLanes; ++l) al[l] += gp[i + l] * xr[i + l];
          for (; i < HW; ++i) al[0] += gp[i] * xr[i];
          T t = al[0];
          for (int64_t l = 1; l < kLanes; ++l) t += al[l];
          gs[r] = t;
        }
        if (gx) mul_row<T>(gx + r * HW, gp, nullptr, sc, nullptr, T(1), HW, stream);
      }
      stream_fence(stream);
    });
  } else {
    // Pixels in blocks; every block keeps its own partial sums of gs, added up at the end.
    const int64_t block = std::max<int64_t>(1, std::min<int64_t>(HW, 4096 / std::max<int64_t>(C, 1) + 1));
    const int64_t nblocks = (HW + block - 1) / block;
    std::vector<T> partial(gs ? N * nblocks * C : 0, T(0));
    at::parallel_for(0, N * nblocks, 1, [&](int64_t b, int64_t e) {
      std::vector<T> buf(C);
      T* gp = buf.data();
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = t / nblocks, q0 = (t % nblocks) * block;
        const int64_t q1 = std::min(HW, q0 + block);
        const T* sr = s ? s + n * C : nullptr;
        T* ps = gs ? partial.data() + t * C : nullptr;
        for (int64_t q = q0; q < q1; ++q) {
          const int64_t p = n * HW + q;
          const T* xr = x + p * C;
          const T av = a ? a[p] : T(0);
          if (g && gc) {
            std::fill(gp, gp + C, gv * av);
          } else if (g) {
            const T* gr = g + p * C;
            for (int64_t c = 0; c < C; ++c) gp[c] = gr[c] * av;
          } else {
            std::fill(gp, gp + C, T(0));
          }
          if (mx) {
            const T m = mx[n * mbs + q], f = fmax[p];
            if (sr) {
              for (int64_t c = 0; c < C; ++c) gp[c] += ((xr[c] * sr[c]) == m ? T(1) : T(0)) * f;
            } else {
              for (int64_t c = 0; c < C; ++c) gp[c] += (xr[c] == m ? T(1) : T(0)) * f;
            }
          }
          if (fmean) {
            const T f = fmean[p];
            for (int64_t c = 0; c < C; ++c) gp[c] += f;
          }
          if (ps) {
            for (int64_t c = 0; c < C; ++c) ps[c] += gp[c] * xr[c];
          }
          if (gx) mul_row<T>(gx + p * C, gp, sr, T(1), nullptr, T(1), C, stream);
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

// ---------------------------------------------------------------- global (spatial) pooling
// For CBAM's channel gate: max and mean over H*W of each (n, c) in one read of x.
// mx / mean: [N, C] outputs (either may be null).
template <typename T>
void k_global_pool(const T* x, int64_t N, int64_t C, int64_t HW, bool nhwc, T* mx, T* mean) {
  if (!nhwc) {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(HW, 1));
    at::parallel_for(0, N * C, grain, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const T* row = x + r * HW;
        T m, sum;
        int64_t i = 0;
        if (HW >= kLanes) {
          T ml[kLanes], sl[kLanes];
          for (int64_t l = 0; l < kLanes; ++l) ml[l] = sl[l] = row[l];
          for (i = kLanes; i + kLanes <= HW; i += kLanes)
            for (int64_t l = 0; l < kLanes; ++l) {
              ml[l] = vmax(ml[l], row[i + l]);
              sl[l] += row[i + l];
            }
          m = ml[0];
          sum = sl[0];
          for (int64_t l = 1; l < kLanes; ++l) {
            m = vmax(m, ml[l]);
            sum += sl[l];
          }
        } else {
          m = sum = row[0];
          i = 1;
        }
        for (; i < HW; ++i) {
          m = vmax(m, row[i]);
          sum += row[i];
        }
        if (sum != sum && any_nan<T>(row, nullptr, HW, 1)) m = std::numeric_limits<T>::quiet_NaN();
        if (mx) mx[r] = m;
        if (mean) mean[r] = sum / T(HW);
      }
    });
  } else {
    constexpr int64_t kCB = 64;
    const int64_t ncb = (C + kCB - 1) / kCB;
    at::parallel_for(0, N * ncb, 1, [&](int64_t b, int64_t e) {
      T m[kCB], sm[kCB];
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = t / ncb, c0 = (t % ncb) * kCB, len = std::min(kCB, C - c0);
        const T* base = x + n * HW * C + c0;
        for (int64_t c = 0; c < len; ++c) m[c] = sm[c] = base[c];
        for (int64_t p = 1; p < HW; ++p) {
          const T* row = base + p * C;
          for (int64_t c = 0; c < len; ++c) {
            m[c] = vmax(m[c], row[c]);
            sm[c] += row[c];
          }
        }
        for (int64_t c = 0; c < len; ++c) {
          T mc = m[c];
          if (sm[c] != sm[c] && any_nan<T>(base + c, nullptr, HW, C)) mc = std::numeric_limits<T>::quiet_NaN();
          if (mx) mx[n * C + c0 + c] = mc;
          if (mean) mean[n * C + c0 + c] = sm[c] / T(HW);
        }
      }
    });
  }
}

// ---------------------------------------------------------------- small maps
// The [N, P, H, W] pooled maps go through a k x k conv, an optional affine norm and
// the sigmoid. Written with GCC/Clang vector extensions (one 64-byte vector = one
// AVX-512 register, two AVX2 ones, ...) on zero-padded copies of the maps, so that
// every tap is an unmasked vector load; four output rows share a sweep over the taps
// (independent accumulators hide the FMA latency).
template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(64)));
};
template <typename T>
using vec_t = typename VecOf<T>::type;
template <typename T>
constexpr int64_t lanes() {
  return int64_t(64 / sizeof(T));
}
template <typename T>
inline vec_t<T> vload(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// sigmoid of a float vector: exp by Cephes' range reduction and degree-6 polynomial
// (branch-free, vectorised; ~1 ulp), NaN propagates.
inline vec_t<float> vsigmoid(vec_t<float> z) {
  typedef int32_t ivec __attribute__((vector_size(64)));
  vec_t<float> x = -z;
  x = x < -87.3f ? vec_t<float>{} - 87.3f : x;
  x = x > 88.7f ? vec_t<float>{} + 88.7f : x;
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

// pad [P, Hp, Wp] <- maps [P, H*W] (P maps of one image)
template <typename T>
void pad_maps(const T* maps, int64_t P, const Pad& g, T* pad) {
  std::fill(pad, pad + P * g.Hp * g.Wp, T(0));
  for (int64_t p = 0; p < P; ++p)
    for (int64_t h = 0; h < g.H; ++h)
      std::copy(maps + (p * g.H + h) * g.W, maps + (p * g.H + h + 1) * g.W,
                pad + (p * g.Hp + h + g.ph) * g.Wp + g.pw);
}

// Correlation of the padded maps with w [P, KH, KW] (flipped taps if `flip`), output
// rows [h0, h1): emit(h, w0, acc) receives the raw sums of lanes w0 .. w0 + L - 1.
template <typename T, typename Emit>
inline void correlate_rows(const T* pad, int64_t P, const Pad& g, const T* w, bool flip, int64_t h0,
                           int64_t h1, Emit&& emit) {
  constexpr int64_t L = lanes<T>();
  const int64_t KK = g.KH * g.KW;
  auto tap = [&](int64_t p, int64_t i, int64_t j) {
    return flip ? w[p * KK + (g.KH - 1 - i) * g.KW + (g.KW - 1 - j)] : w[p * KK + i * g.KW + j];
  };
  int64_t h = h0;
  for (; h + 4 <= h1; h += 4) {
    for (int64_t w0 = 0; w0 < g.W; w0 += L) {
      vec_t<T> a0 = {}, a1 = {}, a2 = {}, a3 = {};
      for (int64_t p = 0; p < P; ++p)
        for (int64_t i = 0; i < g.KH; ++i) {
          const T* row = pad + (p * g.Hp + h + i * g.dil) * g.Wp + w0;
          for (int64_t j = 0; j < g.KW; ++j) {
            const T wv = tap(p, i, j);
            const T* src = row + j * g.dil;
            a0 += wv * vload(src);
            a1 += wv * vload(src + g.Wp);
            a2 += wv * vload(src + 2 * g.Wp);
            a3 += wv * vload(src + 3 * g.Wp);
          }
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
        for (int64_t i = 0; i < g.KH; ++i) {
          const T* row = pad + (p * g.Hp + h + i * g.dil) * g.Wp + w0;
          for (int64_t j = 0; j < g.KW; ++j) a0 += tap(p, i, j) * vload(row + j * g.dil);
        }
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
  correlate_rows<T>(pad, q.P, q.g, q.w, false, h0, h1, [&](int64_t h, int64_t w0, vec_t<T> acc) {
    vec_t<T> l = acc + b;
    vec_t<T> a = vsigmoid(q.ns ? l * ns + nsh : l);
    const int64_t len = std::min<int64_t>(L, W - w0);
    for (int64_t k = 0; k < len; ++k) {
      logits[h * W + w0 + k] = l[k];
      attn[h * W + w0 + k] = a[k];
    }
  });
}

// Backward of the small maps of one image. dA [HW]: gradient w.r.t. attn. Fills
// dkind [2, HW] (gradient w.r.t. the max and the mean map: every pooling slot of
// that kind summed; zero where absent) and par [P*KH*KW + 3] (this image's share of
// grad weight, grad bias, grad norm scale, grad norm shift) in double.
template <typename T>
void gate_backward_image(const Gate<T>& q, const T* dA, const T* attn, const T* logits, const T* pooled,
                         const std::vector<int64_t>& kinds, T* pad, T* dlpad, T* dmax, T* dmean, double* par) {
  constexpr int64_t L = lanes<T>();
  const Pad& g = q.g;
  const int64_t H = g.H, W = g.W, HW = H * W, KK = g.KH * g.KW;
  const T ns = q.ns ? q.ns[0] : T(1);
  // d logits (zero-padded) and the scalar parameter grads
  std::fill(dlpad, dlpad + g.Hp * g.Wp, T(0));
  double s_b = 0, s_ns = 0, s_nsh = 0;
  for (int64_t h = 0; h < H; ++h) {
    T* drow = dlpad + (h + g.ph) * g.Wp + g.pw;
    for (int64_t w = 0; w < W; ++w) {
      const int64_t k = h * W + w;
      const T a = attn[k];
      const T dz = dA[k] * ((T(1) - a) * a);
      const T d = q.ns ? dz * ns : dz;
      s_nsh += double(dz);
      s_ns += double(dz) * double(logits[k]);
      s_b += double(d);
      drow[w] = d;
    }
  }
  par[q.P * KK] = s_b;
  par[q.P * KK + 1] = s_ns;
  par[q.P * KK + 2] = s_nsh;
  // grad weight: per tap, sum_{h,w} dl[h, w] * pooled[p, h + (i - rh) dil, w + (j - rw) dil]
  pad_maps<T>(pooled, q.P, g, pad);
  for (int64_t p = 0; p < q.P; ++p)
    for (int64_t i = 0; i < g.KH; ++i)
      for (int64_t j = 0; j < g.KW; ++j) {
        vec_t<T> a0 = {}, a1 = {};
        int64_t h = 0;
        for (; h < H; ++h) {
          const T* dr = dlpad + (h + g.ph) * g.Wp + g.pw;
          const T* pr = pad + (p * g.Hp + h + i * g.dil) * g.Wp + j * g.dil;
          int64_t w0 = 0;
          for (; w0 + 2 * L <= g.Wp - 2 * g.pw; w0 += 2 * L) {
            a0 += vload(dr + w0) * vload(pr + w0);
            a1 += vload(dr + w0 + L) * vload(pr + w0 + L);
          }
          for (; w0 < W; w0 += L) a0 += vload(dr + w0) * vload(pr + w0);
        }
        a0 += a1;
        double t = 0;
        for (int64_t l = 0; l < L; ++l) t += double(a0[l]);
        par[p * KK + i * g.KW + j] = t;
      }
  // grad of the pooled maps: correlation of dl with the flipped taps, summed per kind
  if (dmax) std::fill(dmax, dmax + HW, T(0));
  if (dmean) std::fill(dmean, dmean + HW, T(0));
  for (int64_t p = 0; p < q.P; ++p) {
    T* dst = kinds[p] == 0 ? dmax : dmean;
    correlate_rows<T>(dlpad, 1, g, q.w + p * KK, true, 0, H, [&](int64_t h, int64_t w0, vec_t<T> acc) {
      const int64_t len = std::min<int64_t>(L, W - w0);
      for (int64_t k = 0; k < len; ++k) dst[h * W + w0 + k] += acc[k];
    });
  }
}

// ---------------------------------------------------------------- helpers
struct Geo {
  int64_t N, C, H, W, HW;
  bool nhwc;
};

Geo geometry(const Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "spatialattn: expected a 4-D tensor, got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "spatialattn cpu kernel: float32/float64 only, got ", x.scalar_type());
  Geo g{x.size(0), x.size(1), x.size(2), x.size(3), x.size(2) * x.size(3), false};
  if (x.is_contiguous()) {
    g.nhwc = false;
  } else {
    TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast),
                "spatialattn cpu kernel: x must be NCHW- or channels_last-contiguous");
    g.nhwc = true;
  }
  return g;
}

template <typename T>
const T* ptr_or_null(const optional<Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->data_ptr<T>() : nullptr;
}

Tensor small(const Tensor& t, const Tensor& like) {
  return t.to(like.scalar_type()).contiguous();
}

optional<Tensor> small_opt(const optional<Tensor>& t, const Tensor& like) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return small(*t, like);
}

Tensor empty_map(const Geo& g, int64_t P, const Tensor& x) {
  return at::empty({g.N, P, g.H, g.W}, x.options().memory_format(at::MemoryFormat::Contiguous));
}

// pooled [N, P, H, W] (dtype of x) from the pooling order.
template <typename T>
void pool_into(const Tensor& x, const Geo& g, const T* s, const std::vector<int64_t>& kinds,
               Tensor& pooled) {
  const int64_t P = kinds.size();
  int64_t imax = -1, imean = -1;
  for (int64_t i = 0; i < P; ++i) {
    if (kinds[i] == 0 && imax < 0) imax = i;
    if (kinds[i] == 1 && imean < 0) imean = i;
  }
  T* base = pooled.data_ptr<T>();
  k_pool<T>(x.data_ptr<T>(), s, g.N, g.C, g.HW, g.nhwc, imax >= 0 ? base + imax * g.HW : nullptr,
            imean >= 0 ? base + imean * g.HW : nullptr, P * g.HW);
  for (int64_t i = 0; i < P; ++i) {
    const int64_t src = kinds[i] == 0 ? imax : imean;
    if (src != i) pooled.select(1, i).copy_(pooled.select(1, src));
  }
}

// [N, HW] map of pooling kind `kind` summed over its positions in `kinds` (for gradients),
// or of the first occurrence (for values).
Tensor kind_grad(const Tensor& gpooled, const std::vector<int64_t>& kinds, int64_t kind) {
  Tensor out;
  for (size_t i = 0; i < kinds.size(); ++i) {
    if (kinds[i] != kind) continue;
    Tensor gi = gpooled.select(1, i);
    out = out.defined() ? out + gi : gi;
  }
  return out.defined() ? out.contiguous() : out;
}

Tensor kind_value(const Tensor& pooled, const std::vector<int64_t>& kinds, int64_t kind) {
  for (size_t i = 0; i < kinds.size(); ++i)
    if (kinds[i] == kind) return pooled.select(1, i).contiguous();
  return Tensor();
}

Tensor flat_scale(const optional<Tensor>& s, const Tensor& x) {
  if (!s.has_value() || !s->defined()) return Tensor();
  return s->to(x.scalar_type()).reshape({x.size(0), x.size(1)}).contiguous();
}

template <typename T>
T* dptr(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// The upstream gradient in the layout of x; a gradient that is one value broadcast
// everywhere (all strides 0, e.g. from y.sum()) is not materialised: gc = true and
// the result holds that single value.
Tensor upstream(const Tensor& grad, const Tensor& x, const Geo& g, bool& gc) {
  gc = grad.numel() > 0 && grad.dim() == 4 && grad.stride(0) == 0 && grad.stride(1) == 0 &&
       grad.stride(2) == 0 && grad.stride(3) == 0;
  if (gc) return grad.as_strided({1}, {1}).to(x.scalar_type()).contiguous();
  return grad.to(x.scalar_type()).contiguous(g.nhwc ? at::MemoryFormat::ChannelsLast
                                                     : at::MemoryFormat::Contiguous);
}

// ================================================================ entry points

Tensor pool_forward(const Tensor& x, const optional<Tensor>& scale, std::vector<int64_t> kinds) {
  Geo g = geometry(x);
  TORCH_CHECK(g.C > 0, "spatialattn: channel pooling over zero channels");
  Tensor s = flat_scale(scale, x);
  Tensor pooled = empty_map(g, kinds.size(), x);
  if (g.N * g.HW == 0) return pooled;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pool_forward", [&] {
    pool_into<scalar_t>(x, g, dptr<scalar_t>(s), kinds, pooled);
  });
  return pooled;
}

// returns (grad_x, grad_scale [N, C, 1, 1] or undefined)
std::vector<Tensor> pool_backward(const Tensor& grad, const Tensor& x, const optional<Tensor>& scale,
                                  const Tensor& pooled, std::vector<int64_t> kinds, bool need_gs) {
  Geo g = geometry(x);
  Tensor s = flat_scale(scale, x);
  Tensor gp = grad.to(x.scalar_type()).contiguous();
  Tensor gx = at::empty_like(x);
  Tensor gs = (s.defined() && need_gs) ? at::empty({g.N, g.C}, x.options()) : Tensor();
  if (x.numel() == 0) {
    if (gs.defined()) gs.zero_();
    return {gx, gs.defined() ? gs.view({g.N, g.C, 1, 1}) : gs};
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pool_backward", [&] {
    Tensor mx = kind_value(pooled.to(x.scalar_type()), kinds, 0);
    Tensor gmax = kind_grad(gp, kinds, 0), gmean = kind_grad(gp, kinds, 1);
    Tensor cnt;
    if (mx.defined()) {
      cnt = at::empty({g.N, g.HW}, x.options());
      k_reduce<scalar_t>(x.data_ptr<scalar_t>(), dptr<scalar_t>(s), nullptr, false, mx.data_ptr<scalar_t>(),
                         g.HW, g.N, g.C, g.HW, g.nhwc, nullptr, cnt.data_ptr<scalar_t>());
      gmax = (gmax.reshape({g.N, g.HW}) / cnt).contiguous();
    }
    if (gmean.defined()) gmean = (gmean / double(g.C)).contiguous();
    k_gradx<scalar_t>(x.data_ptr<scalar_t>(), dptr<scalar_t>(s), nullptr, false, nullptr, dptr<scalar_t>(mx),
                      g.HW, dptr<scalar_t>(gmax), dptr<scalar_t>(gmean), g.N, g.C, g.HW, g.nhwc,
                      gx.data_ptr<scalar_t>(), dptr<scalar_t>(gs), use_stream<scalar_t>(x.numel()));
  });
  return {gx, gs.defined() ? gs.view({g.N, g.C, 1, 1}) : gs};
}

Tensor gate_forward(const Tensor& x, const Tensor& attn, const optional<Tensor>& scale,
                    const optional<Tensor>& out) {
  Geo g = geometry(x);
  Tensor s = flat_scale(scale, x);
  Tensor a = attn.to(x.scalar_type()).expand({g.N, 1, g.H, g.W}).contiguous();
  Tensor y;
  if (out.has_value() && out->defined()) {
    y = *out;
    TORCH_CHECK(y.sizes() == x.sizes() && y.strides() == x.strides() && y.scalar_type() == x.scalar_type(),
                "spatialattn: out= must have the shape, strides and dtype of x");
  } else {
    y = at::empty_like(x);
  }
  if (x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gate_forward", [&] {
    k_mul<scalar_t>(x.data_ptr<scalar_t>(), dptr<scalar_t>(s), a.data_ptr<scalar_t>(),
                    y.data_ptr<scalar_t>(), g.N, g.C, g.HW, g.nhwc, use_stream<scalar_t>(x.numel()));
  });
  return y;
}

// returns (grad_x, grad_attn [N, 1, H, W] or undefined, grad_scale [N, C, 1, 1] or undefined)
std::vector<Tensor> gate_backward(const Tensor& grad, const Tensor& x, const Tensor& attn,
                                  const optional<Tensor>& scale, bool need_gx, bool need_ga,
                                  bool need_gs) {
  Geo g = geometry(x);
  Tensor s = flat_scale(scale, x);
  Tensor a = attn.to(x.scalar_type()).expand({g.N, 1, g.H, g.W}).contiguous();
  bool gc = false;
  Tensor gy = upstream(grad, x, g, gc);
  Tensor gx = need_gx ? at::empty_like(x) : Tensor();
  Tensor ga = need_ga ? empty_map(g, 1, x) : Tensor();
  Tensor gs = (s.defined() && need_gs) ? at::empty({g.N, g.C}, x.options()) : Tensor();
  if (x.numel() == 0) {
    if (ga.defined()) ga.zero_();
    if (gs.defined()) gs.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gate_backward", [&] {
      if (ga.defined())
        k_reduce<scalar_t>(x.data_ptr<scalar_t>(), dptr<scalar_t>(s), gy.data_ptr<scalar_t>(), gc, nullptr,
                           0, g.N, g.C, g.HW, g.nhwc, ga.data_ptr<scalar_t>(), nullptr);
      if (gx.defined() || gs.defined())
        k_gradx<scalar_t>(x.data_ptr<scalar_t>(), dptr<scalar_t>(s), gy.data_ptr<scalar_t>(), gc,
                          a.data_ptr<scalar_t>(), nullptr, 0, nullptr, nullptr, g.N, g.C, g.HW, g.nhwc,
                          dptr<scalar_t>(gx), dptr<scalar_t>(gs), use_stream<scalar_t>(x.numel()));
    });
  }
  return {gx, ga, gs.defined() ? gs.view({g.N, g.C, 1, 1}) : gs};
}

// ---------------------------------------------------------------- the fused SAM
// Work split. With at least as many images as threads, each thread takes whole images
// and runs pool -> gate -> multiply (forward) or reduce -> small-map backward ->
// gradient (backward) on one image at a time, so the second read of the image comes
// from the cache (L2 / L3) instead of memory. The images left over (N mod threads, or
// all of them when N < threads) go through the same steps one phase at a time, each
// phase parallel over the pixels or channels of those images.
inline int64_t whole_images(int64_t N) {
  const int64_t t = std::max<int64_t>(1, at::get_num_threads());
  return N >= t ? N - N % t : 0;
}

// pooling slots: first max slot and first mean slot (-1 if absent)
inline void first_slots(const std::vector<int64_t>& kinds, int64_t& imax, int64_t& imean) {
  imax = imean = -1;
  for (int64_t i = 0; i < int64_t(kinds.size()); ++i) {
    if (kinds[i] == 0 && imax < 0) imax = i;
    if (kinds[i] == 1 && imean < 0) imean = i;
  }
}

// repeated pooling slots of images [n0, n1) copied from the first occurrence
template <typename T>
void fill_repeated_slots(T* pooled, const std::vector<int64_t>& kinds, int64_t imax, int64_t imean, int64_t HW,
                         int64_t n0, int64_t n1) {
  const int64_t P = kinds.size();
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t i = 0; i < P; ++i) {
      const int64_t src = kinds[i] == 0 ? imax : imean;
      if (src != i) std::copy(pooled + (n * P + src) * HW, pooled + (n * P + src + 1) * HW, pooled + (n * P + i) * HW);
    }
}

// grain (in blocks of `rows` rows) that gives each task at least ~64k multiply-adds
inline int64_t gate_grain(int64_t rows, int64_t W, int64_t P, int64_t KK) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, rows * W * P * KK));
}

// Whole SAM forward with a sigmoid gate: returns (y, attn, logits, pooled); the last
// three are small [N, *, H, W] maps kept for backward.
std::vector<Tensor> sam_forward(const Tensor& x, const Tensor& weight, const optional<Tensor>& bias,
                                const optional<Tensor>& scale, const optional<Tensor>& norm_scale,
                                const optional<Tensor>& norm_shift, std::vector<int64_t> kinds,
                                int64_t dilation, const optional<Tensor>& out) {
  Geo g = geometry(x);
  TORCH_CHECK(g.C > 0, "spatialattn: channel pooling over zero channels");
  const int64_t P = kinds.size();
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == 1 && weight.size(1) == P,
              "spatialattn: weight must be (1, P, kh, kw)");
  Tensor s = flat_scale(scale, x);
  Tensor w = small(weight, x);
  auto b = small_opt(bias, x), ns = small_opt(norm_scale, x), nsh = small_opt(norm_shift, x);
  TORCH_CHECK(ns.has_value() == nsh.has_value(), "spatialattn: norm_scale and norm_shift go together");
  Tensor pooled = empty_map(g, P, x), logits = empty_map(g, 1, x), attn = empty_map(g, 1, x);
  Tensor y;
  if (out.has_value() && out->defined()) {
    y = *out;
    TORCH_CHECK(y.sizes() == x.sizes() && y.strides() == x.strides() && y.scalar_type() == x.scalar_type(),
                "spatialattn: out= must have the shape, strides and dtype of x");
  } else {
    y = at::empty_like(x);
  }
  if (g.N * g.HW == 0) return {y, attn, logits, pooled};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sam_forward", [&] {
    using T = scalar_t;
    const T* xp = x.data_ptr<T>();
    const T* sp = dptr<T>(s);
    T* pp = pooled.data_ptr<T>();
    T* lp = logits.data_ptr<T>();
    T* ap = attn.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    int64_t imax, imean;
    first_slots(kinds, imax, imean);
    const Gate<T> q{w.data_ptr<T>(), P, make_pad<T>(g.H, g.W, w.size(2), w.size(3), dilation),
                    ptr_or_null<T>(b), ptr_or_null<T>(ns), ptr_or_null<T>(nsh)};
    const int64_t CHW = g.C * g.HW, PHW = P * g.HW, padsz = P * q.g.Hp * q.g.Wp;
    const bool stream = use_stream<T>(x.numel());
    auto pool = [&](int64_t n0, int64_t cnt) {
      k_pool<T>(xp + n0 * CHW, sp ? sp + n0 * g.C : nullptr, cnt, g.C, g.HW, g.nhwc,
                imax >= 0 ? pp + n0 * PHW + imax * g.HW : nullptr, imean >= 0 ? pp + n0 * PHW + imean * g.HW : nullptr,
                PHW);
      fill_repeated_slots<T>(pp, kinds, imax, imean, g.HW, n0, n0 + cnt);
    };
    auto mul = [&](int64_t n0, int64_t cnt) {
      k_mul<T>(xp + n0 * CHW, sp ? sp + n0 * g.C : nullptr, ap + n0 * g.HW, yp + n0 * CHW, cnt, g.C, g.HW, g.nhwc,
               stream);
    };
    const int64_t Nf = whole_images(g.N);
    if (Nf > 0) {
      at::parallel_for(0, Nf, 1, [&](int64_t b0, int64_t e0) {
        std::vector<T> pad(padsz);
        for (int64_t n = b0; n < e0; ++n) {
          pool(n, 1);
          pad_maps<T>(pp + n * PHW, P, q.g, pad.data());
          gate_rows<T>(q, pad.data(), 0, g.H, lp + n * g.HW, ap + n * g.HW);
          mul(n, 1);
        }
      });
    }
    if (Nf < g.N) {
      const int64_t Nr = g.N - Nf;
      pool(Nf, Nr);
      std::vector<T> pad(Nr * padsz);
      for (int64_t n = 0; n < Nr; ++n) pad_maps<T>(pp + (Nf + n) * PHW, P, q.g, pad.data() + n * padsz);
      constexpr int64_t kRows = 8;
      const int64_t nb = (g.H + kRows - 1) / kRows;
      at::parallel_for(0, Nr * nb, gate_grain(kRows, g.W, P, q.g.KH * q.g.KW), [&](int64_t b0, int64_t e0) {
        for (int64_t t = b0; t < e0; ++t) {
          const int64_t n = t / nb, h0 = (t % nb) * kRows;
          gate_rows<T>(q, pad.data() + n * padsz, h0, std::min(g.H, h0 + kRows), lp + (Nf + n) * g.HW,
                       ap + (Nf + n) * g.HW);
        }
      });
      mul(Nf, Nr);
    }
  });
  return {y, attn, logits, pooled};
}

// returns (grad_x, grad_scale, grad_weight, grad_bias, grad_norm_scale, grad_norm_shift);
// undefined where not wanted.
std::vector<Tensor> sam_backward(const Tensor& grad_y, const optional<Tensor>& grad_attn,
                                 const Tensor& x, const optional<Tensor>& scale, const Tensor& weight,
                                 const optional<Tensor>& norm_scale, const Tensor& attn,
                                 const Tensor& logits, const Tensor& pooled, std::vector<int64_t> kinds,
                                 int64_t dilation, bool need_gs, bool need_gw, bool need_gb,
                                 bool need_gnorm) {
  Geo g = geometry(x);
  const int64_t P = kinds.size();
  Tensor s = flat_scale(scale, x);
  Tensor w = small(weight, x);
  auto ns = small_opt(norm_scale, x);
  bool gc = false;
  Tensor gy = upstream(grad_y, x, g, gc);
  Tensor gx = at::empty_like(x);
  Tensor gs = (s.defined() && need_gs) ? at::zeros({g.N, g.C}, x.options()) : Tensor();
  Tensor gw = need_gw ? at::zeros_like(w) : Tensor();
  Tensor gb = need_gb ? at::zeros({1}, x.options()) : Tensor();
  Tensor gns = (need_gnorm && ns.has_value()) ? at::zeros({1}, x.options()) : Tensor();
  Tensor gnsh = (need_gnorm && ns.has_value()) ? at::zeros({1}, x.options()) : Tensor();
  auto pack = [&]() -> std::vector<Tensor> {
    return {gx, gs.defined() ? gs.view({g.N, g.C, 1, 1}) : gs, gw, gb, gns, gnsh};
  };
  if (x.numel() == 0) {
    gx.zero_();
    return pack();
  }
  Tensor gextra;
  if (grad_attn.has_value() && grad_attn->defined())
    gextra = grad_attn->to(x.scalar_type()).reshape({g.N, g.HW}).contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sam_backward", [&] {
    using T = scalar_t;
    const T* xp = x.data_ptr<T>();
    const T* sp = dptr<T>(s);
    const T* gyp = gy.data_ptr<T>();
    const T* pp = pooled.data_ptr<T>();
    const T* lp = logits.data_ptr<T>();
    const T* ap = attn.data_ptr<T>();
    const T* ge = dptr<T>(gextra);
    T* gxp = gx.data_ptr<T>();
    T* gsp = dptr<T>(gs);
    int64_t imax, imean;
    first_slots(kinds, imax, imean);
    const Gate<T> q{w.data_ptr<T>(), P, make_pad<T>(g.H, g.W, w.size(2), w.size(3), dilation), nullptr,
                    ptr_or_null<T>(ns), ptr_or_null<T>(ns)};
    const int64_t HW = g.HW, CHW = g.C * HW, PHW = P * HW, KK = q.g.KH * q.g.KW, NP = P * KK + 3;
    const int64_t padsz = P * q.g.Hp * q.g.Wp, dlsz = q.g.Hp * q.g.Wp;
    const bool stream = use_stream<T>(x.numel());
    std::vector<T> dA(g.N * HW), cnt(imax >= 0 ? g.N * HW : 0), dmax(imax >= 0 ? g.N * HW : 0),
        dmean(imean >= 0 ? g.N * HW : 0);
    std::vector<double> par(g.N * NP);
    const T* mx = imax >= 0 ? pp + imax * HW : nullptr;  // batch stride PHW
    // pass A: d attn = sum_c g * x' (+ the gradient of the returned attention), tie counts of the max
    auto reduce = [&](int64_t n0, int64_t m) {
      k_reduce<T>(xp + n0 * CHW, sp ? sp + n0 * g.C : nullptr, gc ? gyp : gyp + n0 * CHW, gc,
                  mx ? mx + n0 * PHW : nullptr, PHW, m, g.C, HW, g.nhwc, dA.data() + n0 * HW,
                  mx ? cnt.data() + n0 * HW : nullptr);
      if (ge)
        for (int64_t k = n0 * HW; k < (n0 + m) * HW; ++k) dA[k] += ge[k];
    };
    // small maps of image n: sigmoid', norm, transposed conv, parameter grads
    auto small_maps = [&](int64_t n, T* pad, T* dlpad) {
      T* dm = mx ? dmax.data() + n * HW : nullptr;
      T* da = imean >= 0 ? dmean.data() + n * HW : nullptr;
      gate_backward_image<T>(q, dA.data() + n * HW, ap + n * HW, lp + n * HW, pp + n * PHW, kinds, pad, dlpad, dm,
                             da, par.data() + n * NP);
      if (dm) {
        const T* c = cnt.data() + n * HW;
        for (int64_t k = 0; k < HW; ++k) dm[k] = dm[k] / c[k];
      }
      if (da)
        for (int64_t k = 0; k < HW; ++k) da[k] = da[k] / T(g.C);
    };
    // pass B: grad_x and grad_scale
    auto grad = [&](int64_t n0, int64_t m) {
      k_gradx<T>(xp + n0 * CHW, sp ? sp + n0 * g.C : nullptr, gc ? gyp : gyp + n0 * CHW, gc, ap + n0 * HW,
                 mx ? mx + n0 * PHW : nullptr, PHW, mx ? dmax.data() + n0 * HW : nullptr,
                 imean >= 0 ? dmean.data() + n0 * HW : nullptr, m, g.C, HW, g.nhwc, gxp + n0 * CHW,
                 gsp ? gsp + n0 * g.C : nullptr, stream);
    };
    const int64_t Nf = whole_images(g.N);
    if (Nf > 0) {
      at::parallel_for(0, Nf, 1, [&](int64_t b0, int64_t e0) {
        std::vector<T> pad(padsz), dlpad(dlsz);
        for (int64_t n = b0; n < e0; ++n) {
          reduce(n, 1);
          small_maps(n, pad.data(), dlpad.data());
          grad(n, 1);
        }
      });
    }
    if (Nf < g.N) {
      const int64_t Nr = g.N - Nf;
      reduce(Nf, Nr);
      at::parallel_for(0, Nr, 1, [&](int64_t b0, int64_t e0) {
        std::vector<T> pad(padsz), dlpad(dlsz);
        for (int64_t n = b0; n < e0; ++n) small_maps(Nf + n, pad.data(), dlpad.data());
      });
      grad(Nf, Nr);
    }
    // parameter grads: image shares added in image order (independent of the thread count)
    auto total = [&](int64_t k) {
      double t = 0;
      for (int64_t n = 0; n < g.N; ++n) t += par[n * NP + k];
      return T(t);
    };
    if (gw.defined()) {
      T* o = gw.data_ptr<T>();
      for (int64_t k = 0; k < P * KK; ++k) o[k] = total(k);
    }
    if (gb.defined()) gb.data_ptr<T>()[0] = total(P * KK);
    if (gns.defined()) gns.data_ptr<T>()[0] = total(P * KK + 1);
    if (gnsh.defined()) gnsh.data_ptr<T>()[0] = total(P * KK + 2);
  });
  return pack();
}

// [P, N, C] (dtype of x): max / mean over H, W for each kind in `kinds`.
Tensor global_pool(const Tensor& x, std::vector<int64_t> kinds) {
  Geo g = geometry(x);
  TORCH_CHECK(g.HW > 0, "spatialattn: global pooling over an empty H x W");
  const int64_t P = kinds.size();
  Tensor out = at::empty({P, g.N, g.C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (g.N * g.C == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "global_pool", [&] {
    int64_t imax = -1, imean = -1;
    for (int64_t i = 0; i < P; ++i) {
      if (kinds[i] == 0 && imax < 0) imax = i;
      if (kinds[i] == 1 && imean < 0) imean = i;
    }
    scalar_t* o = out.data_ptr<scalar_t>();
    k_global_pool<scalar_t>(x.data_ptr<scalar_t>(), g.N, g.C, g.HW, g.nhwc,
                            imax >= 0 ? o + imax * g.N * g.C : nullptr, imean >= 0 ? o + imean * g.N * g.C : nullptr);
    for (int64_t i = 0; i < P; ++i) {
      const int64_t src = kinds[i] == 0 ? imax : imean;
      if (src != i) out.select(0, i).copy_(out.select(0, src));
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pool_forward", &pool_forward);
  m.def("pool_backward", &pool_backward);
  m.def("gate_forward", &gate_forward);
  m.def("gate_backward", &gate_backward);
  m.def("sam_forward", &sam_forward);
  m.def("sam_backward", &sam_backward);
  m.def("global_pool", &global_pool);
  m.def("set_stream_bytes", [](int64_t b) { kStreamBytes = b; });
}
