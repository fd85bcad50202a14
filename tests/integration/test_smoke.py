import asyncio

from gateway.testing.bot import SimulatedBot, Speaker
from tests.conftest import ws_url


async def test_smoke(gateway, redis_client):
    bot = SimulatedBot(ws_url(gateway), "bot_1")
    await bot.connect()
    await bot.stream_speech([Speaker("s1", "Ada"), Speaker("s2", "Grace", 330)], 0.5, realtime=False)
    keys = gateway.keyspace.bot("bot_1")
    await redis_client.xadd(keys.commands, {"json": '{"command":"sendmsg","message":"hi"}'})
    cmd = await bot.next_command(timeout=5)
    print(cmd)
    await gateway.publisher.flush(5)
    print(await redis_client.xlen(keys.audio))
    print(await redis_client.xrange(keys.events))
    await bot.close()
    await asyncio.sleep(0.2)
    await gateway.publisher.flush(5)
    print(await redis_client.xrange("meetstream:events"))
