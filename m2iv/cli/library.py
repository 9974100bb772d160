"""``m2iv library ...``: the VLibrary command line.

    m2iv library add vectors.safetensors --name vqa --tag vqa --task vqa --embedding emb.npy
    m2iv library list [--tag T] [--task T] [--model-type T] [--compatible-with REF] [--latest]
    m2iv library show vqa[:VERSION]
    m2iv library search (--embedding emb.npy | --like REF) [-k 5] [--compatible-with REF]
    m2iv library compose vqa=1.0 safety:2=0.5 (-o out.safetensors | --name NAME)
    m2iv library rm vqa:2 | m2iv library rm vqa --all
    m2iv library verify [--repair] | m2iv library verify --rebuild-index [--force]
    m2iv library export vqa out.gguf [--model HF_DIR]      (or out.safetensors: the M2IV file)
    m2iv library import cv.gguf --name NAME (--model HF_DIR | --like REF |
                                             --num-heads H --head-dim Dh)

Every command takes ``--root DIR`` (default ``$M2IV_LIBRARY`` or ``~/.local/share/m2iv/library``),
``--timeout SECONDS`` (waiting for another process's write lock) and ``--json``
(machine-readable output on stdout; an error is ``{"error", "type"}``). Exit status: 0 success,
1 failure (and ``verify`` found problems it did not repair), 2 usage error. Errors are one line
(:mod:`m2iv.cli.errors`).

``m2iv library --help`` imports no torch: the package is imported when a command runs.
(Over 500 lines on purpose: nine thin subcommands and their parsers, each a few lines over
:class:`~m2iv.VLibrary`; split further they would only scatter the one command's help.)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from typing import Any

from .errors import UsageError
from .args import existing_file, finite_float, non_negative_int, output_file, positive_float, \
    positive_int

__all__ = ["add_parsers"]


def format_layers(layers) -> str:
    from ..vectors import format_layers as fmt  # torch: imported when a command runs

    return fmt(layers)


# ---------------------------------------------------------------------------- output helpers


def _console():
    try:
        from rich.console import Console
    except ImportError:
        return None
    width = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "140"))
    return Console(width=width, soft_wrap=False, highlight=False)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False, default=str))


def _table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    console = _console()
    if console is not None:
        from rich.table import Table

        table = Table(title=title, show_lines=False)
        for c in columns:
            table.add_column(c, overflow="fold")
        for r in rows:
            table.add_row(*["" if x is None else str(x) for x in r])
        console.print(table)
        return
    cells = [columns] + [["" if x is None else str(x) for x in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    if title:
        print(title)
    for j, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if j == 0:
            print("  ".join("-" * w for w in widths))


def _entry_row(e) -> list[Any]:
    return [e.ref, e.model_type or "?", f"{e.hidden_size}/{e.num_heads}x{e.head_dim}",
            f"{format_layers(e.layers)} of {e.num_layers or '?'}", e.task or "",
            ",".join(e.tags), e.shots if e.shots is not None else "",
            e.embedding_dim or "", e.created.replace("+00:00", "Z")]


_ENTRY_COLUMNS = ["ref", "model", "D/HxDh", "layers", "task", "tags", "shots", "emb", "created"]


def _notes(notes: list[str]) -> None:
    """Each note as a warning: the command prints it as one line, spelt with its flags."""
    from ..errors import M2IVWarning

    for n in notes:
        warnings.warn(n, M2IVWarning, stacklevel=2)


# ---------------------------------------------------------------------------- inputs


def _library(args, create: bool = True):
    from ..library import VLibrary

    return VLibrary(args.root, create=create, timeout=args.timeout)


def _read_embedding(path: str):
    """A 1-D embedding from .npy (no pickles), .json, .safetensors or whitespace text; an
    unreadable file is one error naming it."""
    try:
        return _parse_embedding(path)
    except (ValueError, KeyError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--embedding {path}: cannot read an embedding from it "
                         f"({' '.join(str(err).split())}); give a 1-D vector as .npy, .json "
                         "(a list of numbers), .safetensors or whitespace-separated text") \
            from None


def _parse_embedding(path: str):
    import numpy as np

    low = path.lower()
    if low.endswith(".npy"):
        return np.load(path, allow_pickle=False)
    if low.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            return np.asarray(json.load(f), dtype=np.float32)
    if low.endswith(".safetensors"):
        from safetensors.numpy import load_file

        tensors = load_file(path)
        if "embedding" in tensors:
            return tensors["embedding"]
        if len(tensors) == 1:
            return next(iter(tensors.values()))
        raise ValueError(f"{path}: holds {sorted(tensors)}; name the tensor 'embedding'")
    with open(path, encoding="utf-8") as f:
        return np.asarray(f.read().split(), dtype=np.float32)


def _read_json_arg(value: str | None, what: str):
    if value is None:
        return None
    text = value
    if value.startswith("@"):
        with open(value[1:], encoding="utf-8") as f:
            text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} is not valid JSON: {err}") from None


def _load_hf(path: str, weights: bool):
    """A local Hugging Face checkpoint: the model (``weights=True``) or just its config, as an
    object with ``.config``. Never downloads (``local_files_only``)."""
    import transformers

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model {path!r}: not a local model directory")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if not weights:
        class _ConfigOnly:
            pass

        holder = _ConfigOnly()
        holder.config = config
        return holder
    errors = []
    for cls_name in ("AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModel"):
        cls = getattr(transformers, cls_name, None)
        if cls is None:
            continue
        try:
            with _quiet_transformers():
                return cls.from_pretrained(path, local_files_only=True, use_safetensors=True)
        except (ValueError, KeyError, OSError) as err:
            errors.append(f"{cls_name}: {err}")
    raise ValueError(f"cannot load a model from {path}: " + "; ".join(errors))


@contextlib.contextmanager
def _quiet_transformers():
    """No weight-loading progress bar and no info logging from transformers: the command
    prints its own one-line result."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------------------- commands


