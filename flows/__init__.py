"""Prefect flows and the `towerflow` CLI (their front door)."""
