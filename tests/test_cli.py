"""`python -m lit_iiet ...`: every shipped config parses, and fit / validate / test / predict / resume work."""

import hashlib
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, TINY

from lit_iiet.analysis.logs import read_scalars, read_texts
from lit_iiet.average_checkpoints import main as average_main
from lit_iiet.checkpoint import TOKENIZER_KEY
from lit_iiet.cli import build_cli, main
from lit_iiet.errors import UserInputError
from lit_iiet.models import LanguageModel, Seq2SeqModel

BASES = sorted(p for group in ("lm", "mt", "sum") for p in (ROOT / "conf" / group).glob("*.yaml"))
SCHEMES = sorted((ROOT / "conf" / "scheme").glob("*.yaml"))
ENCODERS = sorted((ROOT / "conf" / "encoder").glob("*.yaml"))
LM_SIZES = sorted(p for p in (ROOT / "conf" / "size").glob("*.yaml") if not p.stem.startswith("transformer"))
RECIPES = sorted((ROOT / "conf" / "recipe").glob("*.yaml"))
# Every shipped config file, parsed as it is used: a base alone, an overlay on the base it is written for.
CONFIGS = (
    [(base,) for base in BASES]
    + [(ROOT / "conf/lm/shakespeare.yaml", overlay) for overlay in SCHEMES + RECIPES]
    + [(ROOT / "conf/lm/slimpajama.yaml", size) for size in LM_SIZES]
    + [(ROOT / "conf/lm/slimpajama.yaml", LM_SIZES[0], ROOT / "conf/scheme/euler.yaml")]
    + [(ROOT / "conf/mt/bible_fr_en.yaml", ENCODERS[0])]
    + [(ROOT / "conf/mt/wmt14_en_de.yaml", overlay) for overlay in ENCODERS + [ROOT / "conf/size/transformer_big.yaml"]]
)
TRAINER_PRESETS = sorted((ROOT / "conf" / "trainer").glob("*.yaml"))


def print_config(capsys, *args) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("paths", CONFIGS, ids=lambda paths: "+".join(f"{p.parent.name}/{p.stem}" for p in paths))
def test_config_parses_and_builds(paths, capsys):
    """Each config validates through the CLI, and its model builds (on the meta device: no memory, no time)."""
    config = print_config(capsys, *(arg for path in paths for arg in ("--config", str(path.relative_to(ROOT)))))
    module, _, name = config["model"]["class_path"].rpartition(".")
    with torch.device("meta"):
        model = getattr(importlib.import_module(module), name)(**config["model"]["init_args"])
    n_params = sum(p.numel() for p in model.parameters())
    names = [p.stem for p in paths]
    expected = {  # parameters, by the last file that sets the shape
        "slimpajama": (3.0e8, 4.0e8),  # conf/size/340m.yaml is the base's own shape
        "340m": (3.0e8, 4.0e8),
        "740m": (7.0e8, 8.0e8),
        "1.3b": (1.25e9, 1.4e9),
        "wmt14_en_de": (5.5e7, 7.5e7),  # Transformer-base, whatever the encoder's scheme
        "transformer_big": (2.0e8, 2.6e8),
    }
    shape = next((name for name in reversed(names) if name in expected), None)
    if shape is not None:
        low, high = expected[shape]
        assert low < n_params < high, (shape, n_params)


@pytest.mark.parametrize("group, key", [("scheme", "ode"), ("encoder", "enc_ode"), ("size", "arch")])
def test_overlays_change_one_thing(group, key):
    """A scheme overlay sets only model.ode (an encoder overlay model.enc_ode), a size overlay only model.arch, so that runs on one base compare
    schemes (or sizes) and nothing else."""
    for path in sorted((ROOT / "conf" / group).glob("*.yaml")):
        overlay = yaml.safe_load(path.read_text())
        assert list(overlay) == ["model"] and list(overlay["model"]) == ["init_args"], path
        assert list(overlay["model"]["init_args"]) == [key], path


