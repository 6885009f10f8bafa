"""Score decoder-only lit_iiet checkpoints with EleutherAI's lm-evaluation-harness (lm-eval 0.4.13).

Importing this module registers the lm-eval model "lit_iiet" (class `LitIIETLM`). Its model_args are
`checkpoint=<.ckpt>[,tokenizer=<.model or tokenizer.json>,batch_size=N,device=D,max_gen_toks=N]`. The tokenizer is
the one the checkpoint carries, so the checkpoint is all it needs (no corpus); a given tokenizer must be that
same model. Checkpoints from before tokenizers travelled with them need tokenizer=: the run's `data.tokenizer`, or
else the BPE model that LMDataModule trained and cached under `$LIT_IIET_CACHE/tokenizers/` (default `~/.cache/lit_iiet/tokenizers/`).

Command line (lm-eval's built-in tasks plus the YAML tasks found under --include_path):

    python -m lit_iiet evaluate --checkpoint runs/shakespeare/checkpoints/last.ckpt \\
        --include_path tests/assets/lm_eval_task --tasks shakespeare_cloze shakespeare_next_line

In Python, `LitIIETLM(model=..., tokenizer=...)` wraps an already loaded `LanguageModel` or `Decoder`. Pass it to
`lm_eval.simple_evaluate(model=...)`. Alternatively, pass `model="lit_iiet", model_args="checkpoint=..."` once
this module has been imported.

lm-eval's own `lm-eval` / `lm_eval` command: lm-eval 0.4.13 finds models only in its in-process registry. It
reads no entry points, and its `--include_path` loads task YAMLs, not model code. So `lm-eval --model lit_iiet`
only works after this module has been imported in the same process: `python -m lit_iiet evaluate` followed by
one of lm-eval's commands (`LM_EVAL_COMMANDS`) is lm-eval's command line with the model registered:

    python -m lit_iiet evaluate run --model lit_iiet --model_args checkpoint=... --device cpu --tasks ...

Scoring follows lm-eval's HF adapter: a document starts after <eos> (our models train on documents each
followed by <eos>; there is no <bos>). A context longer than max_seq_len is cut from the left. Rolling
log-likelihoods use lm-eval's disjoint windows. Generation runs through `lit_iiet.nn.generate.generate`.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from lit_iiet.checkpoint import checkpoint_tokenizer, load_checkpoint
from lit_iiet.data.tokenizer import Tokenizer
from lit_iiet.errors import UserInputError, exit_on_user_error
from lit_iiet.models.lm import LanguageModel
from lit_iiet.nn.decoder import Decoder
from lit_iiet.nn.generate import generate

try:
    # lm-eval's get_model() only loads lm-eval's own model table when its registry is still empty, and we
    # are about to add an entry. Importing lm_eval.models first keeps "hf" and the others findable.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import normalize_gen_kwargs
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:
    if e.name is None or not e.name.startswith("lm_eval"):
        raise
    raise ImportError(
        "lit_iiet.eval_harness needs lm-evaluation-harness: pip install 'lm-eval==0.4.13' (or the 'eval' extra)"
    ) from e

log = logging.getLogger(__name__)

# The first generation pass is this many tokens and each later pass is twice the previous one, so that a
# batch whose rows all hit a stop string early does not run on to max_gen_toks.
FIRST_GENERATION_CHUNK = 16
GENERATION_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")


@dataclass(frozen=True)
class Decoding:
    """One request's generation settings; requests with equal settings share batches."""

    until: tuple[str, ...]
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None


