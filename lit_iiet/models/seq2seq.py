"""LightningModule for translation and summarization with an encoder-decoder whose layers follow ODE schemes."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torchmetrics import MeanMetric

from lit_iiet.analysis.convergence import ConvergenceMeter
from lit_iiet.errors import UserInputError
from lit_iiet.metrics import bleu_chrf, rouge
from lit_iiet.models.base import ODEModule, as_config
from lit_iiet.nn.generate import beam_search
from lit_iiet.nn.ode import ODEConfig
from lit_iiet.nn.seq2seq import Seq2Seq, Seq2SeqConfig


@dataclass
class Seq2SeqOptimConfig:
    """Adam with the inverse square-root schedule of "Attention is all you need" (fairseq's inverse_sqrt)."""

    lr: float = 7e-4
    """Peak learning rate, reached at the end of warmup."""
    warmup_steps: int = 4000
    """Linear warmup steps; afterwards lr * sqrt(warmup_steps / step)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """Adam betas (the ODE Transformer / PCformer WMT recipe uses (0.9, 0.997))."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay on weight matrices."""


@dataclass
class BeamConfig:
    """Decoding settings for validation, test and predict."""

    beam: int = 4
    """Beam size; 1 is greedy decoding."""
    lenpen: float = 1.0
    """Length penalty: hypotheses are ranked by log-probability / length ** lenpen."""
    max_len_a: float = 1.2
    """Maximum output length is max_len_a * source length + max_len_b tokens."""
    max_len_b: int = 10
    """See max_len_a."""
    min_len: int = 1
    """Minimum output length in tokens (eos is forbidden before it)."""
    no_repeat_ngram: int = 0
    """Forbid repeating any n-gram of this size (0: off)."""


def inverse_sqrt(step: int, warmup: int) -> float:
    """Multiplier of the peak learning rate at an optimizer step: linear warmup, then 1 / sqrt(step)."""
    step += 1
    return step / warmup if step < warmup else math.sqrt(warmup / step)


def label_smoothed_nll(logits: torch.Tensor, target: torch.Tensor, epsilon: float, ignore_index: int):
    """fairseq's label smoothing: the target gets 1 - epsilon, every other class epsilon / (V - 1).

    (torch's cross_entropy(label_smoothing=e) instead spreads e / V over all V classes, the target included.)
    Returns the smoothed loss and the plain NLL, both averaged over non-pad target tokens.
    """
    lprobs = logits.float().log_softmax(-1)
    nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    smooth = -lprobs.sum(-1)
    keep = target != ignore_index
    eps_i = epsilon / (lprobs.shape[-1] - 1)
    loss = (1.0 - epsilon - eps_i) * nll + eps_i * smooth
    n = keep.sum().clamp(min=1)
    return (loss * keep).sum() / n, (nll * keep).sum() / n


class Seq2SeqModel(ODEModule):
    """Label-smoothed training of an encoder-decoder; BLEU / chrF or ROUGE at validation and test time."""

    def __init__(
        self,
        arch: Seq2SeqConfig = Seq2SeqConfig(),
        enc_ode: ODEConfig = ODEConfig(),
        dec_ode: ODEConfig = ODEConfig(),
        optim: Seq2SeqOptimConfig = Seq2SeqOptimConfig(),
        decoding: BeamConfig = BeamConfig(),
        label_smoothing: float = 0.1,
        val_decode_batches: int | None = None,
        init_from: str | None = None,
    ) -> None:
        """
        Args:
            arch: Shape of the encoder-decoder (Transformer-base by default).
            enc_ode: Scheme of the encoder layers (the IIET / ODE Transformer papers iterate the encoder).
            dec_ode: Scheme of the decoder layers (vanilla euler by default).
            optim: Optimizer and inverse-sqrt learning-rate schedule.
            decoding: Beam search settings for validation, test and predict.
            label_smoothing: epsilon of fairseq-convention label smoothing (0 disables it).
            val_decode_batches: Validation batches decoded for BLEU / ROUGE (None: all); the loss uses all.
            init_from: Checkpoint whose weights initialise the model before `fit` (no optimizer state or step).
        """
        super().__init__()
        arch, enc_ode, dec_ode = as_config(Seq2SeqConfig, arch), as_config(ODEConfig, enc_ode), as_config(ODEConfig, dec_ode)
        self.optim, self.decoding = as_config(Seq2SeqOptimConfig, optim), as_config(BeamConfig, decoding)
        if not 0.0 <= label_smoothing < 1.0:
            raise UserInputError(f"label_smoothing={label_smoothing} must lie in [0, 1)")
        if self.decoding.beam < 1:
            raise UserInputError(f"decoding.beam={self.decoding.beam} must be >= 1")
        self.label_smoothing, self.val_decode_batches, self.init_from = label_smoothing, val_decode_batches, init_from
        self.model = Seq2Seq(arch, enc_ode, dec_ode)
        self.save_configs(arch=arch, enc_ode=enc_ode, dec_ode=dec_ode, optim=self.optim, decoding=self.decoding)
        self.loss_metric, self.nll_metric = MeanMetric(), MeanMetric()
        self._outputs: list[tuple[int, str, str]] = []
        # Convergence of the iterated stacks at validation: iiet/increment/enc<layer>/<k>, iiet/contraction/enc<layer>.
        self.convergence = {"enc": ConvergenceMeter(), "dec": ConvergenceMeter()}

    def setup(self, stage: str) -> None:
        self.check_vocab(self.model.cfg.vocab_size)
        h = getattr(self.datamodule, "hparams", None)
        if h is not None and h.get("max_src_len", 0) > self.model.cfg.max_src_len:
            raise UserInputError(f"data.max_src_len={h.max_src_len} is longer than model.arch.max_src_len={self.model.cfg.max_src_len}")
        if h is not None and h.get("max_tgt_len", 0) > self.model.cfg.max_tgt_len:
            raise UserInputError(f"data.max_tgt_len={h.max_tgt_len} is longer than model.arch.max_tgt_len={self.model.cfg.max_tgt_len}")
        super().setup(stage)

    def configure_optimizers(self):
        o = self.optim
        optimizer = torch.optim.AdamW(self.param_groups(o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: inverse_sqrt(step, o.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- training ------------------------------------------------------------------------------------------

    def losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(batch["src"], batch["src_mask"], batch["tgt_in"])
        return label_smoothed_nll(logits, batch["tgt_out"], self.label_smoothing, self.datamodule.tokenizer.pad_id)

    def forward_flops(self, batch: dict) -> int:
        return self.model.flops(batch["src"].shape[0], batch["src"].shape[1], batch["tgt_in"].shape[1])

    def batch_tokens(self, batch: dict) -> int:
        return int(batch["src_mask"].sum() + (batch["tgt_out"] != self.datamodule.tokenizer.pad_id).sum())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, nll = self.losses(batch)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/nll_loss", nll, sync_dist=True)
        return loss

    # --- decoding and evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def translate(self, src: torch.Tensor, src_mask: torch.Tensor) -> list[str]:
        """Beam search (greedy at beam 1) for a padded batch of sources; detokenised output text."""
        tok, d = self.datamodule.tokenizer, self.decoding
        src_len = src_mask.sum(1).float()
        max_len = (d.max_len_a * src_len + d.max_len_b).long().clamp(max=self.model.cfg.max_tgt_len - 1)
        ids = beam_search(
            self.model.decoder_for(src, src_mask), src.shape[0], tok.bos_id, tok.eos_id, max_len, d.beam,
            d.min_len, d.lenpen, d.no_repeat_ngram, banned_ids=(tok.pad_id, tok.bos_id),
        )
        return [tok.decode(seq) for seq in ids]

    @contextlib.contextmanager
    def _observe_convergence(self, batch: dict) -> Iterator[None]:
        """Feed the iterates of every iterated stack (real tokens only) to its convergence meter."""
        masks = {"enc": batch["src_mask"], "dec": batch["tgt_out"] != self.datamodule.tokenizer.pad_id}
        with contextlib.ExitStack() as stack:
            for stack_name, update in (("enc", self.model.enc_update), ("dec", self.model.dec_update)):
                if update.cfg.scheme == "iiet":
                    meter = self.convergence[stack_name]
                    stack.enter_context(update.observe(meter.observer(update.schedule, masks[stack_name])))
            yield

    def _eval_step(self, batch: dict, batch_idx: int, split: str) -> None:
        with self._observe_convergence(batch) if split == "val" else contextlib.nullcontext():
            loss, nll = self.losses(batch)
        n = (batch["tgt_out"] != self.datamodule.tokenizer.pad_id).sum()
        self.loss_metric.update(loss, weight=n)
        self.nll_metric.update(nll, weight=n)
        if split == "test" or self.val_decode_batches is None or batch_idx < self.val_decode_batches:
            texts = self.datamodule.texts[split]
            for i, hyp in zip(batch["index"].tolist(), self.translate(batch["src"], batch["src_mask"])):
                self._outputs.append((i, hyp, texts[i][1]))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def _gathered_outputs(self) -> list[tuple[int, str, str]]:
        outputs, self._outputs = self._outputs, []
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, outputs)
            outputs = [o for part in parts for o in part]
        return sorted(set(outputs))  # DDP samplers may repeat a few items to even out the ranks

    def _eval_epoch_end(self, split: str) -> dict:
        loss, nll = self.loss_metric.compute(), self.nll_metric.compute()
        self.loss_metric.reset()
        self.nll_metric.reset()
        metrics = {f"{split}/loss": loss, f"{split}/nll_loss": nll, f"{split}/ppl": nll.exp()}
        outputs = self._gathered_outputs()
        scores: dict = {}
        if outputs and not self.trainer.sanity_checking:
            hyps, refs = [h for _, h, _ in outputs], [r for _, _, r in outputs]
            scores = bleu_chrf(hyps, refs) if self.datamodule.task == "translation" else rouge(hyps, refs)
            metrics.update({f"{split}/{k}": v for k, v in scores.items() if not k.endswith("signature")})
        self.log_dict(metrics, prog_bar=True)
        self.log("iiet/evals_per_token", self.model.enc_update.total_evals() / self.model.cfg.enc_layers)
        for stack_name, meter in self.convergence.items():
            if meter.tokens:
                self.log_dict(meter.metrics(stack_name), sync_dist=True)
            meter.reset()
        if "bleu_signature" in scores and self.trainer.is_global_zero:
            for logger in self.loggers:
                if hasattr(logger.experiment, "add_text"):
                    logger.experiment.add_text(f"{split}/bleu_signature", scores["bleu_signature"], self.global_step)
        return {"outputs": outputs, "scores": scores}

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        result = self._eval_epoch_end("test")
        if not self.trainer.is_global_zero or not result["outputs"]:
            return
        # Hypotheses and references next to the logs, one segment per line, to rescore with the sacrebleu CLI.
        out_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        texts = self.datamodule.texts["test"]
        files = {"test.hyp.txt": [h for _, h, _ in result["outputs"]], "test.ref.txt": [r for _, _, r in result["outputs"]],
                 "test.src.txt": [texts[i][0] for i, _, _ in result["outputs"]]}
        for name, lines in files.items():
            (out_dir / name).write_text("".join(line.replace("\n", " ") + "\n" for line in lines), encoding="utf-8")
        s = result["scores"]
        if "bleu" in s:
            print(f"test BLEU = {s['bleu']:.2f}  chrF = {s['chrf']:.2f}  ({len(files['test.hyp.txt'])} segments)\n"
                  f"  BLEU signature: {s['bleu_signature']}\n  chrF signature: {s['chrf_signature']}\n"
                  f"  hypotheses: {out_dir / 'test.hyp.txt'}  references: {out_dir / 'test.ref.txt'}")
        else:
            print(f"test ROUGE-1 = {s['rouge1']:.2f}  ROUGE-2 = {s['rouge2']:.2f}  ROUGE-Lsum = {s['rougeLsum']:.2f}  "
                  f"({len(files['test.hyp.txt'])} documents; rouge-score, Porter stemmer)\n  hypotheses: {out_dir / 'test.hyp.txt'}")
