// One decode step of the k15 transformer on CPU in float32, as an XLA FFI handler.
//
// XLA's CPU backend runs a decode step of a small model as dozens of separate kernels (each matmul, norm,
// rotary, cache write and softmax its own dispatch), and its matmuls with one row per slot run well below
// the machine's matmul rate. This handler does the whole step in one call: register-blocked matmuls over the
// fused weights, attention that reads each slot's cache only up to its own position, and the cache
// written in place (the cache inputs alias the cache outputs). It computes the same function as
// `k15.sampling.step.decode_step`; tests compare the two logit for logit.
//
// Arguments, in order (float32 unless noted; "packed" is `matmul`'s layout of a KxN weight, ceil(N/32) Kx32
// panels, stacked over layers as LxPxKx32):
//   tokens_B (int32), positions_B (int32), embed_VxD, attn_norm_LxD, qkv (packed, N = E = (n_heads + 2
//   n_kv_heads) head_dim), qkv_bias_LxE, o (packed, K = n_heads head_dim, N = D), mlp_norm_LxD, gate_up (packed,
//   N = 2F), down (packed, K = F), final_norm_D, head (packed PxDx32, N = V),
//   then L key caches BxKxHxS and L value caches BxKxSxH.
// Results: logits_BxV, then the L key caches and L value caches (aliasing the inputs).
// A slot whose position is outside [0, S) writes nothing and gets garbage logits (inactive slots).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// 16 floats: one AVX-512 register (two AVX2 registers elsewhere). v16u reads and writes any float address.
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4), may_alias));
typedef int32_t v16i __attribute__((vector_size(64)));

inline v16 load(const float* p) { return *reinterpret_cast<const v16u*>(p); }
inline void store(float* p, v16 v) { *reinterpret_cast<v16u*>(p) = v; }
inline v16 splat(float x) { return v16{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

// exp(x) for 16 lanes (Cephes expf: n = round(x / ln 2), a degree-5 polynomial of the remainder; ~1 ulp).
inline v16 vexp(v16 x) {
  const v16 big = splat(88.0f), small = splat(-87.3f);
  v16 xc = x > big ? big : x;
  xc = xc < small ? small : xc;
  v16 n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  v16 r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  v16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  v16i bits = (__builtin_convertvector(n, v16i) + 127) << 23;  // 2^n
  v16 y = p * __builtin_bit_cast(v16, bits);
  y = x > big ? splat(INFINITY) : y;
  return x < small ? splat(0.0f) : y;
}

float exp1(float x) {  // the same arithmetic for one value (loop tails)
  float lanes[16] = {x};
  store(lanes, vexp(load(lanes)));
  return lanes[0];
}

// C[MRx(16 NV)] (+)= A[MRxK] B[Kx(16 NV)] with leading dimensions; the accumulators stay in registers.
// Only the first `cols` columns are stored (the zero-padded last panel of a packed weight).
template <int MR, int NV>
void block(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t K, bool add,
           int64_t cols, const float* next = nullptr) {
  v16 c[MR][NV];
  const bool full = cols == 16 * NV;
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j) {
      if (add && full) {
        c[r][j] = load(C + r * ldc + 16 * j);
      } else {
        c[r][j] = splat(0.0f);
        for (int64_t i = 0; add && i < 16 && 16 * j + i < cols; ++i) c[r][j][i] = C[r * ldc + 16 * j + i];
      }
    }
  for (int64_t k = 0; k < K; ++k) {
    if (next) __builtin_prefetch(next + k * 16 * NV);  // one line per row: the slab after this one
    v16 b[NV];
    for (int j = 0; j < NV; ++j) b[j] = load(B + k * ldb + 16 * j);
    for (int r = 0; r < MR; ++r) {
      v16 a = splat(A[r * lda + k]);
      for (int j = 0; j < NV; ++j) c[r][j] += a * b[j];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j) {
      if (full) {
        store(C + r * ldc + 16 * j, c[r][j]);
      } else {
        for (int64_t i = 0; i < 16 && 16 * j + i < cols; ++i) C[r * ldc + 16 * j + i] = c[r][j][i];
      }
    }
}

// One 32-column slab: all M rows, in blocks of 8. `next`: the packed slab read after this one, fetched into
// the cache while the first block streams this one (the other blocks find this slab in the cache).
void slab(const float* A, int64_t lda, int64_t M, int64_t K, const float* B, int64_t ldb, float* C, int64_t ldc,
          bool add, int64_t cols, const float* next = nullptr) {
  int64_t m = 0;
  for (; m + 8 <= M; m += 8, next = nullptr) block<8, 2>(A + m * lda, lda, B, ldb, C + m * ldc, ldc, K, add, cols, next);
  const float* a = A + m * lda;
  float* c = C + m * ldc;
  switch (M - m) {
    case 7: block<7, 2>(a, lda, B, ldb, c, ldc, K, add, cols, next); break;
    case 6: block<6, 2>(a, lda, B, ldb, c, ldc, K, add, cols, next); break;
    case 5: block<5, 2>(a, lda, B, ldb, c, ldc, K, add, cols, next); break;
    case 4: block<4, 2>(a, lda, B, ldb, c, ldc, K, add, cols, next); break;
    case 3: block<3, 2>(a, lda, B, ldb, c, ldc, K, add, cols, next); break;
    case 2: block<2, 2>(a, lda, B, ldb, c, ldc, K, add, cols, next); break;
    case 1: block<1, 2>(a, lda, B, ldb, c, ldc, K, add, cols, next); break;
  }
}

// C[MxN] (+)= A[MxK] W[KxN], W packed as ceil(N/32) contiguous Kx32 panels (zero-padded), A and C row-major.
void matmul(const float* A, int64_t M, int64_t K, const float* W, int64_t N, float* C, bool add) {
  for (int64_t n = 0; n < N; n += 32) {
    const float* panel = W + (n / 32) * K * 32;
    slab(A, K, M, K, panel, 32, C + n, N, add, std::min<int64_t>(32, N - n), n + 32 < N ? panel + K * 32 : nullptr);
  }
}

// Columns [n, N) of C[MxN] = A[MxK] B[KxN] in slabs of 16 NV columns, while whole slabs fit within `limit`
// columns; returns the first column not done.
template <int NV>
int64_t slabs(const float* A, int64_t lda, int64_t M, int64_t K, const float* B, int64_t ldb, int64_t n, int64_t N,
              int64_t limit, float* C, int64_t ldc) {
  for (; n < N && n + 16 * NV <= limit; n += 16 * NV) {
    const int64_t cols = std::min<int64_t>(16 * NV, N - n);
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) block<2, NV>(A + m * lda, lda, B + n, ldb, C + m * ldc + n, ldc, K, false, cols);
    if (m < M) block<1, NV>(A + m * lda, lda, B + n, ldb, C + m * ldc + n, ldc, K, false, cols);
  }
  return n;
}

// C[MxN] = A[MxK] B[KxN] with row strides lda, ldb, ldc, for attention: A holds a few query heads (M is
// small), B a slot's keys (HxS) or values (SxH) in the cache. Wide slabs read long runs of each row of B;
// the last columns go 16 at a time (reading up to 15 columns past N when the row has them: never used).
void matmul_strided(const float* A, int64_t lda, int64_t M, int64_t K, const float* B, int64_t ldb, int64_t N,
                    float* C, int64_t ldc) {
  int64_t n = slabs<8>(A, lda, M, K, B, ldb, 0, N, N, C, ldc);
  n = slabs<1>(A, lda, M, K, B, ldb, n, N, ldb, C, ldc);
  for (int64_t m = 0; m < M; ++m)  // columns without a whole vector left in the row
    for (int64_t j = n; j < N; ++j) {
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) s += A[m * lda + k] * B[k * ldb + j];
      C[m * ldc + j] = s;
    }
}

