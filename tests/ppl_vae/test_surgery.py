"""ELBO surgery, checked against closed forms, brute force and its own identities."""

import json
import math
import warnings

import matplotlib
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule
from torch import nn
from torch.distributions import biject_to, constraints

import ppl_vae
from ppl_vae.guides import DeltaEncoder, ExactPosterior, FlowEncoder, LinearEncoder, LocalFull
from ppl_vae.models import PPCA
from ppl_vae.models.blocks import data_plate
from ppl_vae.surgery import SurgeryReport
from tests.conftest import draw

matplotlib.use("Agg")

Z = 4.0  # standard errors of slack in every Monte Carlo comparison


@pytest.fixture(scope="module")
def ppca():
    """PPCA d=5, k=2 with loadings a few times the noise, 2000 points drawn from it."""
    pyro.set_rng_seed(0)
    model = PPCA(5, 2, sigma=0.5).double()
    with torch.no_grad():
        model.W.mul_(3.0)
        model.mu.normal_()
    return model, draw(model, 2000, seed=1)


@pytest.fixture(scope="module")
def ppca_report(ppca):
    model, x = ppca
    return ppl_vae.elbo_surgery(model, ExactPosterior(model), x, num_samples=2, seed=0)


def log_one_plus_chi2(post, k):
    """log(1 + chi^2(N(m, S) || N(0, I))) per datapoint, in closed form.

    int N(z; m, S)^2 / N(z; 0, I) dz = |S|^-1 |A|^-1/2 exp(b' A^-1 b / 2 - m' S^-1 m)
    with A = 2 S^-1 - I and b = 2 S^-1 m.
    """
    cov = post.covariance_matrix
    precision = torch.linalg.inv(cov)
    a = 2 * precision - torch.eye(k, dtype=cov.dtype)
    b = 2 * (precision @ post.loc.unsqueeze(-1)).squeeze(-1)
    quad = (b.unsqueeze(-2) @ torch.linalg.solve(a, b.unsqueeze(-1))).reshape(-1)
    m_prec_m = (post.loc.unsqueeze(-2) @ precision @ post.loc.unsqueeze(-1)).reshape(-1)
    return -torch.logdet(cov) - 0.5 * torch.logdet(a) + 0.5 * quad - m_prec_m


def test_exact_posterior_elbo_is_log_px_per_datapoint(ppca, ppca_report):
    model, x = ppca
    per = ppca_report.per_datapoint
    exact = model.score_samples(x)
    assert torch.allclose(per["elbo"], exact, atol=1e-9, rtol=0)
    assert torch.allclose(per["reconstruction"] - per["kl"], exact, atol=1e-9, rtol=0)
    assert ppca_report.elbo == pytest.approx(float(exact.mean()), abs=1e-9)


def test_seeded_draws_are_those_of_elbo(ppca, ppca_report):
    model, x = ppca
    reference = ppl_vae.elbo(model, ExactPosterior(model), x, 2, seed=0)
    assert torch.equal(ppca_report.per_datapoint["elbo"], reference)


def test_mutual_information_reaches_the_closed_form(ppca, ppca_report):
    model, x = ppca
    with torch.no_grad():
        W, sigma2 = model.W, model.sigma.square()
        closed = 0.5 * float(torch.logdet(torch.eye(2, dtype=W.dtype) + W.T @ W / sigma2))
        # E KL(q(z) || p(z)) <= log(1 + E_x chi^2(p(z|x) || p(z)) / N) for N points drawn
        # from the model (KL <= log(1 + chi^2), Jensen, and the mixture's chi^2 is 1/N of
        # its components'): the marginal KL, and the estimator's shortfall on I(x; z).
        chi2 = log_one_plus_chi2(model.posterior(x), 2).exp() - 1
        bound = math.log1p(float(chi2.mean()) / len(x))
    r = ppca_report
    assert 0 < bound < 0.01
    assert closed - bound - Z * r.mutual_information_se <= r.mutual_information
    assert r.mutual_information <= closed + Z * r.mutual_information_se
    assert -Z * r.marginal_kl_se <= r.marginal_kl <= bound + Z * r.marginal_kl_se
    assert r.mutual_information <= r.mutual_information_max == pytest.approx(math.log(len(x)))


