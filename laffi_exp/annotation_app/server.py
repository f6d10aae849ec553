"""The annotation app's HTTP side (Starlette): a JSON API over the store and the one static page.

Local by default: requests must name a local host (so a web page elsewhere cannot reach the server by
rebinding a DNS name to 127.0.0.1), and writes must be JSON (a cross-site form cannot send that
without a CORS preflight, which this server never grants). Served on another address, every request
must carry the token printed at start (``?token=``, the ``X-Token`` header, or the cookie the page
gets on its first visit with ``?token=``).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from laffi_exp.annotation_app.batch import answer_span, is_no_answer
from laffi_exp.annotation_app.store import Conflict, NotFound, Store
from laffi_exp.core.prompts import parse_feedback

STATIC = Path(__file__).resolve().parent / "static"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
COOKIE = "laffi_token"

# The page's starting templates (each browser may edit its own copy). {correction} is the correction
# field, {prediction} the model's answer; each reads back as its verdict through parse_feedback.
TEMPLATES = {
    "correct": "Correct.",
    "incorrect": 'Incorrect. The answer is "{correction}".',
    "no_answer": "Incorrect. The question cannot be answered from the passage, so there is no answer.",
}


def is_local(host: str) -> bool:
    return host.strip("[]") in LOCAL_HOSTS


def create_app(store: Store, *, chunk: int = 20, token: str | None = None) -> Starlette:
    """The app over ``store``; ``token`` None serves localhost only, a token any host that carries it."""
    api = _Api(store, chunk)
    routes = [
        Route("/", _index),
        Route("/api/info", api.info),
        Route("/api/signin", api.sign_in, methods=["POST"]),
        Route("/api/annotators/{annotator}/queue", api.queue),
        Route("/api/annotators/{annotator}/items/{item_id:path}", api.item, methods=["GET", "PUT"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, middleware=[Middleware(_Guard, token=token)])


async def _index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})


class _Guard(BaseHTTPMiddleware):
    """The local-host check (no token) or the token check (served beyond localhost)."""

    def __init__(self, app, token: str | None):
        super().__init__(app)
        self.token = token

    async def dispatch(self, request: Request, call_next):
        if self.token is None:
            host = request.headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if not is_local(name):
                return PlainTextResponse(
                    f"this server answers requests for localhost only, not {host!r}", status_code=403
                )
            return await call_next(request)
        given = request.headers.get("x-token") or request.query_params.get("token") or request.cookies.get(COOKIE) or ""
        if not secrets.compare_digest(given.encode(), self.token.encode()):
            return _error(401, "this server needs the token it printed at start: open the URL it printed (?token=...)")
        response = await call_next(request)
        if request.query_params.get("token"):  # the page and its files then carry it without the URL
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
        return response


class _Api:
    def __init__(self, store: Store, chunk: int):
        self.store, self.chunk = store, chunk

    async def info(self, request: Request) -> Response:
        meta = self.store.meta()
        return JSONResponse(
            {
                "batch": Path(meta["batch"]).name,
                "batch_fingerprint": meta["batch_fingerprint"],
                "items": int(meta["items"]),
                "per_item": int(meta["per_item"]),
                "no_answer_text": meta["no_answer_text"],
                "templates": TEMPLATES,
            }
        )

    async def sign_in(self, request: Request) -> Response:
        body = await _json(request)
        if isinstance(body, Response):
            return body
        try:
            annotator = self.store.sign_in(body.get("annotator", ""))
        except ValueError as err:
            return _error(400, str(err))
        return JSONResponse({"annotator": annotator})

    async def queue(self, request: Request) -> Response:
        annotator = request.path_params["annotator"]
        try:
            items = self.store.queue(annotator, self.chunk)
        except NotFound as err:
            return _error(404, str(err))
        for row in items:
            feedback = row.pop("feedback")
            row["verdict"] = parse_feedback(feedback)[0] if row["status"] == "saved" else None
        return JSONResponse({"items": items, "progress": self.store.progress(annotator)})

    async def item(self, request: Request) -> Response:
        annotator, item_id = request.path_params["annotator"], request.path_params["item_id"]
        if request.method == "PUT":
            return await self._save(request, annotator, item_id)
        try:
            return JSONResponse(self._view(self.store.item(annotator, item_id)))
        except NotFound as err:
            return _error(404, str(err))

    async def _save(self, request: Request, annotator: str, item_id: str) -> Response:
        body = await _json(request)
        if isinstance(body, Response):
            return body
        try:
            saved = self.store.save(
                annotator,
                item_id,
                revision=body.get("revision"),
                feedback=body.get("feedback", ""),
                correction=body.get("correction", ""),
                seconds=body.get("seconds", 0),
                status=body.get("status", "saved"),
            )
        except Conflict as err:
            return JSONResponse({"error": str(err), "current": _annotation(err.current)}, status_code=409)
        except NotFound as err:
            return _error(404, str(err))
        except ValueError as err:
            return _error(400, str(err))
        return JSONResponse(self._view(saved))

    def _view(self, row: dict[str, Any]) -> dict[str, Any]:
        """The item as the page shows it: where the answer sits in the passage, and the annotation."""
        no_answer = is_no_answer(row["prediction"], self.store.meta()["no_answer_text"])
        span = None if no_answer else answer_span(row["context"], row["prediction"])
        return {
            "id": row["id"],
            "question": row["question"],
            "context": row["context"],
            "prediction": "" if no_answer else row["prediction"],
            "no_answer": no_answer,
            "span": list(span) if span else None,
            "gold": row["gold"],
            "annotation": _annotation(row),
        }


def _annotation(row: dict[str, Any]) -> dict[str, Any]:
    verdict, correction = parse_feedback(row["feedback"]) if row["feedback"] else (None, None)
    return {
        "status": row["status"],
        "feedback": row["feedback"],
        "correction": row["correction"],
        "revision": row["revision"],
        "seconds": row["seconds"],
        "updated_at": row["updated_at"],
        "edits": row.get("edits"),
        "reads_as": {"verdict": verdict, "correction": correction},  # what the pipeline will read from the text
    }


async def _json(request: Request) -> dict[str, Any] | Response:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        return _error(415, "expected a JSON body (Content-Type: application/json)")
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "the body is not JSON")
    return body if isinstance(body, dict) else _error(400, "expected a JSON object")


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)
