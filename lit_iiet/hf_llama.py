"""Hugging Face Llama checkpoints <-> our Transformer++, so a pretrained model can be up-trained into IIET.

    python -m lit_iiet convert import path/to/llama_dir runs/llama_iiet --scheme iiet --iters 3
    python -m lit_iiet fit --config conf/lm/....yaml --config runs/llama_iiet/model.yaml   # up-train
    python -m lit_iiet convert export runs/llama/checkpoints/last.ckpt path/to/exported_dir

`import` reads a local directory (config.json + model.safetensors, or sharded with model.safetensors.index.json)
and writes `model.ckpt` (loadable by `LanguageModel.load_from_checkpoint` and by `--model.init_from`) and
`model.yaml` (the matching `model:` section). The checkpoint carries the tokenizer given with --tokenizer, or else
the directory's own `tokenizer.model` (SentencePiece) or, failing that, `tokenizer.json`. Any scheme works: a Llama layer is G's
attention + SwiGLU, so with euler, or iiet at r = 1, the imported model reproduces the original logits; more
iterations or RK stages start from the pretrained branch. Scheme parameters that Llama lacks (rk2 gates, PCformer weights) keep their init.
`export` writes an euler model (or iiet with one iteration everywhere, the same function) back to that format,
with the checkpoint's tokenizer as `tokenizer.model` or `tokenizer.json`, whichever kind it is.

Weight layout: our attention fuses q, k, v into one `qkv` projection and SwiGLU fuses gate and up into `w13`;
both use the same RoPE convention as Llama (rotate the two halves of each head), so weights map without any
permutation. Tokenizers are SentencePiece `tokenizer.model` files (Llama 1/2, Mistral) or Hugging Face
`tokenizer.json` files (Llama 3, Qwen, SmolLM); up-training takes the one the imported checkpoint carries.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from lit_iiet.errors import UserInputError, exit_on_user_error
from lit_iiet.nn.decoder import DecoderConfig
from lit_iiet.nn.ode import ODEConfig


def decoder_config_from_llama(config: dict, max_seq_len: int | None = None) -> DecoderConfig:
    """Our DecoderConfig for a Llama config.json; anything our Transformer++ cannot express is refused."""
    if config.get("model_type", "llama") not in ("llama", "mistral"):
        raise UserInputError(
            f"model_type={config.get('model_type')!r} is not supported; only 'llama' (and 'mistral' without sliding window)"
        )
    for key, allowed in (
        ("hidden_act", "silu"),
        ("attention_bias", False),
        ("mlp_bias", False),
        ("sliding_window", None),
    ):
        if config.get(key, allowed) != allowed:
            raise UserInputError(f"{key}={config[key]!r} is not supported; only {allowed!r}")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise UserInputError(f"rope_type={rope_type!r} is not supported; only 'default' (plain RoPE)")
    rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    d_model, n_heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or d_model // n_heads
    if head_dim * n_heads != d_model:
        raise UserInputError(
            f"head_dim={head_dim} x num_attention_heads={n_heads} != hidden_size={d_model}; not supported"
        )
    return DecoderConfig(
        vocab_size=config["vocab_size"],
        n_layers=config["num_hidden_layers"],
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        d_ff=config["intermediate_size"],
        max_seq_len=max_seq_len or config.get("max_position_embeddings", 2048),
        rope_base=float(rope_theta),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        norm_eps=config.get("rms_norm_eps", 1e-6),
    )


def llama_config_from_decoder(cfg: DecoderConfig) -> dict:
    """config.json of the Llama equivalent of an euler Transformer++."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff or _swiglu_hidden(cfg.d_model),
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
        "head_dim": cfg.d_model // cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_base,  # transformers 4.x key
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},  # transformers 5.x key
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }


def _swiglu_hidden(d_model: int) -> int:
    from lit_iiet.nn.layers import swiglu_hidden

    return swiglu_hidden(d_model)


