// para::decode_attention: one query a row against a KV cache, for a CPU decoding step.
//
// torch's CPU attention (its flash kernel) took 65-100 us a layer for one query of SmolLM2's
// 9 heads over 320 cached slots, most of it set-up for blocks that a single query does not
// need; reading the keys and values is about 16 us of that. This is the plain algorithm, with
// the same float32 arithmetic: scores = q . k * scale + mask, a softmax over the slots, and the
// weighted sum of the values. Grouped-query attention reads each KV head for its group of
// query heads. para/kernels/__init__.py builds it with linear.cpp; para/fast.py puts it in
// place of torch's attention in a compiled CPU decoding step.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// q . k over D features.
inline float dot(const float* q, const float* k, int64_t D) {
  int64_t d = 0;
  float sum = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; d + 16 <= D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(k + d), acc);
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; d < D; d++) sum += q[d] * k[d];
  return sum;
}

#if defined(__AVX512F__)
// e^x for 16 floats: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor polynomial to degree 7
// (relative error under 1e-8 there), times 2^n. Below -110 the result is 0, as e^x rounds to in
// float32, so a masked slot (-inf) weighs exactly 0. (glibc's vectorised expf needs -ffast-math.)
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-110.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 in two parts: r exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  for (float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 1.f / 2, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}
#endif

// scores[t] = e^(scores[t] - top); returns their sum.
inline float exp_shifted(float* scores, int64_t S, float top) {
  float total = 0.f;
  int64_t t = 0;
#if defined(__AVX512F__)
  __m512 sum = _mm512_setzero_ps();
  for (; t < S; t += 16) {  // the last block masked
    const __mmask16 mask = S - t >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (S - t)) - 1);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, scores + t), _mm512_set1_ps(top)));
    _mm512_mask_storeu_ps(scores + t, mask, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mask, e));
  }
  total = _mm512_reduce_add_ps(sum);
#endif
  for (; t < S; t++) {
    scores[t] = std::exp(scores[t] - top);  // a masked slot: exp(-inf) = 0
    total += scores[t];
  }
  return total;
}

// out += p * v over D features.
inline void add_scaled(float* out, float p, const float* v, int64_t D) {
  for (int64_t d = 0; d < D; d++) out[d] += p * v[d];  // vectorised by the compiler
}

// q (B, H, 1, D); k, v (B, H_kv, S, D); mask (B, 1, 1, S), boolean (true: attend) or added to
// the scores (0 or -inf), or none. Returns (B, H, 1, D). All float32.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1, "para::decode_attention: one query a row");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "para::decode_attention: float32 only");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), H_kv = k.size(1), S = k.size(2);
  TORCH_CHECK(H % H_kv == 0 && k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D,
              "para::decode_attention: keys and values must be (B, H_kv, S, D) with H a multiple of H_kv");
  at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  at::Tensor m;
  if (mask) {  // a boolean mask keeps the slots marked true
    m = mask->scalar_type() == at::kBool ? at::where(*mask, 0.f, -std::numeric_limits<float>::infinity())
                                         : mask->to(at::kFloat);
    m = m.expand({B, 1, 1, S}).contiguous();
  }
  at::Tensor out = at::empty({B, H, 1, D}, q.options());
  const float *qp = qc.data_ptr<float>(), *kp = kc.data_ptr<float>(), *vp = vc.data_ptr<float>();
  const float* mp = mask ? m.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const float s = float(scale);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(S);
    for (int64_t bh = begin; bh < end; bh++) {
      const int64_t b = bh / H, g = (bh % H) / (H / H_kv);  // the row, and the KV head of this query head
      const float* query = qp + bh * D;
      const float* keys = kp + (b * H_kv + g) * S * D;
      const float* values = vp + (b * H_kv + g) * S * D;
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < S; t++) {
        scores[t] = dot(query, keys + t * D, D) * s + (mp ? mp[b * S + t] : 0.f);
        top = std::max(top, scores[t]);
      }
      const float total = exp_shifted(scores.data(), S, top);
      float* o = op + bh * D;
      std::fill(o, o + D, 0.f);
      for (int64_t t = 0; t < S; t++)
        if (scores[t] != 0.f) add_scaled(o, scores[t], values + t * D, D);
      for (int64_t d = 0; d < D; d++) o[d] /= total;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(para, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(para, CPU, m) { m.impl("decode_attention", &decode_attention); }
