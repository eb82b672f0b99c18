"""The OpenAPI 3.1 description of the buyer API, served at ``/api/v1/openapi.json``.

Kept as data beside the routes it describes; ``tests/test_api.py`` checks every documented path is
routed, so the document can't silently drift from the code.
"""
from __future__ import annotations

from flask import Blueprint, jsonify

bp = Blueprint("openapi", __name__)

_ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict:
    return {str(c): _json(_ERROR, "Error") for c in codes}


BEARER = [{"bearer": []}]

SPEC: dict = {
    "openapi": "3.1.0",
    "info": {"title": "meterai API", "version": "1",
             "description": "Buy and affix an e-Meterai (Rp10.000) to a PDF; verify stamped documents."},
    "paths": {
        "/api/v1/orders": {"post": {
            "summary": "Create an order: upload a PDF and choose where the stamp goes",
            "parameters": [{"name": "Idempotency-Key", "in": "header", "required": True,
                            "schema": {"type": "string", "minLength": 1, "maxLength": 64}},
                           {"name": "Admission-Token", "in": "header", "required": False,
                            "description": "From GET /api/v1/queue/{ticket} once admitted; single use",
                            "schema": {"type": "string"}}],
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object", "required": ["document", "page", "x", "y", "email"],
                "properties": {
                    "document": {"type": "string", "format": "binary"},
                    "page": {"type": "integer", "minimum": 1},
                    "x": {"type": "number", "minimum": 0},
                    "y": {"type": "number", "minimum": 0},
                    "email": {"type": "string", "format": "email"},
                }}}}},
            "responses": {
                "202": _json({"$ref": "#/components/schemas/OrderCreated"}, "Accepted"),
                "200": _json({"$ref": "#/components/schemas/OrderCreated"}, "Same key replayed"),
                "429": _json({"$ref": "#/components/schemas/Queued"},
                             "Queued (waiting room) or rate limited; see Retry-After"),
                **_errors(400, 403, 409, 413, 415, 422, 503),
            },
        }},
        "/api/v1/orders/{order_id}": {"get": {
            "summary": "Order status", "security": BEARER,
            "parameters": [{"name": "order_id", "in": "path", "required": True,
                            "schema": {"type": "string", "format": "uuid"}}],
            "responses": {"200": _json({"$ref": "#/components/schemas/Order"}, "The order"),
                          **_errors(401, 403, 404)},
        }},
        "/api/v1/orders/{order_id}/document": {"get": {
            "summary": "Download the stamped PDF", "security": BEARER,
            "parameters": [{"name": "order_id", "in": "path", "required": True,
                            "schema": {"type": "string", "format": "uuid"}}],
            "responses": {"200": {"description": "Stamped PDF",
                                  "content": {"application/pdf": {}}},
                          **_errors(401, 403, 404, 409)},
        }},
        "/api/v1/verify/{serial}": {"get": {
            "summary": "Look up a serial",
            "parameters": [{"name": "serial", "in": "path", "required": True,
                            "schema": {"type": "string", "pattern": "^[0-9A-Z]{22}$"}}],
            "responses": {"200": _json({"type": "object", "properties": {
                "serial": {"type": "string"}, "status": {"type": "string"},
                "stamped_at": {"type": "string", "format": "date-time"},
                "document_sha256": {"type": "string"}}}, "Serial"), **_errors(404)},
        }},
        "/api/v1/verify": {"post": {
            "summary": "Verify a stamped PDF: our signature, intact, trusted, covering the whole file, "
                       "and a used serial whose recorded SHA-256 is this file's",
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object", "required": ["document"],
                "properties": {"document": {"type": "string", "format": "binary"}}}}}},
            "responses": {"200": _json({"type": "object", "required": ["valid", "message"], "properties": {
                "valid": {"type": "boolean"}, "serial": {"type": "string"},
                "stamped_at": {"type": "string", "format": "date-time"},
                "document_sha256": {"type": "string"},
                "reason": {"type": "string", "enum": [
                    "not_signed", "unreadable", "signature_invalid", "untrusted_signer",
                    "modified_after_stamping", "unknown_serial", "serial_voided", "serial_not_used",
                    "document_mismatch"]},
                "message": {"type": "string"}}}, "Verdict"),
                **_errors(400, 413, 415, 422, 429, 503)},
        }},
        "/api/v1/payments/notifications": {"post": {
            "summary": "Payment gateway notification (Midtrans format, signature_key checked)",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object"}}}},
            "responses": {"200": {"description": "Accepted (also for a duplicate)"},
                          **_errors(400, 401, 403)},
        }},
        "/api/v1/queue": {"post": {
            "summary": "A place in line before any upload (a ticket without a document); admitted at once, "
                       "with its admission token, when the line is empty and the outflow allows",
            "parameters": [{"name": "Client-Id", "in": "header", "required": True,
                            "description": "the browser tab's own id (8-64 of A-Z a-z 0-9 _ -): one place per tab",
                            "schema": {"type": "string"}}],
            "responses": {"200": _json({"type": "object", "properties": {
                "admitted": {"type": "boolean"}, "admission_token": {"type": "string"},
                "ticket": {"type": "string"}, "position": {"type": "integer"}, "eta_seconds": {"type": "integer"},
                "status_url": {"type": "string"}, "page_url": {"type": "string"}}}, "A place, or the turn"),
                **_errors(400, 429, 503)},
        }},
        "/api/v1/queue/{ticket}": {"get": {
            "summary": "Waiting-room position, ETA and (once admitted) the admission token",
            "parameters": [{"name": "ticket", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": _json({"type": "object", "properties": {
                "position": {"type": "integer"}, "eta_seconds": {"type": "integer"},
                "admitted": {"type": "boolean"}, "admission_token": {"type": "string"}}}, "Status"),
                **_errors(404, 410, 503)},
        }},
        "/ops/admission": {
            "get": {"summary": "Waiting-room mode and outflow (ops, bearer OPS_TOKEN)", "security": BEARER,
                    "responses": {"200": {"description": "State"}, **_errors(401, 404)}},
            "post": {"summary": "Set mode: auto, queue_all or paused (ops)", "security": BEARER,
                     "parameters": [{"name": "X-Ops-Operator", "in": "header", "required": False,
                                     "description": "who switches, for the audit log (at most 64 of A-Z a-z 0-9 "
                                                    "space . - _ @)", "schema": {"type": "string", "maxLength": 64}}],
                     "requestBody": {"required": True, "content": {"application/json": {"schema": {
                         "type": "object", "properties": {"mode": {"enum": ["auto", "queue_all", "paused"]}}}}}},
                     "responses": {"200": {"description": "New state"}, **_errors(401, 404, 422)}},
        },
        "/ops/overview": {"get": {
            "summary": "What the ops page shows: the line, stamping, refunds, dependencies, the last hour (ops)",
            "security": BEARER,
            "responses": {"200": {"description": "Overview (JSON)"}, **_errors(401, 404, 429)}}},
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "Alive"}}}},
        "/readyz": {"get": {"summary": "Readiness with each dependency's state",
                            "responses": {"200": {"description": "Ready"},
                                          "503": {"description": "A dependency is down"}}}},
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
            "OrderCreated": {"type": "object",
                             "required": ["order_id", "access_token", "status", "links"],
                             "properties": {"order_id": {"type": "string"},
                                            "access_token": {"type": "string"},
                                            "status": {"type": "string"},
                                            "links": {"type": "object"}}},
            "Queued": {"type": "object", "required": ["error"], "properties": {
                "error": {"type": "object"},
                "queue": {"type": "object", "properties": {
                    "ticket": {"type": "string"}, "position": {"type": "integer"},
                    "eta_seconds": {"type": "integer"}, "status_url": {"type": "string"},
                    "page_url": {"type": "string"}}}}},
            "Order": {"type": "object", "required": ["order_id", "status", "amount", "currency", "events"],
                      "properties": {
                          "order_id": {"type": "string"}, "status": {"type": "string", "enum": [
                              "created", "awaiting_payment", "paid", "stamping", "stamped",
                              "refund_pending", "refund_manual", "refunded", "expired", "rejected"]},
                          "amount": {"type": "integer"}, "currency": {"const": "IDR"},
                          "serial": {"type": "string"},
                          "payment": {"type": "object", "properties": {
                              "redirect_url": {"type": "string"},
                              "gateway_order_id": {"type": "string"}}},
                          "refund": {"type": "object", "properties": {
                              "status": {"type": "string"}, "amount": {"type": "integer"}}},
                          "events": {"type": "array", "items": {"type": "object", "properties": {
                              "status": {"type": "string"},
                              "at": {"type": "string", "format": "date-time"}}}}}},
        },
    },
}


@bp.get("/api/v1/openapi.json")
def openapi():
    return jsonify(SPEC)
