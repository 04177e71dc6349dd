"""`cxrllava label` and `cxrllava reader-study`: argument parsing only; the work is in the modules they call."""

import json
import sys
import time

from cxrllava_jax import arguments, files
from cxrllava_jax.domain import label_files
from cxrllava_jax.evaluation import labelers, reader_study, run


def label_main(argv) -> int:
    parser = arguments.parser(
        "cxrllava label", "Label reports (the CheXpert labeler's file formats) with our CheXpert-style labeler, "
                          "labels made elsewhere, or CheXbert.")
    parser.add_argument("--reports", required=True, type=arguments.input_file,
                        help="CSV, one report per row (a 'Reports' header is allowed)")
    parser.add_argument("--out", required=True, type=arguments.output_file,
                        help="labels CSV: Reports + 14 observations (1.0/0.0/-1.0/empty)")
    parser.add_argument("--labeler", choices=labelers.CHOICES, default="ours", help="what labels the reports")
    parser.add_argument("--labels-csv", type=arguments.input_file,
                        help="--labeler chexpert-csv: the CheXpert labeler's or CheXbert's output")
    parser.add_argument("--chexbert-checkpoint", type=arguments.input_file,
                        help="--labeler chexbert: CheXbert's chexbert.pth")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    files.refuse_existing(args.out, args.overwrite)
    report_labeler = labelers.make(args.labeler, args.labels_csv, args.chexbert_checkpoint)
    reports = label_files.read_reports_csv(args.reports)
    start = time.perf_counter()
    labels = report_labeler.label_reports(reports)
    seconds = time.perf_counter() - start
    label_files.write_labels_csv(args.out, reports, labels)
    print(f"labeled {len(reports)} reports with {report_labeler.name} in {seconds:.2f} s -> {args.out}",
          file=sys.stderr)
    return 0


def reader_study_main(argv) -> int:
    parser = arguments.parser("cxrllava reader-study", reader_study.__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write a blinded, shuffled rating sheet and its key",
                                 formatter_class=arguments.HelpFormatter)
    arguments.add_debug(export)
    export.add_argument("--predictions", required=True, type=arguments.input_file,
                        help="JSONL of {id, image, generated, reference}")
    export.add_argument("--sheet", required=True, type=arguments.output_file,
                        help="CSV for the radiologists (item, image, report, rating)")
    export.add_argument("--key", required=True, type=arguments.output_file,
                        help="CSV kept from the readers (item, case, source)")
    export.add_argument("--seed", type=arguments.whole_number(0), default=0, help="the shuffle's seed")
    export.add_argument("--overwrite", action="store_true", help="replace an existing sheet and key")
    analyze = commands.add_parser("analyze", help="Table 5 from returned rating sheets",
                                  formatter_class=arguments.HelpFormatter)
    arguments.add_debug(analyze)
    analyze.add_argument("--key", required=True, type=arguments.input_file, help="the key `export` wrote")
    analyze.add_argument("--ratings", required=True, nargs="+", type=arguments.input_file,
                         help="one filled-in sheet per reader")
    analyze.add_argument("--out", type=arguments.output_file, help="write the analysis as JSON here (printed either way)")
    analyze.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    for path in (args.sheet, args.key) if args.command == "export" else (args.out,) if args.out else ():
        files.refuse_existing(path, args.overwrite)
    if args.command == "export":
        records = run.read_prediction_records(args.predictions)
        reader_study.export_sheet(records, args.sheet, args.key, seed=args.seed)
        print(f"{2 * len(records)} items for {len(records)} cases -> {args.sheet} (key: {args.key})", file=sys.stderr)
        return 0
    analysis = json.dumps(reader_study.analyze_ratings(args.key, args.ratings), indent=2)
    if args.out:
        files.write_text_atomically(args.out, analysis)
    print(analysis)
    return 0
