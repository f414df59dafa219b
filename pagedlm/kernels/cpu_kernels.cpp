// Weight-only matmuls for a few rows (decode steps, speculative verification) on CPU, and for
// int4 with int8 activations also for many rows (prefill chunks, large batches: int4_chunk_i8).
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
#include <tuple>
#include <type_traits>
#include <vector>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#include <sys/syscall.h>
#include <unistd.h>

namespace {

typedef float v16f __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

constexpr int kMaxRows = 8;  // rows per pass over the weight; more rows take more passes

// An int8 weight (N, K) is read a few rows at a time, a block of each row in turn: short strides
// across rows that the hardware prefetchers follow late. Asking for the same bytes of the rows
// ~8 KB ahead (every other block: a 64-byte line holds two) measured 17 -> 24.6 GB/s for
// SmolLM2's 28 MB head streamed from memory on 2 cores of a Sapphire Rapids Xeon (8.4 -> 12.4 on
// one), where a plain sum of floats reads at ~12 a core. Into L2 (T1): 5-9% faster than into L1
// (T0), and non-temporal (NTA) 40% slower. Prefetches never fault, past the end included.
inline int64_t int8_prefetch_rows(int64_t K, int nb_rows) {
  return std::max<int64_t>(nb_rows, 8192 / std::max<int64_t>(K, 1));
}

inline void prefetch_rows(const int8_t* w, int64_t K, int64_t n, int nb_rows, int64_t ahead, int64_t k) {
  for (int j = 0; j < nb_rows; ++j)
    _mm_prefetch(reinterpret_cast<const char*>(w + (n + j + ahead) * K + k), _MM_HINT_T1);
}

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
  const int64_t ahead = int8_prefetch_rows(K, NB);
  for (int64_t k = 0; k < K; k += 16) {
    if (k % 64 == 0) prefetch_rows(w, K, n, NB, ahead, k);
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

// ---- int4: weights in blocks of 32 along the input, w = q * scale + min, q in 0..15 ------------
//
// Layout (pagedlm/model/layers/quant.py ``pack_int4``; GGUF Q4_0 / Q4_1 / Q4_K repack into it
// exactly): output rows in tiles of 8 (N a multiple of 8), so that a vector's 8 lanes are 8
// outputs and no horizontal sums are needed;
//   codes (N / 8, nb * 128) uint8: per tile and block of 32 inputs, 4 chunks of 32 bytes; in chunk
//         h, byte 4 r + i holds weight (row r, input 4 h + i) in its low nibble and (row r, input
//         16 + 4 h + i) in its high nibble. One mask (and one shift) turn a chunk into the codes of
//         4 consecutive inputs for the 8 rows: 8 such vectors per block, one per group of 4 inputs;
//   scale, mins (N / 8, nb * 8): per tile and block, the 8 rows' values; float32, or float16 where
//         all are exactly float16 (GGUF Q4_0 / Q4_1: 20 bytes per 32 weights instead of 24).
// nb = ceil(K / 32); the kernel pads x with zeros, so padded weights never count.
//
// y[m, n] = sum_b scale[n, b] * dot(q[n, b], x[m, b]) + sum_b mins[n, b] * sum(x[m, b])
// The second sum runs over the blocks' sums of x (computed once per call). For the first:
//   act=int8:  x quantised per block of 32 to int8 (absmax / 127), as llama.cpp's Q4_1 x Q8_1:
//              per group of 4 inputs, vpmaddubsw of the 8 rows' codes with the 4 activations
//              broadcast; a block's 8 groups add up exactly in int16 (|sum| <= 8 * 2 * 15 * 127),
//              then one vpmaddwd to int32, one conversion and one FMA per block for 8 outputs
//              (AVX512-VNNI: vpdpbusd per group). ~4 instructions per 32 weights;
//   act=float: codes converted to float per input, FMA with x broadcast (exact up to float32
//              rounding).
// Rows stay independent: each row's x is converted on its own, and every (row, output) pair runs the
// same instructions in the same order whatever the number of rows or the tiling.

constexpr int kBlock = 32;

// A compiled decode step runs its batch bucket's row count (say 64) for fewer live rows (say 40):
// the rows past them are padding, whose results nobody reads. The engine sets this thread's row
// limit around such a step (``set_row_limit``; pagedlm.kernels.row_limit), and the kernels then
// compute the live rows only and write zeros to the padding ones. Rows are independent, so a
// live row's result is the same bit for bit. -1: no limit.
thread_local int64_t tRowLimit = -1;

inline int64_t live_rows(int64_t rows) { return tRowLimit >= 0 && tRowLimit < rows ? tRowLimit : rows; }

// Zeros in rows [live, end) of a (rows, ...) result.
inline void zero_padding(at::Tensor& y, int64_t live) {
  if (live < y.size(0)) y.narrow(0, live, y.size(0) - live).zero_();
}

int64_t set_row_limit(int64_t n) {
  const int64_t old = tRowLimit;
  tRowLimit = n;
  return old;
}

typedef unsigned int v16ui __attribute__((vector_size(64)));
typedef unsigned short v16us __attribute__((vector_size(32)));

// 16 values of x's dtype from p as float; float to 16 of x's dtype at p (bfloat16: nearest even,
// NaN kept, as torch rounds). float16 goes value by value.
template <typename T>
inline v16f ld16(const T* p) {
  v16f f;
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(&f, p, sizeof f);
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    v16us h;
    std::memcpy(&h, p, sizeof h);
    const v16ui u = __builtin_convertvector(h, v16ui) << 16;
    std::memcpy(&f, &u, sizeof f);
  } else {
    for (int j = 0; j < 16; ++j) f[j] = static_cast<float>(p[j]);
  }
  return f;
}

template <typename T>
inline void st16(T* p, v16f f) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(p, &f, sizeof f);
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    v16ui u;
    std::memcpy(&u, &f, sizeof u);
    v16ui r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    r = f != f ? (v16ui{} + 0x7FC0u) : r;
    const v16us h = __builtin_convertvector(r, v16us);
    std::memcpy(p, &h, sizeof h);
  } else {
    for (int j = 0; j < 16; ++j) p[j] = static_cast<T>(f[j]);
  }
}

// The same for n <= 16 values (a row's tail), through a buffer; lanes past n read as 0.
template <typename T>
inline v16f ld16n(const T* p, int64_t n) {
  if (n == 16) return ld16(p);
  T buf[16] = {};
  std::copy(p, p + n, buf);
  return ld16(buf);
}

template <typename T>
inline void st16n(T* p, v16f f, int64_t n) {
  if (n == 16) return st16(p, f);
  T buf[16];
  st16(buf, f);
  std::copy(buf, buf + n, p);
}

// A kernel's float32 result (live rows x n at y) into out (its first rows, contiguous) in out's
// dtype: one pass here instead of at::Tensor::to's dispatch, allocation and copy (~5 us a call,
// and a decode step makes ~150 such calls). bfloat16 rounded as torch rounds it.
inline void store_rows(const float* y, at::Tensor& out, int64_t rows, int64_t n) {
  const int64_t total = rows * n;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "store_rows", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, (total + 15) / 16, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0 * 16; i < std::min(total, i1 * 16); i += 16) {
        st16n(o + i, ld16n(y + i, std::min<int64_t>(16, total - i)), std::min<int64_t>(16, total - i));
      }
    });
  });
}

// Where a kernel writes its float32 result: out itself when it is float32, else this thread's
// buffer (then store_rows).
inline float* float_rows(at::Tensor& out, int64_t rows, int64_t n) {
  if (out.scalar_type() == at::kFloat) return out.data_ptr<float>();
  thread_local std::vector<float> buf;
  buf.resize(rows * n);
  return buf.data();
}

inline void finish_rows(const float* y, at::Tensor& out, int64_t rows, int64_t n) {
  if (out.scalar_type() != at::kFloat) store_rows(y, out, rows, n);
}
constexpr int kTile = 8;  // output rows per tile of the int4 layout
constexpr int kChunk = 32;  // rows per pass of the many-rows int4 path

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
constexpr const char* kIsa = "avx512vnni";
#elif defined(__AVX2__) && defined(__FMA__)
constexpr const char* kIsa = "avx2";
#else
constexpr const char* kIsa = "scalar";
#endif

struct Int4Args {
  const uint8_t* codes;
  const void* scale;  // S below, (N / 8, nb * 8)
  const void* mins;
  const float* xf;   // act=float: (rows, Kp) float, zero-padded
  const int8_t* xq;  // act=int8: (rows, Kp) int8
  const float* dx;   // act=int8: (rows, nb) per-block scale of xq
  const float* sx;   // (rows, nb) per-block sums of x
  float* y;
  int64_t N, nb;
  uint16_t* yb = nullptr;  // the tile path: bfloat16 output here instead of y (see store_bf16x16)
};

// Scales and mins as stored: float32, or float16 (uint16_t bits).
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

#if defined(__AVX2__) && defined(__FMA__)
inline float hsum8(__m256 v) {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

// 8 scales (or mins) of one tile and block as floats.
template <typename S>
inline __m256 load8(const void* p, int64_t i) {
  if constexpr (std::is_same_v<S, float>) {
    return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  } else {
#if defined(__F16C__)
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
#else
    float t[8];
    for (int r = 0; r < 8; ++r) t[r] = sval<S>(p, i + r);
    return _mm256_loadu_ps(t);
#endif
  }
}

// One tile's block of codes: 8 vectors, group g = the codes of inputs 4 g .. 4 g + 3 for the 8 rows.
inline void unpack_tile_block(const uint8_t* c, __m256i v[8]) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int h = 0; h < 4; ++h) {
    const __m256i ch = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32 * h));
    v[h] = _mm256_and_si256(ch, low);
    v[h + 4] = _mm256_and_si256(_mm256_srli_epi16(ch, 4), low);
  }
}

