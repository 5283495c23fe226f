// para::linear: y = x W^T (* scale) (+ bias) for a few rows of x, reading W once.
//
// A decoding step multiplies 1 to 8 rows by every weight matrix, so it costs what reading the
// weights costs. This kernel streams each weight row once from memory and uses it for all rows
// of x, converting bfloat16 or int8 weights to float32 in registers (x and the sums stay
// float32). Built on first use by para/kernels/__init__.py with -march=native, so the AVX-512
// path is taken where the CPU has it; elsewhere the plain loop is vectorised by the compiler.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
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

// out[m] = x[m] . w for M rows of x and one weight row w, read once, front to back (one stream
// per thread: measured faster than interleaving several weight rows). U sums per row of x, over
// alternate blocks of 16, so that M * U multiply-adds are in flight and none waits on another.
template <int M, int U, typename W>
void dot_row(const float* x, const W* w, int64_t K, float out[M]) {
  __m512 sum[M][U];
  for (int m = 0; m < M; m++)
    for (int u = 0; u < U; u++) sum[m][u] = _mm512_setzero_ps();
  const __mmask16 all = 0xFFFF;
  int64_t k = 0;
  for (; k + 16 * U <= K; k += 16 * U)
    for (int u = 0; u < U; u++) {
      __m512 wk = load16(w + k + 16 * u, all);
      for (int m = 0; m < M; m++) sum[m][u] = _mm512_fmadd_ps(wk, _mm512_loadu_ps(x + m * K + k + 16 * u), sum[m][u]);
    }
  for (; k < K; k += 16) {  // the rest of the row, the last block masked
    __mmask16 mask = K - k >= 16 ? all : __mmask16((1u << (K - k)) - 1);
    __m512 wk = load16(w + k, mask);
    for (int m = 0; m < M; m++) sum[m][0] = _mm512_fmadd_ps(wk, _mm512_maskz_loadu_ps(mask, x + m * K + k), sum[m][0]);
  }
  for (int m = 0; m < M; m++) {
    __m512 total = sum[m][0];
    for (int u = 1; u < U; u++) total = _mm512_add_ps(total, sum[m][u]);
    out[m] = _mm512_reduce_add_ps(total);
  }
}
#else
template <int M, int U, typename W>
void dot_row(const float* x, const W* w, int64_t K, float out[M]) {
  for (int m = 0; m < M; m++) {
    float sum = 0.f;
    for (int64_t k = 0; k < K; k++) sum += to_float(w[k]) * x[m * K + k];
    out[m] = sum;
  }
}
#endif

#if defined(__AVX512BF16__)
// bfloat16 rows of x times bfloat16 weights (a bfloat16 model): vdpbf16ps multiplies 32 pairs
// and adds them into 16 float32 sums, with no conversion of either side. A bfloat16 product is
// exact in float32, so this is float32 accumulation of the same terms, in another order.
template <int M>
void dot_row_bf16(const at::BFloat16* x, const at::BFloat16* w, int64_t K, float out[M]) {
  __m512 sum[M];
  for (int m = 0; m < M; m++) sum[m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wk = (__m512bh)_mm512_loadu_si512(w + k);
    for (int m = 0; m < M; m++) sum[m] = _mm512_dpbf16_ps(sum[m], wk, (__m512bh)_mm512_loadu_si512(x + m * K + k));
  }
  if (k < K) {  // the rest of the row, masked
    __mmask32 mask = __mmask32((1u << (K - k)) - 1);
    __m512bh wk = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + k);
    for (int m = 0; m < M; m++)
      sum[m] = _mm512_dpbf16_ps(sum[m], wk, (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k));
  }
  for (int m = 0; m < M; m++) out[m] = _mm512_reduce_add_ps(sum[m]);
}
#endif

// 2 sums per row of x in flight for up to 3 rows, 1 each from 4 rows on (4 for 1 row measured slower).
template <int M> constexpr int k_unroll() { return M <= 3 ? 2 : 1; }

