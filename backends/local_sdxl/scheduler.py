"""DPM++ 2M Karras without host-device synchronization.

Numerically this is diffusers' ``DPMSolverMultistepScheduler.from_config(cfg, use_karras_sigmas=True)`` with
``algorithm_type="dpmsolver++"`` (solver order 1 or 2, midpoint or heun, ``lower_order_final``,
``euler_at_final``, ``final_sigmas_type``), but shaped for a denoising loop that never waits on the device:

* everything that depends on the step (timesteps, the x0-conversion scalars, the update coefficients, and the
  choice between first- and second-order update) is computed once per step count by :meth:`DPMSolver2MKarras.plan`
  and uploaded to the device as one table;
* the step index is a 0-d int64 *device* tensor; per-step scalars are gathered from the table with it
  (``index_select``, never ``.item()``/``nonzero``), so a loop iteration is the same graph for every step;
* lower-order steps are not a Python branch: a first-order step is a second-order step whose correction term
  has weight 0 in the table.

That makes one iteration compile with ``torch.compile(fullgraph=True)`` into a single graph for all steps, and
makes the whole loop capturable in a CUDA graph (the captured kernels read their scalars from device buffers).
The coefficient scalars are computed with the same float32 torch operations diffusers runs every step, so an
fp32 loop matches diffusers to rounding of the final multiply-adds.

This module imports only numpy and torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["SDXL_SCHEDULER_CONFIG", "DPMPlan", "DPMSolver2MKarras", "SchedulerConfigError"]

#: The scheduler config shipped with stabilityai/stable-diffusion-xl-base-1.0 (``scheduler/scheduler_config.json``).
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# Columns of the per-step coefficient table.
_ALPHA, _SIGMA, _A, _PHI, _C2, _INV_R0 = range(6)
_NCOLS = 6

# Config keys that change the algorithm in diffusers and that this implementation does not do: refuse them
# rather than silently compute something else. Value = the only accepted value.
_REFUSED_UNLESS = {
    "algorithm_type": "dpmsolver++",
    "thresholding": False,
    "rescale_betas_zero_snr": False,
    "variance_type": None,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
}
_ACCEPTED = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "solver_order",
    "solver_type",
    "lower_order_final",
    "euler_at_final",
    "final_sigmas_type",
)


class SchedulerConfigError(ValueError):
    """The scheduler config asks for something this scheduler does not implement."""


@dataclass(frozen=True)
class DPMPlan:
    """Device-resident tables for one step count; all loop methods are free of host-device syncs.

    ``table`` has one row per step: ``alpha_s, sigma_s`` (x0 conversion at the current sigma), ``A`` (sample
    coefficient), ``phi`` (first-order data coefficient), ``c2`` (second-order correction coefficient) and
    ``inv_r0`` (1/r0; 0 on first-order steps). The update is
    ``x = A*sample - phi*x0 - c2 * (inv_r0 * (x0 - prev_x0))``, exactly diffusers' expression.
    """

    num_steps: int
    timesteps: torch.Tensor  # [N] int64, device
    sigmas: torch.Tensor  # [N+1] float32, device
    table: torch.Tensor  # [N, 6], device, plan dtype
    orders: tuple[int, ...]  # solver order used at each step (host-side, for tests and logs)
    timesteps_host: tuple[int, ...]
    sigmas_host: tuple[float, ...]
    prediction_type: str
    init_noise_sigma: float = 1.0
    _indices: tuple[torch.Tensor, ...] = field(default=(), repr=False)

    def index(self, i: int) -> torch.Tensor:
        """The precomputed 0-d int64 device tensor for step ``i`` (no host->device copy per step)."""
        return self._indices[i]

    def _row(self, idx: torch.Tensor) -> torch.Tensor:
        # index_select with a 1-element device index: a gather kernel, never a host read of idx.
        return torch.index_select(self.table, 0, idx.reshape(1)).reshape(_NCOLS)

    def timestep(self, idx: torch.Tensor) -> torch.Tensor:
        """The UNet timestep for step ``idx`` as a 0-d int64 device tensor."""
        return torch.index_select(self.timesteps, 0, idx.reshape(1)).reshape(())

    def scale_model_input(self, sample: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """DPM-Solver takes the sample unscaled (kept for the scheduler protocol and future schedulers)."""
        del idx
        return sample

    def step(
        self, model_output: torch.Tensor, idx: torch.Tensor, sample: torch.Tensor, prev_x0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DPM++ 2M step. Returns ``(prev_sample, x0)``; pass ``x0`` back as ``prev_x0`` next step.

        ``prev_x0`` must be finite (zeros before the first step): its weight is 0 on first-order steps.
        In float32 this is diffusers' arithmetic op for op. With a half-precision ``model_output`` the x0
        conversion and the update run in float32 and x0 is rounded to the model's dtype (diffusers keeps its
        ``model_outputs`` in that dtype too); the coefficients are never rounded to half precision, which a
        0-d fp32 device tensor times a half tensor would otherwise do. Output: ``model_output``'s dtype.
        """
        row = self._row(idx)
        out_dtype = model_output.dtype
        sample32 = sample.to(torch.float32)
        out32 = model_output.to(torch.float32)
        alpha_s, sigma_s = row[_ALPHA], row[_SIGMA]
        # Chosen from config at plan time (a Python constant, not a tensor value).
        if self.prediction_type == "epsilon":
            x0 = (sample32 - sigma_s * out32) / alpha_s
        elif self.prediction_type == "v_prediction":
            x0 = alpha_s * sample32 - sigma_s * out32
        else:  # "sample"
            x0 = out32
        x0 = x0.to(out_dtype)
        m0 = x0.to(torch.float32)
        m1 = prev_x0.to(torch.float32)
        prev = row[_A] * sample32 - row[_PHI] * m0 - row[_C2] * (row[_INV_R0] * (m0 - m1))
        return prev.to(out_dtype), x0