// The exact integer dot products of one block of 32 inputs, for the 8 rows of a tile.
inline __m256i block_dot_i8(const __m256i v[8], const int8_t* xq) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  __m256i s = _mm256_setzero_si256();
  for (int g = 0; g < 8; ++g) {
    int32_t x4;
    std::memcpy(&x4, xq + 4 * g, 4);
    s = _mm256_dpbusd_epi32(s, v[g], _mm256_set1_epi32(x4));
  }
  return s;
#else
  __m256i s16 = _mm256_setzero_si256();
  for (int g = 0; g < 8; ++g) {
    int32_t x4;
    std::memcpy(&x4, xq + 4 * g, 4);
    s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(v[g], _mm256_set1_epi32(x4)));
  }
  return _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
#endif
}

// The 8 outputs of tile t of a row of y (fewer in a last, padded tile).
inline void store_tile(float* yrow, int64_t t, int64_t N, __m256 v) {
  if ((t + 1) * kTile <= N) {
    _mm256_storeu_ps(yrow + t * kTile, v);
  } else {
    float tmp[kTile];
    _mm256_storeu_ps(tmp, v);
    for (int64_t r = 0; t * kTile + r < N; ++r) yrow[t * kTile + r] = tmp[r];
  }
}

template <typename S>
inline __m256 min_terms(const Int4Args& a, int64_t t, const float* sx) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < a.nb; ++b)
    acc = _mm256_fmadd_ps(load8<S>(a.mins, (t * a.nb + b) * kTile), _mm256_set1_ps(sx[b]), acc);
  return acc;
}

template <typename S, int M>
inline void int4_tile_i8(const Int4Args& a, int64_t t) {
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  const uint8_t* c = a.codes + t * a.nb * 128;
  for (int64_t b = 0; b < a.nb; ++b) {
    // A few rows stream the codes from memory: ask for them 2 KB ahead (past the tile's end:
    // the next tile's, contiguous), which the prefetchers reach late at each call's start.
    _mm_prefetch(reinterpret_cast<const char*>(c + (b + 16) * 128), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + (b + 16) * 128 + 64), _MM_HINT_T0);
    __m256i v[8];
    unpack_tile_block(c + b * 128, v);
    const __m256 s = load8<S>(a.scale, (t * a.nb + b) * kTile);
    for (int m = 0; m < M; ++m) {
      const __m256i d = block_dot_i8(v, a.xq + (m * a.nb + b) * kBlock);
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(s, _mm256_set1_ps(a.dx[m * a.nb + b])), acc[m]);
    }
  }
  for (int m = 0; m < M; ++m)
    store_tile(a.y + m * a.N, t, a.N, _mm256_add_ps(acc[m], min_terms<S>(a, t, a.sx + m * a.nb)));
}

template <typename S, int M>
inline void int4_tile_f32(const Int4Args& a, int64_t t) {
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  const uint8_t* c = a.codes + t * a.nb * 128;
  const __m256i gather = _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1);
  for (int64_t b = 0; b < a.nb; ++b) {
    __m256i v[8];
    unpack_tile_block(c + b * 128, v);
    __m256 blk[M];
    for (int m = 0; m < M; ++m) blk[m] = _mm256_setzero_ps();
    for (int g = 0; g < 8; ++g) {
      for (int i = 0; i < 4; ++i) {
        // Byte i of each row's 4 -> 8 floats, one per row.
        const __m256i pick = _mm256_setr_epi8(i, 4 + i, 8 + i, 12 + i, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                              i, 4 + i, 8 + i, 12 + i, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
        const __m256i rows8 = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(v[g], pick), gather);
        const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm256_castsi256_si128(rows8)));
        for (int m = 0; m < M; ++m)
          blk[m] = _mm256_fmadd_ps(q, _mm256_set1_ps(a.xf[(m * a.nb + b) * kBlock + 4 * g + i]), blk[m]);
      }
    }
    const __m256 s = load8<S>(a.scale, (t * a.nb + b) * kTile);
    for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(blk[m], s, acc[m]);
  }
  for (int m = 0; m < M; ++m)
    store_tile(a.y + m * a.N, t, a.N, _mm256_add_ps(acc[m], min_terms<S>(a, t, a.sx + m * a.nb)));
}

// Many rows (prefill chunks, large decode batches), int8 activations: rows in chunks of kChunk
// whose accumulators live in a small stack buffer, so that a tile's unpacked codes stay in
// registers (mostly: GCC jams two blocks into the row loop, which measured faster than one block
// a pass, with fewer spills) while every row of the chunk multiplies them; int4_tile_i8 keeps
// everything in registers and runs out of them past 8 rows. Each (row, output) runs exactly
// int4_tile_i8's operations in its order: the block sums, then the min terms in a second chain
// added at the end. Measured on SmolLM2's shapes, 512 rows, AVX2: ~1.35x the dense float32 GEMM.
template <typename S>
inline void int4_chunk_i8(const Int4Args& a, int64_t t, int64_t rows) {
  __m256 acc[kChunk], macc[kChunk];
  for (int64_t m = 0; m < rows; ++m) acc[m] = macc[m] = _mm256_setzero_ps();
  const uint8_t* c = a.codes + t * a.nb * 128;
  for (int64_t b = 0; b < a.nb; ++b) {
    __m256i v[8];
    unpack_tile_block(c + b * 128, v);
    const __m256 s = load8<S>(a.scale, (t * a.nb + b) * kTile), mn = load8<S>(a.mins, (t * a.nb + b) * kTile);
    for (int64_t m = 0; m < rows; ++m) {
      const __m256i d = block_dot_i8(v, a.xq + (m * a.nb + b) * kBlock);
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(s, _mm256_set1_ps(a.dx[m * a.nb + b])), acc[m]);
      macc[m] = _mm256_fmadd_ps(mn, _mm256_set1_ps(a.sx[m * a.nb + b]), macc[m]);
    }
  }
  for (int64_t m = 0; m < rows; ++m) store_tile(a.y + m * a.N, t, a.N, _mm256_add_ps(acc[m], macc[m]));
}

