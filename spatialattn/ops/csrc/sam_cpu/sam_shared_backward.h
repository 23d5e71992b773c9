// Backward of the images left over by the whole-image split, in one parallel region.
//
// Part of sam_cpu.cpp: the parts are included in order into one translation unit, each in the
// unit's anonymous namespace, and each uses the ones before it (see sam_cpu.cpp for the overview).
#pragma once

namespace {

// ---------------------------------------------------------------- backward of the leftover images
// The images left over by whole_images (fewer than the threads; batch-1 training), in one
// parallel region. The rows of those images are cut into units of kBwdRows rows (fixed, so
// the sums below do not depend on the thread count) and each thread takes one contiguous run
// of units, which it streams as sam_backward_image streams an image: pass A on a group of
// units (d attn, tie counts), their d logits and weight-gradient shares, then pass B (grad_x,
// grad_scale) on the units whose k x k neighbourhood of d logits is complete. The second read
// of x and the gradient then comes from a cache instead of memory (the phases read them
// twice from memory: pass A over the whole batch, then pass B). A unit whose neighbourhood
// reaches into another thread's units waits until every thread has passed a barrier (at most
// ceil(lag / kBwdRows) units at each end of a run). Shares per unit: bias / norm / weight
// gradients (double) and the channel-scale gradient (T), summed in unit order per image.
// par: [N, P*KK + 3] image shares (images n0 .. n1 added to); gs: [N, C] zero-filled (images
// n0 .. n1 added to), or null.
// Taken only where the leftover images' x and upstream gradient exceed the LLC (above it the
// phases read both twice from memory; below, their second read comes from the LLC, and the
// units' shorter runs cost more than they save: measured 1.0-1.1x the phases' time at
// 1x128x104x104 and 1x64x208x208, 1.65x at 1x1024x13x13 NCHW). kSharedBwdBytes: that limit
// (< 0: the LLC; 0: always, for tests; set_shared_backward_bytes).
int64_t kSharedBwdBytes = -1;

inline bool shared_backward(int64_t bytes) {
  static const int64_t llc = llc_bytes();
  return bytes > (kSharedBwdBytes >= 0 ? kSharedBwdBytes : llc);
}

template <typename T, typename X, bool GC, bool M, bool F>
void sam_backward_shared(const X* x, const T* s, const X* g, int64_t n0, int64_t n1, int64_t C, int64_t H,
                         int64_t W, bool nhwc, const Gate<T>& q, const std::vector<int64_t>& kinds,
                         const T* pooled, const T* logits, const T* attn, const T* gextra, X* gx, T* gs,
                         double* par, bool stream, int64_t prefetch) {
  constexpr int64_t U = kBwdRows;
  const int64_t HW = H * W, CHW = C * HW, P = q.P, PHW = P * HW, KK = q.g.KH * q.g.KW, NP = P * KK + 3;
  const int64_t lag = q.g.ph, Nr = n1 - n0, nb = (H + U - 1) / U, NU = Nr * nb;
  const int64_t padsz = P * q.g.Hp * q.g.Wp, dlsz = q.g.Hp * q.g.Wp;
  int64_t imax, imean;
  first_slots(kinds, imax, imean);
  const bool by_index = max_by_index(M, nhwc, gs != nullptr);
  const T gv = GC ? T(g[0]) : T(0);
  // scratch of the leftover images (uninitialised: each element is written before it is read)
  auto raw = [](int64_t n) { return std::unique_ptr<T[]>(new T[std::max<int64_t>(1, n)]); };
  auto dA = raw(Nr * HW), cnt = raw(Nr * HW), ix = raw(by_index ? Nr * HW : 0), dmax = raw(M ? Nr * HW : 0),
       dmean = raw(F ? Nr * HW : 0), pads = raw(Nr * padsz), dlpads = raw(Nr * dlsz);
  std::vector<double> upar(NU * NP, 0.0);
  std::vector<T> ugs(gs ? NU * C : 0, T(0));
  // group of units per pass A (as band_rows: about the band budget of x and the gradient, lag
  // included; NCHW images up to whole_image_bytes whole)
  const int64_t row_bytes = C * W * int64_t(sizeof(X)) * (GC ? 1 : 2);
  const int64_t budget = nhwc ? kBandBytes : kBandBytesNchw;
  int64_t group = nb;
  if (kBandRows > 0) group = std::max<int64_t>(1, kBandRows / U);
  else if (budget > 0 && (nhwc || row_bytes * H > whole_image_bytes()))
    group = std::max<int64_t>(1, (budget / std::max<int64_t>(1, row_bytes) - lag) / U);
  // unit u: image n0 + u / nb, rows [row0(u), row1(u)); first / last unit whose d logits its
  // pass B needs
  auto row0 = [&](int64_t u) { return (u % nb) * U; };
  auto row1 = [&](int64_t u) { return std::min(H, row0(u) + U); };
  auto first_needed = [&](int64_t u) { return u - u % nb + std::max<int64_t>(0, row0(u) - lag) / U; };
  auto last_needed = [&](int64_t u) { return u - u % nb + std::min(H - 1, row1(u) - 1 + lag) / U; };
  const int64_t nt = shared_threads(Nr * CHW * int64_t(sizeof(X)), NU);
  in_one_region(nt, [&](int64_t t, int64_t nth, auto&& barrier) {
    // padded pooled maps and zeroed d-logit maps, rows split between the threads
    {
      const int64_t items = Nr * q.g.Hp, i0 = items * t / nth, i1 = items * (t + 1) / nth;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t k = i / q.g.Hp, hp = i % q.g.Hp;
        std::fill(dlpads.get() + k * dlsz + hp * q.g.Wp, dlpads.get() + k * dlsz + (hp + 1) * q.g.Wp, T(0));
        pad_rows<T>(pooled + (n0 + k) * PHW, P, q.g, pads.get() + k * padsz, hp, hp + 1);
      }
    }
    barrier();
    const int64_t ua = NU * t / nth, ub = NU * (t + 1) / nth;
    std::vector<T> gp(nhwc ? C : std::min<int64_t>(HW, U * W));
    // pass A, d logits and weight shares of units [u0, u1) of one image
    auto pass_a = [&](int64_t u0, int64_t u1) {
      const int64_t k = u0 / nb, h0 = row0(u0), h1 = row1(u1 - 1);
      const X* xk = x + (n0 + k) * CHW;
      const T* sk = s ? s + (n0 + k) * C : nullptr;
      const X* gk = GC ? g : g + (n0 + k) * CHW;
      const T* mk = M ? pooled + (n0 + k) * PHW + imax * HW : nullptr;
      T *dAk = dA.get() + k * HW, *ck = cnt.get() + k * HW;
      if (!nhwc) {
        constexpr int64_t kChunk = 4096;  // accumulators in L1 / L2 (as k_reduce)
        for (int64_t p0 = h0 * W; p0 < h1 * W; p0 += kChunk) {
          const int64_t len = std::min(kChunk, h1 * W - p0);
          reduce_chunk<T, X, true, GC, M>(xk + p0, sk, GC ? gk : gk + p0, gv, M ? mk + p0 : nullptr, C, HW, len,
                                       dAk + p0, ck + p0, nullptr, 0, 0, prefetch);
        }
      } else {
        for (int64_t p = h0 * W; p < h1 * W; ++p) {
          T i;
          if (by_index) {
            reduce_pixel<T, X, true, GC, M, true>(xk + p * C, sk, GC ? gk : gk + p * C, gv, mk[p], C, dAk[p], ck[p],
                                               i);
            ix[k * HW + p] = i;
          } else {
            reduce_pixel<T, X, true, GC, M, false>(xk + p * C, sk, GC ? gk : gk + p * C, gv, M ? mk[p] : T(0), C,
                                                dAk[p], ck[p], i);
          }
        }
      }
      if (gextra)
        for (int64_t p = h0 * W; p < h1 * W; ++p) dAk[p] += gextra[(n0 + k) * HW + p];
      for (int64_t u = u0; u < u1; ++u) {
        dlogits_rows<T>(q, dAk, attn + (n0 + k) * HW, logits + (n0 + k) * HW, row0(u), row1(u),
                        dlpads.get() + k * dlsz, upar.data() + u * NP + P * KK);
        dweight_rows<T>(q, pads.get() + k * padsz, dlpads.get() + k * dlsz, row0(u), row1(u), upar.data() + u * NP);
      }
    };
    // dmax / dmean and pass B of units [u0, u1) of one image
    auto pass_b = [&](int64_t u0, int64_t u1) {
      const int64_t k = u0 / nb, n = n0 + k, h0 = row0(u0), h1 = row1(u1 - 1);
      const X* xk = x + n * CHW;
      const T* sk = s ? s + n * C : nullptr;
      const X* gk = GC ? nullptr : g + n * CHW;
      const T* ak = attn + n * HW;
      const T* mk = M ? pooled + n * PHW + imax * HW : nullptr;
      const T* ck = cnt.get() + k * HW;
      T* fm = M ? dmax.get() + k * HW : nullptr;
      T* fa = F ? dmean.get() + k * HW : nullptr;
      X* gxk = gx + n * CHW;
      dpooled_rows<T>(q, kinds, dlpads.get() + k * dlsz, ck, C, h0, h1, fm, fa);
      if (!nhwc) {
        // the channel rows kPrefetchAhead bytes of work further on prefetched (rows.h)
        const int64_t ahead = pass_b_rows_ahead(stream, (h1 - h0) * W, int64_t(sizeof(X)));
        auto sweep = [&](auto s_t, auto pf_t, int64_t c0, int64_t c1) {
          for (int64_t c = c0; c < c1; ++c)
            for (int64_t u = u0; u < u1; ++u) {
              const int64_t a0 = row0(u) * W, len = (row1(u) - row0(u)) * W;
              const T sum = gradx_segment<T, X, true, GC, M, F, decltype(s_t)::value, false, decltype(pf_t)::value>(
                  xk + c * HW + a0, GC ? nullptr : gk + c * HW + a0, gv, sk ? sk[c] : T(1), ak + a0,
                  M ? mk + a0 : nullptr, M ? fm + a0 : nullptr, F ? fa + a0 : nullptr, len, gxk + c * HW + a0,
                  stream, gp.data(), nullptr, 0, ahead * HW);
              if (gs) ugs[u * C + c] = sum;
            }
        };
        auto rows = [&](auto s_t) {
          rows_with_row_ahead(C, ahead, [&](auto pf_t, int64_t c0, int64_t c1) { sweep(s_t, pf_t, c0, c1); });
        };
        if (gs) rows(std::true_type{}); else rows(std::false_type{});
      } else {
        for (int64_t u = u0; u < u1; ++u) {
          const int64_t a0 = row0(u) * W, a1 = row1(u) * W;
          auto sweep = [&](auto x_t) {
            for (int64_t p = a0; p < a1; ++p)
              gradx_pixel<T, X, true, GC, M, F, decltype(x_t)::value>(
                  xk + p * C, GC ? nullptr : gk + p * C, gv, ak[p], sk, M ? mk[p] : T(0),
                  by_index ? ix[k * HW + p] : T(-1), M ? fm[p] : T(0), F ? fa[p] : T(0), C,
                  gs ? ugs.data() + u * C : nullptr, gxk + p * C, stream, gp.data());
          };
          if (by_index && !any_ties(ck + a0, a1 - a0)) sweep(std::false_type{}); else sweep(std::true_type{});
        }
      }
    };
    // pass B of units [u0, u1), split where the image changes
    auto pass_b_runs = [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1;) {
        const int64_t e = std::min(u1, u - u % nb + nb);
        pass_b(u, e);
        u = e;
      }
    };
    int64_t next_b = ua, wait_a = ua;  // units [ua, wait_a) wait for the barrier
    for (int64_t u = ua; u < ub;) {
      const int64_t e = std::min(std::min(ub, u + group), u - u % nb + nb);
      pass_a(u, e);
      u = e;
      int64_t v = next_b;
      while (v < u && last_needed(v) < u) ++v;
      // the ready units [next_b, v); those reaching before ua wait (a prefix of the run)
      int64_t b0 = next_b;
      while (b0 < v && first_needed(b0) < ua) ++b0;
      if (b0 > next_b) wait_a = b0;
      pass_b_runs(b0, v);
      next_b = v;
    }
    barrier();
    pass_b_runs(ua, wait_a);
    pass_b_runs(next_b, ub);
    stream_fence(stream);
  });
  // image shares in unit order
  add_in_unit_order(upar.data(), Nr, nb, NP, par + n0 * NP);
  if (gs) add_in_unit_order(ugs.data(), Nr, nb, C, gs + n0 * C);
}

