// The k15 transformer's CPU kernels in float32, as XLA FFI handlers: one decode step (K15DecodeStepF32) and, on
// CPUs with AMX tiles, prefill's matmuls (K15MatmulAmx).
//
// XLA's CPU backend runs a decode step of a small model as dozens of separate kernels (each matmul, norm,
// rotary, cache write and softmax its own dispatch), and its matmuls with one row per slot run well below
// the machine's matmul rate. The step handler does the whole step in one call: register-blocked matmuls over
// the fused weights, attention that reads each slot's cache only up to its own position, and the cache
// written in place (the cache inputs alias the cache outputs). The threads of XLA's CPU pool share the work
// phase by phase (`PhasedStep`): matmuls split by columns, attention by slots. It computes the same function as
// `k15.sampling.step.decode_step`; tests compare the two logit for logit. Its matmuls run either as float32
// FMAs (`pieces` 0) or on AMX tiles over bfloat16 pieces of both operands (`pieces` 2 or 3; see "Matmuls on AMX
// tiles" below) or over int8 slices (int8 weights, `pieces` 3; "Matmuls on AMX int8 tiles").
//
// Step arguments, in order (float32 unless noted; "packed" is `slab`'s layout of a KxN weight, ceil(N/32) Kx32
// panels, stacked over layers as LxPxKx32, or with pieces, `native.pack_amx`'s bfloat16 or `pack_int8`'s layout):
//   tokens_B (int32), positions_B (int32), embed_VxD, attn_norm_LxD, qkv (packed, N = E = (n_heads + 2
//   n_kv_heads) head_dim), qkv_bias_LxE, o (packed, K = n_heads head_dim, N = D), mlp_norm_LxD, gate_up (gate
//   and up packed each, N = F, their panels alternating), down (packed, K = F), final_norm_D, head (packed,
//   K = D, N = V), then L key caches BxKxHxS and L value caches BxKxSxH.
// Results: logits_BxV; per slot the first index of its largest logit (int32, V - 1 when a logit is NaN, as
// `select.first_argmax`), that logit and log sum exp(logits - it) (float32 each); then the L key caches and
// L value caches (aliasing the inputs). The sampling loop takes the greedy token and log-probs from these.
// A slot whose position is outside [0, S) writes nothing and gets garbage logits (inactive slots).
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

// K15_NO_AMX builds what a CPU without AMX gets (a test builds it so on any CPU).
#if defined(__AMX_BF16__) && defined(__AVX512BF16__) && !defined(K15_NO_AMX)
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
constexpr int kPhaseKinds = 11;  // PhasedStep::Kind; native.PHASE_KINDS names them
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

// x[:n] = softmax(scale * x[:n]), in place. The last n % 16 values go through one vector whose other lanes hold
// -inf (exp gives 0 there): short rows (prefill's first positions) would spend most of their time in scalar exps.
void softmax(float* x, int64_t n, float scale) {
  const int64_t body = n / 16 * 16;
  alignas(64) float tail[16];
  for (int64_t i = 0; i < 16; ++i) tail[i] = body + i < n ? x[body + i] * scale : -INFINITY;
  v16 mxv = load(tail);
  for (int64_t s = 0; s < body; s += 16) {
    v16 v = load(x + s) * scale;
    store(x + s, v);
    mxv = v > mxv ? v : mxv;
  }
  float mx = -INFINITY;
  for (int i = 0; i < 16; ++i) mx = std::max(mx, mxv[i]);
  v16 sumv = vexp(load(tail) - mx);
  store(tail, sumv);
  for (int64_t s = 0; s < body; s += 16) {
    v16 e = vexp(load(x + s) - mx);
    store(x + s, e);
    sumv += e;
  }
  float sum = 0.0f;
  for (int i = 0; i < 16; ++i) sum += sumv[i];
  for (int64_t s = 0; s < body; s += 16) store(x + s, load(x + s) / sum);
  for (int64_t i = 0; body + i < n; ++i) x[body + i] = tail[i] / sum;
}

