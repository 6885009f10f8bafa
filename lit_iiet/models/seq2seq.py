"""LightningModule for translation and summarization with an encoder-decoder whose layers follow ODE schemes.

It trains and runs the Lightning hooks. In a Trainer the data module tells it, once, what the steps need
(`Seq2SeqModel.connect`); beam search lives in lit_iiet.models.decoding, scoring in lit_iiet.models.scoring."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torchmetrics import MeanMetric

from lit_iiet.analysis.convergence import ConvergenceMeter
from lit_iiet.data.seq2seq import Seq2SeqData
from lit_iiet.errors import UserInputError
from lit_iiet.media import log_text
from lit_iiet.models.base import ODEModule, as_config, check_adam_options
from lit_iiet.models.decoding import (
    BeamConfig,
    check_decoding,
    decode,
    decode_batch,
    decode_texts,
    replace_decoding,
)
from lit_iiet.models.scoring import (
    Output,
    gather_outputs,
    samples_markdown,
    score_outputs,
    summarize_test,
    write_test_files,
)
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

    def __post_init__(self) -> None:
        check_adam_options(self)


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
    """Label-smoothed training of an encoder-decoder; BLEU / chrF or ROUGE at validation and test time; `predict`
    and `generate_text` translate or summarize new text."""

    runtime_options = ("decoding", "compound_split_bleu", "val_text_samples", "val_decode_batches")  # see ODEModule
    checkpoint_keys = ("arch", "enc_ode")  # see ODEModule

    def __init__(
        self,
        arch: Seq2SeqConfig = Seq2SeqConfig(),
        enc_ode: ODEConfig = ODEConfig(),
        dec_ode: ODEConfig = ODEConfig(),
        optim: Seq2SeqOptimConfig = Seq2SeqOptimConfig(),
        decoding: BeamConfig = BeamConfig(),
        label_smoothing: float = 0.1,
        val_decode_batches: int | None = None,
        val_text_samples: int = 3,
        compound_split_bleu: bool = False,
        init_from: str | None = None,
    ) -> None:
        """
        Args:
            arch: Shape of the encoder-decoder (Transformer-base by default).
            enc_ode: Scheme of the encoder layers (the IIET / ODE Transformer papers iterate the encoder).
            dec_ode: Scheme of the decoder layers (vanilla euler by default).
            optim: Optimizer and inverse-sqrt learning-rate schedule.
            decoding: Beam search settings for validation, test and predict. With --ckpt_path, the config's and
                command line's settings apply, not the checkpoint's.
            label_smoothing: epsilon of fairseq-convention label smoothing (0 disables it).
            val_decode_batches: Validation batches decoded for BLEU / ROUGE (None: all); the loss uses all.
            val_text_samples: Source / reference / hypothesis triples logged to TensorBoard as text (`val/samples`)
                after each validation: the first decoded validation items (0: none).
            compound_split_bleu: Translation only: also score tokenized BLEU with hyphenated compounds split
                (`val/bleu_compound_split`, `test/bleu_compound_split`), the convention of the IIET / ODE Transformer
                papers' WMT'14 En-De tables, to compare with them. The detokenized sacreBLEU (`bleu`, with its
                signature) stays the score to report; docs/SEQ2SEQ.md says how the two differ.
            init_from: Checkpoint whose weights initialise the model before `fit` (no optimizer state or step).
        """
        super().__init__()
        arch, enc_ode, dec_ode = (
            as_config(Seq2SeqConfig, arch),
            as_config(ODEConfig, enc_ode),
            as_config(ODEConfig, dec_ode),
        )
        for name, ode in (("enc_ode", enc_ode), ("dec_ode", dec_ode)):  # per-token policies exist in the LM only
            if ode.adaptive or ode.shared_kv:
                raise UserInputError(
                    f"model.{name}: iiet.policy={ode.iiet.policy!r} and iiet.kv_mode={ode.iiet.kv_mode!r} are not "
                    "supported by the encoder-decoder; use iiet.policy 'fixed' and iiet.kv_mode 'exact'"
                )
        self.optim, self.decoding = as_config(Seq2SeqOptimConfig, optim), as_config(BeamConfig, decoding)
        if not 0.0 <= label_smoothing < 1.0:
            raise UserInputError(f"label_smoothing={label_smoothing} must lie in [0, 1)")
        check_decoding(self.decoding)
        if val_text_samples < 0:
            raise UserInputError(f"val_text_samples={val_text_samples} must be >= 0")
        self.label_smoothing, self.val_decode_batches, self.init_from = label_smoothing, val_decode_batches, init_from
        self.val_text_samples, self.compound_split_bleu = val_text_samples, compound_split_bleu
        self.model = Seq2Seq(arch, enc_ode, dec_ode)
        self.save_configs(arch=arch, enc_ode=enc_ode, dec_ode=dec_ode, optim=self.optim, decoding=self.decoding)
        self.data: Seq2SeqData | None = None  # what the data module told `connect`
        self.loss_metric, self.nll_metric = MeanMetric(), MeanMetric()
        self._outputs: list[Output] = []  # decoded this epoch, on this rank
        # Convergence of the iterated stacks at validation: iiet/increment/enc<layer>/<k>, iiet/contraction/enc<layer>.
        self.convergence = {"enc": ConvergenceMeter(), "dec": ConvergenceMeter()}

    def connect(self, data: Seq2SeqData) -> None:
        """Take what the data module says about the data this model runs on: its tokenizer, lengths, task and texts.
        One-line errors where the model cannot hold them."""
        self.check_vocab(data.tokenizer, self.model.cfg.vocab_size)
        cfg = self.model.cfg
        for name, theirs, own in (
            ("max_src_len", data.max_src_len, cfg.max_src_len),
            ("max_tgt_len", data.max_tgt_len, cfg.max_tgt_len),
        ):
            if theirs > own:
                raise UserInputError(f"data.{name}={theirs} is longer than model.arch.{name}={own}")
        if self.compound_split_bleu and data.task != "translation":
            raise UserInputError(
                f"model.compound_split_bleu=true scores translation; this data module's task is {data.task}"
            )
        self.data = data

    def setup(self, stage: str) -> None:
        # Lightning sets the data module up first; this is where it hands the model what the steps need.
        if self.datamodule is None:
            raise UserInputError("Seq2SeqModel runs on a translation or summarization data module; none was given")
        self.connect(self.datamodule.for_model())
        super().setup(stage)

    def configure_optimizers(self):
        o = self.optim
        optimizer = torch.optim.AdamW(self.param_groups(o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: inverse_sqrt(step, o.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- training ------------------------------------------------------------------------------------------

    def losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(batch["src"], batch["src_mask"], batch["tgt_in"])
        return label_smoothed_nll(logits, batch["tgt_out"], self.label_smoothing, self.data.pad_id)

    def forward_flops(self, batch: dict) -> int:
        return self.model.flops(batch["src"].shape[0], batch["src"].shape[1], batch["tgt_in"].shape[1])

    def batch_tokens(self, batch: dict) -> int:
        return int(batch["src_mask"].sum() + (batch["tgt_out"] != self.data.pad_id).sum())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, nll = self.losses(batch)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/nll_loss", nll, sync_dist=True)
        return loss

    # --- decoding: `tokenizer` is the data module's in a Trainer, else the checkpoint's -----------------------

    def translate(self, src: torch.Tensor, src_mask: torch.Tensor, decoding: BeamConfig | None = None) -> list[str]:
        """Beam search (greedy at beam 1) for a padded batch of sources; detokenised output text. decoding: the
        settings (default model.decoding)."""
        return decode(self.model, self.tokenizer, src, src_mask, decoding or self.decoding)

    @torch.no_grad()
    def generate_text(
        self, sources: Sequence[str], batch_size: int = 32, long_source: str = "truncate", **decoding
    ) -> list[str]:
        """Translations (or summaries) of `sources`, in their order: the tokenizing, length-sorted batching and beam
        search of `predict`. Sources keep at most model.arch.max_src_len tokens.

        Args:
            sources: The texts.
            batch_size: Sources per beam-search batch.
            long_source: A source longer than model.arch.max_src_len: "truncate" (counted in a warning) or "reject".
            **decoding: Settings of model.decoding to replace for this call, e.g. beam=5, lenpen=0.6.
        """
        if isinstance(sources, str):
            raise UserInputError("sources is one string; pass a list of texts")
        if batch_size < 1:
            raise UserInputError(f"batch_size={batch_size} must be >= 1")
        settings = replace_decoding(self.decoding, **decoding)
        was_training = self.training
        self.eval()
        try:
            return decode_texts(self.model, self.tokenizer, sources, settings, batch_size, long_source)
        finally:
            self.train(was_training)

    def on_predict_start(self) -> None:
        d = self.decoding
        print(
            f"decoding {self.data.predict_sources} sources: beam={d.beam} lenpen={d.lenpen} "
            f"max_len={d.max_len_a}*src+{d.max_len_b} min_len={d.min_len} no_repeat_ngram={d.no_repeat_ngram}",
            flush=True,
        )

    def predict_step(self, batch: dict, batch_idx: int) -> dict[int, str]:
        # {input position: text}: TextPredictionWriter writes them one per line in input order. generate_text
        # decodes its batches with the same function.
        return decode_batch(self.model, self.tokenizer, batch, self.decoding)

    # --- validation and test ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _observe_convergence(self, batch: dict) -> Iterator[None]:
        """Feed the states of both stacks (real tokens only) to their convergence meters: the iterates of an
        iterated stack, the input and output of a layer of any other scheme (its update's relative size, which
        compares the schemes' first updates)."""
        masks = {"enc": batch["src_mask"], "dec": batch["tgt_out"] != self.data.pad_id}
        with contextlib.ExitStack() as stack:
            for stack_name, update in (("enc", self.model.enc_update), ("dec", self.model.dec_update)):
                meter = self.convergence[stack_name]
                stack.enter_context(update.trace(observe=meter.observer(update.schedule, masks[stack_name])))
            yield

    def _eval_step(self, batch: dict, batch_idx: int, split: str) -> None:
        with self._observe_convergence(batch) if split == "val" else contextlib.nullcontext():
            loss, nll = self.losses(batch)
        n = (batch["tgt_out"] != self.data.pad_id).sum()
        self.loss_metric.update(loss, weight=n)
        self.nll_metric.update(nll, weight=n)
        if split == "test" or self.val_decode_batches is None or batch_idx < self.val_decode_batches:
            texts = self.data.texts[split]
            for i, hyp in zip(batch["index"].tolist(), self.translate(batch["src"], batch["src_mask"])):
                self._outputs.append((i, hyp, texts[i][1]))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def _eval_epoch_end(self, split: str) -> tuple[list[Output], dict]:
        """Log the epoch's loss, scores, convergence and text; return the outputs of all ranks and their scores."""
        loss, nll = self.loss_metric.compute(), self.nll_metric.compute()
        self.loss_metric.reset()
        self.nll_metric.reset()
        metrics = {f"{split}/loss": loss, f"{split}/nll_loss": nll, f"{split}/ppl": nll.exp()}
        outputs, self._outputs = gather_outputs(self._outputs), []
        scored = bool(outputs) and not self.trainer.sanity_checking
        scores = score_outputs(outputs, self.data.task, self.compound_split_bleu) if scored else {}
        metrics.update({f"{split}/{k}": v for k, v in scores.items() if not k.endswith("signature")})
        self.log_dict(metrics, prog_bar=True)
        self.log("iiet/evals_per_token", self.model.enc_update.total_evals() / self.model.cfg.enc_layers)
        for stack_name, meter in self.convergence.items():
            if meter.tokens:
                self.log_dict(meter.metrics(stack_name), sync_dist=True)
            meter.reset()
        texts = {key: value for key, value in scores.items() if key.startswith("bleu") and key.endswith("signature")}
        if split == "val" and self.val_text_samples and scored:
            sources = self.data.texts[split]
            texts["samples"] = samples_markdown(
                [(i, sources[i][0], ref, hyp) for i, hyp, ref in outputs[: self.val_text_samples]]
            )
        for key, text in texts.items():
            log_text(self.trainer, f"{split}/{key}", text, self.global_step)
        return outputs, scores

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        outputs, scores = self._eval_epoch_end("test")
        if not self.trainer.is_global_zero or not outputs:
            return
        out_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        write_test_files(out_dir, outputs, self.data.texts["test"])
        print(summarize_test(scores, len(outputs), out_dir))
