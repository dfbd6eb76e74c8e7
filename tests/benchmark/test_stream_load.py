from typing import Any

from temporalio.client import Client

from app.benchmark.integration import run_stream_load
from app.settings import Settings
from app.tools import ToolContext, invoke_tool, load_tools


async def test_streams_beyond_filters_subscribe(
    client: Client, workers: Settings
) -> None:
    load_tools()
    ctx = ToolContext(workers, temporal_client=client)
    subscribed: list[str] = []

    async def call(tool: str, arguments: dict[str, Any], **_: Any) -> Any:
        if tool == "realtime_subscribe":
            subscribed.append(arguments["filter"])
        return await invoke_tool(ctx, tool, arguments)

    outcome = await run_stream_load(
        call, workers, scope=("stream-load-7", 0), total=20, streams=7
    )
    assert len(subscribed) == 7
    assert outcome["subscriptions"] == 7
    # Filters 6 and 7 repeat the first two: in.(phase_1..4) and eq.phase_1.
    assert outcome["events_expected"] == 16 + 4 + 16 + 10 + 10 + 16 + 4
    assert outcome["events_delivered"] == outcome["events_expected"]
    assert outcome["events_lost"] == 0
    assert outcome["duplicates"] == 0
