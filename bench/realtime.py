"""Realtime benchmark: inserts into one table while 5 filtered subscriptions
consume, next to the raw insert throughput of the same inserts without
realtime, measured in the same run.

    python -m bench.realtime [--rows 20000] [--backend postgresql|sqlite|both]

PostgreSQL is a throwaway server started like the test suite starts one
(/usr/lib/postgresql/15/bin, fsync off). The inserter runs in its own process
and commits batches of `--batch` rows; latency is measured from the end of a
row's commit (wall clock, same machine) to its delivery by `Subscriber`.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, insert
from sqlalchemy import text as sql_text

from app.db import dispose_engines, get_engine
from app.db.migrate import upgrade
from app.processes import freeze_startup_objects
from app.realtime.service import create_subscription
from app.realtime.stream import Subscriber
from app.realtime.triggers import enable_realtime

CATEGORIES = ("a", "b", "c", "d")

# Each filter next to an independent Python predicate that selects the rows it
# must deliver, so lost and duplicate events are counted, not assumed.
FILTERS: list[tuple[str, Callable[[dict[str, Any]], bool]]] = [
    ("value=gte.0", lambda r: r["value"] >= 0),
    ("category=eq.a", lambda r: r["category"] == "a"),
    ("category=in.(b,c)", lambda r: r["category"] in ("b", "c")),
    ("value=lt.500", lambda r: r["value"] < 500),
    (
        "category=neq.d,value=gte.250",
        lambda r: r["category"] != "d" and r["value"] >= 250,
    ),
]


def table(name: str, metadata: MetaData) -> Table:
    return Table(
        name,
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("seq", Integer, nullable=False),
        Column("category", String(10), nullable=False),
        Column("value", Integer, nullable=False),
        Column("payload", String(100), nullable=False),
    )


def make_row(seq: int) -> dict[str, Any]:
    return {
        "seq": seq,
        "category": CATEGORIES[seq % 4],
        "value": (seq * 7919) % 1000,
        "payload": f"payload-{seq:08d}",
    }


def insert_rows(url: str, name: str, rows: int, batch: int) -> list[tuple[int, float]]:
    """Insert `rows` rows in transactions of `batch`; return (first seq of
    batch, commit end time) per batch."""
    engine = create_engine(url)
    metadata = MetaData()
    target = table(name, metadata)
    commits: list[tuple[int, float]] = []
    with engine.connect() as connection:
        for start in range(0, rows, batch):
            values = [make_row(seq) for seq in range(start, min(start + batch, rows))]
            with connection.begin():
                connection.execute(insert(target), values)
            commits.append((start, time.time()))
    engine.dispose()
    return commits


def _insert_process(
    url: str, name: str, rows: int, batch: int, out: Any, go: Any
) -> None:
    go.wait()
    started = time.time()
    commits = insert_rows(url, name, rows, batch)
    out.send((started, time.time(), commits))


async def run_realtime(url: str, rows: int, batch: int) -> dict[str, Any]:
    subscriptions = [
        create_subscription(url, "bench_items", filter_text=f, batch_size=500)
        for f, _ in FILTERS
    ]
    expected = [
        {seq for seq in range(rows) if predicate(make_row(seq))}
        for _, predicate in FILTERS
    ]
    received: list[dict[int, float]] = [{} for _ in FILTERS]
    duplicates = [0] * len(FILTERS)
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    go = context.Event()
    process = context.Process(
        target=_insert_process, args=(url, "bench_items", rows, batch, sender, go)
    )
    process.start()

    async def consume(index: int, subscriber: Subscriber) -> None:
        seen = received[index]
        target = len(expected[index])
        async for events in subscriber.batches():
            now = time.time()
            for event in events:
                seq = event["new"]["seq"]
                if seq in seen:
                    duplicates[index] += 1
                seen[seq] = now
            if len(seen) >= target:
                return

    subscribers = [Subscriber(url, s.subscription_id) for s in subscriptions]
    # This process serves the subscriptions as the HTTP server and the
    # workers serve theirs, with the startup objects frozen.
    freeze_startup_objects()
    cpu_started = time.process_time()
    for subscriber in subscribers:
        await subscriber.__aenter__()
    try:
        tasks = [asyncio.create_task(consume(i, s)) for i, s in enumerate(subscribers)]
        go.set()
        started, inserts_done, commits = await asyncio.to_thread(receiver.recv)
        try:
            async with asyncio.timeout(max(60.0, rows / 500)):
                await asyncio.gather(*tasks)
        except TimeoutError:
            for task in tasks:
                task.cancel()
        finished = max(max(seen.values(), default=started) for seen in received)
        consumer_cpu = time.process_time() - cpu_started
    finally:
        for subscriber in subscribers:
            await subscriber.close()
        process.join()
    commit_of: dict[int, float] = {}
    for start, committed in commits:
        for seq in range(start, min(start + batch, rows)):
            commit_of[seq] = committed
    latencies = [
        max(0.0, at - commit_of[seq]) * 1000
        for seen in received
        for seq, at in seen.items()
    ]
    delivered = sum(len(seen) for seen in received)
    lost = sum(len(e - set(s)) for e, s in zip(expected, received, strict=True))
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0]
    return {
        "insert_rows_per_s": rows / (inserts_done - started),
        "delivered": delivered,
        "expected": sum(len(e) for e in expected),
        "delivered_per_s": delivered / (finished - started),
        "p50_ms": statistics.median(latencies) if latencies else float("nan"),
        "p99_ms": quantiles[98] if len(quantiles) > 98 else max(latencies),
        "lost": lost,
        "duplicates": sum(duplicates),
        "consumer_cpu_s": consumer_cpu,
        "consumer_wall_s": finished - started,
    }


def prepare(url: str) -> None:
    upgrade(url)
    metadata = MetaData()
    table("bench_raw", metadata)
    table("bench_items", metadata)
    table("bench_captured", metadata)
    metadata.create_all(get_engine(url))
    enable_realtime(url, "bench_items")
    enable_realtime(url, "bench_captured")


def raw_throughput(url: str, rows: int, batch: int, name: str = "bench_raw") -> float:
    started = time.time()
    insert_rows(url, name, rows, batch)
    return rows / (time.time() - started)


def run_backend(name: str, url: str, rows: int, batch: int) -> None:
    prepare(url)
    raw = raw_throughput(url, rows, batch)
    captured = raw_throughput(url, rows, batch, "bench_captured")
    result = asyncio.run(run_realtime(url, rows, batch))
    with get_engine(url).connect() as connection:
        logged = connection.execute(
            sql_text(
                "SELECT COUNT(*) FROM realtime_changes WHERE table_name='bench_items'"
            )
        ).scalar()
    ratio = result["insert_rows_per_s"] / raw
    print(f"== {name}: {rows} rows, {batch} rows per transaction, 5 subscriptions")
    print(f"raw inserts (no realtime):      {raw:10.0f} rows/s")
    print(f"inserts with triggers, no subscribers: {captured:10.0f} rows/s")
    print(f"inserts with realtime:          {result['insert_rows_per_s']:10.0f} rows/s")
    print(f"ratio realtime/raw:             {ratio:10.3f}")
    print(f"changes logged:                 {logged:10d}")
    print(
        f"delivered events:               {result['delivered']:10d} "
        f"of {result['expected']} expected"
    )
    print(f"delivered events per second:    {result['delivered_per_s']:10.0f}")
    print(f"latency commit->delivery p50:   {result['p50_ms']:10.1f} ms")
    print(f"latency commit->delivery p99:   {result['p99_ms']:10.1f} ms")
    print(f"events lost:                    {result['lost']:10d}")
    print(
        f"subscriber process CPU:         {result['consumer_cpu_s']:10.2f} s "
        f"in {result['consumer_wall_s']:.2f} s"
    )
    print(f"events delivered twice:         {result['duplicates']:10d}", flush=True)
    dispose_engines()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument(
        "--backend", choices=("postgresql", "sqlite", "both"), default="both"
    )
    args = parser.parse_args()
    if args.backend in ("postgresql", "both"):
        from tests.support.postgres import TemporaryPostgres

        server = TemporaryPostgres()
        server.start()
        try:
            database = f"bench_{uuid.uuid4().hex[:8]}"
            admin = create_engine(server.admin_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as connection:
                connection.execute(sql_text(f'CREATE DATABASE "{database}"'))
            admin.dispose()
            run_backend("PostgreSQL 15", server.url(database), args.rows, args.batch)
        finally:
            dispose_engines()
            server.stop()
    if args.backend in ("sqlite", "both"):
        with tempfile.TemporaryDirectory() as folder:
            run_backend("SQLite", f"sqlite:///{folder}/bench.db", args.rows, args.batch)


if __name__ == "__main__":
    main()
