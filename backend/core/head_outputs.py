"""Which output of a multi-output head a run explains (`model.output`, `model.output_score`).

A 2-label classifier (safe / injection), or a multi-objective head (one value per objective),
gives several numbers per text; a run explains one of them. This module resolves the config's
choice against the head's outputs -- by 0-based index or by label name -- and turns the head's
[N, n_outputs] values into the one score per read. Torch-free to import: the server checks a
local model's config.json with it before queueing a run; `select` only calls tensor methods.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

OUTPUT_SCORES = ("logit", "probability", "log_odds")
SCORE_WORDS = {"logit": "logit", "probability": "probability (softmax over the head's outputs)",
               "log_odds": "log-odds (log p / (1 - p))"}


class OutputError(ValueError):
    """model.output / model.output_score do not fit the head; the message names the key."""


@dataclass(frozen=True)
class HeadOutput:
    """One output of a head with `n_outputs` values, and how it becomes the score."""
    index: int
    name: str | None
    n_outputs: int
    score: str = "logit"

    def select(self, values):
        """[N, n_outputs] head values (a torch tensor) -> [N] scores."""
        values = values.float()
        if self.score == "probability":
            return values.softmax(dim=-1)[:, self.index]
        if self.score == "log_odds":
            log_p = values.log_softmax(dim=-1)
            others = log_p.clone()
            others[:, self.index] = float("-inf")
            return log_p[:, self.index] - others.logsumexp(dim=-1)
        return values[:, self.index]

    def describe(self) -> str:
        """What a page says the run explains, e.g. `output 1 "injection" of 2, log-odds (...)`."""
        named = f' "{self.name}"' if self.name else ""
        return f"output {self.index}{named} of {self.n_outputs}, {SCORE_WORDS[self.score]}"

    def record(self) -> dict[str, Any]:
        """The run's record of it (the store's run_info, GET /api/runs/{run})."""
        return {"output_index": self.index, "output_name": self.name, "n_outputs": self.n_outputs,
                "output_score": self.score, "output": self.describe()}


def _listing(names: Sequence[str] | None, n_outputs: int) -> str:
    if not names:
        return f"indices 0..{n_outputs - 1}"
    return ", ".join(f"{i} {name!r}" for i, name in enumerate(names))


def resolve_output(output: int | str | None, score: str, n_outputs: int,
                   names: Sequence[str] | None = None) -> HeadOutput | None:
    """The head output a config names; None for a one-output head left unnamed (its value is the
    score). Refuses (OutputError naming the key) an index or name the head does not have, a
    multi-output head with no choice, and a probability of a single output."""
    if score not in OUTPUT_SCORES:
        raise OutputError(f"model.output_score: {score!r} is not one of {', '.join(OUTPUT_SCORES)}")
    names = list(names) if names else None
    if names is not None and len(names) != n_outputs:
        raise OutputError(f"model.output: the head has {n_outputs} outputs but {len(names)} names")
    if output is None:
        if n_outputs == 1:
            if score != "logit":
                raise OutputError(f"model.output_score: {score!r} needs a head with at least 2 outputs; this one has 1")
            return None
        raise OutputError(f"model.output: the head has {n_outputs} outputs ({_listing(names, n_outputs)}): name the "
                          "one the run explains, by index or label name")
    index = _index_of(output, n_outputs, names)
    if score != "logit" and n_outputs < 2:
        raise OutputError(f"model.output_score: {score!r} needs a head with at least 2 outputs; this one has 1")
    return HeadOutput(index, names[index] if names else None, n_outputs, score)


def _index_of(output: int | str, n_outputs: int, names: list[str] | None) -> int:
    if isinstance(output, str) and names and output in names:
        return names.index(output)
    if isinstance(output, str) and names:
        folded = [n.lower() for n in names]
        if output.lower() in folded:
            return folded.index(output.lower())
    if isinstance(output, str) and not output.strip().isdigit():
        raise OutputError(f"model.output: {output!r} is not a label of this head ({_listing(names, n_outputs)})")
    index = int(output)
    if not 0 <= index < n_outputs:
        raise OutputError(f"model.output: {index} is not an output of this head, which has {n_outputs} "
                          f"({_listing(names, n_outputs)})")
    return index


def hf_label_names(hf_config: dict) -> list[str] | None:
    """A HF config's label names in index order (id2label), None when it has none."""
    id2label = hf_config.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        by_index = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        return None
    if sorted(by_index) != list(range(len(by_index))):
        return None
    return [by_index[i] for i in range(len(by_index))]


def hf_output_count(hf_config: dict) -> int | None:
    """How many outputs a HF config's head has (num_labels, else id2label's size)."""
    names = hf_label_names(hf_config)
    n = hf_config.get("num_labels")
    if isinstance(n, int) and not isinstance(n, bool):
        return n
    return len(names) if names else None
