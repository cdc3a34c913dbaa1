"""Load through the real stack: 200 messages from 50 users in 20 channels (benchmarks/load.py sends 1,000)."""

from tests.reliability.load import discord_stack, run_load


async def test_every_message_is_answered_once_in_order_and_stored(tmp_path, tiny_model_dir, redis_server,
                                                                  database_url):
    async with discord_stack(tmp_path, tiny_model_dir, redis_server.url, database_url, max_new_tokens=8,
                             rate_limit_per_minute=1000) as (fake, processes):
        report = await run_load(fake, database_url, users=50, places=20, per_user=1, per_conversation=4)

    figures = report.figures()
    print(f"\nMETRICS load: {figures}")
    assert figures["messages"] == 200
    assert (report.lost, report.duplicates, report.not_stored, report.out_of_order) == (0, 0, 0, 0)
    assert report.rate_limited == 0  # the bot kept within Discord's limits by itself
    for process in processes:
        assert "Traceback" not in process.log(), process.log()[-3000:]
