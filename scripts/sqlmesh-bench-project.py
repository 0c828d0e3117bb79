#!/usr/bin/env python3
"""Generate a synthetic SQLMesh project for benchmarking state export/import.

The project has N models forming a layered DAG over a DuckDB warehouse, with its
state stored in PostgreSQL:

* ``config.yaml``: one gateway whose ``connection`` is a DuckDB file inside the
  project directory and whose ``state_connection`` is the given PostgreSQL
  database (``state_schema`` defaults to ``sqlmesh``);
* ``seeds/``: one small CSV per SEED model (layer 0);
* ``models/``: the SEED models plus layers of VIEW, FULL and
  INCREMENTAL_BY_TIME_RANGE models, each selecting from 1-3 models of earlier
  layers. The mix of kinds and the edges are deterministic for a given --seed.

Every model has the columns ``id, day_offset, amount, label`` (unique on
``id, day_offset``); incremental models add a ``ds`` time column. All models
start three days back with a daily cron, so each plan records a few intervals
but backfills only a handful of rows.

Without --plan the script only writes files. With --plan it then runs the real
``sqlmesh plan`` for ``prod`` and for --dev-envs development environments
(``dev_1``, ``dev_2``, ...). For each dev environment about 5 % of the models
are changed (an added column, or a changed literal: non-breaking and breaking
changes) so that the environment gets its own new snapshots; the files are
restored afterwards, so the project on disk always matches ``prod``. Plan
timings are printed to stderr; the full sqlmesh output goes to DIR/logs/.

The PostgreSQL database must already exist; SQLMesh creates the state schema.
To point the project at another state database without editing config.yaml
(e.g. as the target of ``sqlmesh state import``), set
``SQLMESH__GATEWAYS__BENCH__STATE_CONNECTION__DATABASE=other_db`` in the
environment of the sqlmesh command.

Usage:
    scripts/sqlmesh-bench-project.py --models 1000 --dir /tmp/sqlmesh-bench-1000 \\
        --state-url postgres://user:pw@127.0.0.1:5432/bench_state --plan --dev-envs 2

Standard library only; it shells out to the sqlmesh CLI (--sqlmesh, by default
the ``sqlmesh`` next to the running Python interpreter, e.g. in a virtualenv
with ``sqlmesh[postgres]`` installed).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

GATEWAY = "bench"
WAREHOUSE_FILE = "warehouse.duckdb"
SEED_SCHEMA = "raw"
MODEL_SCHEMA = "analytics"
START = "3 days ago"
KINDS = ("VIEW", "FULL", "INCREMENTAL_BY_TIME_RANGE")
KIND_WEIGHTS = (0.4, 0.3, 0.3)
SEED_IDS = range(1, 5)
SEED_DAY_OFFSETS = range(0, 5)
DEV_CHANGE_FRACTION = 0.05


# --------------------------------------------------------------------------- #
# Project model
# --------------------------------------------------------------------------- #


@dataclass
class ModelSpec:
    """One model of the generated DAG."""

    name: str  # schema-qualified
    layer: int
    kind: str  # "SEED" or one of KINDS
    parents: list[str] = field(default_factory=list)
    literal: int = 0

    @property
    def file_stem(self) -> str:
        return self.name.split(".", 1)[1]

    @property
    def model_path(self) -> Path:
        return Path("models") / f"{self.file_stem}.sql"

    @property
    def seed_path(self) -> Path:
        return Path("seeds") / f"{self.file_stem}.csv"


@dataclass(frozen=True)
class DevChange:
    """A change applied to one model for one dev environment."""

    extra_column: str | None = None  # non-breaking: add a constant column
    literal: int | None = None  # breaking: change the literal added to `amount`


def plan_dag(n_models: int, seed: int, layers: int | None) -> list[ModelSpec]:
    """Lay out N models: a few seeds, then layers selecting from earlier layers."""
    if n_models < 2:
        raise SystemExit("--models must be at least 2")
    rng = random.Random(f"dag:{seed}")
    n_seeds = min(n_models - 1, max(2, min(20, n_models // 50)))
    n_rest = n_models - n_seeds
    n_layers = layers or max(1, min(12, n_rest // 8))
    n_layers = min(n_layers, n_rest)
    width = len(str(n_models))

    specs: list[ModelSpec] = []
    by_layer: list[list[str]] = []

    seeds = [
        ModelSpec(name=f"{SEED_SCHEMA}.seed_{i:0{width}d}", layer=0, kind="SEED")
        for i in range(1, n_seeds + 1)
    ]
    specs.extend(seeds)
    by_layer.append([s.name for s in seeds])

    index = n_seeds
    for layer in range(1, n_layers + 1):
        # Spread the remaining models evenly over the layers.
        count = n_rest * layer // n_layers - n_rest * (layer - 1) // n_layers
        names: list[str] = []
        earlier = [name for layer_names in by_layer for name in layer_names]
        for _ in range(count):
            index += 1
            # The first parent comes from the previous layer (so the DAG has depth);
            # the others from any earlier layer.
            parents = [rng.choice(by_layer[layer - 1])]
            for _ in range(rng.randint(0, 2)):
                candidate = rng.choice(earlier)
                if candidate not in parents:
                    parents.append(candidate)
            spec = ModelSpec(
                name=f"{MODEL_SCHEMA}.model_{index:0{width}d}",
                layer=layer,
                kind=rng.choices(KINDS, KIND_WEIGHTS)[0],
                parents=parents,
                literal=rng.randint(1, 99),
            )
            specs.append(spec)
            names.append(spec.name)
        by_layer.append(names)
    return specs


# --------------------------------------------------------------------------- #
# Rendering
# --------------------------------------------------------------------------- #


def render_seed_model(spec: ModelSpec) -> str:
    return f"""MODEL (
  name {spec.name},
  kind SEED (
    path '../{spec.seed_path.as_posix()}'
  ),
  columns (
    id INT,
    day_offset INT,
    amount DOUBLE,
    label TEXT
  ),
  grain (id, day_offset)
);
"""


def render_seed_csv(spec: ModelSpec) -> str:
    rng = random.Random(f"csv:{spec.name}")
    rows = ["id,day_offset,amount,label"]
    for id_ in SEED_IDS:
        for offset in SEED_DAY_OFFSETS:
            rows.append(f"{id_},{offset},{rng.randint(0, 1000) / 10},{spec.file_stem}_{id_}")
    return "\n".join(rows) + "\n"


def render_model(spec: ModelSpec, change: DevChange | None = None) -> str:
    """Render a non-seed model, optionally with a dev-environment change applied."""
    change = change or DevChange()
    literal = spec.literal if change.literal is None else change.literal
    incremental = spec.kind == "INCREMENTAL_BY_TIME_RANGE"
    kind = "INCREMENTAL_BY_TIME_RANGE (\n    time_column ds\n  )" if incremental else spec.kind

    amount = " + ".join(
        ["t1.amount"] + [f"COALESCE(t{i}.amount, 0)" for i in range(2, len(spec.parents) + 1)]
    )
    columns = [
        "t1.id",
        "t1.day_offset",
        f"{amount} + {literal} AS amount",
        "t1.label",
    ]
    if incremental:
        columns.append("CAST(CURRENT_DATE - t1.day_offset AS DATE) AS ds")
    if change.extra_column:
        columns.append(f"'{change.extra_column}' AS {change.extra_column}")

    joins = [f"FROM {spec.parents[0]} AS t1"]
    for i, parent in enumerate(spec.parents[1:], start=2):
        joins.append(
            f"LEFT JOIN {parent} AS t{i}\n  ON t1.id = t{i}.id AND t1.day_offset = t{i}.day_offset"
        )
    where = (
        "\nWHERE\n  CAST(CURRENT_DATE - t1.day_offset AS DATE) BETWEEN @start_date AND @end_date"
        if incremental
        else ""
    )
    select = ",\n  ".join(columns)
    from_clause = "\n".join(joins)
    return f"""MODEL (
  name {spec.name},
  kind {kind},
  grain (id, day_offset)
);

