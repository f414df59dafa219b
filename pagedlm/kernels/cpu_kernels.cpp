// Weight-only matmuls for a few rows (decode steps, speculative verification) on CPU.
//
// torch's _weight_int8pack_mm computes each row of x against the whole weight: verifying k
// proposals re-reads and re-converts SmolLM2's 28 MB output head k + 1 times. Here each weight
// row is loaded and converted once and multiplied into every row of x while it is in registers,
// so a few more rows cost their FMAs, not another pass over memory.
//
// Every row of the result is computed by exactly the same instructions whatever the number of
// rows (each row has its own accumulators, summed in a fixed order), so a row's logits are
// bit-identical in a 1-row decode step and in a k-row verification step: greedy speculative
// decoding then reproduces plain greedy decoding exactly, ties included.
//
// Plain C++ with GCC vector extensions: compiled with -march=native on the machine that runs it
// (pagedlm/kernels/__init__.py), it becomes AVX-512 or AVX2 code as the CPU allows.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>
#include <cmath>
#include <cstring>
#include <string>

namespace {

typedef float v16f __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

constexpr int kMaxRows = 8;  // rows per pass over the weight; more rows take more passes

// 16 int8 weights as floats. GCC scalarises __builtin_convertvector from int8, hence intrinsics.
inline v16f load16(const int8_t* p) {
#if defined(__AVX512F__)
  return (v16f)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  __m256 h[2] = {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))),
                 _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))))};
  v16f v;
  std::memcpy(&v, h, sizeof v);
  return v;
#else
  v16f v;
  for (int i = 0; i < 16; ++i) v[i] = static_cast<float>(p[i]);
  return v;
#endif
}

