"""The `itmatch` command: a thin layer over the library; settings beyond a few flags go through
`--set key=value` on the preset's config instead of one flag each."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from itmatch.distributed import leave_process_group, rank
from itmatch.errors import InputError, ItmatchError
from itmatch.evaluation.posthoc import FUSIONS, PostHoc
from itmatch.files import atomic_write
from itmatch.models.backbones import RESNET_LAYOUTS
from itmatch.models.registry import official_sources
from itmatch.retrieval import CANDIDATES

SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
MAX_SKIPS_SHOWN = 20  # lines of a raw-image split's left-out list printed by evaluate


def memory_size(text: str) -> int:
    """'512M', '2G', '1048576' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?)i?b?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 512M, 2G)")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2)])


def _bounded_int(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"must be {low}..{high}, got {value}" if high else f"must be >= {low}, got {value}"
            )
        return value

    return parse


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


positive_int, count, port = _bounded_int(1), _bounded_int(0), _bounded_int(1, 65535)


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (the full usage is one `--help` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="itmatch", description="Image-text matching: train, evaluate, convert.")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_model_commands, _add_evaluate_command, _add_data_commands, _add_search_commands):
        add(commands)
    return parser


def _add_model_commands(commands) -> None:
    """The subcommands train, convert and build-vocab."""

    train = commands.add_parser("train", help="train a preset on a precomp folder or raw images")
    train.add_argument("--model", required=True, help="preset name (see `itmatch models`)")
    train.add_argument(
        "--data",
        required=True,
        type=Path,
        help="precomp folder with train (and dev) splits, or a raw-image source (the image encoder trains too)",
    )
    train.add_argument("--out", required=True, type=Path, help="run folder for checkpoints and logs")
    train.add_argument("--epochs", type=positive_int, help="same as --set train.epochs=N")
    train.add_argument("--batch-size", type=positive_int, help="same as --set train.batch_size=N")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    train.add_argument("--vocab", type=Path, help="vocabulary JSON (default: DATA/vocab.json, else built)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    train.add_argument("--quiet", action="store_true", help="no progress bars")

    convert = commands.add_parser("convert", help="convert an official checkpoint to itmatch")
    convert.add_argument("source", choices=sorted(official_sources()))
    convert.add_argument("checkpoint", type=Path)
    convert.add_argument("out", type=Path)
    convert.add_argument("--vocab", type=Path, help="the vocabulary JSON (word2idx, idx2word) it was trained with")

    vocab = commands.add_parser(
        "build-vocab", help="the word vocabulary of a precomp folder (train + dev words seen 4 times)"
    )
    vocab.add_argument("data", type=Path)
    vocab.add_argument("--threshold", type=positive_int, default=4, help="minimum word count")
    vocab.add_argument("--out", type=Path, help="default: DATA/vocab.json")


def _add_evaluate_command(commands) -> None:
    """The evaluate subcommand: protocols, ensembles, post-hoc stages, two-stage scoring."""
    evaluate = commands.add_parser("evaluate", help="bidirectional retrieval metrics of checkpoints")
    evaluate.add_argument("checkpoints", type=Path, nargs="+", help="several: an ensemble (scores averaged)")
    evaluate.add_argument("--data", required=True, type=Path)
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--protocol", default="1k", choices=["1k", "coco-5fold", "coco-5k"])
    evaluate.add_argument("--json", type=Path, help="also write the metrics as JSON here")
    evaluate.add_argument(
        "--inverted-softmax",
        type=positive_float,
        metavar="TEMP",
        help="rank by scores / TEMP softmax-normalised over queries",
    )
    evaluate.add_argument(
        "--csls", type=positive_int, metavar="K", help="rank by CSLS: scores less each side's mean of its K best"
    )
    evaluate.add_argument(
        "--reciprocal",
        type=positive_int,
        metavar="K",
        help="re-sort each query's top K by the rank the query gets back from each candidate",
    )
    evaluate.add_argument(
        "--fuse",
        default="mean",
        choices=FUSIONS,
        help="of several checkpoints: average the scores, or weigh each per query (adaptive metric fusion)",
    )
    evaluate.add_argument(
        "--transductive",
        action="store_true",
        help="rank by the model's transductive score (each pair's depends on the whole split), if it has one",
    )
    evaluate.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="of pair scoring (auto: the fastest this machine runs well, measured once and cached)",
    )
    evaluate.add_argument(
        "--compile", action="store_true", help="torch.compile the pair scorer: fused kernels, once tens of seconds"
    )
    evaluate.add_argument(
        "--rerank-k", type=positive_int, metavar="K", help="two stages: score each query's top K only"
    )
    evaluate.add_argument("--first-stage", type=Path, metavar="CKPT", help="embedding model for --rerank-k")
    evaluate.add_argument(
        "--candidates",
        default="top-k",
        choices=CANDIDATES,
        help="of --rerank-k: each query's top K, or the same number of pairs shared out by first-stage margin",
    )
    evaluate.add_argument("--batch-size", type=positive_int, default=128)
    evaluate.add_argument("--workers", type=count, default=0, help="DataLoader worker processes")
    evaluate.add_argument("--memory-budget", type=memory_size, help="working memory of pair scoring, e.g. 2G")
    evaluate.add_argument("--quiet", action="store_true")