#if defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__AVX512F__)
#define PAGEDLM_AMX 1
// ---- Many rows on AMX (Sapphire Rapids and later) -------------------------------------------
//
// The same sums as int4_chunk_i8, with each block's integer dot products from the tile unit:
// tdpbsud multiplies 16 rows of int8 activations (A: 16 x 32 bytes, one block) by 16 outputs'
// codes (B: 8 x 64 bytes, two tiles of 8 side by side: row g holds inputs 4 g .. 4 g + 3 of each
// output, which is exactly the layout a tile's group vector already has) into 16 x 16 exact int32
// sums, one tdpbsud per 8192 multiply-adds where vpdpbusd does 64. The sums go through memory to
// the vector unit, which then runs, per (row, output), the very float operations of the other
// paths in their order (block sums in one chain, min terms in a second one, added at the end), so
// every row is bit-identical to what 1 row computes. Integer sums are exact either way.
//
// Tiles: even blocks tmm0 B, tmm1 A, tmm2 C; odd blocks tmm5, tmm4, tmm3: a block's tile work
// waits on no tile of the block before, and overlaps that block's float work. Measured on
// SmolLM2's 120 int4 layers (random codes, 2 threads, AMX Xeon): 16 / 32 / 64 / 128 rows in
// 7.5 / 12.4 / 20.8 / 42.9 ms against 10.1 / 17.7 / 34.5 / 65.3 ms for int4_chunk_i8. The
// per-block float work is what is left: one conversion, multiply and FMA per (row, 16 outputs,
// block), since each block has its own scales.

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux grants a process the tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM);
// PAGEDLM_AMX=0 turns the path off (the tests compare both paths this way).
bool amx_enabled() {
  static const bool ok = [] {
    const char* env = std::getenv("PAGEDLM_AMX");
    if (env != nullptr && std::string(env) == "0") return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

constexpr int64_t kAmxRows = 16;

inline void amx_configure() {
  TileConfig c;
  c.rows[0] = 8;
  c.colsb[0] = 64;
  c.rows[1] = kAmxRows;
  c.colsb[1] = kBlock;
  c.rows[2] = c.rows[3] = kAmxRows;
  c.colsb[2] = c.colsb[3] = 64;
  c.rows[4] = kAmxRows;  // tmm4 / tmm5: A and B of odd blocks (no wait on the even block's tiles)
  c.colsb[4] = kBlock;
  c.rows[5] = 8;
  c.colsb[5] = 64;
  _tile_loadconfig(&c);
}

// 16 floats to bfloat16 as torch rounds them (c10::BFloat16: to nearest even, denormals kept,
// NaN 0x7FC0), written in place of a float result and its conversion (a pass over y per call).
inline void store_bf16x16(uint16_t* p, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}

// Tiles t and t + 1 (16 outputs) for rows [0, rows) of x, whose int8 activations, block scales
// and block sums are padded with zero rows to a multiple of 16. bbuf: nb * 512 bytes; sm: nb * 32
// floats (scratch).
template <typename S>
void int4_amx_pair(const Int4Args& a, int64_t t, int64_t rows, int64_t Kp, uint8_t* bbuf, float* sm,
                   const uint8_t* p_next) {
  const int64_t nb = a.nb;
  for (int64_t b = 0; b < nb; ++b) {
    __m256i v0[8], v1[8];
    unpack_tile_block(a.codes + (t * nb + b) * 128, v0);
    unpack_tile_block(a.codes + ((t + 1) * nb + b) * 128, v1);
    for (int g = 0; g < 8; ++g) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(bbuf + b * 512 + g * 64), v0[g]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(bbuf + b * 512 + g * 64 + 32), v1[g]);
    }
    _mm256_store_ps(sm + b * 16, load8<S>(a.scale, (t * nb + b) * kTile));
    _mm256_store_ps(sm + b * 16 + 8, load8<S>(a.scale, ((t + 1) * nb + b) * kTile));
    _mm256_store_ps(sm + (nb + b) * 16, load8<S>(a.mins, (t * nb + b) * kTile));
    _mm256_store_ps(sm + (nb + b) * 16 + 8, load8<S>(a.mins, ((t + 1) * nb + b) * kTile));
  }
  alignas(64) int32_t cbuf[2][kAmxRows * 16];
  alignas(64) float accbuf[kAmxRows * 16];
  for (int64_t r0 = 0; r0 < rows; r0 += kAmxRows) {
    const int8_t* xq = a.xq + r0 * Kp;
    const float* dx = a.dx + r0 * nb;
    const float* sx = a.sx + r0 * nb;
    __m512 acc[kAmxRows];
    for (int m = 0; m < kAmxRows; ++m) acc[m] = _mm512_setzero_ps();
    auto epilogue = [&](int64_t b, const int32_t* c) {
      const __m512 s = _mm512_load_ps(sm + b * 16);
#pragma GCC unroll 16
      for (int m = 0; m < kAmxRows; ++m) {
        const __m512 d = _mm512_cvtepi32_ps(_mm512_load_si512(c + m * 16));
        acc[m] = _mm512_fmadd_ps(d, _mm512_mul_ps(s, _mm512_set1_ps(dx[m * nb + b])), acc[m]);
      }
    };
    // Block b's sums into tmm2 (even b) or tmm3 (odd b), stored to cbuf[b % 2]; block b - 1's
    // float work follows while the tile unit works.
    for (int64_t b = 0; b < nb; ++b) {
      if (b % 2 == 0) {
        _tile_loadd(1, xq + b * kBlock, Kp);
        _tile_loadd(0, bbuf + b * 512, 64);
        _tile_zero(2);
        _tile_dpbsud(2, 1, 0);
        _tile_stored(2, cbuf[0], 64);
      } else {
        _tile_loadd(4, xq + b * kBlock, Kp);
        _tile_loadd(5, bbuf + b * 512, 64);
        _tile_zero(3);
        _tile_dpbsud(3, 4, 5);
        _tile_stored(3, cbuf[1], 64);
      }
      if (r0 + kAmxRows >= rows && p_next != nullptr) {
        // The next pair's codes (nb * 256 bytes) from memory while this one computes: 4 lines a block.
        for (int l = 0; l < 4; ++l) _mm_prefetch(reinterpret_cast<const char*>(p_next + (b * 4 + l) * 64), _MM_HINT_T0);
      }
      if (b > 0) epilogue(b - 1, cbuf[(b - 1) % 2]);
    }
    epilogue(nb - 1, cbuf[(nb - 1) % 2]);
    for (int m = 0; m < kAmxRows; ++m) _mm512_store_ps(accbuf + m * 16, acc[m]);
    // The min terms, their own chain per (row, output) as in min_terms, then added.
    __m512 macc[kAmxRows];
    for (int m = 0; m < kAmxRows; ++m) macc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const __m512 mn = _mm512_load_ps(sm + (nb + b) * 16);
#pragma GCC unroll 16
      for (int m = 0; m < kAmxRows; ++m) macc[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(sx[m * nb + b]), macc[m]);
    }
    const int64_t live = std::min<int64_t>(kAmxRows, rows - r0);
    for (int64_t m = 0; m < live; ++m) {
      const __m512 v = _mm512_add_ps(_mm512_load_ps(accbuf + m * 16), macc[m]);
      if (a.yb != nullptr) {
        store_bf16x16(a.yb + (r0 + m) * a.N + t * kTile, v);
      } else {
        _mm512_storeu_ps(a.y + (r0 + m) * a.N + t * kTile, v);
      }
    }
  }
}

// Tiles [t0, t1) for all rows (see int4_amx_pair): pairs of whole tiles on the tile unit, a last
// odd or partial tile through int4_chunk_i8 (the same results).
template <typename S>
void int4_many_amx(const Int4Args& a, int64_t rows, int64_t Kp, int64_t p0, int64_t p1) {
  // This thread's scratch, 64-byte aligned: the B tiles (nb * 512 bytes), scales and mins (nb * 32 floats).
  thread_local std::vector<uint8_t> scratch;
  scratch.resize(a.nb * (512 + 32 * sizeof(float)) + 64);
  uint8_t* bbuf = scratch.data() + (64 - reinterpret_cast<uintptr_t>(scratch.data()) % 64) % 64;
  float* sm = reinterpret_cast<float*>(bbuf + a.nb * 512);
  amx_configure();
  for (int64_t p = p0; p < p1; ++p)
    int4_amx_pair<S>(a, 2 * p, rows, Kp, bbuf, sm, p + 1 < p1 ? a.codes + 2 * (p + 1) * a.nb * 128 : nullptr);
  _tile_release();
}
#endif
#else
// Portable reference of both modes (the same sums, in the same per-row order for every row count).
template <typename S, bool I8>
inline void int4_tile_ref(const Int4Args& a, int64_t t, int M) {
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < kTile && t * kTile + r < a.N; ++r) {
      float acc = 0.f, macc = 0.f;
      for (int64_t b = 0; b < a.nb; ++b) {
        const uint8_t* c = a.codes + (t * a.nb + b) * 128;
        const float s = sval<S>(a.scale, (t * a.nb + b) * kTile + r);
        if constexpr (I8) {
          const int8_t* x = a.xq + (m * a.nb + b) * kBlock;
          int32_t d = 0;
          for (int h = 0; h < 4; ++h)
            for (int i = 0; i < 4; ++i) {
              const uint8_t byte = c[32 * h + 4 * r + i];
              d += (byte & 15) * x[4 * h + i] + (byte >> 4) * x[16 + 4 * h + i];
            }
          acc += static_cast<float>(d) * (s * a.dx[m * a.nb + b]);
        } else {
          const float* x = a.xf + (m * a.nb + b) * kBlock;
          float blk = 0.f;
          for (int h = 0; h < 4; ++h)
            for (int i = 0; i < 4; ++i) {
              const uint8_t byte = c[32 * h + 4 * r + i];
              blk += (byte & 15) * x[4 * h + i] + (byte >> 4) * x[16 + 4 * h + i];
            }
          acc += blk * s;
        }
        macc += sval<S>(a.mins, (t * a.nb + b) * kTile + r) * a.sx[m * a.nb + b];
      }
      a.y[m * a.N + t * kTile + r] = acc + macc;
    }
}
template <typename S, int M>
inline void int4_tile_i8(const Int4Args& a, int64_t t) { int4_tile_ref<S, true>(a, t, M); }
template <typename S, int M>
inline void int4_tile_f32(const Int4Args& a, int64_t t) { int4_tile_ref<S, false>(a, t, M); }
template <typename S>
inline void int4_chunk_i8(const Int4Args& a, int64_t t, int64_t rows) { int4_tile_ref<S, true>(a, t, rows); }
#endif

// Tiles [t0, t1) for all rows of x with int8 activations, kChunk rows at a time: a thread's
// tiles (its share of the weights, from cache) pass once per chunk, the chunk's x stays in cache.
template <typename S>
void int4_many_i8(const Int4Args& a, int64_t rows, int64_t Kp, int64_t t0, int64_t t1) {
  for (int64_t r0 = 0; r0 < rows; r0 += kChunk) {
    Int4Args c = a;
    c.xq += r0 * Kp;
    c.dx += r0 * a.nb;
    c.sx += r0 * a.nb;
    c.y += r0 * a.N;
    const int64_t m = std::min<int64_t>(kChunk, rows - r0);
    for (int64_t t = t0; t < t1; ++t) int4_chunk_i8<S>(c, t, m);
  }
}

// Tiles [t0, t1) for M rows of x.
template <typename S, bool I8, int M>
void int4_rows(const Int4Args& a, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) I8 ? int4_tile_i8<S, M>(a, t) : int4_tile_f32<S, M>(a, t);
}

using Int4Fn = void (*)(const Int4Args&, int64_t, int64_t);
template <typename S, bool I8>
constexpr std::array<Int4Fn, kMaxRows + 1> kInt4Rows = {nullptr, int4_rows<S, I8, 1>, int4_rows<S, I8, 2>,
                                                        int4_rows<S, I8, 3>, int4_rows<S, I8, 4>, int4_rows<S, I8, 5>,
                                                        int4_rows<S, I8, 6>, int4_rows<S, I8, 7>, int4_rows<S, I8, 8>};
// [float16 scales][int8 activations][rows]
constexpr std::array<Int4Fn, kMaxRows + 1> kInt4[2][2] = {{kInt4Rows<float, false>, kInt4Rows<float, true>},
                                                          {kInt4Rows<uint16_t, false>, kInt4Rows<uint16_t, true>}};

