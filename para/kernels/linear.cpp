// para::linear: y = x W^T (* scale) (+ bias) for a few rows of x, reading W once.
//
// A decoding step multiplies 1 to 8 rows by every weight matrix, so it costs what reading the
// weights costs. This kernel streams each weight row once from memory and uses it for all rows
// of x, converting bfloat16 or int8 weights to float32 in registers (x and the sums stay
// float32); several weight rows share each load of x: from 2 rows of x on (3 for bfloat16 pairs)
// as many as fit the registers (tile_rows), for one row as many as the caller measured fastest
// (`tile`). Built on first use by para/kernels/__init__.py with -march=native, so the AVX-512
// path is taken where the CPU has it; elsewhere the compiler vectorises the plain loop (omp simd).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// Weight element -> float: float32 as is, bfloat16 is float32's upper half, int8 by value.
inline float to_float(float w) { return w; }
inline float to_float(at::BFloat16 w) {
  uint32_t bits = uint32_t(w.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float to_float(int8_t w) { return float(w); }

// A tile: R weight rows (consecutive, K apart) against M rows of x. Loops over a tile are unrolled:
// GCC keeps an array of sums in registers only then (otherwise it stored every sum at every step,
// 2.5x slower at 8 rows of x).
#define UNROLL _Pragma("GCC unroll 32")

// Weight rows in a tile, by rows of x (of type X), from 2 rows of x on: R * M sums, R weight
// blocks and one block of x fit in the 32 vector registers. Two bfloat16 rows of x take one
// weight row (measured: 24 against 18 GB/s with tiles of 4, AMD EPYC). For one row of x the
// caller says (`tile`: 1, 2 or 4), as measured on its machine and weights (para/kernels/__init__.py):
// on the Intel Xeon tiles of 2 float32 rows and 4 bfloat16 or int8 ones made a step's products
// 6-29% faster than 1, which had been chosen on the AMD EPYC.
template <int M, typename X>
constexpr int tile_rows() {
  static_assert(M >= 2, "one row of x takes the caller's tile");
  return M == 2 && std::is_same_v<X, at::BFloat16> ? 1 : M <= 4 ? 4 : 3;
}
// Sums per pair over alternate blocks, so that enough multiply-adds are in flight: a tile of one
// weight row and one row of x has only 1 (4 measured slower than 2); a larger tile has a sum per
// pair of rows in flight already.
template <int M, int R> constexpr int k_unroll() { return M == 1 && R == 1 ? 2 : 1; }

#if defined(__AVX512F__)
// 16 weights from p -> 16 floats; `mask` reads only the first bits of a row's tail.
inline __m512 load16(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 load16(const at::BFloat16* p, __mmask16 mask) {
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline __m512 load16(const int8_t* p, __mmask16 mask) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
}

// The next tile (the R * K weights after this one's), a block ahead for each block of this one
// read, into L2: the hardware prefetcher alone sees R streams and falls behind. Measured on an
// AMD EPYC (a step's products, float32): 8 rows of x 23-26 against 15-18 GB/s without it, and
// slower into L1 (T0) or two tiles ahead. For a single weight row only float32 gains (median
// 26.8 against 24.6 GB/s; int8 and bfloat16 lost 5-7%).
template <int R, int B, typename W>
inline void prefetch_next_tile(const W* w, int64_t K, int64_t k) {
  UNROLL for (int r = 0; r < R; r++) _mm_prefetch((const char*)(w + R * K + k * R + B * r), _MM_HINT_T1);
}

// out[r][m] = x[m] . w[r] for a tile, each weight row read once, front to back, and each block
// of x loaded once for all R weight rows (4 loads of x for 4 multiply-adds would bound it).
template <int M, int R, int U, typename W>
void dot_tile(const float* x, const W* w, int64_t K, float out[][M]) {
  __m512 sum[R][M][U];
  UNROLL for (int r = 0; r < R; r++)
    UNROLL for (int m = 0; m < M; m++)
      UNROLL for (int u = 0; u < U; u++) sum[r][m][u] = _mm512_setzero_ps();
  const __mmask16 all = 0xFFFF;
  int64_t k = 0;
  for (; k + 16 * U <= K; k += 16 * U)
    UNROLL for (int u = 0; u < U; u++) {
      if (R > 1 || std::is_same_v<W, float>) prefetch_next_tile<R, 16>(w, K, k + 16 * u);
      __m512 wk[R];
      UNROLL for (int r = 0; r < R; r++) wk[r] = load16(w + r * K + k + 16 * u, all);
      UNROLL for (int m = 0; m < M; m++) {
        __m512 xk = _mm512_loadu_ps(x + m * K + k + 16 * u);
        asm("" : "+v"(xk));  // in a register: GCC would load it again for each weight row
        UNROLL for (int r = 0; r < R; r++) sum[r][m][u] = _mm512_fmadd_ps(wk[r], xk, sum[r][m][u]);
      }
    }
  for (; k < K; k += 16) {  // the rest of the rows, the last block masked
    __mmask16 mask = K - k >= 16 ? all : __mmask16((1u << (K - k)) - 1);
    __m512 wk[R];
    UNROLL for (int r = 0; r < R; r++) wk[r] = load16(w + r * K + k, mask);
    UNROLL for (int m = 0; m < M; m++) {
      __m512 xk = _mm512_maskz_loadu_ps(mask, x + m * K + k);
      UNROLL for (int r = 0; r < R; r++) sum[r][m][0] = _mm512_fmadd_ps(wk[r], xk, sum[r][m][0]);
    }
  }
  UNROLL for (int r = 0; r < R; r++)
    UNROLL for (int m = 0; m < M; m++) {
      __m512 total = sum[r][m][0];
      UNROLL for (int u = 1; u < U; u++) total = _mm512_add_ps(total, sum[r][m][u]);
      out[r][m] = _mm512_reduce_add_ps(total);
    }
}
#else
template <int M, int R, int U, typename W>
void dot_tile(const float* x, const W* w, int64_t K, float out[][M]) {
  for (int r = 0; r < R; r++)
    for (int m = 0; m < M; m++) {
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)  // (a float sum is vectorised only where its order may change)
      for (int64_t k = 0; k < K; k++) sum += to_float(w[r * K + k]) * x[m * K + k];
      out[r][m] = sum;
    }
}
#endif

#if defined(__AVX512BF16__)
// bfloat16 rows of x times bfloat16 weights (a bfloat16 model): vdpbf16ps multiplies 32 pairs
// and adds them into 16 float32 sums, with no conversion of either side. A bfloat16 product is
// exact in float32, so this is float32 accumulation of the same terms, in another order.
template <int M, int R>
void dot_tile_bf16(const at::BFloat16* x, const at::BFloat16* w, int64_t K, float out[][M]) {
  __m512 sum[R][M];
  UNROLL for (int r = 0; r < R; r++)
    UNROLL for (int m = 0; m < M; m++) sum[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    if (R > 1) prefetch_next_tile<R, 32>(w, K, k);
    __m512bh wk[R];
    UNROLL for (int r = 0; r < R; r++) wk[r] = (__m512bh)_mm512_loadu_si512(w + r * K + k);
    UNROLL for (int m = 0; m < M; m++) {
      __m512bh xk = (__m512bh)_mm512_loadu_si512(x + m * K + k);
      asm("" : "+v"(xk));
      UNROLL for (int r = 0; r < R; r++) sum[r][m] = _mm512_dpbf16_ps(sum[r][m], wk[r], xk);
    }
  }
  if (k < K) {  // the rest of the rows, masked
    __mmask32 mask = __mmask32((1u << (K - k)) - 1);
    __m512bh wk[R];
    UNROLL for (int r = 0; r < R; r++) wk[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + r * K + k);
    UNROLL for (int m = 0; m < M; m++) {
      __m512bh xk = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k);
      UNROLL for (int r = 0; r < R; r++) sum[r][m] = _mm512_dpbf16_ps(sum[r][m], wk[r], xk);
    }
  }
  UNROLL for (int r = 0; r < R; r++)
    UNROLL for (int m = 0; m < M; m++) out[r][m] = _mm512_reduce_add_ps(sum[r][m]);
}
#endif

// out[r][m] = x[m] . w[r]: float32 rows of x (any weights), or bfloat16 rows times bfloat16 weights.
template <int M, int R, typename W>
inline void dot(const float* x, const W* w, int64_t K, float out[][M]) { dot_tile<M, R, k_unroll<M, R>()>(x, w, K, out); }
#if defined(__AVX512BF16__)
template <int M, int R>
inline void dot(const at::BFloat16* x, const at::BFloat16* w, int64_t K, float out[][M]) { dot_tile_bf16<M, R>(x, w, K, out); }
#endif

// y[m][n + r] = out[r][m] (* scale) (+ bias)
template <int M, int R>
inline void store(const float out[][M], const float* scale, const float* bias, float* y, int64_t n, int64_t N) {
  UNROLL for (int r = 0; r < R; r++)
    UNROLL for (int m = 0; m < M; m++) {
      float v = out[r][m];
      if (scale) v *= scale[n + r];
      if (bias) v += bias[n + r];
      y[m * N + n + r] = v;
    }
}

template <int M, int R, typename X, typename W>
void rows_times_weight(const X* x, const W* w, const float* scale, const float* bias, float* y,
                       int64_t N, int64_t K) {
  // Each thread takes a run of whole weight rows, at least ~64 KB of them, so a call's threads
  // start once and each streams its own contiguous part of W.
  int64_t grain = std::max<int64_t>(R, (1 << 16) / (K * int64_t(sizeof(W))));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    int64_t n = begin;
    for (; n + R <= end; n += R) {
      float out[R][M];
      dot<M, R>(x, w + n * K, K, out);
      store<M, R>(out, scale, bias, y, n, N);
    }
    for (; n < end; n++) {  // the last rows of the run, one at a time
      float out[1][M];
      dot<M, 1>(x, w + n * K, K, out);
      store<M, 1>(out, scale, bias, y, n, N);
    }
  });
}

