"""Memory and FLOPs of a config on a mesh, per device, without weights or devices: pick a slice before paying for it.

  python -m experiments.plan --config=experiments/configs/qwen_math.py:1.5b,v5p-32
  python -m experiments.plan --config=experiments/configs/qwen_math.py:7b,v5p-128 --mesh=data=1,fsdp=16,tensor=4
  python -m experiments.plan --config=experiments/configs/qwen_math.py:7b-32k,v5p-128

Params and optimizer state are the abstract leaves (jax.eval_shape) split by the shardings the run would use, on
a jax.sharding.AbstractMesh of the slice's shape; the KV caches are the rollout engine's own arrays at full length.
Activations and FLOPs are estimates from the shapes (formulas below), for the worst case: every prompt at
data.max_prompt_len and every response at the length schedule's longest rl.max_response_len. The peak is that of
the largest phase (PHASES): rollout, training and evaluation do not hold each other's caches and activations. A
config fits when the peak is at most 90% of HBM. The train step and a decode chunk are traced abstractly at full
size on the mesh, which checks that every shape fits together.

FLOPs are k15.flops's count. One RL iteration: decode of every response token, prefill of each prompt and of every
partial-rollout resume (its prefix re-encoded), one reference pass, and training (backward = 2x forward; remat adds
one more forward).
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from k15 import config as config_lib
from k15 import flops, models, sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/configs/*.py).",
                                          lock_config=True)
_MESH = flags.DEFINE_string("mesh", None, "Mesh sizes, e.g. data=1,fsdp=32,tensor=4 (default: config.mesh).")
_ACCELERATOR = flags.DEFINE_string("accelerator", None,
                                   "TPU slice, e.g. v5p-128 or v5litepod-32 (default: config.tpu.accelerator_type): "
                                   "the device count for a -1 mesh axis, HBM and peak FLOP/s.")
_DEVICES = flags.DEFINE_integer("devices", None, "Device count when no accelerator is known.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens when the config has no data.max_prompt_len.")
_TRACE = flags.DEFINE_bool("trace", True, "Trace the train step and a decode chunk abstractly at full size.")

GiB = 2**30
FIT_SHARE = 0.9  # of HBM; the rest is for XLA's own buffers and fragmentation
# What each phase of an RL iteration holds beside the params and optimizer state: the rollout engine frees its cache
# before training (RolloutEngine.release), and evaluation's engine is made after that and dropped when it ends.
PHASES = {"rollout": ("sampling_params", "rollout_kv_cache"), "training": ("gradients", "activations"),
          "evaluation": ("sampling_params", "eval_kv_cache")}


def parse_mesh(text: str) -> dict:
  """'data=1,fsdp=32,tensor=4' -> {'data': 1, 'fsdp': 32, 'tensor': 4}."""
  sizes = {}
  for part in filter(None, text.split(",")):
    name, _, value = part.partition("=")
    if name.strip() not in sharding.MESH_AXES or not value.strip().lstrip("-").isdigit():
      raise ValueError(f"--mesh={text!r}: expected axis=size pairs over {list(sharding.MESH_AXES)}")
    sizes[name.strip()] = int(value)
  return sizes


def slice_of(config, accelerator=None):
  """The TPU slice facts (launch.tpu.slice_info) of --accelerator or config.tpu.accelerator_type, or None."""
  accelerator = accelerator or (config.tpu.accelerator_type if config.tpu else None)
  if not accelerator:
    return None
  from launch import tpu  # pylint: disable=g-import-not-at-top
  return tpu.slice_info(accelerator)


def resolve_mesh(config, mesh_sizes=None, info=None, devices=None) -> dict:
  """Mesh axis sizes for the plan: --mesh or config.mesh, a -1 axis taking the slice's remaining devices; on
  config.mesh.dcn_data slices, 'data' spans them all."""
  sizes = dict(mesh_sizes or config.mesh.sizes())
  dcn = config.mesh.dcn_data
  devices = info["chips"] * dcn if info else devices
  if devices is None:
    if any(v == -1 for v in sizes.values()):
      raise ValueError(f"mesh {sizes} has a -1 axis: give --accelerator (or config.tpu.accelerator_type) or --devices")
    devices = int(np.prod(list(sizes.values()))) * dcn
  return dict(zip(sharding.MESH_AXES, sharding.mesh_shape(sizes, devices, dcn)))


def abstract_mesh(sizes: dict) -> AbstractMesh:
  return AbstractMesh(tuple(sizes[a] for a in sharding.MESH_AXES), sharding.MESH_AXES,
                      axis_types=(AxisType.Auto,) * len(sharding.MESH_AXES))


def tree_bytes(abstract_tree, shardings=None):
  """(total bytes, bytes on one device) of a pytree of ShapeDtypeStructs split by NamedShardings."""
  leaves = jax.tree.leaves(abstract_tree)
  shards = jax.tree.leaves(shardings) if shardings is not None else [None] * len(leaves)
  total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)
  per_device = sum(int(np.prod(s.shard_shape(x.shape) if s is not None else x.shape)) * x.dtype.itemsize
                   for x, s in zip(leaves, shards))
  return total, per_device


def lengths(config, prompt_len=None) -> dict:
  """Worst-case sequence lengths of the run, as the loop and the engines round them."""
  Lp = config.data.max_prompt_len if config.data.source == "prompts" else int(prompt_len or _PROMPT_LEN.default)
  R = config.rl.longest_lengths()[0]  # the length schedule's longest stage
  return dict(prompt=Lp, response=R, rollout_cache=8 * -(-(Lp + R) // 8), train=32 * -(-(Lp + R) // 32),
              eval_cache=16 * -(-(Lp + int(config.eval.max_response_len)) // 16))


def minibatch_rows(config) -> int:
  """Rows of one training minibatch, as k15.rl.loop._minibatches pads them (whole groups, multiples of 4)."""
  per = -(-int(config.rl.prompts_per_iteration) // int(config.rl.minibatches))
  return 4 * -(-per // 4) * int(config.rl.samples_per_prompt)


def _model_and_rules(config):
  return config.model, tuple(tuple(r) for r in config.sharding.logical_axis_rules)


def _sampling_rules(config):
  return tuple(tuple(r) for r in config.sharding.sampling_rules)


def sharding_problems(config, sizes: dict) -> list:
  """Everything that would not split over the mesh as the rules ask (jax would silently replicate it)."""
  model_cfg, rules = _model_and_rules(config)
  mesh = abstract_mesh(sizes)
  rule_map = sharding._rule_map(rules)  # pylint: disable=protected-access
  problems = []
  logical = models.param_logical_axes(model_cfg)
  flat_logical = jax.tree_util.tree_leaves_with_path(logical, is_leaf=lambda x: isinstance(x, PartitionSpec))
  for (path, names), x in zip(flat_logical, jax.tree.leaves(models.abstract_params(model_cfg))):
    spec = sharding.logical_to_spec(tuple(names), x.shape, mesh, rules)
    for dim, (name, got) in enumerate(zip(tuple(names), tuple(spec) + (None,) * len(x.shape))):
      want = [a for a in rule_map.get(name, ()) if sizes[a] > 1]
      got = () if got is None else (got,) if isinstance(got, str) else tuple(got)
      missing = [a for a in want if a not in got]
      if missing:
        problems.append(f"param {jax.tree_util.keystr(path)} dim {dim} ({name}={x.shape[dim]}) is not split over "
                        f"{missing} (sizes {[sizes[a] for a in missing]})")
  from k15.sampling import engine  # pylint: disable=g-import-not-at-top
  _, slot_shards = engine.slot_axes_of(mesh, _sampling_rules(config))
  if config.sampling.num_slots % slot_shards:
    problems.append(f"sampling.num_slots={config.sampling.num_slots} is not a multiple of the {slot_shards} slot "
                    "shards (data x fsdp)")
  batch_shards = sizes["data"] * sizes["fsdp"]
  rows = minibatch_rows(config)
  if rows % batch_shards:
    problems.append(f"a training minibatch has {rows} rows, not a multiple of data x fsdp = {batch_shards}: it would "
                    "be replicated")
  return problems


def sampler_state(config, mesh, length: int):
  """The rollout engine's slot state for sequences of `length` (its paged KV cache at the config's pages, 0: every
  slot at full length, and the slot arrays), as ShapeDtypeStructs with the engine's shardings on `mesh`."""
  from k15.rl import rollout  # pylint: disable=g-import-not-at-top
  from k15.sampling import engine, slots  # pylint: disable=g-import-not-at-top
  scfg = rollout.sampling_config(config.sampling, eos_id=1, max_length=length, max_new_tokens=1, temperature=1.0)
  num_slots = int(config.sampling.num_slots)
  layout, _, num_pages = engine.sampling_layout(config.model, scfg, num_slots, mesh, _sampling_rules(config))
  state = jax.eval_shape(lambda: slots.init_state(config.model, scfg, num_slots, num_pages, slots.Layout(None, None, ())))
  shardings = slots.SlotState(layout.kv, *([layout.slots] * (len(slots.SlotState._fields) - 1)))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings), layout