def _cmd_add(args) -> int:
    lib = _library(args)
    emb = _read_embedding(args.embedding) if args.embedding else None
    metrics = _read_json_arg(args.metrics, "--metrics")
    e = lib.add_file(args.file, args.name, tags=args.tag, task=args.task,
                     description=args.description, shots=args.shots, pool_size=args.pool_size,
                     metrics=metrics, embedding=emb, model_name=args.model_name)
    if args.json:
        _print_json(e.to_dict())
    else:
        print(f"added {e.ref} ({e.file}, sha256 {e.sha256[:16]}...)")
    return 0


def _cmd_list(args) -> int:
    lib = _library(args, create=False)  # a mistyped --root is an error, not a new library
    target = lib.entry(args.compatible_with) if args.compatible_with else None
    entries = lib.list(name=args.name, model_type=args.model_type, hidden_size=args.hidden_size,
                       tags=args.tag, task=args.task, latest_only=args.latest,
                       compatible_with=target)
    if args.json:
        _print_json([e.to_dict() for e in entries])
    else:
        _table(f"{lib.root}: {len(entries)} entries", _ENTRY_COLUMNS,
               [_entry_row(e) for e in entries])
    return 0


def _cmd_show(args) -> int:
    lib = _library(args, create=False)
    e = lib.entry(args.ref)
    if args.json:
        d = e.to_dict(embedding=args.embedding)
        d["path"] = lib.path_of(e.ref)
        _print_json(d)
        return 0
    d = e.to_dict()
    rows = [[k, json.dumps(d[k]) if isinstance(d[k], (dict, list)) else d[k]]
            for k in ("ref", "task", "description", "tags", "model_type", "model_types",
                      "model_name", "hidden_size", "num_heads", "head_dim", "num_layers",
                      "layers", "n_bank", "shots", "pool_size", "metrics", "extra",
                      "embedding_dim", "created", "sha256", "size", "file")]
    rows.append(["path", lib.path_of(e.ref)])
    _table(e.ref, ["field", "value"], rows)
    return 0


