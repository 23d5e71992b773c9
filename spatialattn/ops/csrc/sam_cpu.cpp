// Fused CPU kernels for CBAM spatial attention (SAM).
//
// Built on first use by spatialattn.ops._cpp (torch.utils.cpp_extension.load, with
// -fopenmp: at::parallel_for is an inline template and runs on one thread without it).
// float32 / float64 / float16 / bfloat16 (half formats computed in float32, see "Storage and
// compute types"), NCHW-contiguous or channels_last-contiguous inputs. Hot loops use
// GCC/Clang vector extensions (64-byte vectors) so that they vectorise whatever the
// compiler thinks of compares and selects; no -ffast-math (NaN must propagate). Threads
// through at::parallel_for (torch's own OpenMP pool).
//
// Layout of the work (see "the fused SAM" below): whole images per thread, each image
// streamed in bands of rows so its second read comes from L2; non-temporal stores once
// input + output exceed the last-level cache.
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
#include <fstream>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__SSE2__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using at::Tensor;
using std::optional;

// GCC/Clang vector extensions: one 64-byte vector = one AVX-512 register, two AVX2
// ones, four SSE/NEON ones.
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

template <typename T>
inline void vstore(T* p, vec_t<T> v) {
  std::memcpy(p, &v, sizeof(v));
}
// {0, 1, ..., L - 1}
template <typename T>
inline vec_t<T> lane_index() {
  vec_t<T> v;
  for (int64_t l = 0; l < lanes<T>(); ++l) v[l] = T(l);
  return v;
}
template <typename T>
using lane_mask_t = decltype(vec_t<T>{} >= vec_t<T>{});

// Vector compares and selects. Where the target has no 64-byte vectors (the AVX2 build),
// GCC 12 splits the vector extensions' arithmetic into 256-bit halves but lowers a compare
// or a ?: on them to scalar code (a vucomiss / cmov per lane: that build's kernels were
// 2.5-5x slower than the AVX-512 build's on the same CPU). These keep them vectors there:
// compares per half through intrinsics, selects as bit operations. Elsewhere they are the
// vector extensions' own operators. The comparisons are the ordered ones (false for NaN)
// that ==, >, >=, < give; kNe is != (true for NaN).
enum VCmp { kEq, kGt, kGe, kLt, kNe };
// AVX2 builds (with F16C, as built here) write their hottest loops in 256-bit intrinsics
// instead: see pool_pixel_avx2
#if defined(__AVX2__) && defined(__F16C__) && !defined(__AVX512F__)
#define SAM_AVX2_HALVES 1
#else
#define SAM_AVX2_HALVES 0
#endif
#if defined(__AVX2__) && !defined(__AVX512F__)
template <int IMM>
inline __m256 cmp_half(__m256 a, __m256 b) {
  return _mm256_cmp_ps(a, b, IMM);
}
template <int IMM>
inline __m256d cmp_half(__m256d a, __m256d b) {
  return _mm256_cmp_pd(a, b, IMM);
}
#endif
template <VCmp OP, typename T>
inline lane_mask_t<T> vcmp(vec_t<T> a, vec_t<T> b) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  constexpr int imm = OP == kEq ? _CMP_EQ_OQ : OP == kGt ? _CMP_GT_OQ : OP == kGe ? _CMP_GE_OQ : OP == kLt ? _CMP_LT_OQ
                                                                                                      : _CMP_NEQ_UQ;
  using H = std::conditional_t<sizeof(T) == 4, __m256, __m256d>;  // one 256-bit half
  H x[2], y[2], r[2];
  std::memcpy(x, &a, sizeof(x));
  std::memcpy(y, &b, sizeof(y));
  r[0] = cmp_half<imm>(x[0], y[0]);
  r[1] = cmp_half<imm>(x[1], y[1]);
  lane_mask_t<T> m;
  std::memcpy(&m, r, sizeof(m));
  return m;
#else
  if constexpr (OP == kEq) return a == b;
  else if constexpr (OP == kGt) return a > b;
  else if constexpr (OP == kGe) return a >= b;
  else if constexpr (OP == kLt) return a < b;
  else return a != b;
#endif
}
// m ? a : b, lane by lane (m: all ones or all zeros per lane, as from vcmp)
template <typename T>
inline vec_t<T> vsel(lane_mask_t<T> m, vec_t<T> a, vec_t<T> b) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  lane_mask_t<T> x, y;
  std::memcpy(&x, &a, sizeof(x));
  std::memcpy(&y, &b, sizeof(y));
  x = (x & m) | (y & ~m);
  vec_t<T> r;
  std::memcpy(&r, &x, sizeof(r));
  return r;
#else
  return m ? a : b;
#endif
}

// The vectors of a row of `len` elements that accumulates into per-element slots:
// sweep(k, tail, keep) at k = 0, L, 2L, ... with tail = std::false_type, then, where len is
// not a multiple of L (and at least L), once at the vector ending at len with tail =
// std::true_type and keep = the lanes past the last full vector: the sweep keeps the
// accumulators it had in the other lanes (a blend, not an added zero, so the bits are those
// of the scalar loop it replaces). Returns the first element left for a scalar loop.
// Measured against that scalar tail: the pooling of 1x1024x13x13 (rows of 169 pixels) 0.93x
// the time on one thread, 0.99x on two (whose pixel chunks are 96 + 73); pass A 0.93x.
template <typename T, typename F>
inline int64_t vector_sweeps(int64_t len, F&& sweep) {
  constexpr int64_t L = lanes<T>();
  int64_t i = 0;
  for (; i + L <= len; i += L) sweep(i, std::false_type{}, lane_mask_t<T>{});
  if (i < len && len >= L) {
    const int64_t k = len - L;
    sweep(k, std::true_type{}, vcmp<kGe, T>(lane_index<T>(), vec_t<T>{} + T(i - k)));
    i = len;
  }
  return i;
}

// Max-channel bits (NCHW backward, AVX-512 and AVX2 builds): pass A, which compares every x' with
// the max for the tie count anyway, also stores the comparison as one bit per element (bit
// q of channel c's row: pixel q, relative to the first pixel the rows start at); pass B
// takes the max channels from the bits instead of reading x and comparing again. The bits
// are 1/32 of x (float32). AVX2 builds (SAM_AVX2_HALVES) take the bits from and to
// 256-bit masks (vmovmskps / a broadcast, and, compare); the baseline build keeps the compare.
#if (defined(__AVX512F__) && defined(__AVX512DQ__)) || SAM_AVX2_HALVES
constexpr bool kMaxBits = true;
#else
constexpr bool kMaxBits = false;
#endif
bool kUseMaxBits = true;  // off: pass B compares x with the max (tests: set_max_bits)

// The phases over several images (k_reduce / k_gradx: the leftover images, the training-mode
// BatchNorm) take the bits only where their x has at least this many bytes: below, x stays in
// L2 between the passes and the bits cost more than the read they save (measured, 2 threads:
// 1x1024x13x13 1.14x the time of the compare; 1x256x52x52 0.97-0.99x, 8x128x104x104 with
// the BatchNorm 0.92x). Whole images per thread take them at any size.
int64_t kMaxBitsPhaseBytes = 2 << 20;

// NCHW pass B takes the max channels from bits: with a max slot, without the channel-scale
// gradient; `bytes`: x's size (phases) or -1 (whole images per thread)
inline bool max_bits_wanted(bool has_max, bool nhwc, bool need_gs, int64_t bytes = -1) {
  return kMaxBits && kUseMaxBits && has_max && !nhwc && !need_gs && (bytes < 0 || bytes >= kMaxBitsPhaseBytes);
}

// bytes of one channel row of max bits for `len` pixels (room for get_bits' 4-byte reads)
inline int64_t max_bits_stride(int64_t len) { return (len + 7) / 8 + 8; }

// the lanes of m as bits (lane l -> bit l)
template <typename T>
inline uint32_t lane_bits(lane_mask_t<T> m) {
#if defined(__AVX512F__) && defined(__AVX512DQ__)
  __m512i i;
  std::memcpy(&i, &m, sizeof(i));
  if constexpr (sizeof(T) == 4) return _mm512_movepi32_mask(i);
  else return _mm512_movepi64_mask(i);
#elif SAM_AVX2_HALVES
  if constexpr (sizeof(T) == 4) {
    __m256 h[2];
    std::memcpy(h, &m, sizeof(h));
    return uint32_t(_mm256_movemask_ps(h[0])) | (uint32_t(_mm256_movemask_ps(h[1])) << 8);
  } else {
    __m256d h[2];
    std::memcpy(h, &m, sizeof(h));
    return uint32_t(_mm256_movemask_pd(h[0])) | (uint32_t(_mm256_movemask_pd(h[1])) << 4);
  }
#else
  uint32_t b = 0;
  for (int64_t l = 0; l < lanes<T>(); ++l) b |= uint32_t(m[l] != 0) << l;
  return b;
#endif
}

#if SAM_AVX2_HALVES
// 8 lanes of float32 (AVX2 builds): v in the lanes whose bit of b (bits 0-7) is set, +0 elsewhere
inline __m256 where_bits8(uint32_t b, __m256 v) {
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i m = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(int(b)), sel), sel);
  return _mm256_and_ps(_mm256_castsi256_ps(m), v);
}
#endif

// v in the lanes whose bit is set, +0 elsewhere
template <typename T>
inline vec_t<T> where_bits(uint32_t b, vec_t<T> v) {
#if defined(__AVX512F__) && defined(__AVX512DQ__)
  if constexpr (sizeof(T) == 4) {
    __m512 f;
    std::memcpy(&f, &v, sizeof(f));
    f = _mm512_maskz_mov_ps(__mmask16(b), f);
    std::memcpy(&v, &f, sizeof(v));
  } else {
    __m512d f;
    std::memcpy(&f, &v, sizeof(f));
    f = _mm512_maskz_mov_pd(__mmask8(b), f);
    std::memcpy(&v, &f, sizeof(v));
  }
  return v;
#elif SAM_AVX2_HALVES
  if constexpr (sizeof(T) == 4) {
    __m256 h[2];
    std::memcpy(h, &v, sizeof(h));
    h[0] = where_bits8(b & 0xffu, h[0]);
    h[1] = where_bits8(b >> 8, h[1]);
    std::memcpy(&v, h, sizeof(v));
  } else {
    const __m256i sel = _mm256_setr_epi64x(1, 2, 4, 8);
    __m256d h[2];
    std::memcpy(h, &v, sizeof(h));
    for (int j = 0; j < 2; ++j) {
      const __m256i bj = _mm256_set1_epi64x(int64_t((b >> (4 * j)) & 0xfu));
      h[j] = _mm256_and_pd(_mm256_castsi256_pd(_mm256_cmpeq_epi64(_mm256_and_si256(bj, sel), sel)), h[j]);
    }
    std::memcpy(&v, h, sizeof(v));
  }
  return v;
#else
  for (int64_t l = 0; l < lanes<T>(); ++l) v[l] = (b >> l) & 1u ? v[l] : T(0);
  return v;
#endif
}

// the L bits of pixels [q, q + L) of a row of max bits
// (L: a vector's lanes, 8 or 16; AVX2 builds' 256-bit float32 vectors take 8)
template <int64_t L>
inline uint32_t get_bits(const uint8_t* row, int64_t q) {
  static_assert(L == 8 || L == 16);
  uint32_t w;
  std::memcpy(&w, row + (q >> 3), sizeof(w));
  return (w >> (q & 7)) & ((uint32_t(1) << L) - 1);
}

// store the L bits (8 or 16) of pixels [q, q + L); q a multiple of L: one plain store
template <int64_t L>
inline void put_bits(uint8_t* row, int64_t q, uint32_t b) {
  static_assert(L == 8 || L == 16);
  if ((q & (L - 1)) == 0) {
    if constexpr (L == 16) {
      const uint16_t h = uint16_t(b);
      std::memcpy(row + (q >> 3), &h, sizeof(h));
    } else {
      row[q >> 3] = uint8_t(b);
    }
    return;
  }
  uint32_t w;
  std::memcpy(&w, row + (q >> 3), sizeof(w));
  const uint32_t keep = ~(((uint32_t(1) << L) - 1) << (q & 7));
  w = (w & keep) | (b << (q & 7));
  std::memcpy(row + (q >> 3), &w, sizeof(w));
}

inline void put_bit(uint8_t* row, int64_t q, bool b) {
  const uint8_t m = uint8_t(1u << (q & 7));
  row[q >> 3] = b ? uint8_t(row[q >> 3] | m) : uint8_t(row[q >> 3] & ~m);
}
inline bool get_bit(const uint8_t* row, int64_t q) { return (row[q >> 3] >> (q & 7)) & 1u; }

// Storage and compute types. float16 / bfloat16 tensors are read and written in their own
// format and all arithmetic runs in float32: X (storage) is the element type of the
// full-size tensors (x, the upstream gradient, y, grad_x), T = acc_t<X> (compute) that of
// everything else (channel scale, pooled maps, logits, gates, small gradients, scratch).
// For float32 / float64 the two are the same.
template <typename X>
struct AccOf {
  typedef X type;
};
template <>
struct AccOf<at::Half> {
  typedef float type;
};
template <>
struct AccOf<at::BFloat16> {
  typedef float type;
};
template <typename X>
using acc_t = typename AccOf<X>::type;

// vld / vst: lanes<T>() consecutive elements of storage type X as one vec_t<T>. Half
// formats convert on the way (bfloat16: shift / round-to-nearest-even like c10::BFloat16,
// NaN -> quiet NaN; float16: the F16C / AVX-512 conversions, round-to-nearest-even).
template <typename T>
  requires std::is_floating_point_v<T>
inline vec_t<T> vld(const T* p) {
  return vload(p);
}
template <typename T>
  requires std::is_floating_point_v<T>
inline void vst(T* p, vec_t<T> v) {
  vstore(p, v);
}

typedef uint16_t u16x16_t __attribute__((vector_size(32)));
typedef uint32_t u32x16_t __attribute__((vector_size(64)));

// (AVX-512: explicit intrinsics; GCC splits the generic widening load into 256-bit halves
// and narrows with a 3-uop word permute)
inline vec_t<float> vld(const at::BFloat16* p) {
  vec_t<float> v;
#if defined(__AVX512F__)
  const __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
  std::memcpy(&v, &w, sizeof(v));
#else
  u16x16_t h;
  std::memcpy(&h, p, sizeof(h));
  const u32x16_t w = __builtin_convertvector(h, u32x16_t) << 16;
  std::memcpy(&v, &w, sizeof(v));
#endif
  return v;
}

// float32 -> bfloat16 bits by integer operations: round to nearest even, NaN -> 0x7FC0 (as
// c10::BFloat16)
inline u16x16_t bf16_bits_rne(vec_t<float> v) {
  u16x16_t h;
#if defined(__AVX512F__)
  __m512 f;
  std::memcpy(&f, &v, sizeof(f));
  const __m512i b = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  const __m256i n = _mm512_cvtepi32_epi16(r);
  std::memcpy(&h, &n, sizeof(h));
#else
  u32x16_t b;
  std::memcpy(&b, &v, sizeof(b));
  u32x16_t r = (b + ((b >> 16) & 1u) + 0x7FFFu) >> 16;
  const u32x16_t nan = u32x16_t(vcmp<kNe, float>(v, v));
  r = (r & ~nan) | (nan & 0x7FC0u);
  h = __builtin_convertvector(r, u16x16_t);
#endif
  return h;
}

// float32 -> bfloat16 bits, round to nearest even. With AVX512-BF16 (built for CPUs that have
// it) one vcvtneps2bf16, except for vectors holding a float32 subnormal, which that instruction
// flushes to zero and c10::BFloat16 does not: those take the integer sequence (measured: the
// bfloat16 product 0.70-0.77x the time, the forward 0.80-0.86x, the backward 0.90-0.98x).
// NaN stays NaN either way (the instruction keeps the payload; the sequence gives 0x7FC0).
inline u16x16_t bf16_bits(vec_t<float> v) {
#if defined(__AVX512BF16__)
  __m512 f;
  std::memcpy(&f, &v, sizeof(f));
  if (__builtin_expect(_mm512_fpclass_ps_mask(f, 0x20) == 0, 1)) {  // 0x20: subnormal
    const __m256bh b = _mm512_cvtneps_pbh(f);
    u16x16_t h;
    std::memcpy(&h, &b, sizeof(h));
    return h;
  }
#endif
  return bf16_bits_rne(v);
}

inline void vst(at::BFloat16* p, vec_t<float> v) {
  const u16x16_t h = bf16_bits(v);
  std::memcpy(p, &h, sizeof(h));
}

inline vec_t<float> vld(const at::Half* p) {
  vec_t<float> v;
#if defined(__AVX512F__)
  const __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  std::memcpy(&v, &f, sizeof(v));
#elif defined(__F16C__)
  const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  std::memcpy(&v, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&v) + 32, &hi, 32);
#else
  for (int l = 0; l < 16; ++l) v[l] = float(p[l]);
#endif
  return v;
}

inline void vst(at::Half* p, vec_t<float> v) {
#if defined(__AVX512F__)
  __m512 f;
  std::memcpy(&f, &v, sizeof(f));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__)
  __m256 lo, hi;
  std::memcpy(&lo, &v, 32);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + 32, 32);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8), _mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  for (int l = 0; l < 16; ++l) p[l] = at::Half(v[l]);
#endif
}

#if defined(__AVX512F__)
// non-temporal vector stores; p aligned to the vector's storage size (64 / 32 bytes)
inline void vst_nt(float* p, vec_t<float> v) {
  __m512 f;
  std::memcpy(&f, &v, sizeof(f));
  _mm512_stream_ps(p, f);
}
inline void vst_nt(at::Half* p, vec_t<float> v) {
  __m512 f;
  std::memcpy(&f, &v, sizeof(f));
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void vst_nt(at::BFloat16* p, vec_t<float> v) {
  const u16x16_t h = bf16_bits(v);
  __m256i m;
  std::memcpy(&m, &h, sizeof(m));
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), m);
}
#endif

#if SAM_AVX2_HALVES
// 256-bit helpers of the AVX2 builds' loops (see pool_pixel_avx2)
template <typename X>
inline __m256 ld8(const X*) {  // (the specialisations below: float32, float16, bfloat16)
  static_assert(sizeof(X) == 0, "ld8: float32, float16 or bfloat16 storage");
  return _mm256_setzero_ps();
}
template <>
inline __m256 ld8<float>(const float* p) {
  return _mm256_loadu_ps(p);
}
template <>
inline __m256 ld8<at::Half>(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <>
inline __m256 ld8<at::BFloat16>(const at::BFloat16* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
// 8 elements of storage type X from one float32 vector, rounded as vst rounds them
// (float16: F16C, nearest even; bfloat16: bf16_bits_rne's integer sequence, NaN -> 0x7FC0)
inline __m128i f16_bits8(__m256 v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline __m128i bf16_bits8(__m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, lsb), _mm256_set1_epi32(0x7FFF)), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));  // (all <= 0xFFFF)
}
inline void st8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void st8(at::Half* p, __m256 v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), f16_bits8(v)); }
inline void st8(at::BFloat16* p, __m256 v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bf16_bits8(v)); }
// non-temporal: p aligned to 8 elements (32 bytes float32, 16 bytes the half formats)
inline void st8_nt(float* p, __m256 v) { _mm256_stream_ps(p, v); }
inline void st8_nt(at::Half* p, __m256 v) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), f16_bits8(v)); }
inline void st8_nt(at::BFloat16* p, __m256 v) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), bf16_bits8(v)); }
// The 256-bit loops below are taken for a float32 compute type, whose storage types (X with
// acc_t<X> = float: float32, float16, bfloat16) are the ones ld8 / st8 convert.
// vmax(m, v) = v > m ? v : m (maxps returns its second operand where either is NaN)
inline __m256 vmax8(__m256 m, __m256 v) { return _mm256_max_ps(v, m); }
// hreduce<float, 64> of the 64-byte vector whose halves are lo, hi
inline float hreduce8(__m256 lo, __m256 hi, bool is_max) {
  if (is_max) {
    const __m256 a = _mm256_max_ps(hi, lo);
    __m128 b = _mm_max_ps(_mm256_extractf128_ps(a, 1), _mm256_castps256_ps128(a));
    b = _mm_max_ps(_mm_movehl_ps(b, b), b);
    return _mm_cvtss_f32(_mm_max_ss(_mm_movehdup_ps(b), b));
  }
  const __m256 a = _mm256_add_ps(lo, hi);
  __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  b = _mm_add_ps(b, _mm_movehl_ps(b, b));
  return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
}
#endif