// x once per call, row by row: float, zero-padded to whole blocks of 32; the block sums; with
// int8_act also int8 per block (absmax / 127) and the block scales. Into this thread's scratch
// buffers, grown as needed and reused: a decode step calls the kernels ~120 times, and five tensor
// allocations a call cost ~1 ms a step. Workers of a parallel loop read the calling thread's
// buffers while it waits.
struct PreparedX {
  const float* xf;   // (rows, Kp) float, zero-padded
  const int8_t* xq;  // int8_act: (rows, Kp) int8, else null
  const float* dx;   // int8_act: (rows, nb) per-block scale of xq, else null
  const float* sx;   // (rows, nb) per-block sums of x (of the rounded x with int8_act)
  int64_t Kp, nb;
};

// One block of 32 floats to int8: amax / 127 as the scale, each value rounded to nearest even
// (as std::nearbyint in the default rounding mode); returns the sum of the codes.
inline int32_t quantize_block(const float* v, int8_t* q, float* scale) {
#if defined(__AVX2__)
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 m = _mm256_setzero_ps();
  for (int k = 0; k < kBlock; k += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + k)));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
  const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
  *scale = d;
  __m256i i32[4];
  for (int j = 0; j < 4; ++j) i32[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + 8 * j), _mm256_set1_ps(id)));
  // |values| <= 127: packing saturates nothing; the packs interleave 128-bit lanes, the permute undoes it.
  const __m256i p16 = _mm256_packs_epi16(_mm256_packs_epi32(i32[0], i32[1]), _mm256_packs_epi32(i32[2], i32[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(p16, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  const __m256i s = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]), _mm256_add_epi32(i32[2], i32[3]));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
  return _mm_cvtsi128_si32(s4);
#else
  float amax = 0.f;
  for (int k = 0; k < kBlock; ++k) amax = std::max(amax, std::abs(v[k]));
  const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
  *scale = d;
  int32_t qs = 0;
  for (int k = 0; k < kBlock; ++k) {
    q[k] = static_cast<int8_t>(std::nearbyint(v[k] * id));
    qs += q[k];
  }
  return qs;
#endif
}

// pad_rows > rows: the int8 activations, their scales and the block sums go on with zero rows up
// to pad_rows (the tile unit reads rows 16 at a time).
PreparedX prepare_x(const at::Tensor& x, bool int8_act, int64_t pad_rows = 0) {
  const int64_t rows = x.size(0), K = x.size(1), nb = (K + kBlock - 1) / kBlock, Kp = nb * kBlock;
  pad_rows = std::max(pad_rows, rows);
  thread_local std::vector<float> xf_buf, sx_buf, dx_buf;
  thread_local std::vector<int8_t> xq_buf;
  xf_buf.resize(rows * Kp);
  sx_buf.resize(pad_rows * nb);
  std::fill(sx_buf.begin() + rows * nb, sx_buf.begin() + pad_rows * nb, 0.f);
  if (int8_act) {
    xq_buf.resize(pad_rows * Kp);
    dx_buf.resize(pad_rows * nb);
    std::fill(xq_buf.begin() + rows * Kp, xq_buf.begin() + pad_rows * Kp, 0);
    std::fill(dx_buf.begin() + rows * nb, dx_buf.begin() + pad_rows * nb, 0.f);
  }
  float* xfw = xf_buf.data();
  float* sxp = sx_buf.data();
  int8_t* xqp = int8_act ? xq_buf.data() : nullptr;
  float* dxp = int8_act ? dx_buf.data() : nullptr;
  const at::Tensor xc = x.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "prepare_x", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    // Rows are independent: a prefill chunk's rows split over the threads (decode's few rows
    // stay on the calling thread: a fork costs more than they do).
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t k = 0; k < K; ++k) xfw[r * Kp + k] = static_cast<float>(xp[r * K + k]);
        for (int64_t k = K; k < Kp; ++k) xfw[r * Kp + k] = 0.f;
        for (int64_t i = r * nb; i < (r + 1) * nb; ++i) {
          const float* v = xfw + i * kBlock;
          if (int8_act) {
            // The min term sums the rounded x too: the product is then exactly that of the
            // rounded activations (quant.round_activations_int8, the tests' reference).
            const int32_t qs = quantize_block(v, xqp + i * kBlock, dxp + i);
            sxp[i] = dxp[i] * static_cast<float>(qs);
          } else {
            float s = 0.f;
            for (int k = 0; k < kBlock; ++k) s += v[k];
            sxp[i] = s;
          }
        }
      }
    });
  });
  return PreparedX{xfw, xqp, dxp, sxp, Kp, nb};
}

// x (rows, K) float/bf16/half; codes (N / 8, nb * 128) uint8; scale, mins (N / 8, nb * 8) float32 or
// float16 (the tiled layout above; the last tile padded where N is not a multiple of 8);
// int8_act: quantise x per block to int8 (see above). -> (rows, N) in x's dtype.
at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& mins,
                   bool int8_act, int64_t n_out) {
  TORCH_CHECK(x.dim() == 2 && codes.dim() == 2 && scale.dim() == 2 && mins.dim() == 2, "int4_mm: 2-d tensors "
              "expected");
  const bool half = scale.scalar_type() == at::kHalf;
  TORCH_CHECK(codes.scalar_type() == at::kByte && (half || scale.scalar_type() == at::kFloat) &&
              mins.scalar_type() == scale.scalar_type(), "int4_mm: uint8 codes and float32 or float16 scales "
              "and mins expected");
  int64_t rows = x.size(0);
  const int64_t K = x.size(1), tiles = codes.size(0), N = n_out, nb = (K + kBlock - 1) / kBlock;
  TORCH_CHECK(N > (tiles - 1) * kTile && N <= tiles * kTile, "int4_mm: ", N, " outputs do not fill ", tiles,
              " tiles of ", kTile);
  TORCH_CHECK(codes.size(1) == nb * 128 && scale.size(0) == tiles && scale.size(1) == nb * kTile &&
              mins.sizes() == scale.sizes(), "int4_mm: shapes ", x.sizes(), ", ", codes.sizes(), ", ",
              scale.sizes(), ", ", mins.sizes(), " (codes (N / 8, ceil(K / 32) * 128), scales (N / 8, "
              "ceil(K / 32) * 8) expected)");
  const int64_t all_rows = rows;
  rows = live_rows(rows);
#if defined(PAGEDLM_AMX)
  const bool amx = int8_act && rows > kMaxRows && amx_enabled();
#else
  const bool amx = false;
#endif
  const PreparedX px = prepare_x(rows == all_rows ? x : x.narrow(0, 0, rows), int8_act, amx ? (rows + 15) / 16 * 16 : 0);
  const int64_t Kp = px.Kp;
  const at::Tensor cc = codes.contiguous(), sc = scale.contiguous(), mc = mins.contiguous();
  at::Tensor y = at::empty({all_rows, N}, x.options());
  zero_padding(y, rows);
#if defined(PAGEDLM_AMX)
  if (amx) {
    // Whole pairs of tiles (16 outputs) on the tile unit; a last odd or partial tile after them.
    // With bfloat16 x and whole pairs only, the tile path writes bfloat16 itself.
    const int64_t pairs = N / 16;
    const bool bf16_out = x.scalar_type() == at::kBFloat16 && 2 * pairs == tiles;
    float* yf = bf16_out ? nullptr : float_rows(y, rows, N);
    Int4Args a{cc.data_ptr<uint8_t>(), sc.data_ptr(), mc.data_ptr(), px.xf, px.xq, px.dx, px.sx, yf, N, nb};
    if (bf16_out) a.yb = reinterpret_cast<uint16_t*>(y.data_ptr());
    at::parallel_for(0, pairs + (2 * pairs < tiles ? 1 : 0), 4, [&](int64_t p0, int64_t p1) {
      if (p0 < std::min(p1, pairs)) half ? int4_many_amx<uint16_t>(a, rows, Kp, p0, std::min(p1, pairs))
           : int4_many_amx<float>(a, rows, Kp, p0, std::min(p1, pairs));
      if (p1 > pairs) {
        half ? int4_many_i8<uint16_t>(a, rows, Kp, 2 * pairs, tiles) : int4_many_i8<float>(a, rows, Kp, 2 * pairs, tiles);
      }
    });
    if (!bf16_out) finish_rows(yf, y, rows, N);
    return y;
  }
#endif
  float* yf = float_rows(y, rows, N);
  if (int8_act && rows > kMaxRows) {
    const Int4Args a{cc.data_ptr<uint8_t>(), sc.data_ptr(), mc.data_ptr(), px.xf, px.xq, px.dx, px.sx, yf, N, nb};
    at::parallel_for(0, tiles, 8, [&](int64_t t0, int64_t t1) {
      half ? int4_many_i8<uint16_t>(a, rows, Kp, t0, t1) : int4_many_i8<float>(a, rows, Kp, t0, t1);
    });
    finish_rows(yf, y, rows, N);
    return y;
  }
  for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
    const int64_t m = std::min<int64_t>(kMaxRows, rows - r0);
    const Int4Args a{cc.data_ptr<uint8_t>(), sc.data_ptr(), mc.data_ptr(),
                     px.xf + r0 * Kp, px.xq ? px.xq + r0 * Kp : nullptr, px.dx ? px.dx + r0 * nb : nullptr,
                     px.sx + r0 * nb, yf + r0 * N, N, nb};
    const Int4Fn fn = kInt4[half ? 1 : 0][int8_act ? 1 : 0][m];
    // At least 8 tiles (64 outputs) per thread: a fork costs more than a few tiles.
    at::parallel_for(0, tiles, 8, [&](int64_t t0, int64_t t1) { fn(a, t0, t1); });
  }
  finish_rows(yf, y, rows, N);
  return y;
}

