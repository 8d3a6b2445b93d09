// One decode step of the k15 transformer on CPU in float32, as an XLA FFI handler.
//
// XLA's CPU backend runs a decode step of a small model as dozens of separate kernels (each matmul, norm,
// rotary, cache write and softmax its own dispatch), and its matmuls with one row per slot run well below
// the machine's matmul rate. This handler does the whole step in one call: register-blocked matmuls over the
// fused weights, attention that reads each slot's cache only up to its own position, and the cache
// written in place (the cache inputs alias the cache outputs). The threads of XLA's CPU pool share the work
// phase by phase (`PhasedStep`): matmuls split by columns, attention by slots. It computes the same function as
// `k15.sampling.step.decode_step`; tests compare the two logit for logit.
//
// Arguments, in order (float32 unless noted; "packed" is `slab`'s layout of a KxN weight, ceil(N/32) Kx32
// panels, stacked over layers as LxPxKx32):
//   tokens_B (int32), positions_B (int32), embed_VxD, attn_norm_LxD, qkv (packed, N = E = (n_heads + 2
//   n_kv_heads) head_dim), qkv_bias_LxE, o (packed, K = n_heads head_dim, N = D), mlp_norm_LxD, gate_up (gate
//   and up packed each, N = F, the up panels after the gate panels), down (packed, K = F), final_norm_D, head
//   (packed PxDx32, N = V), then L key caches BxKxHxS and L value caches BxKxSxH.
// Results: logits_BxV; per slot the first index of its largest logit (int32, V - 1 when a logit is NaN, as
// `select.first_argmax`), that logit and log sum exp(logits - it) (float32 each); then the L key caches and
// L value caches (aliasing the inputs). The sampling loop takes the greedy token and log-probs from these.
// A slot whose position is outside [0, S) writes nothing and gets garbage logits (inactive slots).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>
#ifdef K15_PHASE_TIMES
#include <chrono>
#include <mutex>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#ifdef K15_PHASE_TIMES
// A profiling build (benchmarks/decode_step.py): seconds each thread spends running and waiting in each
// kind of phase, summed over threads and calls until K15PhaseTimes reads and clears them.
constexpr int kPhaseKinds = 10;  // PhasedStep::Kind; native.PHASE_KINDS names them
std::mutex g_times_mutex;
double g_times[2 * kPhaseKinds + 1];  // (running, waiting) per kind, then the number of calls
using Clock = std::chrono::steady_clock;
inline double seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }
#endif

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

// Cache lines to fetch ahead of their use, a few per iteration of the loops that run meanwhile, so memory
// streams them while those loops compute (a burst of prefetches stalls the core instead). The lines are
// `runs` runs of `run` lines, `stride` floats apart: a packed weight panel is one run, a kv head's keys one
// run per dimension. `rate` lines per `per` iterations, issued every kTickEvery iterations: ticking every
// iteration cost a matmul block ~13% of its rate (the block also keeps its Ahead in registers, a local copy).
constexpr int64_t kTickEvery = 8;

struct Ahead {
  const float* p = nullptr;
  int64_t run = 0, stride = 0, left = 0, col = 0, rate = 0, per = 1, owed = 0;

  Ahead() = default;
  Ahead(const float* p, int64_t run, int64_t stride, int64_t runs, int64_t rate, int64_t per)
      : p(p), run(run), stride(stride), left(run * runs), rate(rate), per(per) {}
  void tick() {
    for (owed += rate * kTickEvery; owed >= per && left > 0; owed -= per) one();
  }
  void rest() {
    while (left > 0) one();
  }

 private:
  void one() {
    __builtin_prefetch(p + 16 * col, 0, 2);
    if (++col == run) col = 0, p += stride;
    --left;
  }
};