constexpr int64_t kLanes = 32;  // pixel chunks are whole multiples of this

template <typename T>
inline T vmax(T m, T v) {
  // compiles to a vector max; drops NaN (like maxps). NaN is restored afterwards:
  // a NaN in the channels makes the (always computed) sum NaN, and only then
  // the channels are scanned again (see fix_nan_max).
  return v > m ? v : m;
}
inline vec_t<float> vmax(vec_t<float> m, vec_t<float> v) { return vsel<float>(vcmp<kGt, float>(v, m), v, m); }
inline vec_t<double> vmax(vec_t<double> m, vec_t<double> v) { return vsel<double>(vcmp<kGt, double>(v, m), v, m); }

// x' at one pixel: channel c at x[c * cstride] * s[c]; true if one is NaN.
template <typename X, typename T>
bool any_nan(const X* x, const T* s, int64_t C, int64_t cstride) {
  for (int64_t c = 0; c < C; ++c) {
    T v = s ? T(x[c * cstride]) * s[c] : T(x[c * cstride]);
    if (v != v) return true;
  }
  return false;
}

// Non-temporal stores pay once input + output do not fit in the last-level cache
// (PERF-NOTES: 2.7x -> 1.35x clone there) and hurt when they do (measured here: the
// 11 MB forward became 1.5-2.5x slower with them). The threshold is the
// last-level cache size the C library reports (32 MiB if it does not); adjustable at
// run time (spatialattn.ops._cpp.get().set_stream_bytes, a negative value restores
// the default) for measurements.
int64_t kStreamBytes = -1;

// Size of the last-level cache one core sees. sysconf(_SC_LEVEL3_CACHE_SIZE) is not it:
// on AMD EPYC virtual machines it reports the whole socket (320 MiB where a core shares
// 32 MiB), so Linux's per-instance sysfs entry comes first.
inline int64_t llc_bytes() {
  for (int i = 0; i < 8; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    std::ifstream level(dir + "level"), size(dir + "size");
    int lv = 0;
    std::string sz;
    if (!(level >> lv) || !(size >> sz)) continue;
    if (lv != 3 || sz.empty()) continue;
    int64_t v = std::atoll(sz.c_str());
    const char unit = sz.back();
    if (unit == 'K') v <<= 10;
    if (unit == 'M') v <<= 20;
    if (v > 0) return v;
  }
  return int64_t(32) << 20;
}

inline int64_t stream_threshold() {
  if (kStreamBytes >= 0) return kStreamBytes;
  static const int64_t llc = llc_bytes();
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
// as in the reference (in T; d and x in their storage types). With `stream`, float32 /
// float16 / bfloat16 rows use non-temporal stores.
#if SAM_AVX2_HALVES
// mul_row for float32 in AVX2 builds (see SAM_AVX2_HALVES), not in place, n >= 8: 256-bit
// vectors; cached: a head vector, aligned vectors from the first 32-byte boundary of d,
// the tail as one vector ending at n (overlapped elements written again, the same values);
// with `stream`, non-temporal stores from that boundary (the generic code streams only in
// AVX-512 builds).
// (x * s) * a for 8 elements from x: the product of the AVX2 multiply loops (mul_row_avx2 and
// mul_rows' channels_last run), in one order so that both give the same bits
template <typename X>
inline __m256 prod8(const X* x, __m256 s, __m256 a) {
  return _mm256_mul_ps(_mm256_mul_ps(ld8(x), s), a);
}

template <bool HS, bool HA, typename XD, typename XS>
inline void mul_row_avx2(XD* d, const XS* x, const float* sv, float ss, const float* av, float as, int64_t n,
                         bool stream) {
  const __m256 vss = _mm256_set1_ps(ss), vas = _mm256_set1_ps(as);
  auto at = [&](int64_t k) {
    return prod8(x + k, HS ? _mm256_loadu_ps(sv + k) : vss, HA ? _mm256_loadu_ps(av + k) : vas);
  };
  auto one = [&](int64_t k) { d[k] = XD((float(x[k]) * (HS ? sv[k] : ss)) * (HA ? av[k] : as)); };
  constexpr uintptr_t vb = 8 * sizeof(XD);  // bytes of d per vector
  int64_t i = int64_t(((uintptr_t(0) - reinterpret_cast<uintptr_t>(d)) & (vb - 1)) / sizeof(XD));
  if (stream) {
    for (int64_t k = 0; k < i && k < n; ++k) one(k);
    for (; i + 8 <= n; i += 8) st8_nt(d + i, at(i));
    for (; i < n; ++i) one(i);
    return;
  }
  st8(d, at(0));
  if (i == 0) i = 8;
  for (; i + 8 <= n; i += 8) st8(d + i, at(i));
  if (i < n) st8(d + n - 8, at(n - 8));
}
#endif

template <typename T, typename XD, typename XS>
inline void mul_row(XD* d, const XS* x, const T* sv, T ss, const T* av, T as, int64_t n, bool stream) {
  using V = vec_t<T>;
  constexpr int64_t L = lanes<T>();
  int64_t i = 0;
#if SAM_AVX2_HALVES
  if constexpr (std::is_same_v<T, float>) {
    if (n >= 8 && static_cast<const void*>(d) != static_cast<const void*>(x)) {
      if (sv && av) mul_row_avx2<true, true>(d, x, sv, ss, av, as, n, stream);
      else if (sv) mul_row_avx2<true, false>(d, x, sv, ss, av, as, n, stream);
      else if (av) mul_row_avx2<false, true>(d, x, sv, ss, av, as, n, stream);
      else mul_row_avx2<false, false>(d, x, sv, ss, av, as, n, stream);
      return;
    }
  }
#endif
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    if (stream) {
      constexpr uintptr_t align = uintptr_t(L) * sizeof(XD);
      for (; i < n && (reinterpret_cast<uintptr_t>(d + i) & (align - 1)); ++i)
        d[i] = XD((T(x[i]) * (sv ? sv[i] : ss)) * (av ? av[i] : as));
      const V vss = V{} + ss, vas = V{} + as;
      for (; i + L <= n; i += L) {
        const V xs = vld(x + i) * (sv ? vload(sv + i) : vss);
        vst_nt(d + i, xs * (av ? vload(av + i) : vas));
      }
    }
  }
#endif
  (void)stream;
  if constexpr (!std::is_same<XD, T>::value || !std::is_same<XS, T>::value) {
    // a half format on either side: explicit vectors (the conversions keep the compiler
    // from vectorising the scalar loops below)
    const V vss = V{} + ss, vas = V{} + as;
    auto run = [&](auto s_t, auto a_t) {  // the vector / scalar choices out of the loop
      constexpr bool HS = decltype(s_t)::value, HA = decltype(a_t)::value;
      for (; i + L <= n; i += L) vst(d + i, (vld(x + i) * (HS ? vload(sv + i) : vss)) * (HA ? vload(av + i) : vas));
    };
    using Y = std::true_type;
    using No = std::false_type;
    if (sv && av) run(Y{}, Y{}); else if (sv) run(Y{}, No{}); else if (av) run(No{}, Y{}); else run(No{}, No{});
    for (; i < n; ++i) d[i] = XD((T(x[i]) * (sv ? sv[i] : ss)) * (av ? av[i] : as));
    return;
  }
  if constexpr (std::is_same<XD, T>::value && std::is_same<XS, T>::value) {
    if (i == 0 && n >= L && static_cast<const void*>(d) != static_cast<const void*>(x)) {
      // explicit vectors, the row's tail as one vector ending at n (its overlapped elements
      // are written again with the same values; not in place, where they would be read back
      // as outputs). Measured (with the pooling tails below): the NCHW forward 0.94-0.98x the
      // time at 13x13 and 26x26; plain unaligned vectors had been 1.19x slower at 26x26.
      const V vss = V{} + ss, vas = V{} + as;
      auto run = [&](auto s_t, auto a_t) {
        constexpr bool HS = decltype(s_t)::value, HA = decltype(a_t)::value;
        auto at = [&](int64_t k) {
          vstore(d + k, (vload(x + k) * (HS ? vload(sv + k) : vss)) * (HA ? vload(av + k) : vas));
        };
        // a head vector, then vectors from the first 64-byte boundary of d (stores that
        // split a cache line cost), then the tail
        at(0);
        i = int64_t(((uintptr_t(0) - reinterpret_cast<uintptr_t>(d)) & 63) / sizeof(T));
        if (i == 0) i = L;
        for (; i + L <= n; i += L) at(i);
        if (i < n) at(n - L);
      };
      using Y = std::true_type;
      using No = std::false_type;
      if (sv && av) run(Y{}, Y{}); else if (sv) run(Y{}, No{}); else if (av) run(No{}, Y{}); else run(No{}, No{});
      return;
    }
  }
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

// The max bits of k_reduce / k_gradx (N images of C channel rows, NCHW): by pixel chunk of
// pixel_chunk(N, HW), each chunk's C rows of max_bits_stride(chunk) bytes together, so that the
// threads' chunks write apart (rows [N, C] of whole images: two threads writing into every row
// made 1x1024x13x13's backward 1.35x slower than the compare, from the lines they share).
struct MaxBitsLayout {
  int64_t N, C, chunk, nchunks, stride;
  MaxBitsLayout(int64_t N_, int64_t C_, int64_t HW)
      : N(N_), C(C_), chunk(pixel_chunk(N_, HW)), nchunks((HW + chunk - 1) / chunk), stride(max_bits_stride(chunk)) {}
  int64_t bytes() const { return N * nchunks * C * stride; }
  // the row of channel c of chunk k of image n
  int64_t row(int64_t n, int64_t k, int64_t c) const { return ((n * nchunks + k) * C + c) * stride; }
};

// the max bits for the phases k_reduce / k_gradx over N images (see max_bits_wanted; x_bytes:
// the size of their x), or an empty buffer where pass B compares
inline std::vector<uint8_t> phase_max_bits(bool has_max, bool nhwc, bool need_gs, int64_t x_bytes, int64_t N,
                                           int64_t C, int64_t HW) {
  return std::vector<uint8_t>(max_bits_wanted(has_max, nhwc, need_gs, x_bytes) ? MaxBitsLayout(N, C, HW).bytes() : 0);
}

// ---------------------------------------------------------------- pooling
// NCHW pooling: eight channels per sweep where the accumulators exceed this (see pool_chunk;
// adjustable for tests through set_pool_wide_bytes, a negative value restores the default)
constexpr int64_t kPoolWideDefault = 16384;
int64_t kPoolWideBytes = kPoolWideDefault;
constexpr int64_t kGpTileDefault = 65536;
int64_t kGpTileBytes = kGpTileDefault;  // channels_last global pooling: bytes of x per tile
// One image, NCHW: max and sum over the C channels (channel stride HW, x' = x * s) of
// `len` consecutive pixels starting at x. Four (or eight) channels per sweep over the
// accumulators; the sum keeps the sequential channel order (((s + v0) + v1) + v2) + v3.
// mp / sp: max and mean out (the mean divides like torch: sum / C).
template <typename T, typename X>
void pool_chunk(const X* x, const T* s, int64_t C, int64_t HW, int64_t len, T* mp, T* sp) {
  using V = vec_t<T>;
  [[maybe_unused]] constexpr int64_t L = lanes<T>();
  {
    const T sc = s ? s[0] : T(1);
    for (int64_t i = 0; i < len; ++i) {
      const T v = T(x[i]) * sc;
      mp[i] = v;
      sp[i] = v;
    }
  }
  // one four-channel step on a vector or a scalar: max and sum updated in channel order
  auto step4 = [](auto& m, auto& a, auto v0, auto v1, auto v2, auto v3) {
    m = vmax(vmax(m, v0), vmax(vmax(v1, v2), v3));
    a = a + v0 + v1 + v2 + v3;
  };
  // the accumulators at vector k after `steps` (see vector_sweeps for tail / keep)
  auto update = [&](int64_t k, auto tail_t, auto keep, auto steps) {
    const V m0 = vload(mp + k), a0 = vload(sp + k);
    V m = m0, a = a0;
    steps(m, a);
    if constexpr (decltype(tail_t)::value) {
      m = vsel<T>(keep, m, m0);
      a = vsel<T>(keep, a, a0);
    }
    vstore(mp + k, m);
    vstore(sp + k, a);
  };
  int64_t c = 1;
#if SAM_AVX2_HALVES
  if constexpr (std::is_same_v<T, float>) {
    if (len >= 8) {
      // AVX2 builds (see SAM_AVX2_HALVES): the same steps per element in 256-bit vectors,
      // the tail as one vector ending at len whose overlapped lanes keep their values
      const bool wide = len * int64_t(2 * sizeof(T)) > kPoolWideBytes;
      const int64_t full = len / 8 * 8;
      const __m256 lane = _mm256_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f);
      const __m256 keep = _mm256_cmp_ps(lane, _mm256_set1_ps(float(full - (len - 8))), _CMP_GE_OQ);
      auto step8 = [](__m256& m, __m256& a, __m256 v0, __m256 v1, __m256 v2, __m256 v3) {
        m = vmax8(vmax8(m, v0), vmax8(vmax8(v1, v2), v3));
        a = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a, v0), v1), v2), v3);
      };
      auto run = [&](int64_t k, bool tail, auto steps) {
        const __m256 m0 = _mm256_loadu_ps(mp + k), a0 = _mm256_loadu_ps(sp + k);
        __m256 m = m0, a = a0;
        steps(k, m, a);
        _mm256_storeu_ps(mp + k, tail ? _mm256_blendv_ps(m0, m, keep) : m);
        _mm256_storeu_ps(sp + k, tail ? _mm256_blendv_ps(a0, a, keep) : a);
      };
      auto rows = [&](int64_t nc, auto steps) {  // every vector of the chunk, then the tail
        for (; c + nc <= C; c += nc) {
          for (int64_t k = 0; k < full; k += 8) run(k, false, steps);
          if (full < len) run(len - 8, true, steps);
        }
      };
      if (wide)
        rows(8, [&](int64_t k, __m256& m, __m256& a) {
          const X* r = x + c * HW + k;
          __m256 v[8];
          for (int j = 0; j < 8; ++j) v[j] = _mm256_mul_ps(ld8(r + j * HW), _mm256_set1_ps(s ? s[c + j] : 1.f));
          step8(m, a, v[0], v[1], v[2], v[3]);
          step8(m, a, v[4], v[5], v[6], v[7]);
        });
      rows(4, [&](int64_t k, __m256& m, __m256& a) {
        const X* r = x + c * HW + k;
        auto sv = [&](int j) { return _mm256_set1_ps(s ? s[c + j] : 1.f); };
        step8(m, a, _mm256_mul_ps(ld8(r), sv(0)), _mm256_mul_ps(ld8(r + HW), sv(1)),
              _mm256_mul_ps(ld8(r + 2 * HW), sv(2)), _mm256_mul_ps(ld8(r + 3 * HW), sv(3)));
      });
    }
  }
#endif
  if (len * int64_t(2 * sizeof(T)) > kPoolWideBytes) {
    // Eight channels per sweep where the two accumulator rows exceed half of a 32 KiB L1:
    // they then travel to L2 and back every sweep, and eight channels halve that. Each
    // half of the sweep is the four-channel step below, so the results are the same bits.
    for (; c + 8 <= C; c += 8) {
      const X* r = x + c * HW;
      T sc[8];
      for (int j = 0; j < 8; ++j) sc[j] = s ? s[c + j] : T(1);
      int64_t i = vector_sweeps<T>(len, [&](int64_t k, auto tail_t, auto keep) {
        update(k, tail_t, keep, [&](V& m, V& a) {
          V v[8];
          for (int j = 0; j < 8; ++j) v[j] = vld(r + j * HW + k) * sc[j];
          step4(m, a, v[0], v[1], v[2], v[3]);
          step4(m, a, v[4], v[5], v[6], v[7]);
        });
      });
      for (; i < len; ++i) {
        T v[8];
        for (int j = 0; j < 8; ++j) v[j] = T(r[j * HW + i]) * sc[j];
        step4(mp[i], sp[i], v[0], v[1], v[2], v[3]);
        step4(mp[i], sp[i], v[4], v[5], v[6], v[7]);
      }
    }
  }
  for (; c + 4 <= C; c += 4) {
    const X* r0 = x + c * HW;
    const X* r1 = r0 + HW;
    const X* r2 = r1 + HW;
    const X* r3 = r2 + HW;
    const T s0 = s ? s[c] : T(1), s1 = s ? s[c + 1] : T(1), s2 = s ? s[c + 2] : T(1), s3 = s ? s[c + 3] : T(1);
    int64_t i = vector_sweeps<T>(len, [&](int64_t k, auto tail_t, auto keep) {
      update(k, tail_t, keep, [&](V& m, V& a) {
        step4(m, a, vld(r0 + k) * s0, vld(r1 + k) * s1, vld(r2 + k) * s2, vld(r3 + k) * s3);
      });
    });
    for (; i < len; ++i) step4(mp[i], sp[i], T(r0[i]) * s0, T(r1[i]) * s1, T(r2[i]) * s2, T(r3[i]) * s3);
  }
  for (; c < C; ++c) {
    const X* row = x + c * HW;
    const T sc = s ? s[c] : T(1);
    for (int64_t i = 0; i < len; ++i) {
      const T v = T(row[i]) * sc;
      mp[i] = vmax(mp[i], v);
      sp[i] += v;
    }
  }
  // vmax drops NaN; a NaN among the channels makes the sum NaN, and only then they are
  // scanned. Whole vectors first (the same IEEE division per lane; as a scalar loop, with the
  // NaN test's branch and call, this was the largest item after the conv in perf of a
  // one-channel forward), then the rest one by one.
  auto finish = [&](int64_t i) {
    if (sp[i] != sp[i] && any_nan(x + i, s, C, HW)) mp[i] = std::numeric_limits<T>::quiet_NaN();
    sp[i] = sp[i] / T(C);
  };
  const V vc = V{} + T(C);
  int64_t i = 0;
  for (; i + L <= len; i += L) {
    const V a = vload(sp + i);
    if (lane_bits<T>(vcmp<kNe, T>(a, a)) != 0) {
      for (int64_t k = i; k < i + L; ++k) finish(k);
    } else {
      vstore(sp + i, a / vc);
    }
  }
  for (; i < len; ++i) finish(i);
}

