"""A lost machine is noticed: the Prefect automation that marks a flow run Crashed when its
heartbeats stop (Prefect's documented "zombie flow" pattern), so `prefect flow-run retry` works
after a preemption instead of refusing a run stuck in Running.

Flow runs emit ``prefect.flow-run.heartbeat`` every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds
(prefect.yaml sets it for both work pools). ``pab automations install`` creates (or replaces) the
automation on the server ``PREFECT_API_URL`` points at; run it once per server.
"""

from __future__ import annotations

from datetime import timedelta

AUTOMATION_NAME = "pab: crash flow runs whose heartbeats stopped"
MISSED_HEARTBEATS = 3  # a run is declared lost after this many heartbeat periods of silence


def crash_automation(heartbeat_s: int):
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=AUTOMATION_NAME,
        description=f"Marks a flow run Crashed when no heartbeat arrived for {MISSED_HEARTBEATS} x {heartbeat_s} s "
                    "(its machine or process died); `prefect flow-run retry` then resumes it from its markers.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed", "prefect.flow-run.Paused",
                    "prefect.flow-run.Suspended"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=MISSED_HEARTBEATS * heartbeat_s),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message="Flow run marked crashed: its heartbeats "
                                    f"stopped for {MISSED_HEARTBEATS * heartbeat_s} s (machine or process lost)")],
    )


def install_crash_automation(heartbeat_s: int) -> str:
    """Create the automation, replacing an earlier one of the same name; returns its id."""
    from prefect.automations import Automation

    try:
        Automation.read(name=AUTOMATION_NAME).delete()
    except ValueError:  # none yet
        pass
    return str(crash_automation(heartbeat_s).create().id)