@register_model("lit_iiet")
class LitIIETLM(TemplateLM):
    """lm-eval model for a decoder-only lit_iiet checkpoint (or an already loaded model) and its tokenizer."""

    backend = "causal"

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        tokenizer: str | Path | Tokenizer | None = None,
        model: LanguageModel | Decoder | None = None,
        batch_size: int | str = 1,
        device: str | None = None,
        max_gen_toks: int = 256,
        max_batch_size: int | None = None,
        **unknown: Any,
    ) -> None:
        """
        Args:
            checkpoint: A LanguageModel checkpoint (.ckpt); its hyperparameters rebuild the model.
            tokenizer: The run's SentencePiece .model or tokenizer.json, or a loaded Tokenizer; default: the one the checkpoint
                carries (a given one must be that same model). Needed with a loaded model, and with checkpoints
                from before tokenizers travelled with them.
            model: Instead of checkpoint: a loaded LanguageModel or Decoder (moved to device, set to eval mode).
            batch_size: Sequences per forward pass (an integer; lm-eval's "auto" is not supported).
            device: torch device; default cuda when available, else cpu.
            max_gen_toks: Tokens to generate when a task sets no max_gen_toks.
            max_batch_size: Ignored; lm-eval passes it along with batch_size.
        """
        super().__init__()
        if unknown:
            allowed = "checkpoint, tokenizer, batch_size, device, max_gen_toks"
            raise UserInputError(f"unknown model_args {', '.join(sorted(unknown))} for lit_iiet; allowed: {allowed}")
        if (checkpoint is None) == (model is None):
            raise UserInputError("give exactly one of checkpoint=<path to a .ckpt> and a loaded model")
        self._batch_size = _positive_int(batch_size, "batch_size")
        self._max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")
        self._device = _device(device)
        self.checkpoint = str(checkpoint) if checkpoint is not None else None
        state = load_checkpoint(checkpoint) if checkpoint is not None else {}  # one-line errors for a bad file
        tokenizer = checkpoint_tokenizer(state, self.checkpoint, tokenizer, "tokenizer")
        if tokenizer is None:
            what = (
                "a loaded model"
                if checkpoint is None
                else f"checkpoint {self.checkpoint!r}, which carries none (saved by an older version),"
            )
            raise UserInputError(f"give tokenizer=<path to the run's .model or tokenizer.json file> with {what}")
        self.tokenizer = tokenizer
        # The file is read once: the tokenizer above and the model here come from the same loaded checkpoint.
        decoder = LanguageModel.from_loaded_checkpoint(state, self.checkpoint) if checkpoint is not None else model
        if isinstance(decoder, LanguageModel):
            decoder = decoder.model
        self.model: Decoder = decoder.to(self._device).eval()
        vocab = self.model.cfg.vocab_size
        if self.tokenizer.vocab_size > vocab:
            raise UserInputError(
                f"tokenizer {str(self.tokenizer.path)!r} has {self.tokenizer.vocab_size} tokens, more than the "
                f"model's vocab_size={vocab}; give the tokenizer the model was trained with"
            )

    # --- what lm-eval asks of a model ---------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        # Training appends <eos> to every document, so <eos> is also what precedes a document's first token
        # (TemplateLM's prefix_token_id defaults to this).
        return self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self.model.cfg.max_seq_len

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.path.stem

    def get_model_info(self) -> dict[str, Any]:
        """Stored in the results' "config" by simple_evaluate."""
        return {
            "checkpoint": self.checkpoint,
            "tokenizer": str(self.tokenizer.path),
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(self.model.embed.weight.dtype),
            "ode_scheme": self.model.ode.scheme,
            "max_seq_len": self.max_length,
        }

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        # Exactly as training text is encoded, without <bos>/<eos>.
        return self.tokenizer.encode_document(string, eos=False)

    def tok_decode(self, ids: list[int]) -> str:
        # A model may have more embedding rows than the tokenizer has pieces; such ids have no text.
        return self.tokenizer.decode(i for i in ids if i < self.tokenizer.vocab_size)

    @torch.no_grad()
    def log_probs(self, batch: Tensor) -> Tensor:
        """Next-token log-probabilities (B, T, V) in float32 for token ids (B, T)."""
        return F.log_softmax(self.model(batch.to(self._device)).float(), dim=-1)

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """(summed log-probability, is greedy) of each continuation's tokens after its context's tokens."""
        limit = self.max_length
        windows = []
        for _, context, continuation in requests:
            if len(continuation) > limit:
                raise UserInputError(f"a continuation of {len(continuation)} tokens is longer than max_seq_len={limit}")
            # The last max_seq_len + 1 tokens: inputs are all but the last, targets all but the first. Longer
            # contexts lose their oldest tokens, as in lm-eval's HF adapter.
            windows.append((context + continuation)[-(limit + 1) :])
        # Longest first (ties by content, for a deterministic order): each batch is as long as its first row,
        # and an out-of-memory error shows on the first batch rather than the last.
        order = sorted(range(len(requests)), key=lambda i: (-len(windows[i]), windows[i]))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="lit_iiet loglikelihood")
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            width = len(windows[rows[0]]) - 1
            # Right padding: a causal model's logits at real positions never see the padding after them.
            batch = torch.full((len(rows), width), self.tokenizer.pad_id, dtype=torch.long)
            for r, i in enumerate(rows):
                batch[r, : len(windows[i]) - 1] = torch.tensor(windows[i][:-1])
            log_probs = self.log_probs(batch)
            for r, i in enumerate(rows):
                key, _, continuation = requests[i]
                if continuation:
                    end = len(windows[i]) - 1
                    scores = log_probs[r, end - len(continuation) : end]
                    targets = torch.tensor(continuation, device=scores.device)
                    logprob = float(scores.gather(-1, targets[:, None]).sum())
                    results[i] = (logprob, bool((scores.argmax(-1) == targets).all()))
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, results[i])
            progress.update(len(rows))
        progress.close()
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text after <eos>, in disjoint windows of up to max_seq_len tokens."""
        windows, owners = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            ids = self.tok_encode(text)
            pairs = get_rolling_token_windows(ids, self.prefix_token_id, self.max_length, context_len=1)
            for context, continuation in map(make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owners.append(n)
        totals = [0.0] * len(requests)
        # All windows of all texts in one call, so that they are sorted and batched together.
        for n, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[n] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Continue each context until a stop string, <eos> or max_gen_toks; the text before the stop string."""
        prompts, decodings = [], []
        for context, gen_kwargs in (req.args for req in requests):
            decoding = self.decoding(gen_kwargs)
            room = self.max_length - decoding.max_new_tokens
            prompts.append((self.tok_encode(context) or [self.prefix_token_id])[-room:])  # the newest tokens fit
            decodings.append(decoding)
        # `generate` continues every row of a batch from the same position, and the model takes no padding
        # mask: batch only prompts of equal length (and equal settings), longest first.
        groups: dict[tuple[Decoding, int], list[int]] = {}
        for i in sorted(range(len(requests)), key=lambda i: -len(prompts[i])):
            groups.setdefault((decodings[i], len(prompts[i])), []).append(i)
        results = [""] * len(requests)
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="lit_iiet generate_until")
        for (decoding, _), members in groups.items():
            for start in range(0, len(members), self.batch_size):
                rows = members[start : start + self.batch_size]
                texts = self.continue_prompts(torch.tensor([prompts[i] for i in rows]), decoding)
                for i, text in zip(rows, texts):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                progress.update(len(rows))
        progress.close()
        return results

    # --- generation ----------------------------------------------------------------------------------------

    def decoding(self, gen_kwargs: dict[str, Any]) -> Decoding:
        """A task's generation_kwargs as Decoding; settings that `generate` cannot honour are refused."""
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        unknown = sorted(set(kwargs) - set(GENERATION_KWARGS))
        if unknown:
            allowed = ", ".join(GENERATION_KWARGS)
            raise UserInputError(f"generation kwargs {unknown} are not supported by lit_iiet; allowed: {allowed}")
        max_new = int(kwargs["max_gen_toks"])
        if not 1 <= max_new < self.max_length:
            raise UserInputError(f"max_gen_toks={max_new} must be at least 1 and below max_seq_len={self.max_length}")
        top_k = kwargs.get("top_k")
        return Decoding(
            until=tuple(s for s in kwargs["until"] if s),
            max_new_tokens=max_new,
            # Sampling without a temperature samples at 1.0, as transformers does; greedy is temperature 0.
            temperature=float(kwargs.get("temperature", 1.0)) if kwargs["do_sample"] else 0.0,
            top_k=int(top_k) if top_k else None,  # 0 means no top-k, as in transformers
            top_p=float(kwargs["top_p"]) if kwargs.get("top_p") is not None else None,
        )

    def continue_prompts(self, prompts: Tensor, decoding: Decoding) -> list[str]:
        """Texts generated after prompts (B, T) of equal length, each cut at <eos> or its first stop string."""
        T, end = prompts.shape[1], prompts.shape[1] + decoding.max_new_tokens
        tokens, chunk = prompts.to(self._device), FIRST_GENERATION_CHUNK
        while True:
            # A later pass re-reads the prompt and what was generated so far in one forward pass, then
            # continues; sampling draws from the same random stream as one long call would.
            tokens = generate(
                self.model,
                tokens,
                min(chunk, end - tokens.shape[1]),
                decoding.temperature,
                decoding.top_k,
                decoding.top_p,
                eos_id=self.eot_token_id,
                use_cache=True,
            )
            outputs = [self.cut(row[T:], decoding.until) for row in tokens.tolist()]
            if tokens.shape[1] >= end or all(done for _, done in outputs):
                return [text for text, _ in outputs]
            chunk *= 2

    def cut(self, ids: list[int], until: tuple[str, ...]) -> tuple[str, bool]:
        """(text of ids before the first <eos> and before the earliest stop string, whether either occurred)."""
        done = self.eot_token_id in ids
        text = self.tok_decode(ids[: ids.index(self.eot_token_id)] if done else ids)
        stops = [text.find(s) for s in until if s in text]
        return (text[: min(stops)], True) if stops else (text, done)


