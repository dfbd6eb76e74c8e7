"""Each topology's flow of work, with real programs run by the agents."""

from __future__ import annotations

from datetime import datetime

from temporalio.client import Client

from app.contracts.swarm import task_workflow_id
from tests.support.replay import replay_run, replay_saved
from tests.swarm.conftest import Swarms
from workers.registry import all_workflows

# Prints who ran which part, and what the previous agent passed along.
PART_PROGRAM = (
    "import os\n"
    "prev = os.environ['NEXUS_PREVIOUS_OUTPUT'].strip()\n"
    "me = os.environ['NEXUS_AGENT_NAME']\n"
    "part = os.environ['NEXUS_PART_INDEX']\n"
    "print((prev + ' ' if prev else '') + f'{me}:{part}')\n"
)


async def test_star_hub_distributes_and_collects(swarms: Swarms) -> None:
    swarm_id, agents = await swarms.swarm("star", ["coordinator", "coder", "coder"])
    hub = agents[0]["agent_id"]
    spokes = {agents[1]["agent_id"], agents[2]["agent_id"]}
    result = await swarms.run_task(
        task="- part a\n- part b\n- part c\n- part d",
        code=PART_PROGRAM,
        strategy="parallel",
        swarm_id=swarm_id,
    )
    assert result["status"] == "completed", result["error"]
    assert result["topology"] == "star"
    workers = {step["agent_id"] for step in result["results"]}
    assert workers == spokes
    distribute = [e for e in result["flow"] if e["kind"] == "distribute"]
    collect = [e for e in result["flow"] if e["kind"] == "collect"]
    assert {e["source"] for e in distribute} == {hub}
    assert {e["target"] for e in collect} == {hub}
    assert len(distribute) == len(collect) == 4
    assert result["output"].splitlines() == [
        f"{step['agent_name']}:{step['part_index']}"
        for step in sorted(result["results"], key=lambda s: s["part_index"])
    ]


async def test_hierarchical_splits_delegates_aggregates(swarms: Swarms) -> None:
    swarm_id, agents = await swarms.swarm(
        "hierarchical", ["coder", "coordinator", "coder", "coder", "coder", "coder"]
    )
    ids = {a["name"]: a["agent_id"] for a in agents}
    result = await swarms.run_task(
        task="1. alpha\n2. beta\n3. gamma\n4. delta\n5. epsilon",
        code="import os; print(os.environ['NEXUS_PART'].upper())",
        strategy="parallel",
        swarm_id=swarm_id,
        maxAgents=6,
    )
    assert result["status"] == "completed", result["error"]
    # The coordinator is node 0 and splits; the 5 other nodes each get one.
    root = ids["coordinator-1"]
    flow = result["flow"]
    assert flow[0] == {
        "kind": "split",
        "source": root,
        "target": root,
        "part_index": None,
        "note": "5 subtasks",
    }
    workers = [
        s["agent_id"] for s in sorted(result["results"], key=lambda s: s["part_index"])
    ]
    assert root not in workers
    assert len(set(workers)) == 5
    # Delegation follows the tree: node i gets work from node (i-1)//2.
    order = [root, *workers]
    delegations = [(e["source"], e["target"]) for e in flow if e["kind"] == "delegate"]
    for source, target in delegations:
        assert order.index(source) == (order.index(target) - 1) // 2
    assert (order[1], order[3]) in delegations
    assert (order[1], order[4]) in delegations
    assert (order[2], order[5]) in delegations
    collects = [(e["source"], e["target"]) for e in flow if e["kind"] == "collect"]
    assert collects == [
        (order[5], order[2]),
        (order[4], order[1]),
        (order[3], order[1]),
        (order[2], order[0]),
        (order[1], order[0]),
    ]
    assert result["output"].splitlines() == [
        "ALPHA",
        "BETA",
        "GAMMA",
        "DELTA",
        "EPSILON",
    ]
    single = await swarms.run_task(
        task="one part", command="echo one", swarm_id=swarm_id, maxAgents=2
    )
    assert single["flow"][0]["note"] == "1 subtask"


async def test_ring_passes_output_along(swarms: Swarms) -> None:
    swarm_id, agents = await swarms.swarm("ring", ["coder", "tester", "reviewer"])
    result = await swarms.run_task(
        task="- one\n- two\n- three\n- four",
        code=PART_PROGRAM,
        strategy="sequential",
        swarm_id=swarm_id,
    )
    assert result["status"] == "completed", result["error"]
    names = [a["name"] for a in agents]
    ids = [a["agent_id"] for a in agents]
    # Part k runs on agent k mod 3, given everything before it.
    assert result["output"].split() == [
        f"{names[0]}:0",
        f"{names[1]}:1",
        f"{names[2]}:2",
        f"{names[0]}:3",
    ]
    passes = [(e["source"], e["target"]) for e in result["flow"] if e["kind"] == "pass"]
    assert passes == [(ids[0], ids[1]), (ids[1], ids[2]), (ids[2], ids[0])]
    assert result["strategy_used"] == "sequential"


