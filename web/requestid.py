"""The request id: taken from the proxy's ``X-Request-Id`` when it is a sane token, else made here; kept
in :data:`shared.logs.REQUEST_ID` while the request runs (every log line and every task it publishes
carries it) and echoed in the response, so a buyer's report, the proxy's access log and ours meet (gunicorn's access
line takes it from the response, and the route template from the WSGI environ).

Registered before every other hook, so an answer refused early (rate limit, waiting room) has one too.
"""
from __future__ import annotations

from flask import Flask, Response, g, request

from shared.logs import REQUEST_ID, ROUTE_ENVIRON, new_request_id, sane_request_id

HEADER = "X-Request-Id"


def _begin() -> None:
    request_id = sane_request_id(request.headers.get(HEADER)) or new_request_id()
    g.request_id = request_id
    g.request_id_token = REQUEST_ID.set(request_id)


def _echo(response: Response) -> Response:
    request_id = g.get("request_id")
    if request_id:
        response.headers[HEADER] = request_id
    if request.url_rule is not None:  # gunicorn's access line names the route, not the path
        request.environ[ROUTE_ENVIRON] = request.url_rule.rule
    return response


def _end(_: BaseException | None = None) -> None:
    token = g.pop("request_id_token", None)
    if token is not None:
        REQUEST_ID.reset(token)  # a gthread worker's thread serves the next request clean


def register(app: Flask) -> None:
    app.before_request_funcs.setdefault(None, []).insert(0, _begin)
    app.after_request(_echo)
    app.teardown_request(_end)
