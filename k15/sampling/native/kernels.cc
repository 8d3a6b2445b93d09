// The k15 transformer's CPU kernel in float32, as an XLA FFI handler: a paged pass over token rows
// (K15PagedStepF32): a decode step, or a prefill of pages of sequences.
//
// XLA's CPU backend runs a decode step of a small model as dozens of separate kernels (each matmul, norm,
// rotary, cache write and softmax its own dispatch), and its matmuls with one row per slot run well below
// the machine's matmul rate. The step handler does the whole step in one call: register-blocked matmuls over
// the fused weights, attention that reads each slot's cache only up to its own position, and the cache
// written in place (the cache inputs alias the cache outputs). The threads of XLA's CPU pool share the work
// phase by phase (`PhasedStep`): matmuls split by columns, attention by slots. It computes what the model's paged
// pass computes (`k15.models.forward_paged`); tests compare the two logit for logit. Its matmuls run either as float32
// FMAs (`pieces` 0) or on AMX tiles over bfloat16 pieces of both operands (`pieces` 2 or 3; see "Matmuls on AMX
// tiles" below) or over int8 slices (int8 weights, `pieces` 3; "Matmuls on AMX int8 tiles").
//
// Step arguments, in order (float32 unless noted; "packed" is `slab`'s layout of a KxN weight, ceil(N/32) Kx32
// panels, stacked over layers as LxPxKx32, or with pieces, `native.pack_amx`'s bfloat16 or `pack_int8`'s layout):
//   tokens_B (int32), positions_B (int32), embed_VxD, attn_norm_LxD, qkv (packed, N = E = (n_heads + 2
//   n_kv_heads) head_dim), qkv_bias_LxE, o (packed, K = n_heads head_dim, N = D), mlp_norm_LxD, gate_up (gate
//   and up packed each, N = F, their panels alternating), down (packed, K = F), final_norm_D, head (packed,
//   K = D, N = V), the paged KV cache LxPxZxCxH (P pages of Z positions, C = 2 n_kv_heads: kv head k's keys at 2k,
//   its values at 2k + 1; `k15.models.attention`), and the page table RxM (int32: row r's position p is in page
//   [r, p // Z]). The B tokens form R rows of `tokens_per_row` consecutive tokens each (decode: one per slot).
// Results: logits_BxV; per token the first index of its largest logit (int32, V - 1 when a logit is NaN, as
// `select.first_argmax`), that logit and log sum exp(logits - it) (float32 each); then the cache (aliasing the
// input). The sampling loop takes the greedy token and log-probs from these. With `prefill`, every token's keys
// and values are written before any attends (a row may read pages another row writes), and only the cache is
// computed (the logits results have no rows).
// A token whose position is outside [0, M Z) (an inactive slot, a prefill row's padding) is not computed: it writes
// nothing, and its logits and stats are zero.
//
// A second handler, K15PagedAttentionF32, is the step's attention alone, for the model's own passes on CPU
// (`native.paged_attention`; see `PagedAttention` below).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <new>
#include <thread>
#include <vector>
#ifdef K15_PHASE_TIMES
#include <chrono>
#include <mutex>
#endif

// K15_VECTOR_BYTES: the bytes of the vectors the kernels compute on, the widest a register of the target holds
// (64 with AVX-512, 32 with AVX, else 16: SSE, NEON). K15_NO_AMX builds what a CPU without AMX gets. Tests set
// both to build what other CPUs get on any CPU.
#ifndef K15_VECTOR_BYTES
#if defined(__AVX512F__)
#define K15_VECTOR_BYTES 64
#elif defined(__AVX__)
#define K15_VECTOR_BYTES 32
#else
#define K15_VECTOR_BYTES 16
#endif
#endif
#define K15_AVX512 (K15_VECTOR_BYTES == 64)
#if defined(__AMX_BF16__) && defined(__AVX512BF16__) && !defined(K15_NO_AMX) && K15_AVX512
#define K15_AMX 1  // the compiler targets a CPU with AMX tiles: the AMX matmuls below are built
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define K15_AMX 0
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#ifdef K15_PHASE_TIMES
// A profiling build (benchmarks/decode_step.py): seconds each thread spends running and waiting in each
// kind of phase, summed over threads and calls until K15PhaseTimes reads and clears them.
constexpr int kPhaseKinds = 12;  // PhasedStep::Kind; native.PHASE_KINDS names them
std::mutex g_times_mutex;
double g_times[2 * kPhaseKinds + 1];  // (running, waiting) per kind, then the number of calls
using Clock = std::chrono::steady_clock;
inline double seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }
#endif

// The widest vector a register holds (K15_VECTOR_BYTES). Hot loops use no wider vectors: GCC keeps a vector
// wider than a register in memory (AVX2 matmuls ran at 15 GFLOP/s on 16-float vectors).
typedef float vec __attribute__((vector_size(K15_VECTOR_BYTES)));
typedef int32_t veci __attribute__((vector_size(K15_VECTOR_BYTES)));
typedef float vecu __attribute__((vector_size(K15_VECTOR_BYTES), aligned(4), may_alias));  // any float address
constexpr int kLanes = sizeof(vec) / sizeof(float);
static_assert(kLanes == 4 || kLanes == 8 || kLanes == 16, "K15_VECTOR_BYTES must be 16, 32 or 64");
inline vec load(const float* p) { return *reinterpret_cast<const vecu*>(p); }
inline void store(float* p, vec v) { *reinterpret_cast<vecu*>(p) = v; }
#if K15_VECTOR_BYTES == 64
inline vec splat(float x) { return vec{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
#elif K15_VECTOR_BYTES == 32
inline vec splat(float x) { return vec{x, x, x, x, x, x, x, x}; }
#else
inline vec splat(float x) { return vec{x, x, x, x}; }
#endif

// exp(x) lane by lane (Cephes expf: n = round(x / ln 2), a degree-5 polynomial of the remainder; ~1 ulp).
inline vec vexp(vec x) {
  const vec big = splat(88.0f), small = splat(-87.3f);
  vec xc = x > big ? big : x;
  xc = xc < small ? small : xc;
  vec n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  vec r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vec p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  veci bits = (__builtin_convertvector(n, veci) + 127) << 23;  // 2^n
  vec y = p * __builtin_bit_cast(vec, bits);
  y = x > big ? splat(INFINITY) : y;
  return x < small ? splat(0.0f) : y;
}

float exp1(float x) {  // the same arithmetic for one value (loop tails)
  float lanes[kLanes] = {x};
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

// C[MRx(kLanes NV)] (+)= A[MRxK] B[Kx(kLanes NV)] with leading dimensions; the accumulators stay in registers.
// Only the first `cols` columns are stored (the zero-padded last panel of a packed weight).
template <int MR, int NV>
void block(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t K, bool add,
           int64_t cols, Ahead* ahead = nullptr) {
  vec c[MR][NV];
  const bool full = cols == kLanes * NV;
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j) {
      if (add && full) {
        c[r][j] = load(C + r * ldc + kLanes * j);
      } else {
        c[r][j] = vec{};
        for (int64_t i = 0; add && i < kLanes && kLanes * j + i < cols; ++i) c[r][j][i] = C[r * ldc + kLanes * j + i];
      }
    }
  Ahead local = ahead ? *ahead : Ahead();
  for (int64_t k = 0; k < K; ++k) {
    if (k % kTickEvery == 0) local.tick();
    vec b[NV];
    for (int j = 0; j < NV; ++j) b[j] = load(B + k * ldb + kLanes * j);
    for (int r = 0; r < MR; ++r) {
      const vec a = splat(A[r * lda + k]);
      for (int j = 0; j < NV; ++j) c[r][j] += a * b[j];
    }
  }
  if (ahead) *ahead = local;
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j) {
      if (full) {
        store(C + r * ldc + kLanes * j, c[r][j]);
      } else {
        for (int64_t i = 0; i < kLanes && kLanes * j + i < cols; ++i) C[r * ldc + kLanes * j + i] = c[r][j][i];
      }
    }
}

// A slab's register block: up to kSlabRows rows x 2 vectors of accumulators. AVX-512 has 32 vector registers:
// 12 x 2 (24 accumulators). AVX2 and SSE have 16: 6 x 2 (12 accumulators), the 32-column slab in parts of 2 vectors.
#if K15_AVX512
constexpr int kSlabRows = 12;
#else
constexpr int kSlabRows = 6;
#endif

// block<rows, 2> by its row count (1 to kSlabRows).
constexpr void (*kBlocks[])(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t, bool, int64_t,
                            Ahead*) = {nullptr,      block<1, 2>,  block<2, 2>,  block<3, 2>, block<4, 2>,
                                       block<5, 2>,  block<6, 2>,  block<7, 2>,  block<8, 2>, block<9, 2>,
                                       block<10, 2>, block<11, 2>, block<12, 2>};

// One 32-column slab: all M rows, in blocks of at most kSlabRows rows of near-equal size (fewer blocks read the
// slab fewer times). `next`: the packed slab read after this one (Kx32), fetched into the cache over all the
// blocks, so memory streams it while they compute on this one.
void slab(const float* A, int64_t lda, int64_t M, int64_t K, const float* B, int64_t ldb, float* C, int64_t ldc,
          bool add, int64_t cols, const float* next = nullptr) {
  constexpr int64_t width = 2 * kLanes;
  const int64_t blocks = (M + kSlabRows - 1) / kSlabRows, parts = (cols + width - 1) / width;
  Ahead ahead(next, 2 * K, 0, next ? 1 : 0, 2 * K, parts * blocks * K);
  Ahead* a_ = next ? &ahead : nullptr;
  for (int64_t part = 0; part < parts; ++part)
    for (int64_t j = 0, m = 0; j < blocks; ++j) {
      const int64_t rows = M / blocks + (j < M % blocks ? 1 : 0), c = part * width;
      kBlocks[rows](A + m * lda, lda, B + c, ldb, C + m * ldc + c, ldc, K, add, std::min(width, cols - c), a_);
      m += rows;
    }
  if (a_) a_->rest();
}

// C0[MRx32] = A[MRxK] B0[Kx32], C1[MRx32] = A B1: two full panels against each row of A at once (6 rows x 4
// vectors of accumulators), so each element of A loaded feeds 4 FMAs where block<12, 2> feeds 2.
template <int MR>
void block2(const float* A, int64_t lda, const float* B0, const float* B1, float* C0, float* C1, int64_t ldc,
            int64_t K, bool add, Ahead* ahead) {
  constexpr int NV = 32 / kLanes;  // vectors a panel row
  vec c[MR][2 * NV];
  const auto at = [&](int r, int j) { return (j < NV ? C0 : C1) + r * ldc + kLanes * (j % NV); };
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 2 * NV; ++j) c[r][j] = add ? load(at(r, j)) : vec{};
  Ahead local = *ahead;
  for (int64_t k = 0; k < K; ++k) {
    if (k % kTickEvery == 0) local.tick();
    vec b[2 * NV];
    for (int j = 0; j < NV; ++j) b[j] = load(B0 + 32 * k + kLanes * j), b[NV + j] = load(B1 + 32 * k + kLanes * j);
    for (int r = 0; r < MR; ++r) {
      const vec a = splat(A[r * lda + k]);
      for (int j = 0; j < 2 * NV; ++j) c[r][j] += a * b[j];
    }
  }
  *ahead = local;
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 2 * NV; ++j) store(at(r, j), c[r][j]);
}

