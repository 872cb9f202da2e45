"""Speed of the library's hot paths against plain PyTorch loops doing the same work.

For each item, the library call and a plain PyTorch loop of the same arithmetic on the
same network weights (``benchmarks/plain_loops.py``) run alternately, several times,
and the best time of each is kept (the machine is shared: ratios, not absolute times,
are what to read). Every item runs at 1 and 2 torch threads, and is set against its
GEMM bound: the FLOPs of its matrix products divided by this machine's SGEMM rate,
measured here at the same thread count just before the item (best of 2048^3
products).

Items:

- ``fit/*``: seconds per SVI step (median over a run's steps) of ``ppl_vae.fit``:
  VAE(784, 50, (200, 200)) + MLPEncoder, batch 100; PPCA(64, 8) + LinearEncoder, batch
  128; the VAE with FlowEncoder (2 couplings), batch 100; random binary data of MNIST's
  shape (a step's cost does not depend on the pixels). ``fit`` takes Adam's fused kernel
  by default, the plain loop torch's default Adam; the loop is also timed with the fused
  kernel (``ratio_to_fused_adam_loop``), which tells the optimizer's share. Runs of 100
  steps or more (both modes) record the loss with its gradients
  (``ppl_vae.traced.RECORD_GRADIENTS_FROM_STEPS``), as a user's fit does.
- ``log_marginal/*``: ``ppl_vae.log_marginal`` with K=1000, on 100 MNIST-size points of
  that VAE (against IWAE with all K at once), and on PPCA(13, 2) of the standardized
  wine data (178 points; also against ``pyro.infer.Importance``).
- ``ais/PxCxS``: ``ppl_vae.ais`` from the encoder, P points x C chains x S steps, 10
  leapfrog steps, against the same HMC-AIS (pilot-chain adaptation included) by hand.
- ``fit_local/*``: ``ppl_vae.fit_local`` ("diag", "flow"; 8 particles, lr 3e-2, a fixed
  number of steps) against plain Adam on the same per-datapoint parameters.

    python -m benchmarks.speed --quick            # < 2 minutes: rerun after engine changes
    python -m benchmarks.speed --quick --compare  # fresh run against the committed JSON
    python -m benchmarks.speed [--resume]         # the full grid, written item by item
    python -m benchmarks.speed --table            # the README table from the JSON
    python -m benchmarks.speed --quick --kept-pages   # no page faults on either side
    python -m benchmarks.speed --device cuda          # the grid on a GPU ("full_cuda")

On a GPU (``--device cuda``) models, data and the plain loops live on the device, every
timer waits for the device's queued work before it stops, the GEMM bound is that
device's float32 GEMM rate (TF32 off, torch's default), and the CPU side runs one
thread. ``benchmarks/device_check.sh`` is the prepared run for a lent GPU machine: the
CUDA tests, then this benchmark on the device.

Each item also records the minor page faults of its timed calls (``library_faults``,
``plain_faults``: the fewest over the repeats). glibc faults fresh pages in for large
temporaries it has handed back, at about 2 us a page here: a ratio between a run that
faults and one that does not measures glibc, not the code.

``--kept-pages`` runs the same items in a child process whose glibc keeps what is freed
(``KEPT_PAGES`` in its environment), so that neither side faults: the ratios of the
code alone, under "quick_kept_pages" or "full_kept_pages".

Results go to ``benchmarks/results/speed.json`` under "quick" or "full" (``--compare``
writes ``runs/speed_compare.json`` instead and prints the ratios that grew by more than
10% against the committed figures).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import inspect
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch

import ppl_vae
from benchmarks import plain_loops as plain
from benchmarks.timing import row
from ppl_vae.guides import FlowEncoder, LinearEncoder, MLPEncoder
from ppl_vae.guides.local import LocalFlow
from ppl_vae.local_fit import fit_local_trusted
from ppl_vae.models import PPCA, VAE
from ppl_vae.programs import as_programs
from ppl_vae.structure import check_structure
from ppl_vae.validation import as_data

RESULTS = Path(__file__).parent / "results" / "speed.json"
COMPARE_OUT = Path("runs") / "speed_compare.json"
THREADS = (1, 2)
REGRESSION = 1.10


@dataclass(frozen=True)
class Sizes:
    """Problem sizes and repeats of one mode (the tests use toy ones), and the device
    that models, data and plain loops live on."""

    data_dim: int = 784
    latent: int = 50
    hidden: tuple = (200, 200)
    fit_data: int = 10000
    fit_steps: int = 200
    fit_repeats: int = 5
    lm_points: int = 100
    lm_k: int = 1000
    lm_repeats: int = 5
    ais_grid: tuple = tuple((p, c, s) for p in (16, 200) for c in (8, 64) for s in (40, 400))
    ais_repeats: int = 3
    local_points: int = 100
    local_steps: int = 300
    local_repeats: int = 3
    importance_repeats: int = 2
    device: str = "cpu"


FULL = Sizes()
QUICK = Sizes(fit_steps=100, fit_repeats=3, lm_points=50, lm_repeats=2,
              ais_grid=((16, 8, 40), (50, 8, 20)), ais_repeats=2, local_points=16,
              local_steps=30, local_repeats=2, importance_repeats=1)


# ---------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timed:
    """Best seconds of each timer (library, reference, then the others), and the fewest
    page faults of the first two over the repeats."""

    seconds: tuple[float, ...]
    library_faults: int
    plain_faults: int


def best_alternating(library, reference, repeats: int, *, also=()) -> Timed:
    """Each zero-argument timer (``library``, ``reference``, then those in ``also``), run
    in turn ``repeats`` times, so that the machine's noise hits all alike."""
    timers = (library, reference, *also)
    best, faults = [math.inf] * len(timers), [math.inf] * len(timers)
    for _ in range(repeats):
        for i, timer in enumerate(timers):
            before = minor_faults()
            best[i] = min(best[i], timer())
            faults[i] = min(faults[i], minor_faults() - before)
    return Timed(tuple(best), faults[0], faults[1])


