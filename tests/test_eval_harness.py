"""lm-evaluation-harness adapter: its scores are our own forward's, batching keeps the order, lm-eval runs it
end to end on the local tasks in tests/assets/lm_eval_task (offline), and the command line fails in one line."""

import gzip
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import datasets
import lightning as L
import lm_eval
import pytest
import torch
from conftest import ROOT
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model, model_registry
from lm_eval.tasks import TaskManager

from lit_iiet.checkpoint import TOKENIZER_KEY
from lit_iiet.data import LMDataModule, Tokenizer
from lit_iiet.data.lm import encode_document
from lit_iiet.errors import UserInputError
from lit_iiet.eval_harness import LitIIETLM, main
from lit_iiet.models import LanguageModel
from lit_iiet.models.lm import OptimConfig
from lit_iiet.nn.decoder import DecoderConfig
from lit_iiet.nn.generate import generate
from lit_iiet.nn.ode import ODEConfig

MAX_LEN = 64
TASKS = "tests/assets/lm_eval_task"  # relative to the repository root, where every test runs
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
PAIRS = [  # (context, continuation); contexts end without whitespace (lm-eval moves it into the continuation)
    ("ROMEO:\nBut, soft! what light through yonder window", " breaks?"),
    ("", "JULIET:\nO Romeo, Romeo!"),
    ("KING HENRY:", "\nOnce more unto the breach, dear friends, once more;"),
    ("Now is the winter of our", " discontent"),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The model is tiny: one thread is as fast, and it does not stall when other jobs share the two cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> SimpleNamespace:
    """A real (tiny) training run: a BPE tokenizer on 800 lines of the shipped corpus, 20 steps of IIET r=2."""
    tmp = tmp_path_factory.mktemp("eval_harness")
    with gzip.open(ROOT / "data/shakespeare/valid.txt.gz", "rt", encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)[:800]
    tokenizer = Tokenizer.train(iter([line for line in lines if line.strip()]), tmp / "tok.model", vocab_size=320)
    (tmp / "train.txt").write_text("".join(lines))
    L.seed_everything(0)
    module = LanguageModel(
        arch=DecoderConfig(vocab_size=320, n_layers=2, d_model=32, n_heads=2, max_seq_len=MAX_LEN),
        ode=ODEConfig(scheme="iiet", iters=2),
        optim=OptimConfig(lr=2e-2, warmup_steps=2),
    )
    data = LMDataModule(
        train=str(tmp / "train.txt"),
        val=None,
        test=None,
        tokenizer=str(tokenizer.path),
        seq_len=32,
        batch_size=8,
        cache_dir=str(tmp / "cache"),
    )
    trainer = L.Trainer(
        max_steps=20,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp,
    )
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp / "tiny.ckpt")
    return SimpleNamespace(tmp=tmp, checkpoint=tmp / "tiny.ckpt", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def decoder(run):
    """The checkpoint's Decoder, loaded the documented way (independently of the adapter's loader)."""
    return LanguageModel.load_from_checkpoint(run.checkpoint, map_location="cpu").model.eval()


@pytest.fixture(scope="module")
def lm(run) -> LitIIETLM:
    return LitIIETLM(checkpoint=str(run.checkpoint), tokenizer=str(run.tokenizer.path), batch_size=4, device="cpu")


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """No hub access, and the `datasets` cache under tmp_path instead of ~/.cache/huggingface."""
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids as training encodes text (without the document's closing <eos>)."""
    return encode_document(tokenizer, text)[:-1]


def reference(decoder, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """Summed log-probability of the continuation after the context, from one unpadded forward of the newest
    max_seq_len + 1 tokens, and whether every continuation token is the argmax."""
    tokens = (context + continuation)[-(decoder.cfg.max_seq_len + 1) :]
    with torch.no_grad():
        log_probs = decoder(torch.tensor([tokens[:-1]]))[0].float().log_softmax(-1)[-len(continuation) :]
    target = torch.tensor(continuation)
    return float(log_probs[torch.arange(len(target)), target].sum()), bool((log_probs.argmax(-1) == target).all())


def rolling_reference(decoder, tokenizer: Tokenizer, text: str) -> float:
    """Log-likelihood of text after <eos>, each token predicted once from the window of max_seq_len tokens that
    ends just before the last token of its chunk (lm-eval's disjoint rolling windows), window by window."""
    ids, limit = encode(tokenizer, text), decoder.cfg.max_seq_len
    full, total = [tokenizer.eos_id, *ids], 0.0
    for start in range(0, len(ids), limit):  # predict ids[start:end]
        end = min(start + limit, len(ids))
        window = full[max(0, end - limit) : end + 1]
        total += reference(decoder, window[: -(end - start)], window[-(end - start) :])[0]
    return total


def greedy_text(decoder, tokenizer: Tokenizer, prompt: str, max_new: int, **sampling) -> str:
    """What `generate` continues prompt with (greedy by default), up to <eos>."""
    ids = encode(tokenizer, prompt)
    sampling = {"temperature": 0.0, **sampling}
    out = generate(decoder, torch.tensor([ids]), max_new, eos_id=tokenizer.eos_id, **sampling)[0, len(ids) :].tolist()
    return tokenizer.decode(out[: out.index(tokenizer.eos_id)] if tokenizer.eos_id in out else out)


def cloze_docs() -> list[dict]:
    return [json.loads(line) for line in (ROOT / TASKS / "shakespeare_cloze.jsonl").read_text().splitlines()]


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_registered_without_hiding_lm_evals_own_models():
    assert get_model("lit_iiet") is LitIIETLM
    assert "hf" in model_registry  # lm-eval only fills in its own models when its registry is empty


def test_loglikelihood_is_our_forward(lm, decoder, run):
    """Summed continuation log-probs and is_greedy equal an unbatched forward; a context longer than
    max_seq_len is cut from the left; an empty context starts after <eos>."""
    tok = run.tokenizer
    long_context = "".join(doc["context"] + "\n" for doc in cloze_docs())
    pairs = [*PAIRS, (long_context.rstrip(), "\nThe end.")]
    got = lm.loglikelihood(requests("loglikelihood", pairs))
    for (context, continuation), (logprob, is_greedy) in zip(pairs, got, strict=True):
        ctx, cont = encode(tok, context), encode(tok, continuation)
        assert ctx + cont == encode(tok, context + continuation)  # the split is unambiguous
        want = reference(decoder, ctx or [tok.eos_id], cont)
        assert logprob == pytest.approx(want[0], abs=1e-4)
        assert is_greedy == want[1]
    assert len(encode(tok, long_context)) > 2 * MAX_LEN

    # A continuation that is the model's own greedy choice is greedy; change one token and it is not.
    ctx = encode(tok, "ROMEO:\n")
    greedy = generate(decoder, torch.tensor([ctx]), 6, temperature=0.0)[0, len(ctx) :].tolist()
    other = greedy[:3] + [(greedy[3] + 1) % tok.vocab_size] + greedy[4:]
    (lp_greedy, is_greedy), (_, is_other) = lm._loglikelihood_tokens([(None, ctx, greedy), (None, ctx, other)])
    assert is_greedy and not is_other
    assert lp_greedy == pytest.approx(reference(decoder, ctx, greedy)[0], abs=1e-4)


def test_batching_returns_results_in_request_order(lm, decoder, run):
    """Requests of many lengths (sorted and padded inside) come back in their order, equal for batch sizes 1
    and 4, and for a shuffled list."""
    pairs = [*PAIRS, *((d["context"], " " + choice) for d in cloze_docs()[:6] for choice in d["choices"][:2])]
    one = LitIIETLM(model=decoder, tokenizer=run.tokenizer, batch_size=1, device="cpu")  # the in-Python constructor
    by_one = one.loglikelihood(requests("loglikelihood", pairs))
    by_four = lm.loglikelihood(requests("loglikelihood", pairs))
    tok = run.tokenizer
    for (context, continuation), a, b in zip(pairs, by_one, by_four, strict=True):
        want = reference(decoder, encode(tok, context) or [tok.eos_id], encode(tok, continuation))
        assert a[0] == pytest.approx(want[0], abs=1e-4) and b[0] == pytest.approx(want[0], abs=1e-4)
        assert a[1] == b[1] == want[1]
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = lm.loglikelihood(requests("loglikelihood", [pairs[i] for i in order]))
    assert [s[0] for s in shuffled] == pytest.approx([by_four[i][0] for i in order], abs=1e-5)


def test_loglikelihood_rolling(lm, decoder, run):
    """One window: the text's log-likelihood after <eos>. Several windows: each token is predicted once, with
    as much context as fits (computed here window by window)."""
    tok = run.tokenizer
    short = "ROMEO:\nBut, soft! what light through yonder window breaks?\n"
    long = (ROOT / TASKS / "shakespeare_cloze.jsonl").read_text()
    ids_short, ids_long = encode(tok, short), encode(tok, long)
    assert len(ids_short) <= MAX_LEN < 3 * MAX_LEN < len(ids_long)
    got_short, got_long = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(short,), (long,)]))
    assert got_short == pytest.approx(reference(decoder, [tok.eos_id], ids_short)[0], abs=1e-4)
    assert got_long == pytest.approx(rolling_reference(decoder, tok, long), abs=1e-3)


