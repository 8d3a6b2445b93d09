"""Sampler throughput: k15 against transformers `generate` and the Tunix sampler, on the same weights.

  python benchmarks/sampler.py            # the full run (about 35 minutes on a 2-core CPU)
  python benchmarks/sampler.py --quick    # a small smoke run of every part

Prints, from one run: decode throughput ratios (k15 / transformers, k15 / Tunix), k15's achieved FLOP/s
as a fraction of a 2048-square float32 matmul's, and on a long-tailed length workload, slot refill with
partial rollouts against static batching (wall time, slot utilization).

k15 runs as a user gets it on CPU (the native plug-in, `sampling.backend="k15.sampling.native"`: one device, the
slots split over the cores; on a CPU with AMX its matmuls run on AMX tiles over int8 slices, with float32's
accuracy), then, where the CPU has AMX, with the plug-in's float32 FMAs, with bfloat16 pieces (`matmul="bf16x6"`,
float32's accuracy) and with the opt-in 16-bit AMX matmuls (`matmul="bf16x3"`), and with the model's own paged
passes (`sampling.backend="model"`, XLA: what runs on TPU, there with the Pallas attention) in their fastest CPU
setup (a mesh of one fake CPU device per core, slots and pages split and params replicated, each device decoding
its slots in a loop of its own), and the same passes with the plug-in's attention in place of their XLA paged
attention (`backend_options={"step": "model"}`: the model as on TPU, its attention a CPU kernel as it is the Pallas
kernel there). Each k15 run's log-probs are compared with a float32 forward over its tokens.
"""
import argparse
import collections
import contextlib
import math
import os
import tempfile
import time

# One fake CPU device per core for the run of XLA's step; set before JAX starts. The peers and the native
# step use one device (XLA's thread pool still spans every core).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={os.cpu_count()}").strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from k15 import flops, models, sampling, sharding
from k15.sampling import engine as engine_lib
from k15.sampling import native
from k15.sampling import slots as slots_lib
import qwen2_model
from timing import MATMUL_FLOPS, STREAM_PASSES, interleaved_times, matmul_run, median_ratio, stream_run


def parse_args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="small sizes: checks that every part runs")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--prompt", type=int, default=64)
  p.add_argument("--new", type=int, default=256)
  p.add_argument("--chunk", type=int, default=64, help="k15 decode steps per dispatch")
  p.add_argument("--page_size", type=int, default=16, help="positions per page of k15's KV cache")
  p.add_argument("--repeats", type=int, default=5,
                 help="timed rounds; each round runs every system once (interleaved), the best per system is kept")
  p.add_argument("--skip_tunix", action="store_true")
  p.add_argument("--skip_long_tail", action="store_true")
  p.add_argument("--long_tail_repeats", type=int, default=3,
                 help="interleaved rounds of the long-tail schedules (each several seconds); the fastest of each is kept")
  p.add_argument("--budgets", type=token_budgets, default=None,
                 help="the long-tail workload's partial-rollout token budgets per iteration, comma-separated; the "
                      "first one's run is also split by engine call (default: cap / 16, 4 and 8 times it: 32,128,256; "
                      "with --quick 4,16,32)")
  return p.parse_args()


def token_budgets(text):
  """--budgets: positive token counts, comma-separated."""
  try:
    budgets = [int(b) for b in text.split(",")]
  except ValueError:
    budgets = []
  if not budgets or min(budgets) < 1:
    raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of positive token counts")
  return budgets


def useful_flops(cfg: models.ModelConfig, batch, prompt, new):
  """Matmul and (causal) attention FLOPs of prefilling `prompt` tokens and decoding `new`, per batch."""
  tokens = prompt + new - 1  # every token but the last is fed once
  return batch * sum(flops.token_flops(cfg, c + 1) for c in range(tokens))


def weights_bytes(cfg: models.ModelConfig):
  """Float32 bytes of the weights every decode step reads: the matmul weights (output head included) and the
  norms (the embedding rows of the slots' tokens are a few KB more)."""
  return 4 * (flops.matmul_weights(cfg) + (2 * cfg.n_layers + 1) * cfg.d_model)


