// The fused SAM: work split over images and threads, forward and backward entry points.
//
// Part of sam_cpu.cpp: the parts are included in order into one translation unit, each in the
// unit's anonymous namespace, and each uses the ones before it (see sam_cpu.cpp for the overview).
#pragma once

namespace {

// ---------------------------------------------------------------- the fused SAM
// Work split. With at least as many images as threads, each thread takes whole images
// and runs pool -> gate -> multiply (forward) or reduce -> small-map backward ->
// gradient (backward) on one image at a time, so the second read of the image comes
// from the cache (L2 / L3) instead of memory. The images left over (N mod threads, or
// all of them when N < threads) share the threads: forward in one region by row shares
// (sam_forward_shared); backward in units of rows (sam_backward_shared) where their x and
// gradient exceed the LLC, else one phase at a time, each phase parallel over the pixels
// or channels of those images.
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
  for (int64_t n = n0; n < n1; ++n) copy_repeated_slots<T>(pooled + n * P * HW, kinds, imax, imean, HW, 0, HW);
}

// grain (in blocks of `rows` rows) that gives each task at least ~64k multiply-adds
inline int64_t gate_grain(int64_t rows, int64_t W, int64_t P, int64_t KK) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, rows * W * P * KK));
}

// logits / attn of images [n0, n1) from their pooled maps (P slots each, batch stride P * HW),
// parallel over blocks of rows of all those images
template <typename T>
void gate_images(const Gate<T>& q, const T* pooled, int64_t n0, int64_t n1, T* logits, T* attn) {
  const int64_t P = q.P, H = q.g.H, HW = H * q.g.W, padsz = P * q.g.Hp * q.g.Wp;
  std::vector<T> pad((n1 - n0) * padsz);
  // the padded copies in parallel too (about 16k elements of them per task at least)
  at::parallel_for(n0, n1, std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, padsz)),
                   [&](int64_t b0, int64_t e0) {
                     for (int64_t n = b0; n < e0; ++n)
                       pad_maps<T>(pooled + n * P * HW, P, q.g, pad.data() + (n - n0) * padsz);
                   });
  constexpr int64_t kRows = 8;
  const int64_t nb = (H + kRows - 1) / kRows;
  at::parallel_for(0, (n1 - n0) * nb, gate_grain(kRows, q.g.W, P, q.g.KH * q.g.KW), [&](int64_t b0, int64_t e0) {
    for (int64_t t = b0; t < e0; ++t) {
      const int64_t k = t / nb, h0 = (t % nb) * kRows;
      gate_rows<T>(q, pad.data() + k * padsz, h0, std::min(H, h0 + kRows), logits + (n0 + k) * HW,
                   attn + (n0 + k) * HW);
    }
  });
}

// Small-map backward of images [0, n) that are not split between threads as whole images
// (the images left over by whole_images; every image with a training-mode BatchNorm), in
// parallel over bands of kBwdRows rows of every image, so that one image (batch 1) does not
// run on one thread while the others wait: at 1x32x416x416 this part was about 1.5 ms of a
// 6.7 ms backward. dlogits(k, h0, h1, dlpad, par3) fills the d logits of image k's rows
// [h0, h1) into its zero-padded map (all bands first: the transposed conv of a band reads its
// neighbours' rows) and adds that band's bias / norm shares to par3[0..2]; then each band adds
// its weight-gradient share (weight slots of par) and fills its rows of dmax / dmean (see
// dpooled_rows). The bands' shares are summed in band order into par[k * (P*KH*KW + 3) ..]
// (the weight slots, then the three), so the result does not depend on the thread count.
constexpr int64_t kBwdRows = 8;

// out[k * width + j] += shares[(k * nb + b) * width + j] for b = 0 .. nb - 1 in that order
// (k < n: n images of nb bands / units each), so the sums do not depend on which thread made
// which share
template <typename V>
void add_in_unit_order(const V* shares, int64_t n, int64_t nb, int64_t width, V* out) {
  for (int64_t k = 0; k < n; ++k)
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t j = 0; j < width; ++j) out[k * width + j] += shares[(k * nb + b) * width + j];
}

