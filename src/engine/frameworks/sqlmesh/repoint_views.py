# Re-points SQLMesh's virtual layer (the environment views) at the snapshots its state names,
# after statekeeper restored that state. Run by statekeeper with the Python interpreter of the
# `sqlmesh` it is given, in the project directory; it drives SQLMesh's own code: the
# SnapshotEvaluator.promote a plan's virtual-layer stage calls, with the deployability and table
# mapping that stage computes, and the view naming SQLMesh's demotion uses.
#
# Input (the environment variable STATEKEEPER_REPOINT_REQUEST, else stdin; JSON): {"sqlmeshVersion": the store's, "gateway": name or null,
#   "environments": [{"name", "change": "added"|"removed"|"changed",
#                     "promote": [model names], "demote": [SnapshotTableInfo JSON text],
#                     "fromNaming": EnvironmentNamingInfo JSON text or null}]}
# Output (stdout, last line, JSON): {"environments": [{"name", "promoted", "demoted"}]} or
#   {"error": {"reason": "...", "message": "...", "environment": name or null}}; exit 1 on error.
import json
import os
import sys


def fail(reason, message, environment=None):
    print(json.dumps({"error": {"reason": reason, "message": message, "environment": environment}}))
    sys.exit(1)


def main():
    raw = os.environ.get("STATEKEEPER_REPOINT_REQUEST")
    request = json.loads(raw) if raw else json.load(sys.stdin)
    try:
        import sqlmesh
        from sqlglot import exp
        from sqlmesh import Context
        from sqlmesh.core import constants as c
        from sqlmesh.core.environment import EnvironmentNamingInfo
        from sqlmesh.core.snapshot import DeployabilityIndex, SnapshotTableInfo
        from sqlmesh.core.snapshot.definition import to_view_mapping
        from sqlmesh.utils.date import now
    except Exception as e:  # noqa: BLE001 - any import failure means this is not SQLMesh
        fail("SqlmeshNotFound", f"this Python cannot import SQLMesh: {e}")

    wanted = request.get("sqlmeshVersion")
    if wanted and sqlmesh.__version__ != wanted:
        fail(
            "SqlmeshVersionMismatch",
            f"this sqlmesh is {sqlmesh.__version__}, the store was written by {wanted}: "
            f"re-point with SQLMesh {wanted} (--sqlmesh PATH)",
        )

    try:
        context = Context(paths=".", gateway=request.get("gateway"), load=False)
        state = context.state_sync
        evaluator = context.snapshot_evaluator
        adapter = evaluator.adapter
        # Reaching the warehouse now tells an unreachable one apart from a failed promotion.
        adapter.fetchone(exp.select(exp.Literal.number(1)))
    except Exception as e:  # noqa: BLE001
        fail("WarehouseUnreachable", f"cannot open the project or reach its warehouse: {e}")

    done = []
    for change in request.get("environments", []):
        name = change["name"]
        promoted = demoted = 0
        try:
            if change.get("demote") and change.get("fromNaming"):
                naming = EnvironmentNamingInfo.parse_raw(change["fromNaming"])
                for entry in change["demote"]:
                    info = SnapshotTableInfo.parse_raw(entry)
                    if not info.is_model or info.is_symbolic:
                        continue
                    view = info.qualified_view_name.for_environment(naming, dialect=adapter.dialect)
                    adapter.drop_view(view, ignore_if_not_exists=True)
                    demoted += 1
            promote = set(change.get("promote") or [])
            environment = state.get_environment(name) if promote else None
            if environment is not None:
                snapshots = state.get_snapshots(environment.snapshots)
                # Only the promoted snapshots have views (a dev environment promotes only what
                # it changed); a changed model without one loses the view it may have had.
                promoted = {s.name for s in environment.promoted_snapshots}
                targets = [
                    snapshots[s.snapshot_id]
                    for s in environment.snapshots
                    if s.name in promote and s.name in promoted and s.snapshot_id in snapshots
                ]
                for info in environment.snapshots:
                    if info.name in promote and info.name not in promoted and info.is_model:
                        view = info.qualified_view_name.for_environment(
                            environment.naming_info, dialect=adapter.dialect
                        )
                        adapter.drop_view(view, ignore_if_not_exists=True)
                        demoted += 1
                missing = [
                    s.name for s in environment.snapshots if s.snapshot_id not in snapshots
                ]
                if missing:
                    fail(
                        "SnapshotsMissing",
                        f"environment {name} names snapshots its state does not hold: "
                        + ", ".join(missing),
                        name,
                    )
                naming = environment.naming_info
                deployability = (
                    DeployabilityIndex.all_deployable()
                    if naming.name == c.PROD
                    else DeployabilityIndex.create(snapshots, start=environment.start_at)
                )
                gone = [
                    s.table_name(deployability.is_representative(s))
                    for s in targets
                    if s.is_model
                    and not s.is_symbolic
                    and not adapter.table_exists(s.table_name(deployability.is_representative(s)))
                ]
                if gone:
                    fail(
                        "PhysicalTablesMissing",
                        f"environment {name} selects from tables that no longer exist "
                        f"(dropped by a janitor after the backup was taken?): {', '.join(gone)}; "
                        f"`sqlmesh plan {name}` rebuilds them",
                        name,
                    )
                evaluator.promote(
                    targets,
                    environment_naming_info=naming,
                    deployability_index=deployability,
                    start=environment.start_at,
                    end=environment.end_at,
                    execution_time=now(),
                    snapshots=snapshots,
                    table_mapping=to_view_mapping(
                        snapshots.values(),
                        naming,
                        default_catalog=context.default_catalog,
                        dialect=adapter.dialect,
                    ),
                )
                promoted = sum(1 for s in targets if s.is_model and not s.is_symbolic)
        except SystemExit:
            raise
        except Exception as e:  # noqa: BLE001
            fail("RepointFailed", f"environment {name}: {e}", name)
        done.append({"name": name, "promoted": promoted, "demoted": demoted})
    print(json.dumps({"environments": done}))


main()