def _add_data_commands(commands) -> None:
    """The subcommands make-synthetic, extract, import-butd and models."""
    synthetic = commands.add_parser("make-synthetic", help="write a synthetic scene data set (precomp layout)")
    synthetic.add_argument("out", type=Path)
    synthetic.add_argument("--train", type=count, default=2000)
    synthetic.add_argument("--dev", type=count, default=250)
    synthetic.add_argument("--test", type=count, default=250)
    synthetic.add_argument("--seed", type=count, default=0)
    synthetic.add_argument("--regions", type=positive_int, default=36, help="regions per image")
    synthetic.add_argument("--feature-dim", type=positive_int, default=256)

    extract = commands.add_parser("extract", help="grid region features of raw images from a pretrained ResNet")
    extract.add_argument(
        "--images", required=True, type=Path, help="folder with captions.csv, a .csv, or a Karpathy dataset_*.json"
    )
    extract.add_argument("--out", required=True, type=Path, help="precomp folder to write (or to continue)")
    extract.add_argument("--backbone", required=True, choices=sorted(RESNET_LAYOUTS))
    extract.add_argument("--weights", type=Path, help="the backbone's torchvision-format state dict (.pth)")
    extract.add_argument("--split", nargs="+", help="default: every split of the source")
    extract.add_argument("--batch-size", type=positive_int, default=32)
    extract.add_argument("--image-size", type=positive_int, default=224, help="images are squashed to this square")
    extract.add_argument("--workers", type=count, default=0, help="DataLoader worker processes")
    extract.add_argument("--quiet", action="store_true", help="no progress bars")

    butd = commands.add_parser("import-butd", help="bottom-up-attention TSV features into the precomp layout")
    butd.add_argument("tsv", type=Path)
    butd.add_argument("--out", required=True, type=Path, help="precomp folder")
    butd.add_argument("--split", default="train", help="the split written (and read from --captions)")
    butd.add_argument("--captions", type=Path, help="raw-image source whose split gives the captions and order")
    butd.add_argument(
        "--regions", type=positive_int, help="keep the first R boxes of each image (when the counts vary)"
    )
    butd.add_argument("--quiet", action="store_true", help="no progress bars")

    parse = commands.add_parser("parse", help="dependency arcs of captions ({split}_caps.json)")
    parse.add_argument("data", type=Path, help="precomp folder or raw-image source")
    parse.add_argument("--split", nargs="+", help="default: every split of the data")
    parse.add_argument("--corenlp", type=Path, help="CoreNLP JSON output of one split's captions, instead of spaCy")
    parse.add_argument("--force", action="store_true", help="parse again when the split already has its file")

    commands.add_parser("models", help="list the presets")


MEMORY_HELP = "working memory of a chunk of encodings, in MB (default 256)"


