"""Stage `eval`: decode every context with every variant; WER/CER (jiwer) for ASR, BLEU/chrF (sacrebleu) for ST."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from prune_cli.atomic import atomic_write_json, atomic_write_text, json_safe
from prune_cli.contexts import TASKS, ContextVocab
from prune_cli.data.batching import Split, load_split, model_inputs
from prune_cli.data.manifest import fingerprint
from prune_cli.data.normalize import NORMALIZATION, NUMBERS_NORMALIZATION, number_form
from prune_cli.data.normalize import normalize as basic_normalize
from prune_cli.data.tokenizer import Tokenizer
from prune_cli.engine.compare import comparison_pairs, paired_bootstrap
from prune_cli.engine.masking import group_by_pattern, utterance_patterns
from prune_cli.engine.metrics import asr_scores, bleu_measurable, st_scores, utterance_score
from prune_cli.engine.session import Session, parse_context, split_spec
from prune_cli.errors import DataError, MissingInputError, UsageError
from prune_cli.gating.masks import MaskFile, mask_stats
from prune_cli.model.decoding import DecodeOptions, decode
from prune_cli.model.gated import GatedModel
from prune_cli.progress import log, progress
from prune_cli.recipe_checks import is_plain_name
from prune_cli.recipe_schema import EvalConfig
from prune_cli.variants import CONTEXT, STATIC, VARIANTS


def decode_split(
    s: Session, model: GatedModel, split: Split, idx: Sequence[int], patterns: Sequence, opts: DecodeOptions,
    batch_size: int, bar=None,  # noqa: ANN001
) -> dict[int, str]:
    """Hypothesis text per utterance index, batching within (context, mask pattern) groups."""
    tok = s.tokenizer
    hyps: dict[int, str] = {}
    for (_, pattern), members in group_by_pattern(split, idx, patterns).items():
        members = sorted(members, key=lambda i: split.feats[i].shape[0])
        u0 = split.utts[members[0]]
        prompt = tok.prompt(u0.task, u0.source_lang, u0.target_lang)
        task_opts = options_for_task(opts, u0.task)
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            x, lens = (t.to(s.device) for t in model_inputs(split, chunk, s.inputs_for(model)))
            for i, ids in zip(chunk, decode(model, x, lens, prompt, pattern, task_opts, tok.decode)):
                hyps[i] = tok.decode(ids)
            if bar is not None:
                bar.advance(len(chunk))
    return hyps


def scored_options(cfg: EvalConfig, tok: Tokenizer, model: GatedModel, seed: int) -> DecodeOptions:
    """The decoding whose output eval scores (profile times it too): the recipe's, with the model family's
    temperature fallback unless eval.temperatures names one."""
    temps = tuple(cfg.temperatures) if cfg.temperatures is not None else model.temperatures
    return DecodeOptions(cfg.beam_size, cfg.length_penalty, cfg.max_len_ratio, ctc_weight=cfg.ctc_weight,
                         n_specials=tok.n_specials, temperatures=temps,
                         compression_ratio_threshold=cfg.compression_ratio_threshold, logprob_threshold=cfg.logprob_threshold,
                         best_of=cfg.best_of, seed=seed, **token_rules(tok))


def token_rules(tok: Tokenizer) -> dict:
    """End of text and the tokens never decoded (Whisper's suppression lists; none for our own tokenizer)."""
    return {"eos": tok.eos, "suppress": tuple(tok.suppress), "suppress_begin": tuple(tok.suppress_begin)}


def options_for_task(opts: DecodeOptions, task: str) -> DecodeOptions:
    """The CTC head is trained on source transcripts, so joint CTC/attention scoring applies to ASR output only."""
    return opts if task == "asr" else replace(opts, ctc_weight=0.0)


def select_subset(split: Split, cap: int | None) -> list[int]:
    seen: dict[str, int] = {}
    out = []
    for i, u in enumerate(split.utts):
        if cap is None or seen.get(u.context, 0) < cap:
            seen[u.context] = seen.get(u.context, 0) + 1
            out.append(i)
    return out


@dataclass
class EvalSet:
    """A test set from outside the recipe (`eval --manifest PATH --name NAME`): scored into eval/sets/NAME/."""

    name: str
    path: Path
    split: Split
    fingerprint: str
    defaulted: int = 0  # utterances whose context came from --context / data.defaults, not from the data

    def record(self, utterances: dict[str, int]) -> dict[str, Any]:
        """What a summary says of the set it measured: `utterances` per context."""
        return {"name": self.name, "manifest": str(self.path.resolve()), "fingerprint": self.fingerprint,
                "utterances": dict(sorted(utterances.items())), "context_defaulted": self.defaulted}


def load_eval_set(s: Session, path: Path, name: str, context: str | None) -> EvalSet:
    """A test set from outside the recipe; `context` (e.g. `asr:de`) for utterances whose data names none.
    Read fresh every time (not cached in the run dir: an eval of another set writes only its own folder)."""
    if not is_plain_name(name):
        raise UsageError(f"--name {name!r}: a plain folder name (letters, digits, '.', '_', '-'), the set's folder under eval/sets/")
    if not path.exists():
        raise MissingInputError(f"--manifest {path}: not found (a JSONL manifest or a Kaldi data dir)")
    defaults = s.recipe.data.defaults if context is None else parse_context(context)
    split = load_split(replace(split_spec(s.recipe, "test"), path=path, defaults=defaults))
    return EvalSet(name, path, split, fingerprint(path), sum(u.context_defaulted for u in split.utts))


def evaluate(s: Session, variants: Sequence[str], contexts: Sequence[str] | None = None,
             eval_set: EvalSet | None = None) -> dict[str, Any]:
    """Decode and score; every file is written at the end, so a failed eval leaves earlier results as they were."""
    cfg = s.recipe.eval
    # `dense` is the base as trained; the masked variants run on the base their gates were trained with.
    masks: MaskFile | None = s.masks(variants) if any(VARIANTS[v].masked for v in variants) else None
    split = eval_set.split if eval_set is not None else s.split(cfg.split)
    where = f"the set {eval_set.name}" if eval_set is not None else f"the {cfg.split} split"
    present = {u.context for u in split.utts}
    unknown = [c for c in contexts or [] if c not in present]
    if unknown:  # before anything is written: existing results stay as they are
        raise UsageError([f"--contexts: no {c!r} utterances in {where} (it has: {', '.join(sorted(present))})" for c in unknown])
    idx = [i for i in select_subset(split, s.recipe.data.max_utts_per_context)
           if contexts is None or split.utts[i].context in contexts]
    nets = {v: s.variant_model(v) for v in variants}  # unreadable or mismatched checkpoints first
    check_scorable(split, idx, s.tokenizer.vocab)
    check_references(split, idx, cfg.normalize)
    fallbacks = resolve_contexts(masks, variants, {split.utts[i].context for i in idx}, cfg.unseen_contexts,
                                 Counter(split.utts[i].context for i in idx)) if masks is not None else {}
    opts = scored_options(cfg, s.tokenizer, nets[variants[0]], s.recipe.seed)
    # A subset (some variants or contexts) goes beside the full evaluation, never over it; another set, in its own folder.
    full = eval_set is None and contexts is None and list(variants) == list(cfg.variants)
    if eval_set is not None:
        out_dir = s.run.path / "eval" / "sets" / eval_set.name
    else:
        out_dir = s.run.path / "eval" if full else s.run.path / "eval" / "partial"
    norm = NORMALIZATION + (NUMBERS_NORMALIZATION if cfg.normalize == "numbers" else "")
    summary: dict[str, Any] = {"variants": {}, "signatures": {}, "normalization": norm,
                               "split": cfg.split if eval_set is None else None, "decoding": vars(opts), "complete": full}
    modes = {v: "padded" if n.padded_input else "variable" for v, n in nets.items() if hasattr(n, "padded_input")}
    if modes:  # Whisper: each model's input (model.whisper_input; model.pretrained_input for the untouched one)
        summary["input"] = modes
    if eval_set is not None:
        summary["set"] = {**eval_set.record(Counter(u.context for u in split.utts)), "skipped": split.skipped}
    if fallbacks:
        summary["fallbacks"] = fallbacks
    outputs: dict[Path, str] = {}
    rows: list[dict[str, Any]] = []
    tasks: dict[str, str] = {}
    refs_by_ctx: dict[str, list[str]] = {}
    hyps_by_variant: dict[str, dict[str, list[str]]] = {}
    with progress("eval", total=len(idx) * len(variants)) as bar:
        for variant in variants:
            net = nets[variant]
            patterns = utterance_patterns(s, variant, net, split, idx, masks, {c: f["to"] for c, f in fallbacks.items()})
            if masks is not None and VARIANTS[variant].masked:  # what the decoded masks skipped, per utterance on average
                summary.setdefault("sparsity", {})[variant] = mean_mask_stats(net, patterns, masks.meta.get("module_flops") or {})
            hyps = decode_split(s, net, split, idx, patterns, opts, cfg.batch_size, bar)
            by_ctx: dict[str, list[int]] = {}
            for i in idx:
                by_ctx.setdefault(split.utts[i].context, []).append(i)
            res: dict[str, Any] = {}
            for ctx in sorted(by_ctx):
                members = by_ctx[ctx]
                task = split.utts[members[0]].task
                u0 = split.utts[members[0]]
                raw_refs = [split.utts[i].text for i in members]
                raw_hs = [hyps[i] for i in members]
                form = scoring_form(cfg.normalize, task, u0.source_lang, u0.target_lang)
                refs, hs = [form(t) for t in raw_refs], [form(t) for t in raw_hs]
                tasks[ctx], refs_by_ctx[ctx] = task, refs
                hyps_by_variant.setdefault(variant, {})[ctx] = hs
                if task == "asr":
                    scores = asr_scores(refs, hs)
                else:
                    scores, summary["signatures"] = st_scores(refs, hs)
                res[ctx] = {"n": len(members), **{k: round(v, 3) for k, v in scores.items()}}
                name = ctx.replace(":", "_")
                outputs[out_dir / variant / f"{name}.hyp"] = "".join(h + "\n" for h in raw_hs)
                outputs[out_dir / variant / f"{name}.ref"] = "".join(r + "\n" for r in raw_refs)
                for i, r, h, sr, sh in zip(members, raw_refs, raw_hs, refs, hs):
                    rows.append({"variant": variant, "utt_id": split.utts[i].utt_id, "context": ctx, "ref": r, "hyp": h,
                                 **{k: round(v, 3) for k, v in utterance_score(task, sr, sh).items()}})
            summary["variants"][variant] = res
    # ST contexts whose references BLEU cannot score: their BLEU stays (0), out of the average and the bootstrap.
    unscorable = {ctx for ctx, task in tasks.items() if task == "st" and not bleu_measurable(refs_by_ctx[ctx])}
    summary["bleu_unscorable"] = sorted(unscorable)
    summary["averages"] = averages(summary["variants"], unscorable)
    pairs = comparison_pairs(list(variants))
    if cfg.bootstrap > 0 and pairs:
        summary["comparisons"] = paired_bootstrap(tasks, refs_by_ctx, hyps_by_variant, pairs, cfg.bootstrap, s.recipe.seed,
                                                  unscorable)
    outputs[out_dir / "utterances.jsonl"] = "".join(json.dumps(json_safe(r), ensure_ascii=False, allow_nan=False) + "\n" for r in rows)
    for path, text in outputs.items():
        atomic_write_text(path, text)
    atomic_write_json(out_dir / "summary.json", summary)  # last: a summary is there only when all its files are
    if full:
        s.run.update_metrics("eval", summary["averages"])
    return summary


def mean_mask_stats(model: GatedModel, patterns: Sequence, module_flops: dict[str, int]) -> dict[str, float]:
    """Sparsity per scope and prunable-FLOPs ratio of the masks eval decoded with, averaged over utterances: with
    per-utterance gates (acoustic or condition inputs) they differ between test sets."""
    flops = module_flops or {m.name: 1 for m in model.modules_list}
    rows = [mask_stats(model.modules_list, [int(k) for k in p], flops) for p in patterns]
    keys = [k for k in rows[0] if k.startswith("sparsity_")] + ["prunable_flops_ratio"] if rows else []
    return {k: round(sum(r[k] for r in rows) / len(rows), 4) for k in keys}


def check_scorable(split: Split, idx: Sequence[int], vocab: ContextVocab) -> None:
    """Before decoding: every context can be prompted (its task and languages were trained) and scored (asr or st)."""
    counts = Counter(split.utts[i].context for i in idx)
    first = {split.utts[i].context: split.utts[i] for i in reversed(idx)}
    problems = []
    for ctx, n in sorted(counts.items()):
        u = first[ctx]
        unknown = vocab.unknown(u.task, u.source_lang, u.target_lang)
        if unknown:
            problems.append(f"context {ctx} ({n} utterance(s)): {' and '.join(unknown)} not in this run's training data "
                            f"(tasks {', '.join(vocab.tasks)}; languages {', '.join(vocab.langs)})")
        elif u.task not in TASKS:
            problems.append(f"context {ctx} ({n} utterance(s)): eval scores {' and '.join(TASKS)} (WER/CER, BLEU/chrF); "
                            f"task {u.task} trains, prunes and profiles, but has no metric")
    if problems:
        raise DataError(problems)


def scoring_form(normalize: str, task: str, source_lang: str, target_lang: str):  # noqa: ANN201
    """The text form scoring compares: numbers as digits (eval.normalize: numbers) in the language scored (the
    source's for ASR, the target's for ST), or as is (the metrics normalize case and punctuation themselves)."""
    lang = source_lang if task == "asr" else target_lang
    return (lambda t: number_form(t, lang)) if normalize == "numbers" else (lambda t: t)


def check_references(split: Split, idx: Sequence[int], normalize: str) -> None:
    """Before decoding: a reference with nothing left to score after normalization (only emoji or punctuation) is an
    error naming its line, not a WER of 200."""
    problems = []
    for i in idx:
        u = split.utts[i]
        if not basic_normalize(scoring_form(normalize, u.task, u.source_lang, u.target_lang)(u.text)):
            problems.append(f"{u.where}: the reference {u.text!r} is empty once normalized ({NORMALIZATION}); nothing to score")
    if problems:
        raise DataError(problems + [f"{len(problems)} reference(s) with nothing to score"])


def resolve_contexts(masks: MaskFile, variants: Sequence[str], contexts: set[str], policy: str,
                     counts: Counter) -> dict[str, dict[str, Any]]:
    """Which trained context's mask serves each context that prune never saw (eval.unseen_contexts).

    `error`: none, the eval stops naming them. `static`: the static baseline's single mask. `nearest`: the trained
    context of the same task that shares the most with it, the source language counting over the target language
    (st:de-fr takes st:de-en before st:en-fr); ties go to the alphabetically first key."""
    trained = set(masks.variants.get(CONTEXT.name, {}))
    unseen = sorted(c for c in contexts if c not in trained and any(VARIANTS[v].masked for v in variants))
    if not unseen:
        return {}
    if policy == "error":
        raise MissingInputError([f"context {c} ({counts[c]} utterance(s)) has no trained mask; set eval.unseen_contexts "
                                 "to static or nearest to serve it with another" for c in unseen])
    out: dict[str, dict[str, Any]] = {}
    for c in unseen:
        if policy == STATIC.name:
            if STATIC.name not in masks.variants:
                raise MissingInputError(f"eval.unseen_contexts=static: masks.json has no {STATIC.name} masks for {c}")
            out[c] = {"to": STATIC.name, "n": counts[c]}
            continue
        task, langs = c.split(":", 1)
        src, _, tgt = langs.partition("-")
        same_task = [t for t in sorted(trained) if t.split(":", 1)[0] == task]
        if not same_task:
            raise MissingInputError(f"context {c}: no trained context of task {task} to borrow a mask from")

        def shared(t: str) -> int:
            t_src, _, t_tgt = t.split(":", 1)[1].partition("-")
            return 2 * (t_src == src) + (t_tgt == tgt and tgt != "")

        out[c] = {"to": sorted(same_task, key=lambda t: (-shared(t), t))[0], "n": counts[c]}
    log("unseen contexts: " + ", ".join(f"{c} -> {f['to']} ({f['n']} utterances)" for c, f in out.items()))
    return out


def averages(variants: dict[str, dict[str, dict[str, float]]], bleu_unscorable: set[str]) -> dict[str, dict[str, float]]:
    """Unweighted mean over contexts of each metric, per variant; BLEU only where it can score the references."""
    out: dict[str, dict[str, float]] = {}
    for v, table in variants.items():
        acc: dict[str, list[float]] = {}
        for ctx, scores in table.items():
            for k, val in scores.items():
                if k != "n" and not (k == "bleu" and ctx in bleu_unscorable):
                    acc.setdefault(k, []).append(val)
        out[v] = {k: round(sum(vals) / len(vals), 3) for k, vals in acc.items()}
    return out


def quality_gate(summary: dict[str, Any], max_wer: float | None, min_bleu: float | None) -> list[str]:
    """One line per context that misses a threshold."""
    fails = []
    unscorable = set(summary.get("bleu_unscorable", []))
    for v, table in summary["variants"].items():
        for ctx, sc in table.items():
            if max_wer is not None and "wer" in sc and sc["wer"] > max_wer:
                fails.append(f"{v} {ctx}: WER {sc['wer']:.2f} > --max-wer {max_wer}")
            if min_bleu is not None and "bleu" in sc and ctx not in unscorable and sc["bleu"] < min_bleu:
                fails.append(f"{v} {ctx}: BLEU {sc['bleu']:.2f} < --min-bleu {min_bleu}")
    return fails
