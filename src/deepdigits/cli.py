"""The ``deepdigits`` command line: a thin shell over the library's public API."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .atomic import atomic_write_text
from .errors import DeepDigitsError

EPILOG = """\
examples:
  deepdigits data info                          where the data comes from, shapes, class counts
  deepdigits models summary tutorial-003        the network, layer by layer
  deepdigits train --recipe tutorial-003        train the tutorial's CNN (about 2 minutes on 2 CPU cores)
  deepdigits evaluate runs/tutorial-003         test loss, accuracy, per-class table, confusion matrix
  deepdigits predict --model runs/tutorial-003 --test-index 0-19
  deepdigits reproduce                          re-run all five tutorials, ours beside their claims
  deepdigits plot confusion runs/tutorial-003 --out confusion.png
  deepdigits crossval --recipe tutorial-004 --folds 5 --out runs/kfold
  deepdigits report runs/tutorial-003 --out report.html
  deepdigits predict photo.jpg                  recognise a photo of a digit with the built-in model
  deepdigits serve                              draw digits in the browser at http://127.0.0.1:8000/

data: --data-dir DIR, or $DEEPDIGITS_DATA (a folder holding mnist/ and fashion-mnist/), or the user
cache; otherwise the files are downloaded once, verified by SHA-256.
"""


def _data_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", metavar="DIR",
        help="folder holding the IDX files (or a folder with mnist/ and fashion-mnist/ inside); "
        "default: $DEEPDIGITS_DATA, then the user cache, then a download",
    )


def _dataset_option(parser: argparse.ArgumentParser, default: str | None = "mnist") -> None:
    from .data import DATASETS

    parser.add_argument("--dataset", choices=list(DATASETS), default=default,
                        help=f"which dataset (default: {default or 'the recipe’s'})")


def build_parser() -> argparse.ArgumentParser:
    from .train import RECIPES

    parser = argparse.ArgumentParser(
        prog="deepdigits",
        description="Recognise handwritten digits with deep learning: data, networks, training, evaluation.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"deepdigits {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # data
    data = commands.add_parser("data", help="inspect the datasets", description="Inspect the datasets.")
    data_commands = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    info = data_commands.add_parser("info", help="source, shapes and class counts of a dataset")
    _dataset_option(info)
    _data_dir_option(info)
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    show = data_commands.add_parser("show", help="save a labelled grid of images as PNG")
    _dataset_option(show)
    _data_dir_option(show)
    show.add_argument("--split", choices=["train", "test"], default="train", help="which split (default: train)")
    show.add_argument("--count", type=int, default=9, metavar="N", help="how many images (default: 9)")
    show.add_argument("--seed", type=int, default=None,
                      help="pick images at random with this seed (default: the first N)")
    show.add_argument("--out", required=True, metavar="FILE.png", help="where to write the grid")

    # models
    models = commands.add_parser("models", help="list and describe the network architectures",
                                 description="List and describe the network architectures.")
    model_commands = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    mlist = model_commands.add_parser("list", help="the registered architectures")
    mlist.add_argument("--json", action="store_true", help="print JSON instead of text")
    msum = model_commands.add_parser("summary", help="a Keras-style table of one architecture's layers")
    msum.add_argument("name", help="architecture name, e.g. tutorial-003")
    msum.add_argument("--json", action="store_true", help="print JSON (with total_params) instead of text")

    # train
    train = commands.add_parser(
        "train", help="train a recipe and save a model bundle",
        description="Train a named recipe and save a model bundle (safetensors weights + JSON metadata). "
        "Ctrl-C stops training and saves the last finished epoch.",
        epilog="recipes:\n" + "\n".join(f"  {r.name:<14}{r.description}" for r in RECIPES.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--recipe", default="tutorial-003", choices=list(RECIPES), metavar="NAME",
                       help="which recipe (default: tutorial-003; see the list below)")
    train.add_argument("--epochs", type=int, help="override the recipe's number of epochs")
    train.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    train.add_argument("--lr", type=float, help="override the recipe's learning rate")
    train.add_argument("--seed", type=int, help="random seed (default: the recipe's, 0); same seed, same result")
    _dataset_option(train, default=None)
    _data_dir_option(train)
    train.add_argument("--out", metavar="DIR", help="bundle folder to write (default: runs/RECIPE, numbered "
                       "if it exists)")
    train.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    # evaluate
    evaluate = commands.add_parser("evaluate", help="test metrics of a saved model bundle")
    evaluate.add_argument("bundle", help="model bundle folder")
    _data_dir_option(evaluate)
    evaluate.add_argument("--json", action="store_true", help="print JSON (keys include accuracy and loss)")

    # predict
    predict = commands.add_parser(
        "predict", help="recognise digits (or whole numbers) in images, or in the test set",
        description="Recognise the digit in each image (PNG, JPEG, GIF, BMP, TIFF, WebP; a photo or scan is fine: "
        "it is made MNIST-like first). With --number, read a whole handwritten number per image. With "
        "--test-index, predict MNIST test images as tutorial 003 printed them. The built-in model is used "
        "unless --model names another.",
        epilog="examples:\n  deepdigits predict photo.jpg\n  deepdigits predict scans/ 'more/*.png' --top 3 --json\n"
        "  deepdigits predict --number cheque.jpg --overlay boxes.png\n"
        "  deepdigits predict --model runs/cnn --test-index 0-19\n\n"
        "exit status: 0 all answered, 1 some files failed (each gets a one-line error), 2 usage error",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    predict.add_argument("inputs", nargs="*", metavar="IMAGE|DIR|GLOB", help="images, folders of images, or globs")
    predict.add_argument("--model", metavar="BUNDLE|FILE.onnx", help="model to use (default: the built-in model)")
    predict.add_argument("--runtime", choices=["torch", "onnx"], default="torch",
                         help="run the model in PyTorch (default) or ONNX Runtime")
    predict.add_argument("--top", type=int, default=3, metavar="K", help="show the K most probable digits (default: 3)")
    predict.add_argument("--min-confidence", type=float, default=0.5, metavar="P",
                         help="below this probability the answer is marked unsure (default: 0.5)")
    predict.add_argument("--number", action="store_true", help="read a whole number (several digits) per image")
    predict.add_argument("--overlay", metavar="PATH",
                         help="with --number: save the image with each digit's box (a folder if several inputs)")
    predict.add_argument("--test-index", metavar="RANGE", help="predict test-set images instead, e.g. 0-19")
    _data_dir_option(predict)
    predict.add_argument("--json", action="store_true", help="print JSON instead of a table")

    # preprocess
    prep = commands.add_parser(
        "preprocess", help="show what the network will see for an image",
        description="Make an image MNIST-like (polarity, background, crop, 20x20 box, centre of mass) and save "
        "the 28x28 result, enlarged, as PNG.",
    )
    prep.add_argument("image", help="an image of one digit")
    prep.add_argument("--out", required=True, metavar="FILE.png", help="where to write what the network sees")
    prep.add_argument("--zoom", type=int, default=10, help="enlargement factor (default: 10, i.e. 280x280)")

    # export
    export = commands.add_parser("export", help="export a model bundle to ONNX",
                                 description="Export a model bundle to ONNX (input: float images (N, 1, 28, 28) "
                                 "scaled to [0, 1]; output: probabilities) and check it in ONNX Runtime.")
    export.add_argument("bundle", nargs="?", help="model bundle folder (default: the built-in model)")
    export.add_argument("--onnx", required=True, metavar="FILE.onnx", help="where to write the ONNX model")

    # reproduce
    repro = commands.add_parser(
        "reproduce", help="re-run the five tutorials and compare with their claims",
        description="Train every tutorial's recipe from scratch on the full data and print one table: "
        "tutorial, network, parameters, epochs, training seconds, our test accuracy, the claimed one.",
    )
    repro.add_argument("--tutorial", nargs="+", metavar="NNN", help="only these tutorials (000 001 002 003 004)")
    _data_dir_option(repro)
    repro.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    repro.add_argument("--out", metavar="FILE.md", help="also write the table as Markdown to this file")
    repro.add_argument("--save-dir", metavar="DIR", help="also save each tutorial's model bundle in DIR")
    repro.add_argument("--epochs", type=int, help="shorten every recipe to N epochs (a smoke run, not a "
                       "reproduction)")
    repro.add_argument("--train-size", type=int, metavar="N",
                       help="train on the first N images only (a smoke run, not a reproduction)")
    repro.add_argument("-q", "--quiet", action="store_true", help="no training progress")

    # ensemble
    ens = commands.add_parser(
        "ensemble", help="combine trained model bundles into one ensemble bundle",
        description="Combine two or more trained model bundles into an ensemble (probabilities averaged), "
        "evaluate it on the test set and save it as a bundle that evaluate, predict, serve and export accept.",
    )
    ens.add_argument("bundles", nargs="+", metavar="BUNDLE", help="member bundles (at least 2)")
    ens.add_argument("--out", required=True, metavar="DIR", help="where to write the ensemble bundle")
    _data_dir_option(ens)

    # serve
    serve = commands.add_parser(
        "serve", help="web page to draw digits, and an HTTP API",
        description="Serve the drawing page at / and the HTTP API (/api/predict, /api/predict/batch, "
        "/api/read-number, /api/model, /healthz; OpenAPI docs at /docs). Works offline.",
    )
    serve.add_argument("--model", metavar="BUNDLE|FILE.onnx", help="model to serve (default: the built-in model)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--runtime", choices=["torch", "onnx"], default="torch",
                       help="answer with PyTorch (default) or ONNX Runtime")

    # plot
    from .plots import FIGURE_KINDS

    plot = commands.add_parser(
        "plot", help="draw a figure of a saved model as PNG",
        description="Draw a figure of a saved model bundle as a PNG file.",
        epilog="kinds:\n" + "\n".join(f"  {k:<14}{v}" for k, v in FIGURE_KINDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plot.add_argument("kind", choices=list(FIGURE_KINDS), metavar="KIND", help="which figure (see below)")
    plot.add_argument("bundle", help="model bundle folder")
    plot.add_argument("--out", required=True, metavar="FILE.png", help="where to write the PNG")
    plot.add_argument("--index", type=int, default=0,
                      help="test image for saliency/probabilities, first image for predictions (default: 0)")
    plot.add_argument("--count", type=int, default=16, help="images in predictions/mistakes grids (default: 16)")
    _data_dir_option(plot)

    # crossval
    crossval = commands.add_parser(
        "crossval", help="k-fold cross-validation of a recipe (a fresh network per fold)",
        description="k-fold cross-validation on the training set: a fresh network for every fold, trained only "
        "on that fold's training part and validated on the held-out part. Prints per-fold accuracy, mean and "
        "standard deviation; with --out, writes crossval.json, curves.png and scores.png.",
    )
    crossval.add_argument("--recipe", default="tutorial-004", choices=list(RECIPES), metavar="NAME",
                          help="which recipe (default: tutorial-004, as the tutorial did)")
    crossval.add_argument("--folds", type=int, default=5, help="number of folds (default: 5)")
    crossval.add_argument("--seed", type=int, default=1, help="shuffling seed (default: 1, as tutorial 004)")
    crossval.add_argument("--stratified", action="store_true", help="keep class proportions in every fold")
    crossval.add_argument("--epochs", type=int, help="override the recipe's epochs")
    crossval.add_argument("--train-size", type=int, metavar="N", help="use only the first N training images")
    _data_dir_option(crossval)
    crossval.add_argument("--out", metavar="DIR", help="write crossval.json and the figures into this folder")
    crossval.add_argument("--json", action="store_true", help="print JSON of all numbers")
    crossval.add_argument("-q", "--quiet", action="store_true", help="no training progress")

    # report
    report = commands.add_parser(
        "report", help="write a one-file HTML report of a model bundle",
        description="Write a self-contained HTML report (images embedded; opens without a network): model "
        "summary, recipe, training curves, test metrics, confusion matrix, mistakes and evidence maps.",
    )
    report.add_argument("bundle", help="model bundle folder")
    report.add_argument("--out", default="report.html", metavar="FILE.html", help="default: report.html")
    _data_dir_option(report)
    return parser


# --------------------------------------------------------------------------- commands


def _print_json(value) -> None:
    print(json.dumps(value, indent=2))


def cmd_data(args) -> int:
    from .data import load_dataset

    ds = load_dataset(args.dataset, data_dir=args.data_dir)
    if args.data_command == "info":
        info = ds.info()
        if args.json:
            _print_json(info)
            return 0
        print(f"dataset: {ds.name}   source: {ds.source}")
        for split in ("train", "test"):
            part = info[split]
            print(f"{split:<5}  images {tuple(part['images'])}  labels {tuple(part['labels'])}")
        counts = zip(info["train"]["class_counts"], info["test"]["class_counts"], strict=True)
        width = max(len(n) for n in ds.class_names) + 2
        print(f"{'class':<{width + 4}}{'train':>7}{'test':>7}")
        for i, (name, (n_train, n_test)) in enumerate(zip(ds.class_names, counts, strict=True)):
            label = "" if name == str(i) else name
            print(f"{i:>2}  {label:<{width}}{n_train:>7}{n_test:>7}")
        print("checksums verified (SHA-256 of the decompressed IDX content)")
        return 0
    import numpy as np

    from .plots import image_grid, save_figure

    images, labels = ds.split(args.split)
    if not 1 <= args.count <= min(400, len(images)):
        raise DeepDigitsError(f"--count: expected 1-{min(400, len(images))}, got {args.count}")
    if args.seed is None:
        picked = np.arange(args.count)
    else:
        picked = np.random.default_rng(args.seed).choice(len(images), args.count, replace=False)
    titles = [f"#{i}: {ds.class_names[labels[i]]}" for i in picked]
    figure = image_grid(images[picked], titles, title=f"{ds.name} {args.split}: {args.count} images")
    save_figure(figure, args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_models(args) -> int:
    from .models import REGISTRY, build_model, count_params, resolve_name, summary, summary_dict

    if args.models_command == "list":
        rows = [
            {"name": a.name, "aliases": list(a.aliases), "params": count_params(a.build()),
             "description": a.description}
            for a in REGISTRY.values()
        ]
        if args.json:
            _print_json(rows)
        else:
            for r in rows:
                print(f"{r['name']:<14}{r['params']:>9,}  {r['description']}")
        return 0
    name = resolve_name(args.name)
    model = build_model(name)
    if args.json:
        _print_json(summary_dict(model, name))
    else:
        print(summary(model, name))
    return 0


def _default_out(recipe: str) -> Path:
    base = Path("runs") / recipe
    candidate, n = base, 2
    while candidate.exists():
        candidate = base.with_name(f"{base.name}-{n}")
        n += 1
    return candidate


def cmd_train(args) -> int:
    from .classifier import train_recipe
    from .evaluate import format_metrics
    from .train import epochs_text

    out = Path(args.out) if args.out else _default_out(args.recipe)
    if out.exists() and not out.is_dir():
        raise DeepDigitsError(f"--out {out}: exists and is not a folder")
    clf = train_recipe(
        args.recipe, dataset=args.dataset, data_dir=args.data_dir, epochs=args.epochs,
        batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed, verbose=0 if args.quiet else 1,
    )
    if not clf.history:
        print("deepdigits: interrupted before the first epoch finished; nothing saved", file=sys.stderr)
        return 130
    clf.save(out)
    if clf.metrics:
        print(format_metrics(clf.metrics).split("\n\n")[0])
    print(f"saved model bundle: {out}  ({epochs_text(len(clf.history))}, {clf.train_seconds:.1f} s training)")
    if clf.interrupted:
        print("deepdigits: training was interrupted; the bundle holds the last finished epoch", file=sys.stderr)
        return 130
    return 0


def _test_set_of(model, data_dir: str | None):
    """The dataset a model was trained on (MNIST when it does not say), for its test split."""
    from .data import load_dataset

    return load_dataset((getattr(model, "dataset", None) or {}).get("name", "mnist"), data_dir=data_dir)


def _load_bundle_and_test_set(bundle: str, data_dir: str | None):
    from .classifier import load

    clf = load(bundle)
    return clf, _test_set_of(clf, data_dir)


def cmd_evaluate(args) -> int:
    from .evaluate import format_metrics

    clf, ds = _load_bundle_and_test_set(args.bundle, args.data_dir)
    metrics = clf.evaluate(ds.x_test, ds.y_test)
    if args.json:
        _print_json({"bundle": args.bundle, "dataset": ds.name, **metrics})
    else:
        print(f"model: {args.bundle} ({clf.architecture}, {clf.n_params:,} parameters)   "
              f"data: {ds.name} test set")
        print(format_metrics(metrics))
    return 0


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp"}


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files as given; folders -> the images inside (sorted); globs -> their matches (sorted)."""
    import glob

    files: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(str(p) for p in sorted(path.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES)
        elif any(c in item for c in "*?[") and not path.exists():
            matches = sorted(glob.glob(item, recursive=True))
            files.extend(matches if matches else [item])
        else:
            files.append(item)
    return files


def _predict_test_set(args) -> int:
    from .data import parse_index_range
    from .recognize import resolve_model

    clf = resolve_model(args.model, args.runtime)
    ds = _test_set_of(clf, args.data_dir)
    indices = parse_index_range(args.test_index, len(ds.x_test))
    probabilities = clf.predict_proba(ds.x_test[indices])
    predicted = probabilities.argmax(axis=1)
    labels = ds.y_test[indices]
    names = clf.class_names
    if args.json:
        _print_json([
            {"index": i, "digit": int(p), "class_name": names[p], "confidence": float(prob[p]),
             "label": int(y), "correct": bool(p == y), "probabilities": [round(float(v), 6) for v in prob]}
            for i, p, prob, y in zip(indices, predicted, probabilities, labels, strict=True)
        ])
        return 0
    print(f"{'index':>6}  {'predicted':<12}{'probability':>12}  {'label':<12}")
    for i, p, prob, y in zip(indices, predicted, probabilities, labels, strict=True):
        mark = "" if p == y else "  ✗ wrong"
        print(f"{i:>6}  {names[p]:<12}{prob[p]:>12.4f}  {names[y]:<12}{mark}")
    print(f"predictions: [{' '.join(str(int(p)) for p in predicted)}]")
    print(f"labels:      [{' '.join(str(int(y)) for y in labels)}]")
    print(f"{int((predicted == labels).sum())}/{len(indices)} correct")
    return 0


def cmd_predict(args) -> int:
    import numpy as np

    from .preprocess import to_mnist
    from .recognize import draw_boxes, predict_mnist_arrays, read_number, resolve_model

    if args.test_index:
        if args.inputs:
            raise DeepDigitsError("give either image files or --test-index, not both")
        return _predict_test_set(args)
    if not args.inputs:
        raise DeepDigitsError("no images given; expected IMAGE|DIR|GLOB arguments or --test-index RANGE")
    if not 0.0 <= args.min_confidence <= 1.0:
        raise DeepDigitsError(f"--min-confidence: expected a probability in [0, 1], got {args.min_confidence}")
    if args.top < 1:
        raise DeepDigitsError(f"--top: expected at least 1, got {args.top}")
    if args.overlay and not args.number:
        raise DeepDigitsError("--overlay draws digit boxes and needs --number")
    files = expand_inputs(args.inputs)
    if not files:
        raise DeepDigitsError(f"no image files found in: {' '.join(args.inputs)}")
    clf = resolve_model(args.model, args.runtime)
    failures = 0
    results: list[dict] = []

    def fail(file: str, exc: Exception) -> None:
        nonlocal failures
        failures += 1
        message = str(exc) if str(exc).startswith(file) else f"{file}: {exc}"
        print(f"deepdigits: error: {message}", file=sys.stderr)

    if args.number:
        for file in files:
            try:
                reading = read_number(file, clf, args.min_confidence)
            except DeepDigitsError as exc:
                fail(file, exc)
                continue
            results.append({"file": file, **reading.to_dict()})
            if args.overlay:
                target = Path(args.overlay)
                if len(files) > 1:
                    target = target / f"{Path(file).stem}-boxes.png"
                from .atomic import atomic_write

                image = draw_boxes(file, reading)
                atomic_write(target, lambda tmp, image=image: image.save(tmp, format="PNG"))
        if args.json:
            _print_json(results)
        else:
            for r in results:
                confidences = " ".join(f"{d['class_name']}:{d['confidence']:.2f}" for d in r["digits"])
                flag = "  (unsure)" if r["unsure"] else ""
                print(f"{r['file']}  {r['number']}{flag}   [{confidences}]")
            if args.overlay and results:
                print(f"wrote {args.overlay}")
        return 1 if failures else 0

    seen, names = [], []
    for file in files:
        try:
            seen.append(to_mnist(file))
            names.append(file)
        except DeepDigitsError as exc:
            fail(file, exc)
    if seen:
        for file, prediction in zip(names, predict_mnist_arrays(np.stack(seen), clf, args.top, args.min_confidence),
                                    strict=True):
            results.append({"file": file, **prediction.to_dict()})
    if args.json:
        _print_json([{k: r[k] for k in ("file", "digit", "confidence", "top", "unsure", "probabilities")}
                     for r in results])
    elif results:
        width = max(len("file"), *(len(r["file"]) for r in results))
        print(f"{'file':<{width}}  digit  confidence  top {args.top}")
        for r in results:
            top = ", ".join(f"{t['digit']} {t['probability']:.2f}" for t in r["top"])
            flag = "  unsure" if r["unsure"] else ""
            print(f"{r['file']:<{width}}  {r['class_name']:>5}  {r['confidence']:>10.3f}  {top}{flag}")
    return 1 if failures else 0


def cmd_preprocess(args) -> int:
    from PIL import Image

    from .atomic import atomic_write
    from .preprocess import to_mnist

    if not 1 <= args.zoom <= 50:
        raise DeepDigitsError(f"--zoom: expected 1-50, got {args.zoom}")
    seen = Image.fromarray(to_mnist(args.image)).resize((28 * args.zoom, 28 * args.zoom), Image.Resampling.NEAREST)
    atomic_write(args.out, lambda tmp: seen.save(tmp, format="PNG"))
    print(f"wrote {args.out} (the 28x28 image the network sees, {args.zoom}x enlarged)")
    return 0


def cmd_export(args) -> int:
    import numpy as np

    from .export import OnnxClassifier, export_onnx
    from .recognize import resolve_model

    clf = resolve_model(args.bundle)
    path = export_onnx(clf, args.onnx)
    probe = np.random.default_rng(0).integers(0, 256, (64, 28, 28), dtype=np.uint8)
    difference = float(np.abs(OnnxClassifier(path).predict_proba(probe) - clf.predict_proba(probe)).max())
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB); ONNX Runtime matches PyTorch within {difference:.1e}")
    return 0