// out = scale * x / rms(x), row by row (HF order: normalize, then scale).
void rms_norm(const float* x, int64_t B, int64_t D, const float* scale, float eps, float* out) {
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x + b * D;
    float ss = 0.0f;
    for (int64_t d = 0; d < D; ++d) ss += xb[d] * xb[d];
    float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
    for (int64_t d = 0; d < D; ++d) out[b * D + d] = scale[d] * (xb[d] * inv);
  }
}

// Rotary embedding in place on `heads` heads of size H (HF rotate_half layout).
void rotary(float* x, int64_t heads, int64_t H, const float* cos, const float* sin) {
  const int64_t h2 = H / 2;
  for (int64_t n = 0; n < heads; ++n) {
    float* xn = x + n * H;
    for (int64_t i = 0; i < h2; ++i) {
      float x1 = xn[i], x2 = xn[i + h2];
      xn[i] = x1 * cos[i] - x2 * sin[i];
      xn[i + h2] = x2 * cos[i] + x1 * sin[i];
    }
  }
}

// out_GxH = softmax(q_GxH k_HxS[:, :n] / sqrt(H)) v_SxH[:n]: the G query heads of one kv head over positions < n.
void attend(const float* q, int64_t G, int64_t H, const float* k, const float* v, int64_t S, int64_t n,
            float* scores, float* out) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));
  matmul_strided(q, H, G, H, k, S, n, scores, S);
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores + g * S;
    v16 mxv = splat(-INFINITY);
    int64_t s = 0;
    for (; s + 16 <= n; s += 16) {
      v16 x = load(sg + s) * scale;
      store(sg + s, x);
      mxv = x > mxv ? x : mxv;
    }
    float mx = -INFINITY;
    for (int i = 0; i < 16; ++i) mx = std::max(mx, mxv[i]);
    for (; s < n; ++s) mx = std::max(mx, sg[s] *= scale);
    v16 sumv = splat(0.0f);
    for (s = 0; s + 16 <= n; s += 16) {
      v16 e = vexp(load(sg + s) - mx);
      store(sg + s, e);
      sumv += e;
    }
    float sum = 0.0f;
    for (int i = 0; i < 16; ++i) sum += sumv[i];
    for (; s < n; ++s) sum += (sg[s] = exp1(sg[s] - mx));
    for (s = 0; s + 16 <= n; s += 16) store(sg + s, load(sg + s) / sum);
    for (; s < n; ++s) sg[s] /= sum;
  }
  matmul_strided(scores, S, G, n, v, H, H, out, H);
}

