"""Read an OWSM model as ESPnet ships it into OwsmModel's own parameter names.

ESPnet's S2T files (the layout of an OWSM v3.1 download):
- the training config (config.yaml): encoder, decoder and frontend settings, the token list, the BPE model's path;
- the weights (*.pth): the model's state dict, global MVN statistics included;
- the BPE model (bpe.model, SentencePiece) and the feature statistics (feats_stats.npz), named by the config with
  paths relative to the download's root.
The files can be given as a directory (found in it) or one by one. Nothing here executes code from a file: the
config is read with yaml.safe_load, the weights with torch.load(weights_only=True), the statistics with
numpy.load(allow_pickle=False).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prune_cli.data.owsm_features import HOP, N_FFT, SAMPLE_RATE, SPEECH_SECONDS, WIN_LENGTH, mel_filters
from prune_cli.errors import CheckpointError, first_few
from prune_cli.model.owsm import OwsmDims, OwsmModel

StateDict = dict[str, torch.Tensor]

# What prune-cli computes; a config that asks for something else is refused, naming the key.
_ENCODER_NEEDS = {"rel_pos_type": "latest", "input_layer": "conv2d", "use_ffn": True, "macaron_ffn": True, "use_linear_after_conv": False,
                  "gate_activation": "identity", "positionwise_layer_type": "linear", "ffn_activation_type": "swish",
                  "zero_triu": False, "qk_norm": False, "interctc_layer_idx": None}
_DECODER_NEEDS = {"input_layer": "embed", "normalize_before": True, "concat_after": False, "use_output_layer": True,
                  "qk_norm": False}
_FRONTEND_NEEDS = {"fs": SAMPLE_RATE, "n_fft": N_FFT, "win_length": WIN_LENGTH, "hop_length": HOP, "window": "hann",
                   "center": True, "normalized": False, "onesided": True, "fmin": None, "fmax": None, "htk": False,
                   "apply_stft": True}
DEC_MAX_LEN = 1024  # decoder positions prune-cli gives OWSM (ESPnet's sinusoidal table is unbounded)

# Our per-layer names, with ESPnet's.
_ENC_LAYER = {"ffn1.norm": "norm_ff_macaron", "ffn1.w1": "feed_forward_macaron.w_1", "ffn1.w2": "feed_forward_macaron.w_2",
              "attn.norm": "norm_mha", "attn.q": "attn.linear_q", "attn.k": "attn.linear_k", "attn.v": "attn.linear_v",
              "attn.out": "attn.linear_out", "cgmlp.norm": "norm_mlp", "cgmlp.up": "cgmlp.channel_proj1.0",
              "cgmlp.gate_norm": "cgmlp.csgu.norm", "cgmlp.conv": "cgmlp.csgu.conv", "cgmlp.down": "cgmlp.channel_proj2",
              "merge.dw": "depthwise_conv_fusion", "merge.proj": "merge_proj", "ffn2.norm": "norm_ff",
              "ffn2.w1": "feed_forward.w_1", "ffn2.w2": "feed_forward.w_2", "final_norm": "norm_final"}
_DEC_LAYER = {"self_attn.norm": "norm1", "self_attn.q": "self_attn.linear_q", "self_attn.k": "self_attn.linear_k",
              "self_attn.v": "self_attn.linear_v", "self_attn.out": "self_attn.linear_out", "src_attn.norm": "norm2",
              "src_attn.q": "src_attn.linear_q", "src_attn.k": "src_attn.linear_k", "src_attn.v": "src_attn.linear_v",
              "src_attn.out": "src_attn.linear_out", "ffn.norm": "norm3", "ffn.w1": "feed_forward.w_1",
              "ffn.w2": "feed_forward.w_2"}
_TOP = {"encoder.frontend.conv.0": "encoder.embed.conv.0", "encoder.frontend.conv.2": "encoder.embed.conv.2",
        "encoder.frontend.proj": "encoder.embed.out.0", "encoder.norm": "encoder.after_norm",
        "decoder.norm": "decoder.after_norm", "decoder.out": "decoder.output_layer", "ctc": "ctc.ctc_lo"}
_PLAIN = {"encoder.mvn_mean": "normalize.mean", "encoder.mvn_std": "normalize.std", "decoder.embed.weight": "decoder.embed.0.weight"}
_IGNORED = {"frontend.logmel.melmat"}  # checked against our filters, not loaded


def name_map(dims: OwsmDims) -> dict[str, str]:
    """Our parameter name -> ESPnet's."""
    out = dict(_PLAIN)
    for ours, theirs in _TOP.items():
        out[f"{ours}.weight"], out[f"{ours}.bias"] = f"{theirs}.weight", f"{theirs}.bias"
    for i in range(dims.enc_layers):
        if dims.rel_pos:
            out[f"encoder.layers.{i}.attn.pos.weight"] = f"encoder.encoders.{i}.attn.linear_pos.weight"
            out[f"encoder.layers.{i}.attn.bias_u"] = f"encoder.encoders.{i}.attn.pos_bias_u"
            out[f"encoder.layers.{i}.attn.bias_v"] = f"encoder.encoders.{i}.attn.pos_bias_v"
        for ours, theirs in _ENC_LAYER.items():
            for p in ("weight", "bias"):
                out[f"encoder.layers.{i}.{ours}.{p}"] = f"encoder.encoders.{i}.{theirs}.{p}"
    for i in range(dims.dec_layers):
        for ours, theirs in _DEC_LAYER.items():
            for p in ("weight", "bias"):
                out[f"decoder.layers.{i}.{ours}.{p}"] = f"decoder.decoders.{i}.{theirs}.{p}"
    return out


