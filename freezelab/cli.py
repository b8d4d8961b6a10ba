"""The ``freezelab`` command line.

freezelab policies [--format table|json]
freezelab inspect --model NAME --policy FILE_OR_JSON [--epoch E] [--format table|json]
freezelab train CONFIG [--set a.b=value ...] [--address RAY_ADDRESS]
freezelab sweep SWEEP [--resume]
freezelab submit CONFIG_OR_SWEEP --address http://HEAD:8265 [--follow] [--set ...]
freezelab compare EXPERIMENT [--format table|md|csv|json] [--sort METRIC] [--with-pretraining]
freezelab report EXPERIMENT_OR_SWEEP [--out DIR] [--tracking-uri URI] [--with-pretraining]
freezelab sync RUN_DIR_OR_STORAGE [--tracking-uri URI]
freezelab demo [--config STUDY] [--resume]
freezelab advise CONFIG_OR_SWEEP [--budget SHARE] [--rates LR,...] [--format table|json]
                 [--samples N] [--address RAY_ADDRESS]
freezelab schema [train|sweep]

Every mistake in what the user asked for ends in one line on stderr and exit code 2
(``--debug`` shows its traceback); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
from collections.abc import Sequence

from freezelab.env import LOG_LEVEL_ENV, log_level
from freezelab.errors import FreezelabError, one_line
from freezelab.logs import configure as configure_logging
from freezelab.redact import redact_text

log = logging.getLogger(__name__)

PRETRAINING_HELP = "also show pretraining runs (tag freezelab.stage=pretrain), left out by default"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.verbose:
        os.environ[LOG_LEVEL_ENV] = "INFO"  # read by the runs this process starts
    else:
        # MLflow's progress bar for each artifact it downloads (a report reads every
        # run's config.yaml): a dozen bars that say nothing.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        # MLflow's INFO lines (creating a store's tables, a link per finished run).
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # Other libraries' logging at their level (-v: INFO); freezelab's own lines always,
    # its debug lines with -v (logs.py).
    logging.basicConfig(level=log_level(), format="%(levelname)s %(name)s: %(message)s")
    configure_logging()
    try:
        return args.run(args)
    except FreezelabError as err:
        if args.debug:
            raise
        message = redact_text(one_line(str(err)))
        print(f"freezelab {args.command}: error: {message}", file=sys.stderr)
        return err.exit_code


class UserError(FreezelabError):
    """A mistake in the command line itself."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="freezelab",
        description="Freeze-policy experiments for fine-tuning pretrained vision backbones.",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=bool(os.environ.get("FREEZELAB_DEBUG")),
        help="show the traceback of a user error too (also FREEZELAB_DEBUG=1)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show the INFO logs of Ray Train (a line per report and per checkpoint) and "
        "of the other libraries (also FREEZELAB_LOG_LEVEL=INFO)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("policies", help="list the freeze-policy catalog")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(run=_policies)

    p = commands.add_parser("inspect", help="show what a policy freezes on a model")
    p.add_argument("--model", required=True, help="vgg16 or any timm model name")
    p.add_argument("--policy", required=True, help="a policy file (JSON/YAML) or inline JSON")
    p.add_argument("--epoch", type=int, default=0)
    p.add_argument("--num-classes", type=int, default=2)
    p.add_argument(
        "--head",
        default=None,
        help='custom head as JSON, e.g. \'{"pool": "flatten", "hidden": [256]}\'',
    )
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(run=_inspect)

    p = commands.add_parser("train", help="fine-tune under a freeze policy on Ray Train")
    p.add_argument("config", help="a train config (YAML)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set optimizer.lr=0.001 (repeatable)",
    )
    p.add_argument(
        "--address", default=None, help="Ray address to join (else RAY_ADDRESS, else local)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="the name holds a run of another config: move that run aside and start anew",
    )
    p.set_defaults(run=_train)

    p = commands.add_parser("sweep", help="explore freeze policies with Ray Tune")
    p.add_argument("sweep", help="a sweep file (YAML)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--address", default=None)
    p.set_defaults(run=_sweep)

    p = commands.add_parser(
        "submit",
        help="run a train config or a sweep on a Ray cluster, as a Ray job",
        description="Validate CONFIG here, then submit `python -m freezelab train|sweep CONFIG` "
        "to the cluster's job server with the working directory uploaded.",
    )
    p.add_argument("config", metavar="CONFIG_OR_SWEEP", help="a train config or a sweep file")
    p.add_argument(
        "--address",
        default=None,
        help="the job server, e.g. http://HEAD:8265 (else RAY_API_SERVER_ADDRESS / RAY_ADDRESS)",
    )
    p.add_argument("--follow", action="store_true", help="stream the logs; exit with the job")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--working-dir",
        default=".",
        help="uploaded to the cluster, minus freezelab/cluster/templates/runtime_env.yaml's excludes "
        "(default: .)",
    )
    p.add_argument(
        "--no-working-dir",
        dest="working_dir",
        action="store_const",
        const=None,
        help="upload nothing: the cluster image has freezelab and the config",
    )
    p.add_argument(
        "--env",
        dest="env_vars",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable of the job, e.g. --env GLOO_SOCKET_IFNAME=eth0",
    )
    p.add_argument(
        "--pip", action="append", default=[], metavar="REQUIREMENT", help="install for this job"
    )
    p.add_argument(
        "--python", default="python", help="the cluster's Python executable (default: python)"
    )
    p.set_defaults(run=_submit)

    p = commands.add_parser("compare", help="an MLflow experiment's runs side by side")
    p.add_argument("experiment")
    p.add_argument("--format", choices=("table", "md", "csv", "json"), default="table")
    p.add_argument(
        "--sort",
        default="val_acc",
        help="a column to sort by, descending (default: val_acc, the handed-over model's)",
    )
    p.add_argument(
        "--tracking-uri", default=None, help="else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db"
    )
    p.add_argument("--with-pretraining", action="store_true", help=PRETRAINING_HELP)
    p.set_defaults(run=_compare)

    p = commands.add_parser(
        "sync", help="finish in MLflow the runs whose tracking server was away at their end"
    )
    p.add_argument("path", help="a run folder, or a storage folder of run folders")
    p.add_argument("--tracking-uri", default=None, help="default: the one each run was tracked on")
    p.set_defaults(run=_sync)

    p = commands.add_parser("report", help="an HTML report of a sweep's (or an experiment's) runs")
    p.add_argument(
        "target",
        metavar="EXPERIMENT_OR_SWEEP",
        help="a sweep's parent run (name or id), or an MLflow experiment name",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="a folder or a URI such as s3://BUCKET/reports/NAME; default: freezelab_reports/NAME",
    )
    p.add_argument(
        "--tracking-uri",
        metavar="URI",
        default=None,
        help="else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db",
    )
    p.add_argument("--with-pretraining", action="store_true", help=PRETRAINING_HELP)
    p.set_defaults(run=_report)

    p = commands.add_parser(
        "demo", help="the transfer study: pretrain on digits 0-4, fine-tune on 5-9"
    )
    p.add_argument(
        "--config", default=None, help="a study config (YAML); default: the built-in one"
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--address", default=None)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue this study where it stopped (running it again does the same; "
        "--resume refuses a study that never started)",
    )
    p.set_defaults(run=_demo)

    p = commands.add_parser(
        "advise",
        help="which layers to freeze for this data: short budgeted fine-tuning of each candidate",
        description="Rank freeze policies for a train config's model and data (its policy "
        "is ignored), or a sweep file's candidate policies, by fine-tuning each briefly: "
        "every candidate at a few learning rates with successive halving within each, the "
        "best three under two more seeds, within --budget of the FLOPs of a 3-seed study "
        "of the same candidates. Prints the ranking with intervals, the candidates it cannot "
        "tell apart, and the signals (LogME, gradients, BatchNorm shift) that explain it; "
        "logs it all as an MLflow run (freezelab.stage=advise).",
    )
    p.add_argument("config", metavar="CONFIG_OR_SWEEP", help="a train config or a sweep file")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument(
        "--budget",
        type=float,
        default=0.1,
        help="the share of a 3-seed study's training FLOPs that advise may spend (default: 0.1)",
    )
    p.add_argument(
        "--rates",
        type=_rates,
        default=None,
        metavar="LR,LR,...",
        help="learning rates to try per candidate (default: the config's x 0.2, 1, 5)",
    )
    p.add_argument(
        "--samples",
        type=int,
        default=2000,
        help="training images the signals are measured on, at most (default: 2000; at least "
        "the class count)",
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--address", default=None, help="the Ray cluster whose CPUs/GPUs train the short runs"
    )
    p.set_defaults(run=_advise)

    p = commands.add_parser(
        "schema",
        help="the JSON schema of a train config or a sweep file (for editors)",
        description="Print the JSON schema of a train config (default) or of a sweep file, "
        "with every registered policy's fields.",
    )
    p.add_argument("kind", nargs="?", choices=("train", "sweep"), default="train")
    p.set_defaults(run=_schema)
    return parser


