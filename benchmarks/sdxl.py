"""SDXL serving benchmark: stock diffusers vs imagegate's tuned local pipeline, same device, same shapes.

  (a) stock   StableDiffusionXLPipeline as users run it: fp16, DPM++ 2M Karras
              (DPMSolverMultistepScheduler, use_karras_sigmas=True), stock VAE upcast to fp32, eager
  (b) tuned   backends.local_sdxl: bf16, channels_last, torch.compile, sync-free scheduler, CUDA-graph
              loop, bf16 VAE without upcast, compiled decode, embedding cache
  (c) taesd   (b) decoding with TAESD

Prints a stage table (text encode cold/warm/cached, denoise, UNet kernel time and loop time outside it,
decode, total at --steps and --also-steps), speedups, UNet TFLOP/s, start-to-ready, the first request
after ready vs steady state, images/s per batch size, peak GPU memory, the sync-free check; writes JSON.

  GPU: python benchmarks/sdxl.py --preset sdxl-random --json sdxl.json     (see benchmarks/README.md)
  CPU: python benchmarks/sdxl.py --preset tiny --device cpu                (seconds; a smoke test)

Optional phases (extra batch sizes, --also-steps) are skipped, and say so, when --budget-s would be exceeded.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

UNET_TFLOP_1024 = 6.76  # one batch-1 SDXL UNet forward at 1024x1024 (FlopCounterMode, reference)
PROMPTS = [f"a photograph of a lighthouse on a cliff at dusk, variation {i}" for i in range(64)]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.t0 = time.perf_counter()
        self.prompt_i = 0
        self.out: dict[str, Any] = {"skipped": []}

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def prompt(self) -> str:
        self.prompt_i += 1
        return PROMPTS[self.prompt_i % len(PROMPTS)] + f" #{self.prompt_i}"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        self.sync()
        start = time.perf_counter()
        value = fn()
        self.sync()
        return time.perf_counter() - start, value

    def median(self, fn: Callable[[], Any], repeats: int | None = None) -> float:
        return statistics.median(self.timed(fn)[0] for _ in range(repeats or self.args.repeats))

    def reset_memory(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None

    def unet_forward_s(
        self,
        unet: Callable[..., Any],
        sample: torch.Tensor,
        t: torch.Tensor,
        embeds: torch.Tensor,
        pooled: torch.Tensor,
        time_ids: torch.Tensor,
        repeats: int = 5,
    ) -> float:
        """Seconds per CFG UNet forward, back to back (the kernel time a step cannot go below)."""
        added = {"text_embeds": pooled, "time_ids": time_ids}

        def call() -> None:
            unet(sample, t, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)

        def burst() -> None:
            for _ in range(3):
                call()

        call()
        # Median over short back-to-back bursts: bursts keep the GPU queue full (kernel time, not launch
        # latency); the median shrugs off a burst disturbed by something else on the machine.
        return statistics.median(self.timed(burst)[0] / 3 for _ in range(repeats))

    def skip(self, what: str, need_s: float) -> bool:
        if self.left() < need_s:
            self.out["skipped"].append(f"{what} (needs ~{need_s:.0f}s, {self.left():.0f}s of budget left)")
            print(f"  skipping {what}: time budget", flush=True)
            return True
        return False


def unet_flops(unet: Any, sample, t, embeds, pooled, time_ids) -> float:
    """FLOPs of one forward at this shape, counted by torch (conv, matmul, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        unet(
            sample,
            t,
            encoder_hidden_states=embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
            return_dict=False,
        )
    return float(counter.get_total_flops())


# -- (a) stock diffusers ------------------------------------------------------------------------------------


def run_stock(b: Bench) -> dict[str, Any]:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline

    from backends.local_sdxl.presets import load_components

    a = b.args
    res: dict[str, Any] = {}
    half = torch.float16 if b.cuda else torch.float32
    b.reset_memory()
    start = time.perf_counter()
    c = load_components(
        preset=a.preset, model=a.model, taesd=None, device=b.device, dtype=half, vae_dtype=half, seed=0, variant="fp16"
    )
    pipe = StableDiffusionXLPipeline(
        vae=c.vae,
        text_encoder=c.text_encoder,
        text_encoder_2=c.text_encoder_2,
        tokenizer=c.tokenizer,
        tokenizer_2=c.tokenizer_2,
        unet=c.unet,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
        scheduler=DPMSolverMultistepScheduler.from_config(c.scheduler_config, use_karras_sigmas=True),
    )
    pipe.set_progress_bar_config(disable=True)
    res["load_s"] = time.perf_counter() - start
    size = a.size

    def call(steps: int, n: int = 1, prompt: str | None = None, marks: dict[str, float] | None = None):
        def at_step_end(_pipe: Any, i: int, _t: Any, _kwargs: dict) -> dict:
            if marks is not None and i == steps - 1:
                b.sync()
                marks["looped"] = time.perf_counter()
            return {}

        return pipe(
            prompt=prompt or b.prompt(),
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=a.guidance,
            num_images_per_prompt=n,
            callback_on_step_end=at_step_end,
            generator=[torch.Generator(b.device).manual_seed(i) for i in range(n)],
        )

    # Stage boundaries inside the stock call itself: encode_prompt's return and the last step's end (one
    # sync each), so the stages of one run add up to its total (no subtraction across runs).
    encode_prompt, marks = pipe.encode_prompt, {}

    def timed_encode(*args: Any, **kwargs: Any) -> Any:
        out = encode_prompt(*args, **kwargs)
        b.sync()
        marks["encoded"] = time.perf_counter()
        return out

    def staged(steps: int) -> dict[str, float]:
        pipe.encode_prompt = timed_encode
        try:
            b.sync()
            start = time.perf_counter()
            call(steps, marks=marks)
            b.sync()
            end = time.perf_counter()
        finally:
            pipe.encode_prompt = encode_prompt
        return {
            "text_encode_s": marks["encoded"] - start,
            "denoise_s": marks["looped"] - marks["encoded"],
            "decode_s": end - marks["looped"],
            "total_s": end - start,
        }

    res["text_encode_cold_s"] = b.timed(lambda: pipe.encode_prompt(b.prompt(), device=b.device))[0]
    res["first_call_s"] = b.timed(lambda: call(a.steps))[0]
    res["start_to_ready_s"] = time.perf_counter() - start  # loaded and one full request served
    res["text_encode_warm_s"] = b.median(lambda: pipe.encode_prompt(b.prompt(), device=b.device))
    for steps in [a.steps] + ([a.also_steps] if a.also_steps else []):
        if steps != a.steps and b.skip(f"stock at {steps} steps", 3 * res["first_call_s"] * 2):
            continue
        runs = [staged(steps) for _ in range(a.repeats)]
        res[f"steps{steps}"] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    # UNet kernel time per CFG step, same inputs as the loop.
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(b.prompt(), device=b.device)
    lat = torch.randn(2, 4, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor, device=b.device, dtype=half)
    ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, device=b.device, dtype=half)
    args = (lat, torch.tensor(500, device=b.device), torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled]), ids)
    with torch.inference_mode():
        res["unet_step_s"] = b.unet_forward_s(pipe.unet, *args)
        res["unet_cfg_step_flop"] = unet_flops(pipe.unet, *args)
    res["images_per_s"] = {}
    for n in a.batches:
        if n > 1 and b.skip(f"stock batch {n}", 3 * n * res["first_call_s"]):
            continue
        res["images_per_s"][n] = n / b.median(partial(call, a.steps, n=n), repeats=2)
    res["peak_gib"] = b.peak_gib()
    return res  # the pipeline is freed with this frame; main() then empties the allocator cache


