"""The long load run: 1,000 messages from 50 users in 20 Discord channels through the real stack (the fake Discord,
`pioneer discord`, two `pioneer worker` processes, a Redis and a PostgreSQL of its own), with a tiny model.

Prints one JSON object: messages/s, latency p50/p95/p99 (user message -> final edit), losses, duplicates, 429s.
Usage: python benchmarks/load.py [--users 50] [--places 20] [--per-user 2] [--per-conversation 10]
       [--database-url postgresql+asyncpg://...] (default: a PostgreSQL cluster of its own, via initdb)
"""

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "benchmarks"), str(REPO)]
from common import make_checkpoint  # noqa: E402

from tests.reliability.load import discord_stack, run_load  # noqa: E402
from tests.services import PostgresServer, RedisServer  # noqa: E402


async def main_async(args, tmp: Path, database_url: str, redis_url: str) -> dict:
    model_dir = make_checkpoint(tmp / "tiny", preset="tiny")
    async with discord_stack(tmp, model_dir, redis_url, database_url, workers=args.workers,
                             worker_concurrency=args.concurrency, max_new_tokens=args.max_new_tokens,
                             rate_limit_per_minute=100_000, log_level="WARNING") as (fake, _):
        report = await run_load(fake, database_url, users=args.users, places=args.places, per_user=args.per_user,
                                per_conversation=args.per_conversation, timeout_s=120)
    return report.figures() | {"users": args.users, "places": args.places, "workers": args.workers,
                               "max_new_tokens": args.max_new_tokens}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--places", type=int, default=20)
    parser.add_argument("--per-user", type=int, default=2, help="conversations (channels) per user")
    parser.add_argument("--per-conversation", type=int, default=10, help="messages per conversation")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8, help="threads per worker")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--database-url")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp)) as redis_server:
        if args.database_url:
            figures = asyncio.run(main_async(args, Path(tmp), args.database_url, redis_server.url))
        else:
            with PostgresServer() as postgres:
                database_url = postgres.create_database("pioneer")
                figures = asyncio.run(main_async(args, Path(tmp), database_url, redis_server.url))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