constexpr void (*kBlocks2[])(const float*, int64_t, const float*, const float*, float*, float*, int64_t, int64_t,
                             bool, Ahead*) = {nullptr, block2<1>, block2<2>, block2<3>, block2<4>, block2<5>,
                                              block2<6>};

// Two full panels over all M rows, in blocks of at most 6 rows. `next`: the two panels read after these
// (contiguous, 2 x Kx32), fetched into the cache over all the blocks.
void slab2(const float* A, int64_t lda, int64_t M, int64_t K, const float* B0, const float* B1, float* C0, float* C1,
           int64_t ldc, bool add, const float* next) {
  const int64_t blocks = (M + 5) / 6;
  Ahead ahead(next, 4 * K, 0, next ? 1 : 0, 4 * K, blocks * K);
  for (int64_t j = 0, m = 0; j < blocks; ++j) {
    const int64_t rows = M / blocks + (j < M % blocks ? 1 : 0);  // near-equal blocks
    kBlocks2[rows](A + m * lda, lda, B0, B1, C0 + m * ldc, C1 + m * ldc, ldc, K, add, &ahead);
    m += rows;
  }
  ahead.rest();
}

// ---- Matmuls on AMX tiles, to float32 accuracy ----
// A CPU with AMX multiplies bfloat16 tiles (16 rows x 32 products, float32 sums) at about 16 times the rate
// of float32 FMAs. Split into bfloat16 pieces, x = x0 + x1 + x2 + (|x| 2^-24 or less: the 24 bits of a float32
// significand, 8 in each piece), a float32 product is the sum of the piece products, and those of order 2 or
// less (x0y0, x0y1, x1y0, x0y2, x1y1, x2y0) leave out less than float32's own rounding of one product: six
// bfloat16 matmuls give a float32 matmul's result up to the order of its sums. With `pieces` = 2 only x0y0,
// x0y1 and x1y0: 16 bits of each operand, about 1e-5 of each product.
//
// A packed weight (`native.pack_amx`) holds, per 32-column panel and per 32 rows of K (zero-padded to a
// multiple of 32), each piece as two B tiles of 16 columns in AMX's pair-interleaved layout (row k/2 holds
// columns 0..15 of rows k and k+1, interleaved): panel x K/32 x piece x 2 tiles x 16 x 32 bfloat16. A matmul's
// left side is split once per phase, by the phase that produces it (`split_rows`), into piece x rows x K.
constexpr int64_t kTile = 16;  // rows of a tile; a panel is two tiles of 16 columns
// int8 slices ("Matmuls on AMX int8 tiles" below): per weight, per left-side row; bytes of a panel's scales.
constexpr int64_t kSlices = 3, kLeftSlices = 4, kPanelHeader = 32 * sizeof(float), kMaxInt8K = 32768;
constexpr float kBase = 254.0f;  // the scale from one slice to the next
inline int64_t padded64(int64_t n) { return (n + 63) / 64 * 64; }  // K of an int8 matmul

bool amx_ready() {  // the kernel lets this process use AMX's tile data (Linux asks each process to request it)
#if K15_AMX
  static const bool ready = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ready;
#else
  return false;
#endif
}

#if K15_AMX
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Eight tiles of 16 rows x 64 bytes: 0-3 sums (two row tiles x two column tiles), 4-5 left (per row tile),
// 6-7 right (per column tile). Static, initialized at load: GCC does not order a local's stores before the
// ldtilecfg that reads it.
constexpr TileConfig tile_config() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.bytes_per_row[t] = 64, cfg.rows[t] = kTile;
  return cfg;
}
alignas(64) constexpr TileConfig kTileConfig = tile_config();

void configure_tiles() { _tile_loadconfig(&kTileConfig); }

// x[:n] into `pieces` bfloat16 pieces, `stride` elements apart (round to nearest even each).
void split(const float* x, int64_t n, uint16_t* out, int64_t stride, int pieces) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    for (int q = 0; q < pieces; ++q) {
      const __m256i b = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
      _mm256_mask_storeu_epi16(out + q * stride + i, m, b);
      v = _mm512_sub_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)));
    }
  }
}

// Tile loads and products of the panel kernel. Tile numbers are immediates, so these are templates.
template <bool TWO>  // the left side's piece for one or two row tiles (`lda` elements per row)
inline void load_left(const uint16_t* a, int64_t lda) {
  _tile_loadd(4, a, 2 * lda);
  if (TWO) _tile_loadd(5, a + kTile * lda, 2 * lda);
}
inline void load_right(const uint16_t* b) {  // a piece of the panel's k-block: its two column tiles
  _tile_loadd(6, b, 64);
  _tile_loadd(7, b + kTile * 32, 64);
}
template <bool TWO>
inline void products() {
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 4, 7);
  if (TWO) {
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
}

// out[rows x 32] = A B over 16 or 32 rows of A (TWO) for one packed panel B. A: `pieces` x Mp x Kp bfloat16
// from its first row; out: rows of 32 floats. The products of pieces (left, right), in an order where
// consecutive products share tiles: (0,0) (0,1) (1,0) for 2 pieces; (0,0) (0,1) (0,2) (1,1) (1,0) (2,0) for 3.
// Written out, not looped over a table: the tile instructions take immediates, and a data-driven loop ran at
// half the rate. The weights stream from memory: a tile load waits for its lines, and the products wait for
// the load, so the next k-block's lines are fetched a few after each group of products (a burst of prefetches
// stalls the loads instead).
template <int P, bool TWO>
void amx_rows(const uint16_t* A, int64_t Mp, int64_t Kp, const uint16_t* panel, float* out) {
  constexpr int64_t R = 2 * kTile * 32;  // elements of one piece of a k-block of the panel: two B tiles
  constexpr int64_t lines = P * R * 2 / 64, groups = P == 2 ? 3 : 6, per_group = (lines + groups - 1) / groups;
  const int64_t piece = Mp * Kp, blocks = Kp / 32;
  _tile_zero(0);
  _tile_zero(1);
  if (TWO) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t kb = 0; kb < blocks; ++kb) {
    const uint16_t* b = panel + kb * P * R;  // piece q's two tiles at b + q R
    const uint16_t* a = A + 32 * kb;
    const char* ahead = reinterpret_cast<const char*>(b + P * R);  // the next k-block (or panel)
    int64_t fetched = 0;
    auto fetch = [&] {
      for (int64_t i = 0; i < per_group && fetched < lines; ++i) _mm_prefetch(ahead + 64 * fetched++, _MM_HINT_T0);
    };
    if constexpr (P == 2) {
      load_left<TWO>(a, Kp), load_right(b), products<TWO>(), fetch();
      load_right(b + R), products<TWO>(), fetch();
      load_left<TWO>(a + piece, Kp), load_right(b), products<TWO>(), fetch();
    } else {
      load_left<TWO>(a, Kp), load_right(b), products<TWO>(), fetch();
      load_right(b + R), products<TWO>(), fetch();
      load_right(b + 2 * R), products<TWO>(), fetch();
      load_left<TWO>(a + piece, Kp), load_right(b + R), products<TWO>(), fetch();
      load_right(b), products<TWO>(), fetch();
      load_left<TWO>(a + 2 * piece, Kp), products<TWO>(), fetch();
    }
  }
  _tile_stored(0, out, 128);
  _tile_stored(1, out + 16, 128);
  if (TWO) {
    _tile_stored(2, out + kTile * 32, 128);
    _tile_stored(3, out + kTile * 32 + 16, 128);
  }
}