def _cmd_search(args) -> int:
    lib = _library(args, create=False)
    if bool(args.embedding) == bool(args.like):
        raise ValueError("give exactly one of --embedding FILE or --like REF")
    if args.like:
        src = lib.entry(args.like)
        if src.embedding is None:
            raise ValueError(f"{src.ref} has no task embedding")
        query, target = src.embedding, lib.entry(args.compatible_with) if args.compatible_with \
            else src
    else:
        query = _read_embedding(args.embedding)
        target = lib.entry(args.compatible_with) if args.compatible_with else None
    hits = lib.search(query, args.k, compatible_with=target,
                      allow_incompatible=args.allow_incompatible, tags=args.tag, task=args.task,
                      latest_only=not args.all_versions)
    if args.json:
        _print_json([h.to_dict() for h in hits])
    else:
        _table(f"top {args.k} by cosine similarity", ["score"] + _ENTRY_COLUMNS,
               [[f"{h.score:+.4f}"] + _entry_row(h.entry) for h in hits])
    return 0


def _parse_weight(item: str) -> tuple[str, float]:
    ref, sep, w = item.rpartition("=")
    if not sep:
        return item, 1.0
    try:
        return ref, float(w)
    except ValueError:
        raise ValueError(f"bad weight in {item!r}: expected REF=NUMBER") from None


def _cmd_compose(args) -> int:
    if not args.output and not args.name:
        raise ValueError("say where the result goes: -o FILE.safetensors and/or --name NAME")
    lib = _library(args, create=False)
    weights = [_parse_weight(i) for i in args.items]
    v = lib.compose(weights, allow_incompatible=args.allow_incompatible)
    out: dict[str, Any] = {"components": v.meta["components"],
                           "description": v.meta["description"]}
    if args.output:
        v.save(args.output)
        out["output"] = os.path.abspath(args.output)
    if args.name:
        e = lib.add(v, args.name, tags=args.tag, task=args.task,
                    description=v.meta["description"])
        out["entry"] = e.to_dict()
    if args.json:
        _print_json(out)
    else:
        print(out["description"])
        if args.output:
            print(f"wrote {out['output']}")
        if args.name:
            print(f"added {out['entry']['ref']}")
    return 0


def _cmd_rm(args) -> int:
    lib = _library(args, create=False)
    gone = lib.remove(args.ref, all_versions=args.all_versions)
    if args.json:
        _print_json([e.to_dict() for e in gone])
    else:
        for e in gone:
            print(f"removed {e.ref}")
    return 0


def _cmd_verify(args) -> int:
    if args.rebuild_index:
        from ..library import VLibrary

        if args.repair:
            raise UsageError("--rebuild-index and --repair are separate steps: rebuild the "
                             "index first, then verify --repair")
        rep = VLibrary.rebuild_index(args.root, force=args.force, timeout=args.timeout)
        if args.json:
            _print_json(rep.to_dict())
        else:
            print(rep)
        return 0
    if args.force:
        raise UsageError("--force goes with --rebuild-index")
    lib = _library(args, create=False)
    rep = lib.verify(repair=args.repair)
    if args.json:
        _print_json(rep.to_dict())
    else:
        print(rep)
    return 0 if rep.healthy else 1


def _cmd_export(args) -> int:
    lib = _library(args, create=False)
    out = args.output
    if out.lower().endswith(".safetensors"):
        v = lib.get(args.ref)
        v.meta.pop("library", None)
        v.save(out)
        report = {"path": os.path.abspath(out), "format": "m2iv-safetensors",
                  "ref": lib.entry(args.ref).ref, "notes": []}
    elif out.lower().endswith(".gguf"):
        model = _load_hf(args.model, weights=True) if args.model else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the notes are printed below
            report = lib.export_gguf(args.ref, out, model=model, model_hint=args.model_hint,
                                     index=args.index, include_mha=not args.no_mha,
                                     strength=args.strength,
                                     keep_layer_zero=args.keep_layer_zero,
                                     allow_incompatible=args.allow_incompatible, warn=False)
        report["format"] = "gguf-controlvector"
        report["ref"] = lib.entry(args.ref).ref
    else:
        raise ValueError(f"{out}: export writes .gguf (llama.cpp/repeng control vector) or "
                         ".safetensors (the M2IV file)")
    if args.json:
        _print_json(report)
    else:
        _notes(report["notes"])
        layers = f", layers {format_layers(report['layers'])}" if report.get("layers") else ""
        print(f"exported {report['ref']} to {report['path']} ({report['format']}{layers})")
    return 0


