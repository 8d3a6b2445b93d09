"""A CPU plug-in for the sampler: kernels.cc, hand-written C++ through XLA's FFI, as its prefill and decode step.

On a CPU, XLA runs a small model's decode step as dozens of separate kernels, and its matmuls with one row per slot
run well below the machine's matmul rate. kernels.cc does a whole paged pass (a decode step, or a prefill of pages
of sequences) in one call: register-blocked matmuls over weights packed for them (`weights`), attention that reads
each token's pages of the paged KV cache only up to its own position, the cache written in place, the work shared
by XLA's CPU threads phase by phase. It computes what the model's paged pass computes (`k15.models.forward_paged`;
the tests hold them to each other and to transformers). On a CPU with AMX tiles its matmuls can run on them
(`weights.MATMUL_PIECES`).

Its attention also runs alone (`attention.paged_attention`) inside the model's passes: the backend option
step="model" keeps XLA's passes, split over a mesh as on TPU, and swaps their paged attention (a loop that copies
every page it reads, `k15.models.attention.paged_attention_xla`) for this one, which reads them in place.

Select it with config.sampling.backend = "k15.sampling.native" (`k15.sampling.load_backend` calls `make_backend`);
nothing else in k15 imports it. `build` compiles kernels.cc on first use and caches the library.
"""
from k15.sampling.native.attention import paged_attention
from k15.sampling.native.backend import NativeBackend, make_backend, paged_step
from k15.sampling.native.build import BuildError, amx_available, vector_bytes
from k15.sampling.native.weights import MATMUL_PIECES, NativeWeights, native_weights
