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

// out[m][j] = x[m] . w[n + j] for M rows of x and N_TILE weight rows: M * N_TILE independent
// sums, so the multiply-adds never wait on each other's results.
template <int M, int N_TILE, typename W>
inline void fma_step(const float* x, const W* w, int64_t K, int64_t k, __mmask16 mask, __m512 sum[M][N_TILE]) {
  __m512 wk[N_TILE];
  for (int j = 0; j < N_TILE; j++) wk[j] = load16(w + j * K + k, mask);
  for (int m = 0; m < M; m++) {
    __m512 xk = _mm512_maskz_loadu_ps(mask, x + m * K + k);
    for (int j = 0; j < N_TILE; j++) sum[m][j] = _mm512_fmadd_ps(wk[j], xk, sum[m][j]);
  }
}

// out[m][j] = x[m] . w[n + j] for M rows of x and N_TILE weight rows: M * N_TILE independent
// sums, so the multiply-adds never wait on each other's results.
template <int M, int N_TILE, typename W>
void dot_tile(const float* x, const W* w, int64_t K, float out[M][N_TILE]) {
  __m512 sum[M][N_TILE];
  for (int m = 0; m < M; m++)
    for (int j = 0; j < N_TILE; j++) sum[m][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) fma_step<M, N_TILE>(x, w, K, k, __mmask16(0xFFFF), sum);
  if (k < K) fma_step<M, N_TILE>(x, w, K, k, __mmask16((1u << (K - k)) - 1), sum);  // a row's tail
  for (int m = 0; m < M; m++)
    for (int j = 0; j < N_TILE; j++) out[m][j] = _mm512_reduce_add_ps(sum[m][j]);
}
#else
template <int M, int N_TILE, typename W>
void dot_tile(const float* x, const W* w, int64_t K, float out[M][N_TILE]) {
  for (int m = 0; m < M; m++)
    for (int j = 0; j < N_TILE; j++) {
      float sum = 0.f;
      for (int64_t k = 0; k < K; k++) sum += to_float(w[j * K + k]) * x[m * K + k];
      out[m][j] = sum;
    }
}
#endif

// At most 16 sums in registers (of 32): 4 weight rows at a time for up to 4 rows of x, 2 for more.
template <int M> constexpr int n_tile() { return M <= 4 ? 4 : 2; }

template <int M, typename W>
void rows_times_weight(const float* x, const W* w, const float* scale, const float* bias, float* y,
                       int64_t N, int64_t K) {
  constexpr int T = n_tile<M>();
  // Each thread takes a run of whole tiles, at least ~64 KB of weights, so a call's threads
  // start once and each streams its own contiguous part of W.
  int64_t grain = std::max<int64_t>(1, (1 << 16) / (K * int64_t(sizeof(W)) * T));
  at::parallel_for(0, (N + T - 1) / T, grain, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; tile++) {
      int64_t n0 = tile * T;
      float out[M][T];
      if (n0 + T <= N) {
        dot_tile<M, T>(x, w + n0 * K, K, out);
      } else {  // the last rows of W, one at a time
        for (int64_t n = n0; n < N; n++) {
          float one[M][1];
          dot_tile<M, 1>(x, w + n * K, K, one);
          for (int m = 0; m < M; m++) out[m][n - n0] = one[m][0];
        }
      }
      for (int m = 0; m < M; m++)
        for (int j = 0; j < T && n0 + j < N; j++) {
          float v = out[m][j];
          if (scale) v *= scale[n0 + j];
          if (bias) v += bias[n0 + j];
          y[m * N + n0 + j] = v;
        }
    }
  });
}

template <typename W>
void dispatch_rows(int64_t M, const float* x, const W* w, const float* scale, const float* bias, float* y,
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
  at::Tensor rows = x.reshape({-1, K}).to(at::kFloat).contiguous();
  at::Tensor scale32 = scale ? scale->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor bias32 = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* s = scale ? scale32.data_ptr<float>() : nullptr;
  const float* b = bias ? bias32.data_ptr<float>() : nullptr;
  const int64_t M = rows.size(0);
  at::Tensor y = at::empty({M, N}, rows.options());
  for (int64_t m0 = 0; m0 < M; m0 += 8) {  // 8 rows of x per pass over W
    const float* xm = rows.data_ptr<float>() + m0 * K;
    float* ym = y.data_ptr<float>() + m0 * N;
    int64_t m = std::min<int64_t>(8, M - m0);
    switch (weight.scalar_type()) {
      case at::kFloat: dispatch_rows(m, xm, weight.data_ptr<float>(), s, b, ym, N, K); break;
      case at::kBFloat16: dispatch_rows(m, xm, weight.data_ptr<at::BFloat16>(), s, b, ym, N, K); break;
      case at::kChar: dispatch_rows(m, xm, weight.data_ptr<int8_t>(), s, b, ym, N, K); break;
      default: TORCH_CHECK(false, "para::linear: weights of type ", weight.scalar_type(), " are not supported");
    }
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
