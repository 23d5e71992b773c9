// CBAM inference in one call.
//
// Part of sam_cpu.cpp: the parts are included in order into one translation unit, each in the
// unit's anonymous namespace, and each uses the ones before it (see sam_cpu.cpp for the overview).
#pragma once

namespace {

// ---------------------------------------------------------------- CBAM inference
// CBAM (channel gate, then the SAM of x * gate) without autograd, in one call: global pooling
// of x (ch_kinds) -> the channel MLP (w1, b1, w2, b2 as channel_mlp_forward) -> sigmoid gate s
// [N, C] -> the SAM of x * s, with s rounded to x's dtype first, as the module path does.
// Returns {y, attn [N, 1, H, W], gate [N, C, 1, 1] in the compute dtype}. With fewer images than
// threads (batch-1 inference) all of it runs in one parallel region, each phase split between
// the threads and the phases separated by barriers (at 1x1024x13x13 the separate calls'
// parallel regions, allocations and the Python between them cost as much as the work); with
// more images, the three kernels run one after another. Either way the bits are those of
// global_pool, channel_mlp_forward and sam_forward called one by one.
std::vector<Tensor> cbam_forward(const Tensor& x, std::vector<int64_t> ch_kinds, const Tensor& w1,
                                 const optional<Tensor>& b1, const optional<Tensor>& w2, const optional<Tensor>& b2,
                                 const Tensor& weight, const optional<Tensor>& bias,
                                 const optional<Tensor>& norm_scale, const optional<Tensor>& norm_shift,
                                 std::vector<int64_t> kinds, int64_t dilation) {
  const Geo g = geometry(x);
  TORCH_CHECK(g.C > 0 && g.HW > 0, "spatialattn: cbam_forward: x must have channels and pixels, got ", x.sizes());
  TORCH_CHECK(!ch_kinds.empty() && !kinds.empty(), "spatialattn: cbam_forward: empty pooling order");
  check_gate_args(weight, kinds.size(), bias, norm_scale, norm_shift, dilation);  // before any work, either path
  if (g.N == 0 || whole_images(g.N) > 0) {
    const Tensor gate = channel_mlp_forward(global_pool(x, ch_kinds), w1, b1, w2, b2, false)[0];
    const Tensor s = gate.to(x.scalar_type()).view({g.N, g.C, 1, 1});
    const auto r = sam_forward(x, weight, bias, s, norm_scale, norm_shift, kinds, dilation, std::nullopt);
    return {r[0], r[1], gate.view({g.N, g.C, 1, 1})};
  }
  const int64_t Pc = ch_kinds.size(), P = kinds.size(), NC = g.N * g.C;
  const MlpParams mp = mlp_params(acc_type(x), g.C, w1, b1, w2, b2);
  const Tensor w = small(weight, x);
  const auto b = small_opt(bias, x), ns = small_opt(norm_scale, x), nsh = small_opt(norm_shift, x);
  const auto opts = acc_options(x).memory_format(at::MemoryFormat::Contiguous);
  Tensor gate = at::empty({g.N, g.C, 1, 1}, opts), attn = empty_map(g, 1, x), y = at::empty_like(x);
  SA_DISPATCH(x, "cbam_forward", [&] {
    using X = scalar_t;
    using T = acc_t<X>;
    const X* xp = x.data_ptr<X>();
    // scratch (not returned): global pooling [Pc, N, C], hidden [Pc * N, R], the SAM's pooled
    // maps [N, P, H, W] and logits [N, HW]
    std::unique_ptr<T[]> scratch(new T[NC * Pc + Pc * g.N * mp.R + g.N * (P + 1) * g.HW]);
    T* gpp = scratch.get();
    T* hp = gpp + NC * Pc;
    T* pooled = hp + Pc * g.N * mp.R;
    T* logits = pooled + g.N * P * g.HW;
    T* gt = gate.data_ptr<T>();
    int64_t cmax, cmean, imax, imean;
    first_slots(ch_kinds, cmax, cmean);
    first_slots(kinds, imax, imean);
    GlobalPool<T, X> gp(xp, g.N, g.C, g.HW, g.nhwc, cmax >= 0 ? gpp + cmax * NC : nullptr,
                        cmean >= 0 ? gpp + cmean * NC : nullptr, nullptr);
    ChannelMlp<T> mlp(gpp, mp.w1.data_ptr<T>(), dptr<T>(mp.b1), dptr<T>(mp.w2), dptr<T>(mp.b2),
                      hp, gt, Pc, g.N, g.C, mp.R);
    // the gate rounded to x's dtype (half formats), as the channel scale of the SAM
    std::vector<T> rounded(std::is_same<T, X>::value ? 0 : NC);
    const T* sp = rounded.empty() ? gt : rounded.data();
    const Gate<T> q{w.data_ptr<T>(), P, make_pad<T>(g.H, g.W, w.size(2), w.size(3), dilation), ptr_or_null<T>(b),
                    ptr_or_null<T>(ns), ptr_or_null<T>(nsh)};
    const bool stream = use_stream<X>(x.numel());
    const int64_t prefetch = row_prefetch_bytes<X>(x.numel());
    const int64_t nt = shared_threads(NC * g.HW * int64_t(sizeof(X)), g.N * g.H);
    in_one_region(nt, [&](int64_t t, int64_t nth, auto&& barrier) {
      int64_t i0, i1;  // this thread's share of a phase's items
      auto share = [&](int64_t items) {
        i0 = items * t / nth;
        i1 = items * (t + 1) / nth;
      };
      share(gp.items());
      gp.run(i0, i1);
      share(NC);  // NCHW: the rows gp.run just pooled (its items are the N * C rows)
      if (g.nhwc) {
        barrier();
        gp.combine(i0, i1);
      }
      copy_repeated_slots<T>(gpp, ch_kinds, cmax, cmean, NC, i0, i1 - i0);  // slots of NC outputs
      barrier();
      share(mp.R);
      mlp.layer1(i0, i1);
      barrier();
      if (mlp.by_q) {
        share(mlp.Q);
        mlp.transpose(i0, i1);
        barrier();
      }
      if (mlp.two) {
        share(mlp.layer2_items());
        mlp.layer2(i0, i1);
        mlp.combine(mlp.item_channel(i0), mlp.item_channel(i1));  // the channels this thread made
      } else {
        share(g.C);
        mlp.combine(i0, i1);
      }
      barrier();
      if (t == 0) {  // a few thousand elements: one thread, while the others wait
        gate.sigmoid_();  // torch's own sigmoid, as channel_mlp_forward
        for (int64_t i = 0; i < int64_t(rounded.size()); ++i) rounded[i] = T(X(gt[i]));
      }
      barrier();
      sam_forward_share<T, X>(t, nth, barrier, xp, sp, 0, g.N, g.C, g.H, g.W, g.nhwc, q, kinds, imax, imean,
                              pooled, logits, attn.data_ptr<T>(), y.data_ptr<X>(),
                              stream, prefetch);
    });
  });
  return {y, attn, gate};
}


}  // namespace
