"""Everything follows the model's device: run where CUDA exists, skipped elsewhere."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

import ppl_vae
from ppl_vae.guides import ExactPosterior, LinearEncoder, MLPEncoder
from ppl_vae.models import PPCA, VAE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")


def test_exact_posterior_weights_are_exact_on_the_gpu(ppca_truth):
    model, x = ppca_truth
    model, x = model.to(CUDA), x.to(CUDA)
    lw = ppl_vae.log_weights(model, ExactPosterior(model), x[:50], 20, seed=0)
    assert lw.device.type == "cuda"
    exact = model.marginal().log_prob(x[:50]).detach()
    torch.testing.assert_close(lw, exact.expand(20, -1), rtol=0, atol=1e-8)
    result = ppl_vae.ais(model, x[:50], proposal=ExactPosterior(model), num_steps=5,
                         num_chains=3, seed=0, progress=False)
    assert result.log_weights.device.type == "cuda"
    torch.testing.assert_close(result.log_weights, exact.expand(3, -1), rtol=0, atol=1e-8)


def test_fit_estimates_and_gaps_run_on_the_gpu():
    torch.manual_seed(0)
    model, guide = VAE(20, 3, hidden=(32,)).to(CUDA), MLPEncoder(20, 3, hidden=(32,)).to(CUDA)
    x = (torch.rand(200, 20) < 0.3).float().to(CUDA)
    ppl_vae.fit(model, guide, x, num_steps=50, batch_size=50, seed=0, progress=False)
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert ppl_vae.log_marginal(model, guide, x, 50, seed=0).device.type == "cuda"
    local = ppl_vae.fit_local(model, x[:40], "flow", init_from=guide, steps=50,
                              progress=False)
    assert all(p.device.type == "cuda" for p in local.parameters())
    report = ppl_vae.gaps(model, guide, x[:40], num_samples=20, local_steps=50,
                          log_px="ais", ais_steps=5, ais_chains=2, progress=False)
    assert report.per_datapoint["log_px"].device.type == "cuda"


def test_ppca_trains_on_the_gpu(ppca_truth):
    model, x = ppca_truth
    x = x.to(CUDA)
    fitted, guide = PPCA(10, 2).double().to(CUDA), LinearEncoder(10, 2).double().to(CUDA)
    ppl_vae.fit(fitted, guide, x, num_steps=100, lr=3e-2, seed=0, progress=False)
    assert torch.isfinite(fitted.marginal().log_prob(x)).all()


def test_from_data_puts_the_whole_model_on_the_data_s_device(ppca_truth):
    _, x = ppca_truth
    on_cpu, on_gpu = PPCA.from_data(x, 2), PPCA.from_data(x.to(CUDA), 2)
    assert {p.device.type for p in on_gpu.parameters()} == {"cuda"}
    assert on_gpu.sigma.device.type == "cuda"
    torch.testing.assert_close(on_gpu.marginal().log_prob(x.to(CUDA)).cpu(),
                               on_cpu.marginal().log_prob(x), rtol=1e-9, atol=1e-9)


def test_the_traced_loss_holds_on_the_gpu_and_resumes_bit_for_bit(tmp_path):
    # Its check replays the loss under the saved random state: CUDA's generator too.
    torch.manual_seed(0)
    x = (torch.rand(200, 20) < 0.3).float().to(CUDA)

    def build():
        torch.manual_seed(1)
        return VAE(20, 3, hidden=(32,)).to(CUDA), MLPEncoder(20, 3, hidden=(32,)).to(CUDA)

    def run(**kwargs):
        model, guide = build()
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="the traced loss")
            ppl_vae.fit(model, guide, x, num_steps=120, batch_size=50, seed=0,
                        progress=False, **kwargs)
        return torch.cat([p.detach().flatten() for p in (*model.parameters(),
                                                          *guide.parameters())])

    expected = run()

    def stop_at_60(step, elbo):
        if step == 60:
            raise KeyboardInterrupt

    path = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        run(checkpoint=path, callback=stop_at_60)
    assert torch.equal(run(checkpoint=path, resume=True), expected)


def test_seeded_calls_leave_the_gpu_s_random_state_alone():
    torch.manual_seed(0)
    model, guide = VAE(20, 3, hidden=(32,)).to(CUDA), MLPEncoder(20, 3, hidden=(32,)).to(CUDA)
    x = (torch.rand(64, 20) < 0.3).float().to(CUDA)
    before = torch.cuda.get_rng_state()
    ppl_vae.log_marginal(model, guide, x, 20, seed=0)
    ppl_vae.ais(model, x, proposal=guide, num_steps=3, num_chains=2, seed=0, progress=False)
    assert torch.equal(torch.cuda.get_rng_state(), before)


def test_a_nan_density_on_the_gpu_is_refused_naming_its_site():
    x = torch.randn(32, 3, device=CUDA)

    def guide(x):
        loc = pyro.param("loc_w", lambda: torch.zeros(3, device=x.device))
        with pyro.plate("N", x.shape[0]):
            pyro.sample("z", dist.Normal(x @ loc, 0.5))

    def model(x):
        with pyro.plate("N", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros((), device=x.device), 1.0))
            loc = torch.log(z)[..., None].expand(*z.shape, x.shape[-1])  # NaN where z < 0
            pyro.sample("obs", dist.Normal(loc, 1.0).to_event(1), obs=x)

    with pytest.raises(ValueError, match=r"model site 'obs'"):
        ppl_vae.log_marginal(model, guide, x, 50, seed=0)


def test_diagnostics_are_all_on_the_gpu(ppca_truth):
    model, x = ppca_truth
    model, x = model.to(CUDA), x[:40].to(CUDA)
    report = ppl_vae.diagnostics(model, LinearEncoder(10, 2).double().to(CUDA), x, 50, seed=0)
    assert {report.khat.device.type, report.ess.device.type} == {"cuda"}


def _small_mnist(root):
    """100 training and 20 test images of 6x6 pixels in MNIST's IDX files (the device
    machine may lack scikit-learn, which the embedded digits need)."""
    import gzip

    import numpy as np

    root.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 100), ("t10k", 20)):
        images = rng.integers(0, 256, size=(n, 6, 6)).astype(np.uint8)
        header = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in images.shape)
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header
                                                                            + images.tobytes()))
    return root


def test_the_command_runs_on_the_gpu_and_its_checkpoint_reads_on_the_cpu(tmp_path,
                                                                          monkeypatch):
    from ppl_vae import cli

    monkeypatch.delenv("PPL_VAE_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = ["--dataset", "mnist", "--data-root", str(_small_mnist(tmp_path / "data"))]
    tiny = [*data, "--latent-dim", "2", "--hidden", "16", "--epochs", "2", "--num-samples",
            "50", "--eval-limit", "20", "--quiet"]
    gpu = cli.run(["gaps", *tiny, "--device", "cuda", "--out", str(tmp_path / "gpu")])
    cpu = cli.run(["gaps", *tiny, "--out", str(tmp_path / "cpu")])
    # The same starting weights (built on the CPU), data and seed: the two runs differ
    # only by the devices' roundings, after 2 epochs and the local fits.
    for key in ("log_px", "elbo_local", "elbo_amortized"):
        assert abs(gpu[key] - cpu[key]) < 0.05, (key, gpu[key], cpu[key])
    fit = cli.run(["fit", *tiny, "--device", "cuda", "--out", str(tmp_path / "fit")])
    assert fit["elbo"] == fit["elbo"]  # not NaN
    saved = ["--checkpoint", str(tmp_path / "fit" / "checkpoint.pt"), *data, "--num-samples",
             "50", "--eval-limit", "20", "--quiet"]
    reread = cli.run(["fit", *saved, "--out", str(tmp_path / "reread")])  # on the CPU
    assert abs(reread["elbo"] - fit["elbo"]) < 0.05
    surgery = cli.run(["surgery", *saved[:6], "--eval-limit", "20", "--quiet", "--device",
                       "cuda", "--out", str(tmp_path / "surgery")])
    assert surgery["elbo"] == surgery["elbo"]
