"""Neural workflows: one training job, and distributed training in rounds
over a cluster's nodes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    TimeoutError,
    TimeoutType,
)

with workflow.unsafe.imports_passed_through():
    from app.contracts.neural import (
        TRAINING_DIVERGED,
        AggregateInput,
        AggregateResult,
        FinishInput,
        JobFailure,
        MemoryCleanupInput,
        MemoryCleanupReport,
        MemoryCleanupResult,
        NodeRef,
        NodeTrainInput,
        NodeTrainResult,
        PrepareInput,
        PrepareResult,
        RoundEventRecord,
        RoundRecord,
        SessionFailure,
        SessionInput,
        SessionPlan,
        SessionResult,
        SessionState,
        TrainJobInput,
        TrainJobResult,
        ValidateInput,
        ValidateResult,
        WeightedRef,
    )
    from app.contracts.queues import NEURAL, ORCHESTRATION

# Errors that a retry repeats: bad data sets and arguments.
_INPUT_ERRORS = ["InvalidDataset", "InvalidInput"]
# Runs that started before this patch left a diverged worker out of the
# round as missing, and went on training without it.
_PATCH_DIVERGED_NODE_FAILS_SESSION = "diverged-node-fails-session"
# Runs that started before this patch completed when the validators rejected
# every round, and stored the untrained initial model as the result.
_PATCH_ALL_ROUNDS_REJECTED_FAILS = "all-rounds-rejected-fails-session"
# Runs that started before this patch failed a round without a worker's
# result, and recorded none of its `missing` events.
_PATCH_EMPTY_ROUND_RECORDED = "neural-empty-round-recorded"
# Runs that started before this patch cleaned every queue at once.
_PATCH_CLEANUPS_ONE_AT_A_TIME = "memory-cleanups-one-at-a-time"


def _error_text(error: BaseException) -> str:
    cause = error.cause if isinstance(error, ActivityError) else error
    # A divergence's message starts with "training diverged", so its type
    # would only repeat it.
    if isinstance(cause, ApplicationError) and cause.type == TRAINING_DIVERGED:
        return cause.message
    return str(cause or error)


def _divergence(error: BaseException) -> str | None:
    """Return the problem of a node whose training diverged, such as "loss
    is NaN at local epoch 1 of round 0", or None for any other error."""
    if not isinstance(error, ActivityError):
        return None
    cause = error.cause
    if not isinstance(cause, ApplicationError) or cause.type != TRAINING_DIVERGED:
        return None
    return str(cause.details[0]) if cause.details else cause.message


@workflow.defn
class NeuralTrainWorkflow:
    """Train one model on `nexus-neural`; the activity checkpoints every
    epoch, so a retry resumes where the last attempt stopped."""

    @workflow.run
    async def run(self, request: TrainJobInput) -> TrainJobResult:
        workflow.logger.info("training job %s started", request.job_id)
        try:
            result: TrainJobResult = await workflow.execute_activity(
                "neural_train_model",
                request,
                task_queue=NEURAL,
                start_to_close_timeout=timedelta(hours=6),
                # The activity heartbeats every 10 s while it runs, so a
                # killed worker is noticed within a minute.
                heartbeat_timeout=timedelta(seconds=60),
                retry_policy=RetryPolicy(
                    maximum_attempts=3, non_retryable_error_types=_INPUT_ERRORS
                ),
                result_type=TrainJobResult,
            )
        except ActivityError as error:
            message = _error_text(error)
            await workflow.execute_activity(
                "neural_fail_job",
                JobFailure(job_id=request.job_id, error=message),
                task_queue=ORCHESTRATION,
                start_to_close_timeout=timedelta(seconds=30),
            )
            raise ApplicationError(
                f"training job {request.job_id} failed: {message}",
                type="TrainingFailed",
                non_retryable=True,
            ) from error
        workflow.logger.info(
            "training job %s completed, accuracy %.4f", request.job_id, result.accuracy
        )
        return result