template <typename T, int B>
struct HalfOf {
  typedef T type __attribute__((vector_size(B)));
};
// tree reductions of a 64-byte vector (halves, then quarters, ...)
template <typename T, int B, typename V>
inline T hreduce(V v, bool is_max) {
  if constexpr (B == int(sizeof(T))) {
    return v[0];
  } else {
    typedef typename HalfOf<T, B / 2>::type H;
    H lo, hi;
    std::memcpy(&lo, &v, B / 2);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + B / 2, B / 2);
    return hreduce<T, B / 2>(is_max ? vmax(lo, hi) : lo + hi, is_max);
  }
}

#if SAM_AVX2_HALVES
// AVX2 builds: the per-pixel channel reductions of channels_last (pool_pixel, reduce_pixel)
// in 256-bit intrinsics. There a 64-byte vec_t has no register of its own: GCC keeps such
// variables on the stack and moves them through xmm and general registers around every
// compare, select and half taken for a lane reduction (perf: a third to a half of the
// channels_last forward and backward on those moves). Here each 64-byte accumulator of the
// generic code is two __m256 (its lanes 0-7 and 8-15), updated with the same operations in
// the same order, and the lane reductions follow hreduce's tree, so the results are the
// generic code's bits.
// pool_pixel's vector part for float: sets m, sum and c (the first channel left to the
// scalar loop)
template <typename X>
inline void pool_pixel_avx2(const X* x, const float* s, int64_t C, float& m, float& sum, int64_t& c) {
  auto ld = [&](int64_t k) { return s ? _mm256_mul_ps(ld8(x + k), _mm256_loadu_ps(s + k)) : ld8(x + k); };
  if (C >= 64) {  // four 64-byte accumulator pairs: halves 2j, 2j + 1 of vector j
    __m256 M[8], A[8];
    for (int j = 0; j < 8; ++j) M[j] = A[j] = ld(8 * j);
    for (c = 64; c + 64 <= C; c += 64) {
      for (int j = 0; j < 8; ++j) {
        const __m256 v = ld(c + 8 * j);
        M[j] = vmax8(M[j], v);
        A[j] = _mm256_add_ps(A[j], v);
      }
    }
    for (; c + 16 <= C; c += 16) {
      for (int j = 0; j < 2; ++j) {
        const __m256 v = ld(c + 8 * j);
        M[j] = vmax8(M[j], v);
        A[j] = _mm256_add_ps(A[j], v);
      }
    }
    m = hreduce8(vmax8(vmax8(M[0], M[2]), vmax8(M[4], M[6])), vmax8(vmax8(M[1], M[3]), vmax8(M[5], M[7])), true);
    sum = hreduce8(_mm256_add_ps(_mm256_add_ps(A[0], A[2]), _mm256_add_ps(A[4], A[6])),
                   _mm256_add_ps(_mm256_add_ps(A[1], A[3]), _mm256_add_ps(A[5], A[7])), false);
  } else {  // C >= 32: two
    __m256 M[4], A[4];
    for (int j = 0; j < 4; ++j) M[j] = A[j] = ld(8 * j);
    for (c = 32; c + 32 <= C; c += 32) {
      for (int j = 0; j < 4; ++j) {
        const __m256 v = ld(c + 8 * j);
        M[j] = vmax8(M[j], v);
        A[j] = _mm256_add_ps(A[j], v);
      }
    }
    m = hreduce8(vmax8(M[0], M[2]), vmax8(M[1], M[3]), true);
    sum = hreduce8(_mm256_add_ps(A[0], A[2]), _mm256_add_ps(A[1], A[3]), false);
  }
}

// f(std::integral_constant<int, J>{}) for J = 0 .. N - 1: array indices that are constants
// from the start. GCC replaces a local array of vectors by registers (and spill slots) only
// where every index is a constant before its scalar-replacement pass, which runs before the
// loop unroller; a `for (int j ...)` over the array keeps it in memory, zero-initialised per
// call by `rep stos` (41 % of reduce_pixel_avx2's time at C = 64, perf). Not applied to
// pool_pixel_avx2, whose arrays start from loads (no memset): written so, it was 1.02-1.15x
// slower (channels_last forward, C = 64-512, paired).
template <typename F, int... J>
inline void each_index(F&& f, std::integer_sequence<int, J...>) {
  (f(std::integral_constant<int, J>{}), ...);
}
template <int N, typename F>
inline void each_index(F&& f) {
  each_index(f, std::make_integer_sequence<int, N>{});
}

// reduce_pixel's vector part for float (see there): sets sa, sc, si and c
template <typename X, bool G, bool GC, bool M, bool I>
inline void reduce_pixel_avx2(const X* x, const float* s, const X* g, float gv, float m, int64_t C, float& sa,
                              float& sc, float& si, int64_t& c) {
  const __m256 one = _mm256_set1_ps(1.f), vm = _mm256_set1_ps(m), vg = _mm256_set1_ps(gv);
  const __m256 lane = _mm256_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f);
  __m256 a[8], k[8], ix[8];
  each_index<8>([&](auto j) {
    a[j] = k[j] = _mm256_setzero_ps();
    ix[j] = _mm256_set1_ps(-1.f);
  });
  auto step = [&](auto j, int64_t c0) {  // 8 channels from c0 into half j (a constant)
    __m256 v = ld8(x + c0);
    if (s) v = _mm256_mul_ps(v, _mm256_loadu_ps(s + c0));
    if constexpr (G) a[j] = _mm256_add_ps(a[j], _mm256_mul_ps(GC ? vg : ld8(g + c0), v));
    if constexpr (M) {
      const __m256 e = _mm256_cmp_ps(v, vm, _CMP_EQ_OQ);
      k[j] = _mm256_add_ps(k[j], _mm256_and_ps(e, one));
      // generic: lane + c over 16 lanes; per half the same integers (exact in float)
      if constexpr (I) ix[j] = _mm256_blendv_ps(ix[j], _mm256_add_ps(lane, _mm256_set1_ps(float(c0))), e);
    }
  };
  c = 0;
  for (; c + 64 <= C; c += 64)
    each_index<8>([&](auto j) { step(j, c + 8 * j); });
  for (; c + 16 <= C; c += 16) {
    step(std::integral_constant<int, 0>{}, c);
    step(std::integral_constant<int, 1>{}, c + 8);
  }
  auto tree = [](const __m256 (&v)[8], auto h, bool is_max) {
    return is_max ? vmax8(vmax8(v[h], v[2 + h]), vmax8(v[4 + h], v[6 + h]))
                  : _mm256_add_ps(_mm256_add_ps(v[h], v[2 + h]), _mm256_add_ps(v[4 + h], v[6 + h]));
  };
  const std::integral_constant<int, 0> h0;
  const std::integral_constant<int, 1> h1;
  sa = G ? hreduce8(tree(a, h0, false), tree(a, h1, false), false) : 0.f;
  sc = M ? hreduce8(tree(k, h0, false), tree(k, h1, false), false) : 0.f;
  si = (M && I) ? hreduce8(tree(ix, h0, true), tree(ix, h1, true), true) : -1.f;
}
#endif

// One pixel, channels_last: max and mean of x' over its C contiguous channels. Four
// accumulator pairs, then tree reductions across the lanes (the sum order differs from the
// sequential one by rounding only; the lane-by-lane scalar reduction it replaces was a
// 15-step dependency chain per pixel: pooling 0.83x the time at 8x512x26x26, paired).
template <typename T, typename X>
inline void pool_pixel(const X* x, const T* s, int64_t C, T& mx, T& mean) {
  using V = vec_t<T>;
  constexpr int64_t L = lanes<T>();
  T m, sum;
  int64_t c = 0;
#if SAM_AVX2_HALVES
  if constexpr (std::is_same_v<T, float>) {
    if (C >= 2 * L) pool_pixel_avx2<X>(x, s, C, m, sum, c);
    else {
      m = s ? T(x[0]) * s[0] : T(x[0]);
      sum = m;
      c = 1;
    }
  } else
#endif
  if (C >= 4 * L) {
    auto ld = [&](int64_t k) { return s ? vld(x + k) * vload(s + k) : vld(x + k); };
    V m0 = ld(0), m1 = ld(L), m2 = ld(2 * L), m3 = ld(3 * L);
    V a0 = m0, a1 = m1, a2 = m2, a3 = m3;
    for (c = 4 * L; c + 4 * L <= C; c += 4 * L) {
      const V v0 = ld(c), v1 = ld(c + L), v2 = ld(c + 2 * L), v3 = ld(c + 3 * L);
      m0 = vmax(m0, v0);
      m1 = vmax(m1, v1);
      m2 = vmax(m2, v2);
      m3 = vmax(m3, v3);
      a0 += v0;
      a1 += v1;
      a2 += v2;
      a3 += v3;
    }
    for (; c + L <= C; c += L) {
      const V v0 = ld(c);
      m0 = vmax(m0, v0);
      a0 += v0;
    }
    m = hreduce<T, 64>(vmax(vmax(m0, m1), vmax(m2, m3)), true);
    sum = hreduce<T, 64>((a0 + a1) + (a2 + a3), false);
  } else if (C >= 2 * L) {
    V m0 = s ? vld(x) * vload(s) : vld(x);
    V m1 = s ? vld(x + L) * vload(s + L) : vld(x + L);
    V a0 = m0, a1 = m1;
    for (c = 2 * L; c + 2 * L <= C; c += 2 * L) {
      const V v0 = s ? vld(x + c) * vload(s + c) : vld(x + c);
      const V v1 = s ? vld(x + c + L) * vload(s + c + L) : vld(x + c + L);
      m0 = vmax(m0, v0);
      m1 = vmax(m1, v1);
      a0 += v0;
      a1 += v1;
    }
    m = hreduce<T, 64>(vmax(m0, m1), true);
    sum = hreduce<T, 64>(a0 + a1, false);
  } else {
    m = s ? T(x[0]) * s[0] : T(x[0]);
    sum = m;
    c = 1;
  }
  for (; c < C; ++c) {
    const T v = s ? T(x[c]) * s[c] : T(x[c]);
    m = vmax(m, v);
    sum += v;
  }
  if (sum != sum && any_nan(x, s, C, 1)) m = std::numeric_limits<T>::quiet_NaN();
  mx = m;
  mean = sum / T(C);
}

// pool_pixel over len consecutive channels_last pixels: mx[k] / mean[k] (either may be null).
// A function of its own, with everything it calls inlined (flatten): left to GCC, the AVX2
// part stayed out of line in the OpenMP bodies and the per-image passes, where its
// accumulator arrays lived on the stack, written in 16-byte halves and read back as 32-byte
// vectors (a failed store forward per accumulator per pixel). The channel pooling of
// 8x64x56x56 channels_last took twice as long on 2 threads (out of line) as on 1 (inlined
// in the serial call). Paired against the out-of-line calls: channel pooling 0.32-0.42x the
// time at 8x64x56x56 / 8x128x28x28, 0.59-0.85x at 8x256x14x14 to 8x256x52x52. (Inlined into
// the per-image forward itself, by always_inline, the forward became 1.17-1.24x slower at
// 7x7 to 28x28: hence a separate function, not inlined there.)
template <typename T, typename X>
__attribute__((noinline, flatten)) void pool_pixels(const X* x, const T* s, int64_t C, int64_t len, T* mx,
                                                    T* mean) {
  for (int64_t k = 0; k < len; ++k) {
    T m, a;
    pool_pixel<T, X>(x + k * C, s, C, m, a);
    if (mx) mx[k] = m;
    if (mean) mean[k] = a;
  }
}

// mx / mean: outputs with batch stride `obs` (HW each image); either may be null.
template <typename T, typename X>
void k_pool(const X* x, const T* s, int64_t N, int64_t C, int64_t HW, bool nhwc,
            T* mx, T* mean, int64_t obs) {
  if (!nhwc) {
    const int64_t chunk = pixel_chunk(N, HW);
    const int64_t nchunks = (HW + chunk - 1) / chunk;
    at::parallel_for(0, N * nchunks, 1, [&](int64_t b, int64_t e) {
      std::vector<T> m(chunk), sm(chunk);
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = t / nchunks, p0 = (t % nchunks) * chunk;
        const int64_t len = std::min(chunk, HW - p0);
        pool_chunk<T, X>(x + n * C * HW + p0, s ? s + n * C : nullptr, C, HW, len, m.data(), sm.data());
        if (mx) std::copy(m.data(), m.data() + len, mx + n * obs + p0);
        if (mean) std::copy(sm.data(), sm.data() + len, mean + n * obs + p0);
      }
    });
  } else {
    at::parallel_for(0, N * HW, 64, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e;) {  // the pixels of [b, e) image by image
        const int64_t n = p / HW, q = p % HW, len = std::min(e - p, HW - q);
        pool_pixels<T, X>(x + p * C, s ? s + n * C : nullptr, C, len, mx ? mx + n * obs + q : nullptr,
                          mean ? mean + n * obs + q : nullptr);
        p += len;
      }
    });
  }
}

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

// ---------------------------------------------------------------- backward pass A
// ga[p] = sum_c g * x'   (if ga);   cnt[p] = #{c : x' == mx[p]}   (if cnt);
// channels_last only: ix[p] = the last channel c with x' == mx[p], -1 if none (a T holding
// an integer). Where cnt == 1, pass B finds the max channel from ix without reading x.
// mx has batch stride mbs. gc: g is one value broadcast to every element (e.g. the
// gradient of y.sum()). Explicit vectors: the tie count (a compare) would otherwise
// keep the compiler from vectorising the loop.
// mb (with M; may be null): max bits, channel rows of mbs bytes, written at pixels q0 + [0, len).
#if SAM_AVX2_HALVES
// reduce_chunk's groups of four channel rows for float32 in AVX2 builds: the same operations
// per element in 256-bit vectors, the tail as one vector ending at len whose overlapped lanes
// keep their sums and counts (and get their max bits again, the same); returns the first
// channel left
template <bool G, bool GC, bool M, typename X>
inline int64_t reduce_chunk_avx2(const X* x, const float* s, const X* g, float gv, const float* mp, int64_t C,
                                 int64_t HW, int64_t len, float* ap, float* cp, uint8_t* mb, int64_t mbs,
                                 int64_t q0) {
  if (len < 8) return 0;
  const __m256 one = _mm256_set1_ps(1.f), vg = _mm256_set1_ps(gv);
  const __m256 lane = _mm256_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f);
  const int64_t full = len / 8 * 8;
  // the tail vector's lanes not yet swept (lane >= full - (len - 8))
  const __m256 keep = _mm256_cmp_ps(lane, _mm256_set1_ps(float(full - (len - 8))), _CMP_GE_OQ);
  int64_t c = 0;
  for (; c + 4 <= C; c += 4) {
    const X* x0 = x + c * HW;
    const X* g0 = g + c * HW;
    const __m256 s0 = _mm256_set1_ps(s ? s[c] : 1.f), s1 = _mm256_set1_ps(s ? s[c + 1] : 1.f),
                 s2 = _mm256_set1_ps(s ? s[c + 2] : 1.f), s3 = _mm256_set1_ps(s ? s[c + 3] : 1.f);
    auto sweep = [&](int64_t k, bool tail) {
      const __m256 v0 = _mm256_mul_ps(ld8(x0 + k), s0), v1 = _mm256_mul_ps(ld8(x0 + HW + k), s1),
                   v2 = _mm256_mul_ps(ld8(x0 + 2 * HW + k), s2), v3 = _mm256_mul_ps(ld8(x0 + 3 * HW + k), s3);
      if constexpr (G) {
        const __m256 a0 = _mm256_loadu_ps(ap + k);
        __m256 a = a0;
        if constexpr (GC) {
          a = _mm256_add_ps(a, _mm256_mul_ps(vg, v0));
          a = _mm256_add_ps(a, _mm256_mul_ps(vg, v1));
          a = _mm256_add_ps(a, _mm256_mul_ps(vg, v2));
          a = _mm256_add_ps(a, _mm256_mul_ps(vg, v3));
        } else {
          a = _mm256_add_ps(a, _mm256_mul_ps(ld8(g0 + k), v0));
          a = _mm256_add_ps(a, _mm256_mul_ps(ld8(g0 + HW + k), v1));
          a = _mm256_add_ps(a, _mm256_mul_ps(ld8(g0 + 2 * HW + k), v2));
          a = _mm256_add_ps(a, _mm256_mul_ps(ld8(g0 + 3 * HW + k), v3));
        }
        _mm256_storeu_ps(ap + k, tail ? _mm256_blendv_ps(a0, a, keep) : a);
      }
      if constexpr (M) {
        const __m256 m = _mm256_loadu_ps(mp + k), n0 = _mm256_loadu_ps(cp + k);
        const __m256 e0 = _mm256_cmp_ps(v0, m, _CMP_EQ_OQ), e1 = _mm256_cmp_ps(v1, m, _CMP_EQ_OQ),
                     e2 = _mm256_cmp_ps(v2, m, _CMP_EQ_OQ), e3 = _mm256_cmp_ps(v3, m, _CMP_EQ_OQ);
        __m256 n1 = _mm256_add_ps(n0, _mm256_and_ps(e0, one));
        n1 = _mm256_add_ps(n1, _mm256_and_ps(e1, one));
        n1 = _mm256_add_ps(n1, _mm256_and_ps(e2, one));
        n1 = _mm256_add_ps(n1, _mm256_and_ps(e3, one));
        _mm256_storeu_ps(cp + k, tail ? _mm256_blendv_ps(n0, n1, keep) : n1);
        if (mb) {
          uint8_t* b0 = mb + c * mbs;
          put_bits<8>(b0, q0 + k, uint32_t(_mm256_movemask_ps(e0)));
          put_bits<8>(b0 + mbs, q0 + k, uint32_t(_mm256_movemask_ps(e1)));
          put_bits<8>(b0 + 2 * mbs, q0 + k, uint32_t(_mm256_movemask_ps(e2)));
          put_bits<8>(b0 + 3 * mbs, q0 + k, uint32_t(_mm256_movemask_ps(e3)));
        }
      }
    };
    for (int64_t k = 0; k < full; k += 8) sweep(k, false);
    if (full < len) sweep(len - 8, true);
  }
  return c;
}
#endif

