"""`depthq dashboard`: rq-dashboard on the configured Redis, plus the results gallery at /gallery.

rq-dashboard decodes jobs with pickle unless told otherwise; depthq jobs are JSON, so it gets our
serializer. Its own basic auth compares passwords with `!=` and covers only its pages, so auth is
applied here, to the whole app, with a constant-time comparison. waitress serves it: rq-dashboard's
own runner is Flask's development server, not meant to run for weeks. Its pages get a link to the
gallery, and its Jobs tab opens on depthq's live queue instead of rq's `default` (see `_point_at_depthq`).
A job's page gets its data from depthq (`_job_data`): rq-dashboard's own fails on a clip's assemble job.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
from pathlib import Path
from typing import Any

from flask import Flask, Response, current_app, jsonify, redirect, request, url_for
from markupsafe import escape
from rq.exceptions import NoSuchJobError
from rq.job import Job
from werkzeug.wrappers import Response as Redirect

from depthq.config import Config, ConfigError, read_password_file
from depthq.connection import embedded_url_file, redact, url_with_credentials
from depthq.contract import SERIALIZER, lane_queue_name, recent_key

log = logging.getLogger(__name__)

# rq-dashboard's default poll interval is 2.5 s per open tab; a few seconds is plenty for photos.
_POLL_MS = 3000
# The list of tabs in rq-dashboard's navbar (templates/rq_dashboard/navbar.html, 0.9), and its end.
_NAV_LIST = re.compile(rb"<ul\b[^>]*\bnavbar-nav\b[^>]*>")
_NAV_LIST_END = b"</ul>"
_BODY = re.compile(rb"<body\b[^>]*>")


def is_loopback(bind: str) -> bool:
    if bind == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return False


def _basic_auth(app: Flask, username: str, password: str) -> None:
    expected_user = username.encode()
    expected_password = password.encode()

    @app.before_request
    def require_auth() -> Response | None:
        auth = request.authorization
        given_user = (auth.username or "").encode() if auth else b""
        given_password = (auth.password or "").encode() if auth else b""
        # Both compared every time, so the response time tells nothing about which one was wrong.
        user_ok = hmac.compare_digest(given_user, expected_user)
        password_ok = hmac.compare_digest(given_password, expected_password)
        if auth is not None and user_ok and password_ok:
            return None
        return Response("depthq dashboard: log in", 401, {"WWW-Authenticate": 'Basic realm="depthq"'})


def _follow_embedded_redis(app: Flask, config: Config, redis_url: str) -> None:
    """With no redis.url, the dashboard serves the Redis a local `depthq up` advertises. That Redis can
    move when depthq up restarts (its old port taken meanwhile): before each request, one stat of the
    advertisement tells whether to reconnect, so an open dashboard never shows a dead port."""
    from rq_dashboard.web import setup_rq_connection

    marker = embedded_url_file(config)
    current = {"url": redis_url}

    @app.before_request
    def reconnect_if_moved() -> None:
        try:
            url = marker.read_text(encoding="utf-8").strip()
        except OSError:
            return  # depthq up is between runs: keep the last URL, and let the page say it cannot reach it
        if url and url != current["url"]:
            log.info("depthq up's Redis moved to %s; the dashboard follows", redact(url))
            current["url"] = url
            app.config["RQ_DASHBOARD_REDIS_URL"] = url_with_credentials(url, config.redis)
            setup_rq_connection(app)


def _point_at_depthq(app: Flask, live_queue: str) -> None:
    """A Gallery tab in rq-dashboard's navbar, and its Jobs tab opened on `live_queue`.

    The link is added to rq-dashboard's rendered HTML, after the request, rather than by overriding
    its `navbar.html` through the template loader: an override is a copy of the whole navbar (the
    instance picker, the autorefresh switch), which would drift silently from the rq-dashboard it
    ships with. The edit here needs one anchor, the `navbar-nav` list; should a later rq-dashboard
    drop it, the link goes at the top of the page instead, with a warning, and is never lost.

    Jobs: rq-dashboard's `/<n>/view/jobs` shows rq's `default` queue, which depthq never uses
    ("No jobs."). It is redirected, by endpoint name rather than by path, to the same view with the
    live queue filled in, so the address names the queue and rq-dashboard's own queue and registry
    pickers still work from there. A temporary redirect: the queue name comes from config.
    Registered after basic auth, so only a logged-in user is redirected.
    """
    warned: list[bool] = []

    @app.before_request
    def jobs_on_the_live_queue() -> Redirect | None:
        args = request.view_args or {}
        if request.endpoint != "rq_dashboard.jobs_overview" or args.get("queue_name") is not None:
            return None
        return redirect(url_for(request.endpoint, **{**args, "queue_name": live_queue}))

    @app.after_request
    def gallery_tab(response: Response) -> Response:
        if request.blueprint != "rq_dashboard" or response.status_code != 200 or response.mimetype != "text/html":
            return response
        html = response.get_data()
        link = f'<a href="{escape(url_for("gallery.page"))}" class="nav-link" id="depthq-gallery">Gallery</a>'
        nav = _NAV_LIST.search(html)
        end = html.find(_NAV_LIST_END, nav.end()) if nav else -1
        if end >= 0:
            html = html[:end] + f'<li class="nav-item">{link}</li>'.encode() + html[end:]
        else:
            if not warned:
                warned.append(True)
                log.warning("dashboard: rq-dashboard's navbar has changed; the gallery link is at the top instead")
            body = _BODY.search(html)
            at = body.end() if body else 0
            html = html[:at] + f'<nav class="navbar">{link}</nav>'.encode() + html[at:]
        response.set_data(html)
        return response


def _escaped(value: Any) -> Any:
    """Every string in a JSON value with &, < and > as HTML entities, the structure kept: enough where
    a page puts it into an element's content, and a string holding JSON (a job's metadata) stays JSON."""
    if isinstance(value, str):
        return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    if isinstance(value, dict):
        return {key: _escaped(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_escaped(item) for item in value]
    return value


def _job_data(app: Flask) -> None:
    """The data of rq-dashboard's job page, answered by depthq.

    rq-dashboard 0.9.0 answers 500 for any job with dependencies under rq 3, which returns the ids
    already decoded where it decodes them again (Parallels/rq-dashboard#522, fixed after 0.9.0): a
    clip's assemble job is one, so its page would show nothing. This answers the same fields, with the
    dependencies sorted (chunk order) and one round trip for which of them still exist, however many
    chunks a clip has. Its page puts the description, metadata, result and error into the page as HTML
    (underscore's `<%= %>`, where its job list escapes them): a job's description is a file's name,
    which anyone who can drop a file names, so the strings here are escaped, and show as written.
    """
    from rq_dashboard.web import format_job_description, serialize_date

    def job_info(instance_number: int, job_id: str) -> Response | tuple[Response, int]:
        connection = current_app.redis_conn
        try:
            job = Job.fetch(job_id, connection=connection, serializer=SERIALIZER)
        except NoSuchJobError:
            return jsonify(error=f"no job {job_id}"), 404
        latest = job.latest_result()
        status = job.get_status()
        data: dict[str, Any] = {
            "id": job.id,
            "created_at": serialize_date(job.created_at),
            "enqueued_at": serialize_date(job.enqueued_at),
            "started_at": serialize_date(job.started_at),
            "ended_at": serialize_date(job.ended_at),
            "origin": job.origin,
            "status": status.value if status is not None else None,
            "result": job.return_value(),
            "exc_info": latest.exc_string if latest else None,
            "description": format_job_description(job),
            "metadata": json.dumps(job.get_meta()),
        }
        dependencies = sorted(job.dependency_ids)
        if dependencies:
            with connection.pipeline(transaction=False) as pipe:
                for dependency in dependencies:
                    pipe.exists(Job.key_for(dependency))
                exists = pipe.execute()
            data["depends_on"] = dependencies
            data["depends_on_status"] = ["active" if found else "expired" for found in exists]
        response = jsonify(_escaped(data))
        response.headers["Cache-Control"] = "no-store"
        return response

    app.view_functions["rq_dashboard.job_info"] = job_info


def create_app(config: Config, redis_url: str, allow_no_auth: bool = False) -> Flask:
    """The WSGI app. Refuses to face a network without a password unless told to (`--no-auth`)."""
    from rq_dashboard.cli import make_flask_app
    from rq_dashboard.web import config as rq_dashboard_config
    from rq_dashboard.web import setup_rq_connection

    from depthq.ops.gallery import gallery_blueprint

    settings = config.dashboard
    if (settings.username is None) != (settings.password_file is None):
        raise ConfigError("dashboard.username and dashboard.password_file: set both for basic auth, or neither")
    if settings.username is None and not is_loopback(settings.bind) and not allow_no_auth:
        raise ConfigError(
            f"dashboard.bind {settings.bind} is reachable from other machines, and the dashboard can delete "
            "and requeue jobs: set dashboard.username and dashboard.password_file, or pass --no-auth"
        )
    rq_dashboard_config.serializer = SERIALIZER
    app = make_flask_app(None, None, None, url_prefix="")
    app.config["RQ_DASHBOARD_REDIS_URL"] = url_with_credentials(redis_url, config.redis)
    app.config["RQ_DASHBOARD_POLL_INTERVAL"] = _POLL_MS
    setup_rq_connection(app)
    app.register_blueprint(
        gallery_blueprint(
            output_dir=Path(config.output.dir),
            watch_root=Path(config.producer.watch),
            size=settings.gallery_size,
            refresh_s=settings.refresh_s,
            recent=lambda n: [s.decode() for s in app.redis_conn.lrange(recent_key(config.queue.name), 0, n - 1)],
            clip_extensions=config.video.extensions,
        ),
        url_prefix="/gallery",
    )
    if not config.redis.url:
        _follow_embedded_redis(app, config, redis_url)
    if settings.username is not None and settings.password_file is not None:
        _basic_auth(app, settings.username, read_password_file(settings.password_file, "dashboard.password_file"))
    _point_at_depthq(app, lane_queue_name(config.queue.name, "live"))
    _job_data(app)
    log.info("dashboard for redis %s, queue %s", redact(redis_url), config.queue.name)
    return app


def serve(app: Flask, bind: str, port: int) -> None:
    from waitress import create_server

    server = create_server(app, host=bind, port=port, threads=8)
    log.info("dashboard on http://%s:%d/ (results gallery: /gallery/)", bind, port)
    server.run()