@workflow.defn
class DistributedTrainingWorkflow:
    """Train a cluster's model in rounds.

    Each round sends the global model's storage path to every worker node's
    queue. With `federated`, each worker trains local epochs on its shard and
    the parameter server averages the models weighted by sample count;
    otherwise each worker returns the gradient of one batch and the parameter
    server averages the gradients and takes one optimizer step. Aggregator
    nodes reduce their subtree first in a hierarchical cluster. With
    proof-of-learning, validator nodes evaluate the aggregate on their
    hold-out shard and an update that raises loss beyond the tolerance is
    rejected. A node that does not answer within the round timeout is left
    out of that round. The run continues as new every `continue_every` rounds.
    """

    def __init__(self) -> None:
        self._state = SessionState()

    @workflow.query
    def progress(self) -> SessionState:
        return self._state

    @workflow.run
    async def run(self, request: SessionInput) -> SessionResult:
        plan, state = request.plan, request.state
        self._state = state
        try:
            if state.data_path is None:
                await self._prepare(plan, state)
            total = self._total_rounds(plan, state)
            first = state.round
            while state.round < total:
                if state.round - first >= plan.continue_every:
                    workflow.logger.info(
                        "session %s continues as new at round %d",
                        plan.session_id,
                        state.round,
                    )
                    workflow.continue_as_new(SessionInput(plan=plan, state=state))
                await self._round(plan, state, total)
            if (
                total > 0
                and state.rejected >= total
                and workflow.patched(_PATCH_ALL_ROUNDS_REJECTED_FAILS)
            ):
                raise ApplicationError(
                    f"the validators rejected every round ({state.rejected} of "
                    f"{total}), so the global model is still the untrained "
                    "initial one and no model is stored; raise "
                    f"validation_tolerance (now {plan.validation_tolerance:g}) "
                    f"or lower learning_rate (now {plan.learning_rate:g})",
                    type="AllRoundsRejected",
                    non_retryable=True,
                )
            assert state.data_path is not None and state.global_path is not None
            result: SessionResult = await workflow.execute_activity(
                "neural_finish_session",
                FinishInput(
                    plan=plan,
                    data_path=state.data_path,
                    global_path=state.global_path,
                    node_updates=state.node_updates,
                    rounds_completed=state.round,
                    rounds_rejected=state.rejected,
                    samples=state.samples,
                    train_seconds=state.train_seconds,
                ),
                task_queue=plan.default_queue,
                start_to_close_timeout=timedelta(minutes=10),
                retry_policy=RetryPolicy(
                    maximum_attempts=3, non_retryable_error_types=_INPUT_ERRORS
                ),
                result_type=SessionResult,
            )
        except (ActivityError, ApplicationError) as error:
            message = _error_text(error)
            await workflow.execute_activity(
                "neural_fail_session",
                SessionFailure(session_id=plan.session_id, error=message),
                task_queue=ORCHESTRATION,
                start_to_close_timeout=timedelta(seconds=30),
            )
            raise ApplicationError(
                f"session {plan.session_id} failed: {message}",
                type="TrainingFailed",
                non_retryable=True,
            ) from error
        workflow.logger.info(
            "session %s completed after %d rounds, accuracy %.4f",
            plan.session_id,
            result.rounds_completed,
            result.accuracy,
        )
        return result

    @staticmethod
    def _total_rounds(plan: SessionPlan, state: SessionState) -> int:
        return plan.rounds if plan.federated else plan.epochs * state.steps_per_epoch

    async def _prepare(self, plan: SessionPlan, state: SessionState) -> None:
        prepared: PrepareResult = await workflow.execute_activity(
            "neural_prepare_session",
            PrepareInput(plan=plan),
            task_queue=plan.default_queue,
            start_to_close_timeout=timedelta(minutes=10),
            retry_policy=RetryPolicy(
                maximum_attempts=3, non_retryable_error_types=_INPUT_ERRORS
            ),
            result_type=PrepareResult,
        )
        state.data_path = prepared.data_path
        state.global_path = prepared.global_path
        state.optimizer_state_path = prepared.optimizer_state_path
        state.features = prepared.features
        state.classes = prepared.classes
        state.steps_per_epoch = prepared.steps_per_epoch

    def _node_options(self, plan: SessionPlan) -> dict[str, Any]:
        return {
            "schedule_to_close_timeout": timedelta(seconds=plan.round_timeout_seconds),
            "heartbeat_timeout": timedelta(seconds=plan.heartbeat_timeout_seconds),
            "retry_policy": RetryPolicy(
                initial_interval=timedelta(seconds=1),
                maximum_interval=timedelta(seconds=5),
                non_retryable_error_types=_INPUT_ERRORS,
            ),
        }

    async def _round(self, plan: SessionPlan, state: SessionState, total: int) -> None:
        assert state.data_path is not None and state.global_path is not None
        round_index = state.round
        started = workflow.time()
        events: list[RoundEventRecord] = []
        answers = await asyncio.gather(
            *(
                workflow.execute_activity(
                    "neural_node_train",
                    NodeTrainInput(
                        session_id=plan.session_id,
                        node_id=node.node_id,
                        round=round_index,
                        model=plan.model,
                        data_path=state.data_path,
                        shard=shard,
                        shards=len(plan.workers),
                        global_path=state.global_path,
                        federated=plan.federated,
                        local_epochs=plan.local_epochs,
                        step=round_index,
                        batch_size=plan.batch_size,
                        learning_rate=plan.learning_rate,
                        optimizer=plan.optimizer,
                        jit=plan.jit,
                        seed=plan.seed,
                        checkpoint_seconds=plan.checkpoint_seconds,
                    ),
                    task_queue=node.task_queue,
                    result_type=NodeTrainResult,
                    **self._node_options(plan),
                )
                for shard, node in enumerate(plan.workers)
            ),
            return_exceptions=True,
        )
        contributions: dict[str, list[WeightedRef]] = {}
        diverged: dict[str, str] = {}
        # Kept as the workers' models only if the validators accept the round.
        updates: dict[str, str] = {}
        for node, answer in zip(plan.workers, answers, strict=True):
            if isinstance(answer, NodeTrainResult):
                reducer = self._reducer(plan, node)
                contributions.setdefault(reducer, []).append(
                    WeightedRef(path=answer.update_path, weight=answer.samples)
                )
                state.samples += answer.processed_samples
                updates[node.node_id] = answer.update_path
                events.append(
                    RoundEventRecord(
                        node_id=node.node_id,
                        kind="update",
                        detail={
                            "loss": answer.loss,
                            "accuracy": answer.accuracy,
                            "samples": answer.samples,
                            "seconds": answer.train_seconds,
                            "attempt": answer.attempt,
                            "resumed_from_epoch": answer.resumed_from_epoch,
                        },
                    )
                )
            elif isinstance(answer, BaseException):
                problem = _divergence(answer)
                if problem is not None and workflow.patched(
                    _PATCH_DIVERGED_NODE_FAILS_SESSION
                ):
                    diverged[node.node_id] = problem
                    events.append(
                        RoundEventRecord(
                            node_id=node.node_id,
                            kind="diverged",
                            detail={"reason": _error_text(answer)},
                        )
                    )
                else:
                    events.append(self._missing(plan, state, node, answer))
        if diverged:
            # Every worker trains at the same learning rate, so the others'
            # updates are suspect too, and the round stops here.
            await self._record_round(plan, state, round_index, events)
            label = "worker node" if len(diverged) == 1 else "worker nodes"
            nodes = ", ".join(
                f"{node} ({problem})" for node, problem in diverged.items()
            )
            raise ApplicationError(
                f"training diverged on {label} {nodes}; lower learning_rate "
                f"(now {plan.learning_rate:g})",
                type=TRAINING_DIVERGED,
                non_retryable=True,
            )
        if not contributions:
            reasons = sorted(
                {str(event.detail.get("reason")) for event in events if event.detail}
            )
            if workflow.patched(_PATCH_EMPTY_ROUND_RECORDED):
                # The session shows why each node was left out.
                await self._record_round(plan, state, round_index, events)
                raise ApplicationError(
                    f"no worker node answered in round {round_index} "
                    f"({'; '.join(reasons)}); check that the cluster's node "
                    "workers run (nexus worker --neural-node NODE_ID), or, if "
                    "they train for longer, raise round_timeout_seconds (now "
                    f"{plan.round_timeout_seconds:g}) or train fewer local "
                    f"epochs per round (now {plan.local_epochs}) with more rounds",
                    type="NoWorkers",
                )
            raise ApplicationError(
                f"no worker node answered in round {round_index}; check that the "
                "cluster's node workers run (nexus worker --neural-node NODE_ID)",
                type="NoWorkers",
            )
        root = await self._reduce(plan, state, round_index, contributions, events)
        accepted = await self._validate(plan, state, round_index, root, events)
        if accepted:
            state.node_updates.update(updates)
            state.global_path = root.path
            if root.optimizer_state_path:
                state.optimizer_state_path = root.optimizer_state_path
        else:
            state.rejected += 1
        state.round += 1
        state.train_seconds += workflow.time() - started
        await self._record_round(plan, state, round_index, events)
        workflow.logger.info(
            "session %s round %d/%d %s",
            plan.session_id,
            round_index + 1,
            total,
            "accepted" if accepted else "rejected",
        )

    @staticmethod
    async def _record_round(
        plan: SessionPlan,
        state: SessionState,
        round_index: int,
        events: list[RoundEventRecord],
    ) -> None:
        await workflow.execute_activity(
            "neural_record_round",
            RoundRecord(
                session_id=plan.session_id,
                round=round_index,
                events=events,
                rounds_completed=state.round,
                rounds_rejected=state.rejected,
            ),
            task_queue=ORCHESTRATION,
            start_to_close_timeout=timedelta(seconds=30),
        )

    @staticmethod
    def _reducer(plan: SessionPlan, node: NodeRef) -> str:
        # The median of subtree medians is not the median, so byzantine
        # consensus reduces every update at the root.
        if plan.consensus == "byzantine" or node.reducer is None:
            return "root"
        if any(a.node_id == node.reducer for a in plan.aggregators):
            return node.reducer
        return "root"

    def _missing(
        self,
        plan: SessionPlan,
        state: SessionState,
        node: NodeRef,
        error: BaseException,
    ) -> RoundEventRecord:
        state.missing[node.node_id] = state.missing.get(node.node_id, 0) + 1
        timed_out = isinstance(error, ActivityError) and isinstance(
            error.cause, TimeoutError
        )
        reason = self._timeout_reason(plan, error) if timed_out else _error_text(error)
        workflow.logger.warning(
            "session %s: node %s left out of round %d: %s",
            plan.session_id,
            node.node_id,
            state.round,
            reason,
        )
        return RoundEventRecord(
            node_id=node.node_id, kind="missing", detail={"reason": reason}
        )

    @staticmethod
    def _timeout_reason(plan: SessionPlan, error: BaseException) -> str:
        """Describe a node's timeout with the setting that would change it."""
        reason = f"no answer within {plan.round_timeout_seconds:g} s"
        timeouts: list[TimeoutError] = []
        cause: BaseException | None = error
        while cause is not None:
            if isinstance(cause, TimeoutError):
                timeouts.append(cause)
            cause = cause.__cause__
        # A heartbeat timeout is either the error itself or, once the round's
        # timeout ends the retries, the cause of that timeout.
        if any(t.type == TimeoutType.HEARTBEAT for t in timeouts):
            return (
                f"{reason}; its last attempt sent no heartbeat for "
                f"{plan.heartbeat_timeout_seconds:g} s, so check that the node's "
                "worker process runs and is not stalled"
            )
        details = timeouts[0].last_heartbeat_details if timeouts else ()
        last = details[-1] if details else None
        if isinstance(last, dict) and "epoch" in last:
            return (
                f"{reason}, still training after local epoch {last['epoch']} of "
                f"{plan.local_epochs}"
            )
        return reason

    async def _reduce(
        self,
        plan: SessionPlan,
        state: SessionState,
        round_index: int,
        contributions: dict[str, list[WeightedRef]],
        events: list[RoundEventRecord],
    ) -> AggregateResult:
        for aggregator in sorted(plan.aggregators, key=lambda a: -a.depth):
            inputs = contributions.pop(aggregator.node_id, [])
            if not inputs:
                continue
            try:
                partial: AggregateResult = await workflow.execute_activity(
                    "neural_aggregate",
                    AggregateInput(
                        session_id=plan.session_id,
                        round=round_index,
                        name=f"subtree-{aggregator.node_id}",
                        inputs=inputs,
                    ),
                    task_queue=aggregator.task_queue,
                    result_type=AggregateResult,
                    **self._node_options(plan),
                )
            except ActivityError as error:
                events.append(self._missing(plan, state, aggregator, error))
                continue
            parent = self._reducer(plan, aggregator)
            contributions.setdefault(parent, []).append(
                WeightedRef(path=partial.path, weight=partial.weight)
            )
            events.append(
                RoundEventRecord(
                    node_id=aggregator.node_id,
                    kind="aggregated",
                    detail={"inputs": len(inputs), "weight": partial.weight},
                )
            )
        inputs = [ref for refs in contributions.values() for ref in refs]
        if not inputs:
            raise ApplicationError(
                f"no update reached the parameter server in round {round_index}",
                type="NoWorkers",
            )
        server = plan.parameter_server
        return await workflow.execute_activity(
            "neural_aggregate",
            AggregateInput(
                session_id=plan.session_id,
                round=round_index,
                name="aggregate",
                inputs=inputs,
                method="median" if plan.consensus == "byzantine" else "mean",
                apply_gradient=not plan.federated,
                model=plan.model,
                global_path=state.global_path,
                optimizer_state_path=state.optimizer_state_path,
                learning_rate=plan.learning_rate,
                optimizer=plan.optimizer,
                jit=plan.jit,
            ),
            task_queue=server.task_queue if server else plan.default_queue,
            result_type=AggregateResult,
            **self._node_options(plan),
        )

    async def _validate(
        self,
        plan: SessionPlan,
        state: SessionState,
        round_index: int,
        candidate: AggregateResult,
        events: list[RoundEventRecord],
    ) -> bool:
        if plan.consensus != "proof-of-learning" or not plan.validators:
            events.append(
                RoundEventRecord(kind="accepted", detail={"validated": False})
            )
            return True
        assert state.data_path is not None and state.global_path is not None
        answers = await asyncio.gather(
            *(
                workflow.execute_activity(
                    "neural_validate",
                    ValidateInput(
                        session_id=plan.session_id,
                        node_id=node.node_id,
                        model=plan.model,
                        data_path=state.data_path,
                        shard=shard,
                        shards=len(plan.validators),
                        candidate_path=candidate.path,
                        previous_path=state.global_path,
                        jit=plan.jit,
                    ),
                    task_queue=node.task_queue,
                    result_type=ValidateResult,
                    **self._node_options(plan),
                )
                for shard, node in enumerate(plan.validators)
            ),
            return_exceptions=True,
        )
        votes: list[ValidateResult] = []
        for node, answer in zip(plan.validators, answers, strict=True):
            if isinstance(answer, ValidateResult):
                votes.append(answer)
            elif isinstance(answer, BaseException):
                events.append(self._missing(plan, state, node, answer))
        if not votes:
            events.append(
                RoundEventRecord(
                    kind="accepted",
                    detail={"validated": False, "reason": "no validator answered"},
                )
            )
            return True
        samples = sum(v.samples for v in votes) or 1
        candidate_loss = sum(v.candidate_loss * v.samples for v in votes) / samples
        previous_loss = sum(v.previous_loss * v.samples for v in votes) / samples
        limit = previous_loss * (1 + plan.validation_tolerance)
        # NaN losses compare false, so a NaN candidate is rejected too.
        accepted = candidate_loss <= limit
        events.append(
            RoundEventRecord(
                kind="accepted" if accepted else "rejected",
                detail={
                    "validated": True,
                    "candidate_loss": candidate_loss,
                    "previous_loss": previous_loss,
                    "tolerance": plan.validation_tolerance,
                    "validators": [v.node_id for v in votes],
                },
            )
        )
        return accepted


