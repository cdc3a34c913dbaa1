"""The Celery app: Redis broker, JSON only, settings so that no work is lost when a worker dies."""

from celery import Celery

from .settings import get_worker_settings

TASK_NAME = "pioneer.answer"
QUEUE = "pioneer"


def make_celery(redis_url: str, visibility_timeout_s: int = 10, task_expires_s: int = 300) -> Celery:
    app = Celery("pioneer", broker=redis_url, include=["worker.tasks"])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_backend=None,
        task_ignore_result=True,
        task_default_queue=QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_time_limit=task_expires_s + 60,
        worker_hijack_root_logger=False,
        # No task events: each would cost a Redis publish on the way to the first chunk (metrics come from /metrics).
        worker_send_task_events=False,
        task_send_sent_event=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_transport_options={
            # A killed worker's unacked task is redelivered after the visibility timeout; kombu's restore
            # sweep runs every 100 s by default, so run it every second.
            "visibility_timeout": visibility_timeout_s,
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
            "socket_keepalive": True,
            "retry_on_timeout": True,
            "health_check_interval": 10,
        },
    )
    return app


def hidden_args(payload: dict) -> dict:
    """send_task options that show a request's id instead of its messages in task headers (Flower, events, logs);
    this also spares Celery a repr() of the whole history on every enqueue."""
    return {"argsrepr": f"[request {payload.get('request_id')}]", "kwargsrepr": "{}"}


def _default_app() -> Celery:
    settings = get_worker_settings()
    return make_celery(settings.redis_url or "memory://", settings.visibility_timeout_s, settings.task_expires_s)


app = _default_app()
