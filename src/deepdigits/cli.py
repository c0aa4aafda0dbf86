"""The ``deepdigits`` command line: a thin shell over the library, each command's parser beside its handler.

Only the standard library and the torch-free ``recipes`` are imported here at start; each handler imports
what it needs, so ``deepdigits --help`` and ``deepdigits CMD --help`` answer at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import DeepDigitsError

EPILOG = """\
examples:
  deepdigits predict photo.jpg                  recognise a photo of a digit with the built-in model
  deepdigits serve                              draw digits in the browser at http://127.0.0.1:8000/
  deepdigits data info                          where the data comes from, shapes, class counts
  deepdigits models summary tutorial-003        the network, layer by layer
  deepdigits train --recipe tutorial-003        train the tutorial's CNN (a few minutes on 2 CPU cores)
  deepdigits evaluate runs/tutorial-003         test loss, accuracy, per-class table, confusion matrix
  deepdigits predict --model runs/tutorial-003 --test-index 0-19
  deepdigits reproduce                          re-run all five tutorials, ours beside their claims
  deepdigits plot confusion runs/tutorial-003   writes confusion.png
  deepdigits crossval --recipe tutorial-004 --folds 5 --out runs/kfold
  deepdigits report runs/tutorial-003           writes report.html

data: --data-dir DIR, or $DEEPDIGITS_DATA (a folder holding mnist/ and fashion-mnist/), or the user
cache; otherwise the files are downloaded once, verified by SHA-256.
"""

DATASET_NAMES = ("mnist", "fashion-mnist")  # data.DATASETS, named here so --help need not import numpy


# --------------------------------------------------------------------------- shared options and output


def _data_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", metavar="DIR",
        help="folder holding the IDX files (or a folder with mnist/ and fashion-mnist/ inside); "
        "default: $DEEPDIGITS_DATA, then the user cache, then a download",
    )


def _dataset_option(parser: argparse.ArgumentParser, default: str | None = "mnist") -> None:
    parser.add_argument("--dataset", choices=DATASET_NAMES, default=default,
                        help=f"which dataset (default: {default or 'the recipe’s'})")


def _quiet_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no training progress")


def _print_json(value) -> None:
    """Strict JSON: a NaN or infinity is an error here, never output a JSON parser would reject."""
    print(json.dumps(value, indent=2, allow_nan=False))


def _print_json_line(value) -> None:
    print(json.dumps(value, allow_nan=False), flush=True)


def _recipe_names() -> list[str]:
    from .recipes import RECIPES

    return list(RECIPES)


def _check_range(option: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise DeepDigitsError(f"{option}: expected {low}-{high}, got {value}")


def _test_set_of(predictor, data_dir: str | None):
    """The dataset a model was trained on (MNIST when it does not say), for its test split."""
    from .data import load_dataset

    return load_dataset(predictor.card().dataset or "mnist", data_dir=data_dir)


def parse_index_range(text: str, limit: int) -> list[int]:
    """``"0-19"``, ``"3"`` or ``"1,5,9-12"`` -> indices, each checked against ``limit`` (before any list is built)."""
    indices: list[int] = []
    for piece in text.split(","):
        low_text, _, high_text = piece.strip().partition("-")
        try:
            low, high = int(low_text), int(high_text or low_text)
        except ValueError:
            raise DeepDigitsError(f"--test-index {text!r}: expected numbers like 0-19 or 1,5,9-12") from None
        if not 0 <= low <= high < limit:
            raise DeepDigitsError(f"--test-index {text!r}: indices must lie in 0-{limit - 1}, low to high")
        indices.extend(range(low, high + 1))
    return indices


# --------------------------------------------------------------------------- data


def add_data(commands) -> None:
    data = commands.add_parser("data", help="inspect the datasets", description="Inspect the datasets.")
    actions = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    info = actions.add_parser("info", help="source, shapes and class counts of a dataset")
    _dataset_option(info)
    _data_dir_option(info)
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    show = actions.add_parser("show", help="save a labelled grid of images as PNG")
    _dataset_option(show)
    _data_dir_option(show)
    show.add_argument("--split", choices=["train", "test"], default="train", help="which split (default: train)")
    show.add_argument("--count", type=int, default=9, metavar="N", help="how many images (default: 9)")
    show.add_argument("--seed", type=int, default=None,
                      help="pick images at random with this seed (default: the first N)")
    show.add_argument("--out", default="images.png", metavar="FILE.png",
                      help="where to write the grid (default: images.png)")
    data.set_defaults(handler=cmd_data)


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
    from .plots import sample_grid, save_figure

    save_figure(sample_grid(ds, args.split, args.count, args.seed), args.out)
    print(f"wrote {args.out}")
    return 0


# --------------------------------------------------------------------------- models


def add_models(commands) -> None:
    models = commands.add_parser("models", help="list and describe the network architectures",
                                 description="List and describe the network architectures.")
    actions = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="the registered architectures")
    listing.add_argument("--json", action="store_true", help="print JSON instead of text")
    summary = actions.add_parser(
        "summary", help="a Keras-style table of a network's layers, parameters and size",
        description="A Keras-style table of a network's layers, output shapes, parameters and size in bytes.",
    )
    summary.add_argument("name", metavar="ARCHITECTURE|RECIPE|BUNDLE",
                         help="an architecture (tutorial-003), a recipe (best) or a saved bundle folder")
    summary.add_argument("--json", action="store_true", help="print JSON (with total_params, total_bytes)")
    models.set_defaults(handler=cmd_models)


def cmd_models(args) -> int:
    from .models import REGISTRY, count_params, describe

    if args.models_command == "list":
        rows = [{"name": a.name, "aliases": list(a.aliases), "params": count_params(a.build()),
                 "description": a.description} for a in REGISTRY.values()]
        if args.json:
            _print_json(rows)
        else:
            for r in rows:
                print(f"{r['name']:<14}{r['params']:>9,}  {r['description']}")
        return 0
    text, info = describe(args.name)
    if args.json:
        _print_json(info)
    else:
        print(text)
    return 0


# --------------------------------------------------------------------------- train


def add_train(commands) -> None:
    from .recipes import RECIPES

    train = commands.add_parser(
        "train", help="train a recipe and save a model bundle",
        description="Train a named recipe and save a model bundle (safetensors weights + JSON metadata, with "
        "training curves and the confusion matrix as PNG). A checkpoint is written into OUT/checkpoint at the "
        "end of every epoch; a run that was killed continues with --resume OUT. Ctrl-C stops training and "
        "saves the last finished epoch (the checkpoint is kept). Data-parallel: torchrun --standalone "
        "--nproc_per_node=N -m deepdigits train ...",
        epilog="recipes:\n" + "\n".join(f"  {r.name:<14}{r.description}" for r in RECIPES.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--recipe", choices=list(RECIPES), metavar="NAME",
                       help="which recipe (default: tutorial-003, or the resumed run's; see the list below)")
    train.add_argument("--epochs", type=int, help="override the recipe's number of epochs")
    train.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    train.add_argument("--lr", type=float, help="override the recipe's learning rate")
    train.add_argument("--seed", type=int, help="random seed (default: the recipe's, 0); same seed, same result")
    _dataset_option(train, default=None)
    _data_dir_option(train)
    train.add_argument("--out", metavar="DIR", help="bundle folder to write (default: runs/RECIPE, numbered "
                       "if it exists; with --resume, the resumed run's folder)")
    train.add_argument("--checkpoint-every", type=int, metavar="N",
                       help="write the checkpoint every N epochs (default: 1, or the resumed run's)")
    train.add_argument("--keep-checkpoints", action="store_true",
                       help="keep OUT/checkpoint when the run finishes (default: removed once the bundle is saved)")
    train.add_argument("--resume", metavar="DIR",
                       help="continue the run whose checkpoint is in DIR (its output folder) with its recipe and "
                       "options; ends with the weights the uninterrupted run would have had")
    # Training as 2 processes x 1 thread against 1 process x 2 threads (benchmarks/RESULTS.md), alternated: on 2
    # cores shared with other work, one epoch of best 147-186 s against 355-521 s (2.4-2.8x), tutorial-003 and
    # fast 1.3-2.0x; on 2 free cores, best 0.60x (31.5 s against 19 s), tutorial-003's 10 epochs 0.83x, fast
    # 0.60x.
    train.add_argument("--processes", type=int, metavar="N",
                       help="train data-parallel in N processes on this machine, one thread each (torch's "
                       "elastic agent, as torchrun --standalone starts them); it pays only where other work "
                       "shares the cores: on free cores one process is quicker (benchmarks/RESULTS.md). For "
                       "the ensemble recipe: train N members at once, each in its own process with 1/N of the "
                       "cores (default: one per core and member)")
    _quiet_option(train)
    train.set_defaults(handler=cmd_train)


def _run_options(args) -> dict:
    """The keyword arguments of ``runs.train_run`` (and ``runs.train_argv``) that ``train``'s options give."""
    return {"epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.lr, "seed": args.seed,
            "dataset": args.dataset, "data_dir": args.data_dir, "checkpoint_every": args.checkpoint_every,
            "resume": args.resume, "keep_checkpoints": args.keep_checkpoints}


