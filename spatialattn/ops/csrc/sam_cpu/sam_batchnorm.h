// The fused SAM with a training-mode BatchNorm on its logits.
//
// Part of sam_cpu.cpp: the parts are included in order into one translation unit, each in the
// unit's anonymous namespace, and each uses the ones before it (see sam_cpu.cpp for the overview).
#pragma once

namespace {

// ---------------------------------------------------------------- SAM with a training-mode BatchNorm
// S sums over k in [0, M): f(k, a) adds element k's terms to a[0 .. S-1]. In eight lanes
// (lane l: the elements k = l mod 8 of the whole blocks of eight, in order), the lanes added
// in order, then the last M mod 8 elements: a fixed order (whatever the thread count), and
// eight independent chains instead of one (one double add chain over the 25k logits of
// 8x56x56 maps, at about 4 cycles an addition, is some 30 us per pass). Returns the S sums.
template <int S, typename F>
std::array<double, S> lane_sums(int64_t M, F&& f) {
  constexpr int64_t B = 8;
  double lane[B][S] = {};
  int64_t k = 0;
  for (; k + B <= M; k += B)
#pragma GCC unroll 8
    for (int64_t l = 0; l < B; ++l) f(k + l, lane[l]);
  std::array<double, S> out{};
  for (int64_t l = 0; l < B; ++l)
    for (int i = 0; i < S; ++i) out[i] += lane[l][i];
  for (; k < M; ++k) f(k, out.data());
  return out;
}

// z = (logits - mean) / sqrt(var + eps) * gamma + beta with the batch statistics of the
// logits (one channel, over N, H, W): the gate needs every image's logits first, so the
// work runs one phase at a time over the whole batch (pool + conv, statistics, gate +
// multiply; backward: reduce, BatchNorm and conv backward on the small maps, gradient).
// Returns (y, attn, logits, pooled, stats = [mean, biased var] in float64).
std::vector<Tensor> sam_forward_bn(const Tensor& x, const Tensor& weight, const optional<Tensor>& bias,
                                   const optional<Tensor>& scale, const optional<Tensor>& bn_weight,
                                   const optional<Tensor>& bn_bias, double eps, std::vector<int64_t> kinds,
                                   int64_t dilation) {
  Geo g = geometry(x);
  TORCH_CHECK(g.C > 0, "spatialattn: channel pooling over zero channels");
  const int64_t P = kinds.size(), M = g.N * g.HW;
  check_gate_args(weight, P, bias, std::nullopt, std::nullopt, dilation);
  TORCH_CHECK(M > 1, "spatialattn: Expected more than 1 value per channel when training, got input size ",
              x.sizes());
  Tensor s = flat_scale(scale, x);
  Tensor w = small(weight, x);
  auto b = small_opt(bias, x), gamma = small_opt(bn_weight, x), beta = small_opt(bn_bias, x);
  Tensor pooled = empty_map(g, P, x), logits = empty_map(g, 1, x), attn = empty_map(g, 1, x);
  Tensor y = at::empty_like(x);
  Tensor stats = at::empty({2}, x.options().dtype(at::kDouble));
  SA_DISPATCH(x, "sam_forward_bn", [&] {
    using X = scalar_t;
    using T = acc_t<X>;
    const X* xp = x.data_ptr<X>();
    const T* sp = dptr<T>(s);
    T* pp = pooled.data_ptr<T>();
    T* lp = logits.data_ptr<T>();
    T* ap = attn.data_ptr<T>();
    int64_t imax, imean;
    first_slots(kinds, imax, imean);
    const Gate<T> q{w.data_ptr<T>(), P, make_pad<T>(g.H, g.W, w.size(2), w.size(3), dilation), ptr_or_null<T>(b),
                    nullptr, nullptr};
    const int64_t PHW = P * g.HW;
    k_pool<T, X>(xp, sp, g.N, g.C, g.HW, g.nhwc, imax >= 0 ? pp + imax * g.HW : nullptr,
              imean >= 0 ? pp + imean * g.HW : nullptr, PHW);
    fill_repeated_slots<T>(pp, kinds, imax, imean, g.HW, 0, g.N);
    gate_images<T>(q, pp, 0, g.N, lp, ap);  // logits (attn is recomputed below with the statistics)
    const double mean = lane_sums<1>(M, [&](int64_t k, double* a) { a[0] += double(lp[k]); })[0] / double(M);
    const double var = lane_sums<1>(M, [&](int64_t k, double* a) {
                         const double d = double(lp[k]) - mean;
                         a[0] += d * d;
                       })[0] / double(M);
    const double invstd = 1.0 / std::sqrt(var + eps);
    stats.data_ptr<double>()[0] = mean;
    stats.data_ptr<double>()[1] = var;
    const double gm = gamma.has_value() ? double(gamma->data_ptr<T>()[0]) : 1.0;
    const double bt = beta.has_value() ? double(beta->data_ptr<T>()[0]) : 0.0;
    const T ns = T(gm * invstd), nsh = T(bt - mean * gm * invstd);
    constexpr int64_t L = lanes<T>();
    // (blocks of whole vectors, so that each element takes the same path whatever the threads;
    // the last logits, fewer than a vector, padded into one: every logit through vsigmoid)
    at::parallel_for(0, (M + L - 1) / L, 512, [&](int64_t b0, int64_t e0) {
      int64_t k = b0 * L;
      const int64_t e = std::min(M, e0 * L);
      for (; k + L <= e; k += L) vstore(ap + k, vsigmoid(vload(lp + k) * ns + nsh));
      if (k < e) {  // the last logits (fewer than a vector) through the same vsigmoid
        T t[L] = {};
        std::copy(lp + k, lp + e, t);
        const vec_t<T> a = vsigmoid(vload(t) * ns + nsh);
        for (int64_t i = 0; i < e - k; ++i) ap[k + i] = a[i];
      }
    });
    k_mul<T, X>(xp, sp, ap, y.data_ptr<X>(), g.N, g.C, g.HW, g.nhwc, use_stream<X>(x.numel()));
  });
  return {y, attn, logits, pooled, stats};
}

// BatchNorm2d's running statistics after a batch with `stats` = [mean, biased var] (float64)
// of `count` values, as ATen's CPU batch norm updates them: in double, rounded once,
// r = momentum * stat + (1 - momentum) * r with the unbiased variance; num_batches_tracked
// (if given) counts the batch, and momentum < 0 (None in Python) means the cumulative
// average 1 / num_batches_tracked. One call instead of nine small tensor ops (34 us on a
// 13x13 map, 12 % of a SpatialAttention training step there). Version counters are bumped
// as an in-place op would (the eval-mode affine cache keys on them).
void bn_update_running(const Tensor& running_mean, const Tensor& running_var, const optional<Tensor>& batches,
                       const Tensor& stats, int64_t count, double momentum) {
  TORCH_CHECK(running_mean.numel() == 1 && running_var.numel() == 1 && stats.numel() == 2 &&
                  stats.scalar_type() == at::kDouble && running_mean.is_cpu() && running_var.is_cpu(),
              "spatialattn: bn_update_running expects one-element CPU running statistics");
  TORCH_CHECK(count > 1, "spatialattn: running variance needs more than one value, got ", count);
  double factor = momentum < 0 ? 0.0 : momentum;  // (as BatchNorm2d.forward without a batch counter)
  if (batches.has_value() && batches->defined()) {
    const Tensor& b = *batches;
    TORCH_CHECK(b.numel() == 1 && b.scalar_type() == at::kLong && b.is_cpu(), "spatialattn: num_batches_tracked");
    const int64_t n = ++b.data_ptr<int64_t>()[0];
    b.unsafeGetTensorImpl()->bump_version();
    if (momentum < 0) factor = 1.0 / double(n);
  }
  const double* st = stats.data_ptr<double>();
  const double mean = st[0], unbiased = st[1] * double(count) / double(count - 1);
  auto update = [&](const Tensor& r, double stat) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "bn_update_running", [&] {
      scalar_t* p = r.data_ptr<scalar_t>();
      p[0] = scalar_t(factor * stat + (1.0 - factor) * double(p[0]));
    });
    r.unsafeGetTensorImpl()->bump_version();
  };
  update(running_mean, mean);
  update(running_var, unbiased);
}

