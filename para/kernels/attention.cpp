// para::decode_attention: one query a row against a KV cache, for a CPU decoding step.
//
// torch's CPU attention (its flash kernel) took 65-100 us a layer for one query of SmolLM2's
// 9 heads over 320 cached slots, most of it set-up for blocks that a single query does not
// need. This is the plain algorithm, with the same float32 arithmetic: scores = q . k * scale +
// mask, a softmax over the slots, and the weighted sum of the values. Its cost is reading the
// keys and values (from L2 or memory), so the query heads that share a KV head (grouped-query
// attention) go together, each key and value read once for up to 4, 2 or 1 of them (64, 128 or
// 256 features: as many queries as 16 registers hold), with the sums in registers. 8 rows of
// SmolLM2, against reading them once per query head with the sums in memory: 65 against 114 us
// a layer with the cache in L2; compiled steps, the cache coming from memory, 32.7 against 34.2
// ms (Intel Xeon, 2 threads, alternating in one process).
// para/kernels/__init__.py builds it with linear.cpp; para/fast.py puts it in place of torch's
// attention in a compiled CPU decoding step.

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

#define UNROLL _Pragma("GCC unroll 32")

// q . k over D features.
inline float dot(const float* q, const float* k, int64_t D) {
  int64_t d = 0;
  float sum = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; d + 16 <= D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(k + d), acc);
  sum = _mm512_reduce_add_ps(acc);
#endif
#pragma omp simd reduction(+ : sum)  // (a float sum is vectorised only where its order may change)
  for (int64_t i = d; i < D; i++) sum += q[i] * k[i];
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
#pragma omp simd reduction(+ : total)  // (the sum in vector lanes, as in dot)
  for (int64_t i = t; i < S; i++) {
    scores[i] = std::exp(scores[i] - top);  // a masked slot: exp(-inf) = 0
    total += scores[i];
  }
  return total;
}

// out += p * v over D features.
inline void add_scaled(float* out, float p, const float* v, int64_t D) {
  for (int64_t d = 0; d < D; d++) out[d] += p * v[d];  // vectorised by the compiler
}

#if defined(__AVX512F__)
// C query heads of one KV group against its keys and values, D = 16 * NB features: each key and
// value is read once for the C heads (attention reads the cache from L2 or memory, a few bytes per
// multiply-add), the queries are held in registers for the scores, the weighted sums of the values
// for the output.
template <int NB, int C>
void attend_heads(const float* query, const float* keys, const float* values, const float* mask, int64_t S,
                  float scale, float* scores, float* o) {
  constexpr int D = 16 * NB;
  __m512 qv[C][NB];
  UNROLL for (int c = 0; c < C; c++) UNROLL for (int j = 0; j < NB; j++) qv[c][j] = _mm512_loadu_ps(query + c * D + 16 * j);
  for (int64_t t = 0; t < S; t++) {
    __m512 sum[C];
    UNROLL for (int c = 0; c < C; c++) sum[c] = _mm512_setzero_ps();
    UNROLL for (int j = 0; j < NB; j++) {
      const __m512 key = _mm512_loadu_ps(keys + t * D + 16 * j);
      UNROLL for (int c = 0; c < C; c++) sum[c] = _mm512_fmadd_ps(qv[c][j], key, sum[c]);
    }
    const float added = mask ? mask[t] : 0.f;
    UNROLL for (int c = 0; c < C; c++) scores[c * S + t] = _mm512_reduce_add_ps(sum[c]) * scale + added;
  }
  float total[C];
  UNROLL for (int c = 0; c < C; c++) {
    __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t t = 0; t < S; t += 16) {
      const __mmask16 tail = S - t >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (S - t)) - 1);
      top = _mm512_mask_max_ps(top, tail, top, _mm512_maskz_loadu_ps(tail, scores + c * S + t));
    }
    total[c] = exp_shifted(scores + c * S, S, _mm512_reduce_max_ps(top));
  }
  __m512 out[C][NB];
  UNROLL for (int c = 0; c < C; c++) UNROLL for (int j = 0; j < NB; j++) out[c][j] = _mm512_setzero_ps();
  for (int64_t t = 0; t < S; t++) {
    bool weighed = false;  // a slot of weight 0 (masked) is skipped: what it holds is never read
    UNROLL for (int c = 0; c < C; c++) weighed |= scores[c * S + t] != 0.f;
    if (!weighed) continue;
    __m512 p[C];
    UNROLL for (int c = 0; c < C; c++) p[c] = _mm512_set1_ps(scores[c * S + t]);
    UNROLL for (int j = 0; j < NB; j++) {
      const __m512 value = _mm512_loadu_ps(values + t * D + 16 * j);
      UNROLL for (int c = 0; c < C; c++) out[c][j] = _mm512_fmadd_ps(p[c], value, out[c][j]);
    }
  }
  UNROLL for (int c = 0; c < C; c++) {
    const __m512 inverse = _mm512_set1_ps(1.f / total[c]);
    UNROLL for (int j = 0; j < NB; j++) _mm512_storeu_ps(o + c * D + 16 * j, _mm512_mul_ps(out[c][j], inverse));
  }
}

