"""Documents from Hugging Face `datasets`: hub names and local files, one string per document, in a fixed order.

`data.dataset` is either a local path (a file, a folder, or a glob such as `data/*.jsonl`) or a hub name
(`owner/name`, with `data.config` and `data.split`). Local files go through the `datasets` builders too:

    .txt .text .md    "text" builder; one document per paragraph: text between blank or whitespace-only lines
    .jsonl .json      "json" builder; the document is the `data.text_field` of each record
    .parquet          "parquet" builder; the document is the `data.text_field` column of each row

For local data `data.val_split`, when set, is a second path or glob of validation files, none of them a training file.
`datasets` is imported only here, and only when such a dataset is used.
"""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path
from typing import Iterable, Iterator

from hybridctl.core.data import hub
from hybridctl.core.config import DataConfig
from hybridctl.core.errors import DataError

LOCAL_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
BATCH_ROWS = 1000
LOCAL_HINT = "or point data.dataset at local files (.txt, .jsonl, .parquet, a folder or a glob)"


def is_hub_name(spec: str) -> bool:
    """`owner/name`: two non-empty parts around one '/' (or one bare name, which the hub still serves for a few
    old datasets), without backslashes or glob characters."""
    parts = spec.split("/")
    return len(parts) <= 2 and all(parts) and "\\" not in spec and not glob.has_magic(spec)


def is_local(spec: str) -> bool:
    """Local when it exists, is a glob, or looks like a file path (`nofolder/`, `a/b/c`); anything else is a hub name."""
    return (
        Path(spec).expanduser().exists()
        or glob.has_magic(spec)
        or spec.startswith((".", "/", "~"))
        or Path(spec).suffix in LOCAL_BUILDERS
        or not is_hub_name(spec)
    )


def local_files(spec: str, key: str = "data.dataset") -> list[Path]:
    """The files a local spec names, sorted; a folder means every supported file below it."""
    path = Path(spec).expanduser()
    if glob.has_magic(spec):
        files = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
    elif path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_BUILDERS]
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"{key} '{spec}': no such file or folder; give a path to .txt, .jsonl or .parquet files or a glob like 'data/*.txt'")
    if not files:
        raise DataError(f"{key} '{spec}' matches no .txt, .jsonl or .parquet files; check the path or glob")
    return sorted(files)


def builder_for(files: list[Path], spec: str) -> str:
    kinds = {LOCAL_BUILDERS.get(p.suffix) for p in files}
    if None in kinds:
        odd = next(p for p in files if p.suffix not in LOCAL_BUILDERS)
        raise DataError(f"'{odd}' is not a supported file type; use .txt, .jsonl or .parquet files (narrow the glob '{spec}')")
    if len(kinds) > 1:
        raise DataError(f"'{spec}' mixes file types ({', '.join(sorted(kinds))}); use one kind of file per dataset")
    return kinds.pop()


def fingerprint(spec: str, key: str = "data.dataset") -> list:
    """What identifies local files for the token cache: path, size and modification time of each."""
    if not is_local(spec):
        return []
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in local_files(spec, key)]


def check_val_split(data_cfg: DataConfig) -> None:
    """Refuse a data.val_split that holds training documents: every val_ figure would be measured on them."""
    val, local = data_cfg.val_split, is_local(data_cfg.dataset)
    if not val:
        return
    unset = "or unset it to carve data.val_fraction out of the training documents"
    if val == data_cfg.split and not (local and is_local(val)):  # with local data a folder 'train' is files
        other = "validation files" if local else "another split (e.g. validation)"
        raise DataError(f"data.val_split '{val}' is the training split (data.split); point it at {other}, {unset}")
    if not local:
        return
    shared = sorted({p.resolve() for p in local_files(data_cfg.dataset)} & {p.resolve() for p in local_files(val, "data.val_split")})
    if shared:
        names = ", ".join(str(p) for p in shared[:3]) + (f" and {len(shared) - 3} more" if len(shared) > 3 else "")
        raise DataError(f"data.val_split '{val}' and data.dataset '{data_cfg.dataset}' share {names}; narrow data.dataset "
                        f"to the training files, point data.val_split at other files, {unset}")


def _import_datasets(for_hub: bool):
    # for a hub name: probe first, so offline mode is on before `datasets` reads it when the hub cannot be asked
    reason = hub.offline_reason() if for_hub else ""
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"the `datasets` package is needed for this dataset but cannot be imported ({hub.one_line(e)}); "
                        "`pip install datasets`, or use data.dataset=builtin:stdlib") from None
    datasets.disable_progress_bars()  # the CLI prints its own summary
    # and its own one-line errors: the builders also log a failed file's error, over several lines, before raising it
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    return datasets, reason


PARAGRAPH_BREAK = re.compile(r"\n\s*\n")  # a blank or whitespace-only line


def _paragraphs(chunks: Iterable[str]) -> Iterator[str]:
    """The "text" builder's paragraphs (cut at empty lines, never across files) cut again at whitespace-only lines."""
    for chunk in chunks:
        for piece in PARAGRAPH_BREAK.split(chunk):
            piece = piece.strip("\n")
            if piece.strip():
                yield piece


def _no_field(where: str, text_field: str, fields: list[str], fix: str) -> DataError:
    return DataError(f"{where} has no field '{text_field}' (its fields: {', '.join(fields) or 'none'}); {fix}")


