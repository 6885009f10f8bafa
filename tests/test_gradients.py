"""GradientNorms logs what autograd computes: per-layer parameter gradients and the gradient at every iterate."""

import csv

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from lit_iiet.callbacks import GradientNorms
from lit_iiet.nn.decoder import Decoder, DecoderConfig, next_token_loss
from lit_iiet.nn.ode import ODEConfig


class TinyLM(L.LightningModule):
    def __init__(self, windows: torch.Tensor) -> None:
        super().__init__()
        torch.manual_seed(0)
        cfg = DecoderConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=4, max_seq_len=32)
        self.model, self.windows = Decoder(cfg, ODEConfig("iiet", 3)), windows

    def training_step(self, batch, batch_idx):
        return next_token_loss(self.model(batch[:, :-1]), batch)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.windows, batch_size=len(self.windows))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_gradient_norms_equal_autograd_per_layer_and_per_iterate(tmp_path):
    windows = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    module = TinyLM(windows)
    trainer = L.Trainer(
        max_steps=1,
        logger=CSVLogger(tmp_path),
        callbacks=[GradientNorms(every_n_steps=1)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    (row,) = csv.DictReader(open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv"))
    logged = {k: float(v) for k, v in row.items() if k.startswith("grad/")}

    # The same step by hand: states recorded, their gradients retained.
    reference = TinyLM(windows).model
    with reference.update.trace(record=True) as trace:
        loss = next_token_loss(reference(windows[:, :-1]), windows)
    states = trace.states
    for layer_states in states.values():
        for z in layer_states:
            z.retain_grad()
    loss.backward()
    assert len(logged) == 2 + 2 * 4  # two layers: parameters, and y, z_1, z_2, z_3
    for layer in range(2):
        params = torch.cat([p.grad.flatten() for p in reference.blocks[layer].parameters()])
        assert abs(logged[f"grad/{layer}"] - params.norm().item()) < 1e-5 * params.norm().item()
        for k, z in enumerate(states[layer]):
            assert abs(logged[f"grad/{layer}/z{k}"] - z.grad.norm().item()) < 1e-5 * z.grad.norm().item()
    # The iterates get different gradients (the test can tell them apart), the last one is the next layer's input.
    assert logged["grad/0/z1"] != logged["grad/0/z3"]
    assert logged["grad/0/z3"] == logged["grad/1/z0"]