def cmd_reproduce(args) -> int:
    from .reproduce import markdown_table, reproduce

    tutorials = [t.removeprefix("tutorial-").zfill(3) for t in args.tutorial] if args.tutorial else None
    rows = reproduce(tutorials, data_dir=args.data_dir, epochs=args.epochs, train_size=args.train_size,
                     save_dir=args.save_dir, verbose=0 if args.quiet or args.json else 1)
    table = markdown_table(rows)
    if args.out:
        atomic_write_text(args.out, table + "\n")
    if args.json:
        _print_json(rows)
    else:
        print(table)
        if args.out:
            print(f"wrote {args.out}")
    return 0


def cmd_plot(args) -> int:
    from .classifier import load
    from .plots import make_figure, save_figure

    if args.kind in ("curves", "evidence"):
        clf, ds = load(args.bundle), None
    else:
        clf, ds = _load_bundle_and_test_set(args.bundle, args.data_dir)
    if not 1 <= args.count <= 400:
        raise DeepDigitsError(f"--count: expected 1-400, got {args.count}")
    save_figure(make_figure(args.kind, clf, ds, index=args.index, count=args.count), args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_crossval(args) -> int:
    from .crossval import cross_validate, to_json
    from .plots import crossval_curves, crossval_scores, save_figure

    result = cross_validate(
        args.recipe, folds=args.folds, seed=args.seed, stratified=args.stratified, epochs=args.epochs,
        data_dir=args.data_dir, train_size=args.train_size, verbose=0 if args.quiet or args.json else 1,
    )
    document = to_json(result)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "crossval.json", json.dumps(document, indent=2) + "\n")
        save_figure(crossval_curves(result["fold_results"]), out / "curves.png")
        save_figure(crossval_scores(result["scores"]), out / "scores.png")
    if args.json:
        _print_json(document)
        return 0
    kind = "stratified " if args.stratified else ""
    print(f"{args.folds}-fold {kind}cross-validation of {args.recipe} on {result['n_images']:,} images "
          f"(seed {args.seed}):")
    for fold in result["fold_results"]:
        print(f"  fold {fold['fold']}: {fold['accuracy'] * 100:.3f}%  "
              f"(trained on {fold['train_size']:,}, validated on {fold['validation_size']:,})")
    print(f"Accuracy: mean={result['mean'] * 100:.3f}% std={result['std'] * 100:.3f} n={args.folds}")
    if args.out:
        print(f"wrote {Path(args.out) / 'crossval.json'}, curves.png, scores.png")
    return 0


