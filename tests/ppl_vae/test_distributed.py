"""Evaluation under torch.distributed (2 gloo processes on CPU) equals one process."""

import socket

import pyro
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ppl_vae
from ppl_vae.guides import LinearEncoder
from ppl_vae.models import PPCA


def problem():
    """A PPCA, an encoder and 37 rows (partial blocks), all fixed by seeds."""
    pyro.set_rng_seed(0)
    model = PPCA(5, 2).double()
    guide = LinearEncoder(5, 2).double()
    with torch.no_grad():
        model.W.mul_(3.0)
        x = model(None, num_data=37)
    return model, guide, x


def evaluate() -> dict:
    model, guide, x = problem()
    d = ppl_vae.diagnostics(model, guide, x, 40, seed=3)
    result = ppl_vae.ais(model, x, proposal=guide, num_steps=8, num_chains=3, seed=3,
                         progress=False)
    report = ppl_vae.gaps(model, guide, x, num_samples=30, local_steps=60, seed=3,
                          progress=False, log_px="ais", ais_steps=4, ais_chains=2)
    rows_seen = []
    hook = model.register_forward_pre_hook(lambda module, args: rows_seen.append(len(args[0])))
    local = ppl_vae.fit_local(model, x, "flow", steps=40, seed=3, progress=False)
    hook.remove()
    xs, latents = ppl_vae.sample_from_model(model, 20, seed=4)
    sandwich = ppl_vae.bdmc(model, xs, latents, num_steps=4, num_chains=2, seed=3,
                            progress=False)
    return {
        **{f"gaps_{name}": value for name, value in report.per_datapoint.items()},
        "bdmc_lower": sandwich.lower,
        "bdmc_upper": sandwich.upper,
        "log_weights": ppl_vae.log_weights(model, guide, x, 300, seed=3),
        "log_marginal": ppl_vae.log_marginal(model, guide, x, 300, seed=3),
        "elbo": ppl_vae.elbo(model, guide, x, 300, seed=3),
        "khat": d.khat,
        "ais": result.log_weights,
        "ais_acceptance": result.acceptance,
        **{f"local_{name}": value for name, value in local.state_dict().items()},
        "local_rows_seen": torch.tensor(rows_seen).median(),
    }


def _worker(rank: int, world: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        results = evaluate()
        results["share"] = torch.tensor(ppl_vae.distributed.my_share(list(range(5))))
        torch.save(results, f"{path}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_every_rank_the_one_process_result(tmp_path):
    expected = evaluate()
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.pop("share").tolist() == list(range(5))[rank::2]  # the work was split
        # ... the local fit's too: each rank's steps ran the model on half of the 37 rows
        assert got.pop("local_rows_seen") in (18, 19)
        expected.pop("local_rows_seen", None)
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=0, atol=1e-5, equal_nan=True,
                                       msg=f"rank {rank}, {name}")
