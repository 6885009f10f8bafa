"""LightningModule for translation and summarization with an encoder-decoder whose layers follow ODE schemes."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torchmetrics import MeanMetric

from lit_iiet.analysis.convergence import ConvergenceMeter
from lit_iiet.data.seq2seq import Seq2SeqData, collate_sources, encode_sources, source_batches
from lit_iiet.errors import UserInputError
from lit_iiet.media import log_text
from lit_iiet.metrics import bleu_chrf, compound_split_bleu, rouge
from lit_iiet.models.base import ODEModule, as_config, check_adam_options
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

    def __post_init__(self) -> None:
        check_adam_options(self)


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


def check_decoding(decoding: BeamConfig) -> None:
    """One-line errors for decoding settings that beam search cannot run with."""
    if decoding.beam < 1:
        raise UserInputError(f"decoding.beam={decoding.beam} must be >= 1")
    if decoding.min_len < 0 or decoding.no_repeat_ngram < 0:
        raise UserInputError(
            f"decoding.min_len={decoding.min_len} and decoding.no_repeat_ngram={decoding.no_repeat_ngram} must be >= 0"
        )


def samples_markdown(samples: Sequence[tuple[int, str, str, str]]) -> str:
    """(index, source, reference, hypothesis) triples as TensorBoard markdown, verbatim in code blocks."""
    return "\n\n".join(
        f"**#{i}**\n\n```\nsource:     {src}\nreference:  {ref}\nhypothesis: {hyp}\n```" for i, src, ref, hyp in samples
    )


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
        self._outputs: list[tuple[int, str, str]] = []
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

    # --- decoding and evaluation ---------------------------------------------------------------------------

    def decoding_with(self, **overrides) -> BeamConfig:
        """model.decoding with some settings replaced (e.g. beam=5), for one call; the model's own stay as they are."""
        names = [f.name for f in fields(BeamConfig)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise UserInputError(f"unknown decoding setting {unknown[0]!r}; choose from {', '.join(names)}")
        decoding = replace(self.decoding, **overrides)
        check_decoding(decoding)
        return decoding

    @torch.no_grad()
    def translate(self, src: torch.Tensor, src_mask: torch.Tensor, decoding: BeamConfig | None = None) -> list[str]:
        """Beam search (greedy at beam 1) for a padded batch of sources; detokenised output text. decoding: the
        settings (default model.decoding)."""
        tok, d = self.tokenizer, decoding or self.decoding
        src_len = src_mask.sum(1).float()
        max_len = (d.max_len_a * src_len + d.max_len_b).long().clamp(max=self.model.cfg.max_tgt_len - 1)
        ids = beam_search(
            self.model.decoder_for(src, src_mask),
            src.shape[0],
            tok.bos_id,
            tok.eos_id,
            max_len,
            d.beam,
            d.min_len,
            d.lenpen,
            d.no_repeat_ngram,
            banned_ids=(tok.pad_id, tok.bos_id),
        )
        return [tok.decode(seq) for seq in ids]

    def decode_batch(self, batch: dict, decoding: BeamConfig | None = None) -> dict[int, str]:
        """{input position: output text} for a batch of `collate_sources`: what predict_step and generate_text share."""
        texts = self.translate(batch["src"].to(self.device), batch["src_mask"].to(self.device), decoding)
        return dict(zip(batch["index"].tolist(), texts))

    # --- new text: predict and Python ------------------------------------------------------------------------

    def on_predict_start(self) -> None:
        d = self.decoding
        print(
            f"decoding {self.data.predict_sources} sources: beam={d.beam} lenpen={d.lenpen} "
            f"max_len={d.max_len_a}*src+{d.max_len_b} min_len={d.min_len} no_repeat_ngram={d.no_repeat_ngram}",
            flush=True,
        )

    def predict_step(self, batch: dict, batch_idx: int) -> dict[int, str]:
        # {input position: text}: TextPredictionWriter writes them one per line in input order.
        return self.decode_batch(batch)

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
        settings, tok = self.decoding_with(**decoding), self.tokenizer
        ids = encode_sources(sources, tok, self.model.cfg.max_src_len, long_source, "given", "source", "long_source")
        outputs: dict[int, str] = {}
        was_training = self.training
        self.eval()
        try:
            for indices in source_batches([len(s) for s in ids], batch_size):
                outputs.update(self.decode_batch(collate_sources(indices.tolist(), ids, tok.pad_id), settings))
        finally:
            self.train(was_training)
        return [outputs[i] for i in range(len(ids))]

    # --- evaluation ------------------------------------------------------------------------------------------

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
            scores = bleu_chrf(hyps, refs) if self.data.task == "translation" else rouge(hyps, refs)
            if self.compound_split_bleu:
                scores.update(compound_split_bleu(hyps, refs))
            metrics.update({f"{split}/{k}": v for k, v in scores.items() if not k.endswith("signature")})
        self.log_dict(metrics, prog_bar=True)
        self.log("iiet/evals_per_token", self.model.enc_update.total_evals() / self.model.cfg.enc_layers)
        for stack_name, meter in self.convergence.items():
            if meter.tokens:
                self.log_dict(meter.metrics(stack_name), sync_dist=True)
            meter.reset()
        texts = {key: value for key, value in scores.items() if key.startswith("bleu") and key.endswith("signature")}
        if split == "val" and self.val_text_samples and outputs and not self.trainer.sanity_checking:
            sources = self.data.texts[split]
            texts["samples"] = samples_markdown(
                [(i, sources[i][0], ref, hyp) for i, hyp, ref in outputs[: self.val_text_samples]]
            )
        for key, text in texts.items():
            log_text(self.trainer, f"{split}/{key}", text, self.global_step)
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
        texts = self.data.texts["test"]
        files = {
            "test.hyp.txt": [h for _, h, _ in result["outputs"]],
            "test.ref.txt": [r for _, _, r in result["outputs"]],
            "test.src.txt": [texts[i][0] for i, _, _ in result["outputs"]],
        }
        for name, lines in files.items():
            (out_dir / name).write_text("".join(line.replace("\n", " ") + "\n" for line in lines), encoding="utf-8")
        s = result["scores"]
        if "bleu" in s:
            print(
                f"test BLEU = {s['bleu']:.2f}  chrF = {s['chrf']:.2f}  ({len(files['test.hyp.txt'])} segments)\n"
                f"  BLEU signature: {s['bleu_signature']}\n  chrF signature: {s['chrf_signature']}\n"
                f"  hypotheses: {out_dir / 'test.hyp.txt'}  references: {out_dir / 'test.ref.txt'}"
            )
            if "bleu_compound_split" in s:
                print(
                    f"test compound-split BLEU = {s['bleu_compound_split']:.2f}  (tokenized, for comparison with papers; docs/SEQ2SEQ.md)\n"
                    f"  signature: {s['bleu_compound_split_signature']}"
                )
        else:
            print(
                f"test ROUGE-1 = {s['rouge1']:.2f}  ROUGE-2 = {s['rouge2']:.2f}  ROUGE-Lsum = {s['rougeLsum']:.2f}  "
                f"({len(files['test.hyp.txt'])} documents; rouge-score, Porter stemmer)\n  hypotheses: {out_dir / 'test.hyp.txt'}"
            )