def cmd_train(args) -> int:
    from . import distributed, runs

    if args.processes is not None:
        _check_range("--processes", args.processes, 1, 1024)
    if args.checkpoint_every is not None:
        _check_range("--checkpoint-every", args.checkpoint_every, 1, 1_000_000)
    if args.processes and args.processes > 1 and not distributed.launched() and not runs.is_ensemble(args.recipe):
        # one output folder for all: named by launch, not by each process
        return runs.launch(args.processes, args.recipe, args.out, quiet=args.quiet, **_run_options(args))
    try:
        return _train(args)
    finally:
        distributed.teardown()


def _train(args) -> int:
    from .distributed import setup
    from .evaluate import format_headline
    from .progress import epochs_text
    from .runs import resume_hint, run_folders, train_run

    world = setup()  # None unless started by torchrun
    out, root = run_folders(args.recipe, args.out, args.resume)
    clf = train_run(args.recipe, out, processes=args.processes, verbose=0 if args.quiet else 1, **_run_options(args))
    if world is not None and world.rank != 0:  # rank 0 writes the bundle
        return 130 if clf.interrupted else 0
    if not clf.history and clf.architecture != "ensemble":
        print("deepdigits: interrupted before the first epoch finished; nothing saved", file=sys.stderr)
        return 130
    if clf.metrics:
        print(format_headline(clf.metrics))
    trained = (f"{len(clf.recipe['members'])} members" if clf.architecture == "ensemble"
               else epochs_text(len(clf.history)))
    print(f"saved model bundle: {out}  ({trained}, {clf.train_seconds:.1f} s training)")
    if clf.interrupted:
        print("deepdigits: training was interrupted; the bundle holds the last finished epoch; continue with "
              f"{resume_hint(out, root)}", file=sys.stderr)
        return 130
    return 0