template <typename X, typename W>
void dispatch_rows(int64_t M, int64_t tile, const X* x, const W* w, const float* scale, const float* bias,
                   float* y, int64_t N, int64_t K) {
  switch (M) {
    case 1:
      if (tile == 4) return rows_times_weight<1, 4>(x, w, scale, bias, y, N, K);
      if (tile == 2) return rows_times_weight<1, 2>(x, w, scale, bias, y, N, K);
      return rows_times_weight<1, 1>(x, w, scale, bias, y, N, K);
    case 2: return rows_times_weight<2, tile_rows<2, X>()>(x, w, scale, bias, y, N, K);
    case 3: return rows_times_weight<3, tile_rows<3, X>()>(x, w, scale, bias, y, N, K);
    case 4: return rows_times_weight<4, tile_rows<4, X>()>(x, w, scale, bias, y, N, K);
    case 5: return rows_times_weight<5, tile_rows<5, X>()>(x, w, scale, bias, y, N, K);
    case 6: return rows_times_weight<6, tile_rows<6, X>()>(x, w, scale, bias, y, N, K);
    case 7: return rows_times_weight<7, tile_rows<7, X>()>(x, w, scale, bias, y, N, K);
    default: return rows_times_weight<8, tile_rows<8, X>()>(x, w, scale, bias, y, N, K);
  }
}