// C[MRx(16 NV)] (+)= A[MRxK] B[Kx(16 NV)] with leading dimensions; the accumulators stay in registers.
// Only the first `cols` columns are stored (the zero-padded last panel of a packed weight).
template <int MR, int NV>
void block(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t K, bool add,
           int64_t cols, Ahead* ahead = nullptr) {
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
  Ahead local = ahead ? *ahead : Ahead();
  for (int64_t k = 0; k < K; ++k) {
    if (k % kTickEvery == 0) local.tick();
    v16 b[NV];
    for (int j = 0; j < NV; ++j) b[j] = load(B + k * ldb + 16 * j);
    for (int r = 0; r < MR; ++r) {
      v16 a = splat(A[r * lda + k]);
      for (int j = 0; j < NV; ++j) c[r][j] += a * b[j];
    }
  }
  if (ahead) *ahead = local;
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j) {
      if (full) {
        store(C + r * ldc + 16 * j, c[r][j]);
      } else {
        for (int64_t i = 0; i < 16 && 16 * j + i < cols; ++i) C[r * ldc + 16 * j + i] = c[r][j][i];
      }
    }
}

// block<rows, 2> by its row count (1 to 12).
constexpr void (*kBlocks[])(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t, bool, int64_t,
                            Ahead*) = {nullptr,      block<1, 2>,  block<2, 2>,  block<3, 2>, block<4, 2>,
                                       block<5, 2>,  block<6, 2>,  block<7, 2>,  block<8, 2>, block<9, 2>,
                                       block<10, 2>, block<11, 2>, block<12, 2>};

// One 32-column slab: all M rows, in blocks of at most 12 rows of near-equal size (12 x 2 vectors of
// accumulators fit the 32 vector registers; fewer blocks read the slab fewer times). `next`: the packed slab
// read after this one (Kx32), fetched into the cache over all the blocks, so memory streams it while they
// compute on this one.
void slab(const float* A, int64_t lda, int64_t M, int64_t K, const float* B, int64_t ldb, float* C, int64_t ldc,
          bool add, int64_t cols, const float* next = nullptr) {
  const int64_t blocks = (M + 11) / 12;
  Ahead ahead(next, 2 * K, 0, next ? 1 : 0, 2 * K, blocks * K);
  Ahead* a_ = next ? &ahead : nullptr;
  for (int64_t j = 0, m = 0; j < blocks; ++j) {
    const int64_t rows = M / blocks + (j < M % blocks ? 1 : 0);
    kBlocks[rows](A + m * lda, lda, B, ldb, C + m * ldc, ldc, K, add, cols, a_);
    m += rows;
  }
  if (a_) a_->rest();
}

// Columns [n, N) of C[MxN] = A[MxK] B[KxN] in slabs of 16 NV columns, while whole slabs fit within `limit`
// columns; returns the first column not done.
template <int NV>
int64_t slabs(const float* A, int64_t lda, int64_t M, int64_t K, const float* B, int64_t ldb, int64_t n, int64_t N,
              int64_t limit, float* C, int64_t ldc, Ahead* ahead) {
  for (; n < N && n + 16 * NV <= limit; n += 16 * NV) {
    const int64_t cols = std::min<int64_t>(16 * NV, N - n);
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) block<2, NV>(A + m * lda, lda, B + n, ldb, C + m * ldc + n, ldc, K, false, cols, ahead);
    if (m < M) block<1, NV>(A + m * lda, lda, B + n, ldb, C + m * ldc + n, ldc, K, false, cols, ahead);
  }
  return n;
}

// C[MxN] = A[MxK] B[KxN] with row strides lda, ldb, ldc, for attention: A holds a few query heads (M is
// small), B a slot's keys (HxS) or values (SxH) in the cache. Wide slabs read long runs of each row of B;
// the last columns go 16 at a time (reading up to 15 columns past N when the row has them: never used).
void matmul_strided(const float* A, int64_t lda, int64_t M, int64_t K, const float* B, int64_t ldb, int64_t N,
                    float* C, int64_t ldc, Ahead* ahead) {
  int64_t n = slabs<8>(A, lda, M, K, B, ldb, 0, N, N, C, ldc, ahead);
  n = slabs<1>(A, lda, M, K, B, ldb, n, N, ldb, C, ldc, ahead);
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
// `keys` and `values`: the next kv head's cache, fetched while the score and value products run.
void attend(const float* q, int64_t G, int64_t H, const float* k, const float* v, int64_t S, int64_t n,
            float* scores, float* out, Ahead& keys, Ahead& values) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));
  matmul_strided(q, H, G, H, k, S, n, scores, S, &keys);
  keys.rest();
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
  matmul_strided(scores, S, G, n, v, H, H, out, H, &values);
  values.rest();
}