template <typename T, typename D>
void small_maps_backward(const Gate<T>& q, const std::vector<int64_t>& kinds, const T* pooled, int64_t n,
                         const T* cnt, int64_t C, D&& dlogits, double* par, T* dmax, T* dmean) {
  const int64_t H = q.g.H, HW = H * q.g.W, P = q.P, KK = q.g.KH * q.g.KW, NP = P * KK + 3;
  const int64_t padsz = P * q.g.Hp * q.g.Wp, dlsz = q.g.Hp * q.g.Wp, nb = (H + kBwdRows - 1) / kBwdRows;
  std::vector<T> pads(n * padsz), dlpads(n * dlsz, T(0));
  std::vector<double> bpar(n * nb * NP, 0.0);
  const int64_t grain = gate_grain(kBwdRows, q.g.W, P, KK);
  at::parallel_for(0, n * nb, grain, [&](int64_t b0, int64_t e0) {
    for (int64_t t = b0; t < e0; ++t) {
      const int64_t k = t / nb, h0 = (t % nb) * kBwdRows;
      if (h0 == 0) pad_maps<T>(pooled + k * P * HW, P, q.g, pads.data() + k * padsz);
      dlogits(k, h0, std::min(H, h0 + kBwdRows), dlpads.data() + k * dlsz, bpar.data() + t * NP + P * KK);
    }
  });
  at::parallel_for(0, n * nb, grain, [&](int64_t b0, int64_t e0) {
    for (int64_t t = b0; t < e0; ++t) {
      const int64_t k = t / nb, h0 = (t % nb) * kBwdRows, h1 = std::min(H, h0 + kBwdRows);
      dweight_rows<T>(q, pads.data() + k * padsz, dlpads.data() + k * dlsz, h0, h1, bpar.data() + t * NP);
      dpooled_rows<T>(q, kinds, dlpads.data() + k * dlsz, cnt ? cnt + k * HW : nullptr, C, h0, h1,
                      dmax ? dmax + k * HW : nullptr, dmean ? dmean + k * HW : nullptr);
    }
  });
  add_in_unit_order(bpar.data(), n, nb, NP, par);
}

// sum over the N images of their shares par[n * stride + k], in image order (the result does
// not depend on how images were split between threads)
inline double image_total(const std::vector<double>& par, int64_t N, int64_t stride, int64_t k) {
  double t = 0;
  for (int64_t n = 0; n < N; ++n) t += par[n * stride + k];
  return t;
}

// The images left over by whole_images (fewer than the threads; e.g. batch-1 inference):
// one parallel region instead of three (k_pool, gate_images, k_mul). The rows of those
// images are split into one contiguous share per thread (a share may span two images).
// Each thread pools its share, waits for the others (the k x k conv needs its neighbours'
// pooled rows) and gates its rows. channels_last: it then multiplies its own rows, so the
// product's read of x comes from its own cache. NCHW: after a second barrier each thread
// multiplies one contiguous run of channel rows (see below). Same kernels per pixel, row and
// element as the phases, so the same bits. Paired against the phases (2 threads, float32,
// forward, batch 1, 13x13 to 104x104): 0.78-0.94x the time channels_last, 0.85-0.97x NCHW.
// kSharedBytes: bytes of x per thread at least (fewer threads below that; 0 = all threads);
// set_shared_bytes for tests.
constexpr int64_t kSharedDefault = 64 << 10;
int64_t kSharedBytes = kSharedDefault;

inline int64_t shared_threads(int64_t bytes, int64_t rows) {
  int64_t t = std::max<int64_t>(1, at::get_num_threads());
  if (kSharedBytes > 0) t = std::min(t, std::max<int64_t>(1, bytes / kSharedBytes));
  return std::max<int64_t>(1, std::min(t, rows));
}

// y = x' * attn for the elements [i0, i1) of a block of NCHW images (flat index; channel
// rows of HW pixels, images of C rows; s: [images, C] or null, attn: [images, HW]).
template <typename T, typename X>
void mul_nchw_flat(const X* x, const T* s, const T* attn, X* y, int64_t C, int64_t HW, int64_t i0, int64_t i1,
                   bool stream) {
  for (int64_t i = i0; i < i1;) {
    const int64_t r = i / HW, n = r / C, e = std::min(i1, (r + 1) * HW);
    mul_row<T>(y + i, x + i, nullptr, s ? s[r] : T(1), attn + n * HW + (i - r * HW), T(0), e - i, stream);
    i = e;
  }
}

