"""The report's HTML page: one self-contained file, its figures embedded as data
URIs, with the settings table, the runs table linked to MLflow's UI, the summary and
the notes.

>>> page = html_page("policy-sweep", rows, groups, figures, summary, notes)  # doctest: +SKIP
>>> page.startswith("<!DOCTYPE html>")  # doctest: +SKIP
True
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from freezelab.report.summary import score_with_interval

# (key, header, format) of the settings table: one row per policy and setting.
SETTING_COLUMNS = (
    ("variant", "target variant", str),
    ("label", "policy [setting]", str),
    ("n", "runs", "{}"),
    ("mean_ci95", "verdict: mean ± 95% interval", str),
    ("std", "std", "{:.4f}"),
    ("best_val_acc", "best-epoch val_acc (mean)", "{:.4f}"),
    ("train_time_s", "training time (s, mean)", "{:.2f}"),
    ("images_per_s", "images/s", "{:.0f}"),
    ("trainable_share", "trainable share", "{:.2%}"),
    ("backbone_drift", "backbone drift (final)", "{:.4f}"),
    ("cka", "backbone CKA", "{:.4f}"),
)
# ... and of the runs table: one row per run.
COLUMNS = (
    ("variant", "target variant", str),
    ("label", "policy [setting]", str),
    ("seed", "seed", str),
    ("run_name", "run", str),
    ("val_acc", "val_acc", "{:.4f}"),
    ("test_acc", "test_acc", "{:.4f}"),
    ("best_val_acc", "best val_acc", "{:.4f}"),
    ("epochs_to_best", "epochs to best", "{}"),
    ("train_time_s", "training time (s)", "{:.2f}"),
    ("images_per_s", "images/s", "{:.0f}"),
    ("trainable_share", "trainable share", "{:.2%}"),
    ("backbone_drift", "backbone drift (final)", "{:.4f}"),
    ("cka", "backbone CKA", "{:.4f}"),
    ("status", "status", str),
    ("diverged_reason", "diverged (left out)", str),
    ("run_id", "MLflow run", str),
)
CAPTIONS = {
    "accuracy_vs_time": "Accuracy against training compute; the dashed line is the Pareto front.",
    "learning_curves": "Learning curves: validation accuracy and training loss per epoch.",
    "drift": "Feature drift: how far each layer group moved from its starting weights "
    "(dashed: the head).",
    "cka": "How much of the starting representation each setting kept: linear CKA of the "
    "classifier's input on a fixed validation batch, and the final backbone drift.",
    "gradient_shock": "(4) The gradient the backbone receives in its first trained steps: "
    "under full fine-tuning from a random head, under lp_ft after the probe.",
    "shift_accuracy": "(2) Accuracy on the target's validation set and under each shift or "
    "extra evaluation set (data.eval_shifts, data.eval_sets), with 95% intervals.",
    "forgetting": "(3) Forgetting: a linear probe on the backbone's features of the source "
    "task, its accuracy at the start minus at the end of each run, with 95% intervals.",
}


def html_page(
    title: str,
    rows: list[dict[str, Any]],
    groups: list[dict[str, Any]],
    figures: dict[str, Path],
    summary: str,
    notes: list[str],
    study_url: str | None = None,
) -> str:
    """One self-contained page: the figures are embedded as data URIs, so the page
    shows them wherever it is opened, MLflow's sandboxed artifact view included.
    ``study_url``: the MLflow page of the study's runs, linked at the top.

    The runs' links open in place (``target="_top"``) where the page is opened on its
    own. Inside MLflow's artifact view the page is a sandboxed frame that may run
    scripts but not navigate or open windows: there a script points the links at the
    server that shows the page (the ``mlflow ui`` the user runs, whatever its port) and
    says that a link opens from its context menu."""
    import base64
    from html import escape

    from freezelab.mlflow.tracking import LOCAL_UI

    shown = [{**g, "mean_ci95": score_with_interval(g)} for g in groups]
    varied = any(r.get("variant") for r in rows)
    setting_columns = tuple(c for c in SETTING_COLUMNS if varied or c[0] != "variant")
    columns = tuple(c for c in COLUMNS if varied or c[0] != "variant")
    study_link = (
        f'<p id="study-link"><a href="{escape(study_url)}" target="_top">The study\'s runs in '
        "MLflow</a>: its fine-tuning runs by target variant, best first, with their cost.</p>"
        if study_url
        else ""
    )
    images = "".join(
        f'<figure><img src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"'
        f' alt="{escape(name)}" data-file="{escape(path.name)}">'
        f"<figcaption>{escape(CAPTIONS.get(name, name))}</figcaption></figure>\n"
        for name, path in figures.items()
    )
    noted = "".join(f"<li>{escape(note)}</li>" for note in notes) or "<li>none</li>"
    paragraphs = "".join(f"<p>{escape(text)}</p>" for text in summary.split("\n\n"))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>freezelab report: {escape(title)}</title>
<style>
body {{ font-family: sans-serif; max-width: 1150px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
td:first-child, th {{ text-align: left; }}
img {{ max-width: 100%; }} figure {{ margin: 1.5em 0; }} figcaption {{ color: #555; }}
</style></head><body>
<h1>freezelab report: {escape(title)}</h1>
<p id="sandboxed" hidden>MLflow shows this report in a sandboxed frame, where a click on a link
does nothing: right-click a link and open it in a new tab.</p>
{study_link}
<h2>Summary</h2><div id="summary">{paragraphs}</div>
<h2>Policies and settings</h2>
<p>One row per policy and setting (the values of the params that vary, the seed aside),
best first by the verdict, {escape(shown[0]["metric"] if shown else "val_acc")}: test_acc,
when the data has a test split, is the held-out accuracy of the model a run hands over, which
no choice read; val_acc is the last epoch's accuracy on the val split, on which every choice
(learning rate, setting, checkpoint) was made. The 95% interval is Student's t over the
setting's finished runs that did not diverge.</p>
{_table("settings", setting_columns, shown)}
<h2>Runs</h2>
{_table("runs", columns, rows)}
<p>Each MLflow run links to its page in the MLflow UI: the tracking server's, or for a local
store the address of <code>mlflow ui</code> ({escape(LOCAL_UI)}).</p>
<p>Training time is <code>cost/train_s</code>, the sum of the training passes; the trainable
share is that of the last epoch; backbone drift is the mean over the non-head layer groups of
their relative L2 drift at the last epoch.</p>
<h2>Figures</h2>
{images}<h2>Notes</h2><ul>{noted}</ul>
<script>{_IN_MLFLOW}</script>
</body></html>
"""