async def test_mesh_agents_claim_from_queue(swarms: Swarms) -> None:
    swarm_id, agents = await swarms.swarm("mesh", ["coder", "coder", "analyst"])
    result = await swarms.run_task(
        task="\n".join(f"item {i}" for i in range(7)),
        code="import os; print(os.environ['NEXUS_PART'])",
        swarm_id=swarm_id,
    )
    assert result["status"] == "completed", result["error"]
    # Adaptive: 7 independent parts and 3 working agents run in parallel.
    assert result["strategy_used"] == "parallel"
    assert "7 independent parts" in result["strategy_reason"]
    claims = [e for e in result["flow"] if e["kind"] == "claim"]
    assert [c["part_index"] for c in claims] == list(range(7))
    assert {c["source"] for c in claims} == {"queue"}
    assert {c["target"] for c in claims} == {a["agent_id"] for a in agents}
    assert result["output"].splitlines() == [f"item {i}" for i in range(7)]


async def test_adaptive_chain_runs_sequentially(swarms: Swarms) -> None:
    swarm_id, _ = await swarms.swarm("mesh", ["coder", "coder"])
    result = await swarms.run_task(
        task="write 1, then add one",
        code=(
            "import os; data = os.environ['NEXUS_PREVIOUS_OUTPUT'].strip(); "
            "print(int(data or 0) + 1)"
        ),
        swarm_id=swarm_id,
        maxAgents=2,
    )
    assert result["status"] == "completed", result["error"]
    assert result["strategy_used"] == "sequential"
    assert "'then'" in result["strategy_reason"]
    # Two data-parallel parts chained: 0+1, then 1+1.
    assert [s["stdout"].strip() for s in result["results"]] == ["1", "2"]
    assert result["output"].strip() == "2"


async def test_hub_and_one_worker_adaptive_sequential(swarms: Swarms) -> None:
    # The hub runs no part, so its one worker runs both parts, and adaptive
    # chains them as it does for a task of one agent.
    swarm_id, agents = await swarms.swarm("star", ["coordinator", "coder"])
    result = await swarms.run_task(
        task="a\nb", code=PART_PROGRAM, swarm_id=swarm_id, maxAgents=2
    )
    assert result["status"] == "completed", result["error"]
    assert result["strategy_used"] == "sequential"
    assert result["strategy_reason"] == "2 parts and only 1 working agent"
    assert {step["agent_id"] for step in result["results"]} == {agents[1]["agent_id"]}
    assert result["output"].split() == ["coder-1:0", "coder-1:1"]
    await replay_run(
        swarms.client, task_workflow_id(result["task_id"]), all_workflows()
    )


async def test_hub_task_replays_older_strategy(client: Client) -> None:
    """A star task of a hub and one worker recorded when adaptive counted the
    hub, so it ran the two parts in parallel."""
    await replay_saved(client, "swarm_task_hub_counted", all_workflows())


async def test_hierarchy_of_one_delegates_to_itself(swarms: Swarms) -> None:
    swarm_id, agents = await swarms.swarm("hierarchical", ["coder"])
    root = agents[0]["agent_id"]
    result = await swarms.run_task(
        task="1. a\n2. b",
        command="echo $NEXUS_PART",
        strategy="parallel",
        swarm_id=swarm_id,
    )
    assert result["status"] == "completed", result["error"]
    edges = [
        (e["kind"], e["source"], e["target"], e["part_index"]) for e in result["flow"]
    ]
    assert edges == [
        ("split", root, root, None),
        ("delegate", root, root, 0),
        ("delegate", root, root, 1),
        ("collect", root, root, 0),
        ("collect", root, root, 1),
    ]
    assert result["output"] == "a\nb\n"


async def test_step_start_excludes_agent_wait(swarms: Swarms) -> None:
    """Parallel parts given to the hub's one worker run one after another,
    and the second step starts when its program does."""
    swarm_id, agents = await swarms.swarm("star", ["coordinator", "coder"])
    result = await swarms.run_task(
        task="a\nb",
        command="date +%s.%N; sleep 2",
        strategy="parallel",
        swarm_id=swarm_id,
        maxAgents=2,
    )
    assert result["status"] == "completed", result["error"]
    first, second = sorted(
        result["results"], key=lambda step: float(step["stdout"].split()[0])
    )
    assert first["agent_id"] == second["agent_id"] == agents[1]["agent_id"]
    first_program_start = float(first["stdout"].split()[0])
    second_started = datetime.fromisoformat(second["started_at"]).timestamp()
    # The second program started after the first one's 2 s sleep.
    assert second_started >= first_program_start + 2
    assert second["waited_ms"] > 0
    await replay_run(
        swarms.client, task_workflow_id(result["task_id"]), all_workflows()
    )