// Everything one step reads and writes; slots are independent, so any range of them can run on its own.
struct Step {
  const int32_t* tokens;
  const int32_t* positions;
  const float *embed, *attn_norm, *qkv, *qkv_bias, *o, *mlp_norm, *gate_up, *down, *final_norm, *head;
  std::vector<float*> k_caches, v_caches;
  float* logits;
  float eps, theta;
  int64_t L, V, D, N, KV, H, S, F;
};

inline int64_t padded(int64_t n) { return (n + 31) / 32 * 32; }  // columns of a packed weight

// The step for slots [b0, b1).
void run_slots(const Step& p, int64_t b0, int64_t b1) {
  const int64_t B = b1 - b0, D = p.D, N = p.N, KV = p.KV, H = p.H, S = p.S, F = p.F;
  const int64_t G = N / KV, NH = N * H, E = NH + 2 * KV * H;
  const int64_t qkv_l = D * padded(E), o_l = NH * padded(D), gu_l = D * padded(2 * F), down_l = F * padded(D);
  const int32_t* positions = p.positions + b0;
  std::vector<float> x(B * D), h(B * D), qkv(B * E), att(B * NH), gu(B * 2 * F), act(B * F), scores(G * S);
  std::vector<float> cos(B * H / 2), sin(B * H / 2);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t t = std::min<int64_t>(std::max<int32_t>(p.tokens[b0 + b], 0), p.V - 1);
    std::copy(p.embed + t * D, p.embed + (t + 1) * D, x.data() + b * D);
    for (int64_t i = 0; i < H / 2; ++i) {  // rotary angles as the model computes them, in float32
      const float inv_freq = 1.0f / std::pow(p.theta, static_cast<float>(2 * i) / static_cast<float>(H));
      const float angle = static_cast<float>(positions[b]) * inv_freq;
      cos[b * H / 2 + i] = std::cos(angle);
      sin[b * H / 2 + i] = std::sin(angle);
    }
  }
  for (int64_t l = 0; l < p.L; ++l) {
    rms_norm(x.data(), B, D, p.attn_norm + l * D, p.eps, h.data());
    matmul(h.data(), B, D, p.qkv + l * qkv_l, E, qkv.data(), false);
    for (int64_t b = 0; b < B; ++b) {
      float* row = qkv.data() + b * E;
      const float* bias = p.qkv_bias + l * E;
      for (int64_t e = 0; e < E; ++e) row[e] += bias[e];
      rotary(row, N + KV, H, cos.data() + b * H / 2, sin.data() + b * H / 2);  // q and k heads are adjacent
      const int64_t pos = positions[b];
      const bool active = pos >= 0 && pos < S;
      for (int64_t kv = 0; kv < KV; ++kv) {
        float* kb = p.k_caches[l] + ((b0 + b) * KV + kv) * H * S;
        float* vb = p.v_caches[l] + ((b0 + b) * KV + kv) * S * H;
        if (active) {
          for (int64_t i = 0; i < H; ++i) kb[i * S + pos] = row[NH + kv * H + i];
          std::copy(row + NH + KV * H + kv * H, row + NH + KV * H + (kv + 1) * H, vb + pos * H);
        }
        attend(row + kv * G * H, G, H, kb, vb, S, active ? pos + 1 : 1, scores.data(), att.data() + b * NH + kv * G * H);
      }
    }
    matmul(att.data(), B, NH, p.o + l * o_l, D, x.data(), true);
    rms_norm(x.data(), B, D, p.mlp_norm + l * D, p.eps, h.data());
    matmul(h.data(), B, D, p.gate_up + l * gu_l, 2 * F, gu.data(), false);
    for (int64_t b = 0; b < B; ++b) {  // silu(gate) * up
      const float* g = gu.data() + b * 2 * F;
      float* a = act.data() + b * F;
      int64_t f = 0;
      for (; f + 16 <= F; f += 16) {
        v16 gv = load(g + f);
        store(a + f, gv * (1.0f / (1.0f + vexp(-gv))) * load(g + F + f));
      }
      for (; f < F; ++f) a[f] = g[f] * (1.0f / (1.0f + exp1(-g[f]))) * g[F + f];
    }
    matmul(act.data(), B, F, p.down + l * down_l, D, x.data(), true);
  }
  rms_norm(x.data(), B, D, p.final_norm, p.eps, h.data());
  matmul(h.data(), B, D, p.head, p.V, p.logits + b0 * p.V, false);
}