// returns (grad_x, grad_scale, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias);
// undefined where not wanted.
std::vector<Tensor> sam_backward_bn(const Tensor& grad_y, const optional<Tensor>& grad_attn, const Tensor& x,
                                    const optional<Tensor>& scale, const Tensor& weight,
                                    const optional<Tensor>& bn_weight, const Tensor& attn, const Tensor& logits,
                                    const Tensor& pooled, const Tensor& stats, double eps,
                                    std::vector<int64_t> kinds, int64_t dilation, bool need_gs, bool need_gw,
                                    bool need_gb, bool need_gbn) {
  Geo g = geometry(x);
  const int64_t P = kinds.size(), M = g.N * g.HW;
  Tensor s = flat_scale(scale, x);
  Tensor w = small(weight, x);
  auto gamma = small_opt(bn_weight, x);
  const SamGrads r = sam_grads(grad_y, grad_attn, x, g, s, w, need_gs, need_gw, need_gb, need_gbn);
  const Tensor &gy = r.gy, &gx = r.gx, &gs = r.gs, &gw = r.gw, &gb = r.gb, &ggamma = r.g1, &gbeta = r.g2,
               &gextra = r.gextra;
  const bool gc = r.gc;
  SA_DISPATCH(x, "sam_backward_bn", [&] {
    using X = scalar_t;
    using T = acc_t<X>;
    const X* xp = x.data_ptr<X>();
    const T* sp = dptr<T>(s);
    const X* gyp = gy.data_ptr<X>();
    const T* pp = pooled.data_ptr<T>();  // the small maps from the forward: compute dtype, contiguous
    const T* lp = logits.data_ptr<T>();
    const T* ap = attn.data_ptr<T>();
    const T* ge = dptr<T>(gextra);
    int64_t imax, imean;
    first_slots(kinds, imax, imean);
    const Gate<T> q{w.data_ptr<T>(), P, make_pad<T>(g.H, g.W, w.size(2), w.size(3), dilation), nullptr, nullptr,
                    nullptr};
    const int64_t HW = g.HW, PHW = P * HW, KK = q.g.KH * q.g.KW;
    const T* mx = imax >= 0 ? pp + imax * HW : nullptr;
    const bool by_index = max_by_index(mx != nullptr, g.nhwc, gs.defined());
    std::vector<T> dA(M), cnt(mx ? M : 0), ix(by_index ? M : 0), dmax(mx ? M : 0), dmean(imean >= 0 ? M : 0);
    std::vector<uint8_t> bits = phase_max_bits(mx != nullptr, g.nhwc, gs.defined(), int64_t(x.nbytes()), g.N, g.C, HW);
    uint8_t* bp = bits.empty() ? nullptr : bits.data();
    // NCHW images of short rows: both passes in blocks of rows
    const int64_t frows = backward_block_rows(g.nhwc, sp != nullptr || gs.defined(), g.C, HW);
    k_reduce<T, X>(xp, sp, gyp, gc, mx, PHW, g.N, g.C, HW, g.nhwc, dA.data(), mx ? cnt.data() : nullptr,
                   by_index ? ix.data() : nullptr, bp, frows);
    if (ge)
      for (int64_t k = 0; k < M; ++k) dA[k] += ge[k];
    // BatchNorm backward on the logits (batch statistics)
    const double mean = stats.data_ptr<double>()[0], var = stats.data_ptr<double>()[1];
    const double invstd = 1.0 / std::sqrt(var + eps);
    const double gm = gamma.has_value() ? double(gamma->data_ptr<T>()[0]) : 1.0;
    const auto sz = lane_sums<2>(M, [&](int64_t k, double* a) {
      const double dz = double(dA[k]) * ((1.0 - double(ap[k])) * double(ap[k]));
      dA[k] = T(dz);  // dA now holds dz
      a[0] += dz;
      a[1] += dz * (double(lp[k]) - mean) * invstd;
    });
    const double s_dz = sz[0], s_dzx = sz[1];
    if (ggamma.defined()) ggamma.data_ptr<T>()[0] = T(s_dzx);
    if (gbeta.defined()) gbeta.data_ptr<T>()[0] = T(s_dz);
    const double k1 = gm * invstd, mdz = s_dz / double(M), mdzx = s_dzx / double(M);
    const double s_dl = lane_sums<1>(M, [&](int64_t k, double* a) {
      const double xhat = (double(lp[k]) - mean) * invstd;
      const double dl = k1 * (double(dA[k]) - mdz - xhat * mdzx);
      dA[k] = T(dl);  // dA now holds d logits
      a[0] += dl;
    })[0];
    if (gb.defined()) gb.data_ptr<T>()[0] = T(s_dl);
    // conv backward per image
    const int64_t NP = P * KK + 3;  // (the three bias / norm slots stay unused here)
    std::vector<double> par(g.N * NP, 0.0);
    small_maps_backward<T>(
        q, kinds, pp, g.N, mx ? cnt.data() : nullptr, g.C,
        [&](int64_t n, int64_t h0, int64_t h1, T* dlpad, double*) {
          for (int64_t h = h0; h < h1; ++h)
            std::copy(dA.data() + n * HW + h * g.W, dA.data() + n * HW + (h + 1) * g.W,
                      dlpad + (h + q.g.ph) * q.g.Wp + q.g.pw);
        },
        par.data(), mx ? dmax.data() : nullptr, imean >= 0 ? dmean.data() : nullptr);
    if (gw.defined()) {
      T* o = gw.data_ptr<T>();
      for (int64_t k = 0; k < P * KK; ++k) o[k] = T(image_total(par, g.N, NP, k));
    }
    k_gradx<T, X>(xp, sp, gyp, gc, ap, mx, PHW, mx ? dmax.data() : nullptr, imean >= 0 ? dmean.data() : nullptr,
                  g.N, g.C, HW, g.nhwc, gx.data_ptr<X>(), dptr<T>(gs), use_stream<X>(x.numel()),
                  by_index ? ix.data() : nullptr, mx ? cnt.data() : nullptr, bp, frows);
  });
  return r.pack(g);
}

