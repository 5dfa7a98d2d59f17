"""A run's data in other tools' formats, torch-free so the web app serves them: the layer's feature
table (CSV, Parquet), labels with their features' statistics and history, and Neuronpedia's import
layout. The SAEDashboard page needs the model and lives in workers/exports/."""
from __future__ import annotations


class ExportError(ValueError):
    """Input an export cannot take (a feature the layer lacks, a layer without its SAE on disk, an
    output that exists): HTTP `status` / a CLI error naming the problem. Nothing is written."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status