// out[Mp x 32] = A B for one packed panel B: all Mp rows (a multiple of 16), two row tiles at a time; A and the
// panel in `pieces` (2 or 3) bfloat16 pieces.
template <int P>
void amx_panel(const uint16_t* A, int64_t Mp, int64_t Kp, const uint16_t* panel, float* out) {
  int64_t r = 0;
  for (; r + 2 * kTile <= Mp; r += 2 * kTile) amx_rows<P, true>(A + r * Kp, Mp, Kp, panel, out + r * 32);
  if (r < Mp) amx_rows<P, false>(A + r * Kp, Mp, Kp, panel, out + r * 32);
}
void amx_panel(int64_t pieces, const uint16_t* A, int64_t Mp, int64_t Kp, const uint16_t* panel, float* out) {
  pieces == 2 ? amx_panel<2>(A, Mp, Kp, panel, out) : amx_panel<3>(A, Mp, Kp, panel, out);
}

// ---- Matmuls on AMX int8 tiles, to float32 accuracy ----
// AMX multiplies int8 tiles (16 rows x 64 products, int32 sums) at twice its bfloat16 rate, and an int8 weight
// slice is a quarter of a float32 weight. Scaled by a power of two s (per weight column, per row of the left
// side) so its largest value is at most 127, a float32 x is s (x0 + x1 / B + x2 / B^2 + ...) with B = 254: int8
// slices in [-127, 127], each the nearest integer to what the ones before left, times B (a residual is at most
// 1/2, so the next slice at most 127). Weights take 3 slices, the left side 4: its rows can hold a few values far
// above the rest, and the slices resolve each row relative to its largest value (4 slices: about 2^-31 of it).
// A product's slice pairs of order 3 or less (x0y0; x0y1, x1y0; x0y2, x1y1, x2y0; x1y2, x2y1, x3y0: nine int8
// matmuls) are summed exactly in int32 per order, and the four sums scaled and added in float32: the result
// holds to about 2^-24 of the row's largest |x| times the column's largest |w| per product, float32's accuracy
// (tests hold it to float64 within a few times XLA's float32 error). The int32 sums stay exact for K below
// 2^31 / (3 127^2).
//
// A packed weight (`native.pack_int8`), per 32-column panel: the 32 column scales (float32), then per column tile
// of 16 and per 64 rows of K (zero-padded to a multiple of 64) each slice as a B tile in AMX's quad layout (tile
// row r holds rows 4r..4r+3 of K for each column in turn): kPanelHeader + 2 x K/64 x 3 x 16 x 64 bytes, each
// column tile's run contiguous. The left side (`split_int8`): slice x Mp x Kp int8, with a scale per row.

// x[:n] into kLeftSlices int8 slices, `stride` bytes apart, and its scale (a power of two; 1 for a zero row).
// native.pack_int8 slices weights alike (3 slices, a scale per column).
void split_int8(const float* x, int64_t n, int8_t* out, int64_t stride, float* scale) {
  __m512 big = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    big = _mm512_max_ps(big, _mm512_abs_ps(_mm512_maskz_loadu_ps(m, x + i)));
  }
  const float largest = _mm512_reduce_max_ps(big);
  int e = 0;
  std::frexp(largest, &e);  // largest = f 2^e, f in [0.5, 1): largest / 2^(e - 7) in [64, 128)
  float s = largest > 0.0f ? std::ldexp(1.0f, e - 7) : 1.0f;
  if (largest / s > 127.0f) s *= 2.0f;
  *scale = std::isfinite(largest) ? s : NAN;  // a row with inf or NaN gives NaN results (its slices: garbage)
  const __m512 inv = _mm512_set1_ps(1.0f / s), base = _mm512_set1_ps(kBase);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), inv);  // exact: a power of two
    for (int q = 0; q < kLeftSlices; ++q) {
      const __m512 r = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm_mask_storeu_epi8(out + q * stride + i, m, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(r)));
      v = _mm512_mul_ps(_mm512_sub_ps(v, r), base);  // what is left (exact), scaled up
    }
  }
}

// out[Mp x 32] = A W for one int8 panel: per column tile and per row tile, the four orders' int32 sums in tiles
// 0-3, the panel's three slices in tiles 5-7, the left side's slices in tile 4 by turns; then scaled into float32.
void int8_panel(const int8_t* A, const float* a_scale, int64_t Mp, int64_t Kp, const int8_t* panel, float* out) {
  const float* w_scale = reinterpret_cast<const float*>(panel);
  const int8_t* W = panel + kPanelHeader;
  const int64_t piece = Mp * Kp, blocks = Kp / 64;
  alignas(64) int32_t sums[kLeftSlices][kTile * kTile];
  const __m512 inv_base = _mm512_set1_ps(1.0f / kBase);
  for (int64_t c = 0; c < 2; ++c) {
    const int8_t* Wc = W + c * blocks * kSlices * 1024;  // the column tile's blocks, in order
    for (int64_t r = 0; r < Mp; r += kTile) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t kb = 0; kb < blocks; ++kb) {
        const int8_t* a = A + r * Kp + 64 * kb;
        const int8_t* w = Wc + kb * kSlices * 1024;
        _tile_loadd(5, w, 64);
        _tile_loadd(6, w + 1024, 64);
        _tile_loadd(7, w + 2048, 64);
        _tile_loadd(4, a, Kp);
        _tile_dpbssd(0, 4, 5);  // order 0: x0 y0
        _tile_dpbssd(1, 4, 6);  // order 1: x0 y1
        _tile_dpbssd(2, 4, 7);  // order 2: x0 y2
        _tile_loadd(4, a + piece, Kp);
        _tile_dpbssd(1, 4, 5);  // x1 y0
        _tile_dpbssd(2, 4, 6);  // x1 y1
        _tile_dpbssd(3, 4, 7);  // order 3: x1 y2
        _tile_loadd(4, a + 2 * piece, Kp);
        _tile_dpbssd(2, 4, 5);  // x2 y0
        _tile_dpbssd(3, 4, 6);  // x2 y1
        _tile_loadd(4, a + 3 * piece, Kp);
        _tile_dpbssd(3, 4, 5);  // x3 y0
      }
      _tile_stored(0, sums[0], 64);
      _tile_stored(1, sums[1], 64);
      _tile_stored(2, sums[2], 64);
      _tile_stored(3, sums[3], 64);
      const __m512 ws = _mm512_loadu_ps(w_scale + 16 * c);
      for (int64_t i = 0; i < kTile; ++i) {
        __m512 sum = _mm512_cvtepi32_ps(_mm512_load_si512(sums[kLeftSlices - 1] + i * kTile));
        for (int t = kLeftSlices - 2; t >= 0; --t)  // Horner: s0 + (s1 + (s2 + s3 / B) / B) / B
          sum = _mm512_fmadd_ps(sum, inv_base, _mm512_cvtepi32_ps(_mm512_load_si512(sums[t] + i * kTile)));
        const __m512 scale = _mm512_mul_ps(ws, _mm512_set1_ps(a_scale[r + i]));
        _mm512_storeu_ps(out + (r + i) * 32 + 16 * c, _mm512_mul_ps(sum, scale));
      }
    }
  }
}
#endif

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

// The first index of x[:V]'s largest value (V - 1 if any is NaN), that value, and log sum exp(x - it), in
// `k15.models.logprobs_of`'s order of operations (shift by the max, sum the exps, then the log).
void logit_stats(const float* x, int64_t V, int32_t* argmax, float* max_out, float* lse_out) {
  vec mxv = splat(-INFINITY);
  veci nans = {};
  int64_t v = 0;
  for (; v + kLanes <= V; v += kLanes) {
    vec a = load(x + v);
    nans |= a != a;
    mxv = a > mxv ? a : mxv;
  }
  float mx = -INFINITY;
  bool nan = false;
  for (int i = 0; i < kLanes; ++i) mx = std::max(mx, mxv[i]), nan |= nans[i] != 0;
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
  vec sumv{};
  for (v = 0; v + kLanes <= V; v += kLanes) sumv += vexp(load(x + v) - mx);
  float sum = 0.0f;
  for (int i = 0; i < kLanes; ++i) sum += sumv[i];
  for (; v < V; ++v) sum += exp1(x[v] - mx);
  *argmax = static_cast<int32_t>(at), *max_out = mx, *lse_out = std::log(sum);
}