// ---- int8 with int8 activations: w (N, K) int8 per output row, x int8 per block of 32 -------------
//
// y[m, n] = scale[n] * sum_b dx[m, b] * dot(w[n, b], xq[m, b]), as llama.cpp's Q8_0 x Q8_0: the
// integer dot products of a block take ~7 instructions per 32 weights (signed x signed through
// vpmaddubsw: |w| times x with w's sign) where converting the weights to float takes ~3x more,
// and the head (SmolLM2: 49152 x 576, 28 MB) then streams at memory speed. Rows independent as
// above.

struct Int8Args {
  const int8_t* w;
  const float* scale;
  const int8_t* xq;
  const float* dx;
  float* y;
  int64_t N, K, nb;
};

#if defined(__AVX2__) && defined(__FMA__)
// Signed int8 dot products of 32 bytes, in 8 int32 lanes.
inline __m256i dot_s8s8(__m256i w, __m256i x) {
  const __m256i aw = _mm256_sign_epi8(w, w), sx = _mm256_sign_epi8(x, w);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, sx);
#else
  // |w| <= 128 and |x| <= 127: pairs fit int16 without saturating.
  return _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), _mm256_set1_epi16(1));
#endif
}

template <int M, int NB>
inline void int8_block_i8(const Int8Args& a, int64_t n) {
  __m256 acc[NB][M];
  for (int j = 0; j < NB; ++j)
    for (int m = 0; m < M; ++m) acc[j][m] = _mm256_setzero_ps();
  const int64_t ahead = int8_prefetch_rows(a.K, NB);
  for (int64_t b = 0; b < a.nb; ++b) {
    if (b % 2 == 0) prefetch_rows(a.w, a.K, n, NB, ahead, b * kBlock);
    __m256i wv[NB];
    for (int j = 0; j < NB; ++j)
      wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.w + (n + j) * a.K + b * kBlock));
    for (int m = 0; m < M; ++m) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + (m * a.nb + b) * kBlock));
      const __m256 d = _mm256_set1_ps(a.dx[m * a.nb + b]);
      for (int j = 0; j < NB; ++j) acc[j][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_s8s8(wv[j], xv)), d, acc[j][m]);
    }
  }
  for (int j = 0; j < NB; ++j)
    for (int m = 0; m < M; ++m) a.y[m * a.N + n + j] = hsum8(acc[j][m]) * a.scale[n + j];
}
#else
template <int M, int NB>
inline void int8_block_i8(const Int8Args& a, int64_t n) {
  for (int j = 0; j < NB; ++j)
    for (int m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t b = 0; b < a.nb; ++b) {
        const int8_t* w = a.w + (n + j) * a.K + b * kBlock;
        const int8_t* x = a.xq + (m * a.nb + b) * kBlock;
        int32_t s = 0;
        for (int i = 0; i < kBlock; ++i) s += static_cast<int32_t>(w[i]) * x[i];
        acc += static_cast<float>(s) * a.dx[m * a.nb + b];
      }
      a.y[m * a.N + n + j] = acc * a.scale[n + j];
    }
}
#endif

template <int M>
void int8_rows_i8(const Int8Args& a, int64_t n0, int64_t n1) {
  constexpr int NB = M <= 2 ? 4 : M <= 4 ? 2 : 1;
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) int8_block_i8<M, NB>(a, n);
  for (; n < n1; ++n) int8_block_i8<M, 1>(a, n);
}

using Int8Fn = void (*)(const Int8Args&, int64_t, int64_t);
constexpr Int8Fn kInt8I8[kMaxRows + 1] = {nullptr,         int8_rows_i8<1>, int8_rows_i8<2>,
                                          int8_rows_i8<3>, int8_rows_i8<4>, int8_rows_i8<5>,
                                          int8_rows_i8<6>, int8_rows_i8<7>, int8_rows_i8<8>};

// x (rows, K) float/bf16/half, w (N, K) int8, scale (N,) float32 -> (rows, N) in x's dtype.
// int8_act: x rounded to int8 per block of 32 (K a multiple of 32), else float FMA over the
// converted weights (K a multiple of 16).
at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, bool int8_act) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "int8_mm: shapes ", x.sizes(), " and ",
              w.sizes());
  TORCH_CHECK(w.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat, "int8_mm: int8 weight and "
              "float32 scales expected");
  int64_t rows = x.size(0);
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(K % (int8_act ? kBlock : 16) == 0, "int8_mm: the input size must be a multiple of ",
              int8_act ? kBlock : 16, ", got ", K);
  const at::Tensor wc = w.contiguous(), sc = scale.contiguous();
  at::Tensor y = at::empty({rows, N}, x.options());
  const int64_t all_rows = rows;
  zero_padding(y, live_rows(rows));
  rows = live_rows(rows);
  const int8_t* wp = wc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  float* yp = float_rows(y, rows, N);
  if (int8_act) {
    const PreparedX px = prepare_x(rows == all_rows ? x : x.narrow(0, 0, rows), true);
    for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
      const int64_t m = std::min<int64_t>(kMaxRows, rows - r0);
      const Int8Args a{wp, sp, px.xq + r0 * px.Kp, px.dx + r0 * px.nb, yp + r0 * N, N, K, px.nb};
      const Int8Fn fn = kInt8I8[m];
      // Chunks of 64 outputs, a multiple of every tile width (as int4_mm).
      at::parallel_for(0, (N + 63) / 64, 4, [&](int64_t c0, int64_t c1) {
        fn(a, c0 * 64, std::min(N, c1 * 64));
      });
    }
  } else {
    const at::Tensor xf = x.narrow(0, 0, rows).to(at::kFloat).contiguous();
    const float* xp = xf.data_ptr<float>();
    for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
      const int64_t m = std::min<int64_t>(kMaxRows, rows - r0);
      const RowsFn fn = kRows[m];
      at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
        fn(xp + r0 * K, wp, sp, yp + r0 * N, N, K, n0, n1);
      });
    }
  }
  finish_rows(yp, y, rows, N);
  return y;
}


// ---- Decode attention over the paged KV cache -------------------------------------------
//
// Each decode row's query heads against its own context, read in place through its block table
// (no gathered copy of the context, which the eager path made and the compiled one re-read per
// head): per KV head, the keys and values are read once for the query heads that share them.
// A row's keys are taken in chunks of kAttnChunk (each chunk: its scores, their max, exp and sum,
// and the values weighted by them), and the chunks are merged in order. What a row computes
// depends only on that row (its query, context and length), never on the other rows or the
// number of threads: a row's output is bit-identical alone, in a batch, or as a speculative
// verification row.

typedef int v8i __attribute__((vector_size(32)));
typedef float v8fu __attribute__((vector_size(32), aligned(4)));
typedef unsigned short v8us __attribute__((vector_size(16), aligned(2)));
typedef unsigned int v8ui __attribute__((vector_size(32)));

constexpr int64_t kAttnChunk = 256;
constexpr int64_t kAttnHeads = 3;  // query heads per pass over the values (their sums stay in registers)
constexpr int64_t kAttnInline = 4096;  // (keys x query heads) below which a call runs on its thread

inline v8f splat8(float x) { return v8f{x, x, x, x, x, x, x, x}; }

inline float hsum8v(v8f v) {
  // A fixed tree: halves, quarters, pairs.
  const float a = (v[0] + v[4]) + (v[2] + v[6]);
  const float b = (v[1] + v[5]) + (v[3] + v[7]);
  return a + b;
}

