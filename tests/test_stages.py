"""Every analysis stage is whole: its store columns and tables declared in the schema and added by
no other stage, what it needs added before it, its run-page sections declared on the web side
(and every section's analysis declaring it back), each section's template present; and the
check itself catches an analysis that lacks any of these."""
from __future__ import annotations

import pkgutil
from pathlib import Path

import pytest

import backend.web.sections
import workers.analyses
from backend.core.store_schema import TABLES
from backend.web.sections import SECTIONS, Section
from workers.analyses import ANALYSES, analysis_stages
from workers.layer_stages import LAYER_STAGES
from workers.publish import WRITTEN_TABLES
from workers.stages import Stage, StageOutput, frame

TEMPLATES = Path(__file__).resolve().parents[1] / "frontend" / "templates"
CORPUS_TABLES = ("texts", "reward_reads")  # the pipeline's own (workers/pipeline.py corpus_tables), not a stage's
FRAME = {table: tuple(columns) for table, columns in frame([0], {0: 1}).items()}  # the rows stages add beside


def missing_parts(layer_stages: list[Stage], analyses: list[Stage], sections: tuple[Section, ...]) -> list[str]:
    """What any stage or section lacks, in words; [] when the catalogue is whole."""
    stages = [*layer_stages, *analyses]
    return [*_store_problems(stages), *_need_problems(stages), *_section_problems(stages, sections)]


def _store_problems(stages: list[Stage]) -> list[str]:
    problems = []
    owners: dict[str, list[str]] = {}
    for stage in stages:
        for table, names in (("layers", stage.layer_columns), ("features", stage.feature_columns)):
            for name in names:
                if name not in TABLES[table].names:
                    problems.append(f"stage {stage.name}: {table}.{name} is not in backend/core/store_schema.py")
                owners.setdefault(f"{table}.{name}", []).append(stage.name)
        for table in stage.tables:
            if table not in WRITTEN_TABLES:
                problems.append(f"stage {stage.name}: table {table} is not a store table (workers/publish.py)")
            owners.setdefault(table, []).append(stage.name)
    for table in ("layers", "features"):
        for name in TABLES[table].names:
            given = owners.get(f"{table}.{name}", []) + (["frame"] if name in FRAME[table] else [])
            if len(given) != 1:
                problems.append(f"{table}.{name} is added by {len(given)} stages ({', '.join(given) or 'none'})")
    for table in WRITTEN_TABLES:
        given = owners.get(table, []) + (["corpus"] if table in CORPUS_TABLES + ("layers", "features") else [])
        if len(given) != 1:
            problems.append(f"table {table} is added by {len(given)} stages ({', '.join(given) or 'none'})")
    return problems


def _need_problems(stages: list[Stage]) -> list[str]:
    problems = []
    added = {f"{table}.{name}" for table, names in FRAME.items() for name in names}
    for stage in stages:
        problems += [f"stage {stage.name} needs {need}, which no stage before it adds"
                     for need in stage.needs if need not in added]
        added |= {f"layers.{name}" for name in stage.layer_columns}
        added |= {f"features.{name}" for name in stage.feature_columns}
    return problems


def _section_problems(stages: list[Stage], sections: tuple[Section, ...]) -> list[str]:
    problems = []
    by_name = {section.name: section for section in sections}
    drawn = {name: stage.name for stage in stages for name in stage.sections}
    for name, stage in drawn.items():
        if name not in by_name:
            problems.append(f"stage {stage} draws section {name}, which backend/web/sections does not declare")
        elif by_name[name].analysis != stage:
            problems.append(f"section {name} says it draws {by_name[name].analysis}, stage {stage} says it draws it")
    stage_names = {stage.name for stage in stages}
    for section in sections:
        if section.analysis is not None and section.name not in drawn:
            known = "does not list it" if section.analysis in stage_names else "is no stage"
            problems.append(f"section {section.name} draws {section.analysis}, which {known}")
        if not (TEMPLATES / section.template).is_file():
            problems.append(f"section {section.name} has no template frontend/templates/{section.template}")
    return problems


def test_every_stage_and_section_is_whole():
    assert missing_parts(LAYER_STAGES, analysis_stages(), SECTIONS) == []


def test_every_analysis_module_runs_and_every_section_module_is_shown():
    modules = {m.name for m in pkgutil.iter_modules(workers.analyses.__path__)}
    assert modules == set(ANALYSES), "an analysis module is not in ANALYSES (workers/analyses/__init__.py)"
    shown = {section.data.__module__.rsplit(".", 1)[1] for section in SECTIONS}
    assert {m.name for m in pkgutil.iter_modules(backend.web.sections.__path__)} == shown


def test_every_run_template_is_a_section_s_or_the_run_page_s_own():
    run_page = (TEMPLATES / "run.html").read_text()
    own = {path.name for path in TEMPLATES.glob("_run_*.html") if f'"{path.name}"' in run_page}
    assert {path.name for path in TEMPLATES.glob("_run_*.html")} - own == {s.template for s in SECTIONS}


def test_a_layer_s_progress_is_shared_out_whole():
    assert sum(stage.share for stage in LAYER_STAGES) == pytest.approx(1.0)


def _novel(**declared) -> Stage:
    return Stage("novel", lambda ctx: StageOutput(), **{"sections": ("novel",), **declared})


@pytest.mark.parametrize("stage, sections, problem", [
    (_novel(feature_columns=("novel_score",)), SECTIONS,
     "stage novel: features.novel_score is not in backend/core/store_schema.py"),
    (_novel(), SECTIONS, "stage novel draws section novel, which backend/web/sections does not declare"),
    (_novel(), SECTIONS + (Section("novel", "novel", lambda *a: None),),
     "section novel has no template frontend/templates/_run_novel.html"),
    (_novel(sections=()), SECTIONS + (Section("mmcs2", "novel", lambda *a: None),),
     "section mmcs2 draws novel, which does not list it"),
    (_novel(sections=(), feature_columns=("reason_score",)), SECTIONS,
     "features.reason_score is added by 2 stages (reason_score, novel)"),
    (_novel(sections=(), tables=("lexicon_words",)), SECTIONS,
     "table lexicon_words is added by 2 stages (lexicon, novel)"),
    (_novel(sections=(), needs=("features.novel_input",)), SECTIONS,
     "stage novel needs features.novel_input, which no stage before it adds"),
])
def test_an_analysis_lacking_a_part_is_named(stage, sections, problem):
    assert problem in missing_parts(LAYER_STAGES, [*analysis_stages(), stage], sections)


def test_a_store_column_no_stage_adds_is_named():
    analyses = [s for s in analysis_stages() if s.name != "reason_score"]
    assert "features.reason_score is added by 0 stages (none)" in missing_parts(LAYER_STAGES, analyses, SECTIONS)
