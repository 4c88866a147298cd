"""``diffmem audit``: detection, extraction and re-extraction attacks (and, with references, replication).

Any checkpoint, with or without an edit applied. With reference images, every audit runs the re-extraction attack
(Finding DoRI): a model that replicates no training image from its prompts can still be made to replicate one by
optimising the conditioning, and the audit says so.

With ``candidates``, a large prompt pool the user did not label, the audit first ranks the pool with a detector
(:func:`screen_candidates`) and adds the top flagged prompts (``flag_top``, or those above a threshold calibrated
on ``calibration``) to the prompts it attacks, so it finds memorized prompts nobody listed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.config import require
from diffmem.data import load_reference, read_entries, read_prompts, resolve_references
from diffmem.detection import DEFAULT_DETECTOR, DetectionResult, detect, detector_config
from diffmem.edits import apply_edit, check_output_dir, load_edit
from diffmem.evaluation import EvalConfig, evaluate
from diffmem.extraction import ExtractionConfig, extraction_attack
from diffmem.files import replace_dir
from diffmem.metrics import roc_curve
from diffmem.pipelines import load_pipeline
from diffmem.reextraction import ReextractConfig, ReextractItem, reextract
from diffmem.sampling import image_size
from diffmem.score import get_scorer
from diffmem.workflows.mitigate import OUTPUT_MARK
from diffmem.workflows.run import RunConfig

logger = logging.getLogger(__name__)

__all__ = ["AuditConfig", "CandidateScreen", "run_audit", "screen_candidates"]


@dataclass(kw_only=True)
class AuditConfig(RunConfig):
    """Settings of ``diffmem audit`` on any checkpoint (and those of :class:`~diffmem.workflows.run.RunConfig`).

    Args:
        prompts: Prompt file or manifest to audit.
        references: Manifest or folder with ``references.jsonl``; without references the audit stops at
            detection and the generate-and-filter attack.
        calibration: Non-memorized prompts (calibrate detection flags and the attack threshold).
        candidates: A prompt pool (file or manifest) to screen with the detector; its top flagged prompts join
            ``prompts`` in the attacks.
        edit: A saved edit applied (reversibly) before the audit.
        method: Registered detector of the detection and the screening (``diffmem.detection.list_detectors()``).
        detect_num_seeds: Noises per prompt of the detector.
        flag_top: Pass the ``flag_top`` highest-scoring candidates on (with ``calibration``: at most that many of
            those above the calibrated threshold). Default: 16 without calibration, all above it with.
        m: Width of the calibrated threshold (``mean + m * std`` of the calibration scores).
        attack_generations: Generations per prompt in Carlini et al.'s attack.
        num_seeds: Seeds per prompt when measuring replication with the references.
        quick: Reduced settings.
    """

    out: str = "runs/audit"
    prompts: str | None = None
    references: str | None = None
    calibration: str | None = None
    candidates: str | None = None
    edit: str | None = None
    method: str = DEFAULT_DETECTOR
    detect_num_seeds: int = 4
    flag_top: int | None = None
    m: float = 3.0
    attack_generations: int = 16
    num_seeds: int = 8
    quick: bool = False

    def check(self) -> None:
        super().check()
        require(self.prompts is not None or self.candidates is not None, "prompts", self.prompts,
                "give the prompts to audit, a candidate pool to screen, or both")
        require(self.flag_top is None or self.flag_top >= 1, "flag_top", self.flag_top, "must be >= 1")


@dataclass
class CandidateScreen:
    """The detector's ranking of a candidate pool and the prompts it passes on to the attacks.

    Args:
        result: The detection result over the whole pool.
        flagged: Indices into the pool of the prompts passed on, highest score first.
        rule: How they were chosen, in words.
    """

    result: DetectionResult
    flagged: list[int]
    rule: str

    def summary(self, top: int = 50) -> dict[str, Any]:
        ranked = self.result.ranked()[:top]
        return {**self.result.summary(), "rule": self.rule, "num_passed_on": len(self.flagged),
                "passed_on": [self.result.prompts[i] for i in self.flagged], "top": ranked}


def screen_candidates(pipe, prompts: list[str], detect_config: Any, flag_top: int | None = None,
                      calibration_prompts: list[str] | None = None, m: float = 3.0,
                      labels: list[bool] | None = None, progress: bool = True) -> CandidateScreen:
    """Rank a prompt pool with a detector and choose the prompts to attack.

    Args:
        pipe: The audited pipeline.
        prompts: The pool.
        detect_config: Config of any registered detector.
        flag_top: Keep at most this many, best first (default 16 without calibration).
        calibration_prompts: Known non-memorized prompts: keep only scores above ``mean + m * std`` of theirs.
        m: Width of the calibrated threshold.
        labels: Optional ground truth of the pool (AUC in the result).
        progress: Show progress bars.

    Returns:
        A :class:`CandidateScreen`.
    """
    res = detect(pipe, prompts, detect_config, labels=labels, calibration_prompts=calibration_prompts, m=m,
                 progress=progress)
    order = res.top(len(prompts))
    if res.flagged is not None:
        order = [i for i in order if res.flagged[i]]
        rule = f"score > {res.threshold:.4g} (mean + {m:g} std of {len(calibration_prompts or [])} calibration prompts)"
        if flag_top is not None:
            order, rule = order[:flag_top], rule + f", at most {flag_top}"
    else:
        k = 16 if flag_top is None else flag_top
        order, rule = order[:k], f"the {k} highest scores"
    return CandidateScreen(res, order, rule)


def run_audit(config: AuditConfig, progress: bool = True) -> dict[str, Any]:
    """Detection, extraction attack, re-extraction attack and (with references) replication of any checkpoint.

    Returns:
        The report (also written to ``<out>/report.json`` and ``report.html``).
    """
    from diffmem.workflows.report import write_report

    t0 = time.time()
    out = Path(config.out)
    check_output_dir(out, True, config.model, marks=(OUTPUT_MARK,))
    entries = read_entries(config.prompts, allow_outside=config.allow_outside) if config.prompts else []
    refs = resolve_references(config.references, entries, allow_outside=config.allow_outside) if entries else []
    pool = read_entries(config.candidates, allow_outside=config.allow_outside) if config.candidates else []
    pool_refs = resolve_references(config.references, pool, allow_outside=config.allow_outside) if pool else []
    calib = read_prompts(config.calibration) if config.calibration else None
    edit = load_edit(config.edit) if config.edit else None
    config.resolve_sampler(config.model)  # checks the settings before the model loads
    pipe = load_pipeline(config.model, allow_pickle=config.allow_pickle)
    pipe.set_progress_bar_config(disable=True)
    sampler = config.resolve_sampler(pipe)
    sampler.apply_scheduler(pipe)
    size = image_size(pipe, sampler.height, sampler.width)
    scorer = get_scorer(config.scorer, fallback="ssim") if config.scorer == "sscd" else get_scorer(config.scorer)
    report: dict[str, Any] = {"title": "diffmem audit", "model": config.model, "sampler": sampler.to_dict(),
                              "settings": config.to_dict(), "scorer": scorer.describe()}
    with apply_edit(pipe, edit):
        # score_steps=5: wen's measured default; other detectors keep their own
        dcfg = detector_config(config.method, sampler=sampler, num_seeds=1 if config.quick else config.detect_num_seeds,
                               score_steps=5 if config.method == "wen" else None)
        if pool:
            pool_labels = [e.memorized for e in pool] if any(e.memorized for e in pool) else None
            screen = screen_candidates(pipe, [e.prompt for e in pool], dcfg, config.flag_top, calib, config.m,
                                       labels=pool_labels, progress=progress)
            report["candidates"] = screen.summary()
            listed = {e.prompt for e in entries}
            for i in screen.flagged:
                if pool[i].prompt not in listed:
                    entries.append(pool[i])
                    refs.append(pool_refs[i])
                    listed.add(pool[i].prompt)
            logger.info("screened %d candidates with %s: %d passed on (%s)", len(pool), config.method,
                        len(screen.flagged), screen.rule)
        ref_imgs = [None if r is None else load_reference(r, size, row=e) for r, e in zip(refs, entries)]
        labels = [e.memorized for e in entries] if any(e.memorized for e in entries) else None
        det = detect(pipe, [e.prompt for e in entries], dcfg, labels=labels, calibration_prompts=calib,
                     progress=progress)
        report["detection"] = {**det.summary(), "scores": [{"prompt": r["prompt"], "score": r["score"],
                                                            "memorized": r.get("memorized", False)} for r in det.ranked()]}
        if det.labels is not None and det.auc is not None:
            fpr, tpr, _ = roc_curve(det.scores, det.labels)
            report["detection"]["roc"] = {"fpr": [float(x) for x in fpr], "tpr": [float(x) for x in tpr]}
        acfg = ExtractionConfig(num_generations=4 if config.quick else config.attack_generations,
                            clique_size=2 if config.quick else 4, threshold=None if calib else scorer.threshold,
                            sampler=sampler)
        att = extraction_attack(pipe, [e.prompt for e in entries], acfg, scorer,
                                references=ref_imgs if any(r is not None for r in ref_imgs) else None,
                                calibration_prompts=calib, progress=progress)
        report["attack"] = {"before": att.summary()}
        with_refs = [(e, r) for e, r in zip(entries, ref_imgs) if r is not None]
        if with_refs:
            from dataclasses import replace

            rows = [replace(e, reference=ref) for e, ref in zip(entries, refs) if ref is not None]
            res = evaluate(pipe, rows, EvalConfig(num_seeds=2 if config.quick else config.num_seeds, sampler=sampler),
                           scorer, progress=progress)
            report["before"] = res.summary()
            items = [ReextractItem(e.prompt, r, "memorized" if e.memorized or labels is None else "control", i)
                     for i, (e, r) in enumerate(with_refs)]
            steps = 10 if config.quick else config.opt_steps
            rcfg = ReextractConfig(opt_steps=steps, checkpoints=tuple(c for c in (0, 10, 25, 50) if c <= steps),
                                   num_seeds=2 if config.quick else 4, sampler=sampler)
            rex = reextract(pipe, items, rcfg, scorer, progress=progress)
            report["reextract"] = {"audited model": rex.summary()}
        else:
            report["reextract_note"] = "no reference images: the re-extraction attack needs the training images"
            logger.warning("no reference images: the re-extraction attack was not run")
    report["total_seconds"] = round(time.time() - t0, 1)
    lines = [f"diffmem audit of {config.model}: {len(entries)} prompts"]
    if "candidates" in report:
        c = report["candidates"]
        lines.append(f"  screened {c['num_prompts']} candidates with {c['method']}: {c['num_passed_on']} passed on "
                     f"({c['rule']})" + (f", AUC {c['auc']:.3f}" if c.get("auc") is not None else ""))
    if det.auc is not None:
        lines.append(f"  detection AUC {det.auc:.3f}, TPR@1%FPR {det.tpr_at_1fpr:.3f}")
    s = report["attack"]["before"]
    lines.append(f"  extraction attack: {s['num_flagged']} prompts flagged, {s['num_verified_prompts']} verified")
    if "reextract" in report:
        r = report["reextract"]["audited model"]
        lines.append(f"  re-extraction attack: memorization rate {r['memorization_rate']}, control {r['control_rate']}")
        rr = [x.get("replication_rate") for x in report["before"].values() if isinstance(x, dict) and
              x.get("replication_rate") is not None]
        if rr:
            lines.append(f"  replication with the prompts: {float(np.mean(rr)):.3f}")
    lines.append(f"report: {out / 'report.html'}")
    report["headline_text"] = "\n".join(lines)
    replace_dir(out, lambda folder: write_report(report, folder))
    return report
