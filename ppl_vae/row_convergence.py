"""A local fit whose every row converges on its own: per-row draws, rates and stopping.

``fit_local`` fits one q_n per datapoint in one vectorized run. For a row's q*_n to be a
property of x_n alone, and not of the rows fitted with it, three things must be the
row's own:

- its random draws: the standard-normal noise behind each reparameterized draw of row n
  at step t depends only on (seed, n, t) (:func:`row_noise`, blocks of ``ROW_BLOCK``
  rows seeded apart, as ``ppl_vae.seeding`` does for evaluations), and is handed
  to the guide by :class:`Noised`;
- its step sizes: :class:`RowAdam` is Adam with a learning rate per row. Adam's update
  is invariant to the scale of the gradient (m / sqrt(v) cancels it), so scaling a
  row's gradient would not change its step; the rate has to multiply the update;
- its stopping: :class:`RowPlateau` decides each row's decays and its stop from that
  row's ELBO alone, measured every ``window`` steps on fixed draws (common random
  numbers: the difference of two measurements sees the change of q_n, not the noise of
  the draws, which the window means of one row's training ELBO could not separate from
  the few hundredths of a nat that matter here).

A stopped row is frozen: its parameters and Adam moments are left exactly as they are.
The fit ends when every row has stopped or after ``steps`` steps.
"""

from __future__ import annotations

import math

import torch
from pyro.poutine.messenger import Messenger
from torch import Tensor, nn

from ppl_vae.distributed import summed_over_group
from ppl_vae.guides.local import LATENT, tril_mv
from ppl_vae.seeding import ROW_BLOCK, generator

# The learning rate of a row is divided by LR_DECAY at each of its plateaus, LR_DECAYS
# times; its next plateau stops it. At a constant rate Adam hovers around each
# datapoint's optimum at a distance set by the rate and the gradient noise; smaller
# rates let it settle (on a 2-d PPCA posterior the mean excess KL falls from ~0.04 nats
# at a constant 3e-2 to ~0.001).
LR_DECAY = 3.0
LR_DECAYS = 4
# Measurements of every row's ELBO per window of the plateau rule, and the windows in a
# row without a new best (by tol) that make a plateau: one row's window averages are
# far noisier than the mean over many rows that the rule of a single rate could read,
# and a single noisy window must not decay a row that is still improving.
MEASURES = 5
PATIENCE = 5
# Counters that keep the draws of training steps, measurements and initialisation apart.
EVAL_STREAM = 2**40
INIT_STREAM = 2**41


def row_noise(seed: int, num_rows: int, shape: tuple[int, ...], step: int, *,
              dtype=torch.float32, device=None) -> Tensor:
    """Standard-normal draws ``(*shape, num_rows, d)``: row n depends on (seed, n, step).

    Rows are drawn in blocks of ``ROW_BLOCK`` dataset rows, each block from its own
    generator seeded by (seed, block, step) and always drawn whole, so a row's values
    do not depend on how many rows there are. ``shape`` is ``(*sample_shape, d)``.
    """
    *sample, d = shape
    blocks = []
    for block in range(math.ceil(num_rows / ROW_BLOCK)):
        g = generator(seed, block, step)
        blocks.append(torch.randn(ROW_BLOCK, *sample, d, generator=g, dtype=dtype))
    noise = torch.cat(blocks)[:num_rows] if blocks else torch.zeros(0, *sample, d, dtype=dtype)
    # (N, *sample, d) -> (*sample, N, d): rows at dim -2, as the particles plate has them.
    return noise.movedim(0, -2).contiguous().to(device)


class _FromNoise(Messenger):
    """Give the local guide's draw of u the value its distribution maps ``noise`` to."""

    def __init__(self, noise: Tensor):
        super().__init__()
        self.noise = noise

    def _pyro_sample(self, msg) -> None:
        if msg["name"] == LATENT and msg["value"] is None:
            msg["value"] = reparameterized(msg["fn"], self.noise)