inline float sum16(v16f v) {
  // A fixed tree (halves, quarters, pairs): the same order for every row.
  v8f lo, hi;
  std::memcpy(&lo, &v, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
  const v8f s8 = lo + hi;
  v4f a, b;
  std::memcpy(&a, &s8, sizeof a);
  std::memcpy(&b, reinterpret_cast<const char*>(&s8) + sizeof a, sizeof b);
  const v4f s4 = a + b;
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// y[m, n] = scale[n] * sum_k w[n, k] * x[m, k] for m < M and NB weight rows from n: each x chunk
// loaded serves NB weight rows, each converted weight chunk M rows of x.
template <int M, int NB>
inline void int8_block(const float* x, const int8_t* w, const float* scale, float* y, int64_t N, int64_t K,
                       int64_t n) {
  v16f acc[NB][M];
  for (int j = 0; j < NB; ++j)
    for (int m = 0; m < M; ++m) acc[j][m] = v16f{};
  for (int64_t k = 0; k < K; k += 16) {
    v16f wf[NB];
    for (int j = 0; j < NB; ++j) wf[j] = load16(w + (n + j) * K + k);
    for (int m = 0; m < M; ++m) {
      v16f xv;
      std::memcpy(&xv, x + m * K + k, sizeof xv);
      for (int j = 0; j < NB; ++j) acc[j][m] += wf[j] * xv;
    }
  }
  for (int j = 0; j < NB; ++j)
    for (int m = 0; m < M; ++m) y[m * N + n + j] = sum16(acc[j][m]) * scale[n + j];
}

// Weight rows [n0, n1): blocks of NB, then one at a time (the same arithmetic per element).
template <int M>
void int8_rows(const float* x, const int8_t* w, const float* scale, float* y, int64_t N, int64_t K,
               int64_t n0, int64_t n1) {
  constexpr int NB = M <= 2 ? 4 : 2;
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) int8_block<M, NB>(x, w, scale, y, N, K, n);
  for (; n < n1; ++n) int8_block<M, 1>(x, w, scale, y, N, K, n);
}

using RowsFn = void (*)(const float*, const int8_t*, const float*, float*, int64_t, int64_t, int64_t,
                        int64_t);
constexpr RowsFn kRows[kMaxRows + 1] = {nullptr,        int8_rows<1>, int8_rows<2>, int8_rows<3>, int8_rows<4>,
                                        int8_rows<5>,   int8_rows<6>, int8_rows<7>, int8_rows<8>};

// x (rows, K) float/bf16/half, w (N, K) int8, scale (N,) float32 -> (rows, N) in x's dtype.
at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "int8_mm: shapes ", x.sizes(), " and ",
              w.sizes());
  TORCH_CHECK(w.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat, "int8_mm: int8 weight and "
              "float32 scales expected");
  const int64_t rows = x.size(0), N = w.size(0), K = w.size(1);
  TORCH_CHECK(K % 16 == 0, "int8_mm: the input size must be a multiple of 16, got ", K);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor wc = w.contiguous(), sc = scale.contiguous();
  at::Tensor y = at::empty({rows, N}, x.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  const int8_t* wp = wc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
    const int64_t m = std::min<int64_t>(kMaxRows, rows - r0);
    const RowsFn fn = kRows[m];
    at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
      fn(xp + r0 * K, wp, sp, yp + r0 * N, N, K, n0, n1);
    });
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// ---- int4: weights in blocks of 32 along the input, w = q * scale + min, q in 0..15 ------------
//
// Layout (pagedlm/model/layers/quant.py packs it; GGUF Q4_0 / Q4_1 / Q4_K repack into it exactly):
//   codes (N, Kp / 2) uint8: per block of 32 weights, 16 bytes; byte i holds weight i in its low
//         nibble and weight i + 16 in its high nibble (GGUF's own order, so one shift and one mask
//         unpack a block into 32 bytes in input order);
//   scale, mins (N, Kp / 32) float32, or float16 where all are exactly float16 (GGUF Q4_0 / Q4_1).
// Kp is K rounded up to the block; the kernel pads x with zeros, so padded weights never count.
//
// y[m, n] = sum_b scale[n, b] * dot(q[n, b], x[m, b]) + sum_b mins[n, b] * sum(x[m, b])
// The second sum is a dot product of two short vectors (the row's block sums of x are computed
// once per call), so the inner loop only multiplies codes by activations. Two ways to do that:
//   act=float: codes converted to float, times scale, FMA with x (exact up to float32 rounding);
//   act=int8:  x quantised per block of 32 to int8 (absmax / 127), codes times int8 activations
//              with vpmaddubsw + vpmaddwd (AVX2) or vpdpbusd (AVX512-VNNI), as llama.cpp's
//              Q4_1 x Q8_1 product: 4x fewer instructions per weight, x rounded to 8 bits.
// Rows stay independent: each row's x is converted on its own, and every (row, output) pair runs the
// same instructions in the same order whatever the number of rows or the tiling.

constexpr int kBlock = 32;

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
constexpr const char* kIsa = "avx512vnni";
#elif defined(__AVX2__) && defined(__FMA__)
constexpr const char* kIsa = "avx2";
#else
constexpr const char* kIsa = "scalar";
#endif

struct Int4Args {
  const uint8_t* codes;
  const void* scale;  // float32 or float16 (S below), (N, nb)
  const void* mins;
  const float* xf;   // act=float: (rows, Kp) float, zero-padded
  const int8_t* xq;  // act=int8: (rows, Kp) int8
  const float* dx;   // act=int8: (rows, nb) per-block scale of xq
  const float* sx;   // (rows, nb) per-block sums of x
  float* y;
  int64_t N, nb;
};

// Scales and mins as stored: float32, or float16 (uint16_t bits) where every value is exactly a
// float16 (GGUF Q4_0 / Q4_1 store theirs so): 20 bytes per 32 weights instead of 24.
template <typename S>
inline float sval(const void* p, int64_t i) {
  if constexpr (std::is_same_v<S, float>) {
    return static_cast<const float*>(p)[i];
  } else {
#if defined(__F16C__)
    return _cvtsh_ss(static_cast<const uint16_t*>(p)[i]);
#else
    return static_cast<float>(c10::Half(static_cast<const uint16_t*>(p)[i], c10::Half::from_bits()));
#endif
  }
}

// The min term of one (row, output) pair: a fixed-order dot product over blocks.
template <typename S>
inline float min_term(const void* mins_, int64_t off, const float* sx, int64_t nb) {
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8) {
    __m256 mv;
    if constexpr (std::is_same_v<S, float>) {
      mv = _mm256_loadu_ps(static_cast<const float*>(mins_) + off + b);
    } else {
#if defined(__F16C__)
      mv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(mins_) + off + b)));