def from_llama_state(hf: dict[str, Tensor], cfg: DecoderConfig) -> dict[str, Tensor]:
    """Llama weights (`model.layers.0.self_attn.q_proj.weight`, ...) -> Decoder state dict keys."""
    hf = {k.removeprefix("model."): v for k, v in hf.items()}
    out = {"embed.weight": hf["embed_tokens.weight"], "norm.weight": hf["norm.weight"]}
    out["lm_head.weight"] = hf["embed_tokens.weight"] if cfg.tie_embeddings else hf["lm_head.weight"]
    for i in range(cfg.n_layers):
        p, q = f"layers.{i}.", f"blocks.{i}."
        att = [hf[f"{p}self_attn.{n}_proj.weight"] for n in ("q", "k", "v")]
        out[q + "attn.qkv.weight"] = torch.cat(att)
        out[q + "attn.proj.weight"] = hf[f"{p}self_attn.o_proj.weight"]
        out[q + "ffn.w13.weight"] = torch.cat((hf[f"{p}mlp.gate_proj.weight"], hf[f"{p}mlp.up_proj.weight"]))
        out[q + "ffn.w2.weight"] = hf[f"{p}mlp.down_proj.weight"]
        out[q + "norm1.weight"] = hf[f"{p}input_layernorm.weight"]
        out[q + "norm2.weight"] = hf[f"{p}post_attention_layernorm.weight"]
    return out