SELECT
  {select}
{from_clause}{where}
"""


def render_config(state_url: str, state_schema: str) -> str:
    """config.yaml: DuckDB warehouse in the project dir, PostgreSQL state."""
    url = urlsplit(state_url)
    if url.scheme not in ("postgres", "postgresql") or not url.hostname:
        raise SystemExit("--state-url must be a postgres://user:pw@host:port/db URL")
    database = unquote(url.path.lstrip("/"))
    if not database:
        raise SystemExit("--state-url must name a database")
    state = {
        "type": "postgres",
        "host": url.hostname,
        "port": url.port or 5432,
        "user": unquote(url.username or "postgres"),
        "password": unquote(url.password or ""),
        "database": database,
    }
    # JSON strings are valid YAML scalars, which saves a YAML dependency and
    # quotes passwords safely.
    state_lines = "\n".join(f"      {k}: {json.dumps(v)}" for k, v in state.items())
    return f"""# Generated by scripts/sqlmesh-bench-project.py
gateways:
  {GATEWAY}:
    connection:
      type: duckdb
      database: {WAREHOUSE_FILE}
    state_connection:
{state_lines}
    state_schema: {json.dumps(state_schema)}

default_gateway: {GATEWAY}

model_defaults:
  dialect: duckdb
  cron: '@daily'
  start: {json.dumps(START)}