// x (..., K) float32 or bfloat16; weight (N, K) float32, bfloat16 or int8; scale (N,) float32 for
// int8 weights (y = (x W^T) * scale); bias (N,) or none; tile: the weight rows read together for
// one row of x (1, 2 or 4). Returns (..., N) in x's dtype.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& scale,
                  const c10::optional<at::Tensor>& bias, int64_t tile) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "para::linear: weight must be a contiguous matrix");
  TORCH_CHECK(tile == 1 || tile == 2 || tile == 4, "para::linear: tile must be 1, 2 or 4, not ", tile);
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.size(-1) == K, "para::linear: x has ", x.size(-1), " features, weight ", K);
  const int64_t M = x.numel() / K;
  const bool is_float = x.scalar_type() == at::kFloat, is_bf16 = x.scalar_type() == at::kBFloat16;
  at::Tensor rows = x.reshape({M, K}).contiguous();
  if (!is_float && !is_bf16) rows = rows.to(at::kFloat);
#if defined(__AVX512BF16__)
  const bool bf16_pairs = is_bf16 && weight.scalar_type() == at::kBFloat16;  // dot_tile_bf16: x as it is
#else
  const bool bf16_pairs = false;
#endif
  // Other bfloat16 rows go in through a float32 buffer of this thread, and all bfloat16 rows come
  // out through one: two tensor conversions a call fewer than with torch (1.4 ms of a 20 ms step)
  thread_local std::vector<float> x_buffer, y_buffer;
  const float* x32 = is_bf16 ? nullptr : rows.data_ptr<float>();
  if (is_bf16 && !bf16_pairs) {
    x_buffer.resize(M * K);
    const at::BFloat16* in = rows.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < M * K; i++) x_buffer[i] = to_float(in[i]);
    x32 = x_buffer.data();
  }
  at::Tensor y = at::empty({M, N}, is_bf16 ? x.options() : rows.options());
  if (is_bf16) y_buffer.resize(M * N);
  float* y32 = is_bf16 ? y_buffer.data() : y.data_ptr<float>();
  at::Tensor scale32 = scale ? scale->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor bias32 = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* s = scale ? scale32.data_ptr<float>() : nullptr;
  const float* b = bias ? bias32.data_ptr<float>() : nullptr;
  for (int64_t m0 = 0; m0 < M; m0 += 8) {  // 8 rows of x per pass over W
    float* ym = y32 + m0 * N;
    int64_t m = std::min<int64_t>(8, M - m0);
    if (bf16_pairs) {
#if defined(__AVX512BF16__)
      dispatch_rows(m, tile, rows.data_ptr<at::BFloat16>() + m0 * K, weight.data_ptr<at::BFloat16>(), s, b, ym, N, K);
#endif
      continue;
    }
    const float* xm = x32 + m0 * K;
    switch (weight.scalar_type()) {
      case at::kFloat: dispatch_rows(m, tile, xm, weight.data_ptr<float>(), s, b, ym, N, K); break;
      case at::kBFloat16: dispatch_rows(m, tile, xm, weight.data_ptr<at::BFloat16>(), s, b, ym, N, K); break;
      case at::kChar: dispatch_rows(m, tile, xm, weight.data_ptr<int8_t>(), s, b, ym, N, K); break;
      default: TORCH_CHECK(false, "para::linear: weights of type ", weight.scalar_type(), " are not supported");
    }
  }
  if (is_bf16) {  // rounded to nearest even, as torch's conversion does
    at::BFloat16* out = y.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < M * N; i++) out[i] = at::BFloat16(y32[i]);
  }
  auto shape = x.sizes().vec();
  shape.back() = N;
  return y.view(shape).to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(para, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? scale=None, Tensor? bias=None, int tile=1) -> Tensor");
}

TORCH_LIBRARY_IMPL(para, CPU, m) { m.impl("linear", &linear); }