// attend_heads for c <= C heads (C known when compiling, c not).
template <int NB, int C>
void attend_heads_upto(int64_t c, const float* query, const float* keys, const float* values, const float* mask,
                       int64_t S, float scale, float* scores, float* o) {
  if constexpr (C > 1)
    if (c < C) return attend_heads_upto<NB, C - 1>(c, query, keys, values, mask, S, scale, scores, o);
  attend_heads<NB, C>(query, keys, values, mask, S, scale, scores, o);
}

// Query heads of one KV head, as many at a time as have their queries fit in 16 registers (at most 4).
template <int NB>
void attend_group(const float* query, const float* keys, const float* values, const float* mask, int64_t S,
                  int64_t heads, float scale, float* scores, float* o) {
  constexpr int D = 16 * NB, MOST = 16 / NB < 4 ? 16 / NB : 4;
  for (int64_t h = 0; h < heads;) {
    const int64_t c = std::min<int64_t>(MOST, heads - h);
    attend_heads_upto<NB, MOST>(c, query + h * D, keys, values, mask, S, scale, scores, o + h * D);
    h += c;
  }
}
#endif

// The same for any D, with the sums in memory.
void attend_head_any(const float* query, const float* keys, const float* values, const float* mask, int64_t S,
                     int64_t D, float scale, float* scores, float* o) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < S; t++) {
    scores[t] = dot(query, keys + t * D, D) * scale + (mask ? mask[t] : 0.f);
    top = std::max(top, scores[t]);
  }
  const float total = exp_shifted(scores, S, top);
  std::fill(o, o + D, 0.f);
  for (int64_t t = 0; t < S; t++)
    if (scores[t] != 0.f) add_scaled(o, scores[t], values + t * D, D);
  for (int64_t d = 0; d < D; d++) o[d] /= total;
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
  if (out.numel() == 0) return out;  // no rows or no heads (and no groups to share the work)
  const float *qp = qc.data_ptr<float>(), *kp = kc.data_ptr<float>(), *vp = vc.data_ptr<float>();
  const float* mp = mask ? m.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const float s = float(scale);
  // Work a thread takes: the query heads of one KV head in one row, each key and value read once for
  // them; where there are few such groups for the threads, parts of a group, so that the threads
  // finish together (one row of SmolLM2 has 3 groups of 3 heads: whole groups on 2 threads made
  // steps 0.7 ms slower; one row of Gemma 3 270M has a single group of 4).
  const int64_t G = H / H_kv, groups = B * H_kv;
  const int64_t parts = std::min<int64_t>(G, (4 * at::get_num_threads() + groups - 1) / groups), part = (G + parts - 1) / parts;
  at::parallel_for(0, groups * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(G * S);
    for (int64_t item = begin; item < end; item++) {
      const int64_t bg = item / parts, first = item % parts * part, heads = std::min(part, G - first);  // row b, KV head g
      if (heads <= 0) continue;
      const float* keys = kp + bg * S * D;
      const float* values = vp + bg * S * D;
      const float* row_mask = mp ? mp + bg / H_kv * S : nullptr;
      const float* query = qp + (bg * G + first) * D;
      float* o = op + (bg * G + first) * D;
      switch (D) {
#if defined(__AVX512F__)
        case 64: attend_group<4>(query, keys, values, row_mask, S, heads, s, scores.data(), o); continue;
        case 128: attend_group<8>(query, keys, values, row_mask, S, heads, s, scores.data(), o); continue;
        case 256: attend_group<16>(query, keys, values, row_mask, S, heads, s, scores.data(), o); continue;
#endif
      }
      for (int64_t h = 0; h < heads; h++)
        attend_head_any(query + h * D, keys, values, row_mask, S, D, s, scores.data(), o + h * D);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(para, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(para, CPU, m) { m.impl("decode_attention", &decode_attention); }
