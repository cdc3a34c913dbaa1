"""The `pioneer` command: chat, worker, discord, slack, migrate, train, calibrate, attention."""

import argparse
import asyncio
import faulthandler
import signal
import sys

import worker  # noqa: F401  before anything loads torch: it sets the serving process's OpenMP spin-wait

from .logs import setup_logging


def _settings():
    from .settings import get_settings

    return get_settings()


def cmd_chat(args) -> None:
    from .app import build_service
    from .console import Console

    settings = _settings()

    async def main():
        service = await build_service(settings)
        await service.core.recover("console", follow_s=0)  # replies cut off at the last exit: marked interrupted
        console = Console(service.core, user_id=args.user)
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, console.stop)
        try:
            await console.run()
        finally:
            await service.drain(settings.drain_timeout_s)
            await service.close()

    asyncio.run(main())


def cmd_worker(args) -> None:
    settings = _settings()
    if not settings.redis_url:
        sys.exit("pioneer worker needs REDIS_URL (without it, `pioneer chat` runs its own worker in-process).")
    from worker.celery_app import QUEUE, app

    concurrency = args.concurrency or settings.worker_concurrency
    argv = ["--quiet", "worker", f"--pool={args.pool}", f"--concurrency={concurrency}", "-Q", QUEUE,
            f"--loglevel={settings.log_level}", "--without-gossip", "--without-mingle"]
    if args.name:
        argv += ["-n", args.name]
    app.worker_main(argv)


def cmd_migrate(args) -> None:
    from .memory import run_migrations

    settings = _settings()
    run_migrations(settings.resolved_database_url)
    print("database is up to date")


def cmd_train(args) -> None:
    from pioneer_model.train import main as train_main

    train_main(args.rest)


def cmd_calibrate(args) -> None:
    from worker.calibrate import main as calibrate_main

    calibrate_main(args.rest)


def cmd_attention(args) -> None:
    from pathlib import Path

    from pioneer_model.checkpoint import load_pretrained
    from pioneer_model.visualize import plot_attention
    from worker.runtime import resolve_model_path

    settings = _settings()
    path = Path(args.model) if args.model else resolve_model_path(settings)
    model, tokenizer = load_pretrained(path)
    plot_attention(model, tokenizer, args.text, args.out, layer=args.layer)
    print(f"wrote {args.out}")


def cmd_discord(args) -> None:
    from .discord_bot import main as discord_main

    discord_main(_settings())


def cmd_slack(args) -> None:
    from .slack_bot import main as slack_main

    slack_main(_settings())


# Commands whose options their own parsers read (pioneer_model.train, worker.calibrate).
PASS_THROUGH = {"train": (cmd_train, "train or fine-tune a model (see pioneer train -h)"),
                "calibrate": (cmd_calibrate, "calibrate the hybrid router's confidence")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pioneer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="chat in the terminal (embedded mode without REDIS_URL)")
    chat.add_argument("--user", help="your user id in memory (default: your login name)")
    chat.set_defaults(func=cmd_chat)
    serve = sub.add_parser("worker", help="run a Celery worker hosting the model (needs REDIS_URL)")
    serve.add_argument("--pool", default="threads", choices=["threads", "solo"])
    serve.add_argument("--concurrency", type=int)
    serve.add_argument("--name", help="worker node name, e.g. gpu1@%%h")
    serve.set_defaults(func=cmd_worker)
    sub.add_parser("migrate", help="apply the database migrations").set_defaults(func=cmd_migrate)
    for name, (func, text) in PASS_THROUGH.items():
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=func)
    attention = sub.add_parser("attention", help="draw each head's attention weights as heatmaps")
    attention.add_argument("text")
    attention.add_argument("--out", default="attention.png")
    attention.add_argument("--layer", type=int, default=-1)
    attention.add_argument("--model", help="checkpoint directory (default: MODEL_PATH or the default model)")
    attention.set_defaults(func=cmd_attention)
    sub.add_parser("discord", help="run the Discord front-end").set_defaults(func=cmd_discord)
    sub.add_parser("slack", help="run the Slack front-end").set_defaults(func=cmd_slack)
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command in PASS_THROUGH:
        args.rest = rest + args.rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    settings = _settings()
    quiet = args.command == "chat" and "log_level" not in settings.model_fields_set
    setup_logging("WARNING" if quiet else settings.log_level, settings.log_format)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1: every thread's stack (Celery's does too)
    args.func(args)


if __name__ == "__main__":
    main()