// [P, N, C] (compute dtype of x): max / mean over H, W for each kind in `kinds`.
// (out [P, N, C], tie counts [N, C] or undefined): counts only with `counts`, for
// channels_last x with a max slot (what the backward then skips counting for)
std::vector<Tensor> global_pool_counted(const Tensor& x, const std::vector<int64_t>& kinds, bool counts) {
  Geo g = geometry(x);
  TORCH_CHECK(g.HW > 0, "spatialattn: global pooling over an empty H x W");
  const int64_t P = kinds.size();
  Tensor out = at::empty({P, g.N, g.C}, acc_options(x).memory_format(at::MemoryFormat::Contiguous));
  int64_t imax = -1, imean = -1;
  first_slots(kinds, imax, imean);
  Tensor cnt;
  if (counts && g.nhwc && imax >= 0) cnt = at::empty({g.N, g.C}, out.options());
  if (g.N * g.C == 0) return {out, cnt};
  SA_DISPATCH(x, "global_pool", [&] {
    using X = scalar_t;
    using T = acc_t<X>;
    T* o = out.data_ptr<T>();
    k_global_pool<T, X>(x.data_ptr<X>(), g.N, g.C, g.HW, g.nhwc, imax >= 0 ? o + imax * g.N * g.C : nullptr,
                        imean >= 0 ? o + imean * g.N * g.C : nullptr, dptr<T>(cnt));
    copy_repeated_slots<T>(o, kinds, imax, imean, g.N * g.C, 0, g.N * g.C);
  });
  return {out, cnt};
}

