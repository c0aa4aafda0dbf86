"""A one-file HTML report of a model bundle: summary, recipe, curves, metrics, confusion, mistakes, evidence."""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

import numpy as np

from . import plots
from .atomic import atomic_write_text
from .errors import DeepDigitsError

_CSS = """
:root { color-scheme: light; --ink: #1d2430; --muted: #5b6676; --line: #e3e7ee; --accent: #2563eb; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       background: #f6f7f9; }
header { background: #111827; color: #fff; padding: 28px 0; }
header h1 { margin: 0 0 4px; font-size: 26px; }
header p { margin: 0; color: #cbd5e1; }
main, header .wrap { max-width: 1080px; margin: 0 auto; padding: 0 24px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 10px; margin: 22px 0; padding: 18px 22px; }
h2 { margin: 0 0 12px; font-size: 19px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin-top: 18px; }
.card { background: #1f2937; border-radius: 8px; padding: 10px 16px; min-width: 150px; }
.card b { display: block; font-size: 22px; color: #fff; }
.card span { color: #cbd5e1; font-size: 13px; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 5px 10px; border-bottom: 1px solid var(--line); }
th { color: var(--muted); font-weight: 600; }
td.num, th.num { text-align: right; }
pre { background: #0f172a; color: #e2e8f0; padding: 14px; border-radius: 8px; overflow-x: auto; font-size: 12.5px;
      max-width: 100%; }
td { overflow-wrap: anywhere; }
.scroll { overflow-x: auto; max-width: 100%; }
@media (max-width: 600px) {
  main, header .wrap { padding: 0 12px; }
  section { padding: 14px 12px; }
  th, td { padding: 4px 6px; }
  .card { min-width: 0; flex: 1 1 40%; }
}
img { max-width: 100%; height: auto; display: block; margin: 8px auto; }
.note { color: var(--muted); font-size: 13.5px; }
nav a { color: #93c5fd; margin-right: 14px; text-decoration: none; font-size: 14px; }
"""


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _training_rows(classifier) -> list[tuple[str, str]]:
    """The recipe as a person reads it (settings said once, with what changed), and where the model came from."""
    from .recipes import RECIPES, Recipe

    recipe = dict(classifier.recipe or {})
    rows: list[tuple[str, str]] = []
    if recipe.get("name") in RECIPES and not recipe.get("members"):
        base = RECIPES[recipe["name"]]
        chosen = base.with_overrides(**{k: v for k, v in recipe.items() if k in Recipe.__dataclass_fields__})
        rows.append(("Recipe", f"{chosen.name} — {chosen.description}"))
        rows.append(("Settings", chosen.settings_text(base)))
    elif recipe.get("members"):
        members = recipe["members"]
        names = sorted({str((m or {}).get("name", "?")) for m in members})
        rows.append(("Recipe", f"ensemble of {len(members)} networks ({', '.join(names)}), probabilities averaged"))
    if classifier.precision:
        rows.append(("Trained in", classifier.precision))
    if classifier.history:
        rows.append(("Training time", f"{classifier.train_seconds:.1f} s, {len(classifier.history)} epochs"))
    provenance = getattr(classifier, "provenance", {}) or {}
    if provenance.get("created"):
        rows.append(("Created", str(provenance["created"])))
    if provenance.get("command"):
        rows.append(("Command", str(provenance["command"])))
    versions = provenance.get("versions") or {}
    if versions:
        rows.append(("Versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
    return rows


def _calibration_section(classifier, dataset, probabilities: np.ndarray, metrics: dict) -> str:
    """The reliability diagram, ECE / NLL / Brier before and after the temperature, and what it was fit on."""
    from .calibrate import calibration_name

    scores = metrics["calibration"]
    rows = "".join(
        f"<tr><td>{name}</td><td class='num'>{scores['ece' + suffix] * 100:.2f}%</td>"
        f"<td class='num'>{scores['nll' + suffix]:.4f}</td><td class='num'>{scores['brier' + suffix]:.4f}</td></tr>"
        for name, suffix in ((f"calibrated ({calibration_name(scores)})", ""), ("uncalibrated (T = 1)",
                                                                                 "_uncalibrated"))
    )
    record = classifier.calibration or {}
    fit_on = record.get("fit_on") or {}
    what = "calibration" if record.get("top_label") else "temperature"
    if not record:
        source = "This model has no temperature (T = 1): its probabilities are the network's own."
    elif isinstance(fit_on.get("start"), int):
        seen = "which it trained on" if fit_on.get("seen_in_training") else "which training did not see"
        source = (f"The {what} was fit on {fit_on.get('dataset', 'the')} training images {fit_on['start']:,}-"
                  f"{fit_on['stop'] - 1:,} ({fit_on.get('n', 0):,} images, {seen}), never on the test set.")
    else:
        source = f"The {what} was fit on {fit_on.get('n', 0):,} held-out images, never on the test set."
    figure = plots.make_figure("calibration", classifier, dataset, probabilities=probabilities)
    mapped = (" then the top class's log-odds L against the others become <code>a + b L</code> (a top-label "
              "map, fit on the same images)") if scores.get("top_label_slope") is not None else ""
    return (f"<p>Probabilities are <code>softmax(logits / T)</code>{mapped}. Expected calibration error (15 bins), "
            f"negative log-likelihood and Brier score on {metrics['n']:,} test images (lower is better):</p>"
            f"<div class='scroll'><table><tr><th></th><th class='num'>ECE</th><th class='num'>NLL</th>"
            f"<th class='num'>Brier</th></tr>{rows}</table></div>"
            f"<p class='note'>{html.escape(source)}</p>"
            + (f"<p class='note'>{html.escape(str(record['note']))}</p>" if record.get("note") else "")
            + _img(plots.figure_png_bytes(figure), "reliability diagram"))


def build_report(classifier, dataset, bundle_path: str | os.PathLike | None = None) -> str:
    """The report as an HTML string (all images embedded: it opens without a network)."""
    probabilities = classifier.predict_proba(dataset.x_test)
    metrics = classifier.metrics_of(probabilities, dataset.y_test)
    title = f"{classifier.architecture} on {dataset.name}"
    sections: list[tuple[str, str, str]] = []

    sections.append(("summary", "Model", f"<pre>{html.escape(classifier.summary())}</pre>"))
    rows = _training_rows(classifier)
    if rows:
        table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
        sections.append(("recipe", "How it was trained", f"<table>{table}</table>"))
    if classifier.history:
        last = classifier.history[-1]
        note = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k not in ("epoch", "seconds"))
        curves = plots.figure_png_bytes(plots.make_figure("curves", classifier))
        sections.append(("curves", "Training curves",
                         _img(curves, "training curves") + f'<p class="note">Last epoch: {note}.</p>'))
    per_class = "".join(
        f"<tr><td>{html.escape(r['name'])}</td><td class='num'>{r['precision']:.4f}</td>"
        f"<td class='num'>{r['recall']:.4f}</td><td class='num'>{r['f1']:.4f}</td>"
        f"<td class='num'>{r['support']}</td></tr>"
        for r in metrics["per_class"]
    )
    sections.append((
        "metrics", "Test metrics",
        f"<p>Accuracy <b>{metrics['accuracy'] * 100:.2f}%</b> and loss <b>{metrics['loss']:.4f}</b> on "
        f"{metrics['n']:,} test images.</p><div class='scroll'><table><tr><th>class</th><th class='num'>precision</th>"
        f"<th class='num'>recall</th><th class='num'>F1</th><th class='num'>support</th></tr>{per_class}</table></div>",
    ))
    confusion = plots.figure_png_bytes(plots.make_figure("confusion", classifier, dataset,
                                                         probabilities=probabilities))
    sections.append(("confusion", "Confusion matrix", _img(confusion, "confusion matrix")))
    sections.append(("calibration", "Calibration", _calibration_section(classifier, dataset, probabilities, metrics)))
    mistakes = plots.figure_png_bytes(plots.make_figure("mistakes", classifier, dataset, count=24,
                                                        probabilities=probabilities))
    sections.append(("mistakes", "Most confident mistakes", _img(mistakes, "most confident mistakes")))
    evidence = []
    try:
        evidence.append(_img(plots.figure_png_bytes(plots.make_figure("evidence", classifier)), "evidence maps"))
        evidence.append('<p class="note">Each map is the product of the dense layers\' weights: red pixels '
                        "push towards the class, blue against.</p>")
    except DeepDigitsError:
        evidence.append('<p class="note">This network starts with convolutions, so it has no per-class weight '
                        "map; the saliency maps below show what drove single predictions.</p>")
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != dataset.y_test)
    examples = [0] + ([int(wrong[np.argmax(probabilities[wrong, predicted[wrong]])])] if len(wrong) else [])
    for index in examples:
        figure = plots.make_figure("saliency", classifier, dataset, index=index)
        evidence.append(_img(plots.figure_png_bytes(figure), f"saliency map of test image {index}"))
    sections.append(("evidence", "Evidence maps", "".join(evidence)))

    cards = [
        (f"{metrics['accuracy'] * 100:.2f}%", "test accuracy"),
        (f"{metrics['loss']:.4f}", "test loss"),
        (f"{classifier.n_params:,}", "parameters"),
        (str(len(classifier.history)), "epochs trained"),
        (f"{classifier.train_seconds:.1f} s", "training time"),
    ]
    cards_html = "".join(f'<div class="card"><b>{v}</b><span>{k}</span></div>' for v, k in cards)
    nav = "".join(f'<a href="#{sid}">{html.escape(head)}</a>' for sid, head, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{html.escape(head)}</h2>{content}</section>'
                   for sid, head, content in sections)
    source = f" — {html.escape(str(bundle_path))}" if bundle_path else ""
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>deepdigits report: {html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f'<header><div class="wrap"><h1>{html.escape(title)}</h1><p>deepdigits model report{source}</p>'
        f'<nav>{nav}</nav><div class="cards">{cards_html}</div></div></header><main>{body}</main></body></html>'
    )


def write_report(classifier, dataset, out: str | os.PathLike, bundle_path: str | os.PathLike | None = None) -> Path:
    """Write the report atomically to ``out``."""
    return atomic_write_text(out, build_report(classifier, dataset, bundle_path))