template <typename T, typename X, bool G, bool GC, bool M>
void reduce_chunk(const X* x, const T* s, const X* g, T gv, const T* mp, int64_t C, int64_t HW, int64_t len,
                  T* ap, T* cp, uint8_t* mb = nullptr, int64_t mbs = 0, int64_t q0 = 0) {
  using V = vec_t<T>;
  [[maybe_unused]] constexpr int64_t L = lanes<T>();
  const V one = V{} + T(1), zero = V{};
  std::fill(ap, ap + len, T(0));
  std::fill(cp, cp + len, T(0));
  int64_t c = 0;
#if SAM_AVX2_HALVES
  if constexpr (std::is_same_v<T, float>) {
    c = reduce_chunk_avx2<G, GC, M, X>(x, s, g, gv, mp, C, HW, len, ap, cp, mb, mbs, q0);
  }
#endif
  for (; c + 4 <= C; c += 4) {
    const X* x0 = x + c * HW;
    const X* g0 = g + c * HW;
    const T s0 = s ? s[c] : T(1), s1 = s ? s[c + 1] : T(1), s2 = s ? s[c + 2] : T(1), s3 = s ? s[c + 3] : T(1);
    // the tail through vector_sweeps: overlapped lanes keep their sums and counts
    auto kept = [](auto tail_t, auto keep, V updated, V old) {
      if constexpr (decltype(tail_t)::value) return vsel<T>(keep, updated, old);
      else return updated;
    };
    int64_t i = vector_sweeps<T>(len, [&](int64_t k, auto tail_t, auto keep) {
      const V v0 = vld(x0 + k) * s0, v1 = vld(x0 + HW + k) * s1, v2 = vld(x0 + 2 * HW + k) * s2,
              v3 = vld(x0 + 3 * HW + k) * s3;
      if (G) {
        const V a0 = vload(ap + k);
        V a = a0;
        if (GC) {
          a = a + gv * v0 + gv * v1 + gv * v2 + gv * v3;
        } else {
          a = a + vld(g0 + k) * v0 + vld(g0 + HW + k) * v1 + vld(g0 + 2 * HW + k) * v2 + vld(g0 + 3 * HW + k) * v3;
        }
        vstore(ap + k, kept(tail_t, keep, a, a0));
      }
      if (M) {
        const V m = vload(mp + k), n0 = vload(cp + k);
        const auto e0 = vcmp<kEq, T>(v0, m), e1 = vcmp<kEq, T>(v1, m), e2 = vcmp<kEq, T>(v2, m),
                   e3 = vcmp<kEq, T>(v3, m);
        const V n1 = n0 + vsel<T>(e0, one, zero) + vsel<T>(e1, one, zero) + vsel<T>(e2, one, zero) +
                     vsel<T>(e3, one, zero);
        vstore(cp + k, kept(tail_t, keep, n1, n0));
        if (mb) {  // (the tail's overlapped lanes get their bits again, the same)
          uint8_t* b0 = mb + c * mbs;
          put_bits<L>(b0, q0 + k, lane_bits<T>(e0));
          put_bits<L>(b0 + mbs, q0 + k, lane_bits<T>(e1));
          put_bits<L>(b0 + 2 * mbs, q0 + k, lane_bits<T>(e2));
          put_bits<L>(b0 + 3 * mbs, q0 + k, lane_bits<T>(e3));
        }
      }
    });
    for (; i < len; ++i) {
      const T v0 = T(x0[i]) * s0, v1 = T(x0[HW + i]) * s1, v2 = T(x0[2 * HW + i]) * s2, v3 = T(x0[3 * HW + i]) * s3;
      if (G)
        ap[i] = GC ? ap[i] + gv * v0 + gv * v1 + gv * v2 + gv * v3
                   : ap[i] + T(g0[i]) * v0 + T(g0[HW + i]) * v1 + T(g0[2 * HW + i]) * v2 + T(g0[3 * HW + i]) * v3;
      if (M) {
        cp[i] = cp[i] + (v0 == mp[i] ? T(1) : T(0)) + (v1 == mp[i] ? T(1) : T(0)) + (v2 == mp[i] ? T(1) : T(0)) +
                (v3 == mp[i] ? T(1) : T(0));
        if (mb) {
          uint8_t* b0 = mb + c * mbs;
          put_bit(b0, q0 + i, v0 == mp[i]);
          put_bit(b0 + mbs, q0 + i, v1 == mp[i]);
          put_bit(b0 + 2 * mbs, q0 + i, v2 == mp[i]);
          put_bit(b0 + 3 * mbs, q0 + i, v3 == mp[i]);
        }
      }
    }
  }
  for (; c < C; ++c) {
    const X* x0 = x + c * HW;
    const X* g0 = g + c * HW;
    const T s0 = s ? s[c] : T(1);
    for (int64_t i = 0; i < len; ++i) {
      const T v0 = T(x0[i]) * s0;
      if (G) ap[i] += (GC ? gv : T(g0[i])) * v0;
      if (M) {
        cp[i] += v0 == mp[i] ? T(1) : T(0);
        if (mb) put_bit(mb + c * mbs, q0 + i, v0 == mp[i]);
      }
    }
  }
}

// one pixel, channels_last: returns sum_c g * x' and the tie count (and with I the last
// channel equal to the max). Four accumulators, then tree reductions across the lanes, as
// pool_pixel (the lane-by-lane scalar sums they replace were three 15-step dependency chains
// per pixel)
template <typename T, typename X, bool G, bool GC, bool M, bool I>
inline void reduce_pixel(const X* x, const T* s, const X* g, T gv, T m, int64_t C, T& ga, T& cnt, T& idx) {
  using V = vec_t<T>;
  constexpr int64_t L = lanes<T>();
  const V one = V{} + T(1), zero = V{}, none = V{} - T(1);
  V a[4] = {}, k[4] = {}, ix[4] = {none, none, none, none};
  const V lane = lane_index<T>();  // channel index of each lane, from c = 0
  auto step = [&](int j, int64_t c) {
    V v = vld(x + c);
    if (s) v = v * vload(s + c);
    if (G) a[j] += (GC ? V{} + gv : vld(g + c)) * v;
    if (M) {
      const auto e = vcmp<kEq, T>(v, V{} + m);
      k[j] += vsel<T>(e, one, zero);
      if (I) ix[j] = vsel<T>(e, lane + T(c), ix[j]);
    }
  };
  int64_t c = 0;
  T sa, sc, si;
#if SAM_AVX2_HALVES
  if constexpr (std::is_same_v<T, float>) {
    reduce_pixel_avx2<X, G, GC, M, I>(x, s, g, gv, m, C, sa, sc, si, c);
  } else
#endif
  {
    for (; c + 4 * L <= C; c += 4 * L) {
      step(0, c);
      step(1, c + L);
      step(2, c + 2 * L);
      step(3, c + 3 * L);
    }
    for (; c + L <= C; c += L) step(0, c);
    sa = G ? hreduce<T, 64>((a[0] + a[1]) + (a[2] + a[3]), false) : T(0);
    sc = M ? hreduce<T, 64>((k[0] + k[1]) + (k[2] + k[3]), false) : T(0);
    si = (M && I) ? hreduce<T, 64>(vmax(vmax(ix[0], ix[1]), vmax(ix[2], ix[3])), true) : T(-1);
  }
  for (; c < C; ++c) {
    const T v = s ? T(x[c]) * s[c] : T(x[c]);
    if (G) sa += (GC ? gv : T(g[c])) * v;
    if (M && v == m) {
      sc += T(1);
      if (I) si = T(c);
    }
  }
  ga = sa;
  cnt = sc;
  idx = si;
}

template <typename T, typename X, bool G, bool GC, bool M>
void k_reduce_impl(const X* x, const T* s, const X* g, const T* mx, int64_t mbs, int64_t N, int64_t C, int64_t HW,
                   bool nhwc, T* ga, T* cnt, T* ix, uint8_t* bits) {
  const T gv = (G && GC) ? T(g[0]) : T(0);
  if (!nhwc) {
    const MaxBitsLayout lay(N, C, HW);
    const int64_t chunk = lay.chunk, nchunks = lay.nchunks;
    at::parallel_for(0, N * nchunks, 1, [&](int64_t b, int64_t e) {
      std::vector<T> acc(chunk), cn(chunk);
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = t / nchunks, p0 = (t % nchunks) * chunk;
        const int64_t len = std::min(chunk, HW - p0);
        reduce_chunk<T, X, G, GC, M>(x + n * C * HW + p0, s ? s + n * C : nullptr,
                                  (G && !GC) ? g + n * C * HW + p0 : g, gv, M ? mx + n * mbs + p0 : nullptr, C, HW,
                                  len, acc.data(), cn.data(), bits ? bits + lay.row(n, t % nchunks, 0) : nullptr,
                                  lay.stride, 0);
        if (ga) std::copy(acc.data(), acc.data() + len, ga + n * HW + p0);
        if (cnt) std::copy(cn.data(), cn.data() + len, cnt + n * HW + p0);
      }
    });
  } else {
    at::parallel_for(0, N * HW, 64, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        const int64_t n = p / HW;
        T a, k, i;
        if (M && ix) {
          reduce_pixel<T, X, G, GC, M, true>(x + p * C, s ? s + n * C : nullptr, (G && !GC) ? g + p * C : g, gv,
                                          mx[n * mbs + (p - n * HW)], C, a, k, i);
          ix[p] = i;
        } else {
          reduce_pixel<T, X, G, GC, M, false>(x + p * C, s ? s + n * C : nullptr, (G && !GC) ? g + p * C : g, gv,
                                           M ? mx[n * mbs + (p - n * HW)] : T(0), C, a, k, i);
        }
        if (ga) ga[p] = a;
        if (cnt) cnt[p] = k;
      }
    });
  }
}

// bits (NCHW, with mx and cnt; may be null): the max bits of every channel row, laid out as
// MaxBitsLayout(N, C, HW) (for k_gradx; channels_last ignores them)
template <typename T, typename X>
void k_reduce(const X* x, const T* s, const X* g, bool gc, const T* mx, int64_t mbs, int64_t N, int64_t C,
              int64_t HW, bool nhwc, T* ga, T* cnt, T* ix = nullptr, uint8_t* bits = nullptr) {
  const bool G = g != nullptr && ga != nullptr, M = mx != nullptr && cnt != nullptr;
  if (!G && !M) return;
#define SA_REDUCE(g_, gc_, m_) k_reduce_impl<T, X, g_, gc_, m_>(x, s, g, mx, mbs, N, C, HW, nhwc, ga, cnt, ix, bits)
  if (G && gc) {
    if (M) SA_REDUCE(true, true, true); else SA_REDUCE(true, true, false);
  } else if (G) {
    if (M) SA_REDUCE(true, false, true); else SA_REDUCE(true, false, false);
  } else {
    SA_REDUCE(false, false, true);
  }
#undef SA_REDUCE
}

// ---------------------------------------------------------------- backward pass B
// gx' = g * a + [x' == mx] * fmax + fmean ;  gx = gx' * s ;  gs[n, c] = sum_p gx' * x.
// Any of g (with a), mx (with fmax), fmean may be null; gx / gs may be null.

// NCHW: `len` pixels of one channel row (scale sc); returns sum gx' * x if S, else 0 (the
// sum is skipped: measured ~6 % off the 1x1024x13x13 backward, within noise on the large
// maps, which wait on memory); buf: len scratch. MB (not with S): the max channels from
// the row of max bits `mb` (pixel q0 + k at bit k), and x is not read.
#if SAM_AVX2_HALVES
// gradx_segment's vectors for float32 in AVX2 builds: the same operations per element in
// 256-bit vectors (MB: the max channels from the bits, x not read); len >= 8. Without S, the
// whole row (its tail one vector overlapping the last full one); returns len. S (the
// channel-scale sum): the generic code's 16-lane accumulator as two halves, 16 elements per
// step, its lanes added to t in order; returns the first element left to gradx_segment's
// scalar loop, as there, so the sum keeps its bits.
template <bool G, bool GC, bool M, bool F, bool MB, bool S, typename X>
inline int64_t gradx_segment_avx2(const X* xr, const X* gr, float gv, float sc, const float* an, const float* mn,
                                  const float* fm, const float* fa, int64_t len, X* gx, bool stream, float* gp,
                                  const uint8_t* mb, int64_t q0, float& t) {
  const __m256 vg = _mm256_set1_ps(gv), vs = _mm256_set1_ps(sc);
  auto step = [&](int64_t k) {
    __m256 v = _mm256_setzero_ps();
    if constexpr (G) v = _mm256_mul_ps(GC ? vg : ld8(gr + k), _mm256_loadu_ps(an + k));
    if constexpr (M && MB)
      v = _mm256_add_ps(v, where_bits8(get_bits<8>(mb, q0 + k), _mm256_loadu_ps(fm + k)));
    else if constexpr (M)
      v = _mm256_add_ps(v, _mm256_and_ps(_mm256_cmp_ps(_mm256_mul_ps(ld8(xr + k), vs), _mm256_loadu_ps(mn + k),
                                                       _CMP_EQ_OQ),
                                         _mm256_loadu_ps(fm + k)));
    if constexpr (F) v = _mm256_add_ps(v, _mm256_loadu_ps(fa + k));
    if (stream || !gx) _mm256_storeu_ps(gp + k, v);
    else st8(gx + k, _mm256_mul_ps(v, vs));
    return v;
  };
  int64_t i = 0;
  if constexpr (S) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; i + 16 <= len; i += 16) {
      const __m256 v0 = step(i), v1 = step(i + 8);
      a0 = _mm256_add_ps(a0, _mm256_mul_ps(v0, ld8(xr + i)));
      a1 = _mm256_add_ps(a1, _mm256_mul_ps(v1, ld8(xr + i + 8)));
    }
    float l[16];
    _mm256_storeu_ps(l, a0);
    _mm256_storeu_ps(l + 8, a1);
    for (int j = 0; j < 16; ++j) t += l[j];
    return i;
  } else {
    for (; i + 8 <= len; i += 8) step(i);
    if (i < len) step(len - 8);  // overlapping the last full vector: the same values again
    return len;
  }
}
#endif

template <typename T, typename X, bool G, bool GC, bool M, bool F, bool S, bool MB = false>
inline T gradx_segment(const X* xr, const X* gr, T gv, T sc, const T* an, const T* mn, const T* fm, const T* fa,
                       int64_t len, X* gx, bool stream, T* gp, const uint8_t* mb = nullptr, int64_t q0 = 0) {
  static_assert(!(MB && S), "the channel-scale gradient reads x");
  using V = vec_t<T>;
  constexpr int64_t L = lanes<T>();
  int64_t i = 0;
  T t = 0;
  bool vectors_done = false;
#if SAM_AVX2_HALVES
  if constexpr (std::is_same_v<T, float>) {
    if (len >= 8) {
      i = gradx_segment_avx2<G, GC, M, F, MB, S, X>(xr, gr, gv, sc, an, mn, fm, fa, len, gx, stream, gp, mb, q0, t);
      vectors_done = true;
    }
  }
#endif
  if (!vectors_done) {
    V acc = {};
    auto step = [&](int64_t k) {
      V v = {};
      if (G) v = (GC ? V{} + gv : vld(gr + k)) * vload(an + k);
      if constexpr (M && MB) v += where_bits<T>(get_bits<L>(mb, q0 + k), vload(fm + k));
      else if (M) v += vsel<T>(vcmp<kEq, T>(vld(xr + k) * sc, vload(mn + k)), vload(fm + k), V{});
      if (F) v += vload(fa + k);
      if (stream || !gx) {
        vstore(gp + k, v);
      } else {
        vst(gx + k, v * sc);  // cached stores: write directly, no second pass
      }
      return v;
    };
    for (; i + L <= len; i += L) {
      const V v = step(i);
      if (S) acc += v * vld(xr + i);
    }
    // the tail as one vector ending at len, overlapping the last full one: its elements are
    // written again with the same values (without S, which would count them twice)
    if (!S && i < len && len >= L) {
      step(len - L);
      i = len;
    }
    if (S)
      for (int64_t l = 0; l < L; ++l) t += acc[l];
  }
  for (; i < len; ++i) {
    T v = 0;
    if (G) v = (GC ? gv : T(gr[i])) * an[i];
    if (M) v += (MB ? get_bit(mb, q0 + i) : T(xr[i]) * sc == mn[i]) ? fm[i] : T(0);
    if (F) v += fa[i];
    if (S) t += v * T(xr[i]);
    gp[i] = v;
    if (gx && !stream) gx[i] = X(v * sc);
  }
  if (gx && stream) mul_row<T>(gx, gp, nullptr, sc, nullptr, T(1), len, stream);
  return t;
}

// channels_last: one pixel (its C channels); ps[c] += gx' * x (if ps, X only); buf: C scratch.
// XM (mask from x): the max channels are those with x' == m. Without XM, `ix` (from pass A,
// only where the tie count is 1) is the max channel (or < 0: none), patched after the
// sweep, and x is not read at all: one input stream less (measured: the channels_last
// backward 9-10 % faster at 8x512x26x26 and 8x256x52x52). The channel-scale gradient
// (sum gx' * x) needs x, so callers take X with it. NCHW takes max bits instead (see
// kMaxBits): there the index map's cost in pass A ate the gain (measured within noise).
#if SAM_AVX2_HALVES
// gradx_pixel's vector loop for float32 in AVX2 builds: the same operations per element in
// 256-bit vectors; returns the first channel left to the scalar loop
template <bool G, bool GC, bool M, bool F, bool XM, typename X>
inline int64_t gradx_pixel_avx2(const X* xr, const X* gr, float gv, float av, const float* sr, float m, float f,
                                float fa, int64_t C, float* ps, X* gx, bool stream, float* gp) {
  const __m256 gav = _mm256_set1_ps(gv * av), vav = _mm256_set1_ps(av), vfa = _mm256_set1_ps(fa),
               vm = _mm256_set1_ps(m), vf = _mm256_set1_ps(f);
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    __m256 v = F ? vfa : _mm256_setzero_ps();
    if constexpr (G) v = _mm256_add_ps(GC ? gav : _mm256_mul_ps(ld8(gr + c), vav), v);
    if constexpr (M && XM) {
      const __m256 xv = ld8(xr + c);
      const __m256 xs = sr ? _mm256_mul_ps(xv, _mm256_loadu_ps(sr + c)) : xv;
      v = _mm256_add_ps(v, _mm256_and_ps(_mm256_cmp_ps(xs, vm, _CMP_EQ_OQ), vf));
    }
    if (XM && ps) _mm256_storeu_ps(ps + c, _mm256_add_ps(_mm256_loadu_ps(ps + c), _mm256_mul_ps(v, ld8(xr + c))));
    if (stream || !gx) _mm256_storeu_ps(gp + c, v);
    else st8(gx + c, sr ? _mm256_mul_ps(v, _mm256_loadu_ps(sr + c)) : v);
  }
  return c;
}
#endif

template <typename T, typename X, bool G, bool GC, bool M, bool F, bool XM>
inline void gradx_pixel(const X* xr, const X* gr, T gv, T av, const T* sr, T m, T ix, T f, T fa, int64_t C, T* ps,
                        X* gx, bool stream, T* gp) {
  using V = vec_t<T>;
  constexpr int64_t L = lanes<T>();
  const V gav = V{} + gv * av;
  int64_t c = 0;
#if SAM_AVX2_HALVES
  if constexpr (std::is_same_v<T, float>)
    c = gradx_pixel_avx2<G, GC, M, F, XM, X>(xr, gr, gv, av, sr, m, f, fa, C, ps, gx, stream, gp);
#endif
  for (; c + L <= C; c += L) {
    V v = F ? V{} + fa : V{};
    if (G) v = (GC ? gav : vld(gr + c) * av) + v;
    if (M && XM) {
      const V xs = sr ? vld(xr + c) * vload(sr + c) : vld(xr + c);
      v += vsel<T>(vcmp<kEq, T>(xs, V{} + m), V{} + f, V{});
    }
    if (XM && ps) vstore(ps + c, vload(ps + c) + v * vld(xr + c));
    if (stream || !gx) {
      vstore(gp + c, v);
    } else {
      vst(gx + c, sr ? v * vload(sr + c) : v);
    }
  }
  for (; c < C; ++c) {
    T v = F ? fa : T(0);
    if (G) v = (GC ? gv * av : T(gr[c]) * av) + v;
    if (M && XM) v += ((sr ? T(xr[c]) * sr[c] : T(xr[c])) == m) ? f : T(0);
    if (XM && ps) ps[c] += v * T(xr[c]);
    gp[c] = v;
    if (gx && !stream) gx[c] = X(sr ? v * sr[c] : v);
  }
  if (M && !XM && ix >= T(0)) {  // the one max channel
    const int64_t k = int64_t(ix);
    T v = F ? fa : T(0);
    if (G) v = (GC ? gv * av : T(gr[k]) * av) + v;
    v += f;
    gp[k] = v;
    if (gx && !stream) gx[k] = X(sr ? v * sr[k] : v);
  }
  if (gx && stream) mul_row<T>(gx, gp, sr, T(1), nullptr, T(1), C, stream);
}

