"""HEAN trader's dashboard: `python -m hean.ui` serves it on UI_PORT (docs/UI.md)."""