def step_runs(cfg, params, batch, context, steps, backend, mesh=None, page_size=16):
  """A run of `steps` decode steps of `backend` at positions centred on `context` (their mean cached length; each
  slot's pages spread over the cache), each step feeding the greedy token to the next. On a mesh each device steps
  its share of the slots over its own pages on its own (shard_map, params replicated), as k15's decode loop does
  there."""
  first = context - steps // 2
  M = -(-(first + steps) // page_size)
  shards = 1 if mesh is None else mesh.size
  kv = jnp.zeros(models.kv_pages_shape(cfg, batch * M, page_size), cfg.jnp_dtype)
  local_pages = batch * M // shards
  table = np.random.RandomState(0).permutation(local_pages)[None].repeat(shards, 0).reshape(-1)
  table = table.reshape(batch, M).astype(np.int32)  # each shard's slots over its own pages
  weights = jax.jit(backend.prepare, static_argnums=0)(cfg, replicate(params, mesh))
  scfg = sampling.SamplingConfig(page_size=page_size)

  def run_steps(weights, kv, table):
    B = table.shape[0]
    def body(i, carry):
      kv, tokens_B = carry
      positions_B = jnp.full((B,), first, jnp.int32) + i
      _, stats, kv = backend.step(cfg, scfg, weights, kv, tokens_B, positions_B, table)
      return kv, stats.argmax_B
    return jax.lax.fori_loop(0, steps, body, (kv, jnp.zeros((B,), jnp.int32)))

  if mesh is not None:
    rows, same = PartitionSpec("data"), PartitionSpec()
    run_steps = jax.shard_map(run_steps, mesh=mesh, in_specs=(same, PartitionSpec(None, "data"), rows),
                              out_specs=(PartitionSpec(None, "data"), rows), check_vma=False)
    kv = jax.device_put(kv, NamedSharding(mesh, PartitionSpec(None, "data")))
    table = jax.device_put(table, NamedSharding(mesh, rows))
  run_steps = jax.jit(run_steps)
  run = lambda: jax.block_until_ready(run_steps(weights, kv, table))
  run.compiled_text = lambda: run_steps.lower(weights, kv, table).compile().as_text()  # for profiles
  run()
  return run


def device_mesh():
  """All devices on one slot axis, or None when there is one device."""
  if jax.device_count() == 1:
    return None
  return sharding.make_mesh({"data": -1})


def replicate(params, mesh):
  return params if mesh is None else jax.device_put(params, NamedSharding(mesh, PartitionSpec()))


def bench_k15(cfg, params, prompts, args, backend, mesh=None):
  """A generate of the workload with `backend`, its tokens, and the largest gap between its log-probs and those of
  a float32 forward over prompt + response."""
  scfg = sampling.SamplingConfig(greedy=True, max_new_tokens=args.new, chunk_size=args.chunk,
                                 max_length=args.prompt + args.new, page_size=args.page_size)
  params = replicate(params, mesh)
  run = lambda: sampling.generate(cfg, params, prompts, scfg, jax.random.key(0), mesh=mesh, backend=backend)
  out = run()  # compiles every shape it meets
  full = jax.jit(models.token_logprobs, static_argnums=0)(cfg, params, np.stack([t.tokens for t in out]))
  full = np.asarray(full)  # row i, column j: log p(token j + 1 | tokens up to j)
  gap = max(np.abs(t.logprobs - full[i, len(t.prompt_tokens) - 1:][:len(t.logprobs)]).max() for i, t in enumerate(out))
  return run, np.stack([t.response_tokens for t in out]), float(gap)


# Bytes per weight the native plug-in reads, per matmul: float32, bfloat16 pieces, int8 slices.
WEIGHT_BYTES = {"float32": 4, "bf16x3": 4, "bf16x6": 6, "int8x9": 3}
# The sampler's performance targets: the native plug-in's decode against transformers and as a share of the
# matmul's FLOP/s; the model's passes (XLA) against transformers, as the hand-written XLA step reached at aa62d0e.
TARGETS = {"native": 3.5, "flops": 0.5, "xla": 1.94}


def k15_setups(cfg, mesh):
  """{name: (backend, mesh)}: k15 as a user gets it first."""
  setups = {"k15": (native.make_backend(cfg, jax.devices(), required=True), None)}
  if native.amx_available():
    for name, matmul in [("float32 FMAs", "float32"), ("bf16x6", "bf16x6"), ("bf16x3 (opt-in)", "bf16x3")]:
      setups[f"k15, {name}"] = (native.NativeBackend(matmul), None)
  if mesh is not None:
    setups[f"k15, model's passes (XLA), {jax.device_count()} devices"] = (sampling.ModelBackend(), mesh)
    setups[f"k15, model's passes + native attention, {jax.device_count()} devices"] = (
        native.make_backend(cfg, jax.devices(), step="model", required=True), mesh)
  return setups


# The rollout engine's device calls (k15.sampling.engine's and slots'), in the order a generate makes them.
ENGINE_CALLS = ("prepare", "init_state", "prefill", "load_slots", "stop_slots", "decode_chunk")


@contextlib.contextmanager
def timed_engine_calls():
  """Yields {call: [seconds, count]}, filled while inside: each of the engine's ENGINE_CALLS waited for and
  timed. Waiting serializes the host's dispatch with the device's work, so a timed run is a little slower."""
  times = collections.defaultdict(lambda: [0.0, 0])
  module = lambda name: engine_lib.RolloutEngine if name == "prepare" else slots_lib
  originals = {name: getattr(module(name), name) for name in ENGINE_CALLS}

  def timed(name, fn):
    def call(*args, **kwargs):
      start = time.perf_counter()
      out = jax.block_until_ready(fn(*args, **kwargs))
      times[name][0] += time.perf_counter() - start
      times[name][1] += 1
      return out
    return call

  for name, fn in originals.items():
    setattr(module(name), name, timed(name, fn))
  try:
    yield times
  finally:
    for name, fn in originals.items():
      setattr(module(name), name, fn)


def calls_summary(times, seconds, in_ms=True):
  """'<seconds> s = <call> <time> (<n> calls), ..., host <rest>': a run's time by engine call (timed_engine_calls)."""
  parts = [(name, *times[name]) for name in ENGINE_CALLS if name in times]
  parts.append(("host (the rest)", seconds - sum(t for _, t, _ in parts), 1))
  show = lambda t: f"{t * 1e3:.1f} ms" if in_ms else f"{t:.2f} s"
  return f"{seconds:.3f} s = " + ", ".join(f"{name} {show(t)}" + (f" ({n} calls)" if n > 1 else "")
                                           for name, t, n in parts)


def generate_breakdown(run, repeats):
  """The engine calls' times in the fastest of `repeats` runs of `run`, and that run's seconds."""
  best = None
  for _ in range(repeats):
    with timed_engine_calls() as times:
      start = time.perf_counter()
      run()
      seconds = time.perf_counter() - start
    if best is None or seconds < best[1]:
      best = (dict(times), seconds)
  return best


def bench_hf(model, prompts, args):
  import torch
  ids = torch.tensor(prompts)
  kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=args.new,
                min_new_tokens=args.new, eos_token_id=None, pad_token_id=0)
  def run():
    with torch.no_grad():
      return model.generate(ids, **kwargs)
  return run, run()[:, len(prompts[0]):].numpy()