// Outputs and inputs shared by the two SAM backwards: the upstream gradient in the layout of
// x (gc: one broadcast value), grad_x, zero-filled grads of the channel scale [N, C], the conv
// weight and bias, two scalar grads (norm scale / shift, or BatchNorm weight / bias), and the
// gradient w.r.t. the returned attention as [N, HW] (or undefined).
struct SamGrads {
  Tensor gy, gx, gs, gw, gb, g1, g2, gextra;
  bool gc = false;
  std::vector<Tensor> pack(const Geo& g) const {
    return {gx, gs.defined() ? gs.view({g.N, g.C, 1, 1}) : gs, gw, gb, g1, g2};
  }
};

SamGrads sam_grads(const Tensor& grad_y, const optional<Tensor>& grad_attn, const Tensor& x, const Geo& g,
                   const Tensor& s, const Tensor& w, bool need_gs, bool need_gw, bool need_gb, bool need_g12) {
  SamGrads r;
  r.gy = upstream(grad_y, x, g, r.gc);
  r.gx = at::empty_like(x);
  if (s.defined() && need_gs) r.gs = at::zeros({g.N, g.C}, acc_options(x));
  if (need_gw) r.gw = at::zeros_like(w);
  if (need_gb) r.gb = at::zeros({1}, acc_options(x));
  if (need_g12) {
    r.g1 = at::zeros({1}, acc_options(x));
    r.g2 = at::zeros({1}, acc_options(x));
  }
  if (grad_attn.has_value() && grad_attn->defined())
    r.gextra = grad_attn->to(acc_type(x)).reshape({g.N, g.HW}).contiguous();
  return r;
}

