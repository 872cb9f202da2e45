"""fit() under torch.distributed: 2 gloo processes on CPU, DDP over one global minibatch."""

import math

import pyro
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ppl_vae
from ppl_vae.guides import LinearEncoder
from ppl_vae.models import PPCA
from tests.ppl_vae.test_distributed import free_port

STEPS, BATCH = 300, 64


def data():
    """Train and held-out rows drawn from a fixed PPCA (float64)."""
    pyro.set_rng_seed(0)
    truth = PPCA(6, 2, sigma=0.5).double()
    with torch.no_grad():
        truth.W.mul_(4.0)
        x = truth(None, num_data=900)
    pyro.clear_param_store()
    return x[:600], x[600:]


def train(checkpoint=None, stop_at=None, resume=False):
    x, _ = data()
    torch.manual_seed(1)
    model, guide = PPCA(6, 2).double(), LinearEncoder(6, 2).double()

    def stop(step, elbo):
        if stop_at is not None and step == stop_at:
            raise KeyboardInterrupt

    ppl_vae.fit(model, guide, x, num_steps=STEPS, batch_size=BATCH, lr=2e-2, seed=0,
                progress=False, checkpoint=checkpoint, resume=resume, callback=stop)
    return model, guide


def flat(model, guide):
    return torch.cat([p.detach().reshape(-1) for p in (*model.parameters(),
                                                        *guide.parameters())])


def _worker(rank, world, port, path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        whole = flat(*train())
        checkpoint = f"{path}/run.pt"
        try:
            train(checkpoint=checkpoint, stop_at=120)
        except KeyboardInterrupt:
            pass
        dist.barrier()  # rank 0 has written the checkpoint
        resumed = flat(*train(checkpoint=checkpoint, resume=True))
        model, guide = train()
        torch.save({"whole": whole, "resumed": resumed, "model": model.state_dict(),
                    "guide": guide.state_dict()}, f"{path}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def held_out_elbo(model, guide):
    _, x_test = data()
    return ppl_vae.elbo(model, guide, x_test, 200, seed=5)


def test_two_processes_train_like_one_and_resume_bit_for_bit(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(ranks[0]["whole"], ranks[1]["whole"])  # identical across ranks
    for r in ranks:
        assert torch.equal(r["resumed"], r["whole"])  # the interrupted run resumed exactly
    # The 2-process model reaches the one-process held-out ELBO within its standard error.
    one = held_out_elbo(*train())
    model, guide = PPCA(6, 2).double(), LinearEncoder(6, 2).double()
    model.load_state_dict(ranks[0]["model"])
    guide.load_state_dict(ranks[0]["guide"])
    two = held_out_elbo(model, guide)
    difference = two - one
    se = float(difference.std()) / math.sqrt(len(difference))
    assert abs(float(difference.mean())) < 3 * se + 0.01
    assert not torch.equal(ranks[0]["whole"], flat(*train()))  # it did train differently