def _train(args: argparse.Namespace) -> int:
    from freezelab.api import summarize, train
    from freezelab.trainers.config import load_config

    config = load_config(args.config, overrides=args.overrides)
    print(summarize(config, train(config, address=args.address, overwrite=args.overwrite)))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from freezelab.sweep.run import run_sweep
    from freezelab.sweep.space import load_sweep

    outcome = run_sweep(
        load_sweep(args.sweep, args.overrides), resume=args.resume, address=args.address
    )
    # 0: every trial finished; 3: some failed (the best comes from the rest); 1: none
    # finished (SweepFailed).
    return 3 if outcome.failed else 0


def _submit(args: argparse.Namespace) -> int:
    import os

    from freezelab.submit import follow_job, prepare_job, print_warnings, submit_job

    address = (
        args.address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    )
    if not address:
        raise UserError("--address is required, e.g. --address http://HEAD:8265")
    env_vars = {}
    for item in args.env_vars:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--env {item!r}: expected KEY=VALUE")
        env_vars[key] = value
    job = prepare_job(
        args.config,
        working_dir=args.working_dir,
        overrides=args.overrides,
        env_vars=env_vars,
        pip=args.pip,
        python=args.python,
    )
    print_warnings(job)
    submission_id = submit_job(job, address)
    log.info(f"submitted {job.kind} {job.name!r} as job {submission_id}")
    log.info(f"  entrypoint: {job.entrypoint}")
    if not args.follow:
        log.info(f"  logs: ray job logs --address {address} --follow {submission_id}")
        log.info(f"  stop: ray job stop --address {address} {submission_id}")
        return 0
    try:
        status = follow_job(address, submission_id)
    except KeyboardInterrupt:
        log.info(
            f"stopped following; job {submission_id} keeps running "
            f"(ray job stop --address {address} {submission_id})"
        )
        return 130
    log.info(f"job {submission_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def _compare(args: argparse.Namespace) -> int:
    from freezelab.mlflow.compare import compare_rows, format_rows
    from freezelab.mlflow.tracking import resolve_tracking_uri

    rows = compare_rows(
        args.experiment,
        resolve_tracking_uri(args.tracking_uri),
        sort=args.sort,
        with_pretraining=args.with_pretraining,
    )
    print(format_rows(rows, args.format))
    return 0


def _sync(args: argparse.Namespace) -> int:
    from freezelab.mlflow.sync import sync

    sync(args.path, tracking_uri=args.tracking_uri)
    return 0


def _report(args: argparse.Namespace) -> int:
    from freezelab.mlflow.tracking import resolve_tracking_uri
    from freezelab.report import build_report, format_settings

    report = build_report(
        args.target,
        out_dir=args.out,
        tracking_uri=resolve_tracking_uri(args.tracking_uri),
        with_pretraining=args.with_pretraining,
    )
    print(format_settings(report.settings))
    print("\n\n".join(textwrap.fill(p, width=100) for p in report.summary.split("\n\n")))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from freezelab.study import run_study

    outcome = run_study(
        args.config, overrides=args.overrides, address=args.address, resume=args.resume
    )
    # 0: every run finished; 3: some failed (the tables come from the rest); 1: none
    # finished (StudyFailed).
    return 3 if outcome.failed else 0


def _rates(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give learning rates separated by commas, e.g. 0.002,0.01,0.05"
        ) from None


def _advise(args: argparse.Namespace) -> int:
    import contextlib

    from freezelab.advise_run import run_advise

    # JSON is stdout's only line: the progress lines go to stderr then.
    quiet = (
        contextlib.redirect_stdout(sys.stderr)
        if args.format == "json"
        else contextlib.nullcontext()
    )
    with quiet:
        outcome = run_advise(
            args.config,
            samples=args.samples,
            overrides=args.overrides,
            address=args.address,
            budget=args.budget,
            rates=args.rates,
        )
    if args.format == "json":
        print(json.dumps({**outcome.advice.to_dict(), "run_id": outcome.run_id}, indent=2))
        return 0
    print(outcome.advice.format_text())
    if outcome.run_id:
        from freezelab.mlflow.tracking import resolve_tracking_uri, ui_page

        uri = resolve_tracking_uri(outcome.config.mlflow.tracking_uri)
        print(
            f"MLflow run: {outcome.run_id} ({ui_page(uri, outcome.experiment_id, outcome.run_id)})"
        )
    return 0


def _schema(args: argparse.Namespace) -> int:
    if args.kind == "sweep":
        from freezelab.sweep.space import SweepConfig as Model
    else:
        from freezelab.trainers.config import TrainConfig as Model
    print(json.dumps(Model.model_json_schema(), indent=2))
    return 0


def _policies(args: argparse.Namespace) -> int:
    from freezelab.policies import list_policies

    catalog = []
    for name, cls in list_policies().items():
        fields = {
            field: _field_summary(info)
            for field, info in cls.model_fields.items()
            if field != "type"
        }
        catalog.append({"type": name, "description": cls.description, "fields": fields})
    if args.format == "json":
        print(json.dumps(catalog, indent=2))
        return 0
    for entry in catalog:
        print(f"{entry['type']}: {entry['description']}")
        for field, summary in entry["fields"].items():
            print(f"    {field}: {summary}")
    return 0


def _field_summary(info) -> str:
    annotation = info.annotation
    if isinstance(annotation, type):
        annotation = annotation.__name__
    annotation = str(annotation).replace("typing.", "")
    if info.is_required():
        return f"{annotation} (required)"
    return f"{annotation} = {info.default!r}"


def _inspect(args: argparse.Namespace) -> int:
    from freezelab.config_io import parse_yaml
    from freezelab.policies import load_policy
    from freezelab.policies.summary import format_table, summarize_plan
    from freezelab.trainers.models import build_model

    policy = load_policy(args.policy)
    head = parse_yaml(args.head, "--head") if args.head else None
    try:
        model = build_model(args.model, args.num_classes, head=head)
    except (ValueError, RuntimeError) as err:
        raise UserError(one_line(str(err))) from None
    report = summarize_plan(model, policy, args.model, epoch=args.epoch)
    if args.format == "json":
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
    return 0