def _add_first_stage_options(parser) -> None:
    """--first-stage-index and its parameters (itmatch.service.first_stage)."""
    group = parser.add_argument_group("first stage (changing it rebuilds it from the stored vectors)")
    group.add_argument("--first-stage-index", choices=["flat", "ivf", "hnsw"], help="default: flat (exact)")
    for name, default, what in [
        ("nlist", 1024, "IVF clusters"),
        ("nprobe", 16, "IVF clusters searched"),
        ("hnsw-m", 32, "HNSW links per node"),
        ("ef-construction", 80, "HNSW build breadth"),
        ("ef-search", 64, "HNSW search breadth"),
        ("train-sample", 65536, "vectors IVF's k-means trains on"),
    ]:
        group.add_argument(f"--{name}", type=positive_int, default=default, help=f"{what} (default {default})")
    group.add_argument("--ivf-codes", default="Flat", help="IVF vectors: Flat, SQ8 or PQm (default Flat)")


def _add_search_commands(commands) -> None:
    """The subcommands index, search and serve."""
    index = commands.add_parser("index", help="index a split's images for search (adds the ones not indexed yet)")
    index.add_argument("checkpoint", type=Path, nargs="?", help="the model (not needed with --remove alone)")
    index.add_argument(
        "--data",
        type=Path,
        help="precomp folder, photos with captions (captions.csv, a .csv, a dataset_*.json) or a folder of photos",
    )
    index.add_argument("--out", required=True, type=Path, help="index folder (created, or extended)")
    index.add_argument("--split", help="default: test, or the data's only split (a folder of photos: all)")
    index.add_argument("--weights", type=Path, help=WEIGHTS_HELP)
    index.add_argument("--batch-size", type=positive_int, default=128)
    index.add_argument("--storage", choices=["float16", "float32"], help="encodings on disk (new index; float16)")
    index.add_argument("--memory-mb", type=positive_int, default=256, help=MEMORY_HELP)
    index.add_argument("--remove", metavar="IDS", help="comma-separated image ids (or @FILE, one a line) to remove")
    _add_first_stage_options(index)
    index.add_argument("--quiet", action="store_true", help="no progress bars")

    search = commands.add_parser("search", help="search an index by text, or by one of its images")
    search.add_argument("index", type=Path, help="index folder (see `itmatch index`)")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("text", nargs="?", help="a sentence: the images that match it best")
    query.add_argument(
        "--image",
        metavar="N|PHOTO",
        help="an indexed image's number, or a photo file: the indexed captions that match it best",
    )
    search.add_argument("--weights", type=Path, help=WEIGHTS_HELP)
    search.add_argument("-k", type=positive_int, default=10, help="number of results")
    search.add_argument("--rerank-k", type=positive_int, metavar="K", help="score only the faiss first stage's top K")
    search.add_argument("--json", action="store_true", help="print the results as JSON")
    search.add_argument("--memory-mb", type=positive_int, default=256, help=MEMORY_HELP)

    serve = commands.add_parser("serve", help="the search web page and JSON API of an index")
    serve.add_argument("index", type=Path)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=port, default=8000)
    serve.add_argument("--rerank-k", type=positive_int, metavar="K", help="default for searches: score the top K only")
    serve.add_argument("--memory-mb", type=positive_int, default=256, help=MEMORY_HELP)
    serve.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests whose Host header is NAME (e.g. the machine's DNS name behind --host 0.0.0.0)",
    )


WEIGHTS_HELP = (
    "for a model trained on `itmatch extract` features: the extraction's backbone weights file, "
    "when it is no longer where the checkpoint records it"
)


def run_train(args) -> None:
    from itmatch.config import build_run_config, parse_overrides
    from itmatch.training import train

    flags = {"epochs": args.epochs, "batch_size": args.batch_size}
    overrides = parse_overrides(
        args.set + [f"train.{key}={value}" for key, value in flags.items() if value is not None]
    )
    config = build_run_config(args.model, overrides)
    state = train(
        config,
        args.data,
        args.out,
        resume=args.resume,
        vocab_path=args.vocab,
        overrides=overrides,
        progress=not args.quiet,
    )
    if rank() == 0:
        print(f"best dev rSum {state.best_rsum:.1f} at epoch {state.best_epoch}; checkpoints in {args.out}")