// The first index of x[:V]'s largest value (V - 1 if any is NaN), that value, and log sum exp(x - it), in
// `k15.models.logprobs_of`'s order of operations (shift by the max, sum the exps, then the log).
void logit_stats(const float* x, int64_t V, int32_t* argmax, float* max_out, float* lse_out) {
  v16 mxv = splat(-INFINITY);
  v16i nans = {};
  int64_t v = 0;
  for (; v + 16 <= V; v += 16) {
    v16 a = load(x + v);
    nans |= a != a;
    mxv = a > mxv ? a : mxv;
  }
  float mx = -INFINITY;
  bool nan = false;
  for (int i = 0; i < 16; ++i) mx = std::max(mx, mxv[i]), nan |= nans[i] != 0;
  for (; v < V; ++v) {
    nan |= x[v] != x[v];
    mx = std::max(mx, x[v]);
  }
  if (nan) {
    *argmax = static_cast<int32_t>(V - 1), *max_out = NAN, *lse_out = NAN;
    return;
  }
  int64_t at = 0;
  while (at < V - 1 && x[at] != mx) ++at;
  v16 sumv = splat(0.0f);
  for (v = 0; v + 16 <= V; v += 16) sumv += vexp(load(x + v) - mx);
  float sum = 0.0f;
  for (int i = 0; i < 16; ++i) sum += sumv[i];
  for (; v < V; ++v) sum += exp1(x[v] - mx);
  *argmax = static_cast<int32_t>(at), *max_out = mx, *lse_out = std::log(sum);
}

// Everything one step reads and writes.
struct Step {
  const int32_t* tokens;
  const int32_t* positions;
  const float *embed, *attn_norm, *qkv, *qkv_bias, *o, *mlp_norm, *gate_up, *down, *final_norm, *head;
  std::vector<float*> k_caches, v_caches;
  float* logits;
  int32_t* argmax;
  float *max, *lse;
  float eps, theta;
  int64_t B, L, V, D, N, KV, H, S, F;
};

inline int64_t padded(int64_t n) { return (n + 31) / 32 * 32; }  // columns of a packed weight

// A step as a sequence of phases, each a set of independent items (a few slots, or a few 32-column panels
// of a matmul over every slot) that any thread may take. A matmul split by columns reads each weight once
// per step, whichever thread runs it. Threads take items with an atomic counter and, at a phase's end,
// wait only for items already taken (those are running): the caller never waits on a pool task that has
// not started, and a task that starts late finds the early phases done and joins the current one.
class PhasedStep {
 public:
  explicit PhasedStep(const Step& p) : p_(p) {
    const int64_t B = p.B;
    x_.resize(B * p.D), h_.resize(B * p.D), qkv_.resize(B * E()), att_.resize(B * p.N * p.H), act_.resize(B * p.F);
    cos_.resize(B * p.H / 2), sin_.resize(B * p.H / 2);
    phases_ = 3 + 7 * p.L;
    counters_.reset(new Counter[phases_]);
  }

  void work() {
    Scratch scratch{std::vector<float>((p_.N / p_.KV) * p_.S), std::vector<float>(p_.B * 32),
                    std::vector<float>(p_.B * 32)};
#ifdef K15_PHASE_TIMES
    double times[2 * kPhaseKinds] = {};
#endif
    for (int64_t ph = 0; ph < phases_; ++ph) {
      Counter& c = counters_[ph];
      const int64_t n = items(ph);
#ifdef K15_PHASE_TIMES
      const int k = kind(ph);
      const auto start = Clock::now();
#endif
      // Each thread claims its next item before running the current one, so the current one can prefetch
      // the next one's weights.
      for (int64_t i = c.next.fetch_add(1), j; i < n; i = j) {
        j = c.next.fetch_add(1);
        run(ph, i, j < n ? j : -1, scratch);
        c.done.fetch_add(1, std::memory_order_release);
      }
#ifdef K15_PHASE_TIMES
      const auto ran = Clock::now();
#endif
      for (int spins = 0; c.done.load(std::memory_order_acquire) < n; ++spins) {
        if (spins > 4096) std::this_thread::yield();  // the other threads may not be running
#if defined(__x86_64__)
        else __builtin_ia32_pause();
#endif
      }
#ifdef K15_PHASE_TIMES
      times[2 * k] += seconds(start, ran), times[2 * k + 1] += seconds(ran, Clock::now());
#endif
    }
#ifdef K15_PHASE_TIMES
    std::lock_guard<std::mutex> lock(g_times_mutex);
    for (int i = 0; i < 2 * kPhaseKinds; ++i) g_times[i] += times[i];
#endif
  }

