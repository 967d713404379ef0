"""The train-step benchmark's PyTorch reference: the same terms, combiner and optimizer
as our step, written with diffusers' UNet and torch.optim (run in its own subprocess)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from unlearn_jax.benchmarks.common import PeakMemory, timed_loop


def torch_trainable(name: str, group: str) -> bool:
    """registry.trainable_mask's groups on a diffusers parameter name (no JAX import)."""
    if group == "full":
        return True
    in_xattn = "attn2" in name.split(".")
    if group in ("xattn", "noxattn"):
        return in_xattn == (group == "xattn")
    raise ValueError(f"the torch reference supports params full|xattn|noxattn, not {group!r}")


class TorchReference:
    """The preset's loss on a trainable diffusers UNet and a frozen copy, term for term.

    Mirrors forget.py / retain.py / registry.COMBINERS: the same targets, the
    same stop-gradients (here: the frozen copy runs under no_grad, a 'current'
    remap target is detached) and, like ours, one UNet call over both
    contexts where ours makes one.
    """

    def __init__(self, spec, student, frozen, scheduler, data, params):
        import torch

        self.torch, self.spec, self.hp = torch, spec, spec["hparams"]
        self.student, self.frozen, self.scheduler, self.data = student, frozen, scheduler, data
        self.params = params
        self.num_timesteps = scheduler.config.num_train_timesteps
        self.generator = torch.Generator(student.device).manual_seed(spec["seed"])
        self.bf16 = spec["dtype"] == "bfloat16"

    def _autocast(self):
        import contextlib

        if not self.bf16:
            return contextlib.nullcontext()
        return self.torch.autocast(self.student.device.type, dtype=self.torch.bfloat16)

    def _mse(self, a, b):
        return self.torch.nn.functional.mse_loss(a.float(), b.float())

    def _apply(self, unet, x_t, t, context):
        return unet(x_t, t, encoder_hidden_states=context).sample

    def _two_contexts(self, unet, x_t, t, context_a, context_b):
        cat = self.torch.cat
        context_b = context_b.expand_as(context_a)
        out = self._apply(unet, cat([x_t, x_t]), cat([t, t]), cat([context_a, context_b]))
        return out.chunk(2)

    def _draws(self, part: str, draws: dict | None):
        x0 = self.data[f"{part}_x0"]
        if draws is not None:  # ours' exact t and eps (cross-check)
            t, eps = draws[f"{part}_t"].long(), draws[f"{part}_eps"]
        else:
            t = self.torch.randint(
                0, self.num_timesteps, (x0.shape[0],), generator=self.generator, device=x0.device
            )
            eps = self.torch.randn(x0.shape, generator=self.generator, device=x0.device)
        return x0, t, eps, self.scheduler.add_noise(x0, eps, t)

    def _target(self, x0, eps, t):
        if self.scheduler.config.prediction_type == "epsilon":
            return eps
        return self.scheduler.get_velocity(x0, eps, t)

    def forget_loss(self, draws=None):
        """(loss, aux) of the preset's forget term."""
        term, d = self.spec["forget"], self.data
        context, empty = d["forget_context"], d["empty_context"]
        if term == "esd":
            x_t, t = d["esd_x_t"], d["esd_t"].long()
            with self.torch.no_grad():
                cond, uncond = self._two_contexts(self.frozen, x_t, t, context, empty)
                target = uncond.float() - self.hp["eta"] * (cond.float() - uncond.float())
            mse = self._mse(self._apply(self.student, x_t, t, context), target)
            return mse, {"mse": mse}
        x0, t, eps, x_t = self._draws("forget", draws)
        if term == "remap":
            anchor = d["anchor_context"]  # [B, L, D]: each example's own c_a
            if self.hp["target_model"] == "current":
                prediction, anchored = self._two_contexts(self.student, x_t, t, context, anchor)
                anchored = anchored.detach()
            else:
                prediction = self._apply(self.student, x_t, t, context)
                with self.torch.no_grad():
                    anchored = self._apply(self.frozen, x_t, t, anchor)
            mse = self._mse(prediction, anchored)
            return mse, {"mse": mse}
        if term == "noise":
            if draws is not None:
                noise = draws["forget_target_noise"]
            else:
                noise = self.torch.randn(x0.shape, generator=self.generator, device=x0.device)
            target = self._target(x0, noise, t)
        else:  # neggrad
            target = self._target(x0, eps, t)
        mse = self._mse(self._apply(self.student, x_t, t, context), target)
        return (-mse if term == "neggrad" else mse), {"mse": mse}

    def retain_loss(self, draws=None):
        """(loss, aux) of the preset's retain term."""
        x0, t, eps, x_t = self._draws("retain", draws)
        context, empty = self.data["retain_context"], self.data["empty_context"]
        if self.spec["retain"] == "retain_dm":
            mse = self._mse(self._apply(self.student, x_t, t, context), self._target(x0, eps, t))
            return mse, {"mse": mse}
        student_cond, student_uncond = self._two_contexts(self.student, x_t, t, context, empty)
        with self.torch.no_grad():
            teacher_cond, teacher_uncond = self._two_contexts(self.frozen, x_t, t, context, empty)
        mse_cond = self._mse(student_cond, teacher_cond)
        mse_uncond = self._mse(student_uncond, teacher_uncond)
        loss = mse_cond + self.hp["uncond_weight"] * mse_uncond
        return loss, {"mse_cond": mse_cond, "mse_uncond": mse_uncond}

    def _coefficients(self, gram):
        """(a, b) of g = a g_f + b g_r: registry.COMBINERS in PyTorch."""
        hp, name = self.hp, self.spec["combiner"]
        ff, fr, rr = gram
        if name == "sum":
            return 1.0, hp["retain_weight"]
        if name == "project":
            remove = rr > 0 and (fr < 0 or hp["strict"])
            return 1.0, hp["retain_weight"] - (fr / rr if remove else 0.0)
        if hp["erasediff_lambda"] is not None:
            return hp["erasediff_lambda"], 1.0
        cosine = fr / (ff * rr) ** 0.5 if ff * rr > 0 else 0.0
        return max(hp["erasediff_eta"] - cosine, 0.0), 1.0

    def _term_grads(self, draws=None):
        """(g_f, g_r, metrics named like ours, (a, b) of the combination g = a g_f + b g_r)."""
        grad = lambda loss: self.torch.autograd.grad(loss, self.params)
        dot = lambda x, y: sum(float((a.double() * b.double()).sum()) for a, b in zip(x, y))
        with self._autocast():
            loss_f, aux_f = self.forget_loss(draws)
        g_f = grad(loss_f)
        metrics = {"forget/loss": loss_f, **{f"forget/{k}": v for k, v in aux_f.items()}}
        if self.spec["retain"] is None:
            metrics["grad/forget_norm"] = metrics["grad/norm"] = dot(g_f, g_f) ** 0.5
            return g_f, None, metrics, (1.0, 0.0)
        with self._autocast():
            loss_r, aux_r = self.retain_loss(draws)
        g_r = grad(loss_r)
        metrics.update({"retain/loss": loss_r, **{f"retain/{k}": v for k, v in aux_r.items()}})
        gram = (dot(g_f, g_f), dot(g_f, g_r), dot(g_r, g_r))
        a, b = self._coefficients(gram)
        metrics["grad/forget_norm"], metrics["grad/retain_norm"] = gram[0] ** 0.5, gram[2] ** 0.5
        combined = a * a * gram[0] + 2 * a * b * gram[1] + b * b * gram[2]
        metrics["grad/norm"] = max(combined, 0.0) ** 0.5
        return g_f, g_r, metrics, (a, b)

    def metrics_at(self, draws) -> dict[str, float]:
        """The losses and gradient norms at the current θ for the given draws (no update)."""
        return {k: float(v) for k, v in self._term_grads(draws)[2].items()}

    def step(self, optimizer) -> None:
        """One update: loss.backward() (sum) or per-term gradients, clipping, Adam."""
        optimizer.zero_grad(set_to_none=True)
        if self.spec["combiner"] == "sum" or self.spec["retain"] is None:
            with self._autocast():
                loss = self.forget_loss()[0]
                if self.spec["retain"] is not None:
                    loss = loss + self.hp["retain_weight"] * self.retain_loss()[0]
            loss.backward()
        else:  # non-linear combiners need each term's gradient
            g_f, g_r, _, (a, b) = self._term_grads()
            for p, gf, gr in zip(self.params, g_f, g_r):
                p.grad = a * gf + b * gr
        if self.spec["optim"]["grad_clip"] > 0:
            self.torch.nn.utils.clip_grad_norm_(self.params, self.spec["optim"]["grad_clip"])
        optimizer.step()