// Slot ranges handed out to whoever asks: the calling thread and the pool tasks it schedules. The caller
// works too, and waits only for ranges other threads have taken (those are running, not queued), so it
// never blocks on a task stuck behind busy pool threads. Late tasks find nothing left and return.
struct Split {
  Step step;
  int64_t B, parts;
  std::atomic<int64_t> next{0}, done{0};

  void work() {
    for (int64_t i = next++; i < parts; i = next++) {
      run_slots(step, B * i / parts, B * (i + 1) / parts);
      ++done;
    }
  }
};

// At least this many slots per part: fewer would re-read every weight for too little work.
constexpr int64_t kMinSlotsPerPart = 4;

ffi::Error DecodeStep(ffi::ThreadPool pool, float eps, float theta, int64_t N, int64_t KV, int64_t threads,
                      ffi::RemainingArgs args, ffi::RemainingRets rets) {
  std::vector<ffi::AnyBuffer> in;
  for (size_t i = 0; i < args.size(); ++i) {
    auto a = args.get<ffi::AnyBuffer>(i);
    if (!a.has_value()) return a.error();
    in.push_back(*a);
  }
  std::vector<ffi::AnyBuffer> outs;
  for (size_t i = 0; i < rets.size(); ++i) {
    auto r = rets.get<ffi::AnyBuffer>(i);
    if (!r.has_value()) return r.error();
    outs.push_back(**r);
  }
  if (in.size() < 14 || (in.size() - 12) % 2 != 0 || outs.size() != in.size() - 11)
    return ffi::Error::InvalidArgument("k15 decode step: wrong number of arguments or results");
  for (size_t i = 2; i < in.size(); ++i)
    if (in[i].element_type() != ffi::F32)
      return ffi::Error::InvalidArgument("k15 decode step: weights and caches must be float32");
  auto f32 = [&](int i) { return reinterpret_cast<const float*>(in[i].untyped_data()); };
  auto job = std::make_shared<Split>();
  Step& p = job->step;
  p.L = (in.size() - 12) / 2;
  p.V = in[2].dimensions()[0], p.D = in[2].dimensions()[1];
  p.S = in[12].dimensions()[3], p.H = in[12].dimensions()[2];
  p.F = in[9].dimensions()[2], p.N = N, p.KV = KV, p.eps = eps, p.theta = theta;
  if (N % KV != 0 || p.H % 2 != 0 || in[5].dimensions()[1] != (N + 2 * KV) * p.H || in[6].dimensions()[2] != N * p.H ||
      in[11].dimensions()[1] != p.D)
    return ffi::Error::InvalidArgument("k15 decode step: weight shapes do not match the head counts");
  p.tokens = reinterpret_cast<const int32_t*>(in[0].untyped_data());
  p.positions = reinterpret_cast<const int32_t*>(in[1].untyped_data());
  p.embed = f32(2), p.attn_norm = f32(3), p.qkv = f32(4), p.qkv_bias = f32(5), p.o = f32(6), p.mlp_norm = f32(7);
  p.gate_up = f32(8), p.down = f32(9), p.final_norm = f32(10), p.head = f32(11);
  for (int64_t l = 0; l < p.L; ++l) {
    p.k_caches.push_back(reinterpret_cast<float*>(outs[1 + l].untyped_data()));
    p.v_caches.push_back(reinterpret_cast<float*>(outs[1 + p.L + l].untyped_data()));
  }
  p.logits = reinterpret_cast<float*>(outs[0].untyped_data());

  job->B = in[0].dimensions()[0];
  int64_t parts = std::min<int64_t>(pool.num_threads(), job->B / kMinSlotsPerPart);
  if (threads > 0) parts = std::min(parts, threads);
  job->parts = std::max<int64_t>(1, parts);
  for (int64_t i = 1; i < job->parts; ++i) pool.Schedule([job] { job->work(); });
  job->work();
  while (job->done.load() < job->parts) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(K15DecodeStepF32, DecodeStep,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<float>("eps")
                                  .Attr<float>("theta")
                                  .Attr<int64_t>("n_heads")
                                  .Attr<int64_t>("n_kv_heads")
                                  .Attr<int64_t>("threads")
                                  .RemainingArgs()
                                  .RemainingRets());