# --------------------------------------------------------------------------- evaluate


def add_evaluate(commands) -> None:
    evaluate = commands.add_parser("evaluate", help="test metrics of a saved model bundle")
    evaluate.add_argument("bundle", help="model bundle folder")
    _data_dir_option(evaluate)
    evaluate.add_argument("--json", action="store_true", help="print JSON (keys include accuracy and loss)")
    evaluate.set_defaults(handler=cmd_evaluate)


def cmd_evaluate(args) -> int:
    from .classifier import Classifier
    from .evaluate import format_metrics

    clf = Classifier.load(args.bundle)
    ds = _test_set_of(clf, args.data_dir)
    metrics = clf.evaluate(ds.x_test, ds.y_test)
    if args.json:
        _print_json({"bundle": args.bundle, "dataset": ds.name, **metrics})
    else:
        print(f"model: {args.bundle} ({clf.architecture}, {clf.n_params:,} parameters)   "
              f"data: {ds.name} test set")
        print(format_metrics(metrics))
    return 0


# --------------------------------------------------------------------------- predict


def add_predict(commands) -> None:
    predict = commands.add_parser(
        "predict", help="recognise digits (or whole numbers) in images, or in the test set",
        description="Recognise the digit in each image (PNG, JPEG, GIF, BMP, TIFF, WebP; a photo or scan is fine: "
        "it is made MNIST-like first). With --number, read a whole handwritten number per image. With "
        "--test-index, predict MNIST test images as tutorial 003 printed them. The built-in model is used "
        "unless --model names another. --json prints JSON Lines: one object per image (or test index).",
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
    predict.add_argument("--json", action="store_true", help="print JSON Lines (one object per image)")
    predict.set_defaults(handler=cmd_predict)


def cmd_predict(args) -> int:
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
    from .predictor import load
    from .recognize import expand_inputs

    files = expand_inputs(args.inputs)
    if not files:
        raise DeepDigitsError(f"no image files found in: {' '.join(args.inputs)}")
    predictor = load(args.model, args.runtime)
    if args.number:
        return _predict_numbers(args, files, predictor)
    from .recognize import predict_images

    results, failures = predict_images(((f, f) for f in files), predictor, args.top, args.min_confidence)
    for failure in failures:
        print(f"deepdigits: error: {failure.message}", file=sys.stderr)
    if args.json:
        for r in results:
            row = r.to_dict()
            _print_json_line({k: row[k] for k in ("file", "digit", "confidence", "top", "unsure", "not_a_digit",
                                                  "reason", "probabilities")})
    elif results:
        width = max(len("file"), *(len(r.name) for r in results))
        print(f"{'file':<{width}}  digit  confidence  top {args.top}")
        for r in results:
            p = r.prediction
            if p.not_a_digit:  # an answer, not an error: the exit status stays 0
                print(f"{r.name:<{width}}  not a digit ({_reason_text(p.reason)})")
                continue
            top = ", ".join(f"{d} {q:.2f}" for d, q in p.top)
            flag = "  unsure" if p.unsure else ""
            print(f"{r.name:<{width}}  {p.class_name:>5}  {p.confidence:>10.3f}  {top}{flag}")
    return 1 if failures else 0


def _reason_text(reason: str | None) -> str:
    """Why an image is not a digit, as the CLI says it: several digits name the option that reads them."""
    from .outliers import SEVERAL

    return f"{reason} (--number)" if reason == SEVERAL else str(reason)


def _predict_numbers(args, files: list[str], predictor) -> int:
    from .atomic import atomic_write
    from .recognize import draw_boxes, read_number

    failures = 0
    for file in files:
        try:
            reading = read_number(file, predictor, args.min_confidence)
        except DeepDigitsError as exc:
            failures += 1
            message = str(exc)
            print(f"deepdigits: error: {message if message.startswith(file) else f'{file}: {message}'}",
                  file=sys.stderr)
            continue
        if args.overlay:
            target = Path(args.overlay) / f"{Path(file).stem}-boxes.png" if len(files) > 1 else Path(args.overlay)
            image = draw_boxes(file, reading)
            atomic_write(target, lambda tmp, image=image: image.save(tmp, format="PNG"))
        if args.json:
            _print_json_line({"file": file, **reading.to_dict()})
            continue
        if reading.not_a_digit:
            print(f"{file}  not a number ({reading.reason})")
            continue
        confidences = " ".join(f"{d.class_name}:{d.confidence:.2f}" if d.class_name is not None
                               else f"?:{d.reason}" for d in reading.digits)
        flag = "  (unsure)" if reading.unsure else ""
        print(f"{file}  {reading.number}{flag}   [{confidences}]")
    if args.overlay and failures < len(files) and not args.json:
        print(f"wrote {args.overlay}")
    return 1 if failures else 0


def _predict_test_set(args) -> int:
    from .predictor import load

    predictor = load(args.model, args.runtime)
    ds = _test_set_of(predictor, args.data_dir)
    indices = parse_index_range(args.test_index, len(ds.x_test))
    probabilities = predictor.predict_proba(ds.x_test[indices])
    predicted = probabilities.argmax(axis=1)
    labels = ds.y_test[indices]
    names = predictor.class_names
    if args.json:
        for i, p, prob, y in zip(indices, predicted, probabilities, labels, strict=True):
            _print_json_line({"index": i, "digit": int(p), "class_name": names[p], "confidence": float(prob[p]),
                              "label": int(y), "correct": bool(p == y),
                              "probabilities": [round(float(v), 6) for v in prob]})
        return 0
    print(f"{'index':>6}  {'predicted':<12}{'probability':>12}  {'label':<12}")
    for i, p, prob, y in zip(indices, predicted, probabilities, labels, strict=True):
        mark = "" if p == y else "  ✗ wrong"
        print(f"{i:>6}  {names[p]:<12}{prob[p]:>12.4f}  {names[y]:<12}{mark}")
    print(f"predictions: [{' '.join(str(int(p)) for p in predicted)}]")
    print(f"labels:      [{' '.join(str(int(y)) for y in labels)}]")
    print(f"{int((predicted == labels).sum())}/{len(indices)} correct")
    return 0


# --------------------------------------------------------------------------- preprocess


def add_preprocess(commands) -> None:
    prep = commands.add_parser(
        "preprocess", help="show what the network will see for an image",
        description="Make an image MNIST-like (polarity, background, crop, 20x20 box, centre of mass) and save "
        "the 28x28 result, enlarged, as PNG.",
    )
    prep.add_argument("image", help="an image of one digit")
    prep.add_argument("--out", default="seen.png", metavar="FILE.png",
                      help="where to write what the network sees (default: seen.png)")
    prep.add_argument("--zoom", type=int, default=10, help="enlargement factor (default: 10, i.e. 280x280)")
    prep.set_defaults(handler=cmd_preprocess)


def cmd_preprocess(args) -> int:
    from .preprocess import save_seen

    _check_range("--zoom", args.zoom, 1, 50)
    save_seen(args.image, args.out, args.zoom)
    print(f"wrote {args.out} (the 28x28 image the network sees, {args.zoom}x enlarged)")
    return 0


# --------------------------------------------------------------------------- export


def add_export(commands) -> None:
    export = commands.add_parser("export", help="export a model bundle to ONNX",
                                 description="Export a model bundle to ONNX (input: float images (N, 1, 28, 28) "
                                 "scaled to [0, 1]; output: probabilities) and check it in ONNX Runtime.")
    export.add_argument("bundle", nargs="?", help="model bundle folder (default: the built-in model)")
    export.add_argument("--onnx", default="model.onnx", metavar="FILE.onnx",
                        help="where to write the ONNX model (default: model.onnx)")
    export.set_defaults(handler=cmd_export)


def cmd_export(args) -> int:
    from .export import export_and_check
    from .predictor import load

    path, difference = export_and_check(load(args.bundle), args.onnx)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB); ONNX Runtime matches PyTorch within {difference:.1e}")
    return 0