def to_llama_state(ours: dict[str, Tensor], cfg: DecoderConfig) -> dict[str, Tensor]:
    """Decoder state dict -> Llama weights; the inverse of `from_llama_state`."""
    head_dim, kv_heads = cfg.d_model // cfg.n_heads, cfg.n_kv_heads or cfg.n_heads
    if cfg.embed_scale != 1.0 and cfg.tie_embeddings:
        raise UserInputError(
            f"embed_scale={cfg.embed_scale} with tied embeddings has no Llama equivalent (Llama does not scale its embeddings)"
        )
    # Llama does not scale its embeddings: an untied model's scale folds into the embedding matrix exactly.
    embed = ours["embed.weight"] * cfg.embed_scale if cfg.embed_scale != 1.0 else ours["embed.weight"]
    out = {"model.embed_tokens.weight": embed, "model.norm.weight": ours["norm.weight"]}
    if not cfg.tie_embeddings:  # tied models store the matrix once, as transformers does
        out["lm_head.weight"] = ours["lm_head.weight"]
    for i in range(cfg.n_layers):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        wq, wk, wv = ours[q + "attn.qkv.weight"].split(
            [cfg.n_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
        )
        gate, up = ours[q + "ffn.w13.weight"].chunk(2)
        out |= {
            p + "self_attn.q_proj.weight": wq,
            p + "self_attn.k_proj.weight": wk,
            p + "self_attn.v_proj.weight": wv,
            p + "self_attn.o_proj.weight": ours[q + "attn.proj.weight"],
            p + "mlp.gate_proj.weight": gate,
            p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": ours[q + "ffn.w2.weight"],
            p + "input_layernorm.weight": ours[q + "norm1.weight"],
            p + "post_attention_layernorm.weight": ours[q + "norm2.weight"],
        }
    return {k: v.contiguous() for k, v in out.items()}


def read_llama_dir(path: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """config.json and all weights of a local Hugging Face checkpoint directory (single or sharded safetensors)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserInputError(f"{str(path)!r} is not a Hugging Face checkpoint directory (no config.json)")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UserInputError(
            f"{str(path)!r} has no model.safetensors (.bin checkpoints are not read; convert them to safetensors)"
        )
    state: dict[str, Tensor] = {}
    for name in files:
        state |= load_file(path / name)
    return json.loads((path / "config.json").read_text()), state


def import_llama(
    src: str | Path,
    out_dir: str | Path,
    ode: ODEConfig,
    max_seq_len: int | None = None,
    tokenizer: str | Path | None = None,
) -> Path:
    """Write out_dir/model.ckpt (a LanguageModel checkpoint) and out_dir/model.yaml; returns the checkpoint path.
    The checkpoint carries `tokenizer`, default src/tokenizer.model, else src/tokenizer.json, if one exists."""
    import lightning

    from lit_iiet.checkpoint import TOKENIZER_KEY
    from lit_iiet.data.tokenizer import Tokenizer
    from lit_iiet.models.lm import LanguageModel

    out_dir = Path(out_dir)
    _refuse_to_overwrite(out_dir)
    if tokenizer is None:
        # Llama 2 directories hold both files: the SentencePiece model is the original.
        found = [Path(src) / name for name in ("tokenizer.model", "tokenizer.json") if (Path(src) / name).is_file()]
        tokenizer = found[0] if found else None
    tokenizer = Tokenizer(tokenizer) if tokenizer is not None else None  # a bad file fails before anything is written
    config, hf_state = read_llama_dir(src)
    cfg = decoder_config_from_llama(config, max_seq_len)
    try:
        state = {"model." + k: v.float() for k, v in from_llama_state(hf_state, cfg).items()}
    except KeyError as e:
        raise UserInputError(f"{str(src)!r} lacks the weight {e.args[0]!r} of a Llama model") from None
    module = LanguageModel(arch=cfg, ode=ode)
    # Only the scheme's own parameters (rk2 gates, PCformer weights) are left out; they keep their init.
    module.load_state_dict(state, strict=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / "model.ckpt"
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }
    if tokenizer is not None:
        checkpoint[TOKENIZER_KEY] = tokenizer.model_proto
    torch.save(checkpoint, ckpt)
    section = {
        "model": {
            "class_path": "lit_iiet.models.LanguageModel",
            "init_args": {"arch": asdict(cfg), "ode": asdict(ode), "init_from": str(ckpt)},
        }
    }
    (out_dir / "model.yaml").write_text(_yaml(section))
    return ckpt


def export_llama(ckpt: str | Path, out_dir: str | Path) -> Path:
    """Write an euler (or all-r = 1 iiet) LanguageModel checkpoint as a Llama directory, with the tokenizer it
    carries as tokenizer.model (SentencePiece) or tokenizer.json; returns out_dir."""
    from safetensors.torch import save_file

    from lit_iiet.checkpoint import load_checkpoint, stored_tokenizer
    from lit_iiet.data.tokenizer import is_tokenizer_json
    from lit_iiet.models.base import as_config
    from lit_iiet.models.lm import LanguageModel

    out_dir = Path(out_dir)
    _refuse_to_overwrite(out_dir)
    checkpoint = load_checkpoint(ckpt)
    # A LanguageModel's configs, checked and upgraded as from_checkpoint does; no module is built: the stored
    # weights map to Llama's as they are.
    hparams = LanguageModel.checkpoint_hparams(checkpoint, ckpt)
    cfg, ode = as_config(DecoderConfig, hparams["arch"]), as_config(ODEConfig, hparams["ode"])
    if not ode.vanilla(cfg.n_layers):
        raise UserInputError(
            f"scheme={ode.scheme!r} iters={ode.iters!r} has no Llama equivalent; only euler (or iiet with 1 iteration "
            "in every layer, iiet.damping 1.0, fixed relaxation, branch_norm false and no branch_scale) can be exported"
        )
    ours = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    llama_state = to_llama_state(ours, cfg)  # refuses what Llama cannot express before anything is written
    tokenizer = stored_tokenizer(checkpoint, ckpt)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(llama_state, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(llama_config_from_decoder(cfg), indent=2) + "\n")
    if tokenizer is not None:  # checkpoints of older versions carry none
        (out_dir / ("tokenizer.json" if is_tokenizer_json(tokenizer) else "tokenizer.model")).write_bytes(tokenizer)
    return out_dir


def _refuse_to_overwrite(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserInputError(
            f"output {str(out_dir)!r} already exists and is not an empty directory; nothing was written"
        )


def _yaml(data: dict) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(data))


def main(argv: list[str] | None = None) -> None:
    """`python -m lit_iiet convert`; `python -m lit_iiet.hf_llama` is an alias."""
    parser = argparse.ArgumentParser(
        prog="python -m lit_iiet convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face Llama directory -> lit_iiet checkpoint (any scheme)")
    imp.add_argument("src", help="directory with config.json and model.safetensors")
    imp.add_argument("out_dir", help="new (or empty) directory for model.ckpt and model.yaml")
    imp.add_argument("--scheme", default="euler", help="layer-update scheme of the imported model")
    imp.add_argument("--iters", type=int, nargs="+", default=[1], help="iiet iterations: one int or one per layer")
    imp.add_argument("--max_seq_len", type=int, default=None, help="context length (default: max_position_embeddings)")
    imp.add_argument(
        "--tokenizer",
        default=None,
        help="SentencePiece model or tokenizer.json the checkpoint carries (default: src/tokenizer.model, else "
        "src/tokenizer.json, if present)",
    )
    exp = sub.add_parser("export", help="euler lit_iiet checkpoint -> Hugging Face Llama directory")
    exp.add_argument("ckpt", help="a LanguageModel checkpoint (.ckpt)")
    exp.add_argument("out_dir", help="new (or empty) directory for config.json, model.safetensors and the tokenizer")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        if args.command == "import":
            iters = args.iters[0] if len(args.iters) == 1 else args.iters
            ckpt = import_llama(args.src, args.out_dir, ODEConfig(args.scheme, iters), args.max_seq_len, args.tokenizer)
            print(f"wrote {ckpt} and {ckpt.with_name('model.yaml')}")
        else:
            print(f"wrote {export_llama(args.ckpt, args.out_dir)}")


if __name__ == "__main__":
    main()
