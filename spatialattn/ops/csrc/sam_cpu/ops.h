// Entry points of the separate ops: channel pooling and gate multiply, forward and backward.
//
// Part of sam_cpu.cpp: the parts are included in order into one translation unit, each in the
// unit's anonymous namespace, and each uses the ones before it (see sam_cpu.cpp for the overview).
#pragma once

namespace {

// ================================================================ entry points

Tensor pool_forward(const Tensor& x, const optional<Tensor>& scale, std::vector<int64_t> kinds) {
  Geo g = geometry(x);
  TORCH_CHECK(g.C > 0, "spatialattn: channel pooling over zero channels");
  Tensor s = flat_scale(scale, x);
  Tensor pooled = empty_map(g, kinds.size(), x);
  if (g.N * g.HW == 0) return pooled;
  SA_DISPATCH(x, "pool_forward", [&] {
    using X = scalar_t;
    using T = acc_t<X>;
    pool_into<T, X>(x, g, dptr<T>(s), kinds, pooled);
  });
  return pooled;
}

// returns (grad_x, grad_scale [N, C, 1, 1] or undefined)
std::vector<Tensor> pool_backward(const Tensor& grad, const Tensor& x, const optional<Tensor>& scale,
                                  const Tensor& pooled, std::vector<int64_t> kinds, bool need_gs) {
  Geo g = geometry(x);
  Tensor s = flat_scale(scale, x);
  Tensor gp = grad.to(acc_type(x)).contiguous();
  Tensor gx = at::empty_like(x);
  Tensor gs = (s.defined() && need_gs) ? at::empty({g.N, g.C}, acc_options(x)) : Tensor();
  if (x.numel() == 0) {
    if (gs.defined()) gs.zero_();
    return {gx, gs.defined() ? gs.view({g.N, g.C, 1, 1}) : gs};
  }
  SA_DISPATCH(x, "pool_backward", [&] {
    using X = scalar_t;
    using T = acc_t<X>;
    Tensor mx = kind_value(pooled.to(acc_type(x)), kinds, 0);
    Tensor gmax = kind_grad(gp, kinds, 0), gmean = kind_grad(gp, kinds, 1);
    Tensor cnt, ix;
    if (mx.defined()) {
      cnt = at::empty({g.N, g.HW}, acc_options(x));
      if (max_by_index(true, g.nhwc, gs.defined())) ix = at::empty({g.N, g.HW}, acc_options(x));
      k_reduce<T, X>(x.data_ptr<X>(), dptr<T>(s), nullptr, false, mx.data_ptr<T>(), g.HW, g.N, g.C, g.HW, g.nhwc,
                     nullptr, cnt.data_ptr<T>(), dptr<T>(ix));
      gmax = (gmax.reshape({g.N, g.HW}) / cnt).contiguous();
    }
    if (gmean.defined()) gmean = (gmean / double(g.C)).contiguous();
    k_gradx<T, X>(x.data_ptr<X>(), dptr<T>(s), nullptr, false, nullptr, dptr<T>(mx), g.HW, dptr<T>(gmax),
                  dptr<T>(gmean), g.N, g.C, g.HW, g.nhwc, gx.data_ptr<X>(), dptr<T>(gs), use_stream<X>(x.numel()),
                  dptr<T>(ix), dptr<T>(cnt));
  });
  return {gx, gs.defined() ? gs.view({g.N, g.C, 1, 1}) : gs};
}

Tensor gate_forward(const Tensor& x, const Tensor& attn, const optional<Tensor>& scale,
                    const optional<Tensor>& out) {
  Geo g = geometry(x);
  Tensor s = flat_scale(scale, x);
  Tensor a = attn.to(acc_type(x)).expand({g.N, 1, g.H, g.W}).contiguous();
  Tensor y = output_like(x, out);
  if (x.numel() == 0) return y;
  SA_DISPATCH(x, "gate_forward", [&] {
    using X = scalar_t;
    using T = acc_t<X>;
    k_mul<T, X>(x.data_ptr<X>(), dptr<T>(s), a.data_ptr<T>(), y.data_ptr<X>(), g.N, g.C, g.HW, g.nhwc,
                use_stream<X>(x.numel(), in_place(x, y)));
  });
  return y;
}

// returns (grad_x, grad_attn [N, 1, H, W] or undefined, grad_scale [N, C, 1, 1] or undefined)
std::vector<Tensor> gate_backward(const Tensor& grad, const Tensor& x, const Tensor& attn,
                                  const optional<Tensor>& scale, bool need_gx, bool need_ga,
                                  bool need_gs) {
  Geo g = geometry(x);
  Tensor s = flat_scale(scale, x);
  Tensor a = attn.to(acc_type(x)).expand({g.N, 1, g.H, g.W}).contiguous();
  bool gc = false;
  Tensor gy = upstream(grad, x, g, gc);
  Tensor gx = need_gx ? at::empty_like(x) : Tensor();
  Tensor ga = need_ga ? empty_map(g, 1, x) : Tensor();
  Tensor gs = (s.defined() && need_gs) ? at::empty({g.N, g.C}, acc_options(x)) : Tensor();
  if (x.numel() == 0) {
    if (ga.defined()) ga.zero_();
    if (gs.defined()) gs.zero_();
  } else {
    SA_DISPATCH(x, "gate_backward", [&] {
      using X = scalar_t;
      using T = acc_t<X>;
      if (ga.defined())
        k_reduce<T, X>(x.data_ptr<X>(), dptr<T>(s), gy.data_ptr<X>(), gc, nullptr, 0, g.N, g.C, g.HW, g.nhwc,
                       ga.data_ptr<T>(), nullptr);
      if (gx.defined() || gs.defined())
        k_gradx<T, X>(x.data_ptr<X>(), dptr<T>(s), gy.data_ptr<X>(), gc, a.data_ptr<T>(), nullptr, 0, nullptr,
                      nullptr, g.N, g.C, g.HW, g.nhwc, dptr<X>(gx), dptr<T>(gs), use_stream<X>(x.numel()));
    });
  }
  return {gx, ga, gs.defined() ? gs.view({g.N, g.C, 1, 1}) : gs};
}


}  // namespace