template <typename KT>
inline v8f kv8(const KT* p) {
  if constexpr (std::is_same_v<KT, float>) {
    return *reinterpret_cast<const v8fu*>(p);
  } else {  // bfloat16: the top half of a float
    const v8ui u = __builtin_convertvector(*reinterpret_cast<const v8us*>(p), v8ui) << 16;
    v8f f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
}

// e^x for x <= 0 (a score minus its chunk's max), Cephes' expf: x = n ln2 + r, e^r by a degree-6
// polynomial, 2^n in the exponent bits. Below -87 (e^x under float's normal range) it is 0.
inline v8f exp8(v8f x) {
  const v8i tiny = x < splat8(-87.0f);
  x = tiny ? splat8(-87.0f) : x;
  const v8f fx = x * 1.44269504088896341f + 0.5f;
  v8f t = __builtin_convertvector(__builtin_convertvector(fx, v8i), v8f);
  t = t > fx ? t - 1.0f : t;  // floor
  x = x - t * 0.693359375f + t * 2.12194440e-4f;
  v8f y = splat8(1.9875691500e-4f);
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * (x * x) + x + 1.0f;
  const v8i bits = (__builtin_convertvector(t, v8i) + 127) << 23;
  v8f p2;
  std::memcpy(&p2, &bits, sizeof p2);
  return tiny ? splat8(0.0f) : y * p2;
}


struct AttnArgs {
  const float* q;         // (rows, heads, D), already scaled (attn_chunk)
  const uint16_t* qb;     // (rows, heads, D) bfloat16, unscaled (attn_chunk_dpbf16)
  float scale;
  const void* k;          // (slots, kv_heads, D): the cache's K half
  const void* v;          // (slots, kv_heads, D)
  const int64_t* tables;  // row r's table at tables + r * table_stride
  int64_t table_stride, block_size, heads, kv_heads, D;
  float* part;            // per task: g maxima, g sums, g x D weighted values
};

// The cache slot (offset of its head 0, in elements) of each key of row r in [t0, t1), block by
// block (no division per key), at slots[0..n); then `pad` more copies of the last one (read
// ahead, never used).
inline void chunk_slots(const AttnArgs& a, int64_t r, int64_t t0, int64_t t1, int64_t pad, int64_t* slots) {
  const int64_t* table = a.tables + r * a.table_stride;
  const int64_t slot = a.kv_heads * a.D;
  for (int64_t t = t0; t < t1;) {
    const int64_t blk = t / a.block_size, off = t % a.block_size;
    const int64_t stop = std::min(t1, t + a.block_size - off);
    const int64_t base = (table[blk] * a.block_size + off) * slot;
    for (int64_t u = t; u < stop; ++u) slots[u - t0] = base + (u - t) * slot;
    t = stop;
  }
  for (int64_t t = t1 - t0; t < t1 - t0 + pad; ++t) slots[t] = slots[t1 - t0 - 1];
}

// The chunk's softmax for one query head: its n scores at sj (then zeros up to a multiple of 8)
// become exp(score - max); *m gets the max, the return value the sum.
inline float chunk_softmax(float* sj, int64_t n, float* m_out) {
  float m = sj[0];
  for (int64_t t = 1; t < n; ++t) m = std::max(m, sj[t]);
  v8f sum = splat8(0.0f);
  for (int64_t t = 0; t < n; t += 8) {
    v8f p = exp8(*reinterpret_cast<const v8fu*>(sj + t) - m);
    if (t + 8 > n) {
      for (int64_t l = n - t; l < 8; ++l) p[l] = 0.0f;
    }
    *reinterpret_cast<v8fu*>(sj + t) = p;
    sum += p;
  }
  *m_out = m;
  return hsum8v(sum);
}

// One chunk [t0, t1) of row r's keys for KV head h: the partial softmax of its g query heads.
// Each query head in turn keeps its query (scores) or its weighted sum (values) in registers
// while it runs over the chunk's keys: the chunk's K and V come from memory once and then from
// the cache for the other heads of the group.
// KV heads [h0, h1) of row r over keys [t0, t1): per head, out + (h - h0) * (2 g + g D) gets its
// g query heads' maxima, sums and weighted values. Keys are read in memory order (a slot's heads
// are contiguous) with the next ones prefetched: the cache of a long batch is far larger than
// the weights (48 rows x 300 keys: 330 MB a SmolLM2 step) and comes from memory in random blocks.
template <typename KT>
void attn_chunk(const AttnArgs& a, int64_t r, int64_t h0, int64_t h1, int64_t t0, int64_t t1, float* out) {
  constexpr int64_t CB = 8;  // vectors of 8 dims held in registers per pass (64 dims)
  constexpr int64_t kAhead = 6;  // keys prefetched ahead
  const int64_t g = a.heads / a.kv_heads, D = a.D, nv = D / 8, n = t1 - t0, nh = h1 - h0;
  const int64_t stride = 2 * g + g * D;
  const int64_t row_bytes = nh * D * static_cast<int64_t>(sizeof(KT));
  thread_local std::vector<float> sbuf;
  sbuf.resize(nh * g * kAttnChunk);
  float* s = sbuf.data();  // score of (head h - h0, query j) and key t at s[((h - h0) * g + j) * kAttnChunk + t]
  // Each key's slot (head 0) in the K / V halves.
  int64_t rowsbuf[kAttnChunk + kAhead];
  chunk_slots(a, r, t0, t1, kAhead, rowsbuf);
  const KT* kb = static_cast<const KT*>(a.k);
  const KT* vb = static_cast<const KT*>(a.v);
  auto prefetch = [&](const KT* base, int64_t t) {
    const char* p = reinterpret_cast<const char*>(base + rowsbuf[t] + h0 * D);
    for (int64_t o = 0; o < row_bytes; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
  };
  for (int64_t t = 0; t < std::min(n, kAhead); ++t) prefetch(kb, t);
  // Scores: each key's slice converted once for its g query heads (the same operations per
  // (head, key) whatever the order).
  for (int64_t c0 = 0; c0 < nv; c0 += CB) {
    const int64_t cn = std::min(CB, nv - c0);
    for (int64_t t = 0; t < n; ++t) {
      if (c0 == 0) prefetch(kb, t + kAhead);
      for (int64_t h = h0; h < h1; ++h) {
        const KT* kp = kb + rowsbuf[t] + h * D + 8 * c0;
        const float* q = a.q + (r * a.heads + h * g) * D;
        v8f kr[CB];
        for (int64_t c = 0; c < cn; ++c) kr[c] = kv8<KT>(kp + 8 * c);
        for (int64_t j = 0; j < g; ++j) {
          const float* qj = q + j * D + 8 * c0;
          v8f acc = splat8(0.0f);
          for (int64_t c = 0; c < cn; ++c) acc += *reinterpret_cast<const v8fu*>(qj + 8 * c) * kr[c];
          const float part = hsum8v(acc);
          float* sj = s + ((h - h0) * g + j) * kAttnChunk;
          sj[t] = c0 == 0 ? part : sj[t] + part;
        }
      }
    }
  }
  for (int64_t t = 0; t < std::min(n, kAhead); ++t) prefetch(vb, t);
  for (int64_t h = h0; h < h1; ++h) {
    float* o = out + (h - h0) * stride;
    float* maxima = o;
    float* sums = o + g;
    float* acc = o + 2 * g;
    float* sh = s + (h - h0) * g * kAttnChunk;
    for (int64_t j = 0; j < g; ++j) sums[j] = chunk_softmax(sh + j * kAttnChunk, n, maxima + j);
    // Weighted values: each value's slice converted once for up to kAttnHeads heads at a time
    // (the first head's pass prefetches the slots of all heads of the task).
    for (int64_t j0 = 0; j0 < g; j0 += kAttnHeads) {
      const int64_t gn = std::min<int64_t>(kAttnHeads, g - j0);
      for (int64_t c0 = 0; c0 < nv; c0 += CB) {
        const int64_t cn = std::min(CB, nv - c0);
        v8f ar[kAttnHeads][CB];
        for (int64_t jj = 0; jj < gn; ++jj)
          for (int64_t c = 0; c < cn; ++c) ar[jj][c] = splat8(0.0f);
        for (int64_t t = 0; t < n; ++t) {
          if (h == h0 && j0 == 0 && c0 == 0) prefetch(vb, t + kAhead);
          const KT* vp = vb + rowsbuf[t] + h * D + 8 * c0;
          v8f vr[CB];
          for (int64_t c = 0; c < cn; ++c) vr[c] = kv8<KT>(vp + 8 * c);
          for (int64_t jj = 0; jj < gn; ++jj) {
            const v8f p = splat8(sh[(j0 + jj) * kAttnChunk + t]);
            for (int64_t c = 0; c < cn; ++c) ar[jj][c] += p * vr[c];
          }
        }
        for (int64_t jj = 0; jj < gn; ++jj)
          for (int64_t c = 0; c < cn; ++c) *reinterpret_cast<v8fu*>(acc + (j0 + jj) * D + 8 * (c0 + c)) = ar[jj][c];
      }
    }
  }
}

#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512VL__)
#define PAGEDLM_ATTN_DPBF16 1
// attn_chunk for a bfloat16 query over a bfloat16 cache, head size a multiple of 32, with
// AVX512-BF16: a score is the query's and the key's bfloat16 pairs multiplied exactly and summed
// in float32 by vdpbf16ps (no conversion of the keys), times the scale; four keys' sums reduced
// together (one shuffle tree for four instead of a horizontal sum each). The values are weighted
// in float32 16 dims at a time. The same per-(row, key) operations whatever the batch: rows stay
// bit-identical alone or batched. Measured on an AMX Xeon (2 threads, 48 rows x 180 keys,
// benchmarks/bench_attention.py): see docs/benchmarks.md.
inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  // Each key's 16 lanes summed by the same tree whatever its position: within 128-bit lanes by
  // unpacks, then across them.
  const __m512 b0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 b1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  const __m512 c = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(b0), _mm512_castps_pd(b1))),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(b0), _mm512_castps_pd(b1))));
  const __m256 d = _mm256_add_ps(_mm512_castps512_ps256(c), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(c), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(d), _mm256_extractf128_ps(d, 1));
}