def minor_faults() -> int:
    """Minor page faults of this process so far (pages the kernel had to map in)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def wall(fn) -> float:
    """Seconds of one call of ``fn``, its GPU work included (CUDA runs asynchronously)."""
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def synchronize() -> None:
    """Wait for every queued CUDA kernel; nothing to wait for where CUDA never started."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def sgemm_rate(size: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """FLOP/s of single-precision GEMM on ``device`` (on CPU, at the current thread count)."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    wall(lambda: a @ b)
    return 2 * size**3 / min(wall(lambda: a @ b) for _ in range(repeats))


def macs(*modules) -> int:
    """Multiply-accumulates of one input row through every ``nn.Linear`` of the modules."""
    return sum(m.in_features * m.out_features for module in modules
               for m in module.modules() if isinstance(m, torch.nn.Linear))


def figures(timed: Timed, flops: float, rate: float, **extra) -> dict:
    """An item's figures from its library and plain-loop timings and its GEMM bound."""
    library_s, plain_s = timed.seconds[:2]
    bound = flops / rate
    return {"library_s": library_s, "plain_s": plain_s, "ratio": library_s / plain_s,
            "gemm_s": bound, "library_over_gemm": library_s / bound,
            "plain_over_gemm": plain_s / bound, "library_faults": timed.library_faults,
            "plain_faults": timed.plain_faults, **extra}


# ------------------------------------------------------------------- fit steps


