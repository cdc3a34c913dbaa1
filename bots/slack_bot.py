"""`pioneer slack`: the Slack front-end, over HTTP with signed requests or over Socket Mode.

HTTP: SLACK_BOT_TOKEN and SLACK_SIGNING_SECRET; Slack posts every event and command to
http://SLACK_HOST:SLACK_PORT/slack/events, and bolt rejects any request whose signature or timestamp
does not check out with 401 before a listener sees it. Socket Mode: SLACK_APP_TOKEN (xapp-…) too; no
public URL is needed.
"""

import asyncio
import logging
import sys

from aiohttp import web
from slack_bolt.async_app import AsyncApp
from slack_sdk.web.async_client import AsyncWebClient

from . import slack_listeners
from .shutdown import until_stopped
from .slack_io import SlackFrontEnd

log = logging.getLogger(__name__)
EVENTS_PATH = "/slack/events"


def build_front(core, settings) -> SlackFrontEnd:
    client = AsyncWebClient(token=settings.slack_bot_token.get_secret_value(), base_url=api_url(settings.slack_api_url))
    return SlackFrontEnd(core, client)


def build_app(core, settings, front: SlackFrontEnd | None = None) -> AsyncApp:
    socket_mode = settings.slack_app_token is not None
    front = front or build_front(core, settings)
    secret = settings.slack_signing_secret.get_secret_value() if settings.slack_signing_secret else None
    app = AsyncApp(client=front.client, signing_secret=secret, request_verification_enabled=not socket_mode)
    slack_listeners.register(app, front)
    return app


def api_url(url: str | None) -> str:
    """SLACK_API_URL (a proxy, or a local fake in tests), else Slack's own."""
    if not url:
        return AsyncWebClient.BASE_URL
    return url if url.endswith("/") else url + "/"


@web.middleware
async def refuse_malformed(request: web.Request, handler):
    """401 for a request bolt cannot even check: a timestamp that is not a number, or a body that is not UTF-8
    (bolt would fail on either with a 500 and a traceback in the log)."""
    timestamp = request.headers.get("X-Slack-Request-Timestamp", "")
    try:
        int(timestamp)
        (await request.read()).decode("utf-8")
    except ValueError:  # UnicodeDecodeError is one
        return web.json_response({"error": "invalid request"}, status=401)
    return await handler(request)


async def serve_http(app: AsyncApp, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve the bolt app on host:port (0: any free port); returns the runner and the port."""
    web_app = app.web_app(path=EVENTS_PATH)
    web_app.middlewares.append(refuse_malformed)
    runner = web.AppRunner(web_app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, runner.addresses[0][1]


async def run(settings) -> None:
    """Run until SIGINT/SIGTERM, then let the replies in progress finish before going offline."""
    from .app import build_service

    service = await build_service(settings)
    front = build_front(service.core, settings)
    app = build_app(service.core, settings, front)
    if settings.slack_app_token is not None:
        from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

        handler = AsyncSocketModeHandler(app, settings.slack_app_token.get_secret_value())
        await handler.connect_async()
        log.info("connected to Slack in Socket Mode")
        stop = handler.close_async
    else:
        runner, port = await serve_http(app, settings.slack_host, settings.slack_port)
        log.info("listening for Slack on http://%s:%s%s", settings.slack_host, port, EVENTS_PATH)
        stop = runner.cleanup
    recovery = asyncio.create_task(service.core.recover("slack", front.resume))  # replies cut off at the last stop
    try:
        await until_stopped()
    finally:
        recovery.cancel()  # what it did not get to stays pending, for the next start
        await asyncio.gather(recovery, return_exceptions=True)
        await service.drain(settings.drain_timeout_s)
        await stop()
        await service.close()


def missing_settings(settings) -> str | None:
    if settings.slack_bot_token is None:
        return "pioneer slack needs SLACK_BOT_TOKEN (xoxb-…, from OAuth & Permissions)."
    if settings.slack_app_token is None and settings.slack_signing_secret is None:
        return ("pioneer slack needs SLACK_SIGNING_SECRET (Basic Information) to serve HTTP, "
                "or SLACK_APP_TOKEN (xapp-…) for Socket Mode.")
    return None


def main(settings) -> None:
    if problem := missing_settings(settings):
        sys.exit(problem)
    asyncio.run(run(settings))