# -- (b)/(c) this backend ------------------------------------------------------------------------------------


def run_tuned(b: Bench, overrides: dict[str, Any]) -> dict[str, Any]:
    from backends.local_sdxl.pipeline import Batch, build_pipeline
    from backends.local_sdxl.settings import Settings
    from backends.settings import build

    a = b.args
    res: dict[str, Any] = {}
    raw: dict[str, Any] = {
        "device": a.device,
        "shapes": [{"width": a.size, "height": a.size, "batch": 1}],
        "default_steps": a.steps,
        "default_guidance": a.guidance,
        "compile_mode": a.compile_mode,
    }
    raw.update({"preset": a.preset} if a.preset else {"model": a.model, "taesd": a.taesd})
    if a.compile is not None:
        raw["compile"] = a.compile == "on"
    raw.update(overrides)
    settings = build(Settings, raw)
    b.reset_memory()
    start = time.perf_counter()
    with torch.inference_mode():
        p = build_pipeline(settings)
        res["start_to_ready_s"] = time.perf_counter() - start
        res["warmup_phases_s"] = dict(p.warm_timings)
        res["resolved"] = {k: str(v) for k, v in dataclasses.asdict(p.resolved).items()}
        size = a.size

        def batch(steps: int, decoder: str, n: int = 1, prompt: str | None = None) -> Batch:
            text = prompt or b.prompt()
            return Batch(
                size,
                size,
                steps,
                decoder,
                tuple((f"{text} {i}", None) for i in range(n)),
                tuple(range(n)),
                (a.guidance,) * n,
                n,
            )

        def run(steps: int, decoder: str, n: int = 1) -> Any:
            """One run with a fresh batch (``batch`` draws a new prompt each time: no embedding cache hit)."""
            return p.run(batch(steps, decoder, n))

        res["first_request_s"] = b.timed(lambda: p.run(batch(a.steps, "full")))[0]
        res["text_encode_cold_s"] = p.warm_timings.get("text_encode_cold")
        res["text_encode_warm_s"] = b.median(lambda: p.encode_prompt(b.prompt(), None))
        cached = b.prompt()
        p.encode_prompt(cached, None)
        res["text_encode_cached_s"] = b.median(lambda: p.encode_prompt(cached, None))
        if p.cuda:
            problem = p.check_sync_free(size, size, 1, a.steps)
            res["sync_free_loop"] = "yes" if problem is None else f"NO: {problem[:200]}"
        for steps in [a.steps] + ([a.also_steps] if a.also_steps else []):
            if steps != a.steps:
                if b.skip(f"tuned at {steps} steps", 20):
                    continue
                if p.resolved.cuda_graphs:
                    res[f"capture_{steps}_s"] = b.timed(partial(p.capture, size, size, 1, steps))[0]
            for decoder in p.decoders:
                p.run(batch(steps, decoder))  # first run of this step count / decoder: not timed
                samples = [b.timed(partial(run, steps, decoder)) for _ in range(a.repeats)]
                res[f"steps{steps}_{decoder}"] = {
                    "total_s": statistics.median(wall for wall, _ in samples),
                    **{f"{k}_s": statistics.median(out.stages[k] for _, out in samples) for k in samples[0][1].stages},
                    "graphed": samples[0][1].graphed,
                }
        embeds, pooled = p.embeddings(batch(a.steps, "full"))
        lat = torch.randn(
            2, p.latent_channels, size // p.vae_scale, size // p.vae_scale, device=p.device, dtype=p.dtype
        )
        args = (lat, p.plan(a.steps).timestep(p.plan(a.steps).index(0)), embeds, pooled, p.time_ids(size, size, 1))
        res["unet_step_s"] = b.unet_forward_s(p.unet_fast, *args)
        res["steady_s"] = res[f"steps{a.steps}_full"]["total_s"]
        res["images_per_s"] = {1: 1 / res["steady_s"]}
        for n in a.batches:
            if n == 1:
                continue
            if b.skip(f"tuned batch {n} (compile + capture)", 120 if p.resolved.compile else 10 * n * res["steady_s"]):
                continue
            compile_s = b.timed(partial(run, 2, "full", n))[0]
            if p.resolved.cuda_graphs:
                compile_s += b.timed(partial(p.capture, size, size, n, a.steps))[0]
            res.setdefault("extra_shape_warmup_s", {})[n] = compile_s
            p.run(batch(a.steps, "full", n))
            res["images_per_s"][n] = n / b.median(partial(run, a.steps, "full", n), repeats=2)
        png = p.run(batch(a.steps, "full"))
        from PIL import Image as PILImage

        from backends import imaging

        res["png_encode_s"] = b.median(lambda: imaging.encode(PILImage.fromarray(png.images[0]), "png"))
    res["peak_gib"] = b.peak_gib()
    return res