def reparameterized(fn, noise: Tensor) -> Tensor:
    """What ``fn.rsample()`` returns when its standard-normal draw is ``noise``.

    The arithmetic of torch's own ``rsample``: ``loc + eps * scale`` for a Normal,
    ``loc + L eps`` for a MultivariateNormal, the transforms in order for a
    TransformedDistribution (which also fills their caches, as ``rsample`` does).
    """
    if isinstance(fn, torch.distributions.Independent):
        return reparameterized(fn.base_dist, noise)
    if isinstance(fn, torch.distributions.Normal):
        return fn.loc + noise * fn.scale
    if isinstance(fn, torch.distributions.MultivariateNormal):
        return fn.loc + tril_mv(fn._unbroadcasted_scale_tril, noise)
    if isinstance(fn, torch.distributions.TransformedDistribution):
        value = reparameterized(fn.base_dist, noise)
        for transform in fn.transforms:
            value = transform(value)
        return value
    raise TypeError(f"a local guide's draw cannot be a {type(fn).__name__}")


class Noised(nn.Module):
    """A local guide whose draw of u comes from the buffer ``noise`` (K, N, d).

    Row ``idx[b]`` of a minibatch reads ``noise[:, idx[b]]``. The noise is a buffer, so a
    traced loss (``ppl_vae.traced.TracedLoss``) takes it as an input at every call.
    ``whole=True`` is for a fit whose every call holds all N rows in order (``fit``'s
    full batch): the guide then reads its parameters and the noise whole, without the
    gathers (and their scatters in the backward pass) that ``idx`` would cost.
    """

    def __init__(self, guide: nn.Module, noise: Tensor, *, whole: bool = False):
        super().__init__()
        self.guide, self.whole = guide, whole
        self.register_buffer("noise", noise, persistent=False)

    def forward(self, x: Tensor, idx: Tensor | None = None, num_data: int | None = None):
        if self.whole:
            idx = None
        noise = self.noise if idx is None else self.noise[:, idx]
        with _FromNoise(noise):
            return self.guide(x, idx, num_data)


class RowAdam(torch.optim.Optimizer):
    """Adam over parameters of shape (N, ...), with a learning rate and a switch per row.

    Row n of every parameter moves by ``row_lr[n] * m_hat / (sqrt(v_hat) + eps)``, with
    the bias corrections of row n's own step count, and rows with ``active[n]`` False
    do not move at all (parameters and moments unchanged, bit for bit). The update is
    torch's Adam's, elementwise, so a row's path depends on its own gradients only.
    """

    def __init__(self, params, lr: float, num_rows: int, *, betas=(0.9, 0.999),
                 eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})
        self.row_lr = torch.full((num_rows,), float(lr), dtype=torch.float64)
        self.active = torch.ones(num_rows, dtype=torch.bool)
        self.row_steps = torch.zeros(num_rows, dtype=torch.float64)

    @torch.no_grad()
    def step(self, closure=None):
        steps = self.row_steps + self.active
        self._all_active = bool(self.active.all())
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            # Bias corrections per row; a row not yet stepped (inactive) divides by 1.
            correction1 = torch.where(steps > 0, 1 - beta1**steps, 1.0)
            correction2 = torch.where(steps > 0, 1 - beta2**steps, 1.0)
            for param in group["params"]:
                self._update(param, beta1, beta2, group["eps"], correction1, correction2)
        self.row_steps = steps
        return None

    def _update(self, param, beta1, beta2, eps, correction1, correction2) -> None:
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        state = self.state[param]
        if not state:
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        per_row = (-1,) + (1,) * (param.dim() - 1)

        def rows(values: Tensor) -> Tensor:
            return values.to(param).view(per_row)

        if self._all_active:  # the same arithmetic in place: 8 passes instead of 14
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = v.sqrt().div_(rows(correction2.sqrt())).add_(eps)
            param.sub_(torch.div(m, denom).mul_(rows(self.row_lr / correction1)))
            return
        active = self.active.to(param.device).view(per_row)
        m_new = m.lerp(grad, 1 - beta1)
        v_new = v.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (v_new.sqrt() / rows(correction2.sqrt())).add_(eps)
        update = m_new / denom * rows(self.row_lr / correction1)
        param.sub_(torch.where(active, update, torch.zeros((), dtype=param.dtype)))
        m.copy_(torch.where(active, m_new, m))
        v.copy_(torch.where(active, v_new, v))

    def state_dict(self):
        state = super().state_dict()
        state["rows"] = {"row_lr": self.row_lr.clone(), "active": self.active.clone(),
                         "row_steps": self.row_steps.clone()}
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        rows = state_dict.pop("rows")
        super().load_state_dict(state_dict)
        self.row_lr = rows["row_lr"].clone()
        self.active = rows["active"].clone()
        self.row_steps = rows["row_steps"].clone()