 private:
  struct alignas(64) Counter {
    std::atomic<int64_t> next{0};
    alignas(64) std::atomic<int64_t> done{0};
  };
  struct Scratch {  // per thread
    std::vector<float> scores, gate, up;
  };
  static constexpr int64_t kSlotsPerItem = 2, kPanelsPerItem = 2;

  int64_t E() const { return (p_.N + 2 * p_.KV) * p_.H; }
  static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
  int64_t panel_items(int64_t cols) const { return ceil_div(ceil_div(cols, 32), kPanelsPerItem); }

  // Phase ph: 0 embeds; then per layer 7 phases (qkv, attention, o, norm, gate_up, down, norm); then the head;
  // last the logits' stats. kind(ph) numbers them in that order, 0 to 9 (the layer's phases 1 to 7).
  enum Kind { kEmbed, kQkv, kAttention, kO, kMlpNorm, kGateUp, kDown, kNorm, kHead, kStats };
  Kind kind(int64_t ph) const {
    if (ph == 0) return kEmbed;
    if (ph == phases_ - 2) return kHead;
    if (ph == phases_ - 1) return kStats;
    return static_cast<Kind>(1 + (ph - 1) % 7);
  }

  int64_t items(int64_t ph) const {
    switch (kind(ph)) {
      case kQkv: return panel_items(E());
      case kO: case kDown: return panel_items(p_.D);
      case kGateUp: return panel_items(p_.F);
      case kHead: return panel_items(p_.V);
      default: return ceil_div(p_.B, kSlotsPerItem);  // embedding, attention, norms, stats
    }
  }

  // Columns [32 kPanelsPerItem i, ...) of C[BxN] (+)= A[BxK] W, W packed; item `next` (-1: none) runs next.
  void matmul_item(int64_t i, int64_t next, const float* A, int64_t K, const float* W, int64_t N, float* C, bool add) {
    const int64_t n0 = i * kPanelsPerItem * 32, n1 = std::min(N, n0 + kPanelsPerItem * 32);
    for (int64_t n = n0; n < n1; n += 32) {
      const float* panel = W + (n / 32) * K * 32;
      const float* after = n + 32 < n1 ? panel + K * 32 : next >= 0 ? W + next * kPanelsPerItem * K * 32 : nullptr;
      slab(A, K, p_.B, K, panel, 32, C + n, N, add, std::min<int64_t>(32, N - n), after);
    }
  }