# --------------------------------------------------------------------------- reproduce


def add_reproduce(commands) -> None:
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
    _quiet_option(repro)
    repro.set_defaults(handler=cmd_reproduce)


def cmd_reproduce(args) -> int:
    from .atomic import atomic_write_text
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


# --------------------------------------------------------------------------- ensemble


def add_ensemble(commands) -> None:
    ens = commands.add_parser(
        "ensemble", help="combine trained model bundles into one ensemble bundle",
        description="Combine two or more trained model bundles into an ensemble (probabilities averaged), "
        "evaluate it on the test set and save it as a bundle that evaluate, predict, serve and export accept.",
    )
    ens.add_argument("bundles", nargs="+", metavar="BUNDLE", help="member bundles (at least 2)")
    ens.add_argument("--out", required=True, metavar="DIR", help="where to write the ensemble bundle")
    _data_dir_option(ens)
    ens.set_defaults(handler=cmd_ensemble)


def cmd_ensemble(args) -> int:
    from .classifier import Classifier, combine_and_evaluate
    from .evaluate import format_headline

    members = [Classifier.load(path) for path in args.bundles]
    ds = _test_set_of(members[0], args.data_dir)
    clf = combine_and_evaluate(members, ds.x_test, ds.y_test, dataset=ds)  # calibrated where members held out
    for path, member, accuracy in zip(args.bundles, members, clf.extra["member_metrics"], strict=True):
        print(f"member {path}: {member.architecture}, test accuracy {accuracy:.4f}")
    clf.save(args.out)
    print(format_headline(clf.metrics))
    print(f"saved ensemble bundle: {args.out} ({len(members)} members)")
    return 0


