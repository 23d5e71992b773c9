// One image in bands of rows: the per-image forward and backward.
//
// Part of sam_cpu.cpp: the parts are included in order into one translation unit, each in the
// unit's anonymous namespace, and each uses the ones before it (see sam_cpu.cpp for the overview).
#pragma once

namespace {

// ---------------------------------------------------------------- one image in bands of rows
// With whole images per thread, each image is streamed in bands of rows: pool (or reduce)
// a band, then gate and multiply (or compute the gradient of) the rows whose k x k
// neighbourhood is complete, which lag `ph` rows behind. The second read of every row
// comes from a cache close to the core instead of memory. Band height: about the band
// budget of the big tensors (x, and the upstream gradient in backward) including the lag.
//   channels_last: kBandBytes (384 KiB), so that the second read comes from L2; whole
//   images where the pass's tensors fit the LLC together (forward x and y, backward x, the
//   gradient and grad_x: in_llc) and an image is at most 1/8 of it, as NCHW below. Measured
//   (raw kernels, 2 threads, float32, paired against the bands; 35th session): with x
//   L3-resident whole images took 0.84-0.94x the time of 384 KiB bands in the forward
//   (8x512x26x26, 8x128x52x52, 8x256x26x26; 0.98-0.99x at 8x1024x13x13) and 0.87-0.91x in
//   the backward (8x128x52x52, 8x256x26x26). Where they do not fit: the forward at
//   8x256x52x52 (x from memory) 1.07x, the backward at 8x512x26x26 (three 11 MB tensors)
//   1.04-1.06x, so bands stay there.
//   NCHW: a band is one short run of rows per channel, and every run restarts the
//   prefetchers. Whole images while an image (x + gradient) is at most 1/8 of the LLC
//   (it stays in L3 between the two passes); larger images in bands of kBandBytesNchw
//   (2 MiB). Measured here (2 threads, backward, paired against whole images): 0.79-0.82x
//   the time at 8x128x104x104 and 0.86-0.88x at 8x256x52x52 (at 1 thread 0.87-0.88x);
//   the forward within noise (0.99-1.00). At 8x512x26x26 (a 2.8 MB image, L3-resident
//   either way) bands of 4-13 rows made the backward 1.2-2x slower, and bands of 1-8 rows
//   the forward 1.4-2.7x slower; at 52x52, bands of 3-6 rows swung between 0.9x and 1.6x.
// Adjustable at run time for measurements and tests (set_band_bytes, set_band_bytes_nchw:
// 0 makes a band the whole image; set_whole_image_bytes: -1 = automatic).
int64_t kBandBytes = 384 << 10;
int64_t kBandBytesNchw = 2 << 20;
int64_t kWholeImageBytes = -1;  // NCHW whole-image limit; < 0: 1/8 of the LLC
int64_t kBandRows = 0;          // > 0: fixed band height (tests)
// NCHW bands are at least this many bytes of one channel's rows (channel_row_bytes: W pixels
// of one tensor), whatever the budget: a band is one run per channel row, and the budget
// alone gave many-channel images bands of one or two rows (8x2048x26x26: runs of 104 bytes of
// x and of the gradient per channel, backward 9.9 clones; 8x1024x52x52: 208 bytes). Measured
// (raw kernels, 2 threads, float32, paired, the band height forced; 32nd session): backward at
// 8x2048x26x26 0.53x the time with bands of 6 rows, 0.43x with 13, 0.27x with whole images
// (26 rows, where pass A then reads one row per sweep, reduce.h); 8x1024x52x52 0.76x with 20
// rows (4 KiB runs), 0.71x whole; 8x256x104x104 0.81x with 10 rows instead of the budget's 6;
// forward at 8x2048x26x26 0.56x whole, 8x1024x52x52 0.93x. Bands of runs of 4-15 KB (104x104
// with 64-128 channels, 208x208) beat whole images there (1.05-1.2x) and are unchanged.
// set_min_run_bytes: 0 = off (tests), negative = default.
constexpr int64_t kMinRunDefault = 4096;
int64_t kMinRunBytes = kMinRunDefault;

inline int64_t whole_image_bytes() {
  if (kWholeImageBytes >= 0) return kWholeImageBytes;
  static const int64_t llc = llc_bytes();
  return llc / 8;
}

// rows of one band of an image of H rows, `row_bytes` of the streamed tensors per image row
// (x, or x and the gradient), `lag` rows behind the band for the gate; NCHW: at least
// kMinRunBytes of each channel row (channel_row_bytes of one tensor per image row; 0: no
// minimum); in_llc: the pass's tensors (x, y; x, the gradient, grad_x) fit the LLC together
inline int64_t band_rows(int64_t row_bytes, int64_t lag, int64_t H, bool nhwc, int64_t channel_row_bytes = 0,
                         bool in_llc = true) {
  if (kBandRows > 0) return std::min(kBandRows, H);
  const int64_t budget = nhwc ? kBandBytes : kBandBytesNchw;
  if (budget <= 0) return H;
  if (row_bytes * H <= whole_image_bytes() && (in_llc || !nhwc)) return H;
  int64_t r = budget / std::max<int64_t>(1, row_bytes) - lag;
  if (r < 1) return H;
  if (!nhwc && kMinRunBytes > 0 && channel_row_bytes > 0)
    r = std::max(r, (kMinRunBytes + channel_row_bytes - 1) / channel_row_bytes);
  return std::min(H, r);
}

// scratch of one thread for the per-image passes
template <typename T>
struct Scratch {
  std::vector<T> pad, dlpad;              // padded pooled maps / d logits
  std::vector<T> dA, cnt, ix, dmax, dmean;  // [HW] maps of the image (backward; ix: max channel)
  std::vector<T> gs, row;                 // grad of the channel scale [C]; one row of gx'
  std::vector<T> spare;                   // forward: output of an absent max / mean slot
  std::vector<uint8_t> bits;              // max bits of the image's channel rows (NCHW backward)
  std::vector<T> flat;                    // tiled maps and block sums (NCHW backward of short rows)
  std::vector<int32_t> ri;                // the blocks' row index tile (with a channel scale)
};

// y rows [h0, h1) = x' * attn (one image)
template <typename T, typename X>
void mul_rows(const X* x, const T* s, const T* attn, X* y, int64_t C, int64_t HW, int64_t W, bool nhwc,
              int64_t h0, int64_t h1, bool stream) {
  const int64_t p0 = h0 * W, len = (h1 - h0) * W;
  if (!nhwc) {
    int64_t c = 0;
    if (len == HW) c = mul_rows_flat<T, X>(x, s, attn, y, HW, 0, C, stream);
    for (; c < C; ++c)
      mul_row<T>(y + c * HW + p0, x + c * HW + p0, nullptr, s ? s[c] : T(1), attn + p0, T(0), len, stream);
  } else {
#if SAM_AVX2_HALVES
    // channels_last, float compute, C a multiple of 8, not in place: one loop over the run
    // of pixels instead of a mul_row call per pixel (its dispatch, alignment head and tail
    // per C-element row were about a third of the product at C = 64); the same products
    // (prod8) as mul_row_avx2. Streamed only from a vector-aligned y (every pixel's row then
    // starts aligned).
    if constexpr (std::is_same_v<T, float>) {
      const bool aligned = reinterpret_cast<uintptr_t>(y) % (8 * sizeof(X)) == 0;
      if (C % 8 == 0 && static_cast<const void*>(y) != static_cast<const void*>(x) && (aligned || !stream)) {
        const __m256 one = _mm256_set1_ps(1.f);
        auto run = [&](auto hs, auto nt) {
          for (int64_t p = p0; p < p0 + len; ++p) {
            const __m256 va = _mm256_set1_ps(attn[p]);
            const X* xp = x + p * C;
            X* yp = y + p * C;
            for (int64_t k = 0; k < C; k += 8) {
              const __m256 v = prod8(xp + k, decltype(hs)::value ? _mm256_loadu_ps(s + k) : one, va);
              if constexpr (decltype(nt)::value) st8_nt(yp + k, v); else st8(yp + k, v);
            }
          }
        };
        using Y = std::true_type;
        using No = std::false_type;
        if (s) { if (stream) run(Y{}, Y{}); else run(Y{}, No{}); }
        else { if (stream) run(No{}, Y{}); else run(No{}, No{}); }
        return;
      }
    }
#endif
    for (int64_t p = p0; p < p0 + len; ++p) mul_row<T>(y + p * C, x + p * C, s, T(1), nullptr, attn[p], C, stream);
  }
}

// elements [p0, p0 + len) of pooled slots [P, HW] (one image's pooled maps; or the global
// pooling's [P, N * C]): each repeated pooling slot copied from the first slot of its kind
// (imax / imean)
template <typename T>
void copy_repeated_slots(T* pooled, const std::vector<int64_t>& kinds, int64_t imax, int64_t imean, int64_t HW,
                         int64_t p0, int64_t len) {
  for (int64_t i = 0; i < int64_t(kinds.size()); ++i) {
    const int64_t src = kinds[i] == 0 ? imax : imean;
    if (src != i) std::copy(pooled + src * HW + p0, pooled + src * HW + p0 + len, pooled + i * HW + p0);
  }
}

// Forward of one image. pooled [P, HW], logits / attn [HW], y: this image's slices.
template <typename T, typename X>
void sam_forward_image(const X* x, const T* s, int64_t C, int64_t H, int64_t W, bool nhwc, const Gate<T>& q,
                       const std::vector<int64_t>& kinds, int64_t imax, int64_t imean, T* pooled, T* logits,
                       T* attn, X* y, bool stream, bool in_llc, int64_t prefetch, Scratch<T>& sc) {
  const int64_t HW = H * W, P = q.P, lag = q.g.ph;
  const int64_t R = band_rows(C * W * int64_t(sizeof(X)), lag, H, nhwc, W * int64_t(sizeof(X)), in_llc);
  sc.pad.assign(P * q.g.Hp * q.g.Wp, T(0));
  sc.spare.resize(R * W);
  int64_t done = 0;
  for (int64_t r0 = 0; r0 < H; r0 += R) {
    const int64_t r1 = std::min(H, r0 + R), p0 = r0 * W, len = (r1 - r0) * W;
    T* mx = imax >= 0 ? pooled + imax * HW + p0 : sc.spare.data();
    T* mean = imean >= 0 ? pooled + imean * HW + p0 : sc.spare.data();
    if (!nhwc) {
      pool_chunk<T, X>(x + p0, s, C, HW, len, mx, mean, prefetch);
    } else {
      pool_pixels<T, X>(x + p0 * C, s, C, len, mx, mean);
    }
    copy_repeated_slots<T>(pooled, kinds, imax, imean, HW, p0, len);
    for (int64_t i = 0; i < P; ++i)
      for (int64_t h = r0; h < r1; ++h)
        std::copy(pooled + i * HW + h * W, pooled + i * HW + (h + 1) * W,
                  sc.pad.data() + (i * q.g.Hp + h + q.g.ph) * q.g.Wp + q.g.pw);
    const int64_t g1 = r1 == H ? H : std::max(done, r1 - lag);
    if (g1 > done) {
      gate_rows<T>(q, sc.pad.data(), done, g1, logits, attn);
      mul_rows<T, X>(x, s, attn, y, C, HW, W, nhwc, done, g1, stream);
      done = g1;
    }
  }
  stream_fence(stream);
}

// Backward of one image. g: this image's upstream gradient (or the single broadcast value
// if GC); gextra: gradient w.r.t. the returned attention [HW] or null; gs: [C] or null;
// par: [P*KH*KW + 3] (grad weight, bias, norm scale, norm shift shares), added to.
template <typename T, typename X, bool GC, bool M, bool F>
void sam_backward_image(const X* x, const T* s, const X* g, int64_t C, int64_t H, int64_t W, bool nhwc,
                        const Gate<T>& q, const std::vector<int64_t>& kinds, const T* pooled, const T* mx,
                        const T* logits, const T* attn, const T* gextra, X* gx, T* gs, double* par, bool stream,
                        bool in_llc, int64_t prefetch, Scratch<T>& sc) {
  const int64_t HW = H * W, lag = q.g.ph, KK = q.g.KH * q.g.KW;
  const int64_t R =
      band_rows(C * W * int64_t(sizeof(X)) * (GC ? 1 : 2), lag, H, nhwc, W * int64_t(sizeof(X)), in_llc);
  const T gv = GC ? T(g[0]) : T(0);
  sc.pad.resize(q.P * q.g.Hp * q.g.Wp);
  pad_maps<T>(pooled, q.P, q.g, sc.pad.data());
  sc.dlpad.assign(q.g.Hp * q.g.Wp, T(0));
  sc.dA.resize(HW);
  sc.cnt.resize(HW);
  const bool by_index = max_by_index(M, nhwc, gs != nullptr);
  sc.ix.resize(by_index ? HW : 0);
  sc.dmax.resize(HW);
  sc.dmean.resize(HW);
  sc.row.resize(nhwc ? C : R * W + lag * W);
  T* dA = sc.dA.data();
  T* cnt = sc.cnt.data();
  T* ix = sc.ix.data();
  T* dmax = M ? sc.dmax.data() : nullptr;
  T* dmean = F ? sc.dmean.data() : nullptr;
  std::vector<double> gw(q.P * KK, 0.0);
  double small3[3] = {0, 0, 0};
  if (gs) sc.gs.assign(C, T(0));
  // NCHW: pass A records the max channels as bits, and pass B reads them instead of x
  // (not with the channel-scale gradient, which reads x anyway). Pass A's pixel ranges
  // then start at multiples of L, so that its bit stores are whole words.
  const bool bits = max_bits_wanted(M, nhwc, gs != nullptr);
  const int64_t mbs = bits ? max_bits_stride(HW) : 0;
  if (bits) sc.bits.resize(C * mbs);
  uint8_t* mb = bits ? sc.bits.data() : nullptr;
  constexpr int64_t L = lanes<T>();
  // NCHW images of short rows in one band: both passes in blocks of rows (reduce_rows_flat,
  // gradx_rows_flat; the max bits then flat; a channel scale by lanes)
  const int64_t frows = R == H ? backward_block_rows(nhwc, s || gs, C, HW) : 0;
  const bool flat = frows > 0;
  if (flat && s) {
    sc.ri.resize(frows * HW);
    row_index_tile(HW, frows, sc.ri.data());
  }
  int64_t done = 0, reduced = 0;
  for (int64_t r0 = 0; r0 < H; r0 += R) {
    const int64_t r1 = std::min(H, r0 + R);
    // pass A on the band: rows [r0, r1); NCHW pixels [reduced, the next multiple of L)
    const int64_t p0 = nhwc ? r0 * W : reduced;
    const int64_t len = (nhwc || r1 == H ? r1 * W : std::min(HW, (r1 * W + L - 1) / L * L)) - p0;
    reduced = p0 + len;
    if (flat) {
      reduce_rows_flat<T, X, GC, M>(x, s, sc.ri.data(), g, gv, M ? mx : nullptr, C, HW, frows, dA, cnt, mb,
                                    sc.flat);
    } else if (!nhwc) {
      if (len > 0)
        reduce_chunk<T, X, true, GC, M>(x + p0, s, GC ? g : g + p0, gv, M ? mx + p0 : nullptr, C, HW, len,
                                     dA + p0, cnt + p0, mb, mbs, p0, prefetch);
    } else {
      for (int64_t p = p0; p < p0 + len; ++p) {
        T i;
        if (by_index) {
          reduce_pixel<T, X, true, GC, M, true>(x + p * C, s, GC ? g : g + p * C, gv, mx[p], C, dA[p], cnt[p], i);
          ix[p] = i;
        } else {
          reduce_pixel<T, X, true, GC, M, false>(x + p * C, s, GC ? g : g + p * C, gv, M ? mx[p] : T(0), C, dA[p],
                                              cnt[p], i);
        }
      }
    }
    if (gextra)
      for (int64_t k = p0; k < p0 + len; ++k) dA[k] += gextra[k];
    dlogits_rows<T>(q, dA, attn, logits, r0, r1, sc.dlpad.data(), small3);
    dweight_rows<T>(q, sc.pad.data(), sc.dlpad.data(), r0, r1, gw.data());
    const int64_t d1 = r1 == H ? H : std::max(done, r1 - lag);
    if (d1 <= done) continue;
    dpooled_rows<T>(q, kinds, sc.dlpad.data(), cnt, C, done, d1, dmax, dmean);
    // pass B on rows [done, d1)
    const int64_t a0 = done * W, alen = (d1 - done) * W;
    if (flat) {
      const int32_t* ri = sc.ri.data();
      if (gs)
        gradx_rows_flat<T, X, GC, M, F, false, true>(x, s, ri, g, gv, attn, mx, dmax, dmean, C, HW, frows, gx,
                                                     sc.gs.data(), stream, mb, sc.flat);
      else if (bits)
        gradx_rows_flat<T, X, GC, M, F, true>(x, s, ri, g, gv, attn, mx, dmax, dmean, C, HW, frows, gx, nullptr,
                                              stream, mb, sc.flat);
      else
        gradx_rows_flat<T, X, GC, M, F, false>(x, s, ri, g, gv, attn, mx, dmax, dmean, C, HW, frows, gx, nullptr,
                                               stream, mb, sc.flat);
    } else if (!nhwc) {
      // the channel rows kPrefetchAhead bytes of work further on prefetched (rows.h)
      const int64_t ahead = pass_b_rows_ahead(stream, alen, int64_t(sizeof(X)));
      auto pass_b = [&](auto s_t, auto b_t) {
        rows_with_row_ahead(C, ahead, [&](auto pf_t, int64_t c0, int64_t c1) {
          for (int64_t c = c0; c < c1; ++c) {
            const T t = gradx_segment<T, X, true, GC, M, F, decltype(s_t)::value, decltype(b_t)::value,
                                      decltype(pf_t)::value>(
                x + c * HW + a0, GC ? nullptr : g + c * HW + a0, gv, s ? s[c] : T(1), attn + a0,
                M ? mx + a0 : nullptr, M ? dmax + a0 : nullptr, F ? dmean + a0 : nullptr, alen, gx + c * HW + a0,
                stream, sc.row.data(), mb ? mb + c * mbs : nullptr, a0, ahead * HW);
            if (gs) sc.gs[c] += t;
          }
        });
      };
      if (gs) pass_b(std::true_type{}, std::false_type{});
      else if (bits) pass_b(std::false_type{}, std::true_type{});
      else pass_b(std::false_type{}, std::false_type{});
    } else {
      // the max channel from the index map where no pixel of the rows has tied maxima
      // and the channel-scale gradient (which needs x) is not wanted
      auto pass_b = [&](auto x_t) {
        for (int64_t p = a0; p < a0 + alen; ++p)
          gradx_pixel<T, X, true, GC, M, F, decltype(x_t)::value>(
              x + p * C, GC ? nullptr : g + p * C, gv, attn[p], s, M ? mx[p] : T(0), by_index ? ix[p] : T(-1),
              M ? dmax[p] : T(0), F ? dmean[p] : T(0), C, gs ? sc.gs.data() : nullptr, gx + p * C, stream,
              sc.row.data());
      };
      if (by_index && !any_ties(cnt + a0, alen)) pass_b(std::false_type{}); else pass_b(std::true_type{});
    }
    done = d1;
  }
  stream_fence(stream);
  if (gs) std::copy(sc.gs.begin(), sc.gs.end(), gs);
  for (int64_t k = 0; k < q.P * KK; ++k) par[k] += gw[k];
  for (int k = 0; k < 3; ++k) par[q.P * KK + k] += small3[k];
}


}  // namespace
