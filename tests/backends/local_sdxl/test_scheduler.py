"""DPM++ 2M Karras: parity with diffusers, and one compiled graph for every step (no host sync possible)."""

from __future__ import annotations

import contextlib

import pytest

pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import torch

from backends.local_sdxl.scheduler import (
    SDXL_SCHEDULER_CONFIG,
    DPMSolver2MKarras,
    SchedulerConfigError,
)

SHAPE = (2, 4, 8, 8)


def _reference(steps: int, **config):
    sched = diffusers.DPMSolverMultistepScheduler.from_config(SDXL_SCHEDULER_CONFIG, use_karras_sigmas=True, **config)
    sched.set_timesteps(steps)
    return sched


def _fake_unet(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic 'model': linear in the sample, with a t-dependent fixed pattern."""
    pattern = torch.linspace(-1.0, 1.0, sample.numel(), dtype=torch.float32).reshape(sample.shape).to(sample.dtype)
    return 0.7 * sample + (t.to(sample.dtype) / 1000.0) * pattern


def _initial(dtype=torch.float32) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(dtype)


def _run_diffusers(steps: int, dtype=torch.float32, **config) -> torch.Tensor:
    sched = _reference(steps, **config)
    sample = _initial(dtype) * sched.init_noise_sigma
    for t in sched.timesteps:
        model_in = sched.scale_model_input(sample, t)
        sample = sched.step(_fake_unet(model_in, t), t, sample, return_dict=False)[0]
    return sample


def _run_ours(steps: int, dtype=torch.float32, **config) -> torch.Tensor:
    plan = DPMSolver2MKarras.from_config(SDXL_SCHEDULER_CONFIG, **config).plan(steps, device="cpu")
    sample = _initial(dtype) * plan.init_noise_sigma
    prev_x0 = torch.zeros_like(sample)
    for i in range(plan.num_steps):
        idx = plan.index(i)
        model_in = plan.scale_model_input(sample, idx)
        sample, prev_x0 = plan.step(_fake_unet(model_in, plan.timestep(idx)), idx, sample, prev_x0)
    return sample


@pytest.mark.parametrize("steps", [1, 4, 10, 14, 15, 24, 30])
def test_schedule_matches_diffusers(steps):
    ref = _reference(steps)
    plan = DPMSolver2MKarras.from_config(SDXL_SCHEDULER_CONFIG).plan(steps)
    assert plan.timesteps_host == tuple(ref.timesteps.tolist())
    assert torch.equal(plan.timesteps, ref.timesteps)
    assert torch.equal(plan.sigmas, ref.sigmas)
    assert plan.timesteps.dtype == torch.int64 and plan.index(0).dim() == 0
    assert plan.sigmas_host[-1] == 0.0  # final_sigmas_type "zero"
    assert plan.orders[0] == 1 and plan.orders[-1] == 1 and set(plan.orders[1:-1]) <= {2}


@pytest.mark.parametrize(
    "steps, config",
    [
        (24, {}),
        (4, {}),
        (10, {}),
        (30, {}),
        (2, {}),
        (1, {}),
        (10, {"final_sigmas_type": "sigma_min"}),  # < 15 steps: last step still first order
        (24, {"final_sigmas_type": "sigma_min"}),  # >= 15 steps: last step second order
        (24, {"final_sigmas_type": "sigma_min", "lower_order_final": False}),
        (24, {"final_sigmas_type": "sigma_min", "euler_at_final": True}),
        (24, {"prediction_type": "v_prediction"}),
        (24, {"solver_type": "heun"}),
        (24, {"solver_order": 1}),
    ],
)
def test_denoising_matches_diffusers_fp32(steps, config):
    expected = _run_diffusers(steps, **config)
    got = _run_ours(steps, **config)
    assert got.dtype == expected.dtype == torch.float32
    rel = ((got - expected).abs().max() / expected.abs().max()).item()
    assert rel <= 1e-4, rel


def test_parity_check_detects_a_wrong_order():
    """The parity test has teeth: an all-first-order (Euler-like) solver is far from DPM++ 2M."""
    expected = _run_diffusers(24)
    wrong = _run_ours(24, solver_order=1)
    assert ((wrong - expected).abs().max() / expected.abs().max()).item() > 1e-2


def test_orders_follow_diffusers_rules():
    sched = DPMSolver2MKarras.from_config(SDXL_SCHEDULER_CONFIG, final_sigmas_type="sigma_min")
    assert sched.orders(10)[-1] == 1  # lower_order_final with < 15 steps
    assert sched.orders(24)[-1] == 2
    assert DPMSolver2MKarras().orders(24)[-1] == 1  # final sigma zero: always first order at the end
    assert DPMSolver2MKarras().orders(1) == [1]


def test_reduced_precision_keeps_dtype_and_stays_close():
    expected = _run_diffusers(24, dtype=torch.bfloat16).float()
    got = _run_ours(24, dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert ((got.float() - expected).abs().max() / expected.abs().max()).item() < 0.05


def test_config_handling():
    default = DPMSolver2MKarras()
    from_sdxl = DPMSolver2MKarras.from_config(SDXL_SCHEDULER_CONFIG)
    assert default.plan(24).timesteps_host == from_sdxl.plan(24).timesteps_host
    # Unknown keys from other schedulers are ignored; algorithm-changing ones are refused.
    DPMSolver2MKarras.from_config({**SDXL_SCHEDULER_CONFIG, "interpolation_type": "linear", "timestep_type": "x"})
    for bad in (
        {"algorithm_type": "sde-dpmsolver++"},
        {"thresholding": True},
        {"use_exponential_sigmas": True},
        {"solver_order": 3},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"prediction_type": "flow_prediction"},
    ):
        with pytest.raises(SchedulerConfigError):
            DPMSolver2MKarras.from_config(SDXL_SCHEDULER_CONFIG, **bad)
    with pytest.raises(ValueError):
        default.plan(0)


# --- the step compiles to one graph for all steps -----------------------------------------------------------------
class _CountingBackend:
    """A torch.compile backend that records each graph dynamo hands it and runs it eagerly (no inductor)."""

    def __init__(self) -> None:
        self.graphs: list = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


def _iteration(plan):
    def iteration(sample, prev_x0, idx):
        model_in = plan.scale_model_input(sample, idx)
        noise_pred = _fake_unet(model_in, plan.timestep(idx))
        return plan.step(noise_pred, idx, sample, prev_x0)

    return iteration


@pytest.mark.parametrize("steps", [24, 10])
def test_step_is_one_graph_for_all_steps(steps):
    torch._dynamo.reset()
    backend = _CountingBackend()
    plan = DPMSolver2MKarras().plan(steps)
    compiled = torch.compile(_iteration(plan), fullgraph=True, backend=backend)
    sample = _initial()
    prev_x0 = torch.zeros_like(sample)
    for i in range(plan.num_steps):
        sample, prev_x0 = compiled(sample, prev_x0, plan.index(i))
    assert len(backend.graphs) == 1, f"{len(backend.graphs)} graphs: the step recompiled"
    # One graph, and no host reads in it: nothing calls .item()/nonzero or converts tensors to Python.
    ops = {getattr(node.target, "__name__", str(node.target)) for node in backend.graphs[0].graph.nodes}
    assert not ops & {"item", "tolist", "nonzero", "_local_scalar_dense"}, ops
    assert "index_select" in ops  # per-step scalars are gathered on the device
    # The compiled loop computed the same thing as eager (and hence diffusers).
    expected = _run_diffusers(steps)
    assert ((sample - expected).abs().max() / expected.abs().max()).item() <= 1e-4
    torch._dynamo.reset()


def test_diffusers_scheduler_does_not_compile_to_one_graph():
    """Control: the same check fails for diffusers' scheduler, so the test above can fail."""
    torch._dynamo.reset()
    # Fresh scheduler: the step-index lookup (nonzero + item) is a graph break, which fullgraph=True refuses.
    sched = _reference(24)
    backend = _CountingBackend()
    compiled = torch.compile(
        lambda s, t: sched.step(_fake_unet(s, t), t, s, return_dict=False)[0], fullgraph=True, backend=backend
    )
    # Unsupported (graph break) or UserError (data-dependent guard), depending on dynamo's state.
    with pytest.raises(torch._dynamo.exc.TorchDynamoException):
        compiled(_initial(), sched.timesteps[0])
    torch._dynamo.reset()

    # With set_begin_index(0) it traces, but dynamo guards on the Python step counter: one graph per step.
    sched = _reference(24)
    sched.set_begin_index(0)
    backend = _CountingBackend()
    compiled = torch.compile(
        lambda s, t: sched.step(_fake_unet(s, t), t, s, return_dict=False)[0], fullgraph=True, backend=backend
    )
    sample = _initial()
    with contextlib.suppress(torch._dynamo.exc.FailOnRecompileLimitHit):  # if the recompile limit is reached
        for t in sched.timesteps:
            sample = compiled(sample, t)
    assert len(backend.graphs) > 1, "diffusers' step compiled to one graph: the control no longer fails"
    torch._dynamo.reset()


def test_gpu_sync_check_script_runs(capsys):
    """benchmarks/gpu_sync_check.py: skips cleanly without CUDA, and its CPU dry run passes its own checks."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[3] / "benchmarks" / "gpu_sync_check.py"
    spec = importlib.util.spec_from_file_location("gpu_sync_check", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not torch.cuda.is_available():
        assert module.main([]) == 0
        assert "SKIP" in capsys.readouterr().out
    assert module.main(["--dry-run", "--steps", "2", "--size", "16"]) == 0
    out = capsys.readouterr().out
    assert "PASS parity with diffusers" in out and "FAIL" not in out
