// Vector types and lane masks (GCC/Clang vector extensions, AVX-512 / AVX2 intrinsics where they
// pay), bit rows of lane masks, loads and stores in every storage type, NaN checks.
//
// Part of sam_cpu.cpp: the parts are included in order into one translation unit, each in the
// unit's anonymous namespace, and each uses the ones before it (see sam_cpu.cpp for the overview).
#pragma once

namespace {


using at::Tensor;
using std::optional;

// Forces a small function or lambda inline (after a lambda's parameter list). The parts form
// one large translation unit, where GCC's unit-growth limits leave some hot inner loops out of
// line as soon as code is added elsewhere (rows.h's mul_row).
#define SA_INLINE __attribute__((always_inline))

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
// (std::enable_if_t, not a C++20 requires-clause: torch's cpp_extension compiled extensions as
// C++17 until its 2026 move to C++20, torch 2.9.1 checked; see test_the_source_is_cxx17)
template <typename T, std::enable_if_t<std::is_floating_point_v<T>, int> = 0>
inline vec_t<T> vld(const T* p) {
  return vload(p);
}
template <typename T, std::enable_if_t<std::is_floating_point_v<T>, int> = 0>
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

// elements of X from p to the next multiple of `bytes` (a power of two; 0 where p is on one)
template <typename X>
inline int64_t elems_to_boundary(const X* p, uintptr_t bytes) {
  return int64_t(((uintptr_t(0) - reinterpret_cast<uintptr_t>(p)) & (bytes - 1)) / sizeof(X));
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
// lanes [j0, j1) of v stored at d + j0 .. d + j1 - 1, each rounded to X on its own (the head
// and tail of a row whose whole vectors go out with vst_nt from an aligned boundary)
template <typename X>
inline void store_lanes(X* d, vec_t<float> v, int64_t j0, int64_t j1) {
  float tmp[16];
  std::memcpy(tmp, &v, sizeof(tmp));
  for (int64_t j = j0; j < j1; ++j) d[j] = X(tmp[j]);
}
#endif

// ---------------------------------------------------------------- a block's channel scales by lanes
// NCHW images of short rows go through the backward in blocks of `rows` (<= 16) channel rows
// (reduce.h, gradx.h); with a channel scale, the elements of one vector of a block belong to
// one or more rows, each with its own scale. BlockScales holds a block's scales in registers
// and gives each lane its row's scale by a lane permute, from the block's row index tile
// (row_index_tile: element k of a block is in row k / HW). AVX-512 builds only (the permute is
// one instruction there); elsewhere the scaled short rows keep the row-by-row path.
// ri[k] = k / HW for the B = rows * HW elements of a block
inline void row_index_tile(int64_t HW, int64_t rows, int32_t* ri) {
  for (int64_t j = 0; j < rows; ++j) std::fill(ri + j * HW, ri + (j + 1) * HW, int32_t(j));
}

#if defined(__AVX512F__)
constexpr bool kLaneScales = true;

template <typename T>
struct BlockScales;

template <>
struct BlockScales<float> {
  __m512 a;
  BlockScales() = default;
  // s: the block's `rows` scales (1 <= rows <= 16)
  BlockScales(const float* s, int64_t rows) : a(_mm512_maskz_loadu_ps(__mmask16((1u << rows) - 1u), s)) {}
  // the scales of the lanes of the vector at element k of the block
  vec_t<float> at(const int32_t* ri, int64_t k) const {
    const __m512 r = _mm512_permutexvar_ps(_mm512_loadu_si512(ri + k), a);
    vec_t<float> v;
    std::memcpy(&v, &r, sizeof(v));
    return v;
  }
};

template <>
struct BlockScales<double> {
  __m512d a, b;  // rows 0-7, 8-15
  BlockScales() = default;
  BlockScales(const double* s, int64_t rows)
      : a(_mm512_maskz_loadu_pd(__mmask8(((1u << rows) - 1u) & 0xffu), s)),
        b(_mm512_maskz_loadu_pd(__mmask8(((1u << rows) - 1u) >> 8), s + 8)) {}
  vec_t<double> at(const int32_t* ri, int64_t k) const {
    const __m512i i = _mm512_cvtepu32_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ri + k)));
    const __m512d r = _mm512_permutex2var_pd(a, i, b);
    vec_t<double> v;
    std::memcpy(&v, &r, sizeof(v));
    return v;
  }
};

