"""Checks across recipe keys that the types alone cannot make (ranges, combinations, the corpus settings)."""

from __future__ import annotations

import re

from prune_cli.contexts import language_problem, task_problem
from prune_cli.data.config import SynthConfig
from prune_cli.recipe_schema import Recipe
from prune_cli.variants import NAMES, VARIANTS


def semantic_checks(r: Recipe) -> list[str]:
    errs: list[str] = []
    errs += _synth_problems(r.data.synth)
    set_names = [name for name, _ in r.eval.set_paths(r.data.manifest_dir)]
    errs += [f"eval.sets: two sets named {n!r} (their folders under eval/sets/ would collide)"
             for n in sorted({n for n in set_names if set_names.count(n) > 1})]
    errs += [f"eval.sets: {n!r} is not a plain name (letters, digits, '.', '_', '-')" for n in set_names if not is_plain_name(n)]
    d = r.data.defaults
    errs += [f"data.defaults: {p}" for p in (task_problem(d.task) if d.task else None,
                                             language_problem(d.source_lang) if d.source_lang else None,
                                             language_problem(d.target_lang) if d.target_lang else None) if p]
    for sec, key in (("encoder", r.gates.target.encoder), ("decoder", r.gates.target.decoder)):
        if not 0.0 <= key < 1.0:
            errs.append(f"gates.target.{sec}: must be in [0, 1), got {key}")
    if r.model.family == "whisper":
        if not r.model.pretrained:
            errs.append("model.pretrained: the whisper family starts from a pretrained model (whisper-base, or a path)")
        for key, w in (("base.ctc_weight", r.base.ctc_weight), ("eval.ctc_weight", r.eval.ctc_weight)):
            if w > 0:
                errs.append(f"{key}: Whisper has no CTC head; set it to 0")
        if r.data.sample_rate != 16000:
            errs.append(f"data.sample_rate: Whisper's front end takes 16000 Hz, got {r.data.sample_rate}")
    elif r.model.family == "owsm":
        if not r.model.pretrained:
            errs.append("model.pretrained: the owsm family starts from a pretrained model (an ESPnet download, or a path "
                        "written by `prune-cli model import`)")
        if r.data.sample_rate != 16000:
            errs.append(f"data.sample_rate: OWSM's front end takes 16000 Hz, got {r.data.sample_rate}")
    elif r.model.pretrained:
        errs.append("model.pretrained: only the whisper and owsm families load a pretrained model (set model.family)")
    if r.model.d_model % r.model.heads:
        errs.append(f"model.d_model: {r.model.d_model} is not divisible by model.heads={r.model.heads}")
    if r.model.cgmlp_dim % 2:
        errs.append("model.cgmlp_dim: must be even (it is split into two gated halves)")
    for section, vs in (("eval", r.eval.variants), ("profile", r.profile.variants)):
        for v in vs:
            if v not in VARIANTS:
                errs.append(f"{section}.variants: unknown variant {v!r} ({', '.join(NAMES)})")
            elif VARIANTS[v].kind == "unpruned" and not r.enabled(v):  # masked ones fail at eval, naming masks.json
                errs.append(f"{section}.variants: {v} is trained only with {VARIANTS[v].switch}: true")
    for v in VARIANTS.values():  # an unpruned variant that trains its own copy of the base needs fine-tuning on
        if v.kind == "unpruned" and v.own_base and r.enabled(v.name) and not r.gates.finetune_base:
            errs.append(f"{v.switch}: the dense reference is the base fine-tuned like the pruned variants; "
                        "it needs gates.finetune_base: true")
    for bs in r.profile.batch_sizes:
        if bs < 1:
            errs.append("profile.batch_sizes: must be positive")
    if not 0 <= r.gates.min_cross_attention <= r.model.dec_layers:
        errs.append(f"gates.min_cross_attention: must be in [0, model.dec_layers={r.model.dec_layers}], "
                    f"got {r.gates.min_cross_attention}")
    adapt_ok = 0.0 <= r.gates.adapt_share < 1.0
    if not adapt_ok:
        errs.append(f"gates.adapt_share: must be in [0, 1), got {r.gates.adapt_share}")
    elif r.gates.adapt_share > 0 and not r.gates.phased:
        errs.append("gates.adapt_share: the base adapts before the predictor only in the phased schedule "
                    "(gates.finetune_base: true, gates.finetune_schedule: phased)")
    if not 0.0 < r.gates.predictor_share < 1.0:
        errs.append(f"gates.predictor_share: must be in (0, 1), got {r.gates.predictor_share}")
    elif adapt_ok and r.gates.phased and not r.gates.adapt_step + 1 <= r.gates.freeze_step < r.gates.steps:
        errs.append(f"gates.predictor_share: {r.gates.predictor_share} of gates.steps={r.gates.steps} leaves the predictor "
                    "or the base no step of the phased schedule")
    if r.gates.distill < 0.0:
        errs.append(f"gates.distill: must be >= 0, got {r.gates.distill}")
    if not 0.0 <= r.base.module_drop < 1.0:
        errs.append(f"base.module_drop: must be in [0, 1), got {r.base.module_drop}")
    if not 0.0 <= r.eval.ctc_weight <= 1.0:
        errs.append(f"eval.ctc_weight: must be in [0, 1], got {r.eval.ctc_weight}")
    elif r.eval.ctc_weight > 0 and r.eval.beam_size < 2:
        errs.append("eval.ctc_weight: joint CTC/attention decoding is a beam search; set eval.beam_size >= 2 (or ctc_weight 0)")
    if r.eval.beam_size < 1:
        errs.append(f"eval.beam_size: must be >= 1, got {r.eval.beam_size}")
    temps = r.eval.temperatures
    if temps is not None and (not temps or temps[0] != 0.0 or any(b <= a for a, b in zip(temps, temps[1:]))):
        errs.append(f"eval.temperatures: must start at 0.0 and rise (e.g. [0.0, 0.2, 0.4]), got {temps}")
    if r.eval.best_of < 1:
        errs.append(f"eval.best_of: must be >= 1, got {r.eval.best_of}")
    if r.eval.bootstrap != 0 and r.eval.bootstrap < 100:
        errs.append(f"eval.bootstrap: must be 0 (off) or >= 100 resamples, got {r.eval.bootstrap}")
    if r.tokenizer.vocab_size < 16:
        errs.append("tokenizer.vocab_size: must be >= 16")
    positive = {
        "base.steps": r.base.steps, "base.lr": r.base.lr, "base.val_every": r.base.val_every,
        "base.save_every": r.base.save_every, "base.log_every": r.base.log_every, "base.grad_accum": r.base.grad_accum,
        "gates.steps": r.gates.steps, "gates.lr": r.gates.lr, "gates.static_lr": r.gates.static_lr,
        "gates.base_lr": r.gates.base_lr, "gates.val_every": r.gates.val_every, "gates.save_every": r.gates.save_every,
        "gates.log_every": r.gates.log_every, "gates.tau_start": r.gates.tau_start, "gates.tau_end": r.gates.tau_end,
        "data.max_frames_per_batch": r.data.max_frames_per_batch, "data.sample_rate": r.data.sample_rate,
        "eval.batch_size": r.eval.batch_size, "profile.repeats": r.profile.repeats, "profile.threads": r.profile.threads,
        "profile.utts_per_context": r.profile.utts_per_context, "features.n_mels": r.features.n_mels,
    }
    errs += [f"{k}: must be > 0, got {v}" for k, v in positive.items() if isinstance(v, (int, float)) and not v > 0]
    non_negative = {"base.warmup_steps": r.base.warmup_steps, "base.weight_decay": r.base.weight_decay, "base.clip": r.base.clip,
                    "base.keep_best": r.base.keep_best, "gates.alpha": r.gates.alpha, "profile.warmup": r.profile.warmup,
                    "gates.target_warmup_steps": r.gates.target_warmup_steps}
    errs += [f"{k}: must be >= 0, got {v}" for k, v in non_negative.items() if isinstance(v, (int, float)) and not v >= 0]
    if r.data.max_utts_per_context is not None and r.data.max_utts_per_context < 1:
        errs.append(f"data.max_utts_per_context: must be >= 1 (or null), got {r.data.max_utts_per_context}")
    if not is_plain_name(r.name):
        errs.append(f"name: {r.name!r} must be a plain folder name (letters, digits, '.', '_', '-'; no '/' or '..'): "
                    "the run dir is runs/<name>")
    return errs