def binary_data(n: int, d: int, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """Random pixels of MNIST's density, the same on every device (drawn on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, d, generator=g) < 0.15).float().to(device)


def _fit_seconds(model, guide, x, sizes: Sizes, batch: int, lr: float) -> float:
    model, guide = copy.deepcopy(model), copy.deepcopy(guide)
    result = ppl_vae.fit(model, guide, x, num_steps=sizes.fit_steps, batch_size=batch, lr=lr,
                         progress=False)
    return float(statistics.median(result.step_seconds))


def _plain_fit_seconds(elbo_of_batch, params, x, sizes: Sizes, batch: int, lr: float,
                       fused: bool = False) -> float:
    opt = torch.optim.Adam(params, lr=lr, fused=fused or None)
    n = len(x)
    order = torch.cat([torch.randperm(n) for _ in range(sizes.fit_steps * batch // n + 1)])
    order = order.to(x.device)
    batches = iter(order.split(batch))

    def loss():
        xb = x[next(batches)]
        return -(n / len(xb)) * elbo_of_batch(xb).sum()

    step = plain.training_step(opt, loss)
    seconds = [wall(step) for _ in range(sizes.fit_steps)]
    return float(statistics.median(seconds))


def _fit_figures(ours, reference, sizes: Sizes, flops: float, rate: float) -> dict:
    """A fit item's figures. ``fit`` takes Adam's fused kernel by default; the plain loop
    takes torch's default Adam, as a hand-written loop does. The loop is also timed with
    the fused kernel (``reference(fused=True)``), to tell the optimizer's share of the
    ratio from the rest of the step's."""
    timed = best_alternating(ours, reference, sizes.fit_repeats,
                             also=(lambda: reference(fused=True),))
    lib, _, ref_fused = timed.seconds
    return figures(timed, flops, rate, plain_fused_adam_s=ref_fused,
                   ratio_to_fused_adam_loop=lib / ref_fused)


def item_fit_vae(sizes: Sizes, rate: float) -> dict:
    torch.manual_seed(0)
    model = VAE(sizes.data_dim, sizes.latent, hidden=sizes.hidden).to(sizes.device)
    guide = MLPEncoder(sizes.data_dim, sizes.latent, hidden=sizes.hidden).to(sizes.device)
    x, batch = binary_data(sizes.fit_data, sizes.data_dim, device=sizes.device), 100

    def reference(fused=False):
        encoder, decoder = copy.deepcopy(guide.net), copy.deepcopy(model.decoder)
        params = [*encoder.parameters(), *decoder.parameters()]
        return _plain_fit_seconds(
            lambda xb: plain.vae_elbo(encoder, decoder, xb,
                                      torch.randn(len(xb), sizes.latent, device=xb.device)),
            params, x, sizes, batch, 1e-3, fused)

    return _fit_figures(lambda: _fit_seconds(model, guide, x, sizes, batch, 1e-3), reference,
                        sizes, 3 * 2 * batch * macs(guide.net, model.decoder), rate)


def item_fit_ppca(sizes: Sizes, rate: float) -> dict:
    torch.manual_seed(0)
    d, k, n, batch = 64, 8, 5000, 128
    model, guide = PPCA(d, k).to(sizes.device), LinearEncoder(d, k).to(sizes.device)
    x = (torch.randn(n, d) @ torch.randn(d, d) / math.sqrt(d)).to(sizes.device)

    def reference(fused=False):
        W, mu = model.W.detach().clone(), model.mu.detach().clone()
        log_sigma = model.sigma_unconstrained.detach().clone()
        weight, bias = guide.loc.weight.detach().clone(), guide.loc.bias.detach().clone()
        log_scale = guide.raw_scale.detach().clone()
        params = [p.requires_grad_() for p in (W, mu, log_sigma, weight, bias, log_scale)]
        return _plain_fit_seconds(
            lambda xb: plain.ppca_elbo(W, mu, log_sigma, weight, bias, log_scale, xb,
                                       torch.randn(len(xb), k, device=xb.device)),
            params, x, sizes, batch, 1e-2, fused)

    return _fit_figures(lambda: _fit_seconds(model, guide, x, sizes, batch, 1e-2), reference,
                        sizes, 3 * 2 * batch * 2 * d * k, rate)


def item_fit_flow(sizes: Sizes, rate: float) -> dict:
    torch.manual_seed(0)
    model = VAE(sizes.data_dim, sizes.latent, hidden=sizes.hidden).to(sizes.device)
    guide = FlowEncoder(sizes.data_dim, sizes.latent, hidden=sizes.hidden,
                        num_flows=2).to(sizes.device)
    x, batch = binary_data(sizes.fit_data, sizes.data_dim, device=sizes.device), 100

    def reference(fused=False):
        encoder, couplings = copy.deepcopy(guide.net), copy.deepcopy(guide.flows)
        decoder = copy.deepcopy(model.decoder)
        params = [*encoder.parameters(), *couplings.parameters(), *decoder.parameters()]
        return _plain_fit_seconds(
            lambda xb: plain.flow_elbo(encoder, couplings, decoder, xb,
                                       torch.randn(len(xb), sizes.latent, device=xb.device)),
            params, x, sizes, batch, 1e-3, fused)

    return _fit_figures(lambda: _fit_seconds(model, guide, x, sizes, batch, 1e-3), reference,
                        sizes, 3 * 2 * batch * macs(guide, model.decoder), rate)


# --------------------------------------------------------------------- log p(x)


def item_log_marginal_vae(sizes: Sizes, rate: float) -> dict:
    torch.manual_seed(0)
    model = VAE(sizes.data_dim, sizes.latent, hidden=sizes.hidden).to(sizes.device)
    guide = MLPEncoder(sizes.data_dim, sizes.latent, hidden=sizes.hidden).to(sizes.device)
    x, k = binary_data(sizes.lm_points, sizes.data_dim, seed=1, device=sizes.device), sizes.lm_k
    timed = best_alternating(
        lambda: wall(lambda: ppl_vae.log_marginal(model, guide, x, k, seed=0)),
        lambda: wall(lambda: plain.vae_log_marginal(guide.net, model.decoder, x, k)),
        sizes.lm_repeats)
    flops = 2 * len(x) * (macs(guide.net) + k * macs(model.decoder))
    return figures(timed, flops, rate)


def wine() -> tuple[torch.Tensor, str]:
    """The 178 x 13 wine data of scikit-learn, standardized per column, and its name.

    Where scikit-learn is missing (the GPU machine may lack it), 178 x 13 standard
    normal values of the same shape stand in: the item times a call, whose cost does
    not depend on the values."""
    try:
        from sklearn.datasets import load_wine
    except ImportError:
        g = torch.Generator().manual_seed(0)
        return torch.randn(178, 13, generator=g), "178 x 13 normal draws (no scikit-learn)"
    x = torch.as_tensor(load_wine().data, dtype=torch.float32)
    return (x - x.mean(0)) / x.std(0), "wine"


def item_log_marginal_ppca(sizes: Sizes, rate: float) -> dict:
    (x, data), k = wine(), sizes.lm_k
    model = PPCA.from_data(x, 2).to(sizes.device)
    # At the prior: the cost does not depend on it.
    guide = LinearEncoder(x.shape[1], 2).to(sizes.device)
    x = x.to(sizes.device)
    W, mu, sigma = (t.detach() for t in (model.W, model.mu, model.sigma))
    weight, bias = guide.loc.weight.detach(), guide.loc.bias.detach()
    scale = guide.raw_scale.detach().exp()
    timed = best_alternating(
        lambda: wall(lambda: ppl_vae.log_marginal(model, guide, x, k, seed=0)),
        lambda: wall(lambda: plain.ppca_log_marginal(W, mu, sigma, weight, bias, scale, x, k)),
        sizes.lm_repeats)

    def importance():
        with pyro.settings.context(module_local_params=True):
            pyro.infer.Importance(model, guide, num_samples=k).run(x).get_log_normalizer()

    builtin = min(wall(importance) for _ in range(sizes.importance_repeats))
    flops = 2 * len(x) * 2 * x.shape[1] * 2 * (1 + k)
    return figures(timed, flops, rate, importance_s=builtin,
                   times_faster_than_importance=builtin / timed.seconds[0], data=data)


# -------------------------------------------------------------------------- AIS


def ais_repeats(sizes: Sizes, points: int, chains: int, steps: int) -> int:
    """Fewer repeats for the biggest cells, whose long runs average the noise anyway."""
    work = points * (chains + plain.PILOT_CHAINS) * steps
    return sizes.ais_repeats if work < 3e5 else max(1, sizes.ais_repeats - (1 if work < 2e6
                                                                            else 2))


def item_ais(sizes: Sizes, rate: float, points: int, chains: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = VAE(sizes.data_dim, sizes.latent, hidden=sizes.hidden).to(sizes.device)
    guide = MLPEncoder(sizes.data_dim, sizes.latent, hidden=sizes.hidden).to(sizes.device)
    x = binary_data(points, sizes.data_dim, seed=2, device=sizes.device)
    for p in (*model.parameters(), *guide.parameters()):
        p.requires_grad_(False)

    def reference():
        loc, scale = plain.gaussian_encoder(guide.net, x)
        return plain.vae_ais(model.decoder, loc, scale, x, steps, chains)

    timed = best_alternating(
        lambda: wall(lambda: ppl_vae.ais(model, x, proposal=guide, num_steps=steps,
                                         num_chains=chains, seed=0, progress=False)),
        lambda: wall(reference), ais_repeats(sizes, points, chains, steps))
    # The library's work: 10 gradients per transition (one per leapfrog step; the start
    # is the previous transition's end, the first one is computed), each a decoder pass
    # and its input-gradient pass, over the real and the pilot chains. The plain loop
    # evaluates every start again: 11 gradients and a forward pass.
    rows = points * (chains + plain.PILOT_CHAINS)
    gradients = (steps - 1) * 10 + 1
    flops = 2 * points * macs(guide.net) + gradients * 2 * 2 * rows * macs(model.decoder)
    return figures(timed, flops, rate)


# --------------------------------------------------------------------- local fits


def item_fit_local(sizes: Sizes, rate: float, family: str) -> dict:
    torch.manual_seed(0)
    model = VAE(sizes.data_dim, sizes.latent, hidden=sizes.hidden).to(sizes.device)
    x = binary_data(sizes.local_points, sizes.data_dim, seed=3, device=sizes.device)
    steps, particles = sizes.local_steps, 8
    for p in model.parameters():
        p.requires_grad_(False)

    def library():  # window=steps: no plateau can stop it early or decay the rate
        return wall(lambda: _plain_gradient_fit_local(model, x, family, steps, particles))

    def reference():
        return wall(lambda: plain.local_fit(*_local_problem(model, x, family), x, sizes.latent,
                                            steps=steps, particles=particles, lr=3e-2))

    timed = best_alternating(library, reference, sizes.local_repeats)
    flops = steps * 2 * 2 * particles * len(x) * macs(model.decoder)
    return figures(timed, flops, rate)


def _plain_gradient_fit_local(model, x, family: str, steps: int, particles: int):
    """``fit_local`` with the plain reparameterized gradient and no cosine, the work of
    the plain loop (the flow's default sticks the landing: one more guide pass a step,
    whose worth ``benchmarks/fit_local_schedule.py`` measures)."""
    x = as_data(x, model)
    model, _ = as_programs(model, None, x)
    check_structure(model, x[:1])
    options = dict(init_from=None, steps=steps, lr=3e-2, num_particles=particles,
                   window=steps, progress=False, seed=0)
    if "sticking" in inspect.signature(fit_local_trusted).parameters:
        options.update(sticking=False, anneal=False)  # older trees, for A/B runs, lack both
    return fit_local_trusted(model, x, family, **options)[0]


def _local_problem(model, x, family: str):
    """(elbo_fn(eps), its parameters) of a plain local fit starting at N(0, I)."""
    n, d = len(x), model.latent_dim
    if family == "diag":
        loc, log_scale = (torch.zeros(n, d, device=x.device, requires_grad=True)
                          for _ in range(2))
        return (lambda eps: plain.local_diag_elbo(model.decoder, x, loc, log_scale, eps),
                [loc, log_scale])
    params = local_flow_params(LocalFlow(n, d).to(x.device))
    return (lambda eps: plain.local_flow_elbo(model.decoder, x, params, eps),
            list(params.values()))


def local_flow_params(guide: LocalFlow) -> dict:
    """A LocalFlow's tensors by the names of ``plain_loops.local_flow_sample``, as leaves."""
    params = {name: getattr(guide, name).detach().clone().requires_grad_()
              for name in ("loc", "log_diag", "off_diag", "skew", "log_tail")}
    for j, weights in enumerate(guide.couplings):
        for name in ("w_in", "b_in", "w_out", "b_out"):
            params[f"{name}.{j}"] = getattr(weights, name).detach().clone().requires_grad_()
    return params


# --------------------------------------------------------------------- the run


def items(sizes: Sizes) -> list[tuple[str, object]]:
    """(name, measure(sizes, rate)) of every item, cheapest first."""
    out = [("fit/vae", item_fit_vae), ("fit/ppca", item_fit_ppca), ("fit/flow", item_fit_flow),
           ("log_marginal/vae", item_log_marginal_vae),
           ("log_marginal/ppca", item_log_marginal_ppca),
           ("fit_local/diag", lambda s, r: item_fit_local(s, r, "diag")),
           ("fit_local/flow", lambda s, r: item_fit_local(s, r, "flow"))]
    grid = sorted(sizes.ais_grid, key=lambda g: g[0] * (g[1] + plain.PILOT_CHAINS) * g[2])
    out += [(f"ais/{p}x{c}x{s}", lambda z, r, p=p, c=c, s=s: item_ais(z, r, p, c, s))
            for p, c, s in grid]
    return out


def run(mode: str, sizes: Sizes, path: Path, *, resume: bool, only: list[str] | None,
        threads_list=THREADS) -> dict:
    """Measure every item at every thread count, writing ``path[mode]`` as it goes."""
    everything = json.loads(path.read_text()) if path.exists() else {}
    section = everything.get(mode) if resume else None
    if section is None:
        section = {"meta": _meta(mode, sizes, threads_list), "items": {}}
    everything[mode] = section
    _write(path, everything)
    for threads in threads_list:
        torch.set_num_threads(threads)
        rate = sgemm_rate(device=sizes.device)
        section["meta"]["sgemm_gflops"][str(threads)] = rate / 1e9
        for name, measure in items(sizes):
            if only and not any(name.startswith(prefix) for prefix in only):
                continue
            if str(threads) in section["items"].get(name, {}):
                continue
            start = time.perf_counter()
            # Measured again before each item: on a shared machine the rate follows the load.
            rate = sgemm_rate(device=sizes.device)
            result = measure(sizes, rate)
            result["sgemm_gflops"] = rate / 1e9
            result["seconds"] = time.perf_counter() - start
            section["items"].setdefault(name, {})[str(threads)] = result
            _write(path, everything)
            print(f"{name} @{threads}t: ratio {result['ratio']:.2f}x, library "
                  f"{result['library_s']:.4g} s, plain {result['plain_s']:.4g} s, "
                  f"/GEMM {result['library_over_gemm']:.2f}x, page faults "
                  f"{result['library_faults']} / {result['plain_faults']} "
                  f"({result['seconds']:.0f} s)",
                  flush=True)
    return section


def _meta(mode: str, sizes: Sizes, threads_list) -> dict:
    return {"mode": mode, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__, "pyro": pyro.__version__,
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "device": sizes.device, "device_name": device_name(sizes.device),
            "threads": list(threads_list), "sgemm_gflops": {},
            "sizes": dict(sizes.__dict__),
            "malloc_env": {name: os.environ.get(name) for name in KEPT_PAGES}}


def device_name(device: str) -> str:
    """The accelerator's name (``torch.cuda.get_device_name``), or the CPU's architecture."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


# glibc's settings that keep freed memory in the process (no mmap for large blocks, no
# trimming of the heap), so that no temporary is faulted in afresh.
KEPT_PAGES = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**30)}


def _pages_kept() -> bool:
    return all(os.environ.get(name) == value for name, value in KEPT_PAGES.items())


def _write(path: Path, everything: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(everything, indent=1) + "\n")
    tmp.replace(path)


def table(section: dict) -> str:
    """The Markdown table of one mode's results: ratios and times at each thread count."""
    meta = section["meta"]
    gflops = ", ".join(f"{t} thread{'s' if t != '1' else ''} {g:.0f} GFLOP/s"
                       for t, g in meta["sgemm_gflops"].items())
    where = (f"{meta['cpu_count']} CPUs" if meta.get("device", "cpu") == "cpu"
             else f"on {meta['device_name']} (SGEMM of the device)")
    lines = [f"{meta['mode']} run of {meta['date'][:10]}, torch {meta['torch']}, "
             f"{where}; SGEMM {gflops}", "",
             row("item", "threads", "library s", "plain s", "library / plain",
                 "GEMM bound s", "library / bound", "page faults"),
             row("---", "---:", "---:", "---:", "---:", "---:", "---:", "---:")]
    for name, by_threads in section["items"].items():
        for threads, r in sorted(by_threads.items()):
            extra = (f" ({r['times_faster_than_importance']:.0f}x faster than Importance)"
                     if "times_faster_than_importance" in r else
                     f" ({r['ratio_to_fused_adam_loop']:.2f}x a loop with fused Adam)"
                     if "ratio_to_fused_adam_loop" in r else "")
            lines.append(row(f"`{name}`", threads, f"{r['library_s']:.4g}",
                             f"{r['plain_s']:.4g}", f"{r['ratio']:.2f}x{extra}",
                             f"{r['gemm_s']:.3g}", f"{r['library_over_gemm']:.1f}x",
                             f"{r['library_faults']} / {r['plain_faults']}"
                             if "library_faults" in r else ""))
    return "\n".join(lines)


def compare(fresh: dict, committed: dict) -> list[str]:
    """Lines naming every (item, threads) whose ratio grew by more than 10%."""
    out = []
    for name, by_threads in fresh["items"].items():
        for threads, r in by_threads.items():
            old = committed.get("items", {}).get(name, {}).get(threads)
            if old is not None and r["ratio"] > REGRESSION * old["ratio"]:
                out.append(f"{name} @{threads}t: ratio {old['ratio']:.2f}x -> "
                           f"{r['ratio']:.2f}x (+{100 * (r['ratio'] / old['ratio'] - 1):.0f}%)")
    return out


def _device_type(parser, device: str) -> str:
    """"cpu" or "cuda" for a usable ``--device``; else the parser's error."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        parser.error(f"--device takes cpu, cuda or cuda:N, got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}: torch sees no CUDA device here")
    return kind


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the < 2 minute subset")
    parser.add_argument("--compare", action="store_true",
                        help=f"run into {COMPARE_OUT} and compare with the committed JSON")
    parser.add_argument("--resume", action="store_true", help="skip items already measured")
    parser.add_argument("--table", action="store_true", help="print the table and stop")
    parser.add_argument("--only", nargs="*", help="item name prefixes, e.g. fit/ ais/16x")
    parser.add_argument("--threads", type=int, nargs="+",
                        help=f"torch threads (default {list(THREADS)} on the CPU, 1 on a GPU)")
    parser.add_argument("--device", default="cpu",
                        help="where models, data and plain loops run: cpu (default) or cuda; "
                        "a GPU run writes under quick_cuda or full_cuda")
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--kept-pages", action="store_true",
                        help="run in a child process whose glibc keeps freed memory")
    args = parser.parse_args(argv)
    if args.kept_pages and not _pages_kept():
        argv = sys.argv[1:] if argv is None else list(argv)
        child = subprocess.run([sys.executable, "-m", "benchmarks.speed", *argv],
                               env={**os.environ, **KEPT_PAGES}, check=False)
        raise SystemExit(child.returncode)
    on_gpu = _device_type(parser, args.device) == "cuda"
    mode = (("quick" if args.quick else "full") + ("_cuda" if on_gpu else "")
            + ("_kept_pages" if args.kept_pages else ""))
    if args.table:
        print(table(json.loads(args.json.read_text())[mode]))
        return
    if args.compare and not args.json.exists():
        parser.error(f"--compare reads the committed results at --json {args.json}: no such file")
    sizes = dataclasses.replace(QUICK if args.quick else FULL, device=args.device)
    threads = args.threads or ([1] if on_gpu else list(THREADS))
    out = COMPARE_OUT if args.compare else args.json
    if args.compare and out.exists() and not args.resume:
        out.unlink()
    start = time.perf_counter()
    section = run(mode, sizes, out, resume=args.resume, only=args.only,
                  threads_list=threads)
    print(f"\n{mode} run: {time.perf_counter() - start:.0f} s\n\n{table(section)}")
    if args.compare:
        committed = json.loads(args.json.read_text()).get(mode, {})
        grown = compare(section, committed)
        print("\nratios grown by more than 10% against the committed JSON:"
              if grown else "\nno ratio grew by more than 10% against the committed JSON")
        print("\n".join(grown))


if __name__ == "__main__":
    main()