inline v16f bf16x16(const uint16_t* p) {
  v16us h;
  std::memcpy(&h, p, sizeof h);
  const v16ui u = __builtin_convertvector(h, v16ui) << 16;
  v16f f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

void attn_chunk_dpbf16(const AttnArgs& a, int64_t r, int64_t h0, int64_t h1, int64_t t0, int64_t t1, float* out) {
  constexpr int64_t kAhead = 6;  // keys prefetched ahead
  constexpr int64_t CB = 4;      // vectors of 16 dims held in registers per pass over the values
  const int64_t g = a.heads / a.kv_heads, D = a.D, nc = D / 32, nv = D / 16, n = t1 - t0, nh = h1 - h0;
  const int64_t stride = 2 * g + g * D;
  const int64_t row_bytes = nh * D * 2;
  thread_local std::vector<float> sbuf;
  sbuf.resize(nh * g * kAttnChunk);
  float* s = sbuf.data();  // as in attn_chunk
  int64_t rowsbuf[kAttnChunk + kAhead + 4];  // + the 4-key groups' reads past the end
  chunk_slots(a, r, t0, t1, kAhead + 4, rowsbuf);
  const uint16_t* kb = static_cast<const uint16_t*>(a.k);
  const uint16_t* vb = static_cast<const uint16_t*>(a.v);
  auto prefetch = [&](const uint16_t* base, int64_t t) {
    const char* p = reinterpret_cast<const char*>(base + rowsbuf[t] + h0 * D);
    for (int64_t o = 0; o < row_bytes; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
  };
  for (int64_t t = 0; t < std::min(n, kAhead); ++t) prefetch(kb, t);
  const __m128 sc = _mm_set1_ps(a.scale);
  for (int64_t t = 0; t < n; t += 4) {
    for (int64_t u = t; u < t + 4; ++u) prefetch(kb, u + kAhead);
    for (int64_t h = h0; h < h1; ++h) {
      const uint16_t* k0 = kb + rowsbuf[t] + h * D;
      const uint16_t* k1 = kb + rowsbuf[t + 1] + h * D;
      const uint16_t* k2 = kb + rowsbuf[t + 2] + h * D;
      const uint16_t* k3 = kb + rowsbuf[t + 3] + h * D;
      const uint16_t* q = a.qb + (r * a.heads + h * g) * D;
      for (int64_t j = 0; j < g; ++j) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t c = 0; c < nc; ++c) {
          const __m512bh qv = (__m512bh)_mm512_loadu_si512(q + j * D + 32 * c);
          a0 = _mm512_dpbf16_ps(a0, qv, (__m512bh)_mm512_loadu_si512(k0 + 32 * c));
          a1 = _mm512_dpbf16_ps(a1, qv, (__m512bh)_mm512_loadu_si512(k1 + 32 * c));
          a2 = _mm512_dpbf16_ps(a2, qv, (__m512bh)_mm512_loadu_si512(k2 + 32 * c));
          a3 = _mm512_dpbf16_ps(a3, qv, (__m512bh)_mm512_loadu_si512(k3 + 32 * c));
        }
        // Up to 3 lanes past the chunk's end land in the score buffer's slack (never read).
        _mm_storeu_ps(s + ((h - h0) * g + j) * kAttnChunk + t, _mm_mul_ps(reduce4(a0, a1, a2, a3), sc));
      }
    }
  }
  for (int64_t t = 0; t < std::min(n, kAhead); ++t) prefetch(vb, t);
  for (int64_t h = h0; h < h1; ++h) {
    float* o = out + (h - h0) * stride;
    float* maxima = o;
    float* sums = o + g;
    float* acc = o + 2 * g;
    float* sh = s + (h - h0) * g * kAttnChunk;
    for (int64_t j = 0; j < g; ++j) sums[j] = chunk_softmax(sh + j * kAttnChunk, n, maxima + j);
    for (int64_t j0 = 0; j0 < g; j0 += kAttnHeads) {
      const int64_t gn = std::min<int64_t>(kAttnHeads, g - j0);
      for (int64_t c0 = 0; c0 < nv; c0 += CB) {
        const int64_t cn = std::min(CB, nv - c0);
        v16f ar[kAttnHeads][CB];
        for (int64_t jj = 0; jj < gn; ++jj)
          for (int64_t c = 0; c < cn; ++c) ar[jj][c] = v16f{};
        for (int64_t t = 0; t < n; ++t) {
          if (h == h0 && j0 == 0 && c0 == 0) prefetch(vb, t + kAhead);
          const uint16_t* vp = vb + rowsbuf[t] + h * D + 16 * c0;
          v16f vr[CB];
          for (int64_t c = 0; c < cn; ++c) vr[c] = bf16x16(vp + 16 * c);
          for (int64_t jj = 0; jj < gn; ++jj) {
            const float pj = sh[(j0 + jj) * kAttnChunk + t];
            for (int64_t c = 0; c < cn; ++c) ar[jj][c] += pj * vr[c];
          }
        }
        for (int64_t jj = 0; jj < gn; ++jj)
          for (int64_t c = 0; c < cn; ++c) std::memcpy(acc + (j0 + jj) * D + 16 * (c0 + c), &ar[jj][c], sizeof(v16f));
      }
    }
  }
}
#endif

// q (rows, heads, D) float32 / bfloat16 / float16; kv_cache (2, blocks, block_size, kv_heads, D)
// float32 or bfloat16; block_tables (rows, width) int64 (rows may be strided); context_lens (rows,)
// int64, each >= 1, keys [0, len) visible (the last window of them when window > 0).
// -> (rows, heads, D) in q's dtype. The cache's slots past a row's length are never read.
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_tables,
                           const at::Tensor& context_lens, double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && kv_cache.dim() == 5 && kv_cache.size(0) == 2, "paged_attention: q ", q.sizes(),
              ", kv_cache ", kv_cache.sizes());
  const int64_t all_rows = q.size(0), rows = live_rows(all_rows), heads = q.size(1), D = q.size(2),
                kvh = kv_cache.size(3);
  TORCH_CHECK(kv_cache.size(4) == D && D % 8 == 0 && kvh > 0 && heads % kvh == 0,
              "paged_attention: head size ", D, " (a multiple of 8) and ", heads, " heads over ", kvh,
              " KV heads");
  TORCH_CHECK(kv_cache.scalar_type() == at::kFloat || kv_cache.scalar_type() == at::kBFloat16,
              "paged_attention: float32 or bfloat16 cache expected, got ", kv_cache.scalar_type());
  TORCH_CHECK(kv_cache.is_contiguous(), "paged_attention: a contiguous cache expected");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == all_rows && block_tables.stride(1) == 1 &&
              block_tables.scalar_type() == at::kLong, "paged_attention: int64 block tables (rows, width) "
              "with unit column stride expected");
  const at::Tensor lens = context_lens.scalar_type() == at::kLong && context_lens.is_contiguous()
                              ? context_lens : context_lens.to(at::kLong).contiguous();
  TORCH_CHECK(lens.numel() == all_rows, "paged_attention: ", all_rows, " rows but ", lens.numel(), " lengths");
  const bool bf16 = kv_cache.scalar_type() == at::kBFloat16;
  // q in float32, times the scale (as `q.to(float32) * scale` rounds it), in this thread's buffer;
  // or, for attn_chunk_dpbf16, q itself.
  thread_local std::vector<float> qbuf, partbuf;
  const at::Tensor qc = (rows == all_rows ? q : q.narrow(0, 0, rows)).contiguous();
#if defined(PAGEDLM_ATTN_DPBF16)
  const bool dpbf16 = bf16 && qc.scalar_type() == at::kBFloat16 && D % 32 == 0;
#else
  const bool dpbf16 = false;