// Pass B takes the max channel from pass A's index map (instead of comparing x with the
// max) only for channels_last, with a max slot, and without a channel-scale gradient
// (sum gx' * x reads x anyway); per pixel / band it still needs a tie count of 1.
inline bool max_by_index(bool has_max, bool nhwc, bool need_gs) { return has_max && nhwc && !need_gs; }

// true if some pixel of [0, n) has tied maxima (count > 1)
template <typename T>
inline bool any_ties(const T* cnt, int64_t n) {
  for (int64_t k = 0; k < n; ++k)
    if (cnt[k] > T(1)) return true;
  return false;
}

// ix / cnt (with M, batch stride HW; channels_last): index map and tie counts of pass A;
// null: the max mask comes from x everywhere.
template <typename T, typename X, bool G, bool GC, bool M, bool F>
void k_gradx_impl(const X* x, const T* s, const X* g, const T* a, const T* mx, int64_t mbs, const T* fmax,
                  const T* fmean, const T* ix, const T* cnt, int64_t N, int64_t C, int64_t HW, bool nhwc, X* gx,
                  T* gs, bool stream, const uint8_t* bits) {
  const T gv = (G && GC) ? T(g[0]) : T(0);
  const bool by_index = max_by_index(M, nhwc, gs != nullptr) && ix && cnt;
  if (!nhwc) {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(HW, 1));
    const MaxBitsLayout lay(N, C, HW);
    at::parallel_for(0, N * C, grain, [&](int64_t b, int64_t e) {
      std::vector<T> buf(HW);
      for (int64_t r = b; r < e; ++r) {
        const int64_t n = r / C;
        auto run = [&](auto s_t, auto b_t, int64_t p0, int64_t len, const uint8_t* mb) {
          return gradx_segment<T, X, G, GC, M, F, decltype(s_t)::value, decltype(b_t)::value>(
              x + r * HW + p0, (G && !GC) ? g + r * HW + p0 : nullptr, gv, s ? s[r] : T(1),
              G ? a + n * HW + p0 : nullptr, M ? mx + n * mbs + p0 : nullptr, M ? fmax + n * HW + p0 : nullptr,
              F ? fmean + n * HW + p0 : nullptr, len, gx ? gx + r * HW + p0 : nullptr, stream, buf.data(), mb, 0);
        };
        if (gs) {
          gs[r] = run(std::true_type{}, std::false_type{}, 0, HW, nullptr);
        } else if (M && bits) {  // chunk by chunk, as k_reduce wrote the bits
          for (int64_t k = 0; k < lay.nchunks; ++k)
            run(std::false_type{}, std::true_type{}, k * lay.chunk, std::min(lay.chunk, HW - k * lay.chunk),
                bits + lay.row(n, k, r - n * C));
        } else {
          run(std::false_type{}, std::false_type{}, 0, HW, nullptr);
        }
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
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = t / nblocks, q0 = (t % nblocks) * block;
        const int64_t q1 = std::min(HW, q0 + block);
        for (int64_t q = q0; q < q1; ++q) {
          const int64_t p = n * HW + q;
          auto run = [&](auto x_t) {
            gradx_pixel<T, X, G, GC, M, F, decltype(x_t)::value>(
                x + p * C, (G && !GC) ? g + p * C : nullptr, gv, G ? a[p] : T(0), s ? s + n * C : nullptr,
                M ? mx[n * mbs + q] : T(0), by_index ? ix[p] : T(-1), M ? fmax[p] : T(0), F ? fmean[p] : T(0), C,
                gs ? partial.data() + t * C : nullptr, gx ? gx + p * C : nullptr, stream, buf.data());
          };
          if (by_index && cnt[p] <= T(1)) run(std::false_type{}); else run(std::true_type{});
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

// bits: k_reduce's max bits (NCHW; may be null): then x is not read for the max mask (not
// with gs, whose sum reads x)
template <typename T, typename X>
void k_gradx(const X* x, const T* s, const X* g, bool gc, const T* a, const T* mx, int64_t mbs, const T* fmax,
             const T* fmean, int64_t N, int64_t C, int64_t HW, bool nhwc, X* gx, T* gs, bool stream,
             const T* ix = nullptr, const T* cnt = nullptr, const uint8_t* bits = nullptr) {
  const bool G = g != nullptr, M = mx != nullptr, F = fmean != nullptr;
#define SA_GRADX(g_, gc_, m_, f_)                                                                            \
  k_gradx_impl<T, X, g_, gc_, m_, f_>(x, s, g, a, mx, mbs, fmax, fmean, ix, cnt, N, C, HW, nhwc, gx, gs, stream, \
                                      bits)
#define SA_GRADX_MF(g_, gc_)                   \
  if (M && F) SA_GRADX(g_, gc_, true, true);   \
  else if (M) SA_GRADX(g_, gc_, true, false);  \
  else if (F) SA_GRADX(g_, gc_, false, true);  \
  else SA_GRADX(g_, gc_, false, false);
  if (G && gc) {
    SA_GRADX_MF(true, true)
  } else if (G) {
    SA_GRADX_MF(true, false)
  } else {
    SA_GRADX_MF(false, false)
  }
#undef SA_GRADX_MF
#undef SA_GRADX
}

// ---------------------------------------------------------------- global (spatial) pooling
// For CBAM's channel gate: max and mean over H*W of each (n, c) in one read of x.
// mx / mean: [N, C] outputs (either may be null). cnt (channels_last only, with mx): [N, C]
// number of elements equal to the max, counted in the same read (the backward then needs no
// counting pass over x; NCHW counts each row while it is in L1 anyway).
// Two phases, each a range of independent items that any thread may take (k_global_pool runs
// them through at::parallel_for; cbam_forward's one parallel region splits them by hand):
// run(b, e) reads x (NCHW: items are the N * C rows; channels_last: N * nb pixel blocks into
// partial accumulators), then, channels_last only, combine(b, e) sums the partials of the
// N * C outputs. The bits depend on nb (set from the thread count), not on the split.
template <typename T, typename X>
struct GlobalPool {
  using V = vec_t<T>;
  static constexpr int64_t L = lanes<T>();
  const X* x;
  int64_t N, C, HW;
  bool nhwc;
  T *mx, *mean, *cnt;
  int64_t nb = 1, block = 0, tp = 1;  // channels_last: blocks per image, pixels per block / per tile
  bool prefetch = false, counting = false;
  std::vector<T> pm, ps, pc;  // channels_last partials [N * nb, C]

  GlobalPool(const X* x_, int64_t N_, int64_t C_, int64_t HW_, bool nhwc_, T* mx_, T* mean_, T* cnt_)
      : x(x_), N(N_), C(C_), HW(HW_), nhwc(nhwc_), mx(mx_), mean(mean_), cnt(cnt_) {
    if (!nhwc) return;
    // one contiguous pass over the pixels of an image (or of a block of them when there are
    // fewer images than threads), accumulating all C channels
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    nb = N >= threads ? 1 : std::min(HW, (threads + N - 1) / N);
    block = (HW + nb - 1) / nb;
    counting = cnt && mx;
    pm.resize(N * nb * C);
    ps.resize(N * nb * C);
    pc.resize(counting ? N * nb * C : 0);
    // pixels per tile (see the sweep below), and whether the next tile is prefetched: not
    // where each thread's share of x fits in half an L2 (1x1024x13x13: 1.04-1.10x the time
    // with the prefetches, which then only cost instructions)
    tp = std::max<int64_t>(1, kGpTileBytes / std::max<int64_t>(1, C * int64_t(sizeof(X))));
    prefetch = N * HW * C * int64_t(sizeof(X)) > threads * (int64_t(1) << 19);
  }

  int64_t items() const { return nhwc ? N * nb : N * C; }
  int64_t grain() const { return nhwc ? 1 : std::max<int64_t>(1, 16384 / std::max<int64_t>(HW, 1)); }

  void run(int64_t b, int64_t e) {
    if (!nhwc) {
      for (int64_t r = b; r < e; ++r) row(r);
    } else {
      for (int64_t t = b; t < e; ++t) pixel_block(t);
    }
  }

  // NCHW: max and mean of row r
  void row(int64_t r) {
    const X* row = x + r * HW;
    T m = T(row[0]), sum = 0;
    int64_t i = 0;
#if SAM_AVX2_HALVES
    if constexpr (std::is_same_v<T, float>) {
      if (HW >= L) {  // the vector part below, each 64-byte vector as two 256-bit halves
        __m256 m0l = ld8(row), m0h = ld8(row + 8), m1l = m0l, m1h = m0h;
        __m256 a0l = _mm256_setzero_ps(), a0h = a0l, a1l = a0l, a1h = a0l;
        for (; i + 2 * L <= HW; i += 2 * L) {
          const __m256 v0l = ld8(row + i), v0h = ld8(row + i + 8), v1l = ld8(row + i + L), v1h = ld8(row + i + L + 8);
          m0l = vmax8(m0l, v0l);
          m0h = vmax8(m0h, v0h);
          m1l = vmax8(m1l, v1l);
          m1h = vmax8(m1h, v1h);
          a0l = _mm256_add_ps(a0l, v0l);
          a0h = _mm256_add_ps(a0h, v0h);
          a1l = _mm256_add_ps(a1l, v1l);
          a1h = _mm256_add_ps(a1h, v1h);
        }
        if (i + L <= HW) {
          const __m256 v0l = ld8(row + i), v0h = ld8(row + i + 8);
          m0l = vmax8(m0l, v0l);
          m0h = vmax8(m0h, v0h);
          a0l = _mm256_add_ps(a0l, v0l);
          a0h = _mm256_add_ps(a0h, v0h);
          i += L;
        }
        if (i < HW) {
          const __m256 v1l = ld8(row + HW - L), v1h = ld8(row + HW - L + 8);
          const __m256 lane = _mm256_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f);
          const __m256 d = _mm256_set1_ps(float(i - (HW - L)));
          m1l = vmax8(m1l, v1l);
          m1h = vmax8(m1h, v1h);
          a1l = _mm256_add_ps(a1l, _mm256_and_ps(_mm256_cmp_ps(lane, d, _CMP_GE_OQ), v1l));
          a1h = _mm256_add_ps(a1h, _mm256_and_ps(_mm256_cmp_ps(_mm256_add_ps(lane, _mm256_set1_ps(8.f)), d, _CMP_GE_OQ), v1h));
          i = HW;
        }
        m = hreduce8(vmax8(m0l, m1l), vmax8(m0h, m1h), true);
        sum = hreduce8(_mm256_add_ps(a0l, a1l), _mm256_add_ps(a0h, a1h), false);
      }
    } else
#endif
    if (HW >= L) {
      // two vector accumulator pairs, the row's last HW % L elements as one vector
      // ending at HW (for the sum, its lanes already counted masked to +0, which adds
      // exactly: no lane of a sum started at +0 is ever -0), tree reductions at the end.
      // The lane-by-lane reduction and scalar tail they replace were about 100 dependent
      // steps per row: 0.45x the time at 2x2048x7x7, 0.71x at 13x13, 0.86x at 26x26.
      V m0 = vld(row), m1 = m0, a0 = {}, a1 = {};
      for (; i + 2 * L <= HW; i += 2 * L) {
        const V v0 = vld(row + i), v1 = vld(row + i + L);
        m0 = vmax(m0, v0);
        m1 = vmax(m1, v1);
        a0 += v0;
        a1 += v1;
      }
      if (i + L <= HW) {
        const V v0 = vld(row + i);
        m0 = vmax(m0, v0);
        a0 += v0;
        i += L;
      }
      if (i < HW) {
        const V v1 = vld(row + HW - L);
        m1 = vmax(m1, v1);
        a1 += vsel<T>(vcmp<kGe, T>(lane_index<T>(), V{} + T(i - (HW - L))), v1, V{});
        i = HW;
      }
      m = hreduce<T, 64>(vmax(m0, m1), true);
      sum = hreduce<T, 64>(a0 + a1, false);
    }
    for (; i < HW; ++i) {
      m = vmax(m, T(row[i]));
      sum += T(row[i]);
    }
    if (sum != sum && any_nan<X, T>(row, nullptr, HW, 1)) m = std::numeric_limits<T>::quiet_NaN();
    if (mx) mx[r] = m;
    if (mean) mean[r] = sum / T(HW);
  }

  // channels_last: block t (image t / nb, pixels of its share t % nb) into partials t
  void pixel_block(int64_t t) {
    const int64_t n = t / nb, p0 = (t % nb) * block, p1 = std::min(HW, p0 + block);
    T* m = pm.data() + t * C;
    T* sm = ps.data() + t * C;
    T* ct = counting ? pc.data() + t * C : nullptr;
    const X* base = x + n * HW * C;
    if (p0 >= p1) {
      std::fill(sm, sm + C, T(0));
      std::fill(m, m + C, -std::numeric_limits<T>::infinity());
      if (counting) std::fill(ct, ct + C, T(0));
      return;
    }
    std::copy(base + p0 * C, base + (p0 + 1) * C, m);
    std::copy(base + p0 * C, base + (p0 + 1) * C, sm);  // 0 + v exactly: the same sums
    if (counting) std::fill(ct, ct + C, T(1));
    const V one = V{} + T(1), zero = V{};
    // Tiles of tp pixels (about kGpTileBytes of x), swept once per block of NB channel
    // vectors whose accumulators stay in registers over the whole tile (the sum still
    // adds the pixels in order, so every tiling gives the same bits). With counting, a
    // larger value restarts the count at 1 and an equal one adds 1 (NaN does neither: a
    // NaN max is restored below, and no element equals it in backward). Within a tile
    // the reads jump from pixel to pixel, which the hardware prefetchers do not follow
    // from memory; so the next tile's lines are prefetched into L2 in address order
    // along the current one (without them: 1.35-1.6x the time at 8x256x52x52,
    // 8x512x26x26 and 2x1024x52x52, the same at 8x128x104x104). NB = 4 where a pixel
    // spans a 4 KiB page (8 was slower there). Against the previous sweeps of one pixel
    // (four where x was cache-resident) over accumulator rows in L1, which were bound by
    // their stores: see docs/performance.md.
    auto tile = [&](auto count_t, int64_t p, int64_t np) {
      constexpr bool CNT = decltype(count_t)::value;
      const X* row = base + p * C;
      const char* pf = reinterpret_cast<const char*>(row + np * C);
      const char* pf_end = reinterpret_cast<const char*>(base + std::min(p1, p + np + tp) * C);
      int64_t c = 0;
      auto sweep = [&](auto nb_t) {
        constexpr int NB = decltype(nb_t)::value;
        for (; c + NB * L <= C; c += NB * L) {
          V mo[NB], a[NB], k[NB];
#pragma GCC unroll 8
          for (int i = 0; i < NB; ++i) {
            mo[i] = vload(m + c + i * L);
            a[i] = vload(sm + c + i * L);
            k[i] = CNT ? vload(ct + c + i * L) : V{};
          }
          const X* r = row + c;
          for (int64_t j = 0; j < np; ++j, r += C) {
            if (prefetch && pf < pf_end) {
#pragma GCC unroll 8
              for (int i = 0; i < NB; ++i) __builtin_prefetch(pf + i * 64, 0, 2);
              pf += NB * 64;
            }
#pragma GCC unroll 8
            for (int i = 0; i < NB; ++i) {
              const V v = vld(r + i * L);
              if (CNT)
                k[i] = vsel<T>(vcmp<kGt, T>(v, mo[i]), one, k[i] + vsel<T>(vcmp<kEq, T>(v, mo[i]), one, zero));
              mo[i] = vmax(mo[i], v);
              a[i] += v;
            }
          }
#pragma GCC unroll 8
          for (int i = 0; i < NB; ++i) {
            vstore(m + c + i * L, mo[i]);
            vstore(sm + c + i * L, a[i]);
            if (CNT) vstore(ct + c + i * L, k[i]);
          }
        }
      };
#if SAM_AVX2_HALVES
      if constexpr (std::is_same_v<T, float>) {
        // AVX2 builds (see SAM_AVX2_HALVES): the same sweep in 256-bit vectors, four per
        // block (with counting, twelve accumulators in registers); per channel the same
        // operations on the pixels in the same order, so the same bits
        auto sweep8 = [&](auto nb_t) {
          constexpr int NB = decltype(nb_t)::value;
          constexpr int PF = int((NB * 8 * sizeof(X) + 63) / 64);  // lines of x per pixel and block
          const __m256 one8 = _mm256_set1_ps(1.f);
          for (; c + NB * 8 <= C; c += NB * 8) {
            __m256 mo[NB], a[NB], k[NB];
#pragma GCC unroll 4
            for (int i = 0; i < NB; ++i) {
              mo[i] = _mm256_loadu_ps(m + c + i * 8);
              a[i] = _mm256_loadu_ps(sm + c + i * 8);
              k[i] = CNT ? _mm256_loadu_ps(ct + c + i * 8) : _mm256_setzero_ps();
            }
            const X* r = row + c;
            for (int64_t j = 0; j < np; ++j, r += C) {
              if (prefetch && pf < pf_end) {
#pragma GCC unroll 4
                for (int i = 0; i < PF; ++i) __builtin_prefetch(pf + i * 64, 0, 2);
                pf += PF * 64;
              }
#pragma GCC unroll 4
              for (int i = 0; i < NB; ++i) {
                const __m256 v = ld8(r + i * 8);
                if (CNT)
                  k[i] = _mm256_blendv_ps(_mm256_add_ps(k[i], _mm256_and_ps(_mm256_cmp_ps(v, mo[i], _CMP_EQ_OQ), one8)),
                                          one8, _mm256_cmp_ps(v, mo[i], _CMP_GT_OQ));
                mo[i] = vmax8(mo[i], v);
                a[i] = _mm256_add_ps(a[i], v);
              }
            }
#pragma GCC unroll 4
            for (int i = 0; i < NB; ++i) {
              _mm256_storeu_ps(m + c + i * 8, mo[i]);
              _mm256_storeu_ps(sm + c + i * 8, a[i]);
              if (CNT) _mm256_storeu_ps(ct + c + i * 8, k[i]);
            }
          }
        };
        sweep8(std::integral_constant<int, 4>{});
        sweep8(std::integral_constant<int, 1>{});
      }
#endif
      if (C * int64_t(sizeof(X)) < 4096) sweep(std::integral_constant<int, 8>{});
      sweep(std::integral_constant<int, 4>{});
      sweep(std::integral_constant<int, 1>{});
      for (; c < C; ++c)
        for (int64_t j = 0; j < np; ++j) {
          const T v = T(row[j * C + c]);
          if (CNT) ct[c] = v > m[c] ? T(1) : ct[c] + (v == m[c] ? T(1) : T(0));
          m[c] = vmax(m[c], v);
          sm[c] += v;
        }
    };
    auto run_tiles = [&](auto count_t) {
      for (int64_t p = p0 + 1; p < p1; p += tp) tile(count_t, p, std::min(tp, p1 - p));
    };
    if (counting) {
      run_tiles(std::true_type{});
    } else {
      run_tiles(std::false_type{});
    }
  }

  // channels_last: outputs [b, e) of the N * C (partials summed in block order)
  void combine(int64_t b, int64_t e) {
    for (int64_t n = b / C; n * C < e; ++n) {
      const int64_t c1 = std::min(C, e - n * C);
      for (int64_t c = std::max<int64_t>(0, b - n * C); c < c1; ++c) {
        const int64_t i = n * C + c;
        T mc = pm[n * nb * C + c], sc = ps[n * nb * C + c];
        for (int64_t k = 1; k < nb; ++k) {
          mc = vmax(mc, pm[(n * nb + k) * C + c]);
          sc += ps[(n * nb + k) * C + c];
        }
        if (counting) {
          T k = 0;
          for (int64_t j = 0; j < nb; ++j)
            if (pm[(n * nb + j) * C + c] == mc) k += pc[(n * nb + j) * C + c];
          cnt[i] = k;
        }
        if (sc != sc && any_nan<X, T>(x + n * HW * C + c, nullptr, HW, C)) mc = std::numeric_limits<T>::quiet_NaN();
        if (mx) mx[i] = mc;
        if (mean) mean[i] = sc / T(HW);
      }
    }
  }
};

template <typename T, typename X>
void k_global_pool(const X* x, int64_t N, int64_t C, int64_t HW, bool nhwc, T* mx, T* mean, T* cnt = nullptr) {
  GlobalPool<T, X> gp(x, N, C, HW, nhwc, mx, mean, cnt);
  at::parallel_for(0, gp.items(), gp.grain(), [&](int64_t b, int64_t e) { gp.run(b, e); });
  if (nhwc) at::parallel_for(0, N * C, C, [&](int64_t b, int64_t e) { gp.combine(b, e); });
}

// One run of n elements of the global-pool gradient: out[k] = (acc ? out[k] : 0) + f +
// [row[k] == m] * fm, the max term only with has_max. at(k, f, fm, m) sets the operands of
// element k, as T (one element) or vec_t<T> (lanes<T>() elements from k): an NCHW row
// broadcasts one value each, a channels_last pixel reads one per channel. With `stream`, the
// run goes to buf first and is copied out with non-temporal stores.
template <typename T, typename X, typename At>
inline void global_pool_grad_run(const X* row, int64_t n, bool has_max, bool acc, X* out, T* buf, bool stream,
                                 At at) {
  using V = vec_t<T>;
  constexpr int64_t L = lanes<T>();
  auto emit = [&](auto st_t) {  // ST: write to buf (a compile-time choice, out of the loop)
    constexpr bool ST = decltype(st_t)::value;
    int64_t k = 0;
#if SAM_AVX2_HALVES
    if constexpr (std::is_same_v<T, float>) {
      // AVX2 builds (see SAM_AVX2_HALVES): the same operations per element in 256-bit
      // vectors; at(k, f, fm, m) with __m256 operands gives 8 elements from k
      for (; k + 8 <= n; k += 8) {
        __m256 f, fm, m;
        at(k, f, fm, m);
        __m256 v = has_max ? _mm256_blendv_ps(f, _mm256_add_ps(f, fm), _mm256_cmp_ps(ld8(row + k), m, _CMP_EQ_OQ))
                           : f;
        if (acc) v = _mm256_add_ps(ld8(out + k), v);
        if constexpr (ST) _mm256_storeu_ps(buf + k, v); else st8(out + k, v);
      }
    }
#endif
    for (; k + L <= n; k += L) {
      V f, fm, m;
      at(k, f, fm, m);
      V v = has_max ? vsel<T>(vcmp<kEq, T>(vld(row + k), m), f + fm, f) : f;
      if (acc) v = vld(out + k) + v;
      if constexpr (ST) vstore(buf + k, v); else vst(out + k, v);
    }
    for (; k < n; ++k) {
      T f, fm, m;
      at(k, f, fm, m);
      const T v = (acc ? T(out[k]) : T(0)) + ((has_max && T(row[k]) == m) ? f + fm : f);
      if constexpr (ST) buf[k] = v; else out[k] = X(v);
    }
  };
  if (stream) {
    emit(std::true_type{});
    mul_row<T>(out, buf, nullptr, T(1), nullptr, T(1), n, true);
  } else {
    emit(std::false_type{});
  }
}

// Backward of the global pooling: gx[n, c, p] = fmean[n, c] + [x == mx[n, c]] * fmax[n, c]
// (fmean = d mean / HW; fmax = gmax / number of tied maxima, counted here). Either of
// gmax (with mx) / fmean may be null. With `acc`, added to what gx holds (one read-modify-
// write of gx instead of a new tensor that autograd would then add: CBAM's fused backward).
// counts (channels_last, from the forward): [N, C] tie counts, no counting pass; may be null.
template <typename T, typename X>
void k_global_pool_backward(const X* x, const T* mx, const T* gmax, const T* fmean, int64_t N, int64_t C, int64_t HW,
                            bool nhwc, X* gx, bool stream, bool acc, const T* counts = nullptr) {
  using V = vec_t<T>;
  constexpr int64_t L = lanes<T>();
  const V one = V{} + T(1), zero = V{};
  if (!nhwc) {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(HW, 1));
    at::parallel_for(0, N * C, grain, [&](int64_t b, int64_t e) {
      std::vector<T> buf(HW);
      for (int64_t r = b; r < e; ++r) {
        const X* row = x + r * HW;
        T fm = 0;
        const T m = mx ? mx[r] : T(0);
        if (mx) {
          // (the count is a sum of ones: exact in any order)
          T cnt = 0;
          int64_t i = 0;
#if SAM_AVX2_HALVES
          if constexpr (std::is_same_v<T, float>) {
            const __m256 vm = _mm256_set1_ps(m), o = _mm256_set1_ps(1.f);
            __m256 k0 = _mm256_setzero_ps(), k1 = _mm256_setzero_ps();
            for (; i + 16 <= HW; i += 16) {
              k0 = _mm256_add_ps(k0, _mm256_and_ps(_mm256_cmp_ps(ld8(row + i), vm, _CMP_EQ_OQ), o));
              k1 = _mm256_add_ps(k1, _mm256_and_ps(_mm256_cmp_ps(ld8(row + i + 8), vm, _CMP_EQ_OQ), o));
            }
            float l[8];
            _mm256_storeu_ps(l, _mm256_add_ps(k0, k1));
            for (int j = 0; j < 8; ++j) cnt += l[j];
          } else
#endif
          {
            V k = {};
            for (; i + L <= HW; i += L) k += vsel<T>(vcmp<kEq, T>(vld(row + i), V{} + m), one, zero);
            for (int64_t l = 0; l < L; ++l) cnt += k[l];
          }
          for (; i < HW; ++i) cnt += T(row[i]) == m ? T(1) : T(0);
          fm = gmax[r] / cnt;
        }
        const T fa = fmean ? fmean[r] : T(0);
        global_pool_grad_run<T>(row, HW, mx != nullptr, acc, gx + r * HW, buf.data(), stream,
                                [&](int64_t, auto& f, auto& g, auto& mm) {
                                  if constexpr (std::is_same_v<std::decay_t<decltype(f)>, T>) {
                                    f = fa, g = fm, mm = m;
#if SAM_AVX2_HALVES
                                  } else if constexpr (std::is_same_v<std::decay_t<decltype(f)>, __m256>) {
                                    f = _mm256_set1_ps(fa), g = _mm256_set1_ps(fm), mm = _mm256_set1_ps(m);
#endif
                                  } else {
                                    f = V{} + fa, g = V{} + fm, mm = V{} + m;
                                  }
                                });
      }
      stream_fence(stream);
    });
  } else {
    // channels_last: per image, tie counts over its pixels, then the gradient. With fewer
    // images than threads, each image's pixels are split into blocks (partial counts summed
    // per image), so that every thread has work.
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    const int64_t nb = N >= threads ? 1 : std::min(HW, (threads + N - 1) / N);
    const int64_t block = (HW + nb - 1) / nb;
    const bool counting = mx && !counts;
    std::vector<T> cnt(counting ? N * nb * C : 0, T(0)), fm(N * C, T(0)), fa(N * C, T(0));
    if (counting) {
      at::parallel_for(0, N * nb, 1, [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; ++t) {
          const int64_t n = t / nb, p0 = (t % nb) * block, p1 = std::min(HW, p0 + block);
          const T* mn = mx + n * C;
          T* ct = cnt.data() + t * C;
          for (int64_t p = p0; p < p1; ++p) {
            const X* row = x + (n * HW + p) * C;
            int64_t c = 0;
            for (; c + L <= C; c += L)
              vstore(ct + c, vload(ct + c) + vsel<T>(vcmp<kEq, T>(vld(row + c), vload(mn + c)), one, zero));
            for (; c < C; ++c) ct[c] += T(row[c]) == mn[c] ? T(1) : T(0);
          }
        }
      });
    }
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) {
        fa[n * C + c] = fmean ? fmean[n * C + c] : T(0);
        if (mx) {
          T k = 0;
          if (counts) {
            k = counts[n * C + c];
          } else {
            for (int64_t j = 0; j < nb; ++j) k += cnt[(n * nb + j) * C + c];
          }
          fm[n * C + c] = gmax[n * C + c] / k;
        }
      }
    at::parallel_for(0, N * nb, 1, [&](int64_t b, int64_t e) {
      std::vector<T> buf(C);
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = t / nb, p0 = (t % nb) * block, p1 = std::min(HW, p0 + block);
        const T* mn = mx ? mx + n * C : nullptr;
        const T* fan = fa.data() + n * C;
        const T* fmn = fm.data() + n * C;
        for (int64_t p = p0; p < p1; ++p) {
          global_pool_grad_run<T>(x + (n * HW + p) * C, C, mn != nullptr, acc, gx + (n * HW + p) * C, buf.data(),
                                  stream, [&](int64_t c, auto& f, auto& g, auto& mm) {
                                    if constexpr (std::is_same_v<std::decay_t<decltype(f)>, T>) {
                                      f = fan[c], g = fmn[c], mm = mn ? mn[c] : T(0);
#if SAM_AVX2_HALVES
                                    } else if constexpr (std::is_same_v<std::decay_t<decltype(f)>, __m256>) {
                                      f = _mm256_loadu_ps(fan + c), g = _mm256_loadu_ps(fmn + c),
                                      mm = mn ? _mm256_loadu_ps(mn + c) : _mm256_setzero_ps();
#endif
                                    } else {
                                      f = vload(fan + c), g = vload(fmn + c), mm = mn ? vload(mn + c) : V{};
                                    }
                                  });
        }
      }
      stream_fence(stream);
    });
  }
}