def _cache_bytes(config, mesh, length: int):
  """(total, per device) bytes of the rollout engine's slot state (paged KV cache, token history)."""
  state, _ = sampler_state(config, mesh, length)
  return tree_bytes(state, jax.tree.map(lambda x: x.sharding, state))


def sampling_params_bytes(config, mesh):
  """(total, per device) bytes of the params in the sampling layout and the compute dtype: the copy each rollout
  phase moves them into."""
  dtype = config.model.jnp_dtype
  compute = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), models.abstract_params(config.model))
  return tree_bytes(compute, sharding.param_shardings(config.model, mesh, _sampling_rules(config)))


def iteration_flops(config, seq: dict) -> dict:
  """FLOPs of one RL iteration (worst case), by phase."""
  cfg, _ = _model_and_rules(config)
  n = int(config.rl.prompts_per_iteration) * int(config.rl.samples_per_prompt)
  Lp, R, budget = seq["prompt"], seq["response"], config.rl.longest_lengths()[1]
  budget = int(budget) if config.rl.partial_rollouts else R
  decode = n * R * flops.token_flops(cfg, seq["rollout_cache"])  # worst case: every sequence at full length
  segments = max(1, -(-R // budget))  # a response spans this many iterations; each resume re-encodes its prefix
  prefill = n * sum(flops.forward_flops(cfg, Lp + j * budget) for j in range(segments))
  reference = n * flops.forward_flops(cfg, Lp + R)
  training = n * flops.forward_flops(cfg, seq["train"]) * (4 if cfg.remat else 3)
  out = dict(decode=decode, prefill=prefill, reference=reference, training=training)
  out["total"] = sum(out.values())
  return out


def activation_bytes(config, sizes: dict, seq: dict) -> dict:
  """Estimates, per device: a training step's activations, and a reference pass over one minibatch of rows.

  With remat each layer's input is kept for the backward, and one layer at a time is recomputed: its q/k/v/o, MLP
  hidden and their gradients (twice a layer's forward working set). Attention scores are float32: B x N x T x T
  (score and probability) with dense attention, a block's B x N x block x block (three) with blockwise or splash.
  The log-probs' float32 logits come model.logprob_chunk positions at a time (all T when 0): a chunk's B x chunk x V
  and, in the backward, its recomputation and gradient (2.5 chunks, as XLA schedules them on the tested shapes).
  V, N and F are split over 'tensor' where they divide. tests/test_real_configs.py checks the training estimate
  against the compiled step's memory_analysis on 8 fake devices.
  """
  cfg, rules = _model_and_rules(config)
  act = jnp.dtype(cfg.dtype).itemsize
  T, tensor = seq["train"], sizes["tensor"]
  split = lambda n: n // tensor if n % tensor == 0 else n
  V, N, F = split(cfg.vocab_size), split(cfg.n_heads), split(cfg.d_ff)
  mesh = abstract_mesh(sizes)
  blockwise = cfg.attention in ("blockwise", "splash") or (cfg.attention == "auto" and T > cfg.attention_block)
  chunk = min(T, cfg.logprob_chunk or T)

  def rows_per_device(rows):
    return sharding.batch_sharding(mesh, 2, rules, batch_size=rows).shard_shape((rows, T))[0]

  def layer(b):  # one layer's working set: q/k/v/o, MLP hidden, attention scores
    scores = b * N * cfg.attention_block ** 2 * 4 * 3 if blockwise else b * N * T * T * 4 * 2
    return b * T * (4 * cfg.d_model + 3 * F) * act + scores

  def logits(b, copies):
    return int(b * chunk * V * 4 * copies)

  b = rows_per_device(minibatch_rows(config))
  kept = cfg.n_layers * b * T * cfg.d_model * act if cfg.remat else cfg.n_layers * layer(b)
  train = kept + 2 * layer(b) + logits(b, 2.5)
  b_ref = b  # k15.rl.loop computes reference log-probs one minibatch of rows at a time
  reference = layer(b_ref) + logits(b_ref, 2)
  return dict(train=train, reference=reference, train_rows_per_device=b, reference_rows_per_device=b_ref)


def plan(config, sizes: dict, info=None, prompt_len=None) -> dict:
  """Bytes per device and FLOPs of `config` on a mesh of `sizes` (see the module docstring)."""
  from k15.rl import loop  # pylint: disable=g-import-not-at-top
  model_cfg, rules = _model_and_rules(config)
  mesh = abstract_mesh(sizes)
  seq = lengths(config, prompt_len)
  abstract = models.abstract_params(model_cfg)
  p_shard = sharding.param_shardings(model_cfg, mesh, rules)
  optimizer = loop.rl_optimizer(config.rl)
  opt_abstract = jax.eval_shape(optimizer.init, abstract)
  o_shard = sharding.opt_state_shardings(optimizer, abstract, p_shard, mesh)
  params, params_dev = tree_bytes(abstract, p_shard)
  opt, opt_dev = tree_bytes(opt_abstract, o_shard)
  kv, kv_dev = _cache_bytes(config, mesh, seq["rollout_cache"])
  kv_eval, kv_eval_dev = _cache_bytes(config, mesh, seq["eval_cache"])
  sampling_params, sampling_params_dev = sampling_params_bytes(config, mesh)
  kv_spec = sampler_state(config, mesh, seq["rollout_cache"])[0].kv.sharding.spec
  acts = activation_bytes(config, sizes, seq)
  work = iteration_flops(config, seq)
  devices = int(np.prod(list(sizes.values())))
  per_device = dict(params=params_dev, optimizer=opt_dev, gradients=params_dev, sampling_params=sampling_params_dev,
                    rollout_kv_cache=kv_dev, eval_kv_cache=kv_eval_dev,
                    activations=max(acts["train"], acts["reference"]))
  phases = {name: sum(per_device[k] for k in ("params", "optimizer") + items) for name, items in PHASES.items()}
  return dict(
      model=model_cfg, sizes=sizes, devices=devices, info=info, seq=seq, num_params=model_cfg.num_params(),
      params_bytes=params, params_bytes_per_device=params_dev, opt_bytes=opt, opt_bytes_per_device=opt_dev,
      kv_bytes=kv, kv_bytes_per_device=kv_dev, eval_kv_bytes=kv_eval, eval_kv_bytes_per_device=kv_eval_dev,
      kv_spec=kv_spec, sampling_params_bytes=sampling_params, sampling_params_bytes_per_device=sampling_params_dev,
      activations=acts, per_device=per_device, phases=phases, total_per_device=max(phases.values()), flops=work,
      flops_per_device=work["total"] / devices, problems=sharding_problems(config, sizes))


def train_step_args(config, mesh, prompt_len=None):
  """(train step, params, optimizer state, minibatch): the RL train step and ShapeDtypeStructs of its arguments at
  full size, with the run's shardings on `mesh` (a Mesh, or an AbstractMesh to trace without devices)."""
  from k15.rl import loop, trainer  # pylint: disable=g-import-not-at-top
  model_cfg, rules = _model_and_rules(config)
  seq = lengths(config, prompt_len)
  abstract = models.abstract_params(model_cfg)
  p_shard = sharding.param_shardings(model_cfg, mesh, rules)
  optimizer = loop.rl_optimizer(config.rl)
  opt_state = _with_sharding(jax.eval_shape(optimizer.init, abstract),
                             sharding.opt_state_shardings(optimizer, abstract, p_shard, mesh))
  rows, T = minibatch_rows(config), seq["train"]
  batch_sharding = lambda ndim: sharding.batch_sharding(mesh, ndim, rules, batch_size=rows)
  batch = {"tokens": jax.ShapeDtypeStruct((rows, T), jnp.int32, sharding=batch_sharding(2))}
  for name in ("mask", "ref_logp"):
    batch[name] = jax.ShapeDtypeStruct((rows, T - 1), jnp.float32, sharding=batch_sharding(2))
  for name in ("rewards", "weights"):
    batch[name] = jax.ShapeDtypeStruct((rows,), jnp.float32, sharding=batch_sharding(1))
  step = trainer.train_step(loop.make_loss_fn(model_cfg, config.rl), optimizer)
  return step, _with_sharding(abstract, p_shard), opt_state, batch


def _with_sharding(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_trace(config, sizes: dict, prompt_len=None):
  """Traces the train step (loss, gradients, optimizer) and one decode chunk at full size on an abstract mesh.

  Returns (loss, chunk output) as ShapeDtypeStructs; shape or sharding errors raise here, before any slice exists.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from k15 import sampling  # pylint: disable=g-import-not-at-top
  from k15.rl import rollout  # pylint: disable=g-import-not-at-top
  from k15.sampling import slots  # pylint: disable=g-import-not-at-top
  model_cfg, rules = _model_and_rules(config)
  mesh = abstract_mesh(sizes)
  seq = lengths(config, prompt_len)
  train_step, params, opt_state, batch = train_step_args(config, mesh, prompt_len)
  scfg = rollout.sampling_config(config.sampling, eos_id=1, max_length=seq["rollout_cache"],
                                 max_new_tokens=seq["response"], temperature=config.sampling.temperature)
  state, layout = sampler_state(config, mesh, seq["rollout_cache"])
  backend = sampling.ModelBackend()
  weights = backend.weights_like(model_cfg, _with_sharding(models.abstract_params(model_cfg),  # the sampling layout
                                                           sharding.param_shardings(model_cfg, mesh, layout.rules)))
  table = jax.ShapeDtypeStruct((int(config.sampling.num_slots), scfg.pages_per_slot), jnp.int32, sharding=layout.slots)
  with jax.sharding.use_abstract_mesh(mesh), nn.logical_axis_rules(rules):
    _, _, metrics = jax.eval_shape(train_step, params, opt_state, batch)
  with jax.sharding.use_abstract_mesh(mesh):  # the model's passes, tensor parallel: one SPMD loop
    _, chunk = jax.eval_shape(lambda w, s, t: slots.decode_chunk(backend, model_cfg, scfg, layout, False, w, s, t,
                                                                 jnp.int32(1)), weights, state, table)
  return metrics["loss"], chunk


def _count(n):
  return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _gib(n):
  return f"{n / GiB:8.2f} GiB"


def _split(spec) -> str:
  """'data x fsdp, tensor' for the page and kv head dims of the cache's PartitionSpec."""
  name = lambda axes: "none" if axes is None else axes if isinstance(axes, str) else " x ".join(axes)
  return f"{name(spec[1] if len(spec) > 1 else None)}, {name(spec[3] if len(spec) > 3 else None)}"


def format_plan(p: dict, name: str = "") -> str:
  cfg, sizes, info, seq = p["model"], p["sizes"], p["info"], p["seq"]
  mesh = " ".join(f"{a}={sizes[a]}" for a in sharding.MESH_AXES)
  slices = f"{p['devices'] // info['chips']} x " if info and p["devices"] > info["chips"] else ""
  chip = (f"{slices}{info['accelerator_type']}: {info['chips']} {info['chip']} chips on {info['hosts']} hosts, "
          f"{info['hbm_bytes'] / GiB:.0f} GiB HBM and {info['peak_flops'] / 1e12:.0f} TFLOP/s bf16 per chip"
          if info else "no accelerator given")
  lines = [
      f"plan {name}".rstrip(),
      f"  model   {_count(p['num_params'])} params: {cfg.n_layers} layers, d_model {cfg.d_model}, heads "
      f"{cfg.n_heads}/{cfg.n_kv_heads} kv, d_ff {cfg.d_ff}, vocab {cfg.vocab_size}; params {cfg.param_dtype}, "
      f"compute {cfg.dtype}, remat {'on' if cfg.remat else 'off'}",
      f"  mesh    {mesh} = {p['devices']} devices ({chip})",
      f"  lengths prompt <= {seq['prompt']}, response <= {seq['response']}: rollout cache {seq['rollout_cache']}, "
      f"train {seq['train']}, eval cache {seq['eval_cache']} tokens",
      "",
      "  memory per device                   bytes            ",
      f"    params                   {p['params_bytes_per_device']:>16,d}  {_gib(p['params_bytes_per_device'])}"
      f"   (one copy: {p['params_bytes']:,d} B)",
      f"    optimizer state          {p['opt_bytes_per_device']:>16,d}  {_gib(p['opt_bytes_per_device'])}"
      f"   (one copy: {p['opt_bytes']:,d} B)",
      f"    gradients                {p['params_bytes_per_device']:>16,d}  {_gib(p['params_bytes_per_device'])}",
      f"    params, sampling layout  {p['sampling_params_bytes_per_device']:>16,d}  "
      f"{_gib(p['sampling_params_bytes_per_device'])}   (compute dtype, split over 'tensor' only; moved into once per "
      "rollout phase)",
      f"    rollout KV cache         {p['kv_bytes_per_device']:>16,d}  {_gib(p['kv_bytes_per_device'])}"
      f"   (one copy: {p['kv_bytes']:,d} B; pages, kv heads split over {_split(p['kv_spec'])})",
      f"    eval KV cache            {p['eval_kv_bytes_per_device']:>16,d}  {_gib(p['eval_kv_bytes_per_device'])}",
      f"    activations (estimate)   {p['per_device']['activations']:>16,d}  {_gib(p['per_device']['activations'])}"
      f"   (train step {p['activations']['train_rows_per_device']} rows/device: "
      f"{p['activations']['train'] / GiB:.2f} GiB; reference pass {p['activations']['reference_rows_per_device']} "
      f"rows/device: {p['activations']['reference'] / GiB:.2f} GiB)",
      *[f"    {name + ' phase':<24} {p['phases'][name]:>16,d}  {_gib(p['phases'][name])}   "
        f"(params, optimizer state, {', '.join(k.replace('_', ' ') for k in PHASES[name])})" for name in PHASES],
      f"    peak                     {p['total_per_device']:>16,d}  {_gib(p['total_per_device'])}   "
      f"({max(p['phases'], key=p['phases'].get)})",
  ]
  if info:
    share = p["total_per_device"] / info["hbm_bytes"]
    lines.append(f"    HBM per chip             {info['hbm_bytes']:>16,d}  {_gib(info['hbm_bytes'])}   " +
                 (f"fits ({share:.0%})" if share <= FIT_SHARE else
                  f"DOES NOT FIT ({share:.0%}; at most {FIT_SHARE:.0%} leaves room for XLA's own buffers)"))
  f = p["flops"]
  lines += [
      "",
      "  FLOPs per RL iteration (worst case: every response at max length)",
      *[f"    {k:<24} {f[k]:12.3e}" for k in ("decode", "prefill", "reference", "training", "total")],
      f"    per device               {p['flops_per_device']:12.3e}" +
      (f"   >= {p['flops_per_device'] / info['peak_flops']:.1f} s per iteration at 100% of peak" if info else ""),
  ]
  lines += ["", "  sharding: every dimension splits as the rules ask" if not p["problems"] else
            "  sharding problems:"] + [f"    - {q}" for q in p["problems"]]
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    config = config_lib.from_config_dict(_CONFIG.value)
    info = slice_of(config, _ACCELERATOR.value)
    sizes = resolve_mesh(config, parse_mesh(_MESH.value) if _MESH.value else None, info, _DEVICES.value)
  except Exception as e:  # a flag or mesh that does not describe a slice: say which, without a traceback
    raise app.UsageError(str(e)) from e
  p = plan(config, sizes, info, _PROMPT_LEN.value)
  print(format_plan(p, config_flags.get_config_filename(flags.FLAGS["config"])))
  if _TRACE.value:
    loss, chunk = abstract_trace(config, sizes, _PROMPT_LEN.value)
    print(f"\n  abstract trace at full size: train step loss {loss.shape} {loss.dtype}, decode chunk tokens "
          f"{chunk.tokens_BxC.shape} - ok")
  return 1 if p["problems"] else 0


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `launch` beside `experiments`
  app.run(lambda argv: sys.exit(main(argv)))