def run_tuned_or_degrade(b: Bench) -> dict[str, Any]:
    """(b)/(c), and when that fails on the GPU, again without the CUDA-graph capture, then without compile:
    a device run is scarce, so a bug in one tuning must not cost the numbers of the others. The failures
    are printed and kept in the JSON (``tuned.failed``), and the table says which tunings were off."""
    ladder: list[dict[str, Any]] = [{}]
    if b.cuda:
        ladder += [{"cuda_graphs": False}, {"cuda_graphs": False, "compile": False}]
    failed: list[dict[str, Any]] = []
    for overrides in ladder:
        if failed:  # outside the except block: the failed attempt's frames (and GPU memory) are gone by now
            b.reset_memory()
            torch._dynamo.reset()
        try:
            res = run_tuned(b, overrides)
        except Exception as exc:  # noqa: BLE001 - any failure of a rung (compile, capture, OOM) tries the next
            failed.append(
                {
                    "overrides": overrides,
                    "error": f"{type(exc).__name__}: {exc}"[:2000],
                    "traceback": traceback.format_exc()[-6000:],
                }
            )
            print(f"(b) tuned FAILED with overrides {overrides}:\n{failed[-1]['traceback']}", flush=True)
            continue
        res["overrides"], res["failed"] = overrides, failed
        return res
    raise RuntimeError(f"the tuned pipeline failed {len(failed)} times; first: {failed[0]['error']}")