@workflow.defn
class NeuralMaintenanceWorkflow:
    """Run `neural_memory_cleanup` once on each queue; a queue whose worker
    does not answer in time is reported as missing."""

    @workflow.run
    async def run(self, request: MemoryCleanupInput) -> MemoryCleanupResult:
        def cleanup(queue: str) -> Awaitable[MemoryCleanupReport]:
            return workflow.execute_activity(
                "neural_memory_cleanup",
                task_queue=queue,
                schedule_to_close_timeout=timedelta(seconds=request.timeout_seconds),
                retry_policy=RetryPolicy(maximum_attempts=1),
                result_type=MemoryCleanupReport,
            )

        answers: list[MemoryCleanupReport | BaseException]
        if workflow.patched(_PATCH_CLEANUPS_ONE_AT_A_TIME):
            # One at a time: several queues are often served by one process,
            # whose memory before and after each cleanup must not overlap
            # with another's.
            answers = []
            for queue in request.queues:
                try:
                    answers.append(await cleanup(queue))
                except ActivityError as error:
                    answers.append(error)
        else:
            answers = await asyncio.gather(
                *(cleanup(queue) for queue in request.queues), return_exceptions=True
            )
        result = MemoryCleanupResult(processes=[])
        for queue, answer in zip(request.queues, answers, strict=True):
            if isinstance(answer, MemoryCleanupReport):
                result.processes.append(answer)
            elif isinstance(answer, BaseException):
                result.missing[queue] = _error_text(answer)
        return result