// the lanes of v (the vector at element k of a block) in row j of the block, the others 0
inline vec_t<float> row_lanes(vec_t<float> v, const int32_t* ri, int64_t k, int32_t j) {
  const __mmask16 m = _mm512_cmpeq_epi32_mask(_mm512_loadu_si512(ri + k), _mm512_set1_epi32(j));
  __m512 r;
  std::memcpy(&r, &v, sizeof(r));
  r = _mm512_maskz_mov_ps(m, r);
  std::memcpy(&v, &r, sizeof(v));
  return v;
}
inline vec_t<double> row_lanes(vec_t<double> v, const int32_t* ri, int64_t k, int32_t j) {
  const __mmask8 m = _mm256_cmpeq_epi32_mask(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ri + k)),
                                             _mm256_set1_epi32(j));
  __m512d r;
  std::memcpy(&r, &v, sizeof(r));
  r = _mm512_maskz_mov_pd(m, r);
  std::memcpy(&v, &r, sizeof(v));
  return v;
}
#else
constexpr bool kLaneScales = false;
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
// lanes [j0, j1) of v stored at d + j0 .. d + j1 - 1 (a row's head and tail around st8_nt's blocks)
inline void store_lanes8(float* d, __m256 v, int64_t j0, int64_t j1) {
  float tmp[8];
  _mm256_storeu_ps(tmp, v);
  for (int64_t j = j0; j < j1; ++j) d[j] = tmp[j];
}
// lanes h .. 7 of a then 0 .. h - 1 of b (idx = h + [0, 8), from_b = its lanes >= 8)
inline __m256 join8(__m256 a, __m256 b, __m256i idx, __m256 from_b) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(a, idx), _mm256_permutevar8x32_ps(b, idx), from_b);
}
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


// lane_bits of the lanes<T>() elements from p (as T) that equal m; in AVX-512 builds straight
// from the compare's mask register (lane_bits of a vector compare takes the mask through a
// vector and back: twice the instructions)
template <typename T, typename X>
inline uint32_t eq_bits(const X* p, T m) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    __m512 v;
    const vec_t<float> w = vld(p);
    std::memcpy(&v, &w, sizeof(v));
    return _mm512_cmp_ps_mask(v, _mm512_set1_ps(m), _CMP_EQ_OQ);
  }
#endif
  return lane_bits<T>(vcmp<kEq, T>(vld(p), vec_t<T>{} + m));
}

// ---------------------------------------------------------------- lane reductions of 16 vectors
#if SAM_AVX2_HALVES
// AVX2 builds: the lanes of a 64-byte vector as two 32-byte vectors (lanes 0 to L/2 - 1, then
// the rest), each of which has a register (a 64-byte vec_t has none there: GCC keeps it on the
// stack); the same operations per lane. Used by the channel MLP (mlp_vec_t) and the lane
// reductions below.
template <typename T>
struct VecHalves {
  typedef T H __attribute__((vector_size(32)));
  H lo, hi;
  VecHalves& operator+=(const VecHalves& o) {
    lo += o.lo;
    hi += o.hi;
    return *this;
  }
};
template <typename T>
inline VecHalves<T> operator+(VecHalves<T> a, VecHalves<T> b) {
  return {a.lo + b.lo, a.hi + b.hi};
}
template <typename T>
inline VecHalves<T> operator*(VecHalves<T> a, VecHalves<T> b) {
  return {a.lo * b.lo, a.hi * b.hi};
}
template <typename T>
inline VecHalves<T> operator*(T s, VecHalves<T> b) {
  return {s * b.lo, s * b.hi};
}
template <typename T>
inline VecHalves<T> operator+(VecHalves<T> a, T s) {
  return {a.lo + s, a.hi + s};
}
template <typename T>
inline void vstore(T* p, const VecHalves<T>& v) {
  std::memcpy(p, &v.lo, 32);
  std::memcpy(p + 32 / sizeof(T), &v.hi, 32);
}
#endif

