"""The `explanations` job: explain, classify and score chosen features of one layer.

Stages run in that order, each over every chosen feature; after each feature the job reports its
progress (% and features done) and its result so far, so a cancelled or failed job shows what it
did. Every explanation, classification and score is written to the SQL database as soon as it is
made: a job that stops keeps them. A feature whose stage was already done with the same model and
prompt version is skipped (unless `overwrite`), so submitting the same job again resumes it.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from backend.core import embedding, explanations, store
from backend.core.llm import Endpoint, LLMError, ReplyError, chat_json, malformed
from workers.ablation import FeatureEdit, run_ablation
from workers.explanations import explainers, prompts, scorers
from workers.explanations.evidence import HeldOut
from workers.explanations.prompts import join_tokens
from workers.job_errors import JobFailed

STAGES = ("explain", "classify", "score")
# A feature whose replies stay unusable after every try is passed over; this many in a row mean the
# model cannot do the task at all, and the job stops
MAX_FAILED_IN_A_ROW = 3
KEYWORD_SCORER = "keyword match (offline)"


class Tally:
    """What the job has done so far: its result."""

    def __init__(self, params: dict, endpoint: Endpoint | None):
        self.model = endpoint.model if endpoint else None
        self.counts = {stage: {"done": 0, "skipped": 0, "missing": 0, "failed": 0} for stage in params["stages"]}
        self.tokens = {stage: 0 for stage in params["stages"]}
        self.features_done: list[int] = []
        self.failures: list[dict] = []  # {stage, feature, error}: features passed over

    def result(self, n_features: int) -> dict[str, Any]:
        calls = sum(c["done"] for c in self.counts.values())
        return {"model": self.model or explainers.OFFLINE_MODEL, "offline": self.model is None,
                "prompt_versions": {"explain": prompts.EXPLAIN_VERSION, "classify": prompts.CLASSIFY_VERSION,
                                    "score": prompts.SCORE_VERSION},
                "stages": self.counts, "tokens": self.tokens, "tokens_total": sum(self.tokens.values()),
                "tokens_per_feature": sum(self.tokens.values()) / max(1, n_features) if calls else 0.0,
                "features_done": len(self.features_done), "n_features": n_features, "failures": self.failures}

    def kept(self) -> str:
        n = sum(c["done"] for c in self.counts.values())
        if not n:
            return "Nothing was written before it"
        return f"The {n} explanations, classifications and scores written before it are kept"


def llm_detector(endpoint: Endpoint, tally: Tally) -> scorers.Detector:
    def detect(explanation: str, snippets: list[str], kind: str) -> np.ndarray:
        if kind == "detect":
            prompt, key, system = prompts.detect_prompt(explanation, snippets), "active", prompts.DETECT_SYSTEM
        else:
            prompt, key, system = prompts.fuzz_prompt(explanation, snippets), "correct", prompts.FUZZ_SYSTEM
        schema = prompts.numbers_schema(key, len(snippets))

        def check(data: dict) -> None:
            if not isinstance(data[key], list):
                raise malformed(endpoint, f"{key!r} is not a list")

        reply = chat_json(endpoint, system, prompt, schema, kind, check)
        tally.tokens["score"] += reply.tokens
        numbers = reply.data[key]
        picked = np.zeros(len(snippets), dtype=bool)
        for n in numbers:
            if isinstance(n, int) and 1 <= n <= len(snippets):
                picked[n - 1] = True
        return picked
    return detect


def keyword_detector(explanation: str, snippets: list[str], kind: str) -> np.ndarray:
    return scorers.keyword_pick(explanation, snippets, marked_only=kind == "fuzz")


class ExplanationJob:
    def __init__(self, params: dict, ctx):
        self.params, self.ctx = params, ctx
        self.run = ctx.cache.get(params["run_id"])
        self.layer = int(params["layer"])
        self.features = [int(f) for f in params["features"]]
        self.endpoint = Endpoint.from_params(params, ctx.settings)
        self.tally = Tally(params, self.endpoint)
        self.overwrite = bool(params.get("overwrite"))
        self.reward = params.get("reward") or "the reward model's score"
        self.job_id = (ctx.job or {}).get("id")
        self.author = (ctx.job or {}).get("author") or "worker"
        self._held: HeldOut | None = None
        self._ranks: dict[int, float] | None = None
        self._shuffled_from: int | None = None  # whose explanation the last shuffled baseline used
        self._failed_in_a_row = 0

    # --- bookkeeping ---------------------------------------------------------------------
    @property
    def model(self) -> str:
        return self.endpoint.model if self.endpoint else explainers.OFFLINE_MODEL

    def card(self, feature: int) -> dict:
        return store.feature(self.run.store_path, self.layer, feature)

    def current(self, feature: int) -> dict | None:
        return explanations.current(self.ctx.settings, self.params["run_id"], self.layer, feature)

    def run_all(self) -> dict:
        stages = [s for s in STAGES if s in self.params["stages"]]
        total, step = len(stages) * len(self.features), 0
        for stage in stages:
            self._failed_in_a_row = 0
            for i, feature in enumerate(self.features):
                self.ctx.report(step / total, f"{stage}: feature {feature} ({i} of {len(self.features)} done)")
                outcome = self.attempt(stage, feature)
                self.tally.counts[stage][outcome] += 1
                if stage == stages[-1] and outcome in ("done", "skipped") and feature not in self.tally.features_done:
                    self.tally.features_done.append(feature)
                step += 1
                partial = getattr(self.ctx, "partial", None)
                if partial is not None:
                    partial(self.tally.result(len(self.features)))
        self.ctx.report(1.0, "done")
        return self.tally.result(len(self.features))

    def attempt(self, stage: str, feature: int) -> str:
        """One stage on one feature: its outcome, or "failed" where the model's replies stayed
        unusable; the job stops on an endpoint error or MAX_FAILED_IN_A_ROW such failures."""
        try:
            outcome = getattr(self, stage)(feature)
        except ReplyError as exc:
            self._failed_in_a_row += 1
            self.tally.tokens[stage] += exc.tokens
            self.tally.failures.append({"stage": stage, "feature": feature, "error": str(exc)})
            if self._failed_in_a_row >= MAX_FAILED_IN_A_ROW:
                raise_failed(f"{stage} stopped at feature {feature}: {self._failed_in_a_row} features in a row got "
                             f"no usable reply; the last: {str(exc).rstrip('.')}. {self.tally.kept()}; a model that "
                             "follows the JSON instructions (RA_LLM_MODEL) or another RA_LLM_JSON_MODE may do better; "
                             "submit the job again to resume.")
            return "failed"
        except LLMError as exc:
            raise_failed(f"{stage} stopped at feature {feature}: {str(exc).rstrip('.')}. {self.tally.kept()}; "
                         "submit the job again to resume (finished features are skipped).")
        self._failed_in_a_row = 0
        return outcome

    # --- stages ------------------------------------------------------------------------
    def explain(self, feature: int) -> str:
        mine = self.current(feature)
        if mine and mine["model"] == self.model and mine["prompt_version"] == prompts.EXPLAIN_VERSION and (
                not self.overwrite or (self.job_id is not None and mine["job_id"] == self.job_id)):
            if mine.get("evidence") is None:  # written before explanations kept their evidence
                evidence = self.evidence(self.card(feature))
                if evidence:
                    explanations.set_evidence(self.ctx.settings, mine["id"], evidence, embedding.embed([evidence])[0])
            return "skipped"
        card = self.card(feature)
        if self.endpoint is None:
            written, explainer = explainers.explain_offline(card), "offline"
        else:
            written = explainers.explain_llm(self.endpoint, self.layer, feature, card, self.reward,
                                             self.moving_contexts(card))
            explainer = "llm"
        self.tally.tokens["explain"] += written.tokens
        evidence = self.evidence(card)
        vectors = embedding.embed([written.text] + ([evidence] if evidence else []))
        explanations.write(self.ctx.settings, self.params["run_id"], self.layer, feature, written.text,
                           explainer=explainer, model=self.model, prompt_version=prompts.EXPLAIN_VERSION,
                           tokens=written.tokens, embedding=vectors[0], author=self.author, job_id=self.job_id,
                           evidence=evidence, evidence_embedding=vectors[1] if evidence else None)
        return "done"

    def classify(self, feature: int) -> str:
        mine = self.current(feature)
        if mine is None:
            return "missing"
        tag = f"{self.model if self.endpoint else explainers.OFFLINE_CLASSIFIER} @ {prompts.CLASSIFY_VERSION}"
        if mine["classified_by"] == tag and not self.overwrite:
            return "skipped"
        card = self.card(feature)
        if self.endpoint is None:
            (value, reason), tokens = explainers.classify_offline(card, self.attribution_ranks()), 0
        else:
            value, reason, tokens = explainers.classify_llm(self.endpoint, self.reward, mine["text"], card)
        self.tally.tokens["classify"] += tokens
        explanations.classify(self.ctx.settings, mine["id"], value, reason, tag, tokens)
        return "done"

    def score(self, feature: int) -> str:
        mine = self.current(feature)
        if mine is None:
            return "missing"
        scorer = f"{self.model} (LLM)" if self.endpoint else KEYWORD_SCORER
        tag = f"{scorer} @ {prompts.SCORE_VERSION}"
        if mine["scored_by"] == tag and not self.overwrite:
            return "skipped"
        held = self.held()
        card = self.card(feature)
        detect = llm_detector(self.endpoint, self.tally) if self.endpoint else keyword_detector
        n = int(self.params.get("n_snippets") or 10)
        index = {text_id: i for i, text_id in enumerate(held.text_ids)}
        seen = {index[c["text_id"]] for c in (card["contexts"] or []) + (card["quantile_contexts"] or [])
                if c.get("text_id") in index}  # the explainer's evidence is not scored on
        unit = held.feature(feature)
        chosen = scorers.scoring_set(unit, n, seen, seed=feature)
        deltas = held.feature_deltas(feature)
        sign, sign_from = scorers.effect_sign(card, deltas, chosen.active)
        real = scorers.score_one(held, mine["text"], chosen, deltas, sign, detect, seed=feature)
        other = self.shuffled_text(feature)
        shuffled = scorers.score_one(held, other, chosen, deltas, sign, detect, seed=feature) if other else None
        u = held.random_direction(feature)
        control = scorers.scoring_set(held.direction(u), n, seen, seed=feature, fires=False)
        random_dir = scorers.score_one(held, mine["text"], control, held.direction_deltas(u), sign, detect,
                                       seed=feature)
        scores = scorers.combine(real, shuffled, random_dir, scorer, sign_from)
        scores["n_texts"], scores["shuffled_from"] = len(held.texts), self._shuffled_from if other else None
        explanations.set_scores(self.ctx.settings, mine["id"], scores, tag)
        return "done"

    # --- what the stages share -----------------------------------------------------------
    @staticmethod
    def evidence(card: dict) -> str | None:
        """What the explanation is written from, searched beside it: the feature's top tokens."""
        return explanations.evidence_text([join_tokens([t["token"]]) for t in explainers.top_tokens(card)])

    def held(self) -> HeldOut:
        if self._held is None:
            self.ctx.report(message="reading held-out texts for scoring")
            self._held = HeldOut.load(self.run, self.layer, int(self.params.get("n_texts") or 400))
        return self._held

    def shuffled_text(self, feature: int) -> str | None:
        """Another feature's explanation: the next chosen feature's that has one, else any of the layer's."""
        order = self.features[self.features.index(feature) + 1:] + self.features[:self.features.index(feature)]
        found = explanations.for_features(self.ctx.settings, self.params["run_id"], self.layer, order)
        for other in order:
            if other in found and found[other]["text"] != (self.current(feature) or {}).get("text"):
                self._shuffled_from = other
                return found[other]["text"]
        for other, row in explanations.for_layer(self.ctx.settings, self.params["run_id"], self.layer).items():
            if other != feature:
                self._shuffled_from = other
                return row["text"]
        return None

    def attribution_ranks(self) -> dict[int, float]:
        """Per feature that fired: the share of the layer's firing features below its |attribution|."""
        if self._ranks is None:
            path = self.run.store_path
            d_sae = store.layer_info(path, self.layer)["d_sae"]
            rows = store.features(path, self.layer, sort="attribution", limit=d_sae).rows
            values = {r["feature"]: abs(r["attribution"]) for r in rows if r.get("attribution") is not None}
            ordered = np.sort(np.array(list(values.values())))
            self._ranks = {f: float(np.searchsorted(ordered, v, side="left") / max(1, len(ordered)))
                           for f, v in values.items()}
        return self._ranks

    def moving_contexts(self, card: dict) -> list[tuple[float, str]]:
        """The top contexts whose text's reward moves most when the feature is zeroed there."""
        contexts = [c for c in (card.get("contexts") or [])[:explainers.N_TOP_CONTEXTS] if c.get("text_id") is not None]
        by_text = {c["text_id"]: c for c in contexts}
        if not by_text:
            return []
        ids = list(by_text)
        texts = [store.text(self.run.store_path, i)["text"] for i in ids]
        sae = self.run.sae(self.layer)
        directions, linear = self.run.decoder(self.layer)
        result = run_ablation(self.run.adapter, sae, self.layer, texts,
                              FeatureEdit((card["feature"],), "zero", 0.0), np.zeros(sae.cfg.d_sae, np.float32),
                              "mean", 16, None, directions, linear, "text")
        deltas = np.bincount(result.text_index, weights=result.delta, minlength=len(ids)) / np.maximum(
            np.bincount(result.text_index, minlength=len(ids)), 1)
        order = np.argsort(-np.abs(deltas))[:explainers.N_MOVING]
        return [(float(deltas[k]), explainers._marked(by_text[ids[k]])) for k in order]


def raise_failed(message: str):
    raise JobFailed(message)


def explanations_task(params: dict, ctx) -> dict:
    return ExplanationJob(params, ctx).run_all()
