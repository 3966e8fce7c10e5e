"""Prove on a CUDA device that the DPM++ 2M Karras denoising loop never synchronizes host and device.

Run from the repository root:  python benchmarks/gpu_sync_check.py [--steps 24] [--dtype bfloat16]

Checks (one PASS/FAIL line each; exit status 1 if any fails, 0 with a SKIP line where there is no CUDA):
  1. parity: our scheduler vs diffusers' DPMSolverMultistepScheduler(use_karras_sigmas=True) on the device,
     fp32, with a deterministic fake model;
  2. scheduler loop under ``torch.cuda.set_sync_debug_mode("error")`` (any implicit sync raises);
  3. full loop (tiny SDXL UNet from ``preset: tiny``, CFG batch 2) under the same sync debug mode;
  4. the full loop captured once in a ``torch.cuda.CUDAGraph`` and replayed on two different noise inputs,
     each compared with the eager loop (per-step scalars come from device buffers, so a replay is correct
     for every step, not just the captured values);
  5. control: diffusers' own step on the device *does* trip the sync check (so check 2 can fail).
Also prints eager vs graph-replay time per loop. ``--dry-run`` runs checks 1 and the eager loops on the CPU
(no sync mode, no graph) to validate the script itself where no GPU is present.

Self-contained: imports only torch, ``backends.local_sdxl.scheduler`` and ``backends.local_sdxl.presets``
(and diffusers for the parity/control checks; presets needs it anyway).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backends.local_sdxl.presets import load_components
from backends.local_sdxl.scheduler import SDXL_SCHEDULER_CONFIG, DPMSolver2MKarras

RESULTS: list[tuple[str, bool, str]] = []


def report(name: str, ok: bool, detail: str = "") -> None:
    RESULTS.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else ""), flush=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def fake_model(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    pattern = torch.linspace(-1.0, 1.0, sample.numel(), device=sample.device).reshape(sample.shape)
    return 0.7 * sample + (t.to(sample.dtype) / 1000.0) * pattern.to(sample.dtype)


def scheduler_loop(plan, model: Callable, noise: torch.Tensor) -> torch.Tensor:
    """The loop exactly as the pipeline runs it (the interface in scheduler.py)."""
    latents = noise * plan.init_noise_sigma
    prev_x0 = torch.zeros_like(latents)
    for i in range(plan.num_steps):
        idx = plan.index(i)
        model_in = plan.scale_model_input(latents, idx)
        latents, prev_x0 = plan.step(model(model_in, plan.timestep(idx)), idx, latents, prev_x0)
    return latents


def diffusers_scheduler(steps: int, device: torch.device, *, begin_index: bool = True):
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler.from_config(SDXL_SCHEDULER_CONFIG, use_karras_sigmas=True)
    sched.set_timesteps(steps, device=device)
    if begin_index:
        sched.set_begin_index(0)
    return sched


def diffusers_loop(sched, noise: torch.Tensor) -> torch.Tensor:
    latents = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        latents = sched.step(fake_model(latents, t), t, latents, return_dict=False)[0]
    return latents


def make_unet_model(components, batch: int, guidance: float, dtype: torch.dtype, device) -> Callable:
    """Tiny SDXL UNet with classifier-free guidance; conditioning is fixed random device tensors."""
    unet = components.unet
    g = torch.Generator(device="cpu").manual_seed(1)
    width = unet.config.cross_attention_dim
    pooled_dim = components.text_encoder_2.config.projection_dim
    embeds = torch.randn(2 * batch, 77, width, generator=g).to(device, dtype)
    pooled = torch.randn(2 * batch, pooled_dim, generator=g).to(device, dtype)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * (2 * batch), device=device, dtype=dtype)
    scale = torch.tensor(guidance, device=device, dtype=torch.float32)

    def model(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        both = torch.cat([sample, sample]).to(dtype)
        out = unet(both, t, encoder_hidden_states=embeds,
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, return_dict=False)[0]
        uncond, cond = out.float().chunk(2)
        return (uncond + scale * (cond - uncond)).to(sample.dtype)

    return model


def check_sync_free(name: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor | None:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = fn()
    except RuntimeError as exc:
        torch.cuda.set_sync_debug_mode(0)
        report(name, False, f"synchronizing call: {str(exc).splitlines()[0]}")
        return None
    torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    report(name, bool(torch.isfinite(out).all().item()), "no host-device sync inside the loop")
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--size", type=int, default=64, help="image side; latents are size/2 with preset tiny")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dry-run", action="store_true", help="CPU: validate the script (no sync/graph checks)")
    args = parser.parse_args(argv)
    RESULTS.clear()
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("SKIP gpu_sync_check: no CUDA device (nothing to prove on CPU; see tests for the fullgraph check)")
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype) if cuda else torch.float32
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu (dry run)'}, torch {torch.__version__}, "
          f"{args.steps} steps, {args.dtype if cuda else 'float32'}")

    plan = DPMSolver2MKarras.from_config(SDXL_SCHEDULER_CONFIG).plan(args.steps, device=device)
    noise32 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)).to(device)

    # 1. parity on the device (fp32)
    ours = scheduler_loop(plan, fake_model, noise32)
    ref = diffusers_loop(diffusers_scheduler(args.steps, device), noise32)
    err = rel_err(ours, ref)
    report("parity with diffusers (fp32, fake model)", err <= 1e-4, f"max rel err {err:.2e}")

    components = load_components(preset="tiny", model=None, taesd=None, device=device, dtype=dtype,
                                 vae_dtype=dtype, seed=0, progress=lambda line: None)
    model = make_unet_model(components, args.batch, 5.0, dtype, device)
    side = args.size // components.vae_scale_factor
    shape = (args.batch, components.unet.config.in_channels, side, side)
    noise_a = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    noise_b = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(device, dtype)

    def full_loop(noise: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return scheduler_loop(plan, model, noise)

    eager_a = full_loop(noise_a)  # also the warm-up (cuDNN/cuBLAS handles, lazy inits) before any check
    eager_b = full_loop(noise_b)
    if not cuda:
        report("eager tiny-UNet loop runs (dry run)", bool(torch.isfinite(eager_a).all()), f"shape {tuple(shape)}")
        return summary()

    # 2./3. no syncs
    check_sync_free("scheduler loop under sync_debug_mode=error", lambda: scheduler_loop(plan, fake_model, noise32))
    out = check_sync_free("tiny-UNet CFG loop under sync_debug_mode=error", lambda: full_loop(noise_a))
    if out is not None:
        err = rel_err(out, eager_a)
        report("sync-checked loop equals the plain eager loop", err <= 1e-5, f"max rel err {err:.2e}")

    # 4. CUDA graph: capture once, replay for two inputs
    static_in = noise_a.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            full_loop(static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            static_out = full_loop(static_in)
    except Exception as exc:  # noqa: BLE001 - any capture failure is a FAIL line, not a traceback
        report("CUDA graph capture of the whole loop", False, f"{type(exc).__name__}: {exc}")
        return summary()
    report("CUDA graph capture of the whole loop", True, f"{args.steps} steps in one graph")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for name, noise, eager in (("A", noise_a, eager_a), ("B", noise_b, eager_b)):
        static_in.copy_(noise)
        graph.replay()
        torch.cuda.synchronize()
        err = rel_err(static_out, eager)
        report(f"graph replay on input {name} matches eager", err <= tol, f"max rel err {err:.2e} (tol {tol})")
    report("replays differ for different inputs (not frozen)", not torch.equal(static_out, eager_a))

    eager_ms = time_it(lambda: full_loop(noise_a))
    graph_ms = time_it(graph.replay)
    print(f"INFO loop time: eager {eager_ms:.2f} ms, graph replay {graph_ms:.2f} ms "
          f"({eager_ms / max(graph_ms, 1e-6):.1f}x) for {args.steps} steps, tiny UNet, batch {args.batch} with CFG")

    # 5. control: diffusers' scheduler (first step without set_begin_index looks the index up with nonzero)
    sched = diffusers_scheduler(args.steps, device, begin_index=False)  # set-up copies happen before the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        diffusers_loop(sched, noise32)
        synced = False
    except RuntimeError:
        synced = True
    finally:
        torch.cuda.set_sync_debug_mode(0)
    report("control: diffusers' scheduler trips the sync check", synced)
    return summary()


def summary() -> int:
    failed = [name for name, ok, _ in RESULTS if not ok]
    print(("FAIL" if failed else "PASS") + f" gpu_sync_check: {len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    t0 = time.perf_counter()
    code = main()
    print(f"done in {time.perf_counter() - t0:.1f}s")
    sys.exit(code)