// Everything one step reads and writes.
struct Step {
  const int32_t* tokens;
  const int32_t* positions;
  const float *embed, *attn_norm, *qkv_bias, *mlp_norm, *final_norm;
  const void *qkv, *o, *gate_up, *down, *head;  // packed: float32 (pieces 0) or bfloat16 pieces for AMX
  int pieces;  // 0: float32 FMAs; 2 or 3: bfloat16 pieces (or with `int8`, 3 int8 slices) of each operand on AMX
  bool int8;  // the packed weights are int8 slices (`pack_int8`)
  bool prefill;  // write every token's keys and values before attending; no logits
  float* kv;  // the paged cache, L x P x Z x 2KV x H
  const int32_t* table;  // R x M
  const int32_t* table_row;  // per token: its row of the table
  float* logits;
  int32_t* argmax;
  float *max, *lse;
  float eps, theta;
  int64_t B, L, V, D, N, KV, H, F, P, Z, M;

  // Token b's page j in layer l (Z x 2KV x H), or null when the table names no page of the cache.
  float* page(int64_t l, int64_t b, int64_t j) const {
    const int64_t at = table[table_row[b] * M + j];
    return at >= 0 && at < P ? kv + (l * P + at) * Z * 2 * KV * H : nullptr;
  }
};