@dataclass(frozen=True)
class OwsmFiles:
    config: Path
    weights: Path
    bpe: Path
    stats: Path | None = None  # optional: the weights carry the statistics; when given, they must agree


@dataclass(frozen=True)
class OwsmTokenizerFiles:
    sp_model: bytes
    token_list: list[str]
    notime: str  # <notimestamps>
    first_time: str  # the timestamp tokens, suppressed when decoding without timestamps
    last_time: str


def _yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path}: unreadable ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: not an ESPnet training config (a YAML mapping)")
    return cfg


def _named(root: Path, value: Any, pattern: str, what: str) -> Path:
    """A file the config names (relative to the download's root or absolute), else the one matching `pattern`."""
    if isinstance(value, str) and value:
        for cand in (Path(value), root / value):
            if cand.is_file():
                return cand
    found = sorted(root.rglob(pattern))
    if len(found) == 1:
        return found[0]
    if not found:
        raise CheckpointError(f"{root}: no {what} ({pattern}) in it, and the config names none that exists ({value!r})")
    raise CheckpointError(f"{root}: {len(found)} files match {pattern} ({first_few([str(p) for p in found])}); name the {what} "
                          "explicitly")


def find_files(path: Path, weights: Path | None = None, bpe: Path | None = None, stats: Path | None = None) -> OwsmFiles:
    """The files of an OWSM download: `path` is its directory or its config.yaml; the others default to what the
    config names, or to the one file of the kind in the directory."""
    if path.is_file():
        config, root = path, path.parent
        while root != root.parent and not any(root.glob("exp")) and not any(root.glob("data")):
            root = root.parent  # the download's root: config paths are relative to it
        if root == root.parent:
            root = path.parent
    elif path.is_dir():
        configs = [p for p in sorted(path.rglob("config.yaml")) if "encoder" in _yaml(p)]
        if len(configs) != 1:
            raise CheckpointError(f"{path}: {'no' if not configs else len(configs)} ESPnet S2T training config(s) "
                                  "(config.yaml with an encoder) in it; name the config file instead")
        config, root = configs[0], path
    else:
        raise CheckpointError(f"{path}: not found")
    cfg = _yaml(config)
    if weights is None:
        pths = sorted(config.parent.glob("*.pth")) or sorted(root.rglob("*.pth"))
        if len(pths) != 1:
            raise CheckpointError(f"{config.parent}: {'no' if not pths else len(pths)} .pth weight file(s); name the weights")
        weights = pths[0]
    bpe = bpe or _named(root, cfg.get("bpemodel"), "*.model", "BPE model")
    if stats is None:
        norm = cfg.get("normalize_conf") or {}
        try:
            stats = _named(root, norm.get("stats_file"), "feats_stats.npz", "feature statistics")
        except CheckpointError:
            stats = None  # the weights carry the statistics
    return OwsmFiles(config, weights, bpe, stats)


