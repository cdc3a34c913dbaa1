"""The last resort for a listener error the listener did not handle itself: log it in full.

(Listeners answer their own failures: bolt may drop an ack that an error follows within a few ms.)"""

import logging

log = logging.getLogger(__name__)


def register(app, front) -> None:
    @app.error
    async def on_error(error, body):
        log.error("Slack listener failed (%s)", body.get("command") or body.get("event", {}).get("type"),
                  exc_info=error)