def run_evaluate(args) -> None:
    from itmatch.checkpoint import load_checkpoint
    from itmatch.data.sources import open_split
    from itmatch.distributed import join_process_group
    from itmatch.evaluation.metrics import format_results

    process = join_process_group()  # under torchrun, every process scores a share of the pairs
    args.quiet = args.quiet or not process.main
    if args.json is not None and args.json.is_dir():
        raise ItmatchError(f"--json {args.json}: is a folder; name the file to write")
    posthoc = PostHoc(args.fuse, args.inverted_softmax, args.csls, args.reciprocal)
    posthoc.check_models(len(args.checkpoints))
    models = [load_checkpoint(path) for path in args.checkpoints]
    first_stage = load_checkpoint(args.first_stage) if args.first_stage else None
    split = open_split(args.data, args.split, progress=not args.quiet)
    report_skipped(split)
    try:
        result = _evaluate(args, models, split, first_stage)
    except InputError as error:  # the data does not fit a model: name the files
        files = [*args.checkpoints, *([args.first_stage] if first_stage else [])]
        where = getattr(split, "features_path", args.data)
        raise InputError(f"{', '.join(str(path) for path in files)} on {where}: {error}") from None
    result["checkpoints"] = [str(path) for path in args.checkpoints]
    name = " + ".join(model.run_config.preset for model in models)
    if args.transductive:
        name += " (transductive)"
    if posthoc.active:
        name += f" ({posthoc.describe()})"
    if args.rerank_k:
        share = f"top {args.rerank_k}" if args.candidates == "top-k" else f"{args.rerank_k} per query by margin"
        name += f" ({share} of {first_stage.run_config.preset if first_stage else 'its embeddings'})"
    sizes = f"{result['n_images']} images, {result['n_captions']} captions, {result['pairs_scored']:,} pairs scored"
    sizes += f" in {result['precision']}"
    if not process.main:
        return
    if process.world_size > 1:
        sizes += f" by {process.world_size} processes"
    print(format_results({name: result}, title=f"{args.data} {args.split} ({args.protocol}: {sizes})"))
    if args.json:
        text = (json.dumps(result, indent=2) + "\n").encode()
        atomic_write(args.json, lambda file: file.write(text))


def _evaluate(args, models, split, first_stage) -> dict:
    from itmatch.distributed import world_size
    from itmatch.evaluation.runner import evaluate_split
    from itmatch.scoring import ScoringOptions

    scoring = ScoringOptions(
        args.memory_budget, args.precision, args.compile, progress=not args.quiet, across_processes=world_size() > 1
    )
    return evaluate_split(
        models,
        split,
        args.protocol,
        args.batch_size,
        args.workers,
        not args.quiet,
        args.inverted_softmax,
        scoring=scoring,
        rerank_k=args.rerank_k,
        first_stage=first_stage,
        candidates=args.candidates,
        csls=args.csls,
        reciprocal=args.reciprocal,
        fuse=args.fuse,
        transductive=args.transductive,
    )


def run_convert(args) -> None:
    from itmatch.convert import converter

    model = converter(args.source)(args.checkpoint, args.out, args.vocab)
    print(f"wrote {args.out} ({model.run_config.preset}, {sum(p.numel() for p in model.parameters()):,} parameters)")


def run_build_vocab(args) -> None:
    from itmatch.data.vocab import build_vocab_for_dir

    vocab = build_vocab_for_dir(args.data, args.threshold)
    out = args.out or args.data / "vocab.json"
    vocab.save(out)
    print(f"wrote {out}: {len(vocab)} words (count >= {args.threshold} in train + dev)")