def _rows(dataset, text_field: str, where: str, fix: str = "set data.text_field to one of them") -> Iterator[str]:
    for batch in dataset.iter(batch_size=BATCH_ROWS):
        if text_field not in batch:
            raise _no_field(where, text_field, list(batch), fix)
        for text in batch[text_field]:
            if isinstance(text, str):
                if text:
                    yield text
            elif text is not None:  # a record without the field is skipped like an empty one; a number is no document
                raise DataError(f"{where} has {type(text).__name__} values in field '{text_field}' (e.g. {text!r:.40}), "
                                "not strings; set data.text_field to a field of text, or write the values as strings")


def iter_local(spec: str, text_field: str, key: str = "data.dataset") -> Iterator[str]:
    files = local_files(spec, key)
    builder = builder_for(files, spec)
    datasets, _ = _import_datasets(for_hub=False)
    if builder != "text" and len(files) > 1:
        _check_every_file_has(files, builder, text_field, f"{key} '{spec}'")
    options = {"sample_by": "paragraph"} if builder == "text" else {}
    done = 0
    try:
        dataset = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train", streaming=True, **options)
        if builder == "text":
            yield from _paragraphs(_rows(dataset, "text", spec))
        else:
            for done, text in enumerate(_rows(dataset, text_field, spec), 1):
                yield text
    except DataError:
        raise
    except Exception as e:  # malformed JSON, unreadable parquet, undecodable text
        if not (isinstance(e, datasets.table.CastError) and len(files) > 1):
            raise DataError(f"cannot read {key} '{spec}': {_reason(e, datasets)}") from None
    else:
        return
    # `datasets` reads every file with the fields of the first one and refuses a file with other fields, so the
    # files are read one by one instead, in the same order, from the first document not yielded yet
    for path in files:
        for text in iter_file(datasets, builder, path, text_field, f"{key} '{spec}'"):
            if done:
                done -= 1
            else:
                yield text


PROBE_LINES, PROBE_BYTES = 1000, 1 << 20  # how far into a JSON Lines file _fields_seen looks for the text field


def _fields_seen(path: Path, builder: str, text_field: str) -> list[str] | None:
    """The fields of a parquet file; of a JSON Lines file, those of its first records, stopping at the first that
    has `text_field`. None where that cannot be told cheaply (a JSON array, malformed lines): the library decides."""
    if builder == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_schema(path).names
        except Exception:  # not parquet after all: the library's error names it
            return None
    fields: dict[str, None] = {}
    try:
        with open(path, encoding="utf-8") as f:
            read = 0
            for number, line in enumerate(f):
                read += len(line)
                if line.strip():
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        return None
                    if text_field in record:
                        return list(record)
                    fields.update(dict.fromkeys(record))
                if number >= PROBE_LINES or read >= PROBE_BYTES:
                    break
    except (OSError, ValueError):  # unreadable, undecodable or not JSON Lines
        return None
    return list(fields) if fields else None


def _check_every_file_has(files: list[Path], builder: str, text_field: str, where: str) -> None:
    """A file of a glob without the text field is refused here: read with the first file's fields (which the
    library does), one whose fields are a subset of them would give nulls, and its documents would be dropped
    without a word. Files with other fields still fail in the library, and are then read one by one."""
    for path in files:
        fields = _fields_seen(path, builder, text_field)
        if fields is not None and text_field not in fields:
            raise _no_field(_glob_file(path, where), text_field, fields, _glob_fix(text_field))


def _glob_file(path: Path, where: str) -> str:
    return f"{path}, one of the files of {where},"


def _glob_fix(text_field: str) -> str:
    return f"give every file a '{text_field}' field, set data.text_field to a field every file has, or pass one file"


def iter_file(datasets, builder: str, path: Path, text_field: str, where: str) -> Iterator[str]:
    """One file of a glob whose files have different fields (read one by one)."""
    try:
        dataset = datasets.load_dataset(builder, data_files=[str(path)], split="train", streaming=True)
        yield from _rows(dataset, text_field, _glob_file(path, where), _glob_fix(text_field))
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read {path}, one of the files of {where}: {_reason(e, datasets)}") from None


def _reason(error: Exception, datasets) -> str:
    """The library's message, except for its multi-line "Couldn't cast" one, which names no fix."""
    if isinstance(error, datasets.table.CastError):
        return (f"its records do not all have the same fields (some have {', '.join(error.table_column_names)}, the "
                f"first ones {', '.join(error.requested_column_names)}); give every record the same fields")
    return hub.one_line(error)


def iter_hub(data_cfg: DataConfig, split: str) -> Iterator[str]:
    name = data_cfg.dataset
    datasets, reason = _import_datasets(for_hub=True)
    label = f"dataset '{name}'" + (f" (config '{data_cfg.config}')" if data_cfg.config else "")
    try:
        dataset = datasets.load_dataset(name, data_cfg.config or None, split=split, streaming=data_cfg.streaming)
        yield from _rows(dataset, data_cfg.text_field, label)
    except DataError:
        raise
    except Exception as e:
        if reason and isinstance(e, OSError):  # ConnectionError, LocalEntryNotFoundError: not in the cache
            raise DataError(f"cannot load {label} from the Hugging Face hub: {reason} and it is not in the local cache; "
                            f"download it once where the hub is reachable, {LOCAL_HINT}") from None
        raise DataError(f"cannot load {label} split '{split}': {hub.one_line(e)}; check data.dataset, data.config and "
                        f"data.split, {LOCAL_HINT}") from None


def iter_documents(data_cfg: DataConfig, split: str | None = None) -> Iterator[str]:
    """Documents of the training split, or of `split` (data.val_split: a hub split, or local validation files)."""
    spec = data_cfg.dataset
    if is_local(spec):
        if split is None:
            yield from iter_local(spec, data_cfg.text_field)
        else:
            yield from iter_local(split, data_cfg.text_field, key="data.val_split")
        return
    yield from iter_hub(data_cfg, split or data_cfg.split)