class DPMSolver2MKarras:
    """Builds :class:`DPMPlan` objects. Defaults are SDXL's (scaled_linear 0.00085..0.012, epsilon)."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: Any = None,
        prediction_type: str = "epsilon",
        solver_order: int = 2,
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        final_sigmas_type: str = "zero",
    ) -> None:
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise SchedulerConfigError(f"prediction_type {prediction_type!r} is not supported")
        if solver_order not in (1, 2):
            raise SchedulerConfigError(f"solver_order {solver_order} is not supported (1 or 2; this is DPM++ 2M)")
        if solver_type not in ("midpoint", "heun"):
            raise SchedulerConfigError(f"solver_type {solver_type!r} is not supported")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise SchedulerConfigError(f"final_sigmas_type {final_sigmas_type!r} must be 'zero' or 'sigma_min'")
        self.num_train_timesteps = int(num_train_timesteps)
        self.prediction_type = prediction_type
        self.solver_order = int(solver_order)
        self.solver_type = solver_type
        self.lower_order_final = bool(lower_order_final)
        self.euler_at_final = bool(euler_at_final)
        self.final_sigmas_type = final_sigmas_type
        # Same float32 torch ops as diffusers, so the sigma table is bit-identical.
        if trained_betas is not None:
            betas = torch.tensor(trained_betas, dtype=torch.float32)
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, self.num_train_timesteps, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, self.num_train_timesteps, dtype=torch.float32) ** 2
        else:
            raise SchedulerConfigError(f"beta_schedule {beta_schedule!r} is not supported")
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> DPMSolver2MKarras:
        """Build from a diffusers scheduler config (any scheduler class, e.g. SDXL's EulerDiscrete one).

        Karras sigmas are always used. ``timestep_spacing``/``steps_offset``/``lambda_min_clipped`` do not
        matter with Karras sigmas (diffusers recomputes the timesteps from the sigmas), so they are ignored,
        as are keys of other schedulers. Keys that would change the algorithm are refused.
        """
        merged = {**dict(config), **overrides}
        for key, allowed in _REFUSED_UNLESS.items():
            if key in merged and merged[key] != allowed and not (key == "algorithm_type" and merged[key] == "deis"):
                raise SchedulerConfigError(f"{key}={merged[key]!r} is not supported (only {allowed!r})")
        return cls(**{k: merged[k] for k in _ACCEPTED if k in merged})

    # -- schedule ---------------------------------------------------------------------------------------------
    def _sigmas_and_timesteps(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """diffusers' ``set_timesteps`` with ``use_karras_sigmas=True``: (sigmas [n+1] float32, timesteps [n])."""
        ac = self.alphas_cumprod
        train_sigmas = np.array(((1 - ac) / ac) ** 0.5)  # float32
        log_sigmas = np.log(train_sigmas)
        flipped = np.flip(train_sigmas).copy()
        # diffusers' DPM scheduler has no sigma_min/sigma_max config: the ends of the training schedule.
        sigma_min = flipped[-1].item()
        sigma_max = flipped[0].item()
        rho = 7.0
        ramp = np.linspace(0, 1, n)
        min_inv_rho = sigma_min ** (1 / rho)
        max_inv_rho = sigma_max ** (1 / rho)
        sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
        timesteps = _sigma_to_t(sigmas, log_sigmas).round()
        if self.final_sigmas_type == "sigma_min":
            sigma_last = (((1 - ac[0]) / ac[0]) ** 0.5).item()
        else:
            sigma_last = 0.0
        sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        return sigmas, timesteps.astype(np.int64)

    def orders(self, n: int) -> list[int]:
        """The solver order diffusers uses at each of ``n`` steps."""
        out = []
        for i in range(n):
            final = i == n - 1 and (
                self.euler_at_final or (self.lower_order_final and n < 15) or self.final_sigmas_type == "zero"
            )
            out.append(1 if (self.solver_order == 1 or i == 0 or final) else 2)
        return out

    def plan(
        self,
        num_inference_steps: int,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> DPMPlan:
        """Precompute every per-step quantity for ``num_inference_steps`` and upload it once to ``device``."""
        n = int(num_inference_steps)
        if n < 1:
            raise ValueError("num_inference_steps must be >= 1")
        sigmas_np, timesteps_np = self._sigmas_and_timesteps(n)
        sig = torch.from_numpy(sigmas_np)  # float32 CPU, like diffusers' self.sigmas
        orders = self.orders(n)
        rows = []
        for i in range(n):
            rows.append(self._coefficients(sig, i, orders[i]))
        table = torch.stack([torch.stack(r) for r in rows]).to(device=device, dtype=dtype)
        timesteps = torch.from_numpy(timesteps_np).to(device=device)
        index_all = torch.arange(n, dtype=torch.int64, device=device)
        return DPMPlan(
            num_steps=n,
            timesteps=timesteps,
            sigmas=sig.to(device=device),
            table=table,
            orders=tuple(orders),
            timesteps_host=tuple(int(t) for t in timesteps_np),
            sigmas_host=tuple(float(s) for s in sigmas_np),
            prediction_type=self.prediction_type,
            init_noise_sigma=1.0,
            _indices=tuple(index_all[i] for i in range(n)),  # views: no per-step copies
        )

    def _coefficients(self, sig: torch.Tensor, i: int, order: int) -> list[torch.Tensor]:
        """One table row, with diffusers' float32 0-d tensor arithmetic (same rounding)."""
        alpha_s0, sigma_s0 = _alpha_sigma(sig[i])
        alpha_t, sigma_t = _alpha_sigma(sig[i + 1])
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
        h = lambda_t - lambda_s0
        a = sigma_t / sigma_s0
        phi = alpha_t * (torch.exp(-h) - 1.0)
        zero = torch.zeros((), dtype=torch.float32)
        if order == 1:
            c2, inv_r0 = zero, zero
        else:
            alpha_s1, sigma_s1 = _alpha_sigma(sig[i - 1])
            lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
            r0 = (lambda_s0 - lambda_s1) / h
            inv_r0 = 1.0 / r0
            if self.solver_type == "midpoint":
                c2 = 0.5 * phi
            else:  # heun: "+ coef * D1" written as "- (-coef) * D1" (bit-identical in IEEE arithmetic)
                c2 = -(alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0))
        # The x0 conversion uses the current sigma (diffusers' convert_model_output).
        return [alpha_s0, sigma_s0, a, phi, c2, inv_r0]


def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Interpolate timesteps from sigmas in log space (diffusers' ``_sigma_to_t``, vectorised over sigmas)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low = log_sigmas[low_idx]
    high = log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)