def run_make_synthetic(args) -> None:
    from itmatch.data.synthetic import SyntheticSpec, make_synthetic

    if args.out.is_dir() and any(args.out.iterdir()):
        raise ItmatchError(f"{args.out}: not empty; make-synthetic writes only into a new or empty folder")
    splits = {name: count for name in ("train", "dev", "test") if (count := getattr(args, name)) > 0}
    spec = SyntheticSpec(n_regions=args.regions, feature_dim=args.feature_dim)
    make_synthetic(args.out, splits, seed=args.seed, spec=spec)
    print(f"wrote {', '.join(f'{n} {s}' for s, n in splits.items())} images to {args.out}")


def report_skipped(split) -> None:
    """Prints on stderr what a raw-image split left out (at most MAX_SKIPS_SHOWN lines of it)."""
    from itmatch.data.raw import skip_summary

    if getattr(split, "skipped", None):
        print(skip_summary(split), file=sys.stderr)
        for skipped in split.skipped[:MAX_SKIPS_SHOWN]:
            print(f"  {skipped.item}: {skipped.reason}", file=sys.stderr)


def run_extract(args) -> None:
    from itmatch.extract import extract

    counts = extract(
        args.images,
        args.out,
        args.backbone,
        args.weights,
        args.split,
        args.batch_size,
        args.image_size,
        args.workers,
        progress=not args.quiet,
    )
    print(f"{args.out}: extracted {', '.join(f'{n:,} {s}' for s, n in counts.items()) or 'nothing new'}")


def run_import_butd(args) -> None:
    from itmatch.data.butd import import_butd
    from itmatch.data.raw import RawSource

    captions = None
    if args.captions is not None:
        captions = RawSource(args.captions).open(args.split, verify_images=False)
        report_skipped(captions)
    import_butd(args.tsv, args.out, args.split, captions, args.regions, progress=not args.quiet)


def run_parse(args) -> None:
    from itmatch.data import dependencies
    from itmatch.data.sources import split_captions, split_names

    splits = args.split or split_names(args.data)
    if args.corenlp is not None and len(splits) != 1:
        raise ItmatchError(f"--corenlp {args.corenlp} holds one split's captions: choose it with --split")
    folder = args.data if args.data.is_dir() else args.data.parent
    parser = None
    for split in splits:
        captions = split_captions(args.data, split)
        existing = dependencies.find_dependency_file(folder, split)
        if existing is not None and not args.force:
            dependencies.read_dependency_file(existing, len(captions))  # checks it
            print(f"{existing}: arcs of {len(captions):,} captions, kept (--force parses again)")
            continue
        if parser is None:
            parser = dependencies.CoreNLPOutput(args.corenlp) if args.corenlp else dependencies.SpacyParser()
        parsed = dependencies.parse_captions(captions, parser)
        path = dependencies.write_dependency_file(folder, split, parsed.arcs)
        print(f"wrote {path}: arcs of {len(captions):,} captions, {len(parsed.fallbacks)} given the chain graph")
        for index, reason in parsed.fallbacks[:MAX_SKIPS_SHOWN]:
            print(f"  caption {index} ({reason}): {captions[index]!r}", file=sys.stderr)


def run_models(args) -> None:
    from itmatch.config import load_preset, preset_names

    for name in preset_names():
        preset = load_preset(name)
        print(f"{name:20s} {preset['architecture']:8s} {preset.get('description', '')}")


def run_index(args) -> None:
    from itmatch.service.index import IndexSettings, build_index, edit_index

    spec = _first_stage_spec(args)
    if args.data is None:
        if args.remove is None and spec is None:
            raise InputError("give --data (and a checkpoint) to add images, --remove IDS or --first-stage-index")
        index, removed = edit_index(args.out, _ids_to_remove(args.remove), spec)
        print(f"{args.out}: first stage {index.spec.kind}, {index.n_images:,} images")
        if args.remove is not None:
            print(f"removed {removed:,} images ({len(index.removed):,} of {index.n_images:,} removed)")
        return
    if args.checkpoint is None:
        raise InputError("index --data: give the checkpoint to encode the images with")
    settings = IndexSettings(args.batch_size, not args.quiet, args.storage, spec, args.memory_mb)
    index, added = build_index(args.checkpoint, args.data, args.split, args.out, settings, weights=args.weights)
    split = index.sources[-1]["split"] if index.sources else args.split
    print(f"added {added:,} images of {args.data} {split} to {args.out} (now {index.n_images:,} images)")
    if args.remove is not None:
        index, removed = edit_index(args.out, _ids_to_remove(args.remove))
        print(f"removed {removed:,} images from {args.out}")
    print(f"search it with: itmatch serve {args.out}   (then open http://127.0.0.1:8000/)")