# -- report -----------------------------------------------------------------------------------------------------


def report(b: Bench, stock: dict[str, Any] | None, tuned: dict[str, Any]) -> dict[str, Any]:
    a = b.args
    flop = (stock or {}).get("unet_cfg_step_flop") or 2 * UNET_TFLOP_1024 * 1e12 * (a.size / 1024) ** 2
    rows: list[tuple[str, Any, Any, Any]] = []

    def ms(s: float | None) -> float | None:
        return None if s is None else s * 1e3

    s_main = (stock or {}).get(f"steps{a.steps}", {})
    full, tae = tuned.get(f"steps{a.steps}_full", {}), tuned.get(f"steps{a.steps}_taesd", {})

    def loop_outside(denoise: float | None, unet_s: float | None) -> float | None:
        return None if denoise is None or unet_s is None else denoise - a.steps * unet_s

    rows += [
        (
            "text encode, cold (ms)",
            ms((stock or {}).get("text_encode_cold_s")),
            ms(tuned.get("text_encode_cold_s")),
            None,
        ),
        (
            "text encode, warm (ms)",
            ms((stock or {}).get("text_encode_warm_s")),
            ms(tuned.get("text_encode_warm_s")),
            None,
        ),
        ("text encode, cached (ms)", None, ms(tuned.get("text_encode_cached_s")), None),
        (
            f"denoise, {a.steps} steps (ms)",
            ms(s_main.get("denoise_s")),
            ms(full.get("denoise_s")),
            ms(tae.get("denoise_s")),
        ),
        (
            "  UNet kernels, steps x fwd (ms)",
            ms(a.steps * stock["unet_step_s"]) if stock else None,
            ms(a.steps * tuned["unet_step_s"]),
            None,
        ),
        (
            "  loop outside UNet (ms)",
            ms(loop_outside(s_main.get("denoise_s"), (stock or {}).get("unet_step_s"))),
            ms(loop_outside(full.get("denoise_s"), tuned["unet_step_s"])),
            None,
        ),
        ("decode (ms)", ms(s_main.get("decode_s")), ms(full.get("decode_s")), ms(tae.get("decode_s"))),
        (f"total, {a.steps} steps (ms)", ms(s_main.get("total_s")), ms(full.get("total_s")), ms(tae.get("total_s"))),
    ]
    if a.also_steps:
        s30 = (stock or {}).get(f"steps{a.also_steps}", {})
        rows.append(
            (
                f"total, {a.also_steps} steps (ms)",
                ms(s30.get("total_s")),
                ms(tuned.get(f"steps{a.also_steps}_full", {}).get("total_s")),
                ms(tuned.get(f"steps{a.also_steps}_taesd", {}).get("total_s")),
            )
        )

    def tflops(d: float | None) -> float | None:
        return None if not d else flop * a.steps / d / 1e12

    rows += [
        ("UNet TFLOP/s over denoise", tflops(s_main.get("denoise_s")), tflops(full.get("denoise_s")), None),
        (
            "UNet TFLOP/s, kernels only",
            tflops(a.steps * stock["unet_step_s"]) if stock else None,
            tflops(a.steps * tuned["unet_step_s"]),
            None,
        ),
        ("start to ready (s)", (stock or {}).get("start_to_ready_s"), tuned.get("start_to_ready_s"), None),
        (
            "first request after ready (ms)",
            ms((stock or {}).get("first_call_s")),
            ms(tuned.get("first_request_s")),
            None,
        ),
    ]
    for n in a.batches:
        rows.append(
            (
                f"images/s at batch {n}",
                (stock or {}).get("images_per_s", {}).get(n),
                tuned.get("images_per_s", {}).get(n),
                None,
            )
        )
    rows.append(("peak GPU memory (GiB)", (stock or {}).get("peak_gib"), tuned.get("peak_gib"), None))

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:,.2f}" if isinstance(v, float) else str(v)

    def ratio(x: Any, y: Any) -> str:
        return f"{x / y:.2f}x" if isinstance(x, float) and isinstance(y, float) and y > 0 else "-"

    print(f"\n{'stage':34} {'(a) stock':>12} {'(b) tuned':>12} {'(c) taesd':>12} {'a/b':>8}")
    for name, x, y, z in rows:
        r = ratio(y, x) if name.startswith(("images/s", "UNet TFLOP")) else ratio(x, y)
        print(f"{name:34} {fmt(x):>12} {fmt(y):>12} {fmt(z):>12} {r:>8}")
    checks = {}
    if stock and s_main and full:
        steady, first = full["total_s"], tuned["first_request_s"]
        checks = {
            "end_to_end_le_1s": full["total_s"] <= 1.0,
            "speedup_ge_1.8x": s_main["total_s"] / full["total_s"] >= 1.8,
            "decode_ge_4x_stock_vae": s_main["decode_s"] / full["decode_s"] >= 4,
            "taesd_ge_10x_full_vae": bool(tae) and full["decode_s"] / tae["decode_s"] >= 10,
            "loop_outside_unet_le_2pct": (loop_outside(full["denoise_s"], tuned["unet_step_s"]) or 0)
            <= 0.02 * full["denoise_s"],
            "first_request_within_10pct": first <= 1.1 * steady,
        }
        print(
            "\nissue targets (H100, 1024x1024, 24 steps):",
            ", ".join(f"{k}={'PASS' if v else 'FAIL'}" for k, v in checks.items()),
        )
    print(f"sync-free loop check: {tuned.get('sync_free_loop', 'not run (CPU)')}")
    if tuned.get("overrides"):
        print(f"NOTE (b)/(c) ran with {tuned['overrides']} after {len(tuned['failed'])} failure(s) (see above / JSON)")
    if b.out["skipped"]:
        print("skipped:", "; ".join(b.out["skipped"]))
    return {"rows": [dict(zip(("stage", "stock", "tuned", "taesd"), r, strict=True)) for r in rows], "targets": checks}