def test_values_derived_in_a_config_follow_an_override(capsys):
    """conf/lm/shakespeare.yaml writes the vocabulary once: data.vocab_size is ${...model.init_args.arch.vocab_size},
    resolved after every config and the command line, so overriding the model's follows through; giving the data's
    own value still wins."""
    base = ["--config", "conf/lm/shakespeare.yaml"]
    config = print_config(capsys, *base, "--model.arch.vocab_size", "3000")
    assert config["model"]["init_args"]["arch"]["vocab_size"] == config["data"]["init_args"]["vocab_size"] == 3000
    config = print_config(capsys, *base, "--model.arch.vocab_size", "3000", "--data.vocab_size", "1000")
    assert (config["model"]["init_args"]["arch"]["vocab_size"], config["data"]["init_args"]["vocab_size"]) == (
        3000,
        1000,
    )
    bible = print_config(capsys, "--config", "conf/mt/bible_fr_en.yaml", "--model.arch.max_src_len", "64")
    assert bible["data"]["init_args"]["max_src_len"] == 64 and bible["data"]["init_args"]["vocab_size"] == 4000


def test_run_folder_is_named_after_the_config_files(tmp_path):
    """Without a trainer.default_root_dir, a run writes to runs/<config names> (trainer presets left out), and its
    checkpoints go there too; one that a config sets wins."""

    def folders(*args: str) -> tuple[str, str]:
        cli = build_cli(
            run=False,
            args=[*args, "--trainer.logger", "false"],
        )
        return cli.trainer.default_root_dir, cli.trainer.checkpoint_callback.dirpath

    base, euler, cpu = "conf/lm/shakespeare.yaml", "conf/scheme/euler.yaml", "conf/trainer/cpu.yaml"
    root, checkpoints = folders("--config", base, "--config", euler, "--config", cpu)
    assert root == "runs/shakespeare_euler" and checkpoints == str(ROOT / "runs/shakespeare_euler/checkpoints")
    assert folders("--config", base)[0] == "runs/shakespeare"
    assert folders("--config", base, "--trainer.default_root_dir", str(tmp_path))[0] == str(tmp_path)


@pytest.mark.parametrize("path", TRAINER_PRESETS, ids=lambda p: p.name)
def test_trainer_preset_parses(path, capsys):
    config = print_config(capsys, "--config", "conf/lm/shakespeare.yaml", "--config", str(path.relative_to(ROOT)))
    preset = yaml.safe_load(path.read_text())["trainer"]
    for key, value in preset.items():
        if key != "strategy":
            assert config["trainer"][key] == value