"""


def write_project(
    project: Path, specs: list[ModelSpec], state_url: str, state_schema: str, force: bool
) -> None:
    generated = [project / "config.yaml", project / "models", project / "seeds"]
    if any(path.exists() for path in generated):
        if not force:
            raise SystemExit(f"{project} already holds a project; pass --force to regenerate it")
        for path in generated:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    (project / "models").mkdir(parents=True)
    (project / "seeds").mkdir()

    config = project / "config.yaml"
    config.write_text(render_config(state_url, state_schema))
    config.chmod(0o600)  # it holds the state database password
    for spec in specs:
        if spec.kind == "SEED":
            (project / spec.model_path).write_text(render_seed_model(spec))
            (project / spec.seed_path).write_text(render_seed_csv(spec))
        else:
            (project / spec.model_path).write_text(render_model(spec))


# --------------------------------------------------------------------------- #
# Planning
# --------------------------------------------------------------------------- #


def log(message: str) -> None:
    print(f"sqlmesh-bench-project: {message}", file=sys.stderr, flush=True)


def run_plan(sqlmesh: str, project: Path, environment: str, extra_args: list[str]) -> float:
    """Run `sqlmesh plan` for one environment; returns its wall time in seconds."""
    log_dir = project / "logs"
    log_dir.mkdir(exist_ok=True)
    log_file = log_dir / f"plan-{environment}.log"
    command = [sqlmesh, "plan", environment, "--auto-apply", "--no-prompts", *extra_args]
    log(f"running {' '.join(command[1:])} (output in {log_file})")
    started = time.monotonic()
    with log_file.open("w") as out:
        result = subprocess.run(
            command, cwd=project, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        sys.stderr.write(log_file.read_text()[-4000:])
        raise SystemExit(f"sqlmesh plan {environment} failed (exit {result.returncode})")
    log(f"plan {environment}: {elapsed:.1f} s")
    return elapsed


def dev_changes(specs: list[ModelSpec], seed: int, env_number: int) -> dict[str, DevChange]:
    """Pick ~5 % of the non-seed models and a change for each, deterministically."""
    env = f"dev_{env_number}"
    rng = random.Random(f"{env}:{seed}")
    candidates = [spec for spec in specs if spec.kind != "SEED"]
    count = max(1, round(len(candidates) * DEV_CHANGE_FRACTION))
    changes = {}
    for spec in rng.sample(candidates, count):
        if rng.random() < 0.5:
            changes[spec.name] = DevChange(extra_column=f"{env}_note")
        else:
            changes[spec.name] = DevChange(literal=spec.literal + 100 * env_number)
    return changes


def plan_all(
    sqlmesh: str, project: Path, specs: list[ModelSpec], dev_envs: int, seed: int
) -> dict[str, float]:
    timings = {"prod": run_plan(sqlmesh, project, "prod", [])}
    by_name = {spec.name: spec for spec in specs}
    for env_number in range(1, dev_envs + 1):
        env = f"dev_{env_number}"
        changes = dev_changes(specs, seed, env_number)
        log(f"{env}: changing {len(changes)} models")
        try:
            for name, change in changes.items():
                spec = by_name[name]
                (project / spec.model_path).write_text(render_model(spec, change))
            timings[env] = run_plan(sqlmesh, project, env, ["--include-unmodified"])
        finally:
            for name in changes:
                spec = by_name[name]
                (project / spec.model_path).write_text(render_model(spec))
    return timings


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0],
        epilog="See the module docstring for details.",
    )
    parser.add_argument("--models", type=int, required=True, help="number of models (N)")
    parser.add_argument("--dir", type=Path, required=True, help="project directory to write")
    parser.add_argument(
        "--state-url", required=True, help="postgres://user:pw@host:port/db for the SQLMesh state"
    )
    parser.add_argument("--state-schema", default="sqlmesh", help="state schema (default: sqlmesh)")
    parser.add_argument("--seed", type=int, default=1, help="random seed for the DAG and changes")
    parser.add_argument(
        "--layers", type=int, default=None, help="number of non-seed layers (default: by N, max 12)"
    )
    parser.add_argument(
        "--plan", action="store_true", help="run sqlmesh plan for prod and the dev environments"
    )
    parser.add_argument(
        "--dev-envs", type=int, default=2, help="dev environments to create with --plan (default: 2)"
    )
    parser.add_argument(
        "--sqlmesh",
        default=str(Path(sys.executable).parent / "sqlmesh"),
        help="sqlmesh CLI (default: the one next to this Python interpreter)",
    )
    parser.add_argument(
        "--force", action="store_true", help="regenerate a project that already exists in --dir"
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    project = args.dir.resolve()
    specs = plan_dag(args.models, args.seed, args.layers)
    write_project(project, specs, args.state_url, args.state_schema, args.force)
    kinds = {kind: sum(spec.kind == kind for spec in specs) for kind in ("SEED", *KINDS)}
    layers = max(spec.layer for spec in specs)
    log(f"wrote {len(specs)} models in {layers} layers to {project}: {kinds}")

    if args.plan:
        if not Path(args.sqlmesh).exists() and not shutil.which(args.sqlmesh):
            raise SystemExit(f"sqlmesh CLI not found: {args.sqlmesh} (use --sqlmesh PATH)")
        timings = plan_all(args.sqlmesh, project, specs, args.dev_envs, args.seed)
        summary = ", ".join(f"{env} {seconds:.1f} s" for env, seconds in timings.items())
        log(f"plan timings for {len(specs)} models: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