// out_GxH = softmax(q_GxH k_HxS[:, :n] / sqrt(H)) v_SxH[:n]: the G query heads of one kv head over positions < n.
// `keys` and `values`: the next kv head's cache, fetched while the score and value products run.
void attend(const float* q, int64_t G, int64_t H, const float* k, const float* v, int64_t S, int64_t n,
            float* scores, float* out, Ahead& keys, Ahead& values) {
  matmul_strided(q, H, G, H, k, S, n, scores, S, &keys);
  keys.rest();
  for (int64_t g = 0; g < G; ++g) softmax(scores + g * S, n, 1.0f / std::sqrt(static_cast<float>(H)));
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
  const float *embed, *attn_norm, *qkv_bias, *mlp_norm, *final_norm;
  const void *qkv, *o, *gate_up, *down, *head;  // packed: float32 (pieces 0) or bfloat16 pieces for AMX
  int pieces;  // 0: float32 FMAs; 2 or 3: bfloat16 pieces (or with `int8`, 3 int8 slices) of each operand on AMX
  bool int8;  // the packed weights are int8 slices (`pack_int8`)
  std::vector<float*> k_caches, v_caches;
  float* logits;
  int32_t* argmax;
  float *max, *lse;
  float eps, theta;
  int64_t B, L, V, D, N, KV, H, S, F;
};

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
    cos_.resize(B * p.H / 2), sin_.resize(B * p.H / 2);
    phases_ = 3 + kLayerPhases * p.L;
    counters_.reset(new Counter[phases_]);
  }

  void work() {
    Scratch scratch{Aligned<float>((p_.N / p_.KV) * p_.S), Aligned<float>(Mp() * 32), Aligned<float>(Mp() * 32),
                    Aligned<float>(Mp() * 32)};
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
  };
  static constexpr int64_t kSlotsPerItem = 2, kPanelsPerItem = 2, kAmxPanelsPerItem = 4;
  // Panels per matmul item: AMX tile loads stream longer runs of a weight faster, while a phase keeps at least
  // 8 items for the threads to share.
  int64_t per_item(int64_t cols) const {
    return p_.pieces && ceil_div(cols, 32) >= 8 * kAmxPanelsPerItem ? kAmxPanelsPerItem : kPanelsPerItem;
  }

  int64_t E() const { return (p_.N + 2 * p_.KV) * p_.H; }
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

  // Phase ph: 0 embeds; then per layer 8 phases (qkv, attention, o, norm, gate_up, act split, down, norm); then
  // the head; last the logits' stats. kind(ph) numbers them in that order, 0 to 10 (the layer's phases 1 to 8).
  // The act split has items with int8 slices only (their scale per row needs all of gate_up's columns); the
  // other matmuls split act panel by panel in gate_up.
  enum Kind { kEmbed, kQkv, kAttention, kO, kMlpNorm, kGateUp, kActSplit, kDown, kNorm, kHead, kStats };
  static constexpr int64_t kLayerPhases = 8;
  Kind kind(int64_t ph) const {
    if (ph == 0) return kEmbed;
    if (ph == phases_ - 2) return kHead;
    if (ph == phases_ - 1) return kStats;
    return static_cast<Kind>(1 + (ph - 1) % kLayerPhases);
  }

  int64_t items(int64_t ph) const {
    switch (kind(ph)) {
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
    for (int64_t n = n0; n < n1; n += 32) {
      const float* panel = W + (n / 32) * K * 32;
      const float* after = n + 32 < n1 ? panel + K * 32 : next >= 0 ? W + next * panels * K * 32 : nullptr;
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
        split_rows(att_.data(), NH, b0, b1, 0, NH, att16_, NH);
        return;
      }
      case 2:
        matmul_item(i, next, att_.data(), att16_, NH, p.o, l, D, x_.data(), true, scratch);
        return;
      case 3:
        rms_norm(x_.data() + b0 * D, b1 - b0, D, p.mlp_norm + l * D, p.eps, h_.data() + b0 * D);
        split_rows(h_.data(), D, b0, b1, 0, D, h16_, D);
        return;
      case 4: {  // act = silu(h Wgate) * (h Wup): the gate and up panels of the same columns together
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
            slab(h_.data(), D, B, D, gate_panel, 32, gate, 32, false, cols, up_panel);
            const float* after = n + 32 < n1 ? up_panel + D * 32
                               : next >= 0 ? W + 2 * next * panels * D * 32 : nullptr;
            slab(h_.data(), D, B, D, up_panel, 32, up, 32, false, cols, after);
          }
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
          if (!p.int8) split_rows(act_.data(), F, 0, B, n, cols, act16_, F);
        }
        return;
      }
      case 5:  // int8 slices only: act's rows, once gate_up has written all their columns
        split_rows(act_.data(), F, b0, b1, 0, F, act16_, F);
        return;
      case 6:
        matmul_item(i, next, act_.data(), act16_, F, p.down, l, D, x_.data(), true, scratch);
        return;
      case 7: {
        const float* scale = l + 1 < p.L ? p.attn_norm + (l + 1) * D : p.final_norm;
        rms_norm(x_.data() + b0 * D, b1 - b0, D, scale, p.eps, h_.data() + b0 * D);
        split_rows(h_.data(), D, b0, b1, 0, D, h16_, D);
        return;
      }
    }
  }

  Step p_;
  std::vector<float> x_, h_, qkv_, att_, act_, cos_, sin_;
  Left h16_, att16_, act16_;  // on AMX: h, att and act split
  int64_t phases_;
  std::unique_ptr<Counter[]> counters_;
};