def _check(section: str, conf: dict[str, Any], needs: dict[str, Any], defaults: dict[str, Any], source: Path) -> list[str]:
    bad = [f"{source}: {section}.{k}: {conf[k]!r} (prune-cli computes {v!r})" for k, v in needs.items()
           if k in conf and conf[k] != v and not (v is None and conf[k] in ([], None))]
    return bad + [f"{source}: {section}.{k}: default {defaults[k]!r} (prune-cli computes {v!r})" for k, v in needs.items()
                  if k not in conf and k in defaults and defaults[k] != v]


# (attention_layer_type, pos_enc_layer_type) -> relative positions
_ATTENTION = {("selfattn", "abs_pos"): False, ("rel_selfattn", "rel_pos"): True}
# ESPnet's defaults where they differ from what we compute: a config that omits the key asks for them.
_ENCODER_DEFAULTS = {"use_ffn": False, "macaron_ffn": False}


def read_config(path: Path) -> tuple[dict[str, Any], int]:
    """The S2T config, checked, and its mel-bin count."""
    cfg = _yaml(path)
    problems = []
    for key, want in (("encoder", "e_branchformer"), ("decoder", "transformer"), ("frontend", "default"),
                      ("normalize", "global_mvn")):
        if cfg.get(key) != want:
            problems.append(f"{path}: {key} is {cfg.get(key)!r}; prune-cli reads OWSM's {want!r}")
    for key in ("preencoder", "postencoder"):
        if cfg.get(key):
            problems.append(f"{path}: {key} {cfg.get(key)!r}; prune-cli reads models without one")
    enc = cfg.get("encoder_conf") or {}
    problems += _check("encoder_conf", enc, _ENCODER_NEEDS, _ENCODER_DEFAULTS, path)
    attention = (enc.get("attention_layer_type", "rel_selfattn"), enc.get("pos_enc_layer_type", "rel_pos"))
    if attention not in _ATTENTION:
        problems.append(f"{path}: encoder_conf attention_layer_type {attention[0]!r} with pos_enc_layer_type {attention[1]!r}; "
                        "prune-cli computes selfattn + abs_pos (OWSM v3.1) or rel_selfattn + rel_pos")
    problems += _check("decoder_conf", cfg.get("decoder_conf") or {}, _DECODER_NEEDS, {}, path)
    front = cfg.get("frontend_conf") or {}
    fs = front.get("fs", SAMPLE_RATE)
    if isinstance(fs, str):  # ESPnet writes "16k"
        try:
            fs = int(float(fs.lower().rstrip("k")) * 1000) if fs.lower().endswith("k") else int(fs)
        except ValueError:
            pass  # compared as it is, and reported
    problems += _check("frontend_conf", {**front, "fs": fs}, _FRONTEND_NEEDS, {"hop_length": 128, "win_length": None}, path)
    if problems:
        raise CheckpointError(problems + [f"{path}: not an OWSM layout this importer computes"])
    speech = (cfg.get("preprocessor_conf") or {}).get("speech_length", SPEECH_SECONDS)
    if speech != SPEECH_SECONDS:
        raise CheckpointError(f"{path}: preprocessor_conf.speech_length {speech}; prune-cli pads to OWSM's {SPEECH_SECONDS} s")
    return cfg, int(front.get("n_mels", 80))


def token_list(cfg: dict[str, Any], config: Path) -> list[str]:
    tl = cfg.get("token_list")
    if isinstance(tl, str):  # a path to tokens.txt, one token a line
        p = Path(tl) if Path(tl).is_file() else config.parent / Path(tl).name
        if not p.is_file():
            raise CheckpointError(f"{config}: token_list names {tl}, which is not found")
        tl = [line.rstrip("\n") for line in p.read_text().splitlines()]
    if not isinstance(tl, list) or not tl or not all(isinstance(t, str) for t in tl):
        raise CheckpointError(f"{config}: no token_list (a list of tokens, or the path of one)")
    return tl


