"""kernels.cc's paged attention alone, as a paged-attention function of the model's passes on CPU."""
import os

import jax
import jax.numpy as jnp
import numpy as np

from k15.sampling.native import build


def threads_per_call() -> int:
  """Threads per call: inside a shard_map each local device runs its share side by side, sharing the cores (0:
  XLA's whole CPU thread pool)."""
  if jax.sharding.get_abstract_mesh().manual_axes:
    return max(1, (os.cpu_count() or 1) // jax.local_device_count())
  return 0


def paged_attention(q_RxTxNxH, kv_XxZxCxH, page_table_RxM, positions_RxT, pages_per_block=None):
  """`k15.models.attention.paged_attention_xla`'s contract (each query over its row's positions <= its own; a
  position < 0: zeros), reading the pages in place. float32; `pages_per_block` is the XLA loop's and unused."""
  del pages_per_block
  build.require("the native paged attention")
  call = jax.ffi.ffi_call(build.ATTENTION_TARGET, jax.ShapeDtypeStruct(q_RxTxNxH.shape, jnp.float32))
  out = call(jnp.asarray(q_RxTxNxH, jnp.float32), jnp.asarray(kv_XxZxCxH, jnp.float32),
             jnp.asarray(page_table_RxM, jnp.int32), jnp.asarray(positions_RxT, jnp.int32),
             threads=np.int64(threads_per_call()))
  return out.astype(q_RxTxNxH.dtype)