// out[m] = x[m] . w: float32 rows of x (any weights), or bfloat16 rows times bfloat16 weights.
template <int M, typename W>
inline void dot(const float* x, const W* w, int64_t K, float out[M]) { dot_row<M, k_unroll<M>()>(x, w, K, out); }
#if defined(__AVX512BF16__)
template <int M>
inline void dot(const at::BFloat16* x, const at::BFloat16* w, int64_t K, float out[M]) { dot_row_bf16<M>(x, w, K, out); }
#endif

template <int M, typename X, typename W>
void rows_times_weight(const X* x, const W* w, const float* scale, const float* bias, float* y,
                       int64_t N, int64_t K) {
  // Each thread takes a run of whole weight rows, at least ~64 KB of them, so a call's threads
  // start once and each streams its own contiguous part of W.
  int64_t grain = std::max<int64_t>(1, (1 << 16) / (K * int64_t(sizeof(W))));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; n++) {
      float out[M];
      dot<M>(x, w + n * K, K, out);
      for (int m = 0; m < M; m++) {
        float v = out[m];
        if (scale) v *= scale[n];
        if (bias) v += bias[n];
        y[m * N + n] = v;
      }
    }
  });
}

template <typename X, typename W>
void dispatch_rows(int64_t M, const X* x, const W* w, const float* scale, const float* bias, float* y,
                   int64_t N, int64_t K) {
  switch (M) {
    case 1: return rows_times_weight<1>(x, w, scale, bias, y, N, K);
    case 2: return rows_times_weight<2>(x, w, scale, bias, y, N, K);
    case 3: return rows_times_weight<3>(x, w, scale, bias, y, N, K);
    case 4: return rows_times_weight<4>(x, w, scale, bias, y, N, K);
    case 5: return rows_times_weight<5>(x, w, scale, bias, y, N, K);
    case 6: return rows_times_weight<6>(x, w, scale, bias, y, N, K);
    case 7: return rows_times_weight<7>(x, w, scale, bias, y, N, K);
    default: return rows_times_weight<8>(x, w, scale, bias, y, N, K);
  }
}

// x (..., K) float32 or bfloat16; weight (N, K) float32, bfloat16 or int8; scale (N,) float32 for
// int8 weights (y = (x W^T) * scale); bias (N,) or none. Returns (..., N) in x's dtype.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& scale,
                  const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "para::linear: weight must be a contiguous matrix");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.size(-1) == K, "para::linear: x has ", x.size(-1), " features, weight ", K);
  const int64_t M = x.numel() / K;
  const bool is_float = x.scalar_type() == at::kFloat, is_bf16 = x.scalar_type() == at::kBFloat16;
  at::Tensor rows = x.reshape({M, K}).contiguous();
  if (!is_float && !is_bf16) rows = rows.to(at::kFloat);
#if defined(__AVX512BF16__)
  const bool bf16_pairs = is_bf16 && weight.scalar_type() == at::kBFloat16;  // dot_row_bf16: x as it is
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
      dispatch_rows(m, rows.data_ptr<at::BFloat16>() + m0 * K, weight.data_ptr<at::BFloat16>(), s, b, ym, N, K);
#endif
      continue;
    }
    const float* xm = x32 + m0 * K;
    switch (weight.scalar_type()) {
      case at::kFloat: dispatch_rows(m, xm, weight.data_ptr<float>(), s, b, ym, N, K); break;
      case at::kBFloat16: dispatch_rows(m, xm, weight.data_ptr<at::BFloat16>(), s, b, ym, N, K); break;
      case at::kChar: dispatch_rows(m, xm, weight.data_ptr<int8_t>(), s, b, ym, N, K); break;
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
  m.def("linear(Tensor x, Tensor weight, Tensor? scale=None, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(para, CPU, m) { m.impl("linear", &linear); }
