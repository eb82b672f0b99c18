"""Typed access to what ``create_app`` put on the app, for the blueprints."""
from __future__ import annotations

from flask import current_app

from shared.admission import AdmissionController
from shared.config import Settings
from shared.store import DocumentStore


def settings() -> Settings:
    return current_app.extensions["meterai.settings"]


def store() -> DocumentStore:
    return current_app.extensions["meterai.store"]


def admission() -> AdmissionController:
    return current_app.extensions["meterai.admission"]