class _IdTokenizer:
  """Token ids as text ('5 17 3'): Tunix's sampler takes strings and a tokenizer."""

  def __init__(self, pad_id):
    self._pad = pad_id

  def encode(self, text, **_):
    return [int(t) for t in text.split()]

  def decode(self, ids, **_):
    return " ".join(str(int(i)) for i in ids)

  def bos_id(self):
    return None

  def eos_id(self):
    return -1  # never sampled: no early stop

  def pad_id(self):
    return self._pad


def bench_tunix(path, cfg, prompts, args):
  from tunix.generate import sampler as tunix_sampler
  from tunix.models.qwen2 import model as tq_model
  from tunix.models.qwen2 import params as tq_params
  tcfg = tq_model.ModelConfig(num_layers=cfg.n_layers, vocab_size=cfg.vocab_size, embed_dim=cfg.d_model,
                              hidden_dim=cfg.d_ff, num_heads=cfg.n_heads, head_dim=cfg.head_dim,
                              num_kv_heads=cfg.n_kv_heads, rope_theta=int(cfg.rope_theta), norm_eps=cfg.rms_norm_eps,
                              use_tied_embedding=cfg.tie_embeddings)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"),
                           axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    model = tq_params.create_model_from_safe_tensors(path, tcfg, mesh)
  # Tunix masks every cached token equal to pad_id: use an id the prompts do not contain.
  pad = cfg.vocab_size - 1
  tok = _IdTokenizer(pad)
  cache = tunix_sampler.CacheConfig(cache_size=args.prompt + args.new, num_layers=cfg.n_layers,
                                    num_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim)
  sampler = tunix_sampler.Sampler(model, tok, cache)
  texts = [tok.decode(p) for p in prompts]
  call = lambda: sampler(texts, max_generation_steps=args.new, max_prompt_length=args.prompt, temperature=0.0,
                         eos_tokens=[-1], pad_output=True)
  def run():
    with jax.set_mesh(mesh):
      return jax.block_until_ready(call().tokens)
  tokens = np.stack([np.asarray(t)[:args.new] for t in run()])
  return run, tokens


