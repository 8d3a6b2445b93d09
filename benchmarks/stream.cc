// A streaming read for benchmarks/sampler.py's floors: `passes` passes over a float32 array, split into
// contiguous shares over `threads` threads, each summing with 4 AVX-512-wide sums in flight (the rate a
// decode step can read its weights and KV cache, from whichever level of the memory holds an array of
// that size). XLA's and numpy's reductions read well below this rate on a CPU.
#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4), may_alias));

static double sum_share(const float* p, int64_t n, int64_t passes) {
  v16 s[4] = {};
  double total = 0.0;
  for (int64_t pass = 0; pass < passes; ++pass) {
    int64_t i = 0;
    for (; i + 64 <= n; i += 64)
      for (int j = 0; j < 4; ++j) s[j] += *reinterpret_cast<const v16u*>(p + i + 16 * j);
    for (; i < n; ++i) total += p[i];  // the tail past the last whole 64 values
  }
  for (int j = 0; j < 16; ++j) total += static_cast<double>(s[0][j]) + s[1][j] + s[2][j] + s[3][j];
  return total;
}

// The sum of every value read, over all passes (exact for an array of ones up to 2^24 values per lane: the
// caller checks it, and it keeps the reads from being optimized away).
extern "C" double k15_stream(const float* p, int64_t n, int64_t passes, int64_t threads) {
  std::vector<double> sums(threads);
  std::vector<std::thread> pool;
  const int64_t share = (n / threads + 63) / 64 * 64;
  for (int64_t t = 0; t < threads; ++t) {
    const int64_t begin = std::min(n, t * share), end = std::min(n, begin + share);
    pool.emplace_back([&sums, p, begin, end, passes, t] { sums[t] = sum_share(p + begin, end - begin, passes); });
  }
  double total = 0.0;
  for (int64_t t = 0; t < threads; ++t) pool[t].join(), total += sums[t];
  return total;
}