def test_identity_and_per_dimension_closed_forms_on_ppca(ppca, ppca_report):
    model, x = ppca
    r = ppca_report
    per = r.per_datapoint
    assert torch.allclose(per["mutual_information"] + per["marginal_kl"], per["kl"], atol=1e-9)
    with torch.no_grad():
        post = model.posterior(x)
    var, mean = post.covariance_matrix.diagonal(dim1=-2, dim2=-1), post.loc
    marginal_kl = 0.5 * (var + mean.square() - 1 - var.log())  # KL(N(m, v) || N(0, 1))
    assert torch.allclose(r.kl_per_dim, marginal_kl.mean(0), atol=1e-12)
    assert torch.allclose(r.activity, mean.var(0), atol=1e-12)  # exact means
    assert r.kl_per_dim_method == {"z": "closed form"}
    assert r.dim_names == ("z[0]", "z[1]") and r.num_latent_dims == 2 and r.active_units == 2


class PositiveModel(PyroModule):
    """s ~ LogNormal(0, 0.5) (1-d), z | s ~ N(0, s^2 I_2), x | z, s ~ N(A z + s, 0.5^2 I_4)."""

    data_dim = 4

    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(torch.tensor([[2.0, 0.0], [0.0, 1.5], [1.0, -1.0], [0.5, 0.5]],
                                           dtype=torch.float64))

    def forward(self, x=None, idx=None, num_data=None):
        with data_plate(x, idx, num_data):
            s = pyro.sample("s", dist.LogNormal(torch.zeros(1, dtype=torch.float64), 0.5)
                            .to_event(1))
            z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=torch.float64), s).to_event(1))
            return pyro.sample("x", dist.Normal(z @ self.A.T + s, 0.5).to_event(1), obs=x)