def _layers(keys: list[str], pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def read_owsm(files: OwsmFiles) -> tuple[OwsmModel, OwsmTokenizerFiles]:
    """The OwsmModel of these files (float32), and its tokenizer files."""
    from prune_cli.atomic import load_plain

    cfg, n_mels = read_config(files.config)
    tokens = token_list(cfg, files.config)
    sd = load_plain(files.weights, "ESPnet model")
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{files.weights}: not an ESPnet model file (a state dict of tensors)")
    enc, dec = cfg.get("encoder_conf") or {}, cfg.get("decoder_conf") or {}
    keys = list(sd)
    rel_pos = _ATTENTION[(enc.get("attention_layer_type", "rel_selfattn"), enc.get("pos_enc_layer_type", "rel_pos"))]
    try:
        d = sd["encoder.embed.out.0.weight"].shape[0]
        heads = sd["encoder.encoders.0.attn.pos_bias_u"].shape[0] if rel_pos else enc.get("attention_heads", 4)
        dims = OwsmDims(
            n_mels=sd["normalize.mean"].shape[0], vocab=sd["decoder.output_layer.weight"].shape[0], d_model=d,
            heads=heads, enc_layers=_layers(keys, r"encoder\.encoders\.(\d+)\."),
            dec_layers=_layers(keys, r"decoder\.decoders\.(\d+)\."),
            ffn_dim=sd["encoder.encoders.0.feed_forward.w_1.weight"].shape[0],
            dec_ffn_dim=sd["decoder.decoders.0.feed_forward.w_1.weight"].shape[0],
            cgmlp_dim=sd["encoder.encoders.0.cgmlp.channel_proj1.0.weight"].shape[0],
            cgmlp_kernel=sd["encoder.encoders.0.cgmlp.csgu.conv.weight"].shape[-1],
            merge_kernel=sd["encoder.encoders.0.depthwise_conv_fusion.weight"].shape[-1], max_len=DEC_MAX_LEN, rel_pos=rel_pos)
    except (KeyError, IndexError) as e:
        raise CheckpointError(f"{files.weights}: not a complete ESPnet E-Branchformer S2T state dict (no {e})") from None
    said = {"output_size": (enc.get("output_size", 256), dims.d_model), "num_blocks": (enc.get("num_blocks", 12), dims.enc_layers),
            "attention_heads": (enc.get("attention_heads", 4), dims.heads), "linear_units": (enc.get("linear_units", 2048), dims.ffn_dim),
            "cgmlp_linear_units": (enc.get("cgmlp_linear_units", 2048), dims.cgmlp_dim),
            "cgmlp_conv_kernel": (enc.get("cgmlp_conv_kernel", 31), dims.cgmlp_kernel),
            "merge_conv_kernel": (enc.get("merge_conv_kernel", 3), dims.merge_kernel),
            "decoder num_blocks": (dec.get("num_blocks", 6), dims.dec_layers),
            "decoder attention_heads": (dec.get("attention_heads", 4), dims.heads),
            "width per head": (0, dims.d_model % dims.heads),
            "decoder linear_units": (dec.get("linear_units", 2048), dims.dec_ffn_dim),
            "n_mels": (n_mels, dims.n_mels), "token_list": (len(tokens), dims.vocab)}
    diff = [f"{k} {a} (the weights have {b})" for k, (a, b) in said.items() if a != b]
    if diff:
        raise CheckpointError(f"{files.config}: the config disagrees with the weights: {'; '.join(diff)}")
    if "frontend.logmel.melmat" in sd and not torch.allclose(sd["frontend.logmel.melmat"].float(), mel_filters(n_mels), atol=1e-6):
        raise CheckpointError(f"{files.weights}: its mel filters are not ESPnet's default for {n_mels} bins at 16 kHz")
    names = name_map(dims)
    missing = [t for t in names.values() if t not in sd]
    left = [k for k in sd if k not in set(names.values()) | _IGNORED]
    if missing or left:
        raise CheckpointError([f"{files.weights}: missing {t}" for t in missing[:5]] + [f"{files.weights}: unused {k}" for k in left[:5]]
                              + [f"{files.weights}: {len(missing)} missing, {len(left)} unused tensor(s) for the OWSM layout"])
    ours = {k: sd[t].float() for k, t in names.items()}
    if files.stats is not None:
        mean, std = global_mvn(files.stats)
        if not (torch.allclose(mean, ours["encoder.mvn_mean"], atol=1e-4) and torch.allclose(std, ours["encoder.mvn_std"], rtol=1e-4)):
            raise CheckpointError(f"{files.stats}: these statistics are not the ones the weights were saved with")
    model = OwsmModel(dims)
    problems = model.weight_problems(ours)
    if problems:
        raise CheckpointError(f"{files.weights}: {len(problems)} tensor(s) do not fit: {first_few(problems)}")
    model.load_state_dict(ours)
    pre = cfg.get("preprocessor_conf") or {}
    tok = OwsmTokenizerFiles(files.bpe.read_bytes(), tokens, pre.get("notime_symbol", "<notimestamps>"),
                             pre.get("first_time_symbol", "<0.00>"), pre.get("last_time_symbol", "<30.00>"))
    return model.eval(), tok


def global_mvn(stats: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation from ESPnet's feats_stats.npz (count, sum, sum_square), as GlobalMVN computes them."""
    import numpy as np

    try:
        with np.load(stats, allow_pickle=False) as z:
            count, s, sq = float(z["count"]), z["sum"].astype("float64"), z["sum_square"].astype("float64")
    except (OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"{stats}: not ESPnet feature statistics (count, sum, sum_square): {e}") from None
    mean = s / count
    std = np.sqrt(np.maximum(sq / count - mean * mean, 1e-20))
    return torch.from_numpy(mean).float(), torch.from_numpy(std).float()


# ---- the run's base: an OWSM download, or prune-cli's own converted checkpoint of one
def pretrained_problem(ref: str) -> str | None:
    """Why `model.pretrained` cannot be opened as an OWSM, found without reading the weights (None: it is there)."""
    path = Path(ref).expanduser()
    if not path.exists():
        return f"{path}: not found (an OWSM download's directory, its config.yaml, or a `prune-cli model import` .pt)"
    if path.is_file() and path.suffix == ".pt":
        return None
    try:
        find_files(path)
    except CheckpointError as e:
        return e.problems[0]
    return None


def open_owsm(ref: str) -> tuple[OwsmModel, OwsmTokenizerFiles, dict[str, str]]:
    """An OWSM download (its directory or config.yaml) or a converted .pt: the model, its tokenizer files, and
    where they came from."""
    from prune_cli.atomic import load_plain

    path = Path(ref).expanduser()
    if path.is_file() and path.suffix == ".pt":
        blob = load_plain(path, "OWSM checkpoint")
        if not isinstance(blob, dict) or blob.get("kind") != "prune-cli/model" or blob.get("family") != "owsm" or "tokenizer" not in blob:
            raise CheckpointError(f"{path}: not an OWSM imported by `prune-cli model import`")
        model = OwsmModel(OwsmDims(**blob["dims"]))
        problems = model.weight_problems(blob["state_dict"])
        if problems:
            raise CheckpointError(f"{path}: {len(problems)} tensor(s) do not fit the OWSM its dims describe: {first_few(problems)}")
        model.load_state_dict(blob["state_dict"])
        t = blob["tokenizer"]
        return model.eval(), OwsmTokenizerFiles(t["sp_model"].numpy().tobytes(), list(t["token_list"]), t["notime"], t["first_time"],
                                                t["last_time"]), dict(blob["source"])
    files = find_files(path)
    model, tok = read_owsm(files)
    return model, tok, {"source": str(path.resolve()), "format": "espnet", "config": str(files.config.resolve()),
                        "weights": str(files.weights.resolve())}


def save_imported(out: Path, model: OwsmModel, tok: OwsmTokenizerFiles, source: dict[str, str]) -> None:
    """The project's own checkpoint of an OWSM: weights (MVN statistics included), tokenizer and hashes in one file."""
    from prune_cli.model.checkpoint import save_model

    save_model(out, model, tokenizer={"sp_model": torch.frombuffer(bytearray(tok.sp_model), dtype=torch.uint8).clone(),
                                      "token_list": tok.token_list, "notime": tok.notime, "first_time": tok.first_time,
                                      "last_time": tok.last_time},
               source=source, arch_hash=model.arch_hash(), weights_hash=model.weights_hash())


def is_owsm_source(path: Path) -> bool:
    """An ESPnet config file, or a directory with one and no Whisper files (config.json, model.bin) at its top."""
    if path.is_file():
        return path.suffix in (".yaml", ".yml")
    return path.is_dir() and not (path / "config.json").is_file() and not (path / "model.bin").is_file() \
        and any(path.rglob("config.yaml"))