Tensor global_pool(const Tensor& x, std::vector<int64_t> kinds) { return global_pool_counted(x, kinds, false)[0]; }

// gradient of global_pool: grad [P, N, C], out = global_pool(x, kinds) -> grad_x; with
// `into` (a tensor with the dtype and strides of x), the gradient is added to it in place
// and it is returned; `counts`: the tie counts from global_pool_counted (or none)
Tensor global_pool_backward(const Tensor& grad, const Tensor& x, const Tensor& out, std::vector<int64_t> kinds,
                            const optional<Tensor>& into, const optional<Tensor>& counts) {
  Geo g = geometry(x);
  const bool acc = into.has_value() && into->defined();
  if (acc)
    TORCH_CHECK(into->sizes() == x.sizes() && into->strides() == x.strides() &&
                    into->scalar_type() == x.scalar_type(),
                "spatialattn: global_pool_backward into= must have the shape, strides and dtype of x");
  if (counts.has_value() && counts->defined())
    TORCH_CHECK(counts->numel() == g.N * g.C && counts->scalar_type() == acc_type(x) && counts->is_contiguous(),
                "spatialattn: global_pool_backward counts= must be a contiguous [N, C] tensor in the compute dtype "
                "of x");
  Tensor gx = acc ? *into : at::empty_like(x);
  if (x.numel() == 0) return gx;
  const Tensor gp = grad.to(acc_type(x)).contiguous();
  SA_DISPATCH(x, "global_pool_backward", [&] {
    using X = scalar_t;
    using T = acc_t<X>;
    Tensor gmax, fmean;
    Tensor mx;
    for (size_t i = 0; i < kinds.size(); ++i) {
      Tensor gi = gp.select(0, i);
      if (kinds[i] == 0) {
        gmax = gmax.defined() ? gmax + gi : gi.clone();
        if (!mx.defined()) mx = out.select(0, i).to(acc_type(x)).contiguous();
      } else {
        fmean = fmean.defined() ? fmean + gi : gi.clone();
      }
    }
    if (fmean.defined()) fmean = (fmean / double(g.HW)).contiguous();
    if (gmax.defined()) gmax = gmax.contiguous();
    k_global_pool_backward<T, X>(x.data_ptr<X>(), dptr<T>(mx), dptr<T>(gmax), dptr<T>(fmean), g.N, g.C, g.HW,
                                 g.nhwc, gx.data_ptr<X>(), use_stream<X>(x.numel(), acc), acc,
                              g.nhwc ? ptr_or_null<T>(counts) : nullptr);
  });
  return gx;
}



}  // namespace