class PositiveGuide(PyroModule):
    """q(s | x): a Normal pushed through biject_to(positive); q(z | x) = N(B x, 0.6^2 I)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.a = nn.Parameter(0.2 * torch.randn(4, 1, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(0.3 * torch.randn(4, 2, generator=g, dtype=torch.float64))

    def distributions(self, x):
        q_s = dist.TransformedDistribution(dist.Normal(x @ self.a, 0.4),
                                           biject_to(constraints.positive)).to_event(1)
        return q_s, dist.Normal(x @ self.b, 0.6).to_event(1)

    def forward(self, x, idx=None, num_data=None):
        q_s, q_z = self.distributions(x)
        with data_plate(x, idx, num_data):
            pyro.sample("s", q_s)
            pyro.sample("z", q_z)


@pytest.fixture(scope="module")
def positive():
    model, guide = PositiveModel(), PositiveGuide()
    x = draw(model, 300, seed=2)
    return model, guide, x, ppl_vae.elbo_surgery(model, guide, x, num_samples=4, seed=1)


def test_two_sites_with_a_positive_latent_add_up(positive):
    *_, r = positive
    identity_se = math.hypot(r.mutual_information_se, r.marginal_kl_se)
    assert abs(r.mutual_information + r.marginal_kl - r.kl) <= identity_se
    assert abs(r.mutual_information + r.marginal_kl - r.kl) < 1e-9  # same draws
    assert r.kl_per_dim_method == {"s": "monte carlo", "z": "closed form"}
    assert r.dim_names == ("s[0]", "z[0]", "z[1]")
    # Both the guide and the prior factorize over coordinates: the per-dimension KLs are
    # the total's terms (the z terms in closed form given s, the s term by Monte Carlo).
    total_se = math.hypot(r.kl_se, float(r.kl_per_dim_se.square().sum().sqrt()))
    assert abs(float(r.kl_per_dim.sum()) - r.kl) <= Z * total_se


def test_aggregate_posterior_matches_a_brute_force_loop(positive):
    """Mutual information and marginal KL from fresh draws, every density written out
    with torch.distributions and every draw scored against every datapoint."""
    model, guide, x, r = positive
    torch.manual_seed(7)
    k = 4
    with torch.no_grad():
        q_s, q_z = guide.distributions(x)
        s, z = q_s.sample((k,)), q_z.sample((k,))  # (K, N, 1), (K, N, 2)
        loc_s, loc_z = x @ guide.a, x @ guide.b  # (N, 1), (N, 2)
        log_q_all = (
            torch.distributions.LogNormal(loc_s, 0.4).log_prob(s.unsqueeze(-2)).sum(-1)
            + torch.distributions.Normal(loc_z, 0.6).log_prob(z.unsqueeze(-2)).sum(-1)
        )  # (K, N draws, N rows)
        log_q_own = log_q_all.diagonal(dim1=-2, dim2=-1)
        log_qbar = torch.logsumexp(log_q_all, -1) - math.log(len(x))
        log_p = (torch.distributions.LogNormal(0.0, 0.5).log_prob(s).sum(-1)
                 + torch.distributions.Normal(0.0, s).log_prob(z).sum(-1))
    mi = (log_q_own - log_qbar).mean(0)
    mkl = (log_qbar - log_p).mean(0)
    for name, values in (("mutual_information", mi), ("marginal_kl", mkl)):
        se = math.hypot(getattr(r, name + "_se"), float(values.std() / math.sqrt(len(x))))
        assert abs(getattr(r, name) - float(values.mean())) <= Z * se, name


def ignoring_model():
    """PPCA on 4 latent dims whose last two columns of W are zero: x ignores them."""
    pyro.set_rng_seed(4)
    model = PPCA(6, 4, sigma=0.5).double()
    with torch.no_grad():
        model.W.mul_(10.0)
        model.W[:, 2:] = 0.0
    return model, draw(model, 400, seed=5)


def test_dimensions_the_decoder_ignores_are_inactive():
    model, x = ignoring_model()
    r = ppl_vae.elbo_surgery(model, ExactPosterior(model), x, num_samples=2, seed=0)
    assert r.active.tolist() == [True, True, False, False]
    assert r.active_units == 2 and r.num_latent_dims == 4
    # The exact posterior equals the prior on the ignored dims: no KL, no activity.
    assert r.kl_per_dim[2:].abs().max() < 1e-12 and r.activity[2:].abs().max() < 1e-12
    assert (r.kl_per_dim[:2] > 0.1).all()


class NoMeanPosterior(ExactPosterior):
    """The exact posterior behind an identity transform: its ``mean`` is not implemented,
    so the activity comes from the draws."""

    def forward(self, x, idx=None, num_data=None):
        post = self._model[0].posterior(x)
        q = dist.TransformedDistribution(post, [dist.transforms.AffineTransform(0.0, 1.0,
                                                                                 event_dim=1)])
        with data_plate(x, idx, num_data):
            return pyro.sample("z", q)


def test_activity_from_draws_discounts_their_noise():
    """Cov_x of a K-draw mean adds E_x Var_q / K (~1/16 here for the ignored dims, above
    the 0.01 threshold); the estimate removes it, so the same units come out active."""
    model, x = ignoring_model()
    r = ppl_vae.elbo_surgery(model, NoMeanPosterior(model), x, num_samples=16, seed=0)
    exact = ppl_vae.elbo_surgery(model, ExactPosterior(model), x, num_samples=2, seed=0)
    assert r.active.tolist() == [True, True, False, False]
    assert r.activity[2:].abs().max() < 0.01
    # Unbiased: within a few standard errors of the exact means' covariance (relative
    # error ~ sqrt(2 / N) for a variance over N rows, plus the draws' noise).
    assert torch.allclose(r.activity[:2], exact.activity[:2], rtol=Z * math.sqrt(2 / len(x)))
    assert r.kl_per_dim_method == {"z": "unavailable"} and r.kl_per_dim.isnan().all()


class Recording(LinearEncoder):
    """A LinearEncoder that records how many (draw, datapoint) pairs each call scores."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pairs = []

    def forward(self, x, idx=None, num_data=None):
        z = super().forward(x, idx, num_data)
        self.pairs.append(math.prod(z.shape[:-1]))
        return z


