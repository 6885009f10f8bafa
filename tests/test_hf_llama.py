"""Hugging Face Llama import / export against the real `transformers` implementation."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY

from lit_iiet.cli import main
from lit_iiet.errors import UserInputError
from lit_iiet.hf_llama import export_llama, import_llama
from lit_iiet.models import LanguageModel
from lit_iiet.nn.generate import generate
from lit_iiet.nn.ode import ODEConfig

transformers = pytest.importorskip("transformers")


def save_llama(path, tie=False, vocab=512, **overrides):
    """A small randomly initialised Llama (GQA, a non-default RoPE base) saved with save_pretrained."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=500.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        **overrides,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norms too, so that a swapped norm weight cannot go unnoticed
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return model


def hf_logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("ode", [ODEConfig("euler"), ODEConfig("iiet", 1)], ids=["euler", "iiet_r1"])
def test_import_reproduces_llama_logits(tmp_path, tie, ode):
    llama = save_llama(tmp_path / "hf", tie=tie)
    ckpt = import_llama(tmp_path / "hf", tmp_path / "ours", ode)
    ours = LanguageModel.load_from_checkpoint(ckpt, map_location="cpu").eval()
    x = torch.randint(0, 512, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(ours.model(x), hf_logits(llama, x), atol=1e-4, rtol=0)
    # the original model's greedy continuation, decoded through our cache
    prompt = x[:1, :8]
    greedy = llama.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert torch.equal(generate(ours.model, prompt, 12, temperature=0.0), greedy)


def test_import_into_iiet_starts_from_the_pretrained_branch(tmp_path):
    """r = 3 reuses the same weights: its first iterate is the Llama layer, so only later iterations differ."""
    llama = save_llama(tmp_path / "hf")
    ckpt = import_llama(tmp_path / "hf", tmp_path / "iiet", ODEConfig("iiet", [3, 2]))
    ours = LanguageModel.load_from_checkpoint(ckpt, map_location="cpu").eval()
    assert ours.model.schedule == [3, 2]
    x = torch.randint(0, 512, (1, 24))
    with torch.no_grad():
        assert not torch.allclose(ours.model(x), hf_logits(llama, x), atol=1e-3)
        ours.model.update.set_schedule([1, 1])
        torch.testing.assert_close(ours.model(x), hf_logits(llama, x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_export_round_trip(tmp_path, tie):
    save_llama(tmp_path / "hf", tie=tie)
    ckpt = import_llama(tmp_path / "hf", tmp_path / "ours", ODEConfig("euler"))
    export_llama(ckpt, tmp_path / "exported")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "exported").eval()
    ours = LanguageModel.load_from_checkpoint(ckpt, map_location="cpu").eval()
    x = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(reloaded, x), ours.model(x), atol=1e-4, rtol=0)
    again = import_llama(tmp_path / "exported", tmp_path / "again", ODEConfig("euler"))
    first, second = (torch.load(p, weights_only=True)["state_dict"] for p in (ckpt, again))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_export_folds_the_embedding_scale_into_the_llama_embedding(tmp_path):
    """Llama does not scale its embeddings: an untied model with embed_scale s exports exactly as s W; a tied one
    cannot, and is refused before anything is written."""
    save_llama(tmp_path / "hf")
    ckpt = import_llama(tmp_path / "hf", tmp_path / "ours", ODEConfig("euler"))
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["hyper_parameters"]["arch"]["embed_scale"] = 8.0
    torch.save(checkpoint, tmp_path / "scaled.ckpt")
    export_llama(tmp_path / "scaled.ckpt", tmp_path / "exported")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "exported").eval()
    ours = LanguageModel.load_from_checkpoint(tmp_path / "scaled.ckpt", map_location="cpu").eval()
    assert ours.model.cfg.embed_scale == 8.0
    x = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(reloaded, x), ours.model(x), atol=1e-4, rtol=0)
    checkpoint["hyper_parameters"]["arch"]["tie_embeddings"] = True
    del checkpoint["state_dict"]["model.lm_head.weight"]
    torch.save(checkpoint, tmp_path / "tied.ckpt")
    with pytest.raises(UserInputError, match="embed_scale=8.0 with tied embeddings has no Llama equivalent"):
        export_llama(tmp_path / "tied.ckpt", tmp_path / "tied_out")
    assert not (tmp_path / "tied_out").exists()


def test_export_refuses_schemes_without_a_llama_equivalent_and_existing_output(tmp_path):
    save_llama(tmp_path / "hf")
    ckpt = import_llama(tmp_path / "hf", tmp_path / "iiet", ODEConfig("iiet", 2))
    with pytest.raises(UserInputError, match="scheme='iiet' iters=2 has no Llama equivalent"):
        export_llama(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    before = hashlib.sha256((tmp_path / "hf" / "model.safetensors").read_bytes()).hexdigest()
    euler = import_llama(tmp_path / "hf", tmp_path / "euler", ODEConfig("euler"))
    with pytest.raises(UserInputError, match="already exists"):
        export_llama(euler, tmp_path / "hf")
    assert hashlib.sha256((tmp_path / "hf" / "model.safetensors").read_bytes()).hexdigest() == before
    with pytest.raises(UserInputError, match="already exists"):
        import_llama(tmp_path / "hf", tmp_path / "euler", ODEConfig("euler"))


def test_import_refuses_what_transformer_pp_cannot_express(tmp_path):
    save_llama(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key, value, message in [
        ("rope_parameters", {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0}, "rope_type='llama3'"),
        ("attention_bias", True, "attention_bias=True"),
        ("hidden_act", "gelu", "hidden_act='gelu'"),
    ]:
        (tmp_path / "hf" / "config.json").write_text(json.dumps(config | {key: value}))
        with pytest.raises(UserInputError, match=message):
            import_llama(tmp_path / "hf", tmp_path / f"out_{key}", ODEConfig("euler"))
    with pytest.raises(UserInputError, match="no config.json"):
        import_llama(tmp_path, tmp_path / "out", ODEConfig("euler"))


@pytest.mark.slow
def test_commands_import_then_up_train_into_iiet(tmp_path):
    """The documented commands: import a Llama into IIET, then fit from it with the emitted model.yaml."""
    save_llama(tmp_path / "hf")
    cmd = [
        sys.executable,
        "-m",
        "lit_iiet.hf_llama",
        "import",
        str(tmp_path / "hf"),
        str(tmp_path / "iiet"),
        "--scheme",
        "iiet",
        "--iters",
        "2",
        "--max_seq_len",
        "64",
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and again.stderr.startswith("lit_iiet: error: output"), again.stderr
    fit = [
        "fit",
        *TINY,
        "--config",
        str(tmp_path / "iiet" / "model.yaml"),
        "--trainer.max_steps",
        "2",
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
    ]
    main(fit)
    trained = LanguageModel.load_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu")
    assert trained.model.schedule == [2, 2] and trained.model.cfg.d_model == 64
    imported = torch.load(tmp_path / "iiet" / "model.ckpt", weights_only=True)["state_dict"]
    moved = [k for k, v in trained.state_dict().items() if not torch.equal(v, imported[k])]
    assert moved, "two optimizer steps from the imported weights should move them"