#else
      float t[8];
      for (int i = 0; i < 8; ++i) t[i] = sval<S>(mins_, off + b + i);
      mv = _mm256_loadu_ps(t);
#endif
    }
    acc = _mm256_fmadd_ps(mv, _mm256_loadu_ps(sx + b), acc);
  }
  float t[8];
  _mm256_storeu_ps(t, acc);
  float s = ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7]));
#else
  float s = 0.f;
  int64_t b = 0;
#endif
  for (; b < nb; ++b) s += sval<S>(mins_, off + b) * sx[b];
  return s;
}

#if defined(__AVX2__) && defined(__FMA__)
inline float hsum8(__m256 v) {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

// 16 bytes of a block -> 32 codes (0..15), one byte each, in input order.
inline __m256i unpack32(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(b, 4), b);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

// Codes (unsigned) times int8 activations, summed in 8 int32 lanes.
inline __m256i dot_u4s8(__m256i q, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, x);
#else
  // |q * x| <= 15 * 128, pairs fit int16 without saturating.
  return _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), _mm256_set1_epi16(1));
#endif
}

template <typename S, int M, int NB>
inline void int4_block_i8(const Int4Args& a, int64_t n) {
  __m256 acc[NB][M];
  for (int j = 0; j < NB; ++j)
    for (int m = 0; m < M; ++m) acc[j][m] = _mm256_setzero_ps();
  const int64_t rb = a.nb * 16;  // bytes of codes per weight row
  for (int64_t b = 0; b < a.nb; ++b) {
    __m256i q[NB];
    __m256 s[NB];
    for (int j = 0; j < NB; ++j) {
      q[j] = unpack32(a.codes + (n + j) * rb + b * 16);
      s[j] = _mm256_set1_ps(sval<S>(a.scale, (n + j) * a.nb + b));
    }
    for (int m = 0; m < M; ++m) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + (m * a.nb + b) * kBlock));
      const __m256 d = _mm256_set1_ps(a.dx[m * a.nb + b]);
      for (int j = 0; j < NB; ++j)
        acc[j][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u4s8(q[j], xv)), _mm256_mul_ps(s[j], d), acc[j][m]);
    }
  }
  for (int j = 0; j < NB; ++j)
    for (int m = 0; m < M; ++m)
      a.y[m * a.N + n + j] = hsum8(acc[j][m]) + min_term<S>(a.mins, (n + j) * a.nb, a.sx + m * a.nb, a.nb);
}

template <typename S, int M, int NB>
inline void int4_block_f32(const Int4Args& a, int64_t n) {
  __m256 acc[NB][M];
  for (int j = 0; j < NB; ++j)
    for (int m = 0; m < M; ++m) acc[j][m] = _mm256_setzero_ps();
  const int64_t rb = a.nb * 16;
  for (int64_t b = 0; b < a.nb; ++b) {
    __m256 w[NB][4];
    for (int j = 0; j < NB; ++j) {
      const __m256i q = unpack32(a.codes + (n + j) * rb + b * 16);
      const __m256 s = _mm256_set1_ps(sval<S>(a.scale, (n + j) * a.nb + b));
      const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
      w[j][0] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), s);
      w[j][1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), s);
      w[j][2] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), s);
      w[j][3] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), s);
    }
    for (int m = 0; m < M; ++m) {
      const float* xp = a.xf + (m * a.nb + b) * kBlock;
      for (int i = 0; i < 4; ++i) {
        const __m256 xv = _mm256_loadu_ps(xp + 8 * i);
        for (int j = 0; j < NB; ++j) acc[j][m] = _mm256_fmadd_ps(w[j][i], xv, acc[j][m]);
      }
    }
  }
  for (int j = 0; j < NB; ++j)
    for (int m = 0; m < M; ++m)
      a.y[m * a.N + n + j] = hsum8(acc[j][m]) + min_term<S>(a.mins, (n + j) * a.nb, a.sx + m * a.nb, a.nb);
}
#else
// Portable reference of both modes (the same sums, in the same per-row order for every row count).
template <typename S, int M, int NB>
inline void int4_block_i8(const Int4Args& a, int64_t n) {
  for (int j = 0; j < NB; ++j)
    for (int m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t b = 0; b < a.nb; ++b) {
        const uint8_t* c = a.codes + (n + j) * a.nb * 16 + b * 16;
        const int8_t* x = a.xq + (m * a.nb + b) * kBlock;
        int32_t s = 0;
        for (int i = 0; i < 16; ++i) s += (c[i] & 15) * x[i] + (c[i] >> 4) * x[i + 16];
        acc += static_cast<float>(s) * (sval<S>(a.scale, (n + j) * a.nb + b) * a.dx[m * a.nb + b]);
      }
      a.y[m * a.N + n + j] = acc + min_term<S>(a.mins, (n + j) * a.nb, a.sx + m * a.nb, a.nb);
    }
}