// op over each of t[0..kLanes - 1]'s lanes, as one vector (lane i: t[i]'s lanes reduced): pairs, then quads,
// octets and halves, as far as the lanes go. `fold` combines the lanes that shuffles `lo` and `hi` pick of a and b.
template <class Op>
inline vec fold(Op op, vec a, vec b, veci lo, veci hi) {
  return op(__builtin_shuffle(a, b, lo), __builtin_shuffle(a, b, hi));
}
#if K15_VECTOR_BYTES == 64
template <class Op>
inline vec reduce_lanes(const vec* t, Op op) {
  vec u[8], w[4], x[2];
  for (int i = 0; i < 8; ++i)
    u[i] = fold(op, t[2 * i], t[2 * i + 1], veci{0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
                veci{1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31});
  for (int i = 0; i < 4; ++i)
    w[i] = fold(op, u[2 * i], u[2 * i + 1], veci{0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
                veci{2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31});
  for (int i = 0; i < 2; ++i)
    x[i] = fold(op, w[2 * i], w[2 * i + 1], veci{0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
                veci{4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31});
  return fold(op, x[0], x[1], veci{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
              veci{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
}
#elif K15_VECTOR_BYTES == 32
template <class Op>
inline vec reduce_lanes(const vec* t, Op op) {
  vec u[4], w[2];
  for (int i = 0; i < 4; ++i)
    u[i] = fold(op, t[2 * i], t[2 * i + 1], veci{0, 8, 2, 10, 4, 12, 6, 14}, veci{1, 9, 3, 11, 5, 13, 7, 15});
  for (int i = 0; i < 2; ++i)
    w[i] = fold(op, u[2 * i], u[2 * i + 1], veci{0, 1, 8, 9, 4, 5, 12, 13}, veci{2, 3, 10, 11, 6, 7, 14, 15});
  return fold(op, w[0], w[1], veci{0, 1, 2, 3, 8, 9, 10, 11}, veci{4, 5, 6, 7, 12, 13, 14, 15});
}
#else
template <class Op>
inline vec reduce_lanes(const vec* t, Op op) {
  const vec u0 = fold(op, t[0], t[1], veci{0, 4, 2, 6}, veci{1, 5, 3, 7});
  const vec u1 = fold(op, t[2], t[3], veci{0, 4, 2, 6}, veci{1, 5, 3, 7});
  return fold(op, u0, u1, veci{0, 1, 4, 5}, veci{2, 3, 6, 7});
}
#endif
inline vec hsum_lanes(const vec* t) { return reduce_lanes(t, [](vec a, vec b) { return a + b; }); }
inline vec hmax_lanes(const vec* t) { return reduce_lanes(t, [](vec a, vec b) { return a > b ? a : b; }); }

// acc[g] = acc[g] * alpha[g] + sum over `count` positions j of p[g][j] * (at[j] + off)[c:c + kLanes], for NG
// query heads (their block weights p with row stride 16).
template <int NG>
inline void weigh_block(const float* p, const float* alpha, const float* const* at, int64_t off, int64_t count,
                        int64_t c, float* acc, int64_t H) {
  vec a[NG];
  for (int g = 0; g < NG; ++g) a[g] = load(acc + g * H + c) * alpha[g];
  for (int64_t j = 0; j < count; ++j) {
    const vec v = load(at[j] + off + c);
    for (int g = 0; g < NG; ++g) a[g] += p[g * 16 + j] * v;
  }
  for (int g = 0; g < NG; ++g) store(acc + g * H + c, a[g]);
}

// Fetches the `lines` 64-byte lines of one position's keys and values from p into L2.
inline void fetch_position(const float* p, int64_t lines) {
  for (int64_t c = 0; c < lines; ++c) __builtin_prefetch(p + 16 * c, 0, 2);
}

// Prefetches the cache lines of the positions a thread attends over, in the order it reads them (a token's
// positions, then the next token's), kFetchAhead positions ahead of its reads. (Fetching all of the next token's
// positions during a token kept two tokens' pages in L2: past ~200 positions they outgrew a 512 KB L2.)
constexpr int64_t kFetchAhead = 64;
struct RowFetch {
  const float* const* at = nullptr;  // the token's positions
  int64_t n = 0;
  const float* const* next_at = nullptr;  // the next token's
  int64_t next_n = 0, lines = 0;
  int64_t done = 0;  // positions fetched so far

  void upto(int64_t end) {  // fetches positions [done, end) of the token's and the next token's
    for (end = std::min(end, n + next_n); done < end; ++done) {
      fetch_position(done < n ? at[done] : next_at[done - n], lines);
    }
  }
  int64_t next_done() const { return std::max<int64_t>(0, done - n); }  // the next token's positions fetched
};

// Where a row's positions [0, n) are in its pages: at[j] is position j's run of `run` floats (every head's keys and
// values) in page row[j / Z] of `pages` (X pages of Z positions); a page outside [0, X) reads `zeros`.
inline void position_runs(const int32_t* row, const float* pages, int64_t X, int64_t Z, int64_t run, int64_t n,
                          const float* zeros, const float** at) {
  for (int64_t j = 0; j < n; j += Z) {  // a page's positions: one run of memory
    const int64_t page = row[j / Z];
    const float* base = page >= 0 && page < X ? pages + page * Z * run : nullptr;
    for (int64_t k = 0; k < Z && j + k < n; ++k) at[j + k] = base ? base + k * run : zeros;
  }
}

// One query head's scores q.k / sqrt(H) against a block's `count` positions (of 16) into s[0..16), -inf past
// count: the lane sums of q * k per position, then their horizontal sums, kLanes positions at a time. NV: H /
// kLanes, known when compiled (0: any H).
template <int NV>
inline void block_scores(const float* q, const float* const* block, int64_t off, int64_t count, int64_t H,
                         float scale, float* s) {
  if (NV == 0 && H % kLanes != 0) {
    for (int64_t j = 0; j < 16; ++j) {
      float sum = 0.0f;
      for (int64_t c = 0; j < count && c < H; ++c) sum += q[c] * block[j][off + c];
      s[j] = j < count ? sum * scale : -INFINITY;
    }
    return;
  }
  const int64_t nv = NV > 0 ? NV : H / kLanes;
  for (int64_t j0 = 0; j0 < 16; j0 += kLanes) {
    vec t[kLanes];
    for (int64_t j = 0; j < kLanes; ++j) {
      if (j0 + j >= count) {
        t[j] = vec{};
        continue;
      }
      const float* key = block[j0 + j] + off;
      vec sum = load(q) * load(key);
      for (int64_t c = 1; c < nv; ++c) sum += load(q + kLanes * c) * load(key + kLanes * c);
      t[j] = sum;
    }
    store(s + j0, hsum_lanes(t) * scale);
  }
  for (int64_t j = count; j < 16; ++j) s[j] = -INFINITY;
}

inline int64_t lanes_padded(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }
// attend_token's scratch floats for NQ query heads.
inline int64_t attention_scratch(int64_t NQ) { return 16 * NQ + 3 * lanes_padded(NQ); }

// One token's attention over n positions of its pages: for each kv head k, out[G heads of k] = softmax(q k^T /
// sqrt(H)) v, the keys of position i at at[i] + 2kH and its values H floats after (a position's heads are one run
// of memory). Blocks of 16 positions are read in order, each while in L1: every head's scores; then, kLanes heads
// at a time in vectors, the running maxima, rescales and sums of an online softmax; then the values. Meanwhile
// `ahead` fetches the positions kFetchAhead after the block into L2 (a block ahead is too late to hide the
// memory's latency). `scratch`: attention_scratch(KV G) floats.
template <int NV>
void attend_token(const float* q, int64_t KV, int64_t G, int64_t H, const float* const* at, int64_t n,
                  float* scratch, float* out, RowFetch& ahead) {
  const int64_t NQ = KV * G, NL = lanes_padded(NQ);
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));
  float *p = scratch, *m = p + 16 * NQ, *l = m + NL, *alpha = l + NL;
  std::fill(m, m + NL, -INFINITY);
  std::fill(l, l + NL, 0.0f);
  std::fill(out, out + NQ * H, 0.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const int64_t count = std::min<int64_t>(16, n - i);
    const float* const* block = at + i;
    for (int64_t r = 0; r < NQ; ++r) {
      ahead.upto(i + kFetchAhead + 16 * (r + 1) / NQ);
      block_scores<NV>(q + r * H, block, 2 * (r / G) * H, count, H, scale, p + 16 * r);
    }
    for (int64_t r0 = 0; r0 < NQ; r0 += kLanes) {  // lane h: head r0 + h (zeros past the heads)
      const int64_t heads = std::min<int64_t>(kLanes, NQ - r0);
      vec t[kLanes];
      for (int64_t h = 0; h < kLanes; ++h) {  // each head's block maximum
        vec most = vec{};
        for (int64_t j = 0; h < heads && j < 16; j += kLanes) {
          const vec s = load(p + 16 * (r0 + h) + j);
          most = j == 0 || s > most ? s : most;
        }
        t[h] = most;
      }
      const vec m_old = load(m + r0), most = hmax_lanes(t);
      const vec m_new = m_old > most ? m_old : most;
      const vec rescale = vexp(m_old - m_new);  // 0 while m_old is -inf
      store(alpha + r0, rescale);
      store(m + r0, m_new);
      for (int64_t h = 0; h < kLanes; ++h) {  // each position's weight exp(s - max), and their sum per head
        vec sum = vec{};
        for (int64_t j = 0; h < heads && j < 16; j += kLanes) {
          const vec e = vexp(load(p + 16 * (r0 + h) + j) - m_new[h]);
          store(p + 16 * (r0 + h) + j, e);
          sum += e;
        }
        t[h] = sum;
      }
      store(l + r0, load(l + r0) * rescale + hsum_lanes(t));
    }
    for (int64_t k = 0; k < KV; ++k) {  // the block's values, weighted, into each query head's running sum
      const int64_t off = (2 * k + 1) * H;
      const float* pk = p + 16 * k * G;
      const float* ak = alpha + k * G;
      float* ok = out + k * G * H;
      int64_t c = 0;
      for (; c + kLanes <= H; c += kLanes)
        for (int64_t g = 0; g < G;) {
          const int64_t left = G - g;
          if (left >= 4) weigh_block<4>(pk + 16 * g, ak + g, block, off, count, c, ok + g * H, H), g += 4;
          else if (left >= 2) weigh_block<2>(pk + 16 * g, ak + g, block, off, count, c, ok + g * H, H), g += 2;
          else weigh_block<1>(pk + 16 * g, ak + g, block, off, count, c, ok + g * H, H), g += 1;
        }
      for (; c < H; ++c)  // a head_dim that is not a multiple of kLanes
        for (int64_t g = 0; g < G; ++g) {
          float sum = ok[g * H + c] * ak[g];
          for (int64_t j = 0; j < count; ++j) sum += pk[16 * g + j] * block[j][off + c];
          ok[g * H + c] = sum;
        }
    }
  }
  for (int64_t r = 0; r < NQ; ++r)
    for (int64_t c = 0; c < H; ++c) out[r * H + c] /= l[r];
}

// attend_token with the score loop compiled for the head_dim's vectors where it is a common one.
void attend(const float* q, int64_t KV, int64_t G, int64_t H, const float* const* at, int64_t n, float* scratch,
            float* out, RowFetch& ahead) {
  switch (H % kLanes == 0 ? H / kLanes : 0) {
    case 1: return attend_token<1>(q, KV, G, H, at, n, scratch, out, ahead);
    case 2: return attend_token<2>(q, KV, G, H, at, n, scratch, out, ahead);
    case 4: return attend_token<4>(q, KV, G, H, at, n, scratch, out, ahead);
    case 8: return attend_token<8>(q, KV, G, H, at, n, scratch, out, ahead);
    case 16: return attend_token<16>(q, KV, G, H, at, n, scratch, out, ahead);
    default: return attend_token<0>(q, KV, G, H, at, n, scratch, out, ahead);
  }
}

// Spins until `done` reaches n: items other threads took and are running (yielding after a while, as the
// other threads may not be running).
inline void wait_for(const std::atomic<int64_t>& done, int64_t n) {
  for (int spins = 0; done.load(std::memory_order_acquire) < n; ++spins) {
    if (spins > 4096) std::this_thread::yield();
#if defined(__x86_64__)
    else __builtin_ia32_pause();
#endif
  }
}

// std::vector's storage on 64-byte lines: an AMX tile row that straddles two lines loads at a fraction of the rate.
template <class T>
struct LineAligned {
  using value_type = T;
  LineAligned() = default;
  template <class U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  bool operator==(const LineAligned&) const { return true; }
  bool operator!=(const LineAligned&) const { return false; }
};
template <class T>
using Aligned = std::vector<T, LineAligned<T>>;

inline int64_t padded(int64_t n) { return (n + 31) / 32 * 32; }  // columns of a packed weight (K too, on AMX)
inline int64_t padded_rows(int64_t B) { return (B + kTile - 1) / kTile * kTile; }  // whole row tiles

// The layout of an AMX matmul's operands: `pieces` (2 or 3) bfloat16 pieces (`native.pack_amx`, `split`), or with
// `int8` int8 slices (`native.pack_int8`, `split_int8`): their sizes, the split of a left-side row and the panel
// kernel, for the step's matmuls and prefill's alike. A split left side of Mp rows: piece x Mp x kp(K) elements
// (bfloat16 or int8), with a scale per row for int8.
struct AmxFormat {
  int64_t pieces;
  bool int8;

  int64_t kp(int64_t K) const { return int8 ? padded64(K) : padded(K); }  // K, zero-padded, of both operands
  int64_t left_row_bytes(int64_t K) const { return int8 ? kLeftSlices * kp(K) : 2 * pieces * kp(K); }
  int64_t panel_bytes(int64_t K) const { return int8 ? kPanelHeader + kSlices * kp(K) * 32 : 2 * pieces * kp(K) * 32; }

  // x[:n], row b of a left side of Mp rows, its columns from c0 (int8 slices take whole rows: c0 = 0, n = K).
  void split_row(const float* x, int64_t n, int64_t c0, uint8_t* left, float* scale, int64_t Mp, int64_t K,
                 int64_t b) const {
#if K15_AMX
    const int64_t k = kp(K);
    if (int8)
      split_int8(x, n, reinterpret_cast<int8_t*>(left) + b * k, Mp * k, scale + b);
    else
      split(x, n, reinterpret_cast<uint16_t*>(left) + b * k + c0, Mp * k, pieces);
#endif
  }

  // out[Mp x 32] = the split left side times panel j of `panels` (a weight's, or a layer's).
  void panel(const uint8_t* left, const float* scale, int64_t Mp, int64_t K, const void* panels, int64_t j,
             float* out) const {
#if K15_AMX
    const uint8_t* w = static_cast<const uint8_t*>(panels) + j * panel_bytes(K);
    if (int8)
      int8_panel(reinterpret_cast<const int8_t*>(left), scale, Mp, kp(K), reinterpret_cast<const int8_t*>(w), out);
    else
      amx_panel(pieces, reinterpret_cast<const uint16_t*>(left), Mp, kp(K), reinterpret_cast<const uint16_t*>(w), out);
#endif
  }
};

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
    if (p.pieces) {  // the left sides of the AMX matmuls, split; zero past the B rows and the K columns
      h16_ = left_k(p.D), att16_ = left_k(p.N * p.H), act16_ = left_k(p.F);
    }
    cos_.resize(B * p.H / 2), sin_.resize(B * p.H / 2), zeros_.resize(2 * p.KV * p.H);
    phases_ = 3 + kLayerPhases * p.L;
    counters_.reset(new Counter[phases_]);
  }

  void work() {
    Scratch scratch{Aligned<float>(attention_scratch(p_.N)), Aligned<float>(Mp() * 32), Aligned<float>(Mp() * 32),
                    Aligned<float>(Mp() * 32), std::vector<const float*>(S()), std::vector<const float*>(S())};
#if K15_AMX
    if (p_.pieces) configure_tiles();  // per thread
#endif
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
      wait_for(c.done, n);
#ifdef K15_PHASE_TIMES
      times[2 * k] += seconds(start, ran), times[2 * k + 1] += seconds(ran, Clock::now());
#endif
    }
#if K15_AMX
    if (p_.pieces) _tile_release();
#endif
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
    Aligned<float> scores, gate, up, out;  // out: an AMX panel's Mp x 32 results
    std::vector<const float*> positions, next_positions;  // where a token's (the next token's) positions are
  };
  static constexpr int64_t kSlotsPerItem = 2, kPanelsPerItem = 2, kAmxPanelsPerItem = 4;
  // Rows from which float32 matmuls take two panels a block (slab2: each A element loaded feeds 4 FMAs); with fewer,
  // one panel a block of up to 12 rows reads each weight panel once (decode_step.py A/B: 1.05x at 8 rows).
  // AVX-512 builds only: AVX2's 16 registers hold no two-panel block, and narrower builds were not measured.
#if K15_AVX512
  static constexpr int64_t kTwoPanelRows = 12;
#else
  static constexpr int64_t kTwoPanelRows = INT64_MAX;
#endif
  // Panels per matmul item: AMX tile loads stream longer runs of a weight faster, while a phase keeps at least
  // 8 items for the threads to share.
  int64_t per_item(int64_t cols) const {
    return p_.pieces && ceil_div(cols, 32) >= 8 * kAmxPanelsPerItem ? kAmxPanelsPerItem : kPanelsPerItem;
  }

  int64_t E() const { return (p_.N + 2 * p_.KV) * p_.H; }
  int64_t S() const { return p_.M * p_.Z; }  // positions a row's pages hold
  int64_t Mp() const { return p_.pieces ? padded_rows(p_.B) : p_.B; }
  AmxFormat amx() const { return {p_.pieces, p_.int8}; }

  // An AMX matmul's left side, split (`AmxFormat`); zero past the B rows and the K columns.
  struct Left {
    Aligned<uint8_t> data;
    std::vector<float> scale;  // int8 slices' scale per row
  };
  Left left_k(int64_t K) const {
    Left left;
    left.data.resize(Mp() * amx().left_row_bytes(K)), left.scale.resize(Mp(), 1.0f);
    return left;
  }

  // Rows [b0, b1) of x (row stride ldx), columns [c0, c0 + n) of K, into the split left side. int8 slices share
  // a scale per row: they take whole rows (c0 = 0, n = K).
  void split_rows(const float* x, int64_t ldx, int64_t b0, int64_t b1, int64_t c0, int64_t n, Left& left,
                  int64_t K) const {
    for (int64_t b = b0; b < b1; ++b)
      amx().split_row(x + b * ldx + c0, n, c0, left.data.data(), left.scale.data(), Mp(), K, b);
  }

  // The rows of C[BxN] (+)= the AMX panel results `out` (Mp x 32), its first `cols` columns from column n.
  void store_panel(const float* out, float* C, int64_t N, int64_t n, int64_t cols, bool add) const {
    for (int64_t b = 0; b < p_.B; ++b)
      for (int64_t j = 0; j < cols; ++j) C[b * N + n + j] = add ? C[b * N + n + j] + out[b * 32 + j] : out[b * 32 + j];
  }

  // AMX: out = the split left side (K columns) times panel j of packed weight W (layer l of its stack of
  // `panels` panels per layer).
  void amx_matmul(const Left& left, int64_t K, const void* W, int64_t panels, int64_t l, int64_t j,
                  float* out) const {
    amx().panel(left.data.data(), left.scale.data(), Mp(), K, W, l * panels + j, out);
  }
  static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
  int64_t panel_items(int64_t cols) const { return ceil_div(ceil_div(cols, 32), per_item(cols)); }

  // Phase ph: 0 embeds; then per layer 9 phases (qkv, write, attention, o, norm, gate_up, act split, down, norm);
  // then the head; last the logits' stats. kind(ph) numbers them in that order, 0 to 11 (the layer's phases 1 to
  // 9). The act split has items with int8 slices only (their scale per row needs all of gate_up's columns); the
  // other matmuls split act panel by panel in gate_up. The write has items in a prefill only (a decode's token
  // writes its own keys and values in the attention phase); a prefill computes no logits, and its last layer
  // stops at the write.
  enum Kind { kEmbed, kQkv, kWrite, kAttention, kO, kMlpNorm, kGateUp, kActSplit, kDown, kNorm, kHead, kStats };
  static constexpr int64_t kLayerPhases = 9;
  Kind kind(int64_t ph) const {
    if (ph == 0) return kEmbed;
    if (ph == phases_ - 2) return kHead;
    if (ph == phases_ - 1) return kStats;
    return static_cast<Kind>(1 + (ph - 1) % kLayerPhases);
  }

  int64_t items(int64_t ph) const {
    const Kind k = kind(ph);
    if (p_.prefill && (k == kHead || k == kStats || (ph > (p_.L - 1) * kLayerPhases + 2 && ph < phases_ - 2)))
      return 0;  // after the last layer's write: only the logits need it
    switch (k) {
      case kWrite: return p_.prefill ? ceil_div(p_.B, kSlotsPerItem) : 0;
      case kQkv: return panel_items(E());
      case kO: case kDown: return panel_items(p_.D);
      case kGateUp: return panel_items(p_.F);
      case kHead: return panel_items(p_.V);
      case kActSplit: return p_.int8 ? ceil_div(p_.B, kSlotsPerItem) : 0;
      default: return ceil_div(p_.B, kSlotsPerItem);  // embedding, attention, norms, stats
    }
  }

  // Columns [32 kPanelsPerItem i, ...) of C[BxN] (+)= A[BxK] W, W packed (layer l of a stack); item `next`
  // (-1: none) runs next. On AMX, A16 is A split (`split_rows`).
  void matmul_item(int64_t i, int64_t next, const float* A, const Left& A16, int64_t K, const void* W_stack,
                   int64_t l, int64_t N, float* C, bool add, Scratch& scratch) {
    const int64_t panels = per_item(N);
    const int64_t n0 = i * panels * 32, n1 = std::min(N, n0 + panels * 32);
    if (p_.pieces) {
      for (int64_t n = n0; n < n1; n += 32) {
        amx_matmul(A16, K, W_stack, padded(N) / 32, l, n / 32, scratch.out.data());
        store_panel(scratch.out.data(), C, N, n, std::min<int64_t>(32, N - n), add);
      }
      return;
    }
    const float* W = static_cast<const float*>(W_stack) + l * K * padded(N);
    if (p_.B >= kTwoPanelRows && n1 - n0 == 64) {
      const float* panel = W + (n0 / 32) * K * 32;
      slab2(A, K, p_.B, K, panel, panel + K * 32, C + n0, C + n0 + 32, N, add,
            next >= 0 ? W + next * panels * K * 32 : nullptr);
      return;
    }
    for (int64_t n = n0; n < n1; n += 32) {
      const float* panel = W + (n / 32) * K * 32;
      const float* after = n + 32 < n1 ? panel + K * 32 : next >= 0 ? W + next * panels * K * 32 : nullptr;
      slab(A, K, p_.B, K, panel, 32, C + n, N, add, std::min<int64_t>(32, N - n), after);
    }
  }

  void run(int64_t ph, int64_t i, int64_t next, Scratch& scratch) {
    float* scores = scratch.scores.data();
    const Step& p = p_;
    const int64_t D = p.D, N = p.N, KV = p.KV, H = p.H, F = p.F, B = p.B;
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
      split_rows(h_.data(), D, b0, b1, 0, D, h16_, D);
      return;
    }
    if (ph == phases_ - 2) {
      matmul_item(i, next, h_.data(), h16_, D, p.head, 0, p.V, p.logits, false, scratch);
      return;
    }
    if (ph == phases_ - 1) {
      for (int64_t b = b0; b < b1; ++b) logit_stats(p.logits + b * p.V, p.V, p.argmax + b, p.max + b, p.lse + b);
      return;
    }
    const int64_t l = (ph - 1) / kLayerPhases;
    switch ((ph - 1) % kLayerPhases) {
      case 0: {  // qkv = h Wqkv + bias
        matmul_item(i, next, h_.data(), h16_, D, p.qkv, l, E, qkv_.data(), false, scratch);
        const int64_t n0 = i * per_item(E) * 32, n1 = std::min(E, n0 + per_item(E) * 32);
        const float* bias = p.qkv_bias + l * E;
        for (int64_t b = 0; b < B; ++b)
          for (int64_t e = n0; e < n1; ++e) qkv_[b * E + e] += bias[e];
        return;
      }
      case 1:  // prefill: rotary and cache write of every token before any attends
        for (int64_t b = b0; b < b1; ++b) rotate_and_write(l, b);
        return;
      case 2:  // attention for the item's tokens (a decode's token first rotates and writes its own keys and values)
        positions(l, b0, scratch.next_positions);
        for (int64_t b = b0, fetched = 0; b < b1; ++b) {
          std::swap(scratch.positions, scratch.next_positions);  // the token before found this one's positions
          if (!p.prefill) rotate_and_write(l, b);
          const int64_t pos = p.positions[b], n = pos >= 0 && pos < S() ? pos + 1 : 0;
          const int64_t after = b + 1 < b1 ? b + 1 : next * kSlotsPerItem;  // the token this thread attends next
          RowFetch ahead{scratch.positions.data(), n, scratch.next_positions.data(),
                         after >= 0 && after < B ? positions(l, after, scratch.next_positions) : 0,
                         (2 * KV * H + 15) / 16, fetched};
          float* out = att_.data() + b * NH;
          if (n == 0)
            std::fill(out, out + NH, 0.0f);  // an inactive slot: garbage logits
          else
            attend(qkv_.data() + b * E, KV, G, H, scratch.positions.data(), n, scores, out, ahead);
          fetched = ahead.next_done();
        }
        split_rows(att_.data(), NH, b0, b1, 0, NH, att16_, NH);
        return;
      case 3:
        matmul_item(i, next, att_.data(), att16_, NH, p.o, l, D, x_.data(), true, scratch);
        return;
      case 4:
        rms_norm(x_.data() + b0 * D, b1 - b0, D, p.mlp_norm + l * D, p.eps, h_.data() + b0 * D);
        split_rows(h_.data(), D, b0, b1, 0, D, h16_, D);
        return;
      case 5: {  // act = silu(h Wgate) * (h Wup): the gate and up panels of the same columns together
        const int64_t panels = per_item(F);
        const int64_t n0 = i * panels * 32, n1 = std::min(F, n0 + panels * 32);
        float* gate = scratch.gate.data();
        float* up = scratch.up.data();
        for (int64_t n = n0; n < n1; n += 32) {
          const int64_t cols = std::min<int64_t>(32, n1 - n);
          if (p.pieces) {  // the layer's 2 padded(F) / 32 panels, gate's and up's alternating
            amx_matmul(h16_, D, p.gate_up, 2 * padded(F) / 32, l, 2 * (n / 32), gate);
            amx_matmul(h16_, D, p.gate_up, 2 * padded(F) / 32, l, 2 * (n / 32) + 1, up);
          } else {
            const float* W = static_cast<const float*>(p.gate_up) + l * 2 * D * padded(F);
            const float* gate_panel = W + 2 * (n / 32) * D * 32;
            const float* up_panel = gate_panel + D * 32;
            if (B >= kTwoPanelRows && cols == 32) {
              slab2(h_.data(), D, B, D, gate_panel, up_panel, gate, up, 32, false,
                    n + 32 < n1 ? up_panel + D * 32 : next >= 0 ? W + 2 * next * panels * D * 32 : nullptr);
            } else {
              slab(h_.data(), D, B, D, gate_panel, 32, gate, 32, false, cols, up_panel);
              const float* after = n + 32 < n1 ? up_panel + D * 32
                                 : next >= 0 ? W + 2 * next * panels * D * 32 : nullptr;
              slab(h_.data(), D, B, D, up_panel, 32, up, 32, false, cols, after);
            }
          }
          for (int64_t b = 0; b < B; ++b) {
            const float* gv = gate + b * 32;
            const float* uv = up + b * 32;
            float* a = act_.data() + b * F + n;
            if (cols == 32) {
              for (int j = 0; j < 32; j += kLanes) {
                const vec x = load(gv + j);
                store(a + j, x * (1.0f / (1.0f + vexp(-x))) * load(uv + j));
              }
            } else {
              for (int64_t j = 0; j < cols; ++j) a[j] = gv[j] * (1.0f / (1.0f + exp1(-gv[j]))) * uv[j];
            }
          }
          if (!p.int8) split_rows(act_.data(), F, 0, B, n, cols, act16_, F);
        }
        return;
      }
      case 6:  // int8 slices only: act's rows, once gate_up has written all their columns
        split_rows(act_.data(), F, b0, b1, 0, F, act16_, F);
        return;
      case 7:
        matmul_item(i, next, act_.data(), act16_, F, p.down, l, D, x_.data(), true, scratch);
        return;
      case 8: {
        const float* scale = l + 1 < p.L ? p.attn_norm + (l + 1) * D : p.final_norm;
        rms_norm(x_.data() + b0 * D, b1 - b0, D, scale, p.eps, h_.data() + b0 * D);
        split_rows(h_.data(), D, b0, b1, 0, D, h16_, D);
        return;
      }
    }
  }

  // Where token b's positions up to its own are in layer l's pages (at[j]: position j's run of every head's keys and
  // values; a page outside the cache reads zeros); returns how many.
  int64_t positions(int64_t l, int64_t b, std::vector<const float*>& at) const {
    const Step& p = p_;
    const int64_t pos = p.positions[b], n = pos >= 0 && pos < S() ? pos + 1 : 0, run = 2 * p.KV * p.H;
    position_runs(p.table + p.table_row[b] * p.M, p.kv + l * p.P * p.Z * run, p.P, p.Z, run, n, zeros_.data(),
                  at.data());
    return n;
  }

  // Rotary on token b's query and key heads (in qkv_), then its keys and values into its position in layer l's pages.
  void rotate_and_write(int64_t l, int64_t b) {
    const Step& p = p_;
    const int64_t H = p.H, KV = p.KV, NH = p.N * p.H;
    float* row = qkv_.data() + b * E();
    rotary(row, p.N + KV, H, cos_.data() + b * H / 2, sin_.data() + b * H / 2);  // q and k heads are adjacent
    const int64_t pos = p.positions[b];
    float* page = pos >= 0 && pos < S() ? p.page(l, b, pos / p.Z) : nullptr;
    if (page == nullptr) return;
    float* at = page + (pos % p.Z) * 2 * KV * H;
    for (int64_t kv = 0; kv < KV; ++kv) {
      std::copy(row + NH + kv * H, row + NH + (kv + 1) * H, at + 2 * kv * H);
      std::copy(row + NH + (KV + kv) * H, row + NH + (KV + kv + 1) * H, at + (2 * kv + 1) * H);
    }
  }

  Step p_;
  std::vector<float> x_, h_, qkv_, att_, act_, cos_, sin_, zeros_;  // zeros_: a position outside the cache
  Left h16_, att16_, act16_;  // on AMX: h, att and act split
  int64_t phases_;
  std::unique_ptr<Counter[]> counters_;
};

