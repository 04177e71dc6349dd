"""`cxrllava label` and `cxrllava reader-study`: argument parsing only; the work is in the modules they call."""

import argparse
import json
import sys
import time

from cxrllava_jax.domain import label_files, labeler
from cxrllava_jax.evaluation import reader_study, run


def label_main(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="cxrllava label",
        description="Label reports with the CheXpert-style labeler (the CheXpert labeler's file formats).",
    )
    parser.add_argument("--reports", required=True, help="headerless CSV, one report per row")
    parser.add_argument("--out", required=True, help="labels CSV: Reports + 14 observations (1.0/0.0/-1.0/empty)")
    args = parser.parse_args(argv)
    reports = label_files.read_reports_csv(args.reports)
    start = time.perf_counter()
    labels = labeler.label_reports(reports)
    seconds = time.perf_counter() - start
    label_files.write_labels_csv(args.out, reports, labels)
    print(f"labeled {len(reports)} reports in {seconds:.2f} s -> {args.out}", file=sys.stderr)
    return 0


def reader_study_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="cxrllava reader-study", description=reader_study.__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write a blinded, shuffled rating sheet and its key")
    export.add_argument("--predictions", required=True, help="JSONL of {id, image, generated, reference}")
    export.add_argument("--sheet", required=True, help="CSV for the radiologists (item, image, report, rating)")
    export.add_argument("--key", required=True, help="CSV kept from the readers (item, case, source)")
    export.add_argument("--seed", type=int, default=0)
    analyze = commands.add_parser("analyze", help="Table 5 from returned rating sheets")
    analyze.add_argument("--key", required=True)
    analyze.add_argument("--ratings", required=True, nargs="+", help="one filled-in sheet per reader")
    analyze.add_argument("--out", help="write the analysis as JSON here (printed either way)")
    args = parser.parse_args(argv)
    if args.command == "export":
        records = run.read_prediction_records(args.predictions)
        reader_study.export_sheet(records, args.sheet, args.key, seed=args.seed)
        print(f"{2 * len(records)} items for {len(records)} cases -> {args.sheet} (key: {args.key})", file=sys.stderr)
        return 0
    analysis = json.dumps(reader_study.analyze_ratings(args.key, args.ratings), indent=2)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(analysis)
    print(analysis)
    return 0
