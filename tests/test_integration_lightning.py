"""Lightning: a leanopt optimizer from configure_optimizers, with and without gradient release, on a tiny
model with tiny CPU Trainer runs (no logger, no checkpoint clutter: everything under tmp_path)."""

import warnings

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

import leanopt  # noqa: E402
from leanopt.integrations.common import unwrap_optimizer  # noqa: E402
from leanopt.integrations.lightning import LeanLightningModule  # noqa: E402
from leanopt.models import GPT, GPTConfig  # noqa: E402

pytestmark = pytest.mark.slow
CFG = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
BATCH, ACCUM, STEPS_PER_EPOCH = 2, 2, 2


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view({torch.float32: torch.int32, torch.bfloat16: torch.int16}.get(t.dtype, t.dtype))


class Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, CFG.vocab_size, (BATCH * ACCUM * STEPS_PER_EPOCH, CFG.block_size), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def make_module(base, release=None, keep_fp32=None):
    class Tiny(base):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            kw = {} if keep_fp32 is None else {"keep_fp32": keep_fp32}
            self.gpt = leanopt.cast_model(GPT(CFG), **kw)

        def training_step(self, x, batch_idx):
            return self.gpt(x, torch.roll(x, -1, dims=1))[1]

        def configure_optimizers(self):
            opt = leanopt.AdamW(self.parameters(), lr=3e-3, weight_decay=0.1)
            if release is not None:
                leanopt.release_gradients(opt, **release)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def train_dataloader(self):
            return torch.utils.data.DataLoader(Tokens(), batch_size=BATCH, shuffle=False)

    return Tiny()


def fit(tmp_path, module, epochs=1, ckpt_path=None, **trainer_kw):
    kw = dict(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
        accumulate_grad_batches=ACCUM, gradient_clip_val=0.05,
    )  # fmt: skip
    kw.update(trainer_kw)
    trainer = pl.Trainer(**kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "num_workers" hints and the like
        trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def state_of(trainer) -> dict:
    module = trainer.lightning_module
    opt = unwrap_optimizer(trainer.optimizers[0])
    out = {}
    for n, p in module.named_parameters():
        out[n] = bits(p).clone()
        out.update({f"{n}:{k}": v.clone() for k, v in opt.state[p].items()})
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_plain_lightning_module_with_leanopt_trains_and_clips(tmp_path):
    clipped = fit(tmp_path, make_module(pl.LightningModule))
    unclipped = fit(tmp_path, make_module(pl.LightningModule), gradient_clip_val=None)
    assert clipped.global_step == STEPS_PER_EPOCH
    a, b = state_of(clipped), state_of(unclipped)
    assert any(k.endswith(":remainder") for k in a)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # clipping was applied


@pytest.mark.parametrize(
    "keep_fp32, clip",
    [
        ((), 0.05),  # all bf16, accumulation + exact clipping
        (None, None),  # default cast (fp32 LayerNorms), accumulation, no clipping
    ],
)
def test_release_matches_lightning_without_release_bit_for_bit(tmp_path, keep_fp32, clip):
    plain = fit(tmp_path, make_module(pl.LightningModule, keep_fp32=keep_fp32), gradient_clip_val=clip)
    release = {"max_norm": clip} if clip else {}
    released = fit(
        tmp_path, make_module(LeanLightningModule, release=release, keep_fp32=keep_fp32), gradient_clip_val=clip
    )
    assert released.global_step == plain.global_step == STEPS_PER_EPOCH
    assert_same(state_of(plain), state_of(released))


@pytest.mark.parametrize("release", [None, {"max_norm": 0.05}])
def test_checkpoint_resume_is_bit_exact(tmp_path, release):
    base = LeanLightningModule if release else pl.LightningModule
    full = fit(tmp_path, make_module(base, release, keep_fp32=()), epochs=2)
    first = fit(tmp_path, make_module(base, release, keep_fp32=()), epochs=1)
    first.save_checkpoint(tmp_path / "half.ckpt")
    resumed = fit(tmp_path, make_module(base, release, keep_fp32=()), epochs=2, ckpt_path=str(tmp_path / "half.ckpt"))
    assert resumed.global_step == full.global_step == 2 * STEPS_PER_EPOCH
    assert_same(state_of(full), state_of(resumed))
    assert resumed.lr_scheduler_configs[0].scheduler.last_epoch == full.lr_scheduler_configs[0].scheduler.last_epoch


def test_settings_release_cannot_honour_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"max_norm=None but Trainer\(gradient_clip_val=0.05\)"):
        fit(tmp_path, make_module(LeanLightningModule, release={}))
    with pytest.raises(ValueError, match="gradient_clip_algorithm='value'"):
        fit(tmp_path, make_module(LeanLightningModule, release={"max_norm": 0.05}), gradient_clip_algorithm="value")
    with pytest.raises(ValueError, match=r"precision='bf16-true'.*'32-true'"):
        fit(tmp_path, make_module(LeanLightningModule), precision="bf16-true")
