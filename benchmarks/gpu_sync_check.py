"""Prove on a CUDA device that the local backend's own denoising loop never synchronizes host and device.

Run from the repository root:  python benchmarks/gpu_sync_check.py [--steps 24] [--dtype bfloat16] [--compile]

Everything checked is the backend's real code, not a copy: the pipeline is built by
``backends.local_sdxl.pipeline.build_pipeline`` (``preset: tiny``: load, set-up, warm-up, and on CUDA the
CUDA-graph capture of the listed shape, exactly as the backend starts), and the checks drive
``SDXLPipeline.loop_inputs`` / ``denoise`` / ``sync_checked`` / ``check_sync_free`` / ``capture`` and the
captured graph's ``replay`` (``cudagraph.py``). Checks (one PASS/FAIL line each; exit status 1 if any
fails, 0 with a SKIP line where there is no CUDA):

  1. parity: ``SDXLPipeline.denoise`` driving our scheduler vs diffusers' DPMSolverMultistepScheduler
     (use_karras_sigmas=True), fp32, with a deterministic fake UNet (so only the loop and scheduler differ);
  2. that loop (fake UNet) under ``torch.cuda.set_sync_debug_mode("error")`` (any implicit sync raises);
  3. the loop with the tiny SDXL UNet (CFG) under the same mode, and it equals the loop run plainly;
     ``SDXLPipeline.check_sync_free`` (what benchmarks/sdxl.py reports) agrees;
  4. the graph ``build_pipeline`` captured for the shape (``SDXLPipeline.capture``), replayed on two inputs,
     each compared with the plain loop (per-step scalars come from device buffers, so a replay is correct for
     every step, not just the captured values); replays differ for different inputs;
  5. control: diffusers' own step on the device *does* trip the sync check (so check 2 can fail).
Also prints plain loop vs graph-replay time. ``--dry-run`` runs the same code on the CPU (there the sync
debug mode does not exist and ``sync_checked`` just runs the loop; no graph): it validates the script and
the seam it uses where no GPU is present.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backends.local_sdxl.pipeline import Batch, SDXLPipeline, build_pipeline
from backends.local_sdxl.scheduler import SDXL_SCHEDULER_CONFIG
from backends.local_sdxl.settings import DType, Settings, Shape

RESULTS: list[tuple[str, bool, str]] = []


def report(name: str, ok: bool, detail: str = "") -> None:
    RESULTS.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else ""), flush=True)


def skip(name: str, why: str) -> None:
    print(f"SKIP {name}: {why}", flush=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def fake_model(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    pattern = torch.linspace(-1.0, 1.0, sample.numel(), device=sample.device).reshape(sample.shape)
    return 0.7 * sample + (t.to(sample.dtype) / 1000.0) * pattern.to(sample.dtype)


def fake_unet(sample: torch.Tensor, t: torch.Tensor, **_: Any) -> tuple[torch.Tensor]:
    """Called as the pipeline calls the UNet, on the CFG-doubled batch: both halves get the fake model's answer
    for one half, so guidance leaves it unchanged and the loop sees exactly ``fake_model``."""
    eps = fake_model(sample.chunk(2)[0].float(), t)
    return (torch.cat([eps, eps]),)


def diffusers_loop(steps: int, device: torch.device, noise: torch.Tensor, *, begin_index: bool = True):
    """diffusers' own DPM++ 2M Karras loop with the fake model; returns (scheduler, run)."""
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler.from_config(SDXL_SCHEDULER_CONFIG, use_karras_sigmas=True)
    sched.set_timesteps(steps, device=device)
    if begin_index:
        sched.set_begin_index(0)

    def run() -> torch.Tensor:
        latents = noise * sched.init_noise_sigma
        for t in sched.timesteps:
            latents = sched.step(fake_model(latents, t), t, latents, return_dict=False)[0]
        return latents

    return run


def make_pipeline(
    device: torch.device, dtype: DType, size: int, batch: int, steps: int, compile_: bool
) -> SDXLPipeline:
    """The backend's own start-up (``build_pipeline``) for ``preset: tiny`` with one listed shape."""
    cuda = device.type == "cuda"
    settings = Settings(
        preset="tiny",
        device=str(device),
        dtype=dtype,
        vae_dtype=dtype,
        compile=compile_,
        cuda_graphs=cuda,
        channels_last=cuda,
        shapes=(Shape(size, size, batch),),
        default_steps=steps,
        warmup_runs=0,
    )
    return build_pipeline(settings)


