"""A random OWSM built with ESPnet's own classes and saved as ESPnet ships one (the layout of an OWSM v3.1
download), for the importer's equivalence tests. ESPnet is a test-only reference: prune_cli never imports it."""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

LANGS = ["<eng>", "<deu>", "<spa>", "<fra>", "<ita>"]
TASKS = ["<asr>", "<st_eng>", "<st_deu>", "<st_fra>"]
TIMES = [f"<{i * 0.02:.2f}>" for i in range(4)]
N_MELS = 80


@dataclass
class EspnetOwsm:
    model: torch.nn.Module  # espnet2's ESPnetS2TModel
    root: Path  # the download's directory
    config: Path
    token_list: list[str]


def token_list(sp_pieces: list[str]) -> list[str]:
    """OWSM's order: blank, unk, <na>, <nospeech>, languages, tasks, <notimestamps>, timestamps, BPE pieces, then
    <sos> <eos> <sop>."""
    head = ["<blank>", "<unk>", "<na>", "<nospeech>", *LANGS, *TASKS, "<notimestamps>", *TIMES]
    return head + sp_pieces + ["<sos>", "<eos>", "<sop>"]


def train_bpe(texts: list[str], vocab_size: int) -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size, model_type="unigram",
                                   character_coverage=1.0, hard_vocab_limit=False, num_threads=1, minloglevel=2)
    return buf.getvalue()


def build(root: Path, texts: list[str], d: int = 64, heads: int = 4, enc_layers: int = 2, dec_layers: int = 2,
          ffn: int = 96, cgmlp: int = 128, cgmlp_kernel: int = 7, merge_kernel: int = 5, dec_ffn: int = 80,
          bpe_size: int = 60, seed: int = 0, rel_pos: bool = False, vocab: int | None = None) -> EspnetOwsm:
    """rel_pos: ESPnet's default relative-position attention; else OWSM v3.1's absolute positions. vocab: fill the
    token list up to this size (OWSM's is 50000)."""
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import sentencepiece as spm
    from espnet2.asr.ctc import CTC
    from espnet2.asr.decoder.transformer_decoder import TransformerDecoder
    from espnet2.asr.encoder.e_branchformer_encoder import EBranchformerEncoder
    from espnet2.asr.frontend.default import DefaultFrontend
    from espnet2.layers.global_mvn import GlobalMVN
    from espnet2.s2t.espnet_model import ESPnetS2TModel

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    exp, stats_dir, bpe_dir = root / "exp" / "s2t_train_random", root / "exp" / "s2t_stats" / "train", root / "data" / "token_list" / "bpe"
    for p in (exp, stats_dir, bpe_dir):
        p.mkdir(parents=True, exist_ok=True)
    proto = train_bpe(texts, bpe_size)
    (bpe_dir / "bpe.model").write_bytes(proto)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.id_to_piece(i) != "<unk>"]
    tokens = token_list(pieces + [f"<unused{i}>" for i in range(max(0, (vocab or 0) - len(token_list(pieces))))])
    # Plausible log-mel statistics: mean around -8, deviation around 3.
    count = 1000.0
    mean, std = rng.normal(-8, 2, N_MELS), rng.uniform(2, 4, N_MELS)
    np.savez(stats_dir / "feats_stats.npz", count=np.array(count), sum=mean * count, sum_square=(std**2 + mean**2) * count)
    cfg = {
        "token_list": tokens, "token_type": "bpe", "bpemodel": "data/token_list/bpe/bpe.model",
        "frontend": "default", "frontend_conf": {"n_fft": 512, "win_length": 400, "hop_length": 160, "fs": "16k"},
        "specaug": None, "normalize": "global_mvn", "normalize_conf": {"stats_file": "exp/s2t_stats/train/feats_stats.npz"},
        "preencoder": None, "postencoder": None,
        "encoder": "e_branchformer",
        "encoder_conf": {"output_size": d, "attention_heads": heads, "attention_layer_type": "rel_selfattn" if rel_pos else "selfattn",
                         "pos_enc_layer_type": "rel_pos" if rel_pos else "abs_pos", "rel_pos_type": "latest", "cgmlp_linear_units": cgmlp,
                         "cgmlp_conv_kernel": cgmlp_kernel, "use_linear_after_conv": False, "gate_activation": "identity",
                         "num_blocks": enc_layers, "dropout_rate": 0.1, "positional_dropout_rate": 0.1,
                         "attention_dropout_rate": 0.1, "input_layer": "conv2d", "layer_drop_rate": 0.0,
                         "linear_units": ffn, "positionwise_layer_type": "linear", "use_ffn": True, "macaron_ffn": True,
                         "merge_conv_kernel": merge_kernel},
        "decoder": "transformer",
        "decoder_conf": {"attention_heads": heads, "linear_units": dec_ffn, "num_blocks": dec_layers, "dropout_rate": 0.1,
                         "positional_dropout_rate": 0.1, "self_attention_dropout_rate": 0.1, "src_attention_dropout_rate": 0.1},
        "model_conf": {"ctc_weight": 0.3, "lsm_weight": 0.1, "length_normalized_loss": False, "sym_na": "<na>"},
        "preprocessor": "s2t",
        "preprocessor_conf": {"text_prev_name": "text_prev", "text_ctc_name": "text_ctc", "fs": 16000, "na_symbol": "<na>",
                              "speech_length": 30, "speech_resolution": 0.02, "speech_init_silence": 30,
                              "text_prev_apply_prob": 0.5, "time_apply_prob": 0.5, "notime_symbol": "<notimestamps>",
                              "first_time_symbol": TIMES[0], "last_time_symbol": TIMES[-1]},
    }
    (exp / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    # As S2TTask.build_model builds it from the config.
    frontend = DefaultFrontend(n_fft=512, win_length=400, hop_length=160, fs="16k")
    normalize = GlobalMVN(str(stats_dir / "feats_stats.npz"))
    encoder = EBranchformerEncoder(input_size=N_MELS, **cfg["encoder_conf"])
    decoder = TransformerDecoder(vocab_size=len(tokens), encoder_output_size=d, **cfg["decoder_conf"])
    ctc = CTC(odim=len(tokens), encoder_output_size=d)
    model = ESPnetS2TModel(len(tokens), tokens, frontend, None, normalize, None, encoder, None, decoder, ctc, **cfg["model_conf"])
    # Every norm, bias and position bias random too, so that no two tensors are interchangeable.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or "pos_bias" in name:
                p.add_(0.2 * torch.randn_like(p))
    torch.save(model.state_dict(), exp / "valid.acc.ave.pth")
    return EspnetOwsm(model.eval(), root, exp / "config.yaml", tokens)
