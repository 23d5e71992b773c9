// Tensor helpers: geometry and layout checks, dtype dispatch, scale and map buffers.
//
// Part of sam_cpu.cpp: the parts are included in order into one translation unit, each in the
// unit's anonymous namespace, and each uses the ones before it (see sam_cpu.cpp for the overview).
#pragma once

namespace {

// ---------------------------------------------------------------- helpers
struct Geo {
  int64_t N, C, H, W, HW;
  bool nhwc;
};

Geo geometry(const Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "spatialattn: expected a 4-D tensor, got ", x.dim(), "-D");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "spatialattn cpu kernel: float32/float64/float16/bfloat16 only, got ", st);
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

// compute dtype of x's kernels (acc_t): float32 for float16 / bfloat16, else x's dtype
at::ScalarType acc_type(const Tensor& x) {
  const auto st = x.scalar_type();
  return (st == at::kHalf || st == at::kBFloat16) ? at::kFloat : st;
}

at::TensorOptions acc_options(const Tensor& x) { return x.options().dtype(acc_type(x)); }

// a small tensor (parameters, maps) in the compute dtype of x, contiguous
Tensor small(const Tensor& t, const Tensor& like) {
  return t.to(acc_type(like)).contiguous();
}

optional<Tensor> small_opt(const optional<Tensor>& t, const Tensor& like) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return small(*t, like);
}

// `out` where given (checked: the shape, strides and dtype of x, and either x itself or memory
// apart from it: a partly overlapping out would overwrite x before it is read), else a new
// tensor like x
Tensor output_like(const Tensor& x, const optional<Tensor>& out) {
  if (!(out.has_value() && out->defined())) return at::empty_like(x);
  TORCH_CHECK(out->sizes() == x.sizes() && out->strides() == x.strides() && out->scalar_type() == x.scalar_type(),
              "spatialattn: out= must have the shape, strides and dtype of x");
  at::assert_no_partial_overlap(*out, x);
  return *out;
}

// The small-map arguments of the fused SAM: weight [1, P, kh, kw] with odd kh, kw (the map
// keeps its size), one value each for the bias and the norm's scale and shift (given together),
// dilation >= 1 (a ValueError in Python, as the Triton path and spatialattn.functional raise).
void check_gate_args(const Tensor& weight, int64_t P, const optional<Tensor>& bias,
                     const optional<Tensor>& norm_scale, const optional<Tensor>& norm_shift, int64_t dilation) {
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(0) == 1 && weight.size(1) == P,
                    "spatialattn: weight must be (1, ", P, ", kh, kw), got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(2) % 2 == 1 && weight.size(3) % 2 == 1,
                    "spatialattn: weight: kernel size must be odd to keep the map size, got ", weight.size(2), "x",
                    weight.size(3));
  TORCH_CHECK_VALUE(dilation >= 1, "spatialattn: dilation must be >= 1, got ", dilation);
  const auto one = [](const optional<Tensor>& t, const char* name) {
    TORCH_CHECK_VALUE(!t.has_value() || !t->defined() || (t->dim() == 1 && t->numel() == 1), "spatialattn: ",
                      name, " must have shape (1,), got ", t->sizes());
  };
  one(bias, "bias");
  one(norm_scale, "norm_scale");
  one(norm_shift, "norm_shift");
  const bool has_scale = norm_scale.has_value() && norm_scale->defined();
  const bool has_shift = norm_shift.has_value() && norm_shift->defined();
  TORCH_CHECK_VALUE(has_scale == has_shift, "spatialattn: norm_scale and norm_shift go together");
}

// y is x (out=x): the kernel reads each line of its output first (see use_stream's output_read)
inline bool in_place(const Tensor& x, const Tensor& y) { return x.data_ptr() == y.data_ptr(); }

Tensor empty_map(const Geo& g, int64_t P, const Tensor& x) {
  return at::empty({g.N, P, g.H, g.W}, acc_options(x).memory_format(at::MemoryFormat::Contiguous));
}

// pooled [N, P, H, W] (compute dtype) from the pooling order.
template <typename T, typename X>
void pool_into(const Tensor& x, const Geo& g, const T* s, const std::vector<int64_t>& kinds,
               Tensor& pooled) {
  const int64_t P = kinds.size();
  int64_t imax = -1, imean = -1;
  for (int64_t i = 0; i < P; ++i) {
    if (kinds[i] == 0 && imax < 0) imax = i;
    if (kinds[i] == 1 && imean < 0) imean = i;
  }
  T* base = pooled.data_ptr<T>();
  k_pool<T, X>(x.data_ptr<X>(), s, g.N, g.C, g.HW, g.nhwc, imax >= 0 ? base + imax * g.HW : nullptr,
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
  return s->to(acc_type(x)).reshape({x.size(0), x.size(1)}).contiguous();
}

// x's dtype: X = storage type, T = compute type
#define SA_DISPATCH(x, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (x).scalar_type(), name, __VA_ARGS__)

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


}  // namespace