def _positive_int(value: int | str, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(number) != str(value).strip():
        raise UserInputError(f"{name}={value!r} must be a positive integer")
    return number


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserInputError(f"device={name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        # lm-eval's own CLI passes cuda:0 unless told otherwise; like its HF adapter, fall back to the CPU.
        log.warning("device=%r, but CUDA is not available here: using the CPU", name)
        return torch.device("cpu")
    return device


# --- command line ------------------------------------------------------------------------------------------

PROG = "python -m lit_iiet evaluate"
LM_EVAL_COMMANDS = ("run", "ls", "validate")  # lm-eval's own subcommands, which `main` hands to lm-eval's parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Score a lit_iiet LanguageModel checkpoint on lm-evaluation-harness tasks.",
        epilog=f"lm-eval's own command line, with the model 'lit_iiet' registered: {PROG} "
        f"{{{','.join(LM_EVAL_COMMANDS)}}} ..., e.g. {PROG} run --model lit_iiet --model_args checkpoint=CKPT "
        "--tasks TASKS (its options: run --help).",
    )
    parser.add_argument("--checkpoint", required=True, help="LanguageModel checkpoint (.ckpt)")
    parser.add_argument(
        "--tokenizer",
        help="the run's SentencePiece .model or tokenizer.json (default: the one the checkpoint "
        "carries; needed for checkpoints of older versions)",
    )
    parser.add_argument(
        "--tasks",
        required=True,
        nargs="+",
        help="task, group or tag names, or task YAML files (space- or comma-separated)",
    )
    parser.add_argument("--include_path", help="directory of extra task YAML files")
    parser.add_argument(
        "--no_builtin_tasks",
        action="store_true",
        help="index only --include_path, not lm-eval's ~15k built-in task configs (about 10 s)",
    )
    parser.add_argument("--num_fewshot", type=int, help="few-shot examples per prompt (default: each task's own)")
    parser.add_argument("--limit", type=float, help="at most this many documents per task (or a fraction below 1)")
    parser.add_argument("--batch_size", default="1", help="sequences per forward pass")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--max_gen_toks", default="256", help="tokens to generate when a task sets no max_gen_toks")
    parser.add_argument("--output", help="write the results as JSON to this new file (never overwrites one)")
    parser.add_argument(
        "--log_samples", action="store_true", help="also put every document's requests and responses into --output"
    )
    return parser.parse_args(argv)


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Run lm-eval on the arguments of `parse_args`, print its tables and write --output; returns the results."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable, make_table

    output = Path(args.output) if args.output else None
    if output is not None and output.exists():
        raise UserInputError(f"output {str(output)!r} already exists; give a new path")
    if args.limit is not None and args.limit <= 0:
        raise UserInputError(f"limit={args.limit:g} must be positive")
    limit = int(args.limit) if args.limit is not None and args.limit.is_integer() else args.limit
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise UserInputError(f"include_path {args.include_path!r} is not a directory")
    lm = LitIIETLM(
        checkpoint=args.checkpoint,
        tokenizer=args.tokenizer,
        batch_size=args.batch_size,
        device=args.device,
        max_gen_toks=args.max_gen_toks,
    )
    task_manager = TaskManager(include_path=args.include_path, include_defaults=not args.no_builtin_tasks)
    tasks = [name for item in args.tasks for name in item.split(",") if name]
    for name in tasks:
        if name not in task_manager.all_tasks and not (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
            close = difflib.get_close_matches(name, task_manager.all_tasks, n=3)
            hint = (
                f" (did you mean {', '.join(close)}?)"
                if close
                else " (`lm-eval ls tasks` lists them; add --include_path for your own)"
            )
            raise UserInputError(f"unknown task {name!r}{hint}")
    results = simple_evaluate(
        model=lm,
        model_args={"checkpoint": args.checkpoint, "tokenizer": str(lm.tokenizer.path)},  # recorded in the results only
        tasks=tasks,
        num_fewshot=args.num_fewshot,
        batch_size=lm.batch_size,
        device=str(lm.device),
        limit=limit,
        log_samples=args.log_samples,
        task_manager=task_manager,
    )
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        with output.open("x", encoding="utf-8") as f:  # "x": never overwrite, even a file made meanwhile
            json.dump(results, f, indent=2, default=handle_non_serializable, ensure_ascii=False)
        print(f"results written to {output}")
    return results


def main(argv: list[str] | None = None) -> None:
    """`python -m lit_iiet evaluate` (`python -m lit_iiet.eval_harness` is an alias); bad input ends with one line
    and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in LM_EVAL_COMMANDS:
        lm_eval_command_line(argv)
        return
    args = parse_args(argv)
    with exit_on_user_error():
        evaluate(args)


def lm_eval_command_line(argv: list[str]) -> None:
    """lm-eval's own command line, in this process, where importing this module registered "lit_iiet"."""
    from lm_eval.__main__ import cli_evaluate

    saved, sys.argv = sys.argv, ["lm-eval", *argv]  # lm-eval's parser reads sys.argv
    try:
        with exit_on_user_error():
            cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
