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


def build_app(core, settings) -> AsyncApp:
    socket_mode = settings.slack_app_token is not None
    client = AsyncWebClient(token=settings.slack_bot_token.get_secret_value(), base_url=api_url(settings.slack_api_url))
    secret = settings.slack_signing_secret.get_secret_value() if settings.slack_signing_secret else None
    app = AsyncApp(client=client, signing_secret=secret, request_verification_enabled=not socket_mode)
    slack_listeners.register(app, SlackFrontEnd(core, client))
    return app


def api_url(url: str | None) -> str:
    """SLACK_API_URL (a proxy, or a local fake in tests), else Slack's own."""
    if not url:
        return AsyncWebClient.BASE_URL
    return url if url.endswith("/") else url + "/"


async def serve_http(app: AsyncApp, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve the bolt app on host:port (0: any free port); returns the runner and the port."""
    runner = web.AppRunner(app.web_app(path=EVENTS_PATH), handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, runner.addresses[0][1]


async def run(settings) -> None:
    """Run until SIGINT/SIGTERM, then let the replies in progress finish before going offline."""
    from .app import build_service

    service = await build_service(settings)
    app = build_app(service.core, settings)
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
    try:
        await until_stopped()
    finally:
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