def cmd_ensemble(args) -> int:
    import numpy as np

    from .classifier import combine, load
    from .evaluate import format_metrics, metrics_from_probabilities

    members = [load(path) for path in args.bundles]
    clf = combine(members)
    ds = _test_set_of(clf, args.data_dir)
    # each member runs over the test set once: the ensemble's answer is the mean of these probabilities
    probabilities = [member.predict_proba(ds.x_test) for member in members]
    for path, member, p in zip(args.bundles, members, probabilities, strict=True):
        print(f"member {path}: {member.architecture}, test accuracy {(p.argmax(1) == ds.y_test).mean():.4f}")
    clf.metrics = metrics_from_probabilities(np.mean(probabilities, axis=0), ds.y_test, clf.class_names)
    clf.save(args.out)
    print(format_metrics(clf.metrics).split("\n\n")[0])
    print(f"saved ensemble bundle: {args.out} ({len(members)} members)")
    return 0


def cmd_serve(args) -> int:
    from .serve import serve

    if not 0 < args.port < 65536:
        raise DeepDigitsError(f"--port: expected 1-65535, got {args.port}")
    serve(args.model, host=args.host, port=args.port, runtime=args.runtime)
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    clf, ds = _load_bundle_and_test_set(args.bundle, args.data_dir)
    write_report(clf, ds, args.out, bundle_path=args.bundle)
    print(f"wrote {args.out}")
    return 0


COMMANDS = {
    "data": cmd_data,
    "models": cmd_models,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
    "reproduce": cmd_reproduce,
    "preprocess": cmd_preprocess,
    "export": cmd_export,
    "plot": cmd_plot,
    "crossval": cmd_crossval,
    "report": cmd_report,
    "serve": cmd_serve,
    "ensemble": cmd_ensemble,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except DeepDigitsError as exc:
        print(f"deepdigits: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("deepdigits: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