ffi::Error PagedStep(ffi::ThreadPool pool, float eps, float theta, int64_t N, int64_t KV, int64_t F, int64_t pieces,
                     int64_t threads, int64_t tokens_per_row, bool prefill, ffi::RemainingArgs args,
                     ffi::RemainingRets rets) {
  std::vector<ffi::AnyBuffer> in, outs;
  for (size_t i = 0; i < args.size(); ++i) {
    auto a = args.get<ffi::AnyBuffer>(i);
    if (!a.has_value()) return a.error();
    in.push_back(*a);
  }
  for (size_t i = 0; i < rets.size(); ++i) {
    auto r = rets.get<ffi::AnyBuffer>(i);
    if (!r.has_value()) return r.error();
    outs.push_back(**r);
  }
  if (in.size() != 14 || outs.size() != 5)
    return ffi::Error::InvalidArgument("k15 paged step: wrong number of arguments or results");
  if (pieces != 0 && pieces != 2 && pieces != 3)
    return ffi::Error::InvalidArgument("k15 paged step: pieces must be 0 (float32), 2 or 3 (AMX)");
  if (pieces && !amx_ready())
    return ffi::Error::InvalidArgument("k15 paged step: AMX weights, but this build or this CPU has no AMX");
  const bool packed[] = {false, false, false, false, true, false, true, false, true, true, false, true, false};
  const bool int8 = pieces == 3 && in[4].element_type() == ffi::S8;
  const auto packed_type = int8 ? ffi::S8 : pieces ? ffi::BF16 : ffi::F32;
  for (size_t i = 2; i < 13; ++i)
    if (in[i].element_type() != (packed[i] ? packed_type : ffi::F32))
      return ffi::Error::InvalidArgument("k15 paged step: cache, norms and embedding must be float32, packed "
                                         "weights float32 (pieces 0), bfloat16 pieces or int8 slices (AMX, 3)");
  auto f32 = [&](int i) { return reinterpret_cast<const float*>(in[i].untyped_data()); };
  const auto kvd = in[12].dimensions(), td = in[13].dimensions();
  if (kvd.size() != 5 || td.size() != 2 || in[13].element_type() != ffi::S32 || kvd[3] != 2 * KV)
    return ffi::Error::InvalidArgument("k15 paged step: the cache must be L x P x Z x 2 n_kv_heads x H float32, the "
                                       "page table R x M int32");
  Step p;
  p.L = kvd[0], p.P = kvd[1], p.Z = kvd[2], p.H = kvd[4], p.M = td[1];
  p.V = in[2].dimensions()[0], p.D = in[2].dimensions()[1];
  p.B = in[0].dimensions()[0];
  p.F = F, p.N = N, p.KV = KV, p.eps = eps, p.theta = theta, p.pieces = static_cast<int>(pieces), p.int8 = int8;
  p.prefill = prefill;
  if (tokens_per_row <= 0 || td[0] * tokens_per_row != p.B || in[1].dimensions()[0] != p.B)
    return ffi::Error::InvalidArgument("k15 paged step: tokens and positions must be R x tokens_per_row, R the page "
                                       "table's rows");
  if (outs[0].element_count() != (prefill ? 0 : p.B * p.V))
    return ffi::Error::InvalidArgument("k15 paged step: logits must be B x V (none with prefill)");
  const int64_t E = (N + 2 * KV) * p.H;
  // The elements of a packed KxN weight, `copies` of it per layer over `layers` layers.
  auto packed_size = [&](int64_t layers, int64_t copies, int64_t K, int64_t n) {
    if (int8) return layers * copies * padded(n) / 32 * (kPanelHeader + kSlices * padded64(K) * 32);
    return layers * copies * (pieces ? pieces * padded(K) : K) * padded(n);
  };
  const bool shapes_match = in[5].dimensions()[1] == E && in[4].element_count() == packed_size(p.L, 1, p.D, E) &&
                            in[6].element_count() == packed_size(p.L, 1, N * p.H, p.D) &&
                            in[8].element_count() == packed_size(p.L, 2, p.D, F) &&
                            in[9].element_count() == packed_size(p.L, 1, F, p.D) &&
                            in[11].element_count() == packed_size(1, 1, p.D, p.V);
  if (N % KV != 0 || p.H % 2 != 0 || !shapes_match || (int8 && std::max({p.D, N * p.H, F}) > kMaxInt8K))
    return ffi::Error::InvalidArgument("k15 paged step: weight shapes do not match the cache, the head counts and d_ff");
  p.tokens = reinterpret_cast<const int32_t*>(in[0].untyped_data());
  p.positions = reinterpret_cast<const int32_t*>(in[1].untyped_data());
  p.embed = f32(2), p.attn_norm = f32(3), p.qkv_bias = f32(5), p.mlp_norm = f32(7), p.final_norm = f32(10);
  p.qkv = in[4].untyped_data(), p.o = in[6].untyped_data(), p.gate_up = in[8].untyped_data();
  p.down = in[9].untyped_data(), p.head = in[11].untyped_data();
  p.kv = reinterpret_cast<float*>(outs[4].untyped_data());
  p.table = reinterpret_cast<const int32_t*>(in[13].untyped_data());
  p.logits = reinterpret_cast<float*>(outs[0].untyped_data());
  p.argmax = reinterpret_cast<int32_t*>(outs[1].untyped_data());
  p.max = reinterpret_cast<float*>(outs[2].untyped_data());
  p.lse = reinterpret_cast<float*>(outs[3].untyped_data());

  // Only tokens at a position in their pages are computed (an inactive slot, a prefill row's padding costs
  // nothing); their logits and stats are gathered back to their rows, the others' are zero.
  const int64_t B = p.B, S = p.M * p.Z;
  std::vector<int32_t> tokens, positions, table_row;
  std::vector<int64_t> rows;
  for (int64_t b = 0; b < B; ++b) {
    if (p.positions[b] < 0 || p.positions[b] >= S) continue;
    rows.push_back(b);
    tokens.push_back(p.tokens[b]), positions.push_back(p.positions[b]);
    table_row.push_back(static_cast<int32_t>(b / tokens_per_row));
  }
  const int64_t Bc = static_cast<int64_t>(rows.size());
  float *logits = p.logits, *max = p.max, *lse = p.lse;
  int32_t* argmax = p.argmax;
  std::vector<float> logits_c, max_c, lse_c;
  std::vector<int32_t> argmax_c;
  const bool gather = !prefill && Bc < B;
  if (gather) {
    logits_c.resize(Bc * p.V), max_c.resize(Bc), lse_c.resize(Bc), argmax_c.resize(Bc);
    p.logits = logits_c.data(), p.max = max_c.data(), p.lse = lse_c.data(), p.argmax = argmax_c.data();
  }
  p.B = Bc, p.tokens = tokens.data(), p.positions = positions.data(), p.table_row = table_row.data();
  int64_t parts = pool.num_threads();
  if (threads > 0) parts = std::min(parts, threads);
  if (Bc > 0) {
    auto job = std::make_shared<PhasedStep>(p);
    for (int64_t i = 1; i < parts; ++i) pool.Schedule([job] { job->work(); });
    job->work();
  }
  if (gather) {
    std::fill(logits, logits + B * p.V, 0.0f), std::fill(max, max + B, 0.0f);  // zero logits and their stats
    std::fill(lse, lse + B, std::log(static_cast<float>(p.V)));
    std::fill(argmax, argmax + B, 0);
    for (int64_t i = 0; i < Bc; ++i) {
      std::copy(logits_c.data() + i * p.V, logits_c.data() + (i + 1) * p.V, logits + rows[i] * p.V);
      max[rows[i]] = max_c[i], lse[rows[i]] = lse_c[i], argmax[rows[i]] = argmax_c[i];
    }
  }
#ifdef K15_PHASE_TIMES
  std::lock_guard<std::mutex> lock(g_times_mutex);
  g_times[2 * kPhaseKinds] += 1;
#endif
  return ffi::Error::Success();
}