def _first_stage_spec(args):
    from itmatch.service.first_stage import FirstStageSpec

    if args.first_stage_index is None:
        return None
    names = ("nlist", "nprobe", "hnsw_m", "ef_construction", "ef_search", "train_sample")
    values = {name: getattr(args, name) for name in names}
    return FirstStageSpec(kind=args.first_stage_index, codes=args.ivf_codes, **values)


def _ids_to_remove(value: str | None) -> list[str] | None:
    """--remove: comma-separated ids, or @FILE with one id a line."""
    if value is None:
        return None
    if value.startswith("@"):
        path = Path(value[1:])
        if not path.is_file():
            raise InputError(f"--remove {value}: no such file")
        ids = path.read_text(encoding="utf-8").splitlines()
    else:
        ids = value.split(",")
    ids = [image_id.strip() for image_id in ids if image_id.strip()]
    if not ids:
        raise InputError(f"--remove {value!r}: no image ids")
    return ids


def run_search(args) -> None:
    from itmatch.service.index import SearchIndex
    from itmatch.service.search import search_by_image, search_by_photo, search_by_text

    image = None if args.image is None else _image_query(args.image)
    index = SearchIndex.open(args.index, memory_mb=args.memory_mb)
    if image is None:
        found = search_by_text(index, args.text, args.k, args.rerank_k)
        title = f'top {len(found["results"])} of {index.n_images:,} images for "{args.text}"'
        lines = [f"{r['rank']:3d}. score {r['score']:.4f}  image {r['image']:5d}  {r['id']}" for r in found["results"]]
    else:
        if isinstance(image, Path):
            found, what = search_by_photo(index, image, args.k, args.rerank_k, args.weights), str(image)
        else:
            found = search_by_image(index, image, args.k, args.rerank_k)
            what = f"image {image} ({found['id']})"
        title = f"top {len(found['results'])} captions for {what}"
        lines = [
            f"{r['rank']:3d}. score {r['score']:.4f}  image {r['image']:5d}  {r['text']}" for r in found["results"]
        ]
    print(json.dumps(found, indent=2) if args.json else "\n".join([title, *lines]))


def _image_query(value: str) -> int | Path:
    """--image: a photo file, else the number of an indexed image."""
    if Path(value).is_file():
        return Path(value)
    if value.isdigit():
        return int(value)
    raise InputError(f"--image {value}: neither a photo file nor the number of an indexed image")


def run_serve(args) -> None:
    from itmatch.service.app import serve

    serve(args.index, args.host, args.port, args.rerank_k, args.allow_host, args.memory_mb)


COMMANDS = {
    "train": run_train,
    "evaluate": run_evaluate,
    "convert": run_convert,
    "build-vocab": run_build_vocab,
    "make-synthetic": run_make_synthetic,
    "extract": run_extract,
    "import-butd": run_import_butd,
    "parse": run_parse,
    "models": run_models,
    "index": run_index,
    "search": run_search,
    "serve": run_serve,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
        leave_process_group()  # under torchrun (train, evaluate): wait for the others
    except ItmatchError as error:
        print(f"itmatch {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a file the command writes or reads outside the checked paths
        where = f"{error.filename}: " if error.filename else ""
        print(f"itmatch {args.command}: error: {where}{error.strerror or error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = f"; continue with: itmatch train ... --out {args.out} --resume" if args.command == "train" else ""
        print(f"itmatch {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