def run_torch(spec: dict, workdir: Path) -> dict:
    """Loads the reference, evaluates it on ours' step-0 draws, times its steps."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from unlearn_jax.testing.tiny_model import quiet_hf_logging

    quiet_hf_logging()
    torch.set_num_threads(spec["threads"])
    memory = PeakMemory()
    memory.mark()
    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folder = Path(spec["model"])
    student = UNet2DConditionModel.from_pretrained(str(workdir / "start_unet"))
    student = student.to(device, torch.float32).train()
    frozen = UNet2DConditionModel.from_pretrained(str(folder / "unet"))
    frozen = frozen.to(device, torch.float32).eval().requires_grad_(False)
    if spec["remat"]:
        student.enable_gradient_checkpointing()
    params = []
    for name, p in student.named_parameters():
        p.requires_grad_(torch_trainable(name, spec["params"]))
        if p.requires_grad:
            params.append(p)
    scheduler = DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler")
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    to_device = lambda npz: {k: torch.from_numpy(v).to(device) for k, v in npz.items()}
    data = to_device(np.load(workdir / "inputs.npz"))
    reference = TorchReference(spec, student, frozen, scheduler, data, params)
    optim = spec["optim"]
    optimizer = torch.optim.Adam(
        params, lr=optim["lr"], betas=(optim["b1"], optim["b2"]), eps=optim["eps"]
    )
    loaded = time.perf_counter()
    step0 = reference.metrics_at(to_device(np.load(workdir / "draws.npz")))
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    f0 = time.perf_counter()
    reference.step(optimizer)
    sync()
    first_s = time.perf_counter() - f0
    timing = timed_loop(lambda: reference.step(optimizer), spec["warmup"], spec["steps"], sync)
    cuda = device.type == "cuda"
    return {
        **timing,
        "load_s": loaded - t0,
        "first_step_s": first_s,
        "trainable_parameters": sum(p.numel() for p in params),
        **memory.report(),
        "device_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "step0": step0,
    }