def long_tail(cfg, params, args, backend, mesh=None):
  """RL-style iterations of new prompts whose response lengths follow a long-tailed (log-normal) law.

  Lengths are forced through per-request caps (as if EOS came there). Static batching runs each
  iteration's prompts in batches of `slots` until the longest of the batch ends; "refill" refills slots
  as trajectories end; "+ partial rollouts" also caps each trajectory at a budget of tokens per iteration
  and resumes it in the next one, re-encoding its prefix (args.budgets; by default cap / 16 tokens a segment, then
  budgets 4 and 8 times larger: fewer re-encodes, only the tail cut). After the last iteration of new prompts, one
  more iteration without a budget finishes what is left in the buffer, so every system does the same work.
  """
  rng = np.random.RandomState(0)
  params = replicate(params, mesh)
  slots, iters, per_iter, cap = (8, 3, 16, 64) if args.quick else (args.batch, 6, 128, 512)
  prompt_len, budgets = 16, args.budgets or [cap // 16 * k for k in (1, 4, 8)]
  lengths = np.clip(np.round(rng.lognormal(math.log(cap / 10), 1.0, iters * per_iter)), 4, cap).astype(int)
  prompts = rng.randint(1, cfg.vocab_size - 1, (len(lengths), prompt_len))
  requests = [sampling.Request(i, prompts[i].tolist(), max_new_tokens=int(n)) for i, n in enumerate(lengths)]
  by_iter = [requests[i * per_iter:(i + 1) * per_iter] for i in range(iters)]
  scfg = sampling.SamplingConfig(greedy=True, max_new_tokens=cap, chunk_size=args.chunk, max_length=prompt_len + cap,
                                 page_size=args.page_size)

  def run(static, token_budget):
    engine = sampling.RolloutEngine(cfg, scfg, slots, mesh, sharding.SAMPLING_RULES, backend, static_batching=static)
    buffer = sampling.ReplayBuffer() if token_budget else None
    per_iteration, done = [], 0
    start = time.perf_counter()
    for it in range(iters + (1 if token_budget else 0)):
      last = it == iters  # the drain: no new prompts, no budget
      finished, stats = engine.run(params, [] if last else by_iter[it], buffer, it, None if last else token_budget,
                                   jax.random.key(it))
      per_iteration.append(stats)
      done += len(finished)
    seconds = time.perf_counter() - start
    assert done == len(requests) and sum(s.useful_tokens for s in per_iteration) == int(lengths.sum())
    util = lambda ss: sum(s.useful_tokens for s in ss) / (slots * sum(s.decode_steps for s in ss))
    steady = per_iteration[:iters]
    return dict(seconds=seconds, util=util(per_iteration), steady_util=util(steady),
                prefill_tokens=sum(s.prefill_tokens for s in per_iteration),
                prefill_call_tokens=sum(s.prefill_call_tokens for s in per_iteration),
                decode_steps=sum(s.decode_steps for s in per_iteration),
                iter_s=np.mean([s.wall_time_s for s in steady]), drain_s=sum(s.wall_time_s for s in per_iteration[iters:]))

  results, rounds = {}, {}
  schedules = [("static batching", True, None), ("refill", False, None),
               ("refill + partial rollouts", False, budgets[0])] + [(f"... budget {b}", False, b) for b in budgets[1:]]
  for name, static, token_budget in schedules:
    run(static, token_budget)  # compiles the shapes this schedule meets
  for _ in range(args.long_tail_repeats):  # interleaved rounds; each schedule's fastest run is kept
    for name, static, token_budget in schedules:
      r = run(static, token_budget)
      rounds.setdefault(name, []).append(r["seconds"])
      if name not in results or r["seconds"] < results[name]["seconds"]:
        results[name] = r
  splits = {}  # one more run of each refill schedule, to split its time (waiting for each call slows it a little)
  for name, static, token_budget in schedules[1:]:
    with timed_engine_calls() as times:
      seconds = run(static, token_budget)["seconds"]
    splits[name] = dict(times), seconds
  return results, rounds, splits, lengths, budgets, slots, iters, per_iter


def main():
  args = parse_args()
  if args.quick:
    args.batch, args.prompt, args.new, args.chunk, args.repeats, args.long_tail_repeats = 4, 16, 32, 16, 1, 1
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores; the native kernels compute on "
        f"{native.vector_bytes()}-byte vectors, {'with' if native.amx_available() else 'without'} AMX")
  with tempfile.TemporaryDirectory() as path:
    torch_model = qwen2_model.save(path, args.quick)
    cfg, params = models.load_hf(path)
    prompts = np.random.RandomState(1).randint(1, cfg.vocab_size - 1, (args.batch, args.prompt)).tolist()
    n_tokens = args.batch * args.new
    print(f"model: width {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads}/{cfg.n_kv_heads} heads, "
          f"head_dim {cfg.head_dim}, MLP {cfg.d_ff}, vocab {cfg.vocab_size}; workload: batch {args.batch}, "
          f"prompt {args.prompt}, {args.new} new tokens, greedy, no early stop")

    setups = k15_setups(cfg, device_mesh())
    systems, gaps = {}, {}
    for name, (backend, m) in setups.items():
      *systems[name], gaps[name] = bench_k15(cfg, params, prompts, args, backend, m)
    systems["transformers"] = bench_hf(torch_model, prompts, args)
    if not args.skip_tunix:
      systems["tunix"] = bench_tunix(path, cfg, prompts, args)
    context = args.prompt + args.new // 2  # the mean cache length of the decode
    steps = min(64, args.new)
    runs = {name: run for name, (run, _) in systems.items()}
    weight_bytes = weights_bytes(cfg)
    cache_bytes = args.batch * cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * context * 4
    runs["matmul"], runs["stream"] = matmul_run(), stream_run(weight_bytes + cache_bytes)
    for name, (backend, m) in setups.items():
      runs[(name, "step")] = step_runs(cfg, params, args.batch, context, steps, backend, m, args.page_size)
    round_times = interleaved_times(runs, args.repeats)
    best = {name: min(seconds) for name, seconds in round_times.items()}
    breakdowns = {name: generate_breakdown(systems[name][0], args.repeats) for name in setups}

  k15_names = list(setups)
  k15_tokens = systems["k15"][1]
  peers = [name for name in systems if name not in k15_names]
  mm = MATMUL_FLOPS / best["matmul"]
  print(f"\n== decode throughput (new tokens / s, best of {args.repeats} interleaved rounds, prefill included) ==")
  for name, (_, tokens) in systems.items():
    agree = np.mean(tokens[:, :16] == k15_tokens[:, :16])
    gap = f"; log-probs within {gaps[name]:.1e} of a float32 forward" if name in gaps else ""
    print(f"{name:>26}: {n_tokens / best[name]:9.0f} tok/s  ({best[name]:.2f} s; first 16 tokens agree with k15: "
          f"{agree:.0%}{gap})")
  work = useful_flops(cfg, args.batch, args.prompt, args.new)
  work_prefill = useful_flops(cfg, args.batch, args.prompt, 0)  # the prompts' tokens but the last, fed by decode
  for k15 in k15_names:
    print(f"{k15}: " + ", ".join(f"{best[peer] / best[k15]:.2f}x {peer} (median of the rounds' ratios "
                                 f"{median_ratio(round_times, k15, peer):.2f}x)" for peer in peers) +
          f"; {work / best[k15] / 1e9:.1f} GFLOP/s = {work / best[k15] / mm:.0%} of a 2048^2 float32 matmul "
          f"({mm / 1e9:.1f} GFLOP/s)")

  print(f"\n== where k15's generate goes (fastest of {args.repeats} runs, each engine call waited for) ==")
  for k15 in k15_names:
    times, seconds = breakdowns[k15]
    print(f"{k15}: {calls_summary(times, seconds)}")
    decode_s, prefill_s = times["decode_chunk"][0], times["prefill"][0]
    print(f"  decode chunks {decode_s / seconds:.0%} of it ({decode_s / args.new * 1e3:.2f} ms a step); prefill "
          f"{prefill_s / seconds:.0%} ({work_prefill / prefill_s / mm:.0%} of the matmul's FLOP/s on its "
          f"{args.batch * args.prompt} tokens)")

  print(f"\n== one decode step (batch {args.batch}, {context} cached positions: the decode's mean) against the "
        f"machine's floors ==")
  bandwidth = STREAM_PASSES * (weight_bytes + cache_bytes) / best["stream"]
  for k15 in k15_names:
    matmul = getattr(setups[k15][0], "matmul", "float32")
    step_bytes = cache_bytes + weight_bytes * WEIGHT_BYTES[matmul] // 4
    print(f"{k15}: {best[(k15, 'step')] / steps * 1e3:.2f} ms; reads {step_bytes / 1e6:.1f} MB "
          f"({step_bytes / bandwidth * 1e3:.2f} ms at the streaming rate)")
  read_s = (weight_bytes + cache_bytes) / bandwidth
  compute_s = args.batch * 2 * flops.matmul_weights(cfg) / mm
  print(f"a step reads the weights ({weight_bytes / 1e6:.1f} MB in float32, {1.5 * weight_bytes / 1e6:.1f} MB as 3 "
        f"bfloat16 pieces, {0.75 * weight_bytes / 1e6:.1f} MB as 3 int8 slices) and KV cache "
        f"({cache_bytes / 1e6:.1f} MB); the float32 weights and the cache take "
        f"{read_s * 1e3:.2f} ms at the streaming rate ({bandwidth / 1e9:.1f} GB/s: stream.cc reading as many "
        f"bytes on every core); its matmuls take {compute_s * 1e3:.2f} ms at the 2048^2 float32 matmul's rate")
  step_s = best[("k15", "step")] / steps
  for what, seconds in [("k15's step", step_s), ("reads and matmuls one after the other", read_s + compute_s),
                        ("reads and matmuls fully overlapped", max(read_s, compute_s))]:
    decode_s = args.new * seconds
    print(f"  a decode at the pace of {what} (prefill free): {n_tokens / decode_s:.0f} tok/s = " +
          ", ".join(f"{best[peer] / decode_s:.2f}x {peer}" for peer in peers) + f", {work / decode_s / mm:.0%} of the matmul")

  tail = {} if args.skip_long_tail else long_tails(cfg, params, args, setups)
  if not args.quick:  # its sizes are too small for the targets to mean anything
    print_targets(best, round_times, work, mm, k15_names, tail)