def peak_rss_growth(function):
    """(result, growth of the process's peak resident memory in bytes), Linux only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current resident size
    except OSError:
        pytest.skip("cannot reset the peak resident memory here")

    def status(key):
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(key))
        return int(line.split()[1]) * 1024

    before = status("VmRSS:")
    result = function()
    return result, status("VmHWM:") - before


def test_twenty_thousand_points_stream_in_bounded_memory():
    n, chunk = 20_000, 2**18
    pyro.set_rng_seed(6)
    model = PPCA(2, 1, sigma=0.5)
    x = draw(model, n, seed=6)
    guide = Recording(2, 1)
    report, growth = peak_rss_growth(lambda: ppl_vae.elbo_surgery(
        model, guide, x, num_samples=1, chunk_size=chunk, seed=0))
    assert max(guide.pairs) <= chunk
    assert sum(guide.pairs) >= n * n  # every draw against every datapoint
    # One (N, N) float32 score matrix alone would be 1.6 GB.
    assert growth < 200 * 2**20
    assert report.num_data == n and math.isfinite(report.mutual_information)
    assert abs(report.mutual_information + report.marginal_kl - report.kl) < 1e-6


def test_chunk_size_changes_no_number(ppca):
    model, x = ppca
    x = x[:300]
    a = ppl_vae.elbo_surgery(model, ExactPosterior(model), x, num_samples=3, seed=2)
    b = ppl_vae.elbo_surgery(model, ExactPosterior(model), x, num_samples=3, seed=2,
                             chunk_size=1000)
    for name in ("mutual_information", "marginal_kl"):
        assert torch.allclose(a.per_datapoint[name], b.per_datapoint[name], atol=1e-10)


def test_a_local_guide_with_idx_scores_through_its_auxiliary_site(ppca, ppca_report):
    model, x = ppca
    with torch.no_grad():
        post = model.posterior(x)
    local = LocalFull.from_gaussian(post.loc, post.scale_tril)  # exact, row by row
    rows = torch.arange(500, 1500)
    r = ppl_vae.elbo_surgery(model, local, x[rows], idx=rows, num_data=len(x), num_samples=2,
                             seed=0)
    assert torch.allclose(r.per_datapoint["elbo"], model.score_samples(x[rows]), atol=1e-8)
    assert abs(r.mutual_information + r.marginal_kl - r.kl) < 1e-8
    exact = ppl_vae.elbo_surgery(model, ExactPosterior(model), x[rows], num_samples=2, seed=3)
    se = math.hypot(r.mutual_information_se, exact.mutual_information_se)
    assert abs(r.mutual_information - exact.mutual_information) <= Z * se
    assert torch.allclose(r.activity, exact.activity, rtol=0.1)  # draws against exact means


def test_a_flow_encoder_is_scored_by_its_own_log_prob():
    pyro.set_rng_seed(8)
    model = PPCA(5, 2, sigma=0.5)
    x = draw(model, 200, seed=9)
    guide = FlowEncoder(5, 2, hidden=(16,), num_flows=2, flow_hidden=(8,))
    with torch.no_grad():
        for flow in guide.flows:  # move the couplings off the identity
            flow.nn.layers[-1].weight.normal_(0, 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the irreproducible-guide warning
        r = ppl_vae.elbo_surgery(model, guide, x, num_samples=4, seed=0)
    assert abs(r.mutual_information + r.marginal_kl - r.kl) < 1e-4
    assert r.kl_per_dim_method == {"z": "unavailable"}


def test_report_round_trips_through_json_and_plots(positive, tmp_path):
    *_, r = positive
    text = r.to_json()
    back = SurgeryReport.from_json(text)
    assert back.mutual_information == r.mutual_information
    assert torch.equal(back.kl_per_dim, r.kl_per_dim.double())
    assert torch.equal(back.per_datapoint["kl"], r.per_datapoint["kl"])
    assert r.summary()["active_units"] == r.active_units
    table = str(r)
    assert "mutual information" in table and "s[0]" in table and "active units" in table
    ax = r.plot()
    bars = ax.patches[: r.num_latent_dims]
    assert len(bars) == 3 and ax.get_xticklabels()[0].get_text() in r.dim_names
    active_colour = matplotlib.colors.to_rgba("C0")
    marked = [bar.get_facecolor() == active_colour for bar in bars]
    order = [r.dim_names.index(t.get_text()) for t in ax.get_xticklabels()]
    assert marked == [bool(r.active[j]) for j in order]
    ax.figure.savefig(tmp_path / "surgery.png")


def test_non_finite_values_become_null(ppca):
    model, x = ppca
    r = ppl_vae.elbo_surgery(model, ExactPosterior(model), x[:50], num_samples=1, seed=0)
    data = json.loads(r.to_json())  # allow_nan=False: fails on any NaN left in
    assert data["per_datapoint"]["kl_se"][0] is None
    assert data["elbo_se"] is not None


@pytest.mark.parametrize("kwargs, match", [
    ({"num_samples": 0}, "num_samples"),
    ({"num_samples": 2.5}, "num_samples"),
    ({"num_samples": True}, "num_samples"),
    ({"threshold": 0.0}, "threshold"),
    ({"threshold": -0.1}, "threshold"),
    ({"threshold": float("nan")}, "threshold"),
    ({"threshold": "0.01"}, "threshold"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"seed": -1}, "seed"),
    ({"idx": torch.arange(3)}, "idx"),
])
def test_bad_arguments_are_refused(ppca, kwargs, match):
    model, x = ppca
    with pytest.raises(ValueError, match=match):
        ppl_vae.elbo_surgery(model, ExactPosterior(model), x[:10], **kwargs)


def test_bad_data_and_point_masses_are_refused(ppca):
    model, x = ppca
    bad = x[:10].clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ppl_vae.elbo_surgery(model, ExactPosterior(model), bad)
    with pytest.raises(ValueError, match="columns"):
        ppl_vae.elbo_surgery(model, ExactPosterior(model), x[:10, :3])
    with pytest.raises(ValueError, match="point mass"):
        ppl_vae.elbo_surgery(model, DeltaEncoder(5, 2, hidden=(4,)).double(), x[:10])


SMALL = ["--latent-dim", "4", "--hidden", "32", "--epochs", "3", "--num-samples", "4",
         "--eval-limit", "40", "--quiet"]


def test_the_surgery_command_writes_json_and_figure(tmp_path, capsys):
    from ppl_vae import cli

    summary = cli.run(["surgery", *SMALL, "--threshold", "0.02", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "mutual information" in printed and "active units" in printed
    saved = SurgeryReport.from_json((tmp_path / "surgery.json").read_text())
    assert saved.num_data == 40 and saved.num_samples == 4 and saved.threshold == 0.02
    assert saved.kl == pytest.approx(summary["kl"])
    assert (tmp_path / "surgery.png").stat().st_size > 1000


def test_fit_prints_the_surgery_table(tmp_path, capsys):
    from ppl_vae import cli

    cli.run(["fit", *SMALL, "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "SurgeryReport: 40 datapoints" in printed and "marginal KL" in printed
    saved = json.loads((tmp_path / "surgery.json").read_text())
    assert saved["num_samples"] == cli.SURGERY_SAMPLES


@pytest.mark.parametrize("argv, expected", [
    (["--threshold", "0"], "--threshold"),
    (["--threshold", "nan"], "--threshold"),
    (["--guide", "delta"], "--guide delta"),
    (["--num-samples", "0"], "--num-samples"),
])
def test_bad_surgery_arguments_fail_before_training(tmp_path, capsys, monkeypatch, argv,
                                                    expected):
    from ppl_vae import cli

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(cli.training, "train", no_training)
    with pytest.raises(SystemExit) as stop:
        cli.main(["surgery", *argv, "--out", str(tmp_path)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1


def distributed_problem():
    """A PPCA, an MC-mean guide (activity from draws) and 37 rows: partial row blocks."""
    pyro.set_rng_seed(0)
    model = PPCA(5, 2).double()
    with torch.no_grad():
        model.W.mul_(3.0)
    return model, NoMeanPosterior(model), draw(model, 37, seed=1)


def surgery_tensors(report) -> dict:
    return {**report.per_datapoint, "kl_per_dim": report.kl_per_dim,
            "activity": report.activity}


def _surgery_worker(rank: int, world: int, port: int, path: str) -> None:
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                             world_size=world)
    try:
        model, guide, x = distributed_problem()
        report = ppl_vae.elbo_surgery(model, guide, x, num_samples=5, chunk_size=64, seed=3)
        torch.save(surgery_tensors(report), f"{path}/rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


def test_two_processes_give_every_rank_the_one_process_report(tmp_path):
    import torch.multiprocessing as mp

    from tests.ppl_vae.test_distributed import free_port

    model, guide, x = distributed_problem()
    expected = surgery_tensors(
        ppl_vae.elbo_surgery(model, guide, x, num_samples=5, chunk_size=64, seed=3))
    mp.spawn(_surgery_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=0, atol=1e-9, equal_nan=True,
                                       msg=f"rank {rank}, {name}")