// run(gc, m, f) with std::true_type / std::false_type for: the upstream gradient is one
// broadcast value, a max slot, a mean slot (at least one of the two slots)
template <typename R>
inline void with_backward_flags(bool gc, bool has_max, bool has_mean, R&& run) {
  using Y = std::true_type;
  using No = std::false_type;
  if (gc) {
    if (has_max && has_mean) run(Y{}, Y{}, Y{}); else if (has_max) run(Y{}, Y{}, No{}); else run(Y{}, No{}, Y{});
  } else {
    if (has_max && has_mean) run(No{}, Y{}, Y{}); else if (has_max) run(No{}, Y{}, No{}); else run(No{}, No{}, Y{});
  }
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
  const SamGrads r = sam_grads(grad_y, grad_attn, x, g, s, w, need_gs, need_gw, need_gb, need_gnorm && ns.has_value());
  const Tensor &gy = r.gy, &gx = r.gx, &gs = r.gs, &gw = r.gw, &gb = r.gb, &gns = r.g1, &gnsh = r.g2,
               &gextra = r.gextra;
  const bool gc = r.gc;
  if (x.numel() == 0) {
    r.gx.zero_();
    return r.pack(g);
  }
  SA_DISPATCH(x, "sam_backward", [&] {
    using X = scalar_t;
    using T = acc_t<X>;
    const X* xp = x.data_ptr<X>();
    const T* sp = dptr<T>(s);
    const X* gyp = gy.data_ptr<X>();
    const T* pp = pooled.data_ptr<T>();  // the small maps from the forward: compute dtype, contiguous
    const T* lp = logits.data_ptr<T>();
    const T* ap = attn.data_ptr<T>();
    const T* ge = dptr<T>(gextra);
    X* gxp = gx.data_ptr<X>();
    T* gsp = dptr<T>(gs);
    int64_t imax, imean;
    first_slots(kinds, imax, imean);
    const Gate<T> q{w.data_ptr<T>(), P, make_pad<T>(g.H, g.W, w.size(2), w.size(3), dilation), nullptr,
                    ptr_or_null<T>(ns), nullptr};  // backward uses only the norm scale
    const int64_t HW = g.HW, CHW = g.C * HW, PHW = P * HW, KK = q.g.KH * q.g.KW, NP = P * KK + 3;
    const bool stream = use_stream<X>(x.numel());
    const bool in_llc = fit_llc<X>(x.numel(), gc ? 2 : 3);  // x, the gradient (unless one value), grad_x
    const int64_t prefetch = row_prefetch_bytes<X>(x.numel());
    std::vector<double> par(g.N * NP, 0.0);
    const T* mx = imax >= 0 ? pp + imax * HW : nullptr;  // batch stride PHW
    const int64_t Nf = whole_images(g.N);
    if (Nf > 0) {
      at::parallel_for(0, Nf, 1, [&](int64_t b0, int64_t e0) {
        Scratch<T> sc;
        for (int64_t n = b0; n < e0; ++n) {
          auto run = [&](auto gc_t, auto m_t, auto f_t) {
            sam_backward_image<T, X, decltype(gc_t)::value, decltype(m_t)::value, decltype(f_t)::value>(
                xp + n * CHW, sp ? sp + n * g.C : nullptr, gc ? gyp : gyp + n * CHW, g.C, g.H, g.W, g.nhwc, q, kinds,
                pp + n * PHW, mx ? mx + n * PHW : nullptr, lp + n * HW, ap + n * HW, ge ? ge + n * HW : nullptr,
                gxp + n * CHW, gsp ? gsp + n * g.C : nullptr, par.data() + n * NP, stream, in_llc, prefetch, sc);
          };
          with_backward_flags(gc, mx != nullptr, imean >= 0, run);
        }
      });
    }
    if (Nf < g.N && shared_backward(int64_t(sizeof(X)) * (g.N - Nf) * CHW * (gc ? 1 : 2))) {
      // x and the gradient of the leftover images exceed the LLC: streamed in units of rows
      auto run = [&](auto gc_t, auto m_t, auto f_t) {
        sam_backward_shared<T, X, decltype(gc_t)::value, decltype(m_t)::value, decltype(f_t)::value>(
            xp, sp, gyp, Nf, g.N, g.C, g.H, g.W, g.nhwc, q, kinds, pp, lp, ap, ge, gxp, gsp, par.data(), stream,
            prefetch);
      };
      with_backward_flags(gc, mx != nullptr, imean >= 0, run);
    } else if (Nf < g.N) {
      // the remaining images, one phase at a time (their second reads come from the LLC)
      const int64_t Nr = g.N - Nf;
      const bool by_index = max_by_index(mx != nullptr, g.nhwc, gsp != nullptr);
      std::vector<T> dA(Nr * HW), cnt(mx ? Nr * HW : 0), ix(by_index ? Nr * HW : 0), dmax(mx ? Nr * HW : 0),
          dmean(imean >= 0 ? Nr * HW : 0);
      std::vector<uint8_t> bits =
          phase_max_bits(mx != nullptr, g.nhwc, gsp != nullptr, int64_t(sizeof(X)) * Nr * CHW, Nr, g.C, HW);
      uint8_t* bp = bits.empty() ? nullptr : bits.data();
      // NCHW images of short rows: both passes in blocks of rows, in
      // units over the threads (a batch-1 image's pixels are one chunk of k_reduce, one
      // thread; the streamed units above keep the rows)
      const int64_t frows = backward_block_rows(g.nhwc, sp != nullptr || gsp != nullptr, g.C, HW);
      // pass A: d attn = sum_c g * x' (+ the gradient of the returned attention), tie counts and index of the max
      // (channels_last) or the max bits (NCHW)
      k_reduce<T, X>(xp + Nf * CHW, sp ? sp + Nf * g.C : nullptr, gc ? gyp : gyp + Nf * CHW, gc,
                     mx ? mx + Nf * PHW : nullptr, PHW, Nr, g.C, HW, g.nhwc, dA.data(), mx ? cnt.data() : nullptr,
                     by_index ? ix.data() : nullptr, bp, frows);
      if (ge)
        for (int64_t k = 0; k < Nr * HW; ++k) dA[k] += ge[Nf * HW + k];
      // small maps: sigmoid', norm, transposed conv, parameter grads
      small_maps_backward<T>(
          q, kinds, pp + Nf * PHW, Nr, mx ? cnt.data() : nullptr, g.C,
          [&](int64_t k, int64_t h0, int64_t h1, T* dlpad, double* par3) {
            dlogits_rows<T>(q, dA.data() + k * HW, ap + (Nf + k) * HW, lp + (Nf + k) * HW, h0, h1, dlpad, par3);
          },
          par.data() + Nf * NP, mx ? dmax.data() : nullptr, imean >= 0 ? dmean.data() : nullptr);
      // pass B: grad_x and grad_scale
      k_gradx<T, X>(xp + Nf * CHW, sp ? sp + Nf * g.C : nullptr, gc ? gyp : gyp + Nf * CHW, gc, ap + Nf * HW,
                    mx ? mx + Nf * PHW : nullptr, PHW, mx ? dmax.data() : nullptr, imean >= 0 ? dmean.data() : nullptr,
                    Nr, g.C, HW, g.nhwc, gxp + Nf * CHW, gsp ? gsp + Nf * g.C : nullptr, stream,
                    by_index ? ix.data() : nullptr, mx ? cnt.data() : nullptr, bp, frows);
    }
    // parameter grads: image shares added in image order (independent of the thread count)
    auto total = [&](int64_t k) { return T(image_total(par, g.N, NP, k)); };
    if (gw.defined()) {
      T* o = gw.data_ptr<T>();
      for (int64_t k = 0; k < P * KK; ++k) o[k] = total(k);
    }
    if (gb.defined()) gb.data_ptr<T>()[0] = total(P * KK);
    if (gns.defined()) gns.data_ptr<T>()[0] = total(P * KK + 1);
    if (gnsh.defined()) gnsh.data_ptr<T>()[0] = total(P * KK + 2);
  });
  return r.pack(g);
}


}  // namespace