def sync_free(pipe: SDXLPipeline, name: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor | None:
    try:
        out = pipe.sync_checked(fn)
    except RuntimeError as exc:
        report(name, False, f"synchronizing call: {str(exc).splitlines()[0]}")
        return None
    finite = bool(torch.isfinite(out).all().item())  # reading the result back is after the check
    report(name, finite, "no host-device sync inside the loop" if pipe.cuda else "CPU: nothing to sync with")
    return out


def time_it(fn: Callable[[], object], repeat: int = 5) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--size", type=int, default=64, help="image side (latents are size/8 with preset tiny)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet and decoders, as in production")
    parser.add_argument("--dry-run", action="store_true", help="CPU: the same code, without sync mode or graphs")
    args = parser.parse_args(argv)
    RESULTS.clear()
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("SKIP gpu_sync_check: no CUDA device (nothing to prove on CPU; --dry-run checks the script)")
        return 0
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype: DType = args.dtype if cuda else "float32"  # argparse: one of --dtype's choices
    print(
        f"device {torch.cuda.get_device_name() if cuda else 'cpu (dry run)'}, torch {torch.__version__}, "
        f"{args.steps} steps, {dtype}, {args.size}x{args.size} batch {args.batch}, "
        f"{'compiled' if args.compile else 'eager'} UNet"
    )

    with torch.inference_mode():
        pipe = make_pipeline(device, dtype, args.size, args.batch, args.steps, args.compile)
        # fp32 twin for the parity check (a bf16 pipeline rounds the UNet input; the fake UNet needs none).
        pipe32 = (
            pipe
            if dtype == "float32"
            else make_pipeline(device, "float32", args.size, args.batch, args.steps, compile_=False)
        )
        plan = pipe.plan(args.steps)

        def batch(seed: int, guidance: float = 5.0) -> Batch:
            return Batch(
                args.size,
                args.size,
                args.steps,
                "full",
                (("sync check", None),) * args.batch,
                tuple(range(seed, seed + args.batch)),
                (guidance,) * args.batch,
                args.batch,
            )

        # 1. parity of the real loop (fake UNet, guidance 1) with diffusers' scheduler, fp32
        noise, embeds, pooled, time_ids, ones = pipe32.loop_inputs(batch(0, guidance=1.0))
        ours = pipe32.denoise(fake_unet, pipe32.plan(args.steps), noise, embeds, pooled, time_ids, ones)
        ref = diffusers_loop(args.steps, device, noise)()
        err = rel_err(ours, ref)
        report("parity with diffusers (SDXLPipeline.denoise, fp32, fake UNet)", err <= 1e-4, f"max rel err {err:.2e}")

        # 2./3. no syncs: the real loop with the fake UNet, then with the tiny UNet (CFG)
        sync_free(
            pipe32,
            "SDXLPipeline.denoise (fake UNet) under sync_debug_mode=error",
            lambda: pipe32.denoise(fake_unet, pipe32.plan(args.steps), noise, embeds, pooled, time_ids, ones),
        )
        inputs_a, inputs_b = pipe.loop_inputs(batch(1)), pipe.loop_inputs(batch(2))
        eager_a = pipe.denoise(pipe.unet_fast, plan, *inputs_a)  # also a warm-up before any check
        eager_b = pipe.denoise(pipe.unet_fast, plan, *inputs_b)
        out = sync_free(
            pipe,
            "SDXLPipeline.denoise (tiny UNet, CFG) under sync_debug_mode=error",
            lambda: pipe.denoise(pipe.unet_fast, plan, *inputs_a),
        )
        if out is not None:
            err = rel_err(out, eager_a)
            report("sync-checked loop equals the plain loop", err <= 1e-5, f"max rel err {err:.2e}")
        problem = pipe.check_sync_free(args.size, args.size, args.batch, args.steps)
        report("SDXLPipeline.check_sync_free", problem is None, problem.splitlines()[0] if problem else "")

        # 4. the CUDA graph build_pipeline captured for the listed shape, replayed for two inputs
        key = (args.size, args.size, args.batch, args.steps)
        if not cuda:
            skip("CUDA graph capture and replay", "CPU dry run")
            return summary()
        graph = pipe.graphs.get(key)
        if graph is None:
            report("build_pipeline captured the listed shape", False, f"no graph for {key}: {sorted(pipe.graphs)}")
            return summary()
        report("build_pipeline captured the listed shape", True, f"{args.steps} steps in one graph")
        tol = 1e-4 if dtype == "float32" else 2e-2
        for name, inputs, eager in (("A", inputs_a, eager_a), ("B", inputs_b, eager_b)):
            noise_i, embeds_i, pooled_i, _, guidance_i = inputs
            replayed = graph.replay(noise_i, embeds_i, pooled_i, guidance_i)
            torch.cuda.synchronize()
            err = rel_err(replayed, eager)
            report(
                f"graph replay on input {name} matches the plain loop", err <= tol, f"max rel err {err:.2e} (tol {tol})"
            )
        report("replays differ for different inputs (not frozen)", not torch.equal(graph.out, eager_a))

        plain_ms = time_it(lambda: pipe.denoise(pipe.unet_fast, plan, *inputs_a))
        graph_ms = time_it(lambda: graph.replay(inputs_a[0], inputs_a[1], inputs_a[2], inputs_a[4]))
        print(
            f"INFO loop time: plain {plain_ms:.2f} ms, graph replay {graph_ms:.2f} ms "
            f"({plain_ms / max(graph_ms, 1e-6):.1f}x) for {args.steps} steps, tiny UNet, batch {args.batch} with CFG"
        )

        # 5. control: diffusers' scheduler (first step without set_begin_index looks the index up with nonzero)
        control = diffusers_loop(args.steps, device, noise, begin_index=False)  # set-up copies happen first
        try:
            pipe.sync_checked(control)
            synced = False
        except RuntimeError:
            synced = True
        report("control: diffusers' scheduler trips the sync check", synced)
    return summary()


def summary() -> int:
    failed = [name for name, ok, _ in RESULTS if not ok]
    print(
        ("FAIL" if failed else "PASS") + f" gpu_sync_check: {len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    t0 = time.perf_counter()
    code = main()
    print(f"done in {time.perf_counter() - t0:.1f}s")
    sys.exit(code)