// ---------------------------------------------------------------- small maps
// The [N, P, H, W] pooled maps go through a k x k conv, an optional affine norm and
// the sigmoid. Written with GCC/Clang vector extensions (one 64-byte vector = one
// AVX-512 register, two AVX2 ones, ...) on zero-padded copies of the maps, so that
// every tap is an unmasked vector load; four output rows share a sweep over the taps
// (independent accumulators hide the FMA latency).
// sigmoid of a float vector: exp by Cephes' range reduction and degree-6 polynomial
// (branch-free, vectorised; ~1 ulp), NaN propagates.
#if SAM_AVX2_HALVES
// vsigmoid below for one 256-bit half, the same operations (AVX2 builds, see SAM_AVX2_HALVES)
inline __m256 vsigmoid8(__m256 z) {
  auto c = [](float v) { return _mm256_set1_ps(v); };
  __m256 x = _mm256_sub_ps(_mm256_setzero_ps(), z);
  x = _mm256_blendv_ps(x, c(-87.3f), _mm256_cmp_ps(x, c(-87.3f), _CMP_LT_OQ));
  x = _mm256_blendv_ps(x, c(88.7f), _mm256_cmp_ps(x, c(88.7f), _CMP_GT_OQ));
  const __m256 n = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(x, c(1.44269504088896341f)), c(12582912.0f)),
                                 c(12582912.0f));
  __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(n, c(0.693359375f)));
  r = _mm256_sub_ps(r, _mm256_mul_ps(n, c(-2.12194440e-4f)));
  __m256 p = c(1.9875691500e-4f);
  p = _mm256_add_ps(_mm256_mul_ps(p, r), c(1.3981999507e-3f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), c(8.3334519073e-3f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), c(4.1665795894e-2f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), c(1.6666665459e-1f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), c(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p, r), r), r), c(1.0f));
  const __m256 two_n =
      _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23));
  return _mm256_div_ps(c(1.0f), _mm256_add_ps(c(1.0f), _mm256_mul_ps(p, two_n)));
}
#endif
inline vec_t<float> vsigmoid(vec_t<float> z) {
#if SAM_AVX2_HALVES
  __m256 h[2];
  std::memcpy(h, &z, sizeof(h));
  h[0] = vsigmoid8(h[0]);
  h[1] = vsigmoid8(h[1]);
  vec_t<float> out;
  std::memcpy(&out, h, sizeof(out));
  return out;
#endif
  typedef int32_t ivec __attribute__((vector_size(64)));
  vec_t<float> x = -z;
  x = vsel<float>(vcmp<kLt, float>(x, vec_t<float>{} - 87.3f), vec_t<float>{} - 87.3f, x);
  x = vsel<float>(vcmp<kGt, float>(x, vec_t<float>{} + 88.7f), vec_t<float>{} + 88.7f, x);
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

// padded rows [hp0, hp1) of every slot of pad [P, Hp, Wp] <- maps [P, H*W] (P maps of one
// image; zeros outside the image)
template <typename T>
void pad_rows(const T* maps, int64_t P, const Pad& g, T* pad, int64_t hp0, int64_t hp1) {
  for (int64_t p = 0; p < P; ++p)
    for (int64_t hp = hp0; hp < hp1; ++hp) {
      T* row = pad + (p * g.Hp + hp) * g.Wp;
      std::fill(row, row + g.Wp, T(0));
      const int64_t h = hp - g.ph;
      if (h >= 0 && h < g.H) std::copy(maps + (p * g.H + h) * g.W, maps + (p * g.H + h + 1) * g.W, row + g.pw);
    }
}

// pad [P, Hp, Wp] <- maps [P, H*W] (P maps of one image)
template <typename T>
void pad_maps(const T* maps, int64_t P, const Pad& g, T* pad) {
  pad_rows<T>(maps, P, g, pad, 0, g.Hp);
}

// One callable out of several lambdas (each keeps its own operator()).
template <class... F>
struct Overload : F... {
  using F::operator()...;
};
template <class... F>
Overload(F...) -> Overload<F...>;

#if SAM_AVX2_HALVES
// The 256-bit halves of a 16-lane output vector that hold any of the `left` outputs still
// wanted in its row: the upper half only where more than eight are left. The callbacks store
// the first min(16, left) lanes, so a half past the row's end is never computed (it was an
// eighth of the conv at 56x56, 52x52, 104x104, half of it at 7x7) and is handed on as zeros.
inline int halves_needed(int64_t left) { return left > 8 ? 2 : 1; }

// Hands a 16-lane float output held as two 256-bit halves to emit: as the halves where emit
// takes them, emit(h, w0, lo, hi), else as one vec_t. GCC moves a 64-byte generic vector
// through the stack in 8- and 16-byte pieces in AVX2 builds; at a few channels that traffic
// in the sigmoid and the stores of the small maps was most of the forward's conv stage.
template <typename Emit>
inline void emit_halves(Emit& emit, int64_t h, int64_t w0, __m256 lo, __m256 hi) {
  if constexpr (std::is_invocable_v<Emit&, int64_t, int64_t, __m256, __m256>) {
    emit(h, w0, lo, hi);
  } else {
    vec_t<float> o;
    std::memcpy(&o, &lo, 32);
    std::memcpy(reinterpret_cast<char*>(&o) + 32, &hi, 32);
    emit(h, w0, o);
  }
}
#endif

// Correlation of the padded maps with w [P, KH, KW] (flipped taps if `flip`), output
// rows [h0, h1): emit(h, w0, acc) receives the raw sums of lanes w0 .. w0 + L - 1.
template <typename T, typename Emit>
inline void correlate_rows(const T* pad, int64_t P, const Pad& g, const T* w, bool flip, int64_t h0,
                           int64_t h1, Emit&& emit) {
  constexpr int64_t L = lanes<T>();
  const int64_t KK = g.KH * g.KW;
  // Every path sums the taps in the same order (map p, then tap column j, then tap row i),
  // so an output's bits do not depend on how the rows were split into calls and blocks
  // (bands, thread shares).
  auto tap = [&](int64_t p, int64_t i, int64_t j) {
    return flip ? w[p * KK + (g.KH - 1 - i) * g.KW + (g.KW - 1 - j)] : w[p * KK + i * g.KW + j];
  };
  int64_t h = h0;
  if (g.dil == 1 && g.KH == 7) {
    // 7 tap rows (CBAM's 7x7), dilation 1: eight output rows per sweep; per tap column the
    // fourteen input rows they reach are loaded once into registers and each is used by
    // every output row it reaches (14 loads per 56 multiply-adds instead of 56). Measured:
    // the small-map part 0.70-0.78x the time (forward of 8x1x104x104 / 8x1x26x26)
    constexpr int R = 8, KH = 7;
#if SAM_AVX2_HALVES
    if constexpr (std::is_same_v<T, float>) {
      // AVX2 builds (see SAM_AVX2_HALVES): each 16-lane output vector as two 256-bit halves,
      // input row by input row (each loaded once per tap column, used by the up to seven
      // output rows it reaches, in the same tap order per output), then handed to emit
      for (; h + R <= h1; h += R) {
        for (int64_t w0 = 0; w0 < g.W; w0 += L) {
          __m256 a[2][R];
          const int nh = halves_needed(g.W - w0);
          for (int k = 0; k < R; ++k) a[1][k] = _mm256_setzero_ps();
          for (int hh = 0; hh < nh; ++hh) {
            __m256 acc[R];
#pragma GCC unroll 8
            for (int k = 0; k < R; ++k) acc[k] = _mm256_setzero_ps();
            for (int64_t p = 0; p < P; ++p) {
              const T* base = pad + (p * g.Hp + h) * g.Wp + w0 + 8 * hh;
              for (int64_t j = 0; j < g.KW; ++j) {
#pragma GCC unroll 14
                for (int r = 0; r < KH + R - 1; ++r) {
                  const __m256 v = _mm256_loadu_ps(base + r * g.Wp + j);
#pragma GCC unroll 8
                  for (int k = 0; k < R; ++k)
                    if (r - k >= 0 && r - k < KH)
                      acc[k] = _mm256_add_ps(acc[k], _mm256_mul_ps(_mm256_set1_ps(tap(p, r - k, j)), v));
                }
              }
            }
            for (int k = 0; k < R; ++k) a[hh][k] = acc[k];
          }
          for (int k = 0; k < R; ++k) emit_halves(emit, h + k, w0, a[0][k], a[1][k]);
        }
      }
    }
#endif
    for (; h + R <= h1; h += R) {
      for (int64_t w0 = 0; w0 < g.W; w0 += L) {
        vec_t<T> a[R] = {};
        for (int64_t p = 0; p < P; ++p) {
          const T* base = pad + (p * g.Hp + h) * g.Wp + w0;
          for (int64_t j = 0; j < g.KW; ++j) {
            vec_t<T> v[KH + R - 1];
#pragma GCC unroll 14
            for (int r = 0; r < KH + R - 1; ++r) v[r] = vload(base + r * g.Wp + j);
#pragma GCC unroll 7
            for (int i = 0; i < KH; ++i) {
              const T wv = tap(p, i, j);
#pragma GCC unroll 8
              for (int k = 0; k < R; ++k) a[k] += wv * v[i + k];
            }
          }
        }
        for (int k = 0; k < R; ++k) emit(h + k, w0, a[k]);
      }
    }
  }
#if SAM_AVX2_HALVES
  if constexpr (std::is_same_v<T, float>) {
    // AVX2 builds: the four-row and one-row paths below as 256-bit halves, any kernel size
    // and dilation, the same tap order per output (channels_last bands are often fewer than
    // eight rows, so these carry most of its conv)
    auto rows = [&](auto r_t) {
      constexpr int R = decltype(r_t)::value;
      for (; h + R <= h1; h += R) {
        for (int64_t w0 = 0; w0 < g.W; w0 += L) {
          __m256 out[2][R];
          const int nh = halves_needed(g.W - w0);
          for (int k = 0; k < R; ++k) out[1][k] = _mm256_setzero_ps();
          for (int hh = 0; hh < nh; ++hh) {
            __m256 acc[R];
#pragma GCC unroll 4
            for (int k = 0; k < R; ++k) acc[k] = _mm256_setzero_ps();
            for (int64_t p = 0; p < P; ++p)
              for (int64_t j = 0; j < g.KW; ++j)
                for (int64_t i = 0; i < g.KH; ++i) {
                  const __m256 wv = _mm256_set1_ps(tap(p, i, j));
                  const T* src = pad + (p * g.Hp + h + i * g.dil) * g.Wp + w0 + j * g.dil + 8 * hh;
#pragma GCC unroll 4
                  for (int k = 0; k < R; ++k) acc[k] = _mm256_add_ps(acc[k], _mm256_mul_ps(wv, _mm256_loadu_ps(src + k * g.Wp)));
                }
            for (int k = 0; k < R; ++k) out[hh][k] = acc[k];
          }
          for (int k = 0; k < R; ++k) emit_halves(emit, h + k, w0, out[0][k], out[1][k]);
        }
      }
    };
    rows(std::integral_constant<int, 4>{});
    rows(std::integral_constant<int, 1>{});
  }
#endif
  for (; h + 4 <= h1; h += 4) {
    for (int64_t w0 = 0; w0 < g.W; w0 += L) {
      vec_t<T> a0 = {}, a1 = {}, a2 = {}, a3 = {};
      for (int64_t p = 0; p < P; ++p)
        for (int64_t j = 0; j < g.KW; ++j)
          for (int64_t i = 0; i < g.KH; ++i) {
            const T wv = tap(p, i, j);
            const T* src = pad + (p * g.Hp + h + i * g.dil) * g.Wp + w0 + j * g.dil;
            a0 += wv * vload(src);
            a1 += wv * vload(src + g.Wp);
            a2 += wv * vload(src + 2 * g.Wp);
            a3 += wv * vload(src + 3 * g.Wp);
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
        for (int64_t j = 0; j < g.KW; ++j)
          for (int64_t i = 0; i < g.KH; ++i)
            a0 += tap(p, i, j) * vload(pad + (p * g.Hp + h + i * g.dil) * g.Wp + w0 + j * g.dil);
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
  auto emit = [&](int64_t h, int64_t w0, vec_t<T> acc) {
    vec_t<T> l = acc + b;
    vec_t<T> a = vsigmoid(q.ns ? l * ns + nsh : l);
    const int64_t len = std::min<int64_t>(L, W - w0);
    for (int64_t k = 0; k < len; ++k) {
      logits[h * W + w0 + k] = l[k];
      attn[h * W + w0 + k] = a[k];
    }
  };
#if SAM_AVX2_HALVES
  if constexpr (std::is_same_v<T, float>) {
    // the same operations on the two halves (vsigmoid is vsigmoid8 per half in these builds)
    const __m256 vb = _mm256_set1_ps(b), vns = _mm256_set1_ps(ns), vnsh = _mm256_set1_ps(nsh);
    auto emit8 = [&](int64_t h, int64_t w0, __m256 lo, __m256 hi) {
      const __m256 l[2] = {_mm256_add_ps(lo, vb), _mm256_add_ps(hi, vb)};
      __m256 a[2];
      for (int i = 0; i < 2; ++i) a[i] = vsigmoid8(q.ns ? _mm256_add_ps(_mm256_mul_ps(l[i], vns), vnsh) : l[i]);
      float* lr = logits + h * W + w0;
      float* ar = attn + h * W + w0;
      const int64_t len = std::min<int64_t>(L, W - w0);
      if (len == L) {
        for (int i = 0; i < 2; ++i) _mm256_storeu_ps(lr + 8 * i, l[i]), _mm256_storeu_ps(ar + 8 * i, a[i]);
        return;
      }
      float lt[16], at[16];
      for (int i = 0; i < 2; ++i) _mm256_storeu_ps(lt + 8 * i, l[i]), _mm256_storeu_ps(at + 8 * i, a[i]);
      std::copy(lt, lt + len, lr);
      std::copy(at, at + len, ar);
    };
    correlate_rows<T>(pad, q.P, q.g, q.w, false, h0, h1, Overload{emit, emit8});
    return;
  }
#endif
  correlate_rows<T>(pad, q.P, q.g, q.w, false, h0, h1, emit);
}

// Backward of the small maps, in pieces that work on a band of rows.
// d logits of rows [h0, h1) into the zero-padded dlpad; adds the rows' shares of the
// bias / norm-scale / norm-shift gradients to par[0..2].
template <typename T>
void dlogits_rows(const Gate<T>& q, const T* dA, const T* attn, const T* logits, int64_t h0, int64_t h1, T* dlpad,
                  double* par) {
  const Pad& g = q.g;
  const T ns = q.ns ? q.ns[0] : T(1);
  double s_b = 0, s_ns = 0, s_nsh = 0;
  for (int64_t h = h0; h < h1; ++h) {
    T* drow = dlpad + (h + g.ph) * g.Wp + g.pw;
    for (int64_t w = 0; w < g.W; ++w) {
      const int64_t k = h * g.W + w;
      const T a = attn[k];
      const T dz = dA[k] * ((T(1) - a) * a);
      const T d = q.ns ? dz * ns : dz;
      s_nsh += double(dz);
      s_ns += double(dz) * double(logits[k]);
      s_b += double(d);
      drow[w] = d;
    }
  }
  par[0] += s_b;
  par[1] += s_ns;
  par[2] += s_nsh;
}

// grad weight share of d-logit rows [h0, h1): per tap, sum dl[h, w] * pooled[p, h + (i - rh) dil,
// w + (j - rw) dil] (pad: the padded pooled maps), added to gw[P * KH * KW]
template <typename T>
void dweight_rows(const Gate<T>& q, const T* pad, const T* dlpad, int64_t h0, int64_t h1, double* gw) {
  using V = vec_t<T>;
  constexpr int64_t L = lanes<T>();
  const Pad& g = q.g;
  const int64_t KK = g.KH * g.KW, Wr = g.Wp - 2 * g.pw;  // Wr: W rounded up to whole vectors
  for (int64_t p = 0; p < q.P; ++p)
    for (int64_t i = 0; i < g.KH; ++i)
      for (int64_t j = 0; j < g.KW; ++j) {
#if SAM_AVX2_HALVES
        if constexpr (std::is_same_v<T, float>) {
          // AVX2 builds (see SAM_AVX2_HALVES): a0 and a1 as two 256-bit halves each, the
          // same sums per lane
          __m256 a0l = _mm256_setzero_ps(), a0h = a0l, a1l = a0l, a1h = a0l;
          auto mac = [](__m256 a, const float* x, const float* y) {
            return _mm256_add_ps(a, _mm256_mul_ps(_mm256_loadu_ps(x), _mm256_loadu_ps(y)));
          };
          for (int64_t h = h0; h < h1; ++h) {
            const T* dr = dlpad + (h + g.ph) * g.Wp + g.pw;
            const T* pr = pad + (p * g.Hp + h + i * g.dil) * g.Wp + j * g.dil;
            int64_t w0 = 0;
            for (; w0 + 2 * L <= Wr; w0 += 2 * L) {
              a0l = mac(a0l, dr + w0, pr + w0);
              a0h = mac(a0h, dr + w0 + 8, pr + w0 + 8);
              a1l = mac(a1l, dr + w0 + L, pr + w0 + L);
              a1h = mac(a1h, dr + w0 + L + 8, pr + w0 + L + 8);
            }
            for (; w0 < Wr; w0 += L) {
              a0l = mac(a0l, dr + w0, pr + w0);
              a0h = mac(a0h, dr + w0 + 8, pr + w0 + 8);
            }
          }
          float lanes16[16];
          _mm256_storeu_ps(lanes16, _mm256_add_ps(a0l, a1l));
          _mm256_storeu_ps(lanes16 + 8, _mm256_add_ps(a0h, a1h));
          double t = 0;
          for (int l = 0; l < 16; ++l) t += double(lanes16[l]);
          gw[p * KK + i * g.KW + j] += t;
          continue;
        }
#endif
        V a0 = {}, a1 = {};
        for (int64_t h = h0; h < h1; ++h) {
          const T* dr = dlpad + (h + g.ph) * g.Wp + g.pw;
          const T* pr = pad + (p * g.Hp + h + i * g.dil) * g.Wp + j * g.dil;
          int64_t w0 = 0;
          for (; w0 + 2 * L <= Wr; w0 += 2 * L) {
            a0 += vload(dr + w0) * vload(pr + w0);
            a1 += vload(dr + w0 + L) * vload(pr + w0 + L);
          }
          for (; w0 < Wr; w0 += L) a0 += vload(dr + w0) * vload(pr + w0);
        }
        a0 += a1;
        double t = 0;
        for (int64_t l = 0; l < L; ++l) t += double(a0[l]);
        gw[p * KK + i * g.KW + j] += t;
      }
}

// gradient of the max / mean maps, rows [h0, h1) (needs d logits of rows up to h1 + ph):
// transposed conv of dl (correlation with the flipped taps), summed over the slots of
// each kind, then divided by the tie count (max) or by C (mean). dmax / dmean: image maps.
template <typename T>
void dpooled_rows(const Gate<T>& q, const std::vector<int64_t>& kinds, const T* dlpad, const T* cnt, int64_t C,
                  int64_t h0, int64_t h1, T* dmax, T* dmean) {
  constexpr int64_t L = lanes<T>();
  const Pad& g = q.g;
  const int64_t W = g.W, KK = g.KH * g.KW;
  if (dmax) std::fill(dmax + h0 * W, dmax + h1 * W, T(0));
  if (dmean) std::fill(dmean + h0 * W, dmean + h1 * W, T(0));
  for (int64_t p = 0; p < q.P; ++p) {
    T* dst = kinds[p] == 0 ? dmax : dmean;
    auto emit = [&](int64_t h, int64_t w0, vec_t<T> acc) {
      const int64_t len = std::min<int64_t>(L, W - w0);
      for (int64_t k = 0; k < len; ++k) dst[h * W + w0 + k] += acc[k];
    };
#if SAM_AVX2_HALVES
    if constexpr (std::is_same_v<T, float>) {
      auto emit8 = [&](int64_t h, int64_t w0, __m256 lo, __m256 hi) {
        float* d = dst + h * W + w0;
        const int64_t len = std::min<int64_t>(L, W - w0);
        if (len == L) {
          _mm256_storeu_ps(d, _mm256_add_ps(_mm256_loadu_ps(d), lo));
          _mm256_storeu_ps(d + 8, _mm256_add_ps(_mm256_loadu_ps(d + 8), hi));
          return;
        }
        float t[16];
        _mm256_storeu_ps(t, lo);
        _mm256_storeu_ps(t + 8, hi);
        for (int64_t k = 0; k < len; ++k) d[k] += t[k];
      };
      correlate_rows<T>(dlpad, 1, g, q.w + p * KK, true, h0, h1, Overload{emit, emit8});
      continue;
    }
#endif
    correlate_rows<T>(dlpad, 1, g, q.w + p * KK, true, h0, h1, emit);
  }
  if (dmax)
    for (int64_t k = h0 * W; k < h1 * W; ++k) dmax[k] = dmax[k] / cnt[k];
  if (dmean)
    for (int64_t k = h0 * W; k < h1 * W; ++k) dmean[k] = dmean[k] / T(C);
}

// ---------------------------------------------------------------- one image in bands of rows
// With whole images per thread, each image is streamed in bands of rows: pool (or reduce)
// a band, then gate and multiply (or compute the gradient of) the rows whose k x k
// neighbourhood is complete, which lag `ph` rows behind. The second read of every row
// comes from a cache close to the core instead of memory. Band height: about the band
// budget of the big tensors (x, and the upstream gradient in backward) including the lag.
//   channels_last: kBandBytes (384 KiB), so that the second read comes from L2.
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

inline int64_t whole_image_bytes() {
  if (kWholeImageBytes >= 0) return kWholeImageBytes;
  static const int64_t llc = llc_bytes();
  return llc / 8;
}

inline int64_t band_rows(int64_t row_bytes, int64_t lag, int64_t H, bool nhwc) {
  if (kBandRows > 0) return std::min(kBandRows, H);
  const int64_t budget = nhwc ? kBandBytes : kBandBytesNchw;
  if (budget <= 0) return H;
  if (!nhwc && row_bytes * H <= whole_image_bytes()) return H;
  const int64_t r = budget / std::max<int64_t>(1, row_bytes) - lag;
  return r < 1 ? H : std::min(H, r);
}

// scratch of one thread for the per-image passes
template <typename T>
struct Scratch {
  std::vector<T> pad, dlpad;              // padded pooled maps / d logits
  std::vector<T> dA, cnt, ix, dmax, dmean;  // [HW] maps of the image (backward; ix: max channel)
  std::vector<T> gs, row;                 // grad of the channel scale [C]; one row of gx'
  std::vector<T> spare;                   // forward: output of an absent max / mean slot
  std::vector<uint8_t> bits;              // max bits of the image's channel rows (NCHW backward)
};

// y rows [h0, h1) = x' * attn (one image)
template <typename T, typename X>
void mul_rows(const X* x, const T* s, const T* attn, X* y, int64_t C, int64_t HW, int64_t W, bool nhwc,
              int64_t h0, int64_t h1, bool stream) {
  const int64_t p0 = h0 * W, len = (h1 - h0) * W;
  if (!nhwc) {
    for (int64_t c = 0; c < C; ++c)
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
                       T* attn, X* y, bool stream, Scratch<T>& sc) {
  const int64_t HW = H * W, P = q.P, lag = q.g.ph;
  const int64_t R = band_rows(C * W * int64_t(sizeof(X)), lag, H, nhwc);
  sc.pad.assign(P * q.g.Hp * q.g.Wp, T(0));
  sc.spare.resize(R * W);
  int64_t done = 0;
  for (int64_t r0 = 0; r0 < H; r0 += R) {
    const int64_t r1 = std::min(H, r0 + R), p0 = r0 * W, len = (r1 - r0) * W;
    T* mx = imax >= 0 ? pooled + imax * HW + p0 : sc.spare.data();
    T* mean = imean >= 0 ? pooled + imean * HW + p0 : sc.spare.data();
    if (!nhwc) {
      pool_chunk<T, X>(x + p0, s, C, HW, len, mx, mean);
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
                        Scratch<T>& sc) {
  const int64_t HW = H * W, lag = q.g.ph, KK = q.g.KH * q.g.KW;
  const int64_t R = band_rows(C * W * int64_t(sizeof(X)) * (GC ? 1 : 2), lag, H, nhwc);
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
  int64_t done = 0, reduced = 0;
  for (int64_t r0 = 0; r0 < H; r0 += R) {
    const int64_t r1 = std::min(H, r0 + R);
    // pass A on the band: rows [r0, r1); NCHW pixels [reduced, the next multiple of L)
    const int64_t p0 = nhwc ? r0 * W : reduced;
    const int64_t len = (nhwc || r1 == H ? r1 * W : std::min(HW, (r1 * W + L - 1) / L * L)) - p0;
    reduced = p0 + len;
    if (!nhwc) {
      if (len > 0)
        reduce_chunk<T, X, true, GC, M>(x + p0, s, GC ? g : g + p0, gv, M ? mx + p0 : nullptr, C, HW, len,
                                     dA + p0, cnt + p0, mb, mbs, p0);
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
    if (!nhwc) {
      auto pass_b = [&](auto s_t, auto b_t) {
        for (int64_t c = 0; c < C; ++c) {
          const T t = gradx_segment<T, X, true, GC, M, F, decltype(s_t)::value, decltype(b_t)::value>(
              x + c * HW + a0, GC ? nullptr : g + c * HW + a0, gv, s ? s[c] : T(1), attn + a0,
              M ? mx + a0 : nullptr, M ? dmax + a0 : nullptr, F ? dmean + a0 : nullptr, alen, gx + c * HW + a0,
              stream, sc.row.data(), mb ? mb + c * mbs : nullptr, a0);
          if (gs) sc.gs[c] += t;
        }
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
  Tensor y;
  if (out.has_value() && out->defined()) {
    y = *out;
    TORCH_CHECK(y.sizes() == x.sizes() && y.strides() == x.strides() && y.scalar_type() == x.scalar_type(),
                "spatialattn: out= must have the shape, strides and dtype of x");
  } else {
    y = at::empty_like(x);
  }
  if (x.numel() == 0) return y;
  SA_DISPATCH(x, "gate_forward", [&] {
    using X = scalar_t;
    using T = acc_t<X>;
    k_mul<T, X>(x.data_ptr<X>(), dptr<T>(s), a.data_ptr<T>(), y.data_ptr<X>(), g.N, g.C, g.HW, g.nhwc,
                use_stream<X>(x.numel()));
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
  for (int64_t n = n0; n < n1; ++n) pad_maps<T>(pooled + n * P * HW, P, q.g, pad.data() + (n - n0) * padsz);
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
                       T* attn, X* y, bool stream) {
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
        pool_chunk<T, X>(xn + p0 + k, sn, C, HW, m, am.data(), as.data());
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
                        int64_t imean, T* pooled, T* logits, T* attn, X* y, bool stream) {
  const int64_t nt = shared_threads((n1 - n0) * C * H * W * int64_t(sizeof(X)), (n1 - n0) * H);
  in_one_region(nt, [&](int64_t t, int64_t nth, auto&& barrier) {
    sam_forward_share<T, X>(t, nth, barrier, x, s, n0, n1, C, H, W, nhwc, q, kinds, imax, imean, pooled, logits,
                            attn, y, stream);
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
    const bool stream = use_stream<X>(x.numel());
    const int64_t Nf = whole_images(g.N);
    if (Nf > 0) {
      at::parallel_for(0, Nf, 1, [&](int64_t b0, int64_t e0) {
        Scratch<T> sc;
        for (int64_t n = b0; n < e0; ++n)
          sam_forward_image<T, X>(xp + n * CHW, sp ? sp + n * g.C : nullptr, g.C, g.H, g.W, g.nhwc, q, kinds, imax,
                               imean, pp + n * PHW, lp + n * g.HW, ap + n * g.HW, yp + n * CHW, stream, sc);
      });
    }
    if (Nf < g.N)
      sam_forward_shared<T, X>(xp, sp, Nf, g.N, g.C, g.H, g.W, g.nhwc, q, kinds, imax, imean, pp, lp, ap, yp, stream);
  });
  return {y, attn, logits, pooled};
}

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
                         double* par, bool stream) {
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
                                       dAk + p0, ck + p0);
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
        auto sweep = [&](auto s_t) {
          for (int64_t c = 0; c < C; ++c)
            for (int64_t u = u0; u < u1; ++u) {
              const int64_t a0 = row0(u) * W, len = (row1(u) - row0(u)) * W;
              const T sum = gradx_segment<T, X, true, GC, M, F, decltype(s_t)::value>(
                  xk + c * HW + a0, GC ? nullptr : gk + c * HW + a0, gv, sk ? sk[c] : T(1), ak + a0,
                  M ? mk + a0 : nullptr, M ? fm + a0 : nullptr, F ? fa + a0 : nullptr, len, gxk + c * HW + a0,
                  stream, gp.data());
              if (gs) ugs[u * C + c] = sum;
            }
        };
        if (gs) sweep(std::true_type{}); else sweep(std::false_type{});
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
                gxp + n * CHW, gsp ? gsp + n * g.C : nullptr, par.data() + n * NP, stream, sc);
          };
          with_backward_flags(gc, mx != nullptr, imean >= 0, run);
        }
      });
    }
    if (Nf < g.N && shared_backward(int64_t(sizeof(X)) * (g.N - Nf) * CHW * (gc ? 1 : 2))) {
      // x and the gradient of the leftover images exceed the LLC: streamed in units of rows
      auto run = [&](auto gc_t, auto m_t, auto f_t) {
        sam_backward_shared<T, X, decltype(gc_t)::value, decltype(m_t)::value, decltype(f_t)::value>(
            xp, sp, gyp, Nf, g.N, g.C, g.H, g.W, g.nhwc, q, kinds, pp, lp, ap, ge, gxp, gsp, par.data(), stream);
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
      // pass A: d attn = sum_c g * x' (+ the gradient of the returned attention), tie counts and index of the max
      // (channels_last) or the max bits (NCHW)
      k_reduce<T, X>(xp + Nf * CHW, sp ? sp + Nf * g.C : nullptr, gc ? gyp : gyp + Nf * CHW, gc,
                  mx ? mx + Nf * PHW : nullptr, PHW, Nr, g.C, HW, g.nhwc, dA.data(), mx ? cnt.data() : nullptr,
                  by_index ? ix.data() : nullptr, bp);
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
                 by_index ? ix.data() : nullptr, mx ? cnt.data() : nullptr, bp);
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

// ---------------------------------------------------------------- SAM with a training-mode BatchNorm
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
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == 1 && weight.size(1) == P,
              "spatialattn: weight must be (1, P, kh, kw)");
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
    double sum = 0, sq = 0;
    for (int64_t k = 0; k < M; ++k) sum += double(lp[k]);
    const double mean = sum / double(M);
    for (int64_t k = 0; k < M; ++k) sq += (double(lp[k]) - mean) * (double(lp[k]) - mean);
    const double var = sq / double(M), invstd = 1.0 / std::sqrt(var + eps);
    stats.data_ptr<double>()[0] = mean;
    stats.data_ptr<double>()[1] = var;
    const double gm = gamma.has_value() ? double(gamma->data_ptr<T>()[0]) : 1.0;
    const double bt = beta.has_value() ? double(beta->data_ptr<T>()[0]) : 0.0;
    const T ns = T(gm * invstd), nsh = T(bt - mean * gm * invstd);
    constexpr int64_t L = lanes<T>();
    int64_t k = 0;
    for (; k + L <= M; k += L) vstore(ap + k, vsigmoid(vload(lp + k) * ns + nsh));
    for (; k < M; ++k) ap[k] = T(1) / (T(1) + std::exp(-(lp[k] * ns + nsh)));
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
    k_reduce<T, X>(xp, sp, gyp, gc, mx, PHW, g.N, g.C, HW, g.nhwc, dA.data(), mx ? cnt.data() : nullptr,
                by_index ? ix.data() : nullptr, bp);
    if (ge)
      for (int64_t k = 0; k < M; ++k) dA[k] += ge[k];
    // BatchNorm backward on the logits (batch statistics)
    const double mean = stats.data_ptr<double>()[0], var = stats.data_ptr<double>()[1];
    const double invstd = 1.0 / std::sqrt(var + eps);
    const double gm = gamma.has_value() ? double(gamma->data_ptr<T>()[0]) : 1.0;
    double s_dz = 0, s_dzx = 0;
    for (int64_t k = 0; k < M; ++k) {
      const double dz = double(dA[k]) * ((1.0 - double(ap[k])) * double(ap[k]));
      dA[k] = T(dz);  // dA now holds dz
      s_dz += dz;
      s_dzx += dz * (double(lp[k]) - mean) * invstd;
    }
    if (ggamma.defined()) ggamma.data_ptr<T>()[0] = T(s_dzx);
    if (gbeta.defined()) gbeta.data_ptr<T>()[0] = T(s_dz);
    const double k1 = gm * invstd, mdz = s_dz / double(M), mdzx = s_dzx / double(M);
    double s_dl = 0;
    for (int64_t k = 0; k < M; ++k) {
      const double xhat = (double(lp[k]) - mean) * invstd;
      const double dl = k1 * (double(dA[k]) - mdz - xhat * mdzx);
      dA[k] = T(dl);  // dA now holds d logits
      s_dl += dl;
    }
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
               by_index ? ix.data() : nullptr, mx ? cnt.data() : nullptr, bp);
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
                                 g.nhwc, gx.data_ptr<X>(), use_stream<X>(x.numel()), acc,
                              g.nhwc ? ptr_or_null<T>(counts) : nullptr);
  });
  return gx;
}


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
// multiply-adds/s on one thread). There mlp_vec_t is MlpHalves, the same lanes as two 32-byte
// vectors (lanes 0 to L/2 - 1, then the rest) that do have registers, with the same
// operations per lane; a lane sum starts with lo + hi as hreduce does, and reduce16 folds
// the halves in its order, so the bits are those of vec_t. The memory layout is vec_t's (64
// bytes, lanes in order).
#if SAM_AVX2_HALVES
template <typename T>
struct MlpHalves {
  typedef T H __attribute__((vector_size(32)));
  H lo, hi;
  MlpHalves& operator+=(const MlpHalves& o) {
    lo += o.lo;
    hi += o.hi;
    return *this;
  }
};
template <typename T>
inline MlpHalves<T> operator+(MlpHalves<T> a, MlpHalves<T> b) {
  return {a.lo + b.lo, a.hi + b.hi};
}
template <typename T>
inline MlpHalves<T> operator*(MlpHalves<T> a, MlpHalves<T> b) {
  return {a.lo * b.lo, a.hi * b.hi};
}
template <typename T>
inline MlpHalves<T> operator*(T s, MlpHalves<T> b) {
  return {s * b.lo, s * b.hi};
}
template <typename T>
inline MlpHalves<T> operator+(MlpHalves<T> a, T s) {
  return {a.lo + s, a.hi + s};
}
template <typename T>
using mlp_vec_t = MlpHalves<T>;
template <typename T>
inline T mlp_sum(MlpHalves<T> v) {
  return hreduce<T, 32>(v.lo + v.hi, false);
}
template <typename T>
inline MlpHalves<T> mlp_load(const T* p) {  // a half at a time (one 64-byte memcpy went
  MlpHalves<T> v;                           // through the stack in 16-byte pieces)
  std::memcpy(&v.lo, p, 32);
  std::memcpy(&v.hi, p + 32 / sizeof(T), 32);
  return v;
}
template <typename T>
inline void mlp_store(T* p, const MlpHalves<T>& v) {
  std::memcpy(p, &v.lo, 32);
  std::memcpy(p + 32 / sizeof(T), &v.hi, 32);
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
template <typename T>
inline void mlp_store(T* p, const vec_t<T>& v) {
  vstore(p, v);
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
// AVX2 (MlpHalves: two registers a vector). The MLP's products are bound by loads there
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
// into a register (for several products), in AVX2 builds the scalar itself (MlpHalves
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

// Sixteen float32 dot products at once: lane j of the result = sum of the lanes of v[j], in
// four levels of pairwise folds (15 folds instead of 16 separate reductions, each a chain
// through the upper halves). Needs __builtin_shufflevector (GCC 12+, Clang).
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define SA_HAVE_REDUCE16 1
inline vec_t<float> reduce16(const vec_t<float>* v) {
  using V = vec_t<float>;
  V a[8], b[4], c[2];
  for (int k = 0; k < 8; ++k)  // lanes 0-7: v[2k] folded once, 8-15: v[2k + 1]
    a[k] = __builtin_shufflevector(v[2 * k], v[2 * k + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * k], v[2 * k + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30,
                                   31);
  for (int k = 0; k < 4; ++k)  // four lanes each of v[4k .. 4k + 3]
    b[k] = __builtin_shufflevector(a[2 * k], a[2 * k + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(a[2 * k], a[2 * k + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int k = 0; k < 2; ++k)  // two lanes each of v[8k .. 8k + 7]
    c[k] = __builtin_shufflevector(b[2 * k], b[2 * k + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(b[2 * k], b[2 * k + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}
#if SAM_AVX2_HALVES
// reduce16 on MlpHalves: each of its shuffles takes the first 8 lanes of the result from its
// first operand and the last 8 from its second, with the same pattern (mod 16) for both, so
// it is that 8-lane shuffle of the first operand's halves, then of the second's; the adds
// pair the same lanes in the same order.
inline MlpHalves<float> reduce16(const MlpHalves<float>* v) {
  using M = MlpHalves<float>;
  const auto f1 = [](M p) { return p.lo + p.hi; };
  const auto f2 = [](M p) {
    return __builtin_shufflevector(p.lo, p.hi, 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(p.lo, p.hi, 4, 5, 6, 7, 12, 13, 14, 15);
  };
  const auto f3 = [](M p) {
    return __builtin_shufflevector(p.lo, p.hi, 0, 1, 4, 5, 8, 9, 12, 13) +
           __builtin_shufflevector(p.lo, p.hi, 2, 3, 6, 7, 10, 11, 14, 15);
  };
  const auto f4 = [](M p) {
    return __builtin_shufflevector(p.lo, p.hi, 0, 2, 4, 6, 8, 10, 12, 14) +
           __builtin_shufflevector(p.lo, p.hi, 1, 3, 5, 7, 9, 11, 13, 15);
  };
  M a[8], b[4], c[2];
  for (int k = 0; k < 8; ++k) a[k] = {f1(v[2 * k]), f1(v[2 * k + 1])};
  for (int k = 0; k < 4; ++k) b[k] = {f2(a[2 * k]), f2(a[2 * k + 1])};
  for (int k = 0; k < 2; ++k) c[k] = {f3(b[2 * k]), f3(b[2 * k + 1])};
  return {f4(c[0]), f4(c[1])};
}
#endif
#endif
#endif

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
    mlp_store(out, reduce16(acc));
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
      mlp_store(out + m * os + j, acc[m][0]);
      mlp_store(out + m * os + j + L, acc[m][1]);
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
    for (int m = 0; m < M; ++m) mlp_store(out + m * os + j, acc[m]);
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
  std::vector<T> hT, t;  // h transposed in blocks of L rows; layer 2 outputs [C][Qp] (lanes over q)

  ChannelMlp(const T* v_, const T* W1_, const T* B1_, const T* W2_, const T* B2_, T* h_, T* g_, int64_t P_,
             int64_t N_, int64_t C_, int64_t R_)
      : v(v_), W1(W1_), B1(B1_), W2(W2_), B2(B2_), h(h_), g(g_), P(P_), N(N_), C(C_), R(R_), Q(P_ * N_) {
    two = W2 != nullptr;
    Qp = (Q + L - 1) / L * L;
    // layer 2 as lanes over q (h transposed) where q fills the lanes, else as dot
    // products over r (few pooled vectors: one image)
    by_q = two && 2 * Q >= L;
    blocks = R % 16 == 0;
    if (by_q) hT.assign(Qp * R, T(0));
    if (two) t.resize(C * Qp);
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
    const T* hb = hT.data() + qb * R * L;
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
      mlp_store(tc + (qb + j) * L, ((acc[j][0] + acc[j][1]) + (acc[j][2] + acc[j][3])) + bias);
    }
  }

  int64_t layer2_items() const { return !two ? 0 : by_q ? C : (C + 15) / 16; }
  int64_t layer2_grain() const { return by_q ? mlp_grain(Qp * R) : mlp_grain(16 * Q * R); }
  void layer2(int64_t b0, int64_t b1) {
    if (by_q) {
      for (int64_t c = b0; c < b1; ++c) {
        const T* w = W2 + c * R;
        const T bias = B2 ? B2[c] : T(0);
        T* tc = t.data() + c * Qp;
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
        if (blocks && b * 16 + 16 <= C && dots16(W2, h + q * R, R, B2, b * 16, t.data(), Qp, q)) continue;
        for (int64_t c = b * 16; c < std::min(C, b * 16 + 16); ++c)
          t[c * Qp + q] = dot_lanes(W2 + c * R, h + q * R, R) + (B2 ? B2[c] : T(0));
      }
  }

  int64_t combine_grain() const { return std::max<int64_t>(16, mlp_grain(N * P * 8)); }
  // gate logits of channels [c0, c1) of every image: the sum over the pooled kinds, in pool
  // order (needs layer 2 of those channels only: cbam_forward runs it in the thread that
  // computed them)
  void combine(int64_t c0, int64_t c1) {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = c0; c < c1; ++c) {
        T s = 0;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t q = p * N + n;
          const T v2 = two ? t[c * Qp + q] : h[q * R + c];
          s = p == 0 ? v2 : s + v2;
        }
        g[n * C + c] = s;
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
    std::vector<T> dl(N * C), dh(Q * R, T(0));
    const T *gy = grad.data_ptr<T>(), *gt = g.data_ptr<T>();
    for (int64_t i = 0; i < N * C; ++i) dl[i] = gy[i] * (T(1) - gt[i]) * gt[i];
    if (two) {
      const T *W2 = w2.data_ptr<T>(), *h = hidden.data_ptr<T>();
      std::vector<T> hs(N * R, T(0)), dhs(N * R);  // hidden summed over the pools
      for (int64_t q = 0; q < Q; ++q)
        for (int64_t r = 0; r < R; ++r) hs[(q % N) * R + r] += h[q * R + r];
      if (gb2.defined()) {
        T* o = gb2.data_ptr<T>();
        for (int64_t c = 0; c < C; ++c) {
          T s = 0;
          for (int64_t n = 0; n < N; ++n) s += dl[n * C + c];
          o[c] = s * T(P);
        }
      }
      if (gw2.defined()) {  // gw2[c, :] = sum_n dl[n, c] hs[n, :]
        T* o = gw2.data_ptr<T>();
        at::parallel_for(0, C, mlp_grain(N * R), [&](int64_t c0, int64_t c1) {
          lincomb_rows(c0, c1, dl.data(), C, 1, hs.data(), R, N, R, o, R);
        });
      }
      if (needs[0] || needs[1] || needs[2]) {  // dhs[n, :] = sum_c dl[n, c] W2[c, :]
        // in blocks of rows of W2 that stay in the cache for every image of the chunk (W2 is
        // 1 MB at 2048 x 128: read once per chunk from memory, not once per image)
        const int64_t kb = std::max<int64_t>(16, (64 << 10) / (int64_t(sizeof(T)) * std::max<int64_t>(1, R)));
        at::parallel_for(0, N, mlp_grain(C * R), [&](int64_t n0, int64_t n1) {
          for (int64_t k0 = 0; k0 < C; k0 += kb)
            lincomb_rows(n0, n1, dl.data() + k0, 1, C, W2 + k0 * R, R, std::min(kb, C - k0), R, dhs.data(), R,
                         k0 > 0);
        });
        for (int64_t q = 0; q < Q; ++q)
          for (int64_t r = 0; r < R; ++r) dh[q * R + r] = h[q * R + r] > T(0) ? dhs[(q % N) * R + r] : T(0);
      }
    } else {
      for (int64_t q = 0; q < Q; ++q)  // one layer: the hidden width is C, dh the logits' gradient
        std::copy(dl.begin() + (q % N) * C, dl.begin() + (q % N + 1) * C, dh.begin() + q * R);
    }
    if (gb1.defined()) {
      T* o = gb1.data_ptr<T>();
      for (int64_t r = 0; r < R; ++r) {
        T s = 0;
        for (int64_t q = 0; q < Q; ++q) s += dh[q * R + r];
        o[r] = s;
      }
    }
    if (needs[0] || needs[1]) {
      // layer 1 in column blocks: each block owns its columns of grad_weight1 and grad_pooled
      const T *v = pooled.data_ptr<T>(), *W1 = w1.data_ptr<T>();
      T *ogp = dptr<T>(gp), *ogw = dptr<T>(gw1);
      // dh transposed (dhT[r, q]) so that both sums read their coefficients contiguously
      std::vector<T> dhT(R * Q);
      for (int64_t q = 0; q < Q; ++q)
        for (int64_t r = 0; r < R; ++r) dhT[r * Q + q] = dh[q * R + r];
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
  if (g.N == 0 || whole_images(g.N) > 0) {
    const Tensor gate = channel_mlp_forward(global_pool(x, ch_kinds), w1, b1, w2, b2, false)[0];
    const Tensor s = gate.to(x.scalar_type()).view({g.N, g.C, 1, 1});
    const auto r = sam_forward(x, weight, bias, s, norm_scale, norm_shift, kinds, dilation, std::nullopt);
    return {r[0], r[1], gate.view({g.N, g.C, 1, 1})};
  }
  const int64_t Pc = ch_kinds.size(), P = kinds.size(), NC = g.N * g.C;
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == 1 && weight.size(1) == P,
              "spatialattn: weight must be (1, P, kh, kw)");
  const MlpParams mp = mlp_params(acc_type(x), g.C, w1, b1, w2, b2);
  const Tensor w = small(weight, x);
  const auto b = small_opt(bias, x), ns = small_opt(norm_scale, x), nsh = small_opt(norm_shift, x);
  TORCH_CHECK(ns.has_value() == nsh.has_value(), "spatialattn: norm_scale and norm_shift go together");
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
                              stream);
    });
  });
  return {y, attn, gate};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pool_forward", &pool_forward);
  m.def("pool_backward", &pool_backward);
  m.def("gate_forward", &gate_forward);
  m.def("gate_backward", &gate_backward);
  m.def("sam_forward", &sam_forward);
  m.def("sam_backward", &sam_backward);
  m.def("sam_forward_bn", &sam_forward_bn);
  m.def("sam_backward_bn", &sam_backward_bn);
  m.def("bn_update_running", &bn_update_running);
  m.def("global_pool", &global_pool);
  m.def("channel_mlp_forward", &channel_mlp_forward);
  m.def("channel_mlp_backward", &channel_mlp_backward);
  m.def("cbam_forward", &cbam_forward);
  m.def("global_pool_counted", &global_pool_counted);
  m.def("global_pool_backward", &global_pool_backward, py::arg("grad"), py::arg("x"), py::arg("out"),
        py::arg("kinds"), py::arg("into") = py::none(), py::arg("counts") = py::none());
  m.def("set_stream_bytes", [](int64_t b) { kStreamBytes = b; });
  m.def("set_band_bytes", [](int64_t b) { kBandBytes = b; });
  m.def("set_band_bytes_nchw", [](int64_t b) { kBandBytesNchw = b; });
  m.def("set_band_rows", [](int64_t r) { kBandRows = r; });
  m.def("set_whole_image_bytes", [](int64_t b) { kWholeImageBytes = b; });
  m.def("set_gp_tile_bytes", [](int64_t b) { kGpTileBytes = b < 0 ? kGpTileDefault : b; });
  m.def("set_shared_backward_bytes", [](int64_t b) { kSharedBwdBytes = b; });
  m.def("set_shared_bytes", [](int64_t b) { kSharedBytes = b < 0 ? kSharedDefault : b; });
  m.def("set_max_bits", [](bool on) { kUseMaxBits = on; });
  m.def("set_max_bits_phase_bytes", [](int64_t b) { kMaxBitsPhaseBytes = b < 0 ? (2 << 20) : b; });
  m.def("has_max_bits", []() { return kMaxBits; });
  m.def("set_pool_wide_bytes", [](int64_t b) { kPoolWideBytes = b < 0 ? kPoolWideDefault : b; });
  m.def("whole_image_bytes", &whole_image_bytes);
  m.def("band_rows", &band_rows);  // the rule above, for tests
}
