// The gate multiply y = (x * s) * a.
//
// Part of sam_cpu.cpp: the parts are included in order into one translation unit, each in the
// unit's anonymous namespace, and each uses the ones before it (see sam_cpu.cpp for the overview).
#pragma once

namespace {

// ---------------------------------------------------------------- y = (x * s) * a
template <typename T, typename X>
void k_mul(const X* x, const T* s, const T* a, X* y, int64_t N, int64_t C, int64_t HW, bool nhwc, bool stream) {
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


}  // namespace