def _cmd_import(args) -> int:
    lib = _library(args)
    if not args.file.lower().endswith(".gguf"):
        raise ValueError(f"{args.file}: import reads GGUF control vectors; add M2IV "
                         "safetensors files with `m2iv library add`")
    if args.model and args.like:
        raise ValueError("give at most one of --model and --like")
    model = None
    if args.model:
        model = _load_hf(args.model, weights=False)
    elif args.like:
        import dataclasses

        model = dataclasses.replace(lib.entry(args.like).model_spec(), layers=None)
    e = lib.import_gguf(args.file, args.name, model=model, num_heads=args.num_heads,
                        head_dim=args.head_dim, num_layers=args.num_layers,
                        model_type=args.model_type, tags=args.tag, task=args.task,
                        description=args.description)
    if args.json:
        _print_json(e.to_dict())
    else:
        print(f"imported {args.file} as {e.ref} (MLP-branch vectors, gate 1, layers "
              f"{format_layers(e.layers)})")
    return 0


# ---------------------------------------------------------------------------- wiring


def add_parsers(subparsers) -> argparse.ArgumentParser:
    """Register ``library`` (with its sub-commands) on an argparse ``subparsers`` object; every
    sub-command sets ``args.func`` (returning the exit status)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", "-L", default=None, metavar="DIR",
                        help="library directory (default: $M2IV_LIBRARY or "
                        "~/.local/share/m2iv/library)")
    common.add_argument("--timeout", type=positive_float, default=60.0, metavar="SECONDS",
                        help="how long to wait for another process's write lock (default: 60)")
    common.add_argument("--json", action="store_true", help="machine-readable JSON output")

    p = subparsers.add_parser("library", help="store, find, compose and export trained vectors",
                              description="VLibrary: a durable local store of trained M2IV "
                              "vectors (SQLite index + safetensors files).")
    sub = p.add_subparsers(dest="library_command", metavar="COMMAND")
    sub.required = True

    def cmd(name, fn, help_, **kw):
        sp = sub.add_parser(name, parents=[common], help=help_, description=help_, **kw)
        sp.set_defaults(func=fn)
        return sp

    def describe(sp):
        sp.add_argument("--tag", action="append", default=None, metavar="TAG",
                        help="tag (repeatable)")
        sp.add_argument("--task", default=None)
        sp.add_argument("--description", default=None)

    sp = cmd("add", _cmd_add, "add an M2IV safetensors file as the next version of NAME")
    sp.add_argument("file", type=existing_file)
    sp.add_argument("--name", "-n", required=True)
    describe(sp)
    sp.add_argument("--shots", type=non_negative_int)
    sp.add_argument("--pool-size", type=non_negative_int)
    sp.add_argument("--metrics", help="training metrics: JSON text or @file.json")
    sp.add_argument("--embedding", metavar="FILE",
                    help="task embedding (.npy, .json, .safetensors or text)")
    sp.add_argument("--model-name", help="the model's name or path")

    sp = cmd("list", _cmd_list, "list entries (filters combine)")
    sp.add_argument("--name")
    sp.add_argument("--model-type")
    sp.add_argument("--hidden-size", type=positive_int)
    sp.add_argument("--tag", action="append", default=None, help="carries this tag (repeatable)")
    sp.add_argument("--task")
    sp.add_argument("--compatible-with", metavar="REF",
                    help="only entries that can be combined with this entry")
    sp.add_argument("--latest", action="store_true", help="newest version of each name only")

    sp = cmd("show", _cmd_show, "show one entry (REF = NAME or NAME:VERSION)")
    sp.add_argument("ref")
    sp.add_argument("--embedding", action="store_true", help="include the embedding (--json)")

    sp = cmd("search", _cmd_search, "rank entries by cosine similarity of task embeddings")
    sp.add_argument("--embedding", metavar="FILE", help="query embedding file")
    sp.add_argument("--like", metavar="REF", help="use this entry's embedding as the query")
    sp.add_argument("-k", type=positive_int, default=5, help="how many entries (default: 5)")
    sp.add_argument("--compatible-with", metavar="REF",
                    help="only entries that can be combined with this entry (default with "
                    "--like: that entry)")
    sp.add_argument("--allow-incompatible", action="store_true",
                    help="rank entries made for any model")
    sp.add_argument("--tag", action="append", default=None)
    sp.add_argument("--task")
    sp.add_argument("--all-versions", action="store_true", help="rank every version")

    sp = cmd("compose", _cmd_compose, "weighted sum of entries: REF=WEIGHT ...")
    sp.add_argument("items", nargs="+", metavar="REF=WEIGHT")
    sp.add_argument("-o", "--output", type=output_file(".safetensors"),
                    help="write the result to this .safetensors file")
    sp.add_argument("--name", help="add the result to the library under this name")
    sp.add_argument("--tag", action="append", default=None)
    sp.add_argument("--task")
    sp.add_argument("--allow-incompatible", action="store_true")

    sp = cmd("rm", _cmd_rm, "remove NAME:VERSION (or every version with --all)")
    sp.add_argument("ref")
    sp.add_argument("--all", dest="all_versions", action="store_true",
                    help="remove every version of NAME")

    sp = cmd("verify", _cmd_verify, "recompute hashes; report missing/corrupt/orphaned files")
    sp.add_argument("--repair", action="store_true",
                    help="delete leftovers, quarantine corrupt/foreign files, drop broken rows")
    sp.add_argument("--rebuild-index", action="store_true",
                    help="rebuild a corrupt, truncated or lost index from the stored files (each "
                    "holds its entry's record; the old index goes to quarantine/). Run it while "
                    "no other process uses the library")
    sp.add_argument("--force", action="store_true",
                    help="with --rebuild-index: rebuild a healthy index too (edits made with "
                    "update() after adding are lost)")

    sp = cmd("export", _cmd_export, "export an entry as a GGUF control vector (.gguf) or an "
             "M2IV file (.safetensors)")
    sp.add_argument("ref")
    sp.add_argument("output", type=output_file(), help="a .gguf or .safetensors file")
    sp.add_argument("--model", metavar="HF_DIR",
                    help="local model directory: fold the MHA part through o_proj "
                    "(an approximation; see the notes printed)")
    sp.add_argument("--model-hint", help="controlvector.model_hint (default: the model type)")
    sp.add_argument("--index", type=non_negative_int, help="bank row to export")
    sp.add_argument("--no-mha", action="store_true", help="write the MLP part only")
    sp.add_argument("--strength", type=finite_float, default=1.0,
                    help="multiplies every direction (default: 1.0)")
    sp.add_argument("--keep-layer-zero", action="store_true",
                    help="write direction.0 (llama.cpp rejects it)")
    sp.add_argument("--allow-incompatible", action="store_true")

    sp = cmd("import", _cmd_import, "import a GGUF control vector as MLP-branch vectors")
    sp.add_argument("file", type=existing_file)
    sp.add_argument("--name", "-n", required=True)
    sp.add_argument("--model", metavar="HF_DIR", help="local model directory (config only)")
    sp.add_argument("--like", metavar="REF", help="take the model description from this entry")
    sp.add_argument("--num-heads", type=positive_int)
    sp.add_argument("--head-dim", type=positive_int)
    sp.add_argument("--num-layers", type=positive_int)
    sp.add_argument("--model-type")
    describe(sp)
    return p