// reduce16(v, op): lane j of the result = the lanes of v[j] (16 float32 vectors) reduced by op
// in hreduce's tree (lanes l and l + 8 first, then l and l + 4, ...; op(lower lanes, upper
// lanes) at every level), so each lane has the bits of hreduce<float, 64>(v[j]) with that
// operation: 15 folds of two vectors instead of 16 separate reductions (each a chain through
// the upper halves). op(a, b) is applied to vectors of 16 lanes (vec_t<float>) and, in AVX2
// builds, of 8 (VecHalves' halves): a sum (a + b) or vmax(a, b). Needs __builtin_shufflevector
// (GCC 12+, Clang).
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define SA_HAVE_REDUCE16 1
template <typename Op>
inline vec_t<float> reduce16(const vec_t<float>* v, Op op) {
  using V = vec_t<float>;
  V a[8], b[4], c[2];
  for (int k = 0; k < 8; ++k)  // lanes 0-7: v[2k] folded once, 8-15: v[2k + 1]
    a[k] = op(__builtin_shufflevector(v[2 * k], v[2 * k + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
              __builtin_shufflevector(v[2 * k], v[2 * k + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29,
                                      30, 31));
  for (int k = 0; k < 4; ++k)  // four lanes each of v[4k .. 4k + 3]
    b[k] = op(__builtin_shufflevector(a[2 * k], a[2 * k + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27),
              __builtin_shufflevector(a[2 * k], a[2 * k + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30,
                                      31));
  for (int k = 0; k < 2; ++k)  // two lanes each of v[8k .. 8k + 7]
    c[k] = op(__builtin_shufflevector(b[2 * k], b[2 * k + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29),
              __builtin_shufflevector(b[2 * k], b[2 * k + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30,
                                      31));
  return op(__builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
            __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31));
}
#if SAM_AVX2_HALVES
// reduce16 on VecHalves: each of its shuffles takes the first 8 lanes of the result from its
// first operand and the last 8 from its second, with the same pattern (mod 16) for both, so
// it is that 8-lane shuffle of the first operand's halves, then of the second's; op pairs the
// same lanes in the same order.
template <typename Op>
inline VecHalves<float> reduce16(const VecHalves<float>* v, Op op) {
  using M = VecHalves<float>;
  const auto f1 = [&](M p) { return op(p.lo, p.hi); };
  const auto f2 = [&](M p) {
    return op(__builtin_shufflevector(p.lo, p.hi, 0, 1, 2, 3, 8, 9, 10, 11),
              __builtin_shufflevector(p.lo, p.hi, 4, 5, 6, 7, 12, 13, 14, 15));
  };
  const auto f3 = [&](M p) {
    return op(__builtin_shufflevector(p.lo, p.hi, 0, 1, 4, 5, 8, 9, 12, 13),
              __builtin_shufflevector(p.lo, p.hi, 2, 3, 6, 7, 10, 11, 14, 15));
  };
  const auto f4 = [&](M p) {
    return op(__builtin_shufflevector(p.lo, p.hi, 0, 2, 4, 6, 8, 10, 12, 14),
              __builtin_shufflevector(p.lo, p.hi, 1, 3, 5, 7, 9, 11, 13, 15));
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
// the operations for reduce16
struct LaneSum {
  template <typename V>
  V operator()(V a, V b) const {
    return a + b;
  }
};
struct LaneMax {
  template <typename V>
  V operator()(V a, V b) const {
    return vmax(a, b);
  }
};

}  // namespace