template <typename S, int M, int NB>
inline void int4_block_f32(const Int4Args& a, int64_t n) {
  for (int j = 0; j < NB; ++j)
    for (int m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t b = 0; b < a.nb; ++b) {
        const uint8_t* c = a.codes + (n + j) * a.nb * 16 + b * 16;
        const float* x = a.xf + (m * a.nb + b) * kBlock;
        const float s = sval<S>(a.scale, (n + j) * a.nb + b);
        for (int i = 0; i < 16; ++i) acc += (c[i] & 15) * s * x[i] + (c[i] >> 4) * s * x[i + 16];
      }
      a.y[m * a.N + n + j] = acc + min_term<S>(a.mins, (n + j) * a.nb, a.sx + m * a.nb, a.nb);
    }
}
#endif

// Output columns [n0, n1) for M rows: NB weight rows share each load of x, the rest one at a time.
template <typename S, bool I8, int M>
void int4_rows(const Int4Args& a, int64_t n0, int64_t n1) {
  constexpr int NB = I8 ? (M <= 2 ? 4 : M <= 4 ? 2 : 1) : (M <= 2 ? 2 : 1);
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) I8 ? int4_block_i8<S, M, NB>(a, n) : int4_block_f32<S, M, NB>(a, n);
  for (; n < n1; ++n) I8 ? int4_block_i8<S, M, 1>(a, n) : int4_block_f32<S, M, 1>(a, n);
}

using Int4Fn = void (*)(const Int4Args&, int64_t, int64_t);
template <typename S, bool I8>
constexpr std::array<Int4Fn, kMaxRows + 1> kInt4Rows = {nullptr, int4_rows<S, I8, 1>, int4_rows<S, I8, 2>,
                                                        int4_rows<S, I8, 3>, int4_rows<S, I8, 4>, int4_rows<S, I8, 5>,
                                                        int4_rows<S, I8, 6>, int4_rows<S, I8, 7>, int4_rows<S, I8, 8>};
// [float16 scales][int8 activations][rows]
constexpr std::array<Int4Fn, kMaxRows + 1> kInt4[2][2] = {{kInt4Rows<float, false>, kInt4Rows<float, true>},
                                                          {kInt4Rows<uint16_t, false>, kInt4Rows<uint16_t, true>}};

