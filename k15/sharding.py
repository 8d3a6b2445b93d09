"""Device mesh, logical axis rules and shardings for params, optimizer state and batches.

Modules name LOGICAL axes ('embed', 'mlp', 'heads', ...); the rules (in the experiment config, t5x /
MaxText style) map each to zero or more mesh axes. A mesh axis that does not divide a dimension is
dropped for that dimension (it stays replicated there), so tiny test models run on any mesh.
"""
import os
from typing import Optional, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# (logical axis, mesh axes): the minimal data / fsdp / tensor rule set of training (FSDP over 'fsdp', tensor
# parallelism over 'tensor').
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("activation_batch", ("data", "fsdp")),
    ("cache_batch", ("data", "fsdp")),
    ("cache_pages", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("activation_vocab", "tensor"),
    ("mlp", "tensor"),
    ("activation_mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("activation_length", None),
    ("activation_embed", None),
)

# The sampling layout: decode reads every weight once per step, so the weights are split over 'tensor' only
# (tensor parallel: two all-reduces of the slots' activations per layer) and whole on each 'data' / 'fsdp'
# device; slots, their prefill rows and the KV cache's pages are split over 'data' and 'fsdp', the cache's kv
# heads and the logits' vocab over 'tensor'.
SAMPLING_RULES = tuple((name, None if name == "embed" else axes) for name, axes in DEFAULT_RULES)


def mesh_shape(sizes: dict, num_devices: int, dcn_data: int = 1) -> tuple:
  """Resolves axis sizes where one may be -1 ('the rest of the devices').

  dcn_data > 1: the devices are on that many slices; `sizes` are per slice, and 'data' in the result spans them.
  """
  if dcn_data > 1:
    if num_devices % dcn_data:
      raise ValueError(f"mesh.dcn_data={dcn_data} slices do not split {num_devices} devices evenly")
    per_slice = mesh_shape(sizes, num_devices // dcn_data)
    return (dcn_data * per_slice[0],) + per_slice[1:]
  unknown = [a for a in MESH_AXES if sizes.get(a, 1) == -1]
  if len(unknown) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {unknown}")
  known = int(np.prod([sizes.get(a, 1) for a in MESH_AXES if a not in unknown]))
  if num_devices % known:
    raise ValueError(f"mesh {dict(sizes)}: fixed axes use {known} devices, which does not divide {num_devices}")
  shape = tuple(num_devices // known if a in unknown else sizes.get(a, 1) for a in MESH_AXES)
  if int(np.prod(shape)) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {int(np.prod(shape))} devices, "
                     f"there are {num_devices}")
  return shape


def device_array(sizes: dict, devices: Sequence, dcn_data: int = 1) -> np.ndarray:
  """The devices laid out as the mesh of `sizes`. dcn_data > 1 (multi-slice): jax's hybrid device mesh, 'data'
  parallel across the slices (over the data-center network) and every axis also within each slice (over ICI);
  slices are the devices' slice_index, or their processes on platforms without slices (CPU)."""
  shape = mesh_shape(sizes, len(devices), dcn_data)
  if dcn_data == 1:
    try:
      return mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # fake CPU devices and odd shapes: plain order is fine
      return np.asarray(devices).reshape(shape)
  per_slice = (shape[0] // dcn_data,) + shape[1:]
  # Platforms without slices (CPU, GPU) put every device on slice 0 or give none: their processes are the slices.
  by_process = len({getattr(d, "slice_index", 0) for d in devices}) == 1
  found = len({getattr(d, "process_index" if by_process else "slice_index") for d in devices})
  if found != dcn_data:
    raise ValueError(f"mesh.dcn_data={dcn_data}: the {len(devices)} devices are on {found} "
                     f"{'processes' if by_process else 'slices'}")
  return mesh_utils.create_hybrid_device_mesh(per_slice, (dcn_data,) + (1,) * (len(MESH_AXES) - 1), devices,
                                              process_is_granule=by_process)


def make_mesh(sizes: dict, devices: Optional[Sequence] = None, dcn_data: int = 1) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh with Auto axis types (GSPMD sharding propagation); dcn_data: slices that
  'data' spans (device_array)."""
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh: unknown axes {sorted(unknown)}; known: {list(MESH_AXES)}")
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(device_array(sizes, devices, dcn_data), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _rule_map(rules) -> dict:
  out = {}
  for logical, mesh_axes in rules:
    if mesh_axes is None:
      mesh_axes = ()
    elif isinstance(mesh_axes, str):
      mesh_axes = (mesh_axes,)
    out.setdefault(logical, tuple(mesh_axes))  # first rule wins, as in flax
  return out


def logical_to_spec(logical_axes, shape, mesh: Mesh, rules) -> PartitionSpec:
  """PartitionSpec for one array: logical names -> mesh axes that divide the dimension, each used once."""
  rule_map = _rule_map(rules)
  used, spec = set(), []
  for name, dim in zip(tuple(logical_axes) + (None,) * (len(shape) - len(logical_axes)), shape):
    if name is not None and name not in rule_map:
      raise ValueError(f"no sharding rule for logical axis {name!r}; add it to sharding.logical_axis_rules")
    chosen, size = [], 1
    for axis in rule_map.get(name, ()):
      n = mesh.shape[axis]
      if axis in used or n == 1 or dim % (size * n):
        continue
      chosen.append(axis)
      size *= n
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  return PartitionSpec(*spec)


def context_mesh_axes(logical: str, size: int) -> tuple:
  """Inside jax.set_mesh and flax's logical_axis_rules: the mesh axes `logical` maps to that split a dimension of
  `size` (in rule order; axes of size 1 and axes an enclosing shard_map already split are left out)."""
  import flax.core.spmd  # pylint: disable=g-import-not-at-top
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  chosen, n = [], 1
  for axis in _rule_map(flax.core.spmd.get_logical_axis_rules() or ()).get(logical, ()):
    if mesh.shape.get(axis, 1) > 1 and axis not in mesh.manual_axes and size % (n * mesh.shape[axis]) == 0:
      chosen.append(axis)
      n *= mesh.shape[axis]
  return tuple(chosen)


def tree_shardings(logical_tree, abstract_tree, mesh: Mesh, rules):
  """NamedShardings for a pytree, given its logical PartitionSpecs and shapes."""
  return jax.tree.map(
      lambda logical, x: NamedSharding(mesh, logical_to_spec(tuple(logical), x.shape, mesh, rules)),
      logical_tree, abstract_tree, is_leaf=lambda x: isinstance(x, PartitionSpec))


def param_shardings(model_cfg, mesh: Mesh, rules=DEFAULT_RULES):
  from k15 import models  # the model module imports flax; keep sharding importable on its own
  return tree_shardings(models.param_logical_axes(model_cfg), models.abstract_params(model_cfg), mesh, rules)


def opt_state_shardings(optimizer, abstract_params, params_shardings, mesh: Mesh):
  """Shardings for optimizer state: param-shaped leaves follow their param, the rest are replicated."""
  import optax
  abstract_state = jax.eval_shape(optimizer.init, abstract_params)
  replicated = NamedSharding(mesh, PartitionSpec())
  return optax.tree_map_params(
      optimizer, lambda _, sharding: sharding, abstract_state, params_shardings,
      transform_non_params=lambda _: replicated)


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES, batch_size: Optional[int] = None):
  """Leading (batch) dim over the data axes, the rest replicated."""
  shape = (batch_size if batch_size is not None else int(np.prod(mesh.devices.shape)),) + (1,) * (ndim - 1)
  return NamedSharding(mesh, logical_to_spec(("batch",), shape, mesh, rules))


def replicated(mesh: Mesh):
  return NamedSharding(mesh, PartitionSpec())


def initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, local_device_ids=None) -> bool:
  """Joins a multi-host run. A no-op on one process; returns whether JAX distributed was initialized.

  On Cloud TPU pods all arguments may be left None (JAX discovers the slice). Elsewhere they come from
  the arguments or K15_COORDINATOR / K15_NUM_PROCESSES / K15_PROCESS_ID (the local launcher sets these).
  """
  coordinator_address = coordinator_address or os.environ.get("K15_COORDINATOR")
  num_processes = num_processes or int(os.environ.get("K15_NUM_PROCESSES", "0")) or None
  if process_id is None and "K15_PROCESS_ID" in os.environ:
    process_id = int(os.environ["K15_PROCESS_ID"])
  on_tpu_pod = "TPU_WORKER_HOSTNAMES" in os.environ or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ
  if not on_tpu_pod and (num_processes is None or num_processes == 1):
    return False
  # Cross-process collectives for CPU devices (the local multi-process launcher); TPUs ignore it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_device_ids)
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True


def to_host(tree):
  """Numpy values of a pytree of arrays, on every process (all must call it).

  An array sharded over other processes' devices cannot be fetched locally (device_get raises); it is
  gathered with process_allgather. Fully addressable or fully replicated arrays are read directly.
  """
  def get(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
      return multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))
  return jax.tree.map(get, tree)


def sync_processes(name: str):
  """A barrier across processes (a no-op on one): e.g. process 0 writes shared files, the others wait."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