// the start of share t of nth in [0, len) elements of y, moved up to y's next 64-byte line
template <typename X>
inline int64_t line_share(const X* y, int64_t len, int64_t t, int64_t nth) {
  const int64_t i = len * t / nth;
  if (i <= 0 || i >= len) return i;
  const uintptr_t a = reinterpret_cast<uintptr_t>(y + i), r = (a + 63) & ~uintptr_t(63);
  return std::min<int64_t>(len, i + int64_t((r - a) / sizeof(X)));
}

// share t of nth threads of that region; barrier(): all nth threads wait there (called twice
// NCHW, once channels_last, by every thread)
template <typename T, typename X, typename B>
void sam_forward_share(int64_t t, int64_t nth, B&& barrier, const X* x, const T* s, int64_t n0, int64_t n1,
                       int64_t C, int64_t H, int64_t W, bool nhwc, const Gate<T>& q,
                       const std::vector<int64_t>& kinds, int64_t imax, int64_t imean, T* pooled, T* logits,
                       T* attn, X* y, bool stream, int64_t prefetch) {
  const int64_t HW = H * W, P = q.P, CHW = C * HW, rows = (n1 - n0) * H;
  // calls f(n, h0, h1) for the image rows of share t of nth (a share may span two images)
  auto segments = [&](auto&& f) {
    const int64_t r0 = rows * t / nth, r1 = rows * (t + 1) / nth;
    for (int64_t r = r0; r < r1;) {
      const int64_t n = n0 + r / H, h0 = r % H, h1 = std::min(H, h0 + (r1 - r));
      f(n, h0, h1);
      r += h1 - h0;
    }
  };
  // NCHW: the accumulator rows are the thread's own (pool_chunk sweeps them once per four
  // channels; in the shared output, a line at the ends of two shares went back and forth
  // between the cores on every sweep), copied out at the end
  constexpr int64_t kChunk = 4096;  // pixels per sweep (accumulators in L1 / L2, as k_pool)
  std::vector<T> am, as;
  segments([&](int64_t n, int64_t h0, int64_t h1) {
    const int64_t p0 = h0 * W, len = (h1 - h0) * W;
    const X* xn = x + n * CHW;
    const T* sn = s ? s + n * C : nullptr;
    T* pn = pooled + n * P * HW;
    if (!nhwc) {
      am.resize(std::min(kChunk, len));
      as.resize(am.size());
      for (int64_t k = 0; k < len; k += kChunk) {
        const int64_t m = std::min(kChunk, len - k);
        pool_chunk<T, X>(xn + p0 + k, sn, C, HW, m, am.data(), as.data(), prefetch);
        if (imax >= 0) std::copy(am.data(), am.data() + m, pn + imax * HW + p0 + k);
        if (imean >= 0) std::copy(as.data(), as.data() + m, pn + imean * HW + p0 + k);
      }
    } else {
      pool_pixels<T, X>(xn + p0 * C, sn, C, len, imax >= 0 ? pn + imax * HW + p0 : nullptr,
                        imean >= 0 ? pn + imean * HW + p0 : nullptr);
    }
    copy_repeated_slots<T>(pn, kinds, imax, imean, HW, p0, len);
  });
  barrier();
  std::vector<T> pad(P * q.g.Hp * q.g.Wp);
  segments([&](int64_t n, int64_t h0, int64_t h1) {
    pad_maps<T>(pooled + n * P * HW, P, q.g, pad.data());
    gate_rows<T>(q, pad.data(), h0, h1, logits + n * HW, attn + n * HW);
    if (nhwc) mul_rows<T, X>(x + n * CHW, s ? s + n * C : nullptr, attn + n * HW, y + n * CHW, C, HW, W, true, h0,
                             h1, stream);
  });
  if (!nhwc) {
    // NCHW: the product in one contiguous run of channel rows per thread, its ends on lines
    // of y. Split by pixels like the pooling (each thread writing half of every channel
    // row), the cores' stream prefetchers ran on into each other's halves: 2.5-4x the time
    // at 1x1024x13x13 / 16x16 and 1x512x26x26 (the second read from the own L2 gained less).
    barrier();
    const int64_t len = (n1 - n0) * CHW;
    X* yb = y + n0 * CHW;
    mul_nchw_flat<T, X>(x + n0 * CHW, s ? s + n0 * C : nullptr, attn + n0 * HW, yb, C, HW,
                        line_share(yb, len, t, nth), line_share(yb, len, t + 1, nth), stream);
  }
  stream_fence(stream);
}

