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
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cstring>

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

}  // namespace

TORCH_LIBRARY(pagedlm, m) {
  m.def("int8_mm(Tensor x, Tensor w, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(pagedlm, CPU, m) {
  m.impl("int8_mm", &int8_mm);
}