def print_targets(best, times, work, mm, k15_names, tail):
  """The sampler's performance targets, each against this run's figure."""
  print("\n== against the sampler's targets (transformers measured in this run) ==")
  verdict = lambda met: "met" if met else "missed"
  for k15 in k15_names:
    target = TARGETS["xla"] if "model's passes" in k15 else TARGETS["native"]
    ratio = best["transformers"] / best[k15]
    line = (f"{k15}: {ratio:.2f}x transformers (median of the rounds' ratios "
            f"{median_ratio(times, k15, 'transformers'):.2f}x), target {target}x: {verdict(ratio >= target)}")
    if k15 == "k15":
      share = work / best[k15] / mm
      line += f"; {share:.0%} of the matmul, target {TARGETS['flops']:.0%}: {verdict(share >= TARGETS['flops'])}"
    print(line)
  for k15, (budget, ratio, median) in tail.items():
    print(f"long tail, {k15}: refill + partial rollouts (budget {budget}) {ratio:.3f}x refill's time (median of the "
          f"rounds' ratios {median:.3f}x), target at most 1x: {verdict(ratio <= 1)}")


def long_tails(cfg, params, args, setups):
  """Runs and prints the long-tail workload for k15 as a user gets it and the setups over a mesh; returns, per setup,
  its best budget: (budget, partial rollouts' time / refill's, the median of the rounds' ratios)."""
  tail = {}
  for name, (backend, m) in setups.items():
    if name != "k15" and m is None:
      continue  # the other native matmuls: the user's setup stands for them
    results, rounds, splits, lengths, budgets, slots, iters, per_iter = long_tail(cfg, params, args, backend, m)
    print(f"\n== long-tailed lengths, {name}: {iters} iterations x {per_iter} new prompts over {slots} slots; response "
          f"lengths median {int(np.median(lengths))}, mean {lengths.mean():.0f}, p99 {int(np.percentile(lengths, 99))}, "
          f"max {lengths.max()}; partial-rollout budget {budgets[0]} tokens/iteration ==")
    base = results["static batching"]
    for schedule, r in results.items():
      print(f"{schedule:>26}: total {r['seconds']:6.2f} s ({int(lengths.sum()) / r['seconds']:5.0f} tok/s, "
            f"{r['seconds'] / base['seconds']:.2f}x static), per iteration {r['iter_s']:5.2f} s "
            f"({r['iter_s'] / base['iter_s']:.2f}x static), final drain {r['drain_s']:5.2f} s; slot utilization: "
            f"iterations {r['steady_util']:.0%}, overall {r['util']:.0%}; {r['prefill_tokens']} tokens encoded "
            f"(calls of {r['prefill_call_tokens'] / r['prefill_tokens']:.2f}x as many), "
            f"{r['decode_steps']} decode steps")
    refill = results["refill"]["seconds"]
    partial = {b: (results[schedule]["seconds"] / refill, median_ratio(rounds, "refill", schedule))
               for b, schedule in zip(budgets, list(results)[2:])}  # budget -> its time / refill's, both ways
    print("partial rollouts' time / refill's, fastest runs (median over rounds of each round's ratio): " +
          ", ".join(f"budget {b} {ratio:.3f}x ({median:.3f}x)" for b, (ratio, median) in partial.items()))
    best_budget = min(partial, key=lambda b: partial[b][0])
    tail[name] = (best_budget, *partial[best_budget])
    print("run again with each engine call waited for:")
    for schedule, (times, seconds) in splits.items():
      print(f"{schedule:>26}: {calls_summary(times, seconds, in_ms=False)}")
  return tail


if __name__ == "__main__":
  main()