#endif
  qbuf.resize(dpbf16 ? 0 : rows * heads * D);
  if (!dpbf16) {
    const float sc = static_cast<float>(scale);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qc.scalar_type(), "paged_attention_q", [&] {
      const scalar_t* qp = qc.data_ptr<scalar_t>();
      for (int64_t i = 0; i < rows * heads * D; ++i) qbuf[i] = static_cast<float>(qp[i]) * sc;
    });
  }
  const int64_t g = heads / kvh, bs = kv_cache.size(2), width = block_tables.size(1);
  const int64_t* lp = lens.data_ptr<int64_t>();
  // Tasks: (row, chunk, kv head); a row's chunks follow its length only.
  std::vector<int64_t> first(rows + 1, 0), lo(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t len = lp[r];
    TORCH_CHECK(len >= 1 && (len + bs - 1) / bs <= width, "paged_attention: row ", r, " has length ", len,
                " for a table of ", width, " blocks of ", bs);
    lo[r] = window > 0 ? std::max<int64_t>(0, len - window) : 0;
    first[r + 1] = first[r] + (len - lo[r] + kAttnChunk - 1) / kAttnChunk;
  }
  const int64_t stride = 2 * g + g * D;
  // Every row in one chunk (decode at contexts up to kAttnChunk): each task writes its heads'
  // outputs itself, with the merge's operations for one chunk (weight exp(0) = 1).
  const bool single = first[rows] == rows;
  partbuf.resize(single ? 0 : first[rows] * kvh * stride);
  at::Tensor out = at::empty({all_rows, heads, D}, q.options());
  zero_padding(out, rows);
  float* op = float_rows(out, rows, heads * D);
  const int64_t half = kv_cache.stride(0);
  const char* base = static_cast<const char*>(kv_cache.data_ptr());
  const AttnArgs a{qbuf.data(), dpbf16 ? static_cast<const uint16_t*>(qc.data_ptr()) : nullptr,
                   static_cast<float>(scale), base, base + half * kv_cache.element_size(),
                   block_tables.data_ptr<int64_t>(), block_tables.stride(0), bs, heads, kvh, D,
                   partbuf.data()};
  // Little work (a decode row at a short context) runs on this thread: a fork costs more.
  int64_t keys = 0;
  for (int64_t r = 0; r < rows; ++r) keys += lp[r] - lo[r];
  // Tasks: (row, chunk) with all its KV heads (their slots are contiguous) where there are enough
  // of them for the threads, else (row, chunk, KV head).
  const int64_t hs = first[rows] >= 2 * at::get_num_threads() ? kvh : 1, per = kvh / hs;
  const int64_t ntasks = first[rows] * per;
  // Each thread a run of tasks of about equal keys (rows' lengths differ: equal counts of tasks
  // left one thread waiting on the other), or all on this thread when the work is small.
  std::vector<int64_t> cum(ntasks + 1, 0);
  for (int64_t i = 0; i < ntasks; ++i) {
    const int64_t task = i / per;
    const int64_t r = std::upper_bound(first.begin(), first.end(), task) - first.begin() - 1;
    const int64_t t0 = lo[r] + (task - first[r]) * kAttnChunk;
    cum[i + 1] = cum[i] + std::min(lp[r], t0 + kAttnChunk) - t0 + 16;  // + a task's fixed cost
  }
  const int64_t parts = keys * heads < kAttnInline ? 1 : std::min<int64_t>(at::get_num_threads(), ntasks);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    const int64_t i0 = std::lower_bound(cum.begin(), cum.end(), cum[ntasks] * p0 / parts) - cum.begin();
    const int64_t i1 = std::lower_bound(cum.begin(), cum.end(), cum[ntasks] * p1 / parts) - cum.begin();
    std::vector<float> scratch(single ? hs * stride : 0);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t task = i / per, h0 = i % per * hs;
      const int64_t r = std::upper_bound(first.begin(), first.end(), task) - first.begin() - 1;
      const int64_t t0 = lo[r] + (task - first[r]) * kAttnChunk, t1 = std::min(lp[r], t0 + kAttnChunk);
      float* o = single ? scratch.data() : a.part + (task * kvh + h0) * stride;
      if (dpbf16) {
#if defined(PAGEDLM_ATTN_DPBF16)
        attn_chunk_dpbf16(a, r, h0, h0 + hs, t0, t1, o);
#endif
      } else if (bf16) {
        attn_chunk<uint16_t>(a, r, h0, h0 + hs, t0, t1, o);
      } else {
        attn_chunk<float>(a, r, h0, h0 + hs, t0, t1, o);
      }
      if (single) {
        for (int64_t h = h0; h < h0 + hs; ++h) {
          const float* oh = o + (h - h0) * stride;
          for (int64_t j = 0; j < g; ++j) {
            const float l = 0.0f + 1.0f * oh[g + j];
            float* dst = op + (r * heads + h * g + j) * D;
            for (int64_t d = 0; d < D; ++d) dst[d] = (0.0f + 1.0f * oh[2 * g + j * D + d]) / l;
          }
        }
      }
    }
  });
  if (single) {
    finish_rows(op, out, rows, heads * D);
    return out;
  }
  // Merge each row's chunks in order.
  at::parallel_for(0, rows * kvh, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> w(64);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / kvh, h = i % kvh, nc = first[r + 1] - first[r];
      for (int64_t j = 0; j < g; ++j) {
        float m = -INFINITY;
        for (int64_t c = 0; c < nc; ++c) m = std::max(m, a.part[((first[r] + c) * kvh + h) * stride + j]);
        float l = 0.0f;
        if (static_cast<int64_t>(w.size()) < nc) w.resize(nc);
        for (int64_t c = 0; c < nc; ++c) {
          const float* pc = a.part + ((first[r] + c) * kvh + h) * stride;
          w[c] = std::exp(pc[j] - m);
          l += w[c] * pc[g + j];
        }
        float* dst = op + (r * heads + h * g + j) * D;
        for (int64_t d = 0; d < D; ++d) {
          float x = 0.0f;
          for (int64_t c = 0; c < nc; ++c) x += w[c] * a.part[((first[r] + c) * kvh + h) * stride + 2 * g + j * D + d];
          dst[d] = x / l;
        }
      }
    }
  });
  finish_rows(op, out, rows, heads * D);
  return out;
}

// ---- Fused elementwise ops for eager prefill ------------------------------------------------
// A prefill chunk runs eagerly (its shapes vary), and each of torch's elementwise ops is a pass
// over memory: SmolLM2's RMSNorm is ~8 of them, rope ~8. These do one pass each and compute in
// float32 throughout,
// rounding once when they store, as inductor's fused code does in the compiled decode steps.
// Vectors of 16 floats (GCC's vector extensions: AVX-512 registers, or two AVX2 ones).

// x (rows, D), w (D): x / sqrt(mean(x^2) + eps) * (offset + w).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, double offset) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && w.size(0) == x.size(1) && w.scalar_type() == x.scalar_type(),
              "rms_norm: x (rows, D) and w (D) of x's dtype expected, got ", x.sizes(), " ", x.scalar_type(),
              " and ", w.sizes(), " ", w.scalar_type());
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t rows = xc.size(0), D = xc.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* wp = wc.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    std::vector<float> wf((D + 15) / 16 * 16, 0.f);
    for (int64_t k = 0; k < D; ++k) wf[k] = static_cast<float>(wp[k]) + static_cast<float>(offset);
    at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* xr = xp + r * D;
        scalar_t* yr = yp + r * D;
        v16f acc = v16f{};
        for (int64_t k = 0; k < D; k += 16) {
          const v16f v = ld16n(xr + k, std::min<int64_t>(16, D - k));
          acc += v * v;
        }
        float ss = 0.f;
        for (int j = 0; j < 16; ++j) ss += acc[j];
        const float rstd = 1.0f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
        for (int64_t k = 0; k < D; k += 16) {
          v16f wv;
          std::memcpy(&wv, wf.data() + k, sizeof wv);
          const int64_t n = std::min<int64_t>(16, D - k);
          st16n(yr + k, ld16n(xr + k, n) * rstd * wv, n);
        }
      }
    });
  });
  return y;
}

// q (tokens, Hq, D) and k (tokens, Hk, D), any strides with a unit last one (views of the QKV
// projection); cos, sin (tokens, D / 2): each (x_i, x_{i + D/2}) rotated ("rotate half"), into
// new contiguous tensors.
std::tuple<at::Tensor, at::Tensor> rope_qk(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                           const at::Tensor& sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.size(0) == k.size(0) && q.size(2) == k.size(2) &&
              q.size(2) % 2 == 0 && q.stride(2) == 1 && k.stride(2) == 1 && q.scalar_type() == k.scalar_type(),
              "rope_qk: q (tokens, Hq, D) and k (tokens, Hk, D) with unit last strides expected, got ", q.sizes(),
              " and ", k.sizes());
  const int64_t T = q.size(0), D = q.size(2), half = D / 2;
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == T && cos.size(1) == half && sin.sizes() == cos.sizes() &&
              cos.scalar_type() == q.scalar_type() && sin.scalar_type() == q.scalar_type(),
              "rope_qk: cos and sin (tokens, D / 2) of q's dtype expected, got ", cos.sizes());
  const at::Tensor cc = cos.contiguous(), sc = sin.contiguous();
  at::Tensor qo = at::empty(q.sizes(), q.options()), ko = at::empty(k.sizes(), k.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rope_qk", [&] {
    at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* cp = cc.data_ptr<scalar_t>() + t * half;
        const scalar_t* sp = sc.data_ptr<scalar_t>() + t * half;
        for (int which = 0; which < 2; ++which) {
          const at::Tensor& src = which ? k : q;
          const at::Tensor& dst = which ? ko : qo;
          for (int64_t h = 0; h < src.size(1); ++h) {
            const scalar_t* x = src.data_ptr<scalar_t>() + t * src.stride(0) + h * src.stride(1);
            scalar_t* o = dst.data_ptr<scalar_t>() + (t * src.size(1) + h) * D;
            for (int64_t i = 0; i < half; i += 16) {
              const int64_t n = std::min<int64_t>(16, half - i);
              const v16f c = ld16n(cp + i, n), s = ld16n(sp + i, n), x1 = ld16n(x + i, n);
              const v16f x2 = ld16n(x + half + i, n);
              st16n(o + i, x1 * c - x2 * s, n);
              st16n(o + half + i, x2 * c + x1 * s, n);
            }
          }
        }
      }
    });
  });
  return {qo, ko};
}

std::string isa() { return kIsa; }

// Whether many rows of int4 go through the tile unit (built with AMX and granted by the OS).
bool amx() {
#if defined(PAGEDLM_AMX)
  return amx_enabled();
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(pagedlm, m) {
  m.def("int8_mm(Tensor x, Tensor w, Tensor scale, bool int8_act) -> Tensor");
  m.def("int4_mm(Tensor x, Tensor codes, Tensor scale, Tensor mins, bool int8_act, int n) -> Tensor");
  m.def("paged_attention(Tensor q, Tensor kv_cache, Tensor block_tables, Tensor context_lens, float scale, "
        "int window) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps, float offset) -> Tensor");
  m.def("rope_qk(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
  m.def("isa() -> str");
  m.def("amx() -> bool");
  m.def("set_row_limit(int n) -> int");
}

TORCH_LIBRARY_IMPL(pagedlm, CPU, m) {
  m.impl("int8_mm", &int8_mm);
  m.impl("int4_mm", &int4_mm);
  m.impl("paged_attention", &paged_attention);
  m.impl("rms_norm", &rms_norm);
  m.impl("rope_qk", &rope_qk);
}

TORCH_LIBRARY_IMPL(pagedlm, CompositeExplicitAutograd, m) {
  m.impl("isa", &isa);
  m.impl("amx", &amx);
  m.impl("set_row_limit", &set_row_limit);
}