class RowPlateau:
    """fit()'s callback: per-row learning-rate decays and stops, and each step's noise.

    Each row's ELBO is measured ``MEASURES`` times per ``window`` steps, always on the
    same fixed draws, and averaged over the window (the average also smooths the
    jitter of Adam's iterates around the optimum). A row whose window average has not
    beaten its best by ``tol`` for ``PATIENCE`` windows in a row is at a plateau: its
    rate is divided by ``LR_DECAY``, and at its plateau after ``LR_DECAYS`` decays it
    stops. With ``steps``, every row's rate is also multiplied by the cosine factor
    ``(1 + cos(pi t / steps)) / 2`` of the step t (the same for every row, so a row's
    path still depends on its own draws only), which brings each row to rest by the
    last step. Rows outside ``owned`` (another rank's) are stopped from the start.

    Parameters
    ----------
    measure : callable() -> Tensor of shape (N,)
        The ELBO of every row on the fixed draws (NaN where not owned).
    set_step : callable(step)
        Loads the training noise of step ``step`` into the guide.
    steps : int, optional
        The fit's most steps, over which the rates follow the cosine; none if None.
    """

    def __init__(self, lr: float, num_rows: int, *, tol: float, window: int, measure,
                 set_step, owned: Tensor | None = None, steps: int | None = None):
        self.lr, self.num_rows, self.tol, self.window = lr, num_rows, tol, window
        self.steps = steps
        self.measure, self.set_step = measure, set_step
        self.every = max(1, window // MEASURES)
        self.owned = owned.cpu() if owned is not None else None
        self.decays = torch.zeros(num_rows, dtype=torch.long)
        self.sums = torch.zeros(num_rows, dtype=torch.float64)
        self.count = 0
        self.best: Tensor | None = None
        self.waited = torch.zeros(num_rows, dtype=torch.long)
        self._optimizer: RowAdam | None = None

    def optimizer(self, params) -> RowAdam:
        self._optimizer = RowAdam(params, self.lr, self.num_rows)
        if self.owned is not None:
            self._optimizer.active &= self.owned
        return self._optimizer

    def __call__(self, step: int, elbo: float) -> bool:
        if (step + 1) % self.every == 0:
            self.sums += self.measure().cpu().double()
            self.count += 1
        if (step + 1) % self.window == 0:
            self._check(self.sums / max(self.count, 1))
            self.sums.zero_()
            self.count = 0
        self.set_step(step + 1)
        if self.steps is not None:
            factor = 0.5 * (1 + math.cos(math.pi * min((step + 1) / self.steps, 1.0)))
            self._optimizer.row_lr = self.lr / LR_DECAY ** self.decays.double() * factor
        left = int(self._optimizer.active.sum())
        return (left if self.owned is None else summed_over_group(left)) == 0

    def _check(self, now: Tensor) -> None:
        if self.best is None:
            self.best = now.clone()
            return
        opt = self._optimizer
        better = now >= self.best + self.tol
        self.best = torch.where(better, now, self.best)
        self.waited = torch.where(better, 0, self.waited + 1)
        plateau = opt.active & (self.waited >= PATIENCE)
        stop = plateau & (self.decays >= LR_DECAYS)
        decay = plateau & ~stop
        opt.active &= ~stop
        opt.row_lr[decay] /= LR_DECAY
        self.decays += decay
        self.waited[plateau] = 0