def test_fsdp_preset_wraps_each_block():
    """The FSDP preset's wrap policy resolves to the Block class (the strategy object builds without a GPU)."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy

    from lit_iiet.nn.decoder import Block

    parser = ArgumentParser()
    parser.add_argument("--strategy", type=FSDPStrategy)
    preset = yaml.safe_load((ROOT / "conf/trainer/fsdp.yaml").read_text())["trainer"]
    strategy = parser.instantiate_classes(parser.parse_object({"strategy": preset["strategy"]})).strategy
    assert isinstance(strategy, FSDPStrategy)
    assert Block in strategy.kwargs["auto_wrap_policy"]._module_classes


def test_help_shows_docstrings(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "lit_iiet.models.LanguageModel"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--model.ode.scheme" in out and "iiet and looped: iterations per layer" in out


def test_help_lists_the_choices_of_every_enumerated_option(capsys):
    """Literal-typed options: jsonargparse lists their values, and the IIET options form their own group."""
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "lit_iiet.models.LanguageModel"])
    out = capsys.readouterr().out
    for usage in (
        "--model.ode.scheme {euler,iiet,looped,rk2,rk2_gated,rk4,pcformer}",
        "--model.ode.iiet.solver {picard,anderson}",
        "--model.ode.iiet.policy {fixed,residual,router}",
        "--model.ode.iiet.kv_mode {exact,shared}",
        "--model.activation_checkpointing {none,layer,iteration}",
    ):
        assert usage in out, usage


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real `python -m lit_iiet fit` of 6 steps (a separate process, exactly as a user runs it)."""
    run_dir = tmp_path_factory.mktemp("run")
    cmd = [
        sys.executable,
        "-m",
        "lit_iiet",
        "fit",
        *TINY,
        "--trainer.max_steps",
        "6",
        "--model.val_sample_prompt",
        "ROMEO:",
        "--trainer.default_root_dir",
        str(run_dir),
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_fit_writes_checkpoints_and_tensorboard_logs(trained_run):
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    assert list((trained_run / "checkpoints").glob("best-step=*.ckpt"))
    assert (trained_run / "lightning_logs" / "version_0" / "config.yaml").is_file()
    scalars = read_scalars(trained_run)
    for tag in (
        "train/loss",
        "train/lr",
        "val/loss",
        "val/ppl",
        "perf/tokens_per_sec",
        "perf/step_time",
        "perf/flops_per_sec",
        "iiet/evals_per_token",
    ):
        assert tag in scalars, tag
    assert [step for step, _ in scalars["val/loss"]] == [2, 5]  # validated after steps 3 and 6
    val = [v for _, v in scalars["val/loss"]]
    assert val[-1] < val[0] < 7.0  # learning, from about ln(512) = 6.2
    assert abs(scalars["val/ppl"][-1][1] - torch.tensor(val[-1]).exp().item()) < 1e-3 * scalars["val/ppl"][-1][1]
    assert scalars["iiet/evals_per_token"][-1][1] == 3.0
    # Convergence of every layer's fixed-point iteration (TINY: 2 layers, r = 3), at each validation.
    for layer in (0, 1):
        increments = [scalars[f"iiet/increment/{layer}/{k}"] for k in (1, 2, 3)]
        assert all([s for s, _ in inc] == [2, 5] and all(v > 0 for _, v in inc) for inc in increments)
        assert 0 < scalars[f"iiet/contraction/{layer}"][-1][1] < 10
    samples = read_texts(trained_run, "val/sample")
    assert samples and all("ROMEO:" in s for s in samples)


def test_checkpoint_carries_config_and_loads_weights_only(trained_run):
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6
    assert ckpt["hyper_parameters"]["ode"] == {**ckpt["hyper_parameters"]["ode"], "scheme": "iiet", "iters": 3}
    model = LanguageModel.load_from_checkpoint(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert model.model.schedule == [3, 3]
    for key, value in ckpt["state_dict"].items():
        assert torch.equal(model.state_dict()[key], value)


def test_validate_test_and_predict_from_checkpoint(trained_run, capsys):
    ckpt = str(trained_run / "checkpoints" / "last.ckpt")
    common = [*TINY, "--trainer.default_root_dir", str(trained_run), "--ckpt_path", ckpt]
    main(["validate", *common])
    main(["test", *common])
    out = capsys.readouterr().out
    assert "val/loss" in out and "test/loss" in out
    main(["predict", *common, "--data.prompts", '["ROMEO:", "JULIET:"]'])
    out = capsys.readouterr().out
    texts = (trained_run / "predictions.txt").read_text()
    assert texts.startswith("ROMEO:") and "\n\nJULIET:" in texts
    assert "ROMEO:" in out


def test_resume_reaches_the_same_step_and_loss(tmp_path):
    """fit 4 steps, then `--ckpt_path last` to 8, equals 8 uninterrupted steps (weights and logged losses)."""
    common = [*TINY, "--model.ode.iters", "2", "--trainer.val_check_interval", "4", "--model.optim.total_steps", "8"]
    main(["fit", *common, "--trainer.max_steps", "8", "--trainer.default_root_dir", str(tmp_path / "straight")])
    main(["fit", *common, "--trainer.max_steps", "4", "--trainer.default_root_dir", str(tmp_path / "resumed")])
    main(
        [
            "fit",
            *common,
            "--trainer.max_steps",
            "8",
            "--trainer.default_root_dir",
            str(tmp_path / "resumed"),
            "--ckpt_path",
            "last",
        ]
    )
    straight = torch.load(tmp_path / "straight/checkpoints/last.ckpt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed/checkpoints/last.ckpt", weights_only=True)
    assert straight["global_step"] == resumed["global_step"] == 8
    for key, value in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, atol=1e-6, rtol=0)
    loss = lambda run: dict(read_scalars(tmp_path / run)["train/loss"])  # noqa: E731
    assert set(loss("resumed")) == set(loss("straight"))
    for step, value in loss("straight").items():
        assert abs(loss("resumed")[step] - value) < 1e-5


def test_vanilla_checkpoint_loads_into_iiet(tmp_path):
    """Two-stage training and IIAD rely on it: euler weights in an IIET model; at r = 1 the logits are identical."""
    main(
        [
            "fit",
            *TINY,
            "--model.ode.scheme",
            "euler",
            "--model.ode.iters",
            "1",
            "--trainer.max_steps",
            "3",
            "--trainer.default_root_dir",
            str(tmp_path / "euler"),
        ]
    )
    ckpt = tmp_path / "euler" / "checkpoints" / "last.ckpt"
    vanilla = LanguageModel.load_from_checkpoint(ckpt).eval()
    iiet1 = LanguageModel.load_from_checkpoint(ckpt, ode={"scheme": "iiet", "iters": 1}).eval()
    iiet3 = LanguageModel.load_from_checkpoint(ckpt, ode={"scheme": "iiet", "iters": [3, 2]}).eval()
    idx = torch.randint(0, 512, (2, 16))
    assert torch.equal(iiet1(idx), vanilla(idx))
    assert iiet3.model.schedule == [3, 2] and not torch.allclose(iiet3(idx), vanilla(idx))
    # The same through the CLI: init_from loads the weights and IIET training starts from them.
    main(
        [
            "fit",
            *TINY,
            "--model.init_from",
            str(ckpt),
            "--trainer.max_steps",
            "2",
            "--trainer.default_root_dir",
            str(tmp_path / "iiet"),
        ]
    )
    assert (
        torch.load(tmp_path / "iiet/checkpoints/last.ckpt", weights_only=True)["hyper_parameters"]["ode"]["iters"] == 3
    )
    # A learned relaxation is not in the vanilla weights: it starts at iiet.damping (1.0), as from scratch.
    main(
        [
            "fit",
            *TINY,
            "--model.init_from",
            str(ckpt),
            "--model.ode.iiet.relaxation",
            "learned",
            "--trainer.max_steps",
            "1",
            "--trainer.default_root_dir",
            str(tmp_path / "relaxed"),
        ]
    )
    assert (
        "model.update.relaxation"
        in torch.load(tmp_path / "relaxed/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    )


def snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*.ckpt"))
    }


def write_bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {
        "empty": tmp_path / "empty.txt",
        "latin1": tmp_path / "latin1.txt",
        "truncated": tmp_path / "truncated.ckpt",
    }
    files["empty"].write_text("")
    files["latin1"].write_bytes("Café au lait, naïve façade.\n".encode("latin-1"))
    return files


BAD_INPUTS = {
    "unknown scheme": (
        ["--model.ode.scheme", "implicit"],
        """model: Parser key "ode.scheme": Expected a typing.Literal['euler', 'iiet',""",
    ),
    "r below 1": (["--model.ode.iters", "0"], "iters=0: every iteration count must be an integer >= 1"),
    "negative lr": (["--model.optim.lr", "-1"], "model.optim.lr=-1.0: must be a number > 0"),
    "beta of 1": (["--model.optim.betas", "[0.9, 1.0]"], "model.optim.betas=[0.9, 1.0]: must be two numbers in [0, 1)"),
    "schedule length": (["--model.ode.iters", "[3, 1, 2]"], "schedule [3, 1, 2] has 3 entries; the stack has 2 layers"),
    "missing data file": (
        ["--data.train", "data/shakespeare/nope.txt"],
        "train data file 'data/shakespeare/nope.txt' does not exist",
    ),
    "empty data file": (["--data.train", "{empty}"], "is empty"),
    "not UTF-8": (
        ["--data.train", "{latin1}", "--data.vocab_size", "300", "--model.arch.vocab_size", "300"],
        "is not UTF-8 text",
    ),
    "vocab too small": (
        ["--model.arch.vocab_size", "300"],
        "model.arch.vocab_size=300 is smaller than the tokenizer's vocabulary (512)",
    ),
    "sequence too long": (["--data.seq_len", "300"], "data.seq_len=300 is longer than model.arch.max_seq_len=256"),
    "truncated checkpoint": (["--ckpt_path", "{truncated}"], "is truncated or not a torch checkpoint"),
    "missing checkpoint": (["--ckpt_path", "runs/none.ckpt"], "checkpoint 'runs/none.ckpt' does not exist"),
    "other architecture": (
        ["--model.init_from", "{other}"],
        "does not fit this model's architecture: shape of model.embed.weight",
    ),
    "other embedding scale": (
        ["--model.init_from", "{last}", "--model.arch.embed_scale", "1"],
        "was trained with embed_scale=5.65685, this model has embed_scale=1; set --model.arch.embed_scale 5.65685",
    ),
    "bad embedding scale": (
        ["--model.arch.embed_scale", "-1"],
        "embed_scale=-1.0 must be a number > 0 or 'sqrt_d_model'",
    ),
    "unknown policy": (
        ["--model.ode.iiet.policy", "greedy"],
        """model: Parser key "ode.iiet.policy": Expected a typing.Literal['fixed', 'residual', 'router']. Got value: """
        "greedy (see python -m lit_iiet fit --model.help lit_iiet.models.LanguageModel)",
    ),
    "unknown option": (
        ["--model.ode.iiet_policy", "residual"],
        "model: unrecognized arguments: --ode.iiet_policy=residual (see python -m lit_iiet fit --model.help",
    ),
    "iiet option with another scheme": (
        ["--model.ode.scheme", "rk2", "--model.ode.iters", "1", "--model.ode.iiet.damping", "0.5"],
        "iiet.damping=0.5 is only used by scheme 'iiet'",
    ),
    "not a number": (
        ["--data.seq_len", "many"],
        """data: Parser key "seq_len": Expected a <class 'int'>. Got value: many (see python -m lit_iiet fit --data.help""",
    ),
    "null for a nested option": (  # jsonargparse passes it on as the string "None"; the error says what parses
        ["--model.ode.branch_scale", "null"],
        "--model.ode.branch_scale null arrives as the string 'None'; write --model.ode '{branch_scale: null}'",
    ),
    "anderson with mean": (
        ["--model.ode.iiet.solver", "anderson", "--model.ode.iiet.output", "mean"],
        "iiet.solver='anderson' mixes its own",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_short_error_and_nothing_is_overwritten(case, trained_run, tmp_path, capsys):
    files = write_bad_files(tmp_path)
    last = trained_run / "checkpoints" / "last.ckpt"
    files["truncated"].write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    files["last"] = last
    files["other"] = trained_run / "other.ckpt"
    if not files["other"].exists():  # a checkpoint of a wider model
        main(
            [
                "fit",
                *TINY,
                "--model.arch.d_model",
                "64",
                "--trainer.max_steps",
                "1",
                "--trainer.limit_val_batches",
                "0",
                "--trainer.default_root_dir",
                str(tmp_path / "wide"),
            ]
        )
        files["other"].write_bytes((tmp_path / "wide/checkpoints/last.ckpt").read_bytes())
    capsys.readouterr()
    before = snapshot(trained_run)
    args, message = BAD_INPUTS[case]
    args = [a.format(**files) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *TINY, "--trainer.max_steps", "2", "--trainer.default_root_dir", str(trained_run), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lit_iiet: error: ") and message in err[-1], err[-5:]
    assert len(err[-1]) < 300
    assert snapshot(trained_run) == before


def test_loading_a_checkpoint_into_another_architecture_fails_clearly(trained_run):
    with pytest.raises(UserInputError, match="does not fit this model's architecture"):
        LanguageModel.load_from_checkpoint(
            trained_run / "checkpoints" / "last.ckpt",
            arch={"n_layers": 3, "d_model": 32, "n_heads": 2, "vocab_size": 512},
        )


# --- --ckpt_path: the model from the checkpoint, behaviour from the command line --------------------------------


def test_ckpt_path_refuses_an_option_that_contradicts_the_model(trained_run, tmp_path, capsys):
    """The checkpoint is a d_model-32 IIET: asking for d_model 64 or another scheme is an error naming both
    values, not a run of the checkpoint's model that ignores the flag."""
    ckpt = str(trained_run / "checkpoints" / "last.ckpt")
    for flag, value, theirs in (("--model.arch.d_model", "64", "32"), ("--model.ode.scheme", "euler", "'iiet'")):
        with pytest.raises(SystemExit) as info:
            main(["validate", *TINY, flag, value, "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", ckpt])
        assert info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"{flag} " in err and "contradicts checkpoint" in err and theirs in err, err
    assert not (tmp_path / "lightning_logs").exists()


def test_ckpt_path_honours_behaviour_options(trained_run, tmp_path):
    """Options that only change behaviour are taken from the command line: an adaptive policy and threshold at
    validation (every token stops after one iteration), and the sampling temperature of predict (greedy: the
    same text whatever the seed)."""
    ckpt = str(trained_run / "checkpoints" / "last.ckpt")
    main(
        [
            "validate",
            *TINY,
            "--model.ode.iiet.policy",
            "residual",
            "--model.ode.iiet.threshold",
            "1e9",
            "--trainer.default_root_dir",
            str(tmp_path / "v"),
            "--ckpt_path",
            ckpt,
        ]
    )
    assert [v for _, v in read_scalars(tmp_path / "v")["iiet/evals_per_token"]] == [1.0]
    texts = []
    for seed in ("1", "2"):
        main(
            [
                "predict",
                *TINY,
                "--model.sampling.temperature",
                "0",
                "--seed_everything",
                seed,
                "--data.prompts",
                '["ROMEO:"]',
                "--trainer.default_root_dir",
                str(tmp_path / seed),
                "--ckpt_path",
                ckpt,
            ]
        )
        texts.append((tmp_path / seed / "predictions.txt").read_text())
    assert texts[0] == texts[1] and len(texts[0]) > len("ROMEO:")


def test_from_checkpoint_samples_what_predict_writes(trained_run, tmp_path):
    """In Python, the checkpoint alone gives the model, in eval mode, with its tokenizer: greedy sampling without a
    Trainer writes predict's text. As with --ckpt_path, runtime options replace the checkpoint's and options that
    define the model are refused; so is a checkpoint of the other model family."""
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    root = str(tmp_path)
    greedy = ["--model.sampling.temperature", "0", "--data.prompts", '["ROMEO:"]', "--trainer.default_root_dir", root]
    main(["predict", *TINY, *greedy, "--ckpt_path", str(ckpt)])
    lm = LanguageModel.from_checkpoint(ckpt, sampling={"temperature": 0})
    assert not lm.training and lm.sampling.max_new_tokens == 8
    assert lm.tokenizer.model_proto == torch.load(ckpt, weights_only=True)[TOKENIZER_KEY]
    assert lm.sample("ROMEO:") + "\n\n" == (tmp_path / "predictions.txt").read_text()
    residual = LanguageModel.from_checkpoint(ckpt, **{"ode.iiet.policy": "residual", "ode.iiet.threshold": 0.5})
    assert (residual.model.ode.iiet.policy, residual.model.ode.iiet.threshold) == ("residual", 0.5)
    for options, message in [
        ({"arch": {"d_model": 64}}, "is not a runtime option of LanguageModel; allowed: sampling, val_sample_prompt"),
        ({"ode.iiet.policy": "router"}, "ode.iiet.policy='router' changes the model, not only how it runs"),
        ({"sampling": {"temprature": 0}}, "sampling: unknown setting 'temprature'; choose from max_new_tokens"),
    ]:
        with pytest.raises(UserInputError, match=re.escape(message)):
            LanguageModel.from_checkpoint(ckpt, **options)
    with pytest.raises(UserInputError, match="is a LanguageModel checkpoint, not a Seq2SeqModel one"):
        Seq2SeqModel.from_checkpoint(ckpt)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.optim.lr", "0"], "model.optim.lr=0.0: must be a number > 0"),
        (
            ["--model.enc_ode.iiet.policy", "router"],
            "model.enc_ode: iiet.policy='router' and iiet.kv_mode='exact' are not supported",
        ),
        (
            ["--model.enc_ode.iiet.kv_mode", "shared"],
            "model.enc_ode: iiet.policy='fixed' and iiet.kv_mode='shared' are not supported",
        ),
    ],
)
def test_encoder_decoder_refuses_what_it_does_not_support(args, message, capsys):
    """The translation model checks its optimizer options, and refuses per-token policies and the shared KV
    cache, which only the language model implements (before, they were accepted and silently not honoured)."""
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", "conf/mt/bible_fr_en.yaml", *args, "--trainer.max_steps", "1"])
    assert info.value.code == 2 and message in capsys.readouterr().err


# --- one command: python -m lit_iiet COMMAND (the lit-iiet script) ---------------------------------------------

COMMANDS = ["fit", "validate", "test", "predict", "prepare", "average", "convert", "evaluate"]
TOOL_OPTIONS = {
    "prepare": ["--train", "--tokenizer", "--max_tokens", "--workers"],
    "average": ["inputs", "--last", "--output"],
    "convert": ["import", "export"],
    "evaluate": ["--checkpoint", "--tasks", "--include_path", "--output"],
}


def test_help_lists_every_command():
    result = subprocess.run(
        [sys.executable, "-m", "lit_iiet", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.findall(r"^  (\w+) ", result.stdout, re.MULTILINE) == COMMANDS, result.stdout


@pytest.mark.parametrize("command", list(TOOL_OPTIONS))
def test_each_tool_command_shows_its_options(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert info.value.code in (0, None) and f"usage: python -m lit_iiet {command}" in out, out
    assert all(option in out for option in TOOL_OPTIONS[command]), out


@pytest.mark.parametrize(
    "args, options", [(["convert", "import"], ["--scheme", "--iters"]), (["evaluate", "run"], ["--model_args"])]
)
def test_convert_and_evaluate_keep_their_own_subcommands(args, options, capsys):
    """convert's import / export, and lm-eval's own command line (run, ls, validate) under evaluate."""
    with pytest.raises(SystemExit) as info:
        main([*args, "--help"])
    out = capsys.readouterr().out
    assert info.value.code in (0, None) and all(option in out for option in options), out


def test_an_unknown_command_is_one_line_naming_the_commands(capsys):
    for args, what in ((["averge", "a.ckpt"], "unknown command 'averge'"), ([], "no command given")):
        with pytest.raises(SystemExit) as info:
            main(args)
        err = capsys.readouterr().err.strip()
        assert info.value.code == 2
        assert err == f"lit_iiet: error: {what}; choose one of {', '.join(COMMANDS)} (see python -m lit_iiet --help)"


def test_average_command_writes_what_the_old_entry_point_writes(trained_run, tmp_path):
    """`python -m lit_iiet average` as a user runs it (a separate process) and the main of the old
    `python -m lit_iiet.average_checkpoints`, on the same two checkpoints."""
    last = trained_run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    tripled = {k: v * 3 if v.is_floating_point() else v for k, v in checkpoint["state_dict"].items()}
    torch.save({**checkpoint, "state_dict": tripled, "global_step": 7}, tmp_path / "tripled.ckpt")
    inputs = [str(last), str(tmp_path / "tripled.ckpt")]
    cmd = [sys.executable, "-m", "lit_iiet", "average", *inputs, "--output", str(tmp_path / "new.ckpt")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    average_main([*inputs, "--output", str(tmp_path / "old.ckpt")])
    new, old = (torch.load(tmp_path / f"{name}.ckpt", weights_only=True) for name in ("new", "old"))
    assert new.keys() == old.keys() and new["averaged_from"] == inputs and new["global_step"] == 7
    assert all(torch.equal(value, old["state_dict"][key]) for key, value in new["state_dict"].items())
    embed = checkpoint["state_dict"]["model.embed.weight"]
    torch.testing.assert_close(new["state_dict"]["model.embed.weight"], 2 * embed)  # (w + 3 w) / 2