def is_plain_name(name: str) -> bool:
    """A folder name that stays where it is put: letters, digits, '.', '_', '-'; no '/' and no '..'."""
    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name)) and ".." not in name


def _synth_problems(cfg: SynthConfig) -> list[str]:
    """The demo corpus speaks the languages both eSpeak NG and num2words support, read from the libraries."""
    from prune_cli.data.config import FORMS
    from prune_cli.data.synth import form_supported, supported_languages, synth_contexts

    errs: list[str] = []
    supported = supported_languages()
    for lang in cfg.languages:
        if lang not in supported:
            errs.append(f"data.synth.languages: unsupported language {lang!r}: eSpeak NG and num2words do not both speak "
                        f"it ({len(supported)} do: {', '.join(supported)})")
    for pair in cfg.st_pairs:
        parts = pair.split("-")
        if len(parts) != 2 or parts[0] == parts[1] or any(p not in supported for p in parts):
            errs.append(f"data.synth.st_pairs: bad pair {pair!r} (SRC-TGT: two different languages eSpeak NG and num2words speak)")
    for form in cfg.forms:
        if form not in FORMS:
            errs.append(f"data.synth.forms: unknown form {form!r} ({', '.join(FORMS)})")
    langs = dict.fromkeys([*cfg.languages, *(p for pair in cfg.st_pairs for p in pair.split("-"))])
    for lang in (lg for lg in langs if lg in supported):
        for form in (f for f in cfg.forms if f in FORMS and not form_supported(lang, f)):
            errs.append(f"data.synth.forms: num2words has no {form} numbers in {lang!r}")
    if cfg.max_number < 10:
        errs.append("data.synth.max_number: must be >= 10")
    n_contexts = len(synth_contexts(cfg))
    for key in ("n_train", "n_dev", "n_test"):  # every split needs each context at least once
        if getattr(cfg, key) < max(1, n_contexts):
            errs.append(f"data.synth.{key}: at least one utterance per context ({n_contexts}), got {getattr(cfg, key)}")
    for key in ("voices_per_lang", "workers"):
        if getattr(cfg, key) < 1:
            errs.append(f"data.synth.{key}: at least 1, got {getattr(cfg, key)}")
    return errs + _variation_problems(cfg)