  void run(int64_t ph, int64_t i, int64_t next, Scratch& scratch) {
    float* scores = scratch.scores.data();
    const Step& p = p_;
    const int64_t D = p.D, N = p.N, KV = p.KV, H = p.H, S = p.S, F = p.F, B = p.B;
    const int64_t G = N / KV, NH = N * H, E = this->E();
    const int64_t b0 = i * kSlotsPerItem, b1 = std::min(B, b0 + kSlotsPerItem);
    if (ph == 0) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t t = std::min<int64_t>(std::max<int32_t>(p.tokens[b], 0), p.V - 1);
        std::copy(p.embed + t * D, p.embed + (t + 1) * D, x_.data() + b * D);
        for (int64_t j = 0; j < H / 2; ++j) {  // rotary angles as the model computes them, in float32
          const float inv_freq = 1.0f / std::pow(p.theta, static_cast<float>(2 * j) / static_cast<float>(H));
          const float angle = static_cast<float>(p.positions[b]) * inv_freq;
          cos_[b * H / 2 + j] = std::cos(angle);
          sin_[b * H / 2 + j] = std::sin(angle);
        }
      }
      rms_norm(x_.data() + b0 * D, b1 - b0, D, p.attn_norm, p.eps, h_.data() + b0 * D);
      return;
    }
    if (ph == phases_ - 2) {
      matmul_item(i, next, h_.data(), D, p.head, p.V, p.logits, false);
      return;
    }
    if (ph == phases_ - 1) {
      for (int64_t b = b0; b < b1; ++b) logit_stats(p.logits + b * p.V, p.V, p.argmax + b, p.max + b, p.lse + b);
      return;
    }
    const int64_t l = (ph - 1) / 7;
    const int64_t qkv_l = D * padded(E), o_l = NH * padded(D), gu_l = 2 * D * padded(F), down_l = F * padded(D);
    switch ((ph - 1) % 7) {
      case 0: {  // qkv = h Wqkv + bias
        matmul_item(i, next, h_.data(), D, p.qkv + l * qkv_l, E, qkv_.data(), false);
        const int64_t n0 = i * kPanelsPerItem * 32, n1 = std::min(E, n0 + kPanelsPerItem * 32);
        const float* bias = p.qkv_bias + l * E;
        for (int64_t b = 0; b < B; ++b)
          for (int64_t e = n0; e < n1; ++e) qkv_[b * E + e] += bias[e];
        return;
      }
      case 1: {  // rotary, cache write and attention for the item's (slot, kv head) pairs
        // The hardware prefetchers do not follow the key rows' strided runs, and one kv head's cache is too
        // little to hide the latency: each pair's cache is fetched while the pair before it computes (the
        // item's first pair up front, unless the item before fetched it: one more prefetch of a line in
        // flight or in the cache costs next to nothing).
        Ahead keys, values;
        auto fetch = [&](int64_t b, int64_t kv) {  // spread over attend's loops: ~1.4 key and 1 value line each
          const int64_t pos = p.positions[b], n = pos >= 0 && pos < S ? pos + 1 : 0;
          keys = Ahead(p.k_caches[l] + (b * KV + kv) * H * S, (n + 15) / 16, S, n ? H : 0, 3, 2);
          values = Ahead(p.v_caches[l] + (b * KV + kv) * S * H, (n * H + 15) / 16, 0, n ? 1 : 0, 1, 1);
        };
        fetch(b0, 0);
        keys.rest(), values.rest();
        for (int64_t b = b0; b < b1; ++b) {
          float* row = qkv_.data() + b * E;
          rotary(row, N + KV, H, cos_.data() + b * H / 2, sin_.data() + b * H / 2);  // q and k heads are adjacent
          const int64_t pos = p.positions[b];
          const bool active = pos >= 0 && pos < S;
          for (int64_t kv = 0; kv < KV; ++kv) {
            float* kb = p.k_caches[l] + (b * KV + kv) * H * S;
            float* vb = p.v_caches[l] + (b * KV + kv) * S * H;
            if (active) {
              for (int64_t j = 0; j < H; ++j) kb[j * S + pos] = row[NH + kv * H + j];
              std::copy(row + NH + KV * H + kv * H, row + NH + KV * H + (kv + 1) * H, vb + pos * H);
            }
            const int64_t next_b = kv + 1 < KV || b + 1 < b1 ? b + (kv + 1) / KV : next * kSlotsPerItem;
            if (next_b >= 0) fetch(next_b, (kv + 1) % KV);
            attend(row + kv * G * H, G, H, kb, vb, S, active ? pos + 1 : 1, scores, att_.data() + b * NH + kv * G * H,
                   keys, values);
          }
        }
        return;
      }
      case 2:
        matmul_item(i, next, att_.data(), NH, p.o + l * o_l, D, x_.data(), true);
        return;
      case 3:
        rms_norm(x_.data() + b0 * D, b1 - b0, D, p.mlp_norm + l * D, p.eps, h_.data() + b0 * D);
        return;
      case 4: {  // act = silu(h Wgate) * (h Wup): the gate and up panels of the same columns together
        const int64_t n0 = i * kPanelsPerItem * 32, n1 = std::min(F, n0 + kPanelsPerItem * 32);
        const float* W = p.gate_up + l * gu_l;
        float* gate = scratch.gate.data();
        float* up = scratch.up.data();
        for (int64_t n = n0; n < n1; n += 32) {
          const int64_t cols = std::min<int64_t>(32, n1 - n);
          const float* up_panel = W + (padded(F) + n) / 32 * D * 32;
          slab(h_.data(), D, B, D, W + (n / 32) * D * 32, 32, gate, 32, false, cols, up_panel);
          const float* after = n + 32 < n1 ? W + (n / 32 + 1) * D * 32
                             : next >= 0 ? W + next * kPanelsPerItem * D * 32 : nullptr;
          slab(h_.data(), D, B, D, up_panel, 32, up, 32, false, cols, after);
          for (int64_t b = 0; b < B; ++b) {
            const float* gv = gate + b * 32;
            const float* uv = up + b * 32;
            float* a = act_.data() + b * F + n;
            if (cols == 32) {
              for (int j = 0; j < 32; j += 16) {
                v16 x = load(gv + j);
                store(a + j, x * (1.0f / (1.0f + vexp(-x))) * load(uv + j));
              }
            } else {
              for (int64_t j = 0; j < cols; ++j) a[j] = gv[j] * (1.0f / (1.0f + exp1(-gv[j]))) * uv[j];
            }
          }
        }
        return;
      }
      case 5:
        matmul_item(i, next, act_.data(), F, p.down + l * down_l, D, x_.data(), true);
        return;
      case 6: {
        const float* scale = l + 1 < p.L ? p.attn_norm + (l + 1) * D : p.final_norm;
        rms_norm(x_.data() + b0 * D, b1 - b0, D, scale, p.eps, h_.data() + b0 * D);
        return;
      }
    }
  }

  Step p_;
  std::vector<float> x_, h_, qkv_, att_, act_, cos_, sin_;
  int64_t phases_;
  std::unique_ptr<Counter[]> counters_;
};

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
  if (in.size() < 14 || (in.size() - 12) % 2 != 0 || outs.size() != in.size() - 8)
    return ffi::Error::InvalidArgument("k15 decode step: wrong number of arguments or results");
  for (size_t i = 2; i < in.size(); ++i)
    if (in[i].element_type() != ffi::F32)
      return ffi::Error::InvalidArgument("k15 decode step: weights and caches must be float32");
  auto f32 = [&](int i) { return reinterpret_cast<const float*>(in[i].untyped_data()); };
  Step p;
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
    p.k_caches.push_back(reinterpret_cast<float*>(outs[4 + l].untyped_data()));
    p.v_caches.push_back(reinterpret_cast<float*>(outs[4 + p.L + l].untyped_data()));
  }
  p.logits = reinterpret_cast<float*>(outs[0].untyped_data());
  p.argmax = reinterpret_cast<int32_t*>(outs[1].untyped_data());
  p.max = reinterpret_cast<float*>(outs[2].untyped_data());
  p.lse = reinterpret_cast<float*>(outs[3].untyped_data());

  p.B = in[0].dimensions()[0];
  int64_t parts = pool.num_threads();
  if (threads > 0) parts = std::min(parts, threads);
  auto job = std::make_shared<PhasedStep>(p);
  for (int64_t i = 1; i < parts; ++i) pool.Schedule([job] { job->work(); });
  job->work();
#ifdef K15_PHASE_TIMES
  std::lock_guard<std::mutex> lock(g_times_mutex);
  g_times[2 * kPhaseKinds] += 1;
#endif
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

#ifdef K15_PHASE_TIMES
// Copies the (running, waiting) seconds per phase kind and the number of calls since the last read into
// out[2 * kPhaseKinds + 1], and clears them.
extern "C" void K15PhaseTimes(double* out) {
  std::lock_guard<std::mutex> lock(g_times_mutex);
  std::copy(g_times, g_times + 2 * kPhaseKinds + 1, out);
  std::fill(g_times, g_times + 2 * kPhaseKinds + 1, 0.0);
}
#endif