ffi::Error DecodeStep(ffi::ThreadPool pool, float eps, float theta, int64_t N, int64_t KV, int64_t F, int64_t pieces,
                      int64_t threads, ffi::RemainingArgs args, ffi::RemainingRets rets) {
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
  if (pieces != 0 && pieces != 2 && pieces != 3)
    return ffi::Error::InvalidArgument("k15 decode step: pieces must be 0 (float32), 2 or 3 (AMX)");
  if (pieces && !amx_ready())
    return ffi::Error::InvalidArgument("k15 decode step: AMX weights, but this build or this CPU has no AMX");
  const bool packed[] = {false, false, false, false, true, false, true, false, true, true, false, true};
  const bool int8 = pieces == 3 && in[4].element_type() == ffi::S8;
  const auto packed_type = int8 ? ffi::S8 : pieces ? ffi::BF16 : ffi::F32;
  for (size_t i = 2; i < in.size(); ++i)
    if (in[i].element_type() != (i < 12 && packed[i] ? packed_type : ffi::F32))
      return ffi::Error::InvalidArgument("k15 decode step: caches, norms and embedding must be float32, packed "
                                         "weights float32 (pieces 0), bfloat16 pieces or int8 slices (AMX, 3)");
  auto f32 = [&](int i) { return reinterpret_cast<const float*>(in[i].untyped_data()); };
  Step p;
  p.L = (in.size() - 12) / 2;
  p.V = in[2].dimensions()[0], p.D = in[2].dimensions()[1];
  p.S = in[12].dimensions()[3], p.H = in[12].dimensions()[2];
  p.F = F, p.N = N, p.KV = KV, p.eps = eps, p.theta = theta, p.pieces = static_cast<int>(pieces), p.int8 = int8;
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
    return ffi::Error::InvalidArgument("k15 decode step: weight shapes do not match the head counts and d_ff");
  p.tokens = reinterpret_cast<const int32_t*>(in[0].untyped_data());
  p.positions = reinterpret_cast<const int32_t*>(in[1].untyped_data());
  p.embed = f32(2), p.attn_norm = f32(3), p.qkv_bias = f32(5), p.mlp_norm = f32(7), p.final_norm = f32(10);
  p.qkv = in[4].untyped_data(), p.o = in[6].untyped_data(), p.gate_up = in[8].untyped_data();
  p.down = in[9].untyped_data(), p.head = in[11].untyped_data();
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


// Items [0, items) shared by XLA's CPU threads: each thread takes the next from a counter (`run_items`). The
// caller runs items too and then waits only for items taken (`run_parallel`), so it never waits on a pool task
// that has not started; a task that starts late finds nothing left.
struct Parallel {
  int64_t items = 0;
  std::atomic<int64_t> next{0};
  alignas(64) std::atomic<int64_t> done{0};

  template <class F>
  void run_items(F&& run) {
    for (int64_t i; (i = next.fetch_add(1)) < items;) {
      run(i);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// job->work() (which calls run_items) on up to `threads` threads (0: all of the pool's) and the caller; returns
// once every item is done.
template <class Job>
void run_parallel(ffi::ThreadPool& pool, int64_t threads, const std::shared_ptr<Job>& job) {
  int64_t parts = pool.num_threads();
  if (threads > 0) parts = std::min(parts, threads);
  for (int64_t i = 1; i < parts; ++i) pool.Schedule([job] { job->work(); });
  job->work();
  wait_for(job->done, job->items);
}

// ---- Matmul on AMX tiles (prefill) ----
// y[M x N] = x[M x K] W for a packed weight W (`native.pack_amx`, layer `layer` of its stack) on AMX tiles; with
// `swiglu`, W holds gate and up panels alternating (`native.pack_pairs`) and y[M x N] = silu(x Wgate) * (x Wup).
// Prefill's matmuls have thousands of rows: the work is split into items of (a block of rows, a group of output
// panels) that XLA's CPU threads take from a counter; each item splits its rows into bfloat16 pieces (kept in
// L2 while its panels stream past) and runs `amx_rows` over them. The caller never waits on a pool task that
// has not started: it runs items too and waits only for items taken.
// Rows per item: a block's bfloat16 pieces take about 256 KB, so they stay in L2 while the panels stream past
// (128 KB and 512 KB measured no faster on prefill's shapes).
inline int64_t row_block(int64_t K, const AmxFormat& amx) {
  return std::clamp<int64_t>(256 * 1024 / amx.left_row_bytes(K) / 32 * 32, 32, 512);
}

// dst[:cols] = silu(gate) * up for one row of a panel (cols <= 32).
inline void swiglu_row(const float* gate, const float* up, int64_t cols, float* dst) {
  int64_t c = 0;
  for (; c + 16 <= cols; c += 16) {
    const v16 g = load(gate + c);
    store(dst + c, g * (1.0f / (1.0f + vexp(-g))) * load(up + c));
  }
  for (; c < cols; ++c) dst[c] = gate[c] * (1.0f / (1.0f + exp1(-gate[c]))) * up[c];
}

struct MatmulJob : Parallel {
  const float* x;
  const void* w;  // the layer's panels
  float* y;
  int64_t M, K, N, out_panels, groups;
  AmxFormat amx;
  bool swiglu;

  void work() {
#if K15_AMX
    configure_tiles();
    const int64_t rb_rows = row_block(K, amx), Mb = std::min(rb_rows, padded_rows(M));
    Aligned<uint8_t> A(Mb * amx.left_row_bytes(K));
    std::vector<float> scale(Mb, 1.0f);
    Aligned<float> out(Mb * 32), gate(Mb * 32);
    auto panel = [&](int64_t Mp, int64_t j, float* out) { amx.panel(A.data(), scale.data(), Mp, K, w, j, out); };
    run_items([&](int64_t i) {
      const int64_t rb = i / groups, g = i % groups;
      const int64_t r0 = rb * rb_rows, rows = std::min(rb_rows, M - r0), Mp = padded_rows(rows);
      std::fill(A.begin(), A.end(), 0);  // the padding rows and columns
      for (int64_t r = 0; r < rows; ++r) amx.split_row(x + (r0 + r) * K, K, 0, A.data(), scale.data(), Mp, K, r);
      const int64_t p0 = g * out_panels / groups, p1 = (g + 1) * out_panels / groups;
      for (int64_t j = p0; j < p1; ++j) {
        const int64_t cols = std::min<int64_t>(32, N - 32 * j);
        float* dst = y + r0 * N + 32 * j;
        if (swiglu) {
          panel(Mp, 2 * j, gate.data());
          panel(Mp, 2 * j + 1, out.data());
          for (int64_t b = 0; b < rows; ++b) swiglu_row(gate.data() + b * 32, out.data() + b * 32, cols, dst + b * N);
        } else {
          panel(Mp, j, out.data());
          for (int64_t b = 0; b < rows; ++b) std::copy(out.data() + b * 32, out.data() + b * 32 + cols, dst + b * N);
        }
      }
    });
    _tile_release();
#endif
  }
};

ffi::Error Matmul(ffi::ThreadPool pool, int64_t layer, int64_t n_cols, bool swiglu, int64_t threads, ffi::AnyBuffer x,
                  ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y) {
  if (!amx_ready()) return ffi::Error::InvalidArgument("k15 matmul: this build or this CPU has no AMX");
  const auto xd = x.dimensions(), wd = w.dimensions();
  const bool int8 = w.element_type() == ffi::S8;
  // bfloat16 pieces: [L x] P x K/32 x pieces x 2 x 16 x 32; int8 slices: [L x] P x (header + K/64 x 3 x 2 x 1024)
  const size_t rank = int8 ? 2 : 6;
  if (x.element_type() != ffi::F32 || (w.element_type() != ffi::BF16 && !int8) || y->element_type() != ffi::F32 ||
      wd.size() < rank || wd.size() > rank + 1 ||
      (!int8 && (wd[wd.size() - 3] != 2 || wd[wd.size() - 2] != kTile || wd[wd.size() - 1] != 32)))
    return ffi::Error::InvalidArgument("k15 matmul: x float32 (... x K), w packed bfloat16 pieces (pack_amx) or "
                                       "int8 slices (pack_int8)");
  const int64_t K = xd[xd.size() - 1], M = x.element_count() / K, pieces = int8 ? kSlices : wd[wd.size() - 4];
  const int64_t layers = wd.size() == rank + 1 ? wd[0] : 1, panels = wd[wd.size() - rank];
  const int64_t out_panels = (n_cols + 31) / 32;
  const bool k_matches = int8 ? wd[wd.size() - 1] == kPanelHeader + kSlices * padded64(K) * 32 && K <= kMaxInt8K
                              : wd[wd.size() - 5] * 32 == padded(K);
  if ((pieces != 2 && pieces != 3) || !k_matches || layer < 0 || layer >= layers ||
      panels != (swiglu ? 2 : 1) * out_panels || y->element_count() != M * n_cols)
    return ffi::Error::InvalidArgument("k15 matmul: shapes of x, w and y do not match");
  auto job = std::make_shared<MatmulJob>();
  job->x = reinterpret_cast<const float*>(x.untyped_data());
  job->w = static_cast<const char*>(w.untyped_data()) + layer * (w.size_bytes() / layers);
  job->y = reinterpret_cast<float*>(y->untyped_data());
  job->M = M, job->K = K, job->N = n_cols, job->amx = {pieces, int8}, job->out_panels = out_panels;
  job->swiglu = swiglu;
  const int64_t parts = std::max<int64_t>(1, threads > 0 ? std::min<int64_t>(threads, pool.num_threads())
                                                         : pool.num_threads());
  const int64_t block = row_block(K, job->amx), row_blocks = (M + block - 1) / block;
  job->groups = std::min(out_panels, std::max<int64_t>(1, (4 * parts + row_blocks - 1) / row_blocks));  // 4 per thread
  job->items = row_blocks * job->groups;
  run_parallel(pool, threads, job);
  return ffi::Error::Success();
}


// ---- Causal attention for prefill ----
// out[p, t] = softmax(q[p, t] k[p, :t + 1]^T / sqrt(H)) v[p, :t + 1] for every row p, position t and query head,
// grouped-query (n_heads / n_kv_heads query heads per kv head). XLA runs prefill's attention as many small
// batched dots, far below the machine's matmul rate; here each item is one (row, kv head): its keys (transposed)
// and values copied once into scratch blocks, then per query head and block of kBlockRows positions the scores
// against the positions before the block's end (register-blocked `slab`s), their softmax and the weighted sum
// of the values.
struct AttentionJob : Parallel {
  const float *q, *k, *v;
  float* out;
  int64_t T, N, KV, H;

  void work() {
    constexpr int64_t kBlockRows = 32;
    const int64_t G = N / KV, Tp = padded(T), Hp = padded(H);
    const float scale = 1.0f / std::sqrt(static_cast<float>(H));
    // A slab reads whole 32-column panels: keys as HxTp, values as TxHp, scores as rows of Tp (zero padding).
    Aligned<float> keys(H * Tp), values(T * Hp), scores(kBlockRows * Tp);
    run_items([&](int64_t item) {
      const int64_t p = item / KV, kv = item % KV;
      for (int64_t s = 0; s < T; ++s) {
        const float* ks = k + ((p * T + s) * KV + kv) * H;
        for (int64_t h = 0; h < H; ++h) keys[h * Tp + s] = ks[h];
        std::copy(v + ((p * T + s) * KV + kv) * H, v + ((p * T + s) * KV + kv + 1) * H, values.data() + s * Hp);
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t t0 = 0; t0 < T; t0 += kBlockRows) {
          const int64_t rows = std::min(kBlockRows, T - t0), n = t0 + rows;  // positions < n
          const float* queries = q + ((p * T + t0) * N + kv * G + g) * H;
          float* o = out + ((p * T + t0) * N + kv * G + g) * H;
          for (int64_t c = 0; c < n; c += 32)
            slab(queries, N * H, rows, H, keys.data() + c, Tp, scores.data() + c, Tp, false,
                 std::min<int64_t>(32, n - c));
          for (int64_t r = 0; r < rows; ++r) {
            float* row = scores.data() + r * Tp;
            softmax(row, t0 + r + 1, scale);
            std::fill(row + t0 + r + 1, row + padded(n), 0.0f);  // the future, and the slab's padding: no weight
          }
          for (int64_t c = 0; c < H; c += 32)
            slab(scores.data(), Tp, rows, n, values.data() + c, Hp, o + c, N * H, false, std::min<int64_t>(32, H - c));
        }
    });
  }
};

ffi::Error PrefillAttention(ffi::ThreadPool pool, int64_t threads, ffi::AnyBuffer q, ffi::AnyBuffer k,
                            ffi::AnyBuffer v, ffi::Result<ffi::AnyBuffer> out) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  if (q.element_type() != ffi::F32 || k.element_type() != ffi::F32 || v.element_type() != ffi::F32 ||
      qd.size() != 4 || kd.size() != 4 || qd[0] != kd[0] || qd[1] != kd[1] || qd[3] != kd[3] || qd[2] % kd[2] != 0 ||
      v.element_count() != k.element_count() || out->element_count() != q.element_count())
    return ffi::Error::InvalidArgument("k15 prefill attention: q PxTxNxH, k and v PxTxKxH float32, N a multiple of K");
  auto job = std::make_shared<AttentionJob>();
  job->q = reinterpret_cast<const float*>(q.untyped_data());
  job->k = reinterpret_cast<const float*>(k.untyped_data());
  job->v = reinterpret_cast<const float*>(v.untyped_data());
  job->out = reinterpret_cast<float*>(out->untyped_data());
  job->T = qd[1], job->N = qd[2], job->KV = kd[2], job->H = qd[3], job->items = qd[0] * kd[2];
  run_parallel(pool, threads, job);
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
                                  .Attr<int64_t>("d_ff")
                                  .Attr<int64_t>("pieces")
                                  .Attr<int64_t>("threads")
                                  .RemainingArgs()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(K15PrefillAttention, PrefillAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int64_t>("threads")
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(K15MatmulAmx, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int64_t>("layer")
                                  .Attr<int64_t>("n_cols")
                                  .Attr<bool>("swiglu")
                                  .Attr<int64_t>("threads")
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

// 1 when this build and this CPU can run the AMX matmuls (and this process may use AMX's tiles), else 0.
extern "C" int K15AmxAvailable() { return amx_ready() ? 1 : 0; }

#ifdef K15_PHASE_TIMES
// Copies the (running, waiting) seconds per phase kind and the number of calls since the last read into
// out[2 * kPhaseKinds + 1], and clears them.
extern "C" void K15PhaseTimes(double* out) {
  std::lock_guard<std::mutex> lock(g_times_mutex);
  std::copy(g_times, g_times + 2 * kPhaseKinds + 1, out);
  std::fill(g_times, g_times + 2 * kPhaseKinds + 1, 0.0);
}
#endif