def environment(b: Bench) -> dict[str, Any]:
    import diffusers
    import transformers

    env = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(b.device),
        "cpu_threads": torch.get_num_threads(),
    }
    if b.cuda:
        env["gpu"] = torch.cuda.get_device_name(b.device)
        env["cuda"] = torch.version.cuda
    return env


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--preset",
        choices=["tiny", "sdxl-random"],
        help="random-weight architecture (default: sdxl-random on CUDA, tiny on CPU) unless --model is given",
    )
    ap.add_argument("--model", help="hub id or folder with real weights (instead of --preset)")
    ap.add_argument("--taesd", help="TAESD hub id or folder (with --model)")
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--size", type=int, help="square image side (default 1024 on CUDA, 256 on CPU)")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--also-steps", type=int, default=30, help="second step count for the total (0 = skip)")
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--batches", default="1,2,4", help="batch sizes for images/s")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", choices=["on", "off"], help="default: the backend's (on for CUDA)")
    ap.add_argument("--compile-mode", default="default")
    ap.add_argument("--skip-stock", action="store_true")
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip optional phases past this many seconds")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    on_cuda = a.device.startswith("cuda")
    if a.model is None and a.preset is None:
        a.preset = "sdxl-random" if on_cuda else "tiny"
    a.size = a.size or (1024 if on_cuda else 256)
    a.batches = [int(x) for x in a.batches.split(",") if x]
    a.also_steps = a.also_steps or None
    b = Bench(a)
    env = environment(b)
    print("environment:", json.dumps(env), flush=True)
    print(f"preset={a.preset} model={a.model} size={a.size} steps={a.steps} guidance={a.guidance}", flush=True)
    stock = None if a.skip_stock else run_stock(b)
    b.reset_memory()
    print(f"(a) stock done at {time.perf_counter() - b.t0:.0f}s", flush=True)
    if a.json:  # kept if the tuned part dies in a way that ends the process (or the device call's time limit)
        write_json(a.json, {"environment": env, "args": vars(a), "stock": stock, "partial": True})
    tuned = run_tuned_or_degrade(b)
    print(f"(b)/(c) tuned done at {time.perf_counter() - b.t0:.0f}s", flush=True)
    summary = report(b, stock, tuned)
    result = {
        "environment": env,
        "args": vars(a),
        "stock": stock,
        "tuned": tuned,
        "summary": summary,
        "skipped": b.out["skipped"],
        "wall_s": time.perf_counter() - b.t0,
    }
    if a.json:
        write_json(a.json, result)
        print(f"wrote {a.json}")
    return 1 if tuned["failed"] else 0


def write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=str)


if __name__ == "__main__":
    raise SystemExit(main())