def test_generate_until_is_generate_cut_at_the_stop_string(lm, decoder, run):
    """Greedy generate_until returns `generate(..., temperature=0)` cut before the first stop string, over two
    generation passes (16 + 8 tokens), in batches of equal-length prompts; sampling follows torch's random stream."""
    tok = run.tokenizer
    prompts = ["ROMEO:\n", "JULIET:\nO Romeo, Romeo!", "ROMEO:\n"]  # the repeated prompt shares a batch
    full = [greedy_text(decoder, tok, p, 24) for p in prompts[:2]]
    full.append(full[0])
    assert all(len(text) > 8 for text in full)
    stops = [text[len(text) // 2 : len(text) // 2 + 2] for text in full]  # strings that do occur in the output
    args = [(p, {"until": ["\x00never"], "max_gen_toks": 24, "do_sample": False}) for p in prompts]
    args += [(p, {"until": [stop, "\x00never"], "max_gen_toks": 24}) for p, stop in zip(prompts, stops)]
    got = lm.generate_until(requests("generate_until", args))
    assert got[:3] == full
    assert got[3:] == [text[: text.find(stop)] for text, stop in zip(full, stops)]

    sampling = {"until": ["\x00never"], "max_gen_toks": 24, "do_sample": True, "temperature": 0.8, "top_k": 20}
    torch.manual_seed(3)
    sampled = lm.generate_until(requests("generate_until", [(prompts[1], sampling)]))
    torch.manual_seed(3)
    assert sampled == [greedy_text(decoder, tok, prompts[1], 24, temperature=0.8, top_k=20)]


def test_simple_evaluate_on_local_tasks_scores_with_our_forward(run, decoder):
    """lm_eval.simple_evaluate with the registered name, offline, on the cloze / next-line / perplexity tasks:
    every logged loglikelihood and generation is our own, and acc follows from them."""
    tok = run.tokenizer
    results = lm_eval.simple_evaluate(
        model="lit_iiet",
        model_args=f"checkpoint={run.checkpoint},tokenizer={tok.path}",
        tasks=["shakespeare_local"],
        batch_size=4,
        device="cpu",
        task_manager=TaskManager(include_path=TASKS, include_defaults=False),
        log_samples=True,
    )
    cloze = results["samples"]["shakespeare_cloze"]
    assert len(cloze) == 16
    correct = 0
    for sample in cloze:
        scores = [logprob for logprob, _ in sample["filtered_resps"]]
        for (context, continuation), score in zip(sample["arguments"], scores, strict=True):
            want = reference(decoder, encode(tok, context), encode(tok, continuation))[0]
            assert score == pytest.approx(want, abs=1e-4)
        correct += max(range(len(scores)), key=scores.__getitem__) == sample["target"]
    assert results["results"]["shakespeare_cloze"]["acc,none"] == pytest.approx(correct / 16)

    for sample in results["samples"]["shakespeare_next_line"]:
        prompt, gen_kwargs = sample["arguments"][0]
        assert gen_kwargs["until"] == ["\n"]
        assert sample["filtered_resps"][0] == greedy_text(decoder, tok, prompt, 16).split("\n")[0]

    for sample in results["samples"]["shakespeare_perplexity"]:
        (text,) = sample["arguments"][0]
        assert sample["filtered_resps"][0] == pytest.approx(rolling_reference(decoder, tok, text), abs=1e-4)
    assert results["config"]["model_num_parameters"] == sum(p.numel() for p in decoder.parameters())


def test_command_line_runs_and_refuses_to_overwrite(run, tmp_path, capsys):
    output = tmp_path / "results.json"
    args = [
        "--checkpoint",
        str(run.checkpoint),
        "--tokenizer",
        str(run.tokenizer.path),
        "--tasks",
        "shakespeare_cloze",
        "--include_path",
        TASKS,
        "--no_builtin_tasks",
        "--limit",
        "4",
        "--batch_size",
        "3",
        "--output",
        str(output),
    ]
    main(args)
    assert "|shakespeare_cloze|" in capsys.readouterr().out.replace(" ", "")
    results = json.loads(output.read_text())
    assert results["config"]["limit"] == 4 and 0 <= results["results"]["shakespeare_cloze"]["acc,none"] <= 1
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"lit_iiet: error: output {str(output)!r} already exists; give a new path"


def test_lm_evals_own_command_line_runs_under_evaluate(run, capsys):
    """`python -m lit_iiet evaluate run ...` is lm-eval's own parser with the model "lit_iiet" registered (lm-eval's
    `lm-eval` command cannot load it); a missing checkpoint still ends with one line and exit code 2."""
    args = ["run", "--model", "lit_iiet", "--device", "cpu", "--include_path", TASKS, "--tasks", "shakespeare_cloze"]
    main([*args, "--limit", "4", "--model_args", f"checkpoint={run.checkpoint}"])
    assert "|shakespeare_cloze|" in capsys.readouterr().out.replace(" ", "")
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--model_args", "checkpoint=missing.ckpt"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1] == "lit_iiet: error: checkpoint 'missing.ckpt' does not exist"


def test_bad_input_is_one_line(run, tmp_path, capsys):
    """A tokenizer larger than the model's vocabulary or other than the checkpoint's, and an unknown task, end with
    exit code 2 and one line."""
    with gzip.open(ROOT / "data/shakespeare/valid.txt.gz", "rt", encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines()[:800] if line.strip()]
    big = Tokenizer.train(iter(lines), tmp_path / "big.model", vocab_size=400)
    # A checkpoint of an older version carries no tokenizer: only the vocabulary size can be checked.
    old = tmp_path / "old.ckpt"
    torch.save({k: v for k, v in torch.load(run.checkpoint, weights_only=True).items() if k != TOKENIZER_KEY}, old)
    base = ["--include_path", TASKS, "--no_builtin_tasks"]
    for extra, message in [
        (
            ["--checkpoint", str(old), "--tokenizer", str(big.path), "--tasks", "shakespeare_cloze"],
            f"tokenizer {str(big.path)!r} has 400 tokens, more than the model's vocab_size=320",
        ),
        (
            ["--checkpoint", str(run.checkpoint), "--tokenizer", str(big.path), "--tasks", "shakespeare_cloze"],
            f"tokenizer {str(big.path)!r} is not the tokenizer stored in checkpoint {str(run.checkpoint)!r}",
        ),
        (
            ["--checkpoint", str(run.checkpoint), "--tasks", "shakespeare_clozee"],
            "unknown task 'shakespeare_clozee' (did you mean shakespeare_cloze",
        ),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(base + extra)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"lit_iiet: error: {message}") and "\n" not in err
    for bad in [{"batch_size": "auto"}, {"device": "gpu0"}, {"pretrained": "gpt2"}]:
        with pytest.raises(UserInputError, match=next(iter(bad))):
            LitIIETLM(checkpoint=str(run.checkpoint), tokenizer=str(run.tokenizer.path), **bad)


def test_command_line_missing_checkpoint_exits_2(run, tmp_path):
    """`python -m lit_iiet.eval_harness` as a user runs it: a missing checkpoint is one line, exit code 2."""
    missing = tmp_path / "missing.ckpt"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lit_iiet.eval_harness",
            "--checkpoint",
            str(missing),
            "--tokenizer",
            str(run.tokenizer.path),
            "--tasks",
            "shakespeare_cloze",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE},
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"lit_iiet: error: checkpoint {str(missing)!r} does not exist"
    assert "Traceback" not in proc.stderr
