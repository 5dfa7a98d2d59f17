"""Exports that need the model: SAEDashboard's page for a feature (saedashboard.py). The torch-free
ones live in backend/core/exports/."""
