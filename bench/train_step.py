#!/usr/bin/env python
"""Training throughput (images/s) and peak memory of one SNUNet-CBAM training step, per variant.

Every variant is built through ``snunet_cbam.step.TrainStep`` (the class the trainer runs), on the
real model (``build_model(TrainConfig(...))``), ``HybridLoss`` and AdamW with the trainer's
parameter groups, fed random ``(batch, 3, crop, crop)`` pairs and a random 0/1 mask.

    eager          contiguous, fp32, no autocast, no compile            (the baseline)
    channels_last  channels_last, fp32, no compile
    amp            channels_last + Precision.choose(device, amp=True), no compile
                   (what the trainer runs with the default compile=auto on a CPU)
    bf16           channels_last + bf16 autocast forced, no compile
    compile_fp32   contiguous, fp32, torch.compile
    auto           the trainer's defaults to the letter: channels_last, precision and compile all
                   "auto" (on a CPU: no compile; on CUDA: compile)
    optimized      channels_last "auto" (NHWC on CUDA / bf16 CPUs), Precision.choose + compile forced
    optimized_bf16 channels_last + bf16 autocast forced + torch.compile
    max_autotune   as optimized, but torch.compile(mode="max-autotune-no-cudagraphs")
                   (an experiment: TrainStep has no mode argument, so its forward is swapped)

Methodology: each variant lives in its own worker process (so its memory can be measured on its
own); the parent warms every variant up (a compile's cold start happens there and is reported as
"compile s"), then runs the timed repeats interleaved (eager, optimized, eager, optimized, ...)
so that a noisy neighbour slows all variants alike. Only one worker runs at a time. Reported:
the median images/s over the repeats (an image = one pair of dates), its ratio to ``eager``, and,
as a cross-check on a shared machine, the median CPU-seconds per image of the worker's threads
(``time.process_time``) and the ratio of those: wall time also counts the time other processes
held the cores, CPU time does not (only on CPU; on CUDA it is the host's launch cost).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset after warm-up, so it is the
steady-state step, weights and optimizer state included). On CPU the worker's peak resident set
(``VmHWM``, reset after warm-up through ``/proc/self/clear_refs``) minus its RSS after building the
model, loss, optimizer and inputs ("peak"; it holds the optimizer state, the step's activations and,
for compiled variants, what the compiler keeps resident), and that peak minus the RSS between two
steps after warm-up ("step": the transient memory of one step). Where ``clear_refs`` cannot be
written, ``ru_maxrss`` (which then includes the warm-up and the compile) is used; the JSON says which.

    .venv/bin/python bench/train_step.py --base-channel 16 --crop 256 --batch 4
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.machine import core_count, cpu_model  # noqa: E402

# name -> (channels_last, precision: "fp32" | "auto" (Precision.choose) | "bf16", compile: False | True | mode)
VARIANTS: dict[str, tuple[bool | str, str, bool | str]] = {
    "eager": (False, "fp32", False),
    "channels_last": (True, "fp32", False),
    "amp": (True, "auto", False),
    "bf16": (True, "bf16", False),
    "compile_fp32": (False, "fp32", True),
    "auto": ("auto", "auto", "auto"),  # the trainer's defaults to the letter, compile: auto included
    "optimized": ("auto", "auto", True),  # the trainer's defaults with compile forced on
    "optimized_bf16": (True, "bf16", True),
    "max_autotune": (True, "auto", "max-autotune-no-cudagraphs"),
}
DEFAULT_VARIANTS = "eager,channels_last,amp,optimized"  # 'amp' is dropped where it resolves to fp32
SETTLE_S = 0.25  # pause between two workers' turns, so the previous one's threads are asleep


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --- worker (one process per variant) -------------------------------------------------------------
def _worker(conn, name: str, opts: dict) -> None:
    try:
        _serve(conn, name, opts)
    except BaseException:  # noqa: BLE001 - report any failure to the parent, then exit
        try:
            conn.send(("error", traceback.format_exc()))
        except (BrokenPipeError, OSError):
            pass


def _serve(conn, name: str, opts: dict) -> None:
    import resource

    import torch

    from schemas.training import TrainConfig
    from snunet_cbam.checkpoint import build_model
    from snunet_cbam.losses import HybridLoss
    from snunet_cbam.runtime import Precision
    from snunet_cbam.step import TrainStep
    from snunet_cbam.runtime import COMPILE_PAYS_AFTER_STEPS, should_compile, use_channels_last
    from snunet_cbam.trainer import _split_decay_groups

    torch.set_num_threads(opts["threads"])
    device = torch.device(opts["device"])
    channels_last, precision_kind, compile_opt = VARIANTS[name]
    if precision_kind == "fp32":
        precision = Precision(None, False)
    elif precision_kind == "bf16":
        precision = Precision(torch.bfloat16, False)
    else:
        precision = Precision.choose(device, amp=True)
    channels_last = use_channels_last(channels_last, device, precision)

    torch.manual_seed(opts["seed"])  # every variant starts from the same weights and inputs
    cfg = TrainConfig(base_channel=opts["base_channel"], crop_size=opts["crop"], batch_size=opts["batch"])
    model = build_model(cfg).to(device)
    model.train()
    loss_fn = HybridLoss(cfg.weight_bce, cfg.weight_dice, cfg.pos_weight).to(device)
    optimizer = torch.optim.AdamW(_split_decay_groups(model, cfg.weight_decay), lr=cfg.lr)
    # `auto` as in a long training run: the runs the speed goal is about.
    compile_now = (should_compile(compile_opt, device, COMPILE_PAYS_AFTER_STEPS) if compile_opt == "auto"
                   else compile_opt is True)
    step = TrainStep(model, loss_fn, optimizer, device, precision, channels_last, compile=compile_now)
    if isinstance(compile_opt, str) and compile_opt != "auto":
        step.forward = torch.compile(model, mode=compile_opt)
        step.compiled = True
    shape = (opts["batch"], 3, opts["crop"], opts["crop"])
    batch = {"a": torch.randn(shape), "b": torch.randn(shape),
             "label": torch.randint(0, 2, (opts["batch"], 1, opts["crop"], opts["crop"])).float()}
    a, b, label = step.inputs(batch)

    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def run(n: int) -> tuple[float, float]:
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = None
        for _ in range(n):
            loss, _ = step(a, b, label)
        value = float(loss)  # as the trainer does; also waits for the device
        sync()
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        if value != value:
            raise FloatingPointError(f"{name}: loss is NaN")
        return elapsed, cpu

    sync()
    baseline = torch.cuda.memory_allocated(device) if cuda else _rss_kib("VmRSS")
    conn.send(("ready", {"precision": precision.name, "channels_last": channels_last,
                         "compile": step.compiled, "torch_threads": torch.get_num_threads()}))

    while True:
        cmd, arg = conn.recv()
        if cmd == "warmup":
            times = [run(1)[0] for _ in range(arg)]
            info: dict = {"warmup_step_s": times}
            if step.compiled:
                from torch._dynamo.utils import counters
                info["dynamo"] = {
                    "unique_graphs": counters["stats"].get("unique_graphs", 0),
                    "graph_breaks": sum(counters["graph_break"].values()),
                    "graph_break_reasons": sorted(counters["graph_break"])[:10],
                    "recompiles": counters["recompiles"].get("recompiles", 0) if "recompiles" in counters else 0,
                }
            sync()
            if cuda:
                info["after_warmup"] = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                info["peak_reset"] = True
            else:
                info["after_warmup"] = _rss_kib("VmRSS")
                info["peak_reset"] = _reset_peak_rss()
            after_warmup = info["after_warmup"]
            conn.send(("ok", info))
        elif cmd == "run":
            conn.send(("ok", run(arg)))
        elif cmd == "memory":
            if cuda:
                peak = torch.cuda.max_memory_allocated(device)
                mem = {"method": "torch.cuda.max_memory_allocated after warm-up (absolute: weights, "
                                 "optimizer state, activations)",
                       "peak_mib": peak / 2**20, "baseline_mib": baseline / 2**20,
                       "step_transient_mib": (peak - after_warmup) / 2**20}
            else:
                reset = arg
                hwm = _rss_kib("VmHWM") if reset else None
                if hwm is None:
                    hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
                    method = "ru_maxrss - RSS after build (includes warm-up and compile)"
                else:
                    method = "VmHWM after warm-up (clear_refs) - RSS after build"
                mem = {"method": method, "peak_mib": (hwm - baseline) / 1024, "baseline_mib": baseline / 1024,
                       "after_warmup_mib": (after_warmup - baseline) / 1024,
                       "step_transient_mib": (hwm - after_warmup) / 1024,
                       "whole_run_peak_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024}
            conn.send(("ok", mem))
        elif cmd == "stop":
            conn.send(("ok", None))
            return


# --- parent ------------------------------------------------------------------------------------------
class Worker:
    def __init__(self, ctx, name: str, opts: dict) -> None:
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, name, opts), name=f"bench-{name}", daemon=True)
        self.proc.start()
        child.close()
        self.error: str | None = None

    def call(self, cmd: str, arg=None):
        if self.error:
            return None
        try:
            if cmd != "__ready__":
                self.conn.send((cmd, arg))
            status, value = self.conn.recv()
        except (EOFError, BrokenPipeError, OSError) as exc:
            status, value = "error", f"worker died: {exc!r} (exit code {self.proc.exitcode})"
        if status == "error":
            self.error = value
            print(f"[{self.name}] FAILED:\n{value}", file=sys.stderr)
            return None
        return value

    def close(self) -> None:
        if not self.error and self.proc.is_alive():
            self.call("stop")
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.terminate()


def resolve_device(requested: str) -> str:
    import torch

    from snunet_cbam.runtime import select_device

    device = select_device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-channel", type=int, default=16)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed training steps per repeat (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default 2; the "
                                                          "first one holds a compile's cold start)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed repeats per variant (default 5)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated, from: {', '.join(VARIANTS)} (default {DEFAULT_VARIANTS}, without "
                        "'amp' where Precision.choose gives fp32, since it then equals channels_last); "
                        "'eager' is the baseline of the ratio and is always included")
    p.add_argument("--skip-slower", type=float, default=5.0,
                   help="leave out of the timed repeats a variant whose last warm-up step is more than this "
                        "many times slower than eager's (e.g. bf16 emulated on a CPU without native bf16); "
                        "0 keeps every variant (default 5)")
    p.add_argument("--threads", type=int, default=core_count(), help="torch threads (default: usable cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inductor-cache", choices=("fresh", "default"), default="fresh",
                   help="fresh (default): compile into an empty TORCHINDUCTOR_CACHE_DIR, so 'compile s' is a "
                        "cold start as on a new worker; default: reuse the usual on-disk cache (warm start)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    names = [n.strip() for n in (args.variants or DEFAULT_VARIANTS).split(",") if n.strip()]
    if args.variants is None and amp_name(device) == "fp32":
        names.remove("amp")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if "eager" not in names:
        names.insert(0, "eager")
    names = list(dict.fromkeys(names))
    if min(args.steps, args.repeats, args.batch) < 1 or args.warmup < 1:
        p.error("--steps, --repeats, --batch and --warmup must be at least 1")

    opts = {"device": device, "base_channel": args.base_channel, "crop": args.crop, "batch": args.batch,
            "threads": args.threads, "seed": args.seed}
    print(f"device {device} ({cpu_model()}, {core_count()} cores, torch threads {args.threads}); "
          f"base_channel {args.base_channel}, crop {args.crop}, batch {args.batch}; "
          f"warm-up {args.warmup}, {args.repeats} repeats x {args.steps} steps; variants {', '.join(names)}",
          flush=True)

    cache_dir = None
    if args.inductor_cache == "fresh":
        cache_dir = tempfile.mkdtemp(prefix="bench-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir  # inherited by the workers
    ctx = mp.get_context("spawn")
    results: dict[str, dict] = {}
    workers: list[Worker] = []
    started = time.monotonic()
    load_before = os.getloadavg()
    try:
        # Warm-up one variant at a time, each in its own fresh process.
        for name in names:
            w = Worker(ctx, name, opts)
            workers.append(w)
            ready = w.call("__ready__")
            t0 = time.perf_counter()
            warm = w.call("warmup", args.warmup) if ready is not None else None
            if warm is None:
                results[name] = {"error": w.error}
                continue
            first, rest = warm["warmup_step_s"][0], warm["warmup_step_s"][1:]
            results[name] = {**ready, "warmup_step_s": warm["warmup_step_s"], "peak_reset": warm["peak_reset"],
                             "first_step_s": first, "warmup_s": time.perf_counter() - t0}
            if "dynamo" in warm:
                results[name]["dynamo"] = warm["dynamo"]
            print(f"  warm-up {name:<15} first step {first:7.2f} s"
                  + (f", then {', '.join(f'{t:.2f}' for t in rest)} s" if rest else ""), flush=True)
            time.sleep(SETTLE_S)

        live = [w for w in workers if not w.error]
        eager_warm = results.get("eager", {}).get("warmup_step_s")
        if args.skip_slower and eager_warm:
            for w in list(live):
                last = results[w.name]["warmup_step_s"][-1]
                if w.name != "eager" and last > args.skip_slower * eager_warm[-1]:
                    results[w.name]["skipped"] = (f"last warm-up step {last:.1f} s > {args.skip_slower:g} x "
                                                  f"eager's {eager_warm[-1]:.1f} s; not timed (--skip-slower)")
                    print(f"  {w.name}: {results[w.name]['skipped']}", flush=True)
                    live.remove(w)
        for r in range(args.repeats):
            line = []
            for w in live:
                timed = w.call("run", args.steps)
                if timed is not None:
                    results[w.name].setdefault("repeat_s", []).append(timed[0])
                    results[w.name].setdefault("repeat_cpu_s", []).append(timed[1])
                    line.append(f"{w.name} {args.batch * args.steps / timed[0]:.2f}")
                time.sleep(SETTLE_S)
            live = [w for w in live if not w.error]
            print(f"  repeat {r + 1}/{args.repeats}: " + ", ".join(line) + " img/s", flush=True)

        for w in workers:
            if w.error or "skipped" in results[w.name]:
                continue
            mem = w.call("memory", results[w.name]["peak_reset"])
            if mem is not None:
                results[w.name]["memory"] = mem
    finally:
        for w in workers:
            if w.error and w.name in results:
                results[w.name]["error"] = w.error
            w.close()
        if cache_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)

    for name, res in results.items():
        if "repeat_s" not in res:
            if "skipped" not in res:
                res.setdefault("error", "no timed repeat")
            continue
        ips = [args.batch * args.steps / t for t in res["repeat_s"]]
        res["images_per_s"] = ips
        res["median_images_per_s"] = statistics.median(ips)
        res["median_step_s"] = statistics.median(res["repeat_s"]) / args.steps
        # Noise check: CPU-seconds the worker's threads used per image (all threads); on a shared
        # machine wall time also counts the time other processes held the cores, CPU time does not.
        res["median_cpu_s_per_image"] = statistics.median(res["repeat_cpu_s"]) / (args.batch * args.steps)
        if res.get("compile"):
            res["compile_s"] = max(res["first_step_s"] - res["median_step_s"], 0.0)
    base = results.get("eager", {}).get("median_images_per_s")
    base_cpu = results.get("eager", {}).get("median_cpu_s_per_image")
    for res in results.values():
        if base and "median_images_per_s" in res:
            res["ratio_vs_eager"] = res["median_images_per_s"] / base
            res["best_ratio_vs_eager"] = max(res["images_per_s"]) / max(results["eager"]["images_per_s"])
            res["cpu_ratio_vs_eager"] = base_cpu / res["median_cpu_s_per_image"]

    print_table(names, results, device)
    print(f"load average (1, 5, 15 min) before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({core_count()} cores)")
    report = {
        "config": {"base_channel": args.base_channel, "crop": args.crop, "batch": args.batch, "steps": args.steps,
                   "warmup": args.warmup, "repeats": args.repeats, "seed": args.seed,
                   "inductor_cache": args.inductor_cache},
        "machine": {"device": device, "cpu": cpu_model(), "cores": core_count(), "torch_threads": args.threads,
                    "python": platform.python_version(), "torch": _torch_version(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "variants": {n: {"channels_last": VARIANTS[n][0], "precision_setting": VARIANTS[n][1],
                         "compile_setting": VARIANTS[n][2], **results.get(n, {})} for n in names},
        "wall_s": time.monotonic() - started,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 1 if any("error" in r for r in results.values()) else 0


def amp_name(device: str) -> str:
    import torch

    from snunet_cbam.runtime import Precision

    return Precision.choose(torch.device(device), amp=True).name


def _torch_version() -> str:
    import torch

    return torch.__version__


def print_table(names: list[str], results: dict[str, dict], device: str) -> None:
    mem_label = "peak MiB" + (" (alloc)" if device.startswith("cuda") else " (RSS-base)")
    header = f"{'variant':<15} {'format':<13} {'prec':<5} {'compile':<8} {'img/s (median)':>14} " \
             f"{'min-max':>13} {'s/step':>7} {'x eager':>8} {'CPU-s/img':>9} {'x (CPU)':>8} " \
             f"{mem_label:>19} {'step MiB':>9} {'compile s':>10}"
    print("\n" + header)
    print("-" * len(header))
    for name in names:
        res = results.get(name, {})
        _, _, comp = VARIANTS[name]
        fmt = "channels_last" if res.get("channels_last", VARIANTS[name][0] is True) else "contiguous"
        if comp == "auto":
            comp_s = "yes" if res.get("compile") else "no"
        else:
            comp_s = "no" if not comp else ("yes" if comp is True else "autotune")
        if "median_images_per_s" not in res:
            if "skipped" in res:
                print(f"{name:<15} {fmt:<13} {res['precision']:<5} {comp_s:<8} SKIPPED: {res['skipped']}")
                continue
            err = str(res.get("error", "")).strip().splitlines()
            print(f"{name:<15} {fmt:<13} {'':<5} {comp_s:<8} FAILED: {err[-1] if err else ''}")
            continue
        ips = res["images_per_s"]
        mem = res.get("memory", {}).get("peak_mib")
        transient = res.get("memory", {}).get("step_transient_mib")
        print(f"{name:<15} {fmt:<13} {res['precision']:<5} {comp_s:<8} {res['median_images_per_s']:>14.3f} "
              f"{min(ips):>6.2f}-{max(ips):<6.2f} {res['median_step_s']:>7.3f} {res['ratio_vs_eager']:>7.2f}x "
              f"{res['median_cpu_s_per_image']:>9.3f} {res['cpu_ratio_vs_eager']:>7.2f}x "
              f"{(format(mem, '.0f') if mem is not None else '-'):>19} "
              f"{(format(transient, '.0f') if transient is not None else '-'):>9} "
              f"{(format(res['compile_s'], '.1f') if 'compile_s' in res else '-'):>10}")
    for name in names:
        dyn = results.get(name, {}).get("dynamo")
        if dyn:
            print(f"  {name}: dynamo unique graphs {dyn['unique_graphs']}, graph breaks {dyn['graph_breaks']}"
                  + (f" ({'; '.join(dyn['graph_break_reasons'])})" if dyn["graph_break_reasons"] else ""))


if __name__ == "__main__":
    sys.exit(main())