def _variation_problems(cfg: SynthConfig) -> list[str]:
    """Held-out voices, training augmentation and robustness test sets."""
    from prune_cli.data.config import NOISES, VOICE_VARIANTS
    from prune_cli.data.synth import voice_variants

    errs: list[str] = []
    known = voice_variants()
    errs += [f"data.synth.heldout_voices: eSpeak NG has no voice variant {v!r}" for v in cfg.heldout_voices if v not in known]
    errs += [f"data.synth.heldout_voices: {v!r} is one of the clean splits' voices (the first voices_per_lang of "
             f"{', '.join(VOICE_VARIANTS)})" for v in cfg.heldout_voices if v in VOICE_VARIANTS[: cfg.voices_per_lang]]

    def check_range(key: str, pair: list, lo: float, hi: float) -> None:
        if len(pair) != 2 or not lo <= pair[0] <= pair[1] <= hi:
            errs.append(f"data.synth.{key}: expected [low, high] within [{lo}, {hi}], got {pair}")

    def check_noises(key: str, noises: list[str]) -> None:
        if not noises:
            errs.append(f"data.synth.{key}: at least one of {', '.join(NOISES)}")
        errs.extend(f"data.synth.{key}: unknown noise {n!r} ({', '.join(NOISES)})" for n in noises if n not in NOISES)

    check_range("rate_range", cfg.rate_range, 80, 450)
    check_range("pitch_range", cfg.pitch_range, 0, 99)
    if cfg.augment is not None:
        a = cfg.augment
        for key in ("clean_share", "noise_share", "reverb_share"):
            if not 0.0 <= getattr(a, key) <= 1.0:
                errs.append(f"data.synth.augment.{key}: a share in [0, 1], got {getattr(a, key)}")
        check_range("augment.rate_range", a.rate_range, 80, 450)
        check_range("augment.pitch_range", a.pitch_range, 0, 99)
        check_range("augment.snr_range", a.snr_range, -10, 60)
        check_range("augment.rt60_range", a.rt60_range, 0.05, 3.0)
        check_noises("augment.noises", a.noises)
        if a.babble_talkers < 1:
            errs.append(f"data.synth.augment.babble_talkers: at least 1, got {a.babble_talkers}")
    names = [ts.name for ts in cfg.test_sets]
    for i, ts in enumerate(cfg.test_sets):
        key = f"test_sets[{i}]"
        if not re.fullmatch(r"[a-z0-9][a-z0-9_]*", ts.name) or ts.name in ("train", "dev", "test"):
            errs.append(f"data.synth.{key}.name: lowercase letters, digits and _, not train/dev/test; got {ts.name!r}")
        elif names.count(ts.name) > 1:
            errs.append(f"data.synth.{key}.name: {ts.name!r} is used twice")
        if ts.per_context < 1:
            errs.append(f"data.synth.{key}.per_context: at least 1, got {ts.per_context}")
        if ts.voices == "heldout" and not cfg.heldout_voices:
            errs.append(f"data.synth.{key}.voices: heldout, but data.synth.heldout_voices is empty")
        if ts.voices == "neural":
            from prune_cli.data.neural_voice import PIPER_LANGUAGE, missing

            if PIPER_LANGUAGE not in cfg.languages:
                errs.append(f"data.synth.{key}.voices: neural speaks {PIPER_LANGUAGE} only, which data.synth.languages lacks")
            elif missing():
                errs.append(f"data.synth.{key}.voices: {missing()}")
        check_noises(f"{key}.noises", ts.noises)
        if ts.rate_range is not None:
            check_range(f"{key}.rate_range", ts.rate_range, 80, 450)
        if ts.pitch_range is not None:
            check_range(f"{key}.pitch_range", ts.pitch_range, 0, 99)
    return errs