// f(t, nth, barrier) on nt threads of one OpenMP parallel region (on this thread alone where
// nt is 1 or there is no OpenMP; barrier() then does nothing)
template <typename F>
void in_one_region(int64_t nt, F&& f) {
#ifdef _OPENMP
  if (nt > 1) {
#pragma omp parallel num_threads(nt)
    f(int64_t(omp_get_thread_num()), int64_t(omp_get_num_threads()), [] {
#pragma omp barrier
    });
    return;
  }
#endif
  f(int64_t(0), int64_t(1), [] {});
}

template <typename T, typename X>
void sam_forward_shared(const X* x, const T* s, int64_t n0, int64_t n1, int64_t C, int64_t H, int64_t W,
                        bool nhwc, const Gate<T>& q, const std::vector<int64_t>& kinds, int64_t imax,
                        int64_t imean, T* pooled, T* logits, T* attn, X* y, bool stream, int64_t prefetch) {
  const int64_t nt = shared_threads((n1 - n0) * C * H * W * int64_t(sizeof(X)), (n1 - n0) * H);
  in_one_region(nt, [&](int64_t t, int64_t nth, auto&& barrier) {
    sam_forward_share<T, X>(t, nth, barrier, x, s, n0, n1, C, H, W, nhwc, q, kinds, imax, imean, pooled, logits,
                            attn, y, stream, prefetch);
  });
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
  check_gate_args(weight, P, bias, norm_scale, norm_shift, dilation);
  Tensor s = flat_scale(scale, x);
  Tensor w = small(weight, x);
  auto b = small_opt(bias, x), ns = small_opt(norm_scale, x), nsh = small_opt(norm_shift, x);
  Tensor pooled = empty_map(g, P, x), logits = empty_map(g, 1, x), attn = empty_map(g, 1, x);
  Tensor y = output_like(x, out);
  if (g.N * g.HW == 0) return {y, attn, logits, pooled};
  SA_DISPATCH(x, "sam_forward", [&] {
    using X = scalar_t;
    using T = acc_t<X>;
    const X* xp = x.data_ptr<X>();
    const T* sp = dptr<T>(s);
    T* pp = pooled.data_ptr<T>();
    T* lp = logits.data_ptr<T>();
    T* ap = attn.data_ptr<T>();
    X* yp = y.data_ptr<X>();
    int64_t imax, imean;
    first_slots(kinds, imax, imean);
    const Gate<T> q{w.data_ptr<T>(), P, make_pad<T>(g.H, g.W, w.size(2), w.size(3), dilation),
                    ptr_or_null<T>(b), ptr_or_null<T>(ns), ptr_or_null<T>(nsh)};
    const int64_t CHW = g.C * g.HW, PHW = P * g.HW;
    const bool stream = use_stream<X>(x.numel(), in_place(x, y));
    const bool in_llc = fit_llc<X>(x.numel(), 2);  // x and y (band_rows)
    const int64_t prefetch = row_prefetch_bytes<X>(x.numel());
    const int64_t Nf = whole_images(g.N);
    if (Nf > 0) {
      at::parallel_for(0, Nf, 1, [&](int64_t b0, int64_t e0) {
        Scratch<T> sc;
        for (int64_t n = b0; n < e0; ++n)
          sam_forward_image<T, X>(xp + n * CHW, sp ? sp + n * g.C : nullptr, g.C, g.H, g.W, g.nhwc, q, kinds, imax,
                                  imean, pp + n * PHW, lp + n * g.HW, ap + n * g.HW, yp + n * CHW, stream, in_llc,
                                  prefetch, sc);
      });
    }
    if (Nf < g.N)
      sam_forward_shared<T, X>(xp, sp, Nf, g.N, g.C, g.H, g.W, g.nhwc, q, kinds, imax, imean, pp, lp, ap, yp, stream, prefetch);
  });
  return {y, attn, logits, pooled};
}


}  // namespace