# Inside MLflow's artifact view (a frame loaded from a blob: URL, whose referrer is the
# MLflow server the user has open), links point at that server.
_IN_MLFLOW = """
if (location.protocol === "blob:" && /^https?:/.test(document.referrer)) {
  const server = new URL(document.referrer).origin;
  for (const link of document.querySelectorAll("a[href*='/#/experiments/']")) {
    const target = new URL(link.href);
    link.href = server + target.pathname + target.search + target.hash;
  }
  document.getElementById("sandboxed").hidden = false;
}
"""


def _table(name: str, columns: tuple, rows: list[dict[str, Any]]) -> str:
    from html import escape

    head = "".join(f"<th>{escape(header)}</th>" for _, header, _ in columns)

    def cell(row: dict[str, Any], key: str, fmt: Any) -> str:
        text = escape(_format(row.get(key), fmt))
        if key == "run_id" and row.get("mlflow_url"):
            # The run's page in the MLflow UI, in place of the report (``html_page``).
            url = escape(row["mlflow_url"])
            return f'<td><a href="{url}" target="_top">{text}</a></td>'
        return f"<td>{text}</td>"

    body = "".join(
        "<tr>" + "".join(cell(row, key, fmt) for key, _, fmt in columns) + "</tr>\n" for row in rows
    )
    return f'<table id="{name}"><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>'


def _format(value: Any, fmt: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt(value) if callable(fmt) else fmt.format(value)
