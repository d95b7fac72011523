"""One rank of the DDP + gradient release test (run by tests/test_release_ddp.py; gloo, CPU).

Usage: python _release_ddp_worker.py RANK WORLD INIT_FILE OUT_DIR
Runs every scenario with and without release and saves each final model's weights to OUT_DIR.
"""

import copy
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import leanopt


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 32)
        self.fc = nn.Linear(32, 32)
        self.fc2 = nn.Linear(32, 32)
        self.out = nn.Linear(32, 16, bias=False)

    def forward(self, idx):
        return self.out(torch.tanh(self.fc2(torch.tanh(self.fc(self.emb(idx))))))


def data(rank, n):
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randint(0, 16, (8,), generator=g), torch.randint(0, 16, (8,), generator=g)) for _ in range(n)]


def loss_of(model, batch, scale=1.0):
    x, y = batch
    return F.cross_entropy(model(x).float(), y) * scale


OPTS = {
    "adamw": lambda ps, master: leanopt.AdamW(ps, lr=1e-2, master=master, seed=3),
    "sgd": lambda ps, master: leanopt.SGD(ps, lr=0.1, momentum=0.9, master=master, seed=3),
}


def run(rank, opt_name, master, release, micro=1, max_norm=None, steps=3):
    torch.manual_seed(0)
    model = DDP(Net().bfloat16(), bucket_cap_mb=0.002)  # several buckets
    opt = OPTS[opt_name](model.parameters(), master)
    batches = data(rank, steps * micro)
    handle = leanopt.release_gradients(opt, ddp=model, max_norm=max_norm) if release else None
    moved_in_backward = True
    for s in range(steps):
        chunk = batches[s * micro : (s + 1) * micro]
        for j, batch in enumerate(chunk):
            last = j == len(chunk) - 1
            loss = loss_of(model, batch, 1.0 / micro)
            if handle is not None:
                before = [p.detach().clone() for p in model.parameters()]
                with handle.accumulate(enabled=not last):
                    handle.backward(loss)
                changed = any(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
                if last and max_norm is None:
                    moved_in_backward &= changed
                if not last:
                    assert not changed, "weights moved during an accumulating backward"
            else:
                with model.no_sync() if not last else torch.enable_grad():
                    loss.backward()
        if handle is None and max_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(model.parameters()), max_norm)
        opt.step()
        if handle is not None and max_norm is None:  # (exact clipping under DDP updates in step())
            assert all(p.grad is None for p in model.parameters()), "step() left released grads in place"
        opt.zero_grad()
    assert moved_in_backward, "release did not update inside backward"
    return {n: p.detach().clone() for n, p in model.module.named_parameters()}


SCENARIOS = {
    "adamw_exact": dict(opt_name="adamw", master="exact"),
    "sgd_stochastic": dict(opt_name="sgd", master="stochastic"),
    "adamw_accumulate": dict(opt_name="adamw", master="exact", micro=2),
    "adamw_clip": dict(opt_name="adamw", master="exact", max_norm=0.05),
    "adamw_clip_accumulate": dict(opt_name="adamw", master="exact", max_norm=0.05, micro=2),
}


def main() -> None:
    rank, world, init_file, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        opt = leanopt.SGD(Net().parameters(), lr=0.1)
        try:  # without ddp=, release would see local gradients: refused
            leanopt.release_gradients(opt)
            raise AssertionError("release_gradients without ddp= was accepted under DDP")
        except ValueError as err:
            assert "ddp=" in str(err)
        results = {}
        for name, kwargs in SCENARIOS.items():
            results[name] = {
                "plain": run(rank, release=False, **copy.deepcopy(kwargs)),
                "release": run(rank, release=True, **copy.deepcopy(kwargs)),
            }
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