// Paged attention alone (K15PagedAttentionF32), the contract of `k15.models.attention.paged_attention_xla`: queries
// q_RxTxNxH, the pages kv_XxZxCxH a page table RxM indexes, positions_RxT (int32 each) -> out_RxTxNxH, each query
// over its row's positions up to its own (a position < 0 or past the table's pages: zeros). The model's passes on
// CPU call it in place of their XLA loop, which copies every page it reads (a gather, then the keys and values
// apart) before its dots: this reads them in place. Threads take queries with an atomic counter.
struct AttentionCall {
  const float *q, *kv;
  const int32_t *table, *positions;
  float* out;
  int64_t T, NQ, KV, H, X, Z, M;
  std::atomic<int64_t> next{0}, done{0};
  int64_t total;

  void work() {
    const int64_t S = M * Z, C = 2 * KV;
    Aligned<float> scratch(attention_scratch(NQ)), zeros(C * H);
    std::vector<const float*> at(S);
    for (int64_t i = next.fetch_add(1); i < total; i = next.fetch_add(1)) {
      const int64_t r = i / T, pos = positions[i], n = pos >= 0 && pos < S ? pos + 1 : 0;
      float* o = out + i * NQ * H;
      position_runs(table + r * M, kv, X, Z, C * H, n, zeros.data(), at.data());
      if (n == 0) {
        std::fill(o, o + NQ * H, 0.0f);
      } else {
        RowFetch ahead{at.data(), n, nullptr, 0, (C * H + 15) / 16, 0};
        attend(q + i * NQ * H, KV, NQ / KV, H, at.data(), n, scratch.data(), o, ahead);
      }
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error PagedAttention(ffi::ThreadPool pool, int64_t threads, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> kv,
                          ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> positions,
                          ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = kv.dimensions(), td = table.dimensions(), pd = positions.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || td.size() != 2 || pd.size() != 2 || td[0] != qd[0] || pd[0] != qd[0] ||
      pd[1] != qd[1] || kd[3] != qd[3] || kd[2] % 2 != 0 || kd[2] == 0 || qd[2] % (kd[2] / 2) != 0)
    return ffi::Error::InvalidArgument("k15 paged attention: q must be R x T x N x H, the pages X x Z x 2K x H with N "
                                       "a multiple of K, the page table R x M and the positions R x T");
  auto call = std::make_shared<AttentionCall>();
  call->q = q.typed_data(), call->kv = kv.typed_data(), call->out = out->typed_data();
  call->table = table.typed_data(), call->positions = positions.typed_data();
  call->T = qd[1], call->NQ = qd[2], call->KV = kd[2] / 2, call->H = qd[3], call->X = kd[0], call->Z = kd[1];
  call->M = td[1], call->total = qd[0] * qd[1];
  int64_t parts = std::min<int64_t>(pool.num_threads(), call->total);
  if (threads > 0) parts = std::min(parts, threads);
  for (int64_t i = 1; i < parts; ++i) pool.Schedule([call] { call->work(); });
  call->work();
  wait_for(call->done, call->total);  // queries other threads took; a task that starts late finds none left
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(K15PagedStepF32, PagedStep,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<float>("eps")
                                  .Attr<float>("theta")
                                  .Attr<int64_t>("n_heads")
                                  .Attr<int64_t>("n_kv_heads")
                                  .Attr<int64_t>("d_ff")
                                  .Attr<int64_t>("pieces")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("tokens_per_row")
                                  .Attr<bool>("prefill")
                                  .RemainingArgs()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(K15PagedAttentionF32, PagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int64_t>("threads")
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// 1 when this build and this CPU can run the AMX matmuls (and this process may use AMX's tiles), else 0.
extern "C" int K15AmxAvailable() { return amx_ready() ? 1 : 0; }

// The bytes of the vectors this build computes on (K15_VECTOR_BYTES).
extern "C" int K15VectorBytes() { return K15_VECTOR_BYTES; }

#ifdef K15_PHASE_TIMES
// Copies the (running, waiting) seconds per phase kind and the number of calls since the last read into
// out[2 * kPhaseKinds + 1], and clears them.
extern "C" void K15PhaseTimes(double* out) {
  std::lock_guard<std::mutex> lock(g_times_mutex);
  std::copy(g_times, g_times + 2 * kPhaseKinds + 1, out);
  std::fill(g_times, g_times + 2 * kPhaseKinds + 1, 0.0);
}
#endif