# --------------------------------------------------------------------------- serve


def add_serve(commands) -> None:
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
    serve.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                       help="also answer requests whose Host header is NAME (repeatable; '*' for any). By default "
                       "only localhost, 127.0.0.1, [::1] and the --host address are answered (any IP address when "
                       "--host is 0.0.0.0 or ::), which keeps web pages using DNS rebinding out")
    serve.set_defaults(handler=cmd_serve)


def cmd_serve(args) -> int:
    _check_range("--port", args.port, 1, 65535)
    from .serve import serve

    serve(args.model, host=args.host, port=args.port, runtime=args.runtime, allow_hosts=args.allow_host)
    return 0


# --------------------------------------------------------------------------- plot


def add_plot(commands) -> None:
    from .plots import FIGURE_KINDS

    plot = commands.add_parser(
        "plot", help="draw a figure of a saved model as PNG",
        description="Draw a figure of a saved model bundle as a PNG file.",
        epilog="kinds:\n" + "\n".join(f"  {k:<14}{v}" for k, v in FIGURE_KINDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plot.add_argument("kind", choices=list(FIGURE_KINDS), metavar="KIND", help="which figure (see below)")
    plot.add_argument("bundle", help="model bundle folder")
    plot.add_argument("--out", metavar="FILE.png", help="where to write the PNG (default: KIND.png)")
    plot.add_argument("--index", type=int, default=0,
                      help="test image for saliency/probabilities, first image for predictions (default: 0)")
    plot.add_argument("--count", type=int, default=16, help="images in predictions/mistakes grids (default: 16)")
    _data_dir_option(plot)
    plot.set_defaults(handler=cmd_plot)


def cmd_plot(args) -> int:
    from .classifier import Classifier
    from .plots import make_figure, save_figure

    _check_range("--count", args.count, 1, 400)
    clf = Classifier.load(args.bundle)
    ds = None if args.kind in ("curves", "evidence") else _test_set_of(clf, args.data_dir)
    out = args.out or f"{args.kind}.png"
    save_figure(make_figure(args.kind, clf, ds, index=args.index, count=args.count), out)
    print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------- crossval


def add_crossval(commands) -> None:
    crossval = commands.add_parser(
        "crossval", help="k-fold cross-validation of a recipe (a fresh network per fold)",
        description="k-fold cross-validation on the training set: a fresh network for every fold, trained only "
        "on that fold's training part and validated on the held-out part. Prints per-fold accuracy, mean and "
        "standard deviation; with --out, writes crossval.json, curves.png and scores.png.",
    )
    crossval.add_argument("--recipe", default="tutorial-004", choices=_recipe_names(), metavar="NAME",
                          help="which recipe (default: tutorial-004, as the tutorial did)")
    crossval.add_argument("--folds", type=int, default=5, help="number of folds (default: 5)")
    crossval.add_argument("--seed", type=int, default=1, help="shuffling seed (default: 1, as tutorial 004)")
    crossval.add_argument("--stratified", action="store_true", help="keep class proportions in every fold")
    crossval.add_argument("--epochs", type=int, help="override the recipe's epochs")
    crossval.add_argument("--train-size", type=int, metavar="N", help="use only the first N training images")
    _data_dir_option(crossval)
    crossval.add_argument("--out", metavar="DIR", help="write crossval.json and the figures into this folder")
    crossval.add_argument("--json", action="store_true", help="print JSON of all numbers")
    _quiet_option(crossval)
    crossval.set_defaults(handler=cmd_crossval)


def cmd_crossval(args) -> int:
    from .crossval import cross_validate, save_crossval, to_json

    result = cross_validate(
        args.recipe, folds=args.folds, seed=args.seed, stratified=args.stratified, epochs=args.epochs,
        data_dir=args.data_dir, train_size=args.train_size, verbose=0 if args.quiet or args.json else 1,
    )
    if args.out:
        save_crossval(result, args.out)
    if args.json:
        _print_json(to_json(result))
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


# --------------------------------------------------------------------------- report


def add_report(commands) -> None:
    report = commands.add_parser(
        "report", help="write a one-file HTML report of a model bundle",
        description="Write a self-contained HTML report (images embedded; opens without a network): model "
        "summary, recipe, training curves, test metrics, confusion matrix, mistakes and evidence maps.",
    )
    report.add_argument("bundle", help="model bundle folder")
    report.add_argument("--out", default="report.html", metavar="FILE.html", help="default: report.html")
    _data_dir_option(report)
    report.set_defaults(handler=cmd_report)


def cmd_report(args) -> int:
    from .classifier import Classifier
    from .report import write_report

    clf = Classifier.load(args.bundle)
    write_report(clf, _test_set_of(clf, args.data_dir), args.out, bundle_path=args.bundle)
    print(f"wrote {args.out}")
    return 0


# --------------------------------------------------------------------------- the parser


COMMANDS = (add_data, add_models, add_train, add_evaluate, add_predict, add_reproduce, add_preprocess, add_export,
            add_plot, add_crossval, add_report, add_serve, add_ensemble)


class _VersionAction(argparse.Action):
    """``--version``, reading the package metadata only when asked (importlib.metadata costs ~50 ms at start)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="show the version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from .version import __version__

        print(f"deepdigits {__version__}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepdigits",
        description="Recognise handwritten digits with deep learning: data, networks, training, evaluation.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_VersionAction)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
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