// x (rows, K) float/bf16/half; codes (N, Kp / 2) uint8; scale, mins (N, Kp / 32) float32 or float16;
// int8_act: quantise x per block to int8 (see above). -> (rows, N) in x's dtype.
at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& mins,
                   bool int8_act) {
  TORCH_CHECK(x.dim() == 2 && codes.dim() == 2 && scale.dim() == 2 && mins.dim() == 2, "int4_mm: 2-d tensors "
              "expected");
  const bool half = scale.scalar_type() == at::kHalf;
  TORCH_CHECK(codes.scalar_type() == at::kByte && (half || scale.scalar_type() == at::kFloat) &&
              mins.scalar_type() == scale.scalar_type(), "int4_mm: uint8 codes and float32 or float16 scales "
              "and mins expected");
  const int64_t rows = x.size(0), K = x.size(1), N = codes.size(0), nb = scale.size(1);
  TORCH_CHECK(codes.size(1) == nb * 16 && scale.size(0) == N && mins.sizes() == scale.sizes() &&
              (K + kBlock - 1) / kBlock == nb, "int4_mm: shapes ", x.sizes(), ", ", codes.sizes(), ", ",
              scale.sizes(), ", ", mins.sizes());
  const int64_t Kp = nb * kBlock;
  // x once per call, row by row: float, zero-padded to whole blocks; block sums; int8 and scales.
  // Into this thread's scratch buffers, grown as needed and reused: a decode step calls this ~120
  // times, and five tensor allocations a call cost ~1 ms a step. Workers of the parallel loop
  // below read the calling thread's buffers while it waits.
  thread_local std::vector<float> xf_buf, sx_buf, dx_buf;
  thread_local std::vector<int8_t> xq_buf;
  xf_buf.resize(rows * Kp);
  sx_buf.resize(rows * nb);
  float* xfw = xf_buf.data();
  const at::Tensor xc = x.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "int4_mm", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t k = 0; k < K; ++k) xfw[r * Kp + k] = static_cast<float>(xp[r * K + k]);
      for (int64_t k = K; k < Kp; ++k) xfw[r * Kp + k] = 0.f;
    }
  });
  const float* xfp = xfw;
  float* sxp = sx_buf.data();
  int8_t* xqp = nullptr;
  float* dxp = nullptr;
  if (int8_act) {
    xq_buf.resize(rows * Kp);
    dx_buf.resize(rows * nb);
    xqp = xq_buf.data();
    dxp = dx_buf.data();
  }
  for (int64_t i = 0; i < rows * nb; ++i) {
    const float* v = xfp + i * kBlock;
    float s = 0.f, amax = 0.f;
    for (int k = 0; k < kBlock; ++k) {
      s += v[k];
      amax = std::max(amax, std::abs(v[k]));
    }
    sxp[i] = s;
    if (int8_act) {
      const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
      dxp[i] = d;
      int32_t qs = 0;
      for (int k = 0; k < kBlock; ++k) {
        xqp[i * kBlock + k] = static_cast<int8_t>(std::nearbyint(v[k] * id));
        qs += xqp[i * kBlock + k];
      }
      // The min term sums the rounded x too: the product is then exactly that of the rounded
      // activations (which the dense GEMM reproduces for many rows, quant.round_activations_int8).
      sxp[i] = d * static_cast<float>(qs);
    }
  }
  const at::Tensor cc = codes.contiguous(), sc = scale.contiguous(), mc = mins.contiguous();
  at::Tensor y = at::empty({rows, N}, x.options().dtype(at::kFloat));
  for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
    const int64_t m = std::min<int64_t>(kMaxRows, rows - r0);
    const Int4Args a{cc.data_ptr<uint8_t>(), sc.data_ptr(), mc.data_ptr(),
                     xfp + r0 * Kp, xqp ? xqp + r0 * Kp : nullptr, dxp ? dxp + r0 * nb : nullptr,
                     sxp + r0 * nb, y.data_ptr<float>() + r0 * N, N, nb};
    const Int4Fn fn = kInt4[half ? 1 : 0][int8_act ? 1 : 0][m];
    // Chunks of 64 outputs: a multiple of every tile width, so the tiling is the same in every chunk.
    at::parallel_for(0, (N + 63) / 64, 1, [&](int64_t c0, int64_t c1) {
      fn(a, c0 * 64, std::min(N, c1 * 64));
    });
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

std::string isa() { return kIsa; }

}  // namespace

TORCH_LIBRARY(pagedlm, m) {
  m.def("int8_mm(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("int4_mm(Tensor x, Tensor codes, Tensor scale, Tensor mins, bool int8_act) -> Tensor");
  m.def("isa() -> str");
}

TORCH_LIBRARY_IMPL(pagedlm, CPU, m) {
  m.impl("int8_mm", &int8_mm);
  m.impl("int4_mm", &int4_mm);
}

TORCH_LIBRARY_IMPL(pagedlm, CompositeExplicitAutograd, m) {
  m.impl("isa", &isa);
}
