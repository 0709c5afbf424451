import errno
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import micro_config, run_cli
from hybridctl.core.data import token_cache
from hybridctl.core.data import tokenizer
from hybridctl.core.data import sources, subword, synthetic
from hybridctl.core.config import DataConfig, load_config, load_config_file
from hybridctl.core.data.corpora import builtin_documents, is_val_document, training_documents
from hybridctl.core.data.token_cache import load_token_data, token_cache_dir
from hybridctl.core.errors import DataError
from hybridctl.core.training.runs import RunDir
from hybridctl.core.training.evaluation import evaluate
from hybridctl.core.training.trainer import train

from test_train_resume import StopAfter, losses


def paragraphs_of(text: str) -> list[str]:
    """Real text for the corpora below: stdlib source cut at blank lines; short pieces and pieces with
    whitespace-only lines (paragraph breaks in a .txt file) dropped."""
    pieces = [p.strip("\n") for p in text.split("\n\n")]
    return [p for p in pieces if len(p) > 80 and all(line.strip() for line in p.splitlines())]


@pytest.fixture(scope="module")
def docs() -> list[str]:
    found = [p for text in itertools.islice(builtin_documents("stdlib"), 12) for p in paragraphs_of(text)]
    return found[:120]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, docs):
    """The same documents as .jsonl (two files), .parquet, and a .txt folder; paths by kind."""
    root = tmp_path_factory.mktemp("corpus")
    half = len(docs) // 2
    for name, part in (("a.jsonl", docs[:half]), ("b.jsonl", docs[half:])):
        with open(root / name, "w") as f:
            for d in part:
                f.write(json.dumps({"text": d, "source": "stdlib"}) + "\n")
    pq.write_table(pa.table({"body": docs, "n": list(range(len(docs)))}), root / "docs.parquet")
    (root / "txt").mkdir()
    (root / "txt" / "one.txt").write_text("\n\n".join(docs[:half]) + "\n")
    (root / "txt" / "two.txt").write_text("\n \n".join(docs[half:]) + "\n")  # whitespace-only separator lines
    return SimpleNamespace(root=root, jsonl=str(root / "*.jsonl"), parquet=str(root / "docs.parquet"), txt=str(root / "txt"))


def cfg_for(dataset: str, **kw) -> DataConfig:
    return DataConfig(dataset=dataset, **kw)


def split_at_eos(tokens: np.ndarray, eos: int) -> list[np.ndarray]:
    ends = np.flatnonzero(np.asarray(tokens) == eos)
    return [np.asarray(tokens[s:e]) for s, e in zip(np.r_[0, ends[:-1] + 1], ends)]


# ---------------------------------------------------------------------------------------------------------
# Local files through `datasets`


def test_local_jsonl_glob_parquet_and_txt_give_the_documents(corpus, docs):
    assert list(sources.iter_documents(cfg_for(corpus.jsonl))) == docs  # two files, in name order
    assert list(sources.iter_documents(cfg_for(corpus.parquet, text_field="body"))) == docs
    assert list(sources.iter_documents(cfg_for(corpus.txt))) == docs  # one document per paragraph


def test_txt_paragraphs_keep_their_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first line\nsecond line\n\n\n  \nnext one\n\t\nlast\n")
    assert list(sources.iter_documents(cfg_for(str(path)))) == ["first line\nsecond line", "next one", "last"]


@pytest.mark.parametrize("make,needle", [
    (lambda r: cfg_for(str(r / "*.jsonl"), text_field="body"), "no field 'body' (its fields: text, source)"),
    (lambda r: cfg_for(str(r / "missing.jsonl")), "no such file"),
    (lambda r: cfg_for(str(r / "*")), "mixes file types"),
    (lambda r: cfg_for(str(r / "*.csv")), "matches no .txt, .jsonl or .parquet"),
])
def test_bad_local_dataset_is_one_line(corpus, make, needle):
    with pytest.raises(DataError) as e:
        list(sources.iter_documents(make(corpus.root)))
    assert needle in str(e.value) and "\n" not in str(e.value)


def write_records(path, records):
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_glob_of_files_with_different_fields(tmp_path, suffix):
    # more than one batch of rows in the first file, so documents are handed out before the second file is opened
    first = [f"document {i} of the first file" for i in range(1200)]
    write_records(tmp_path / f"a{suffix}", [{"text": t} for t in first])
    write_records(tmp_path / f"b{suffix}", [{"text": "from the second file", "source": "web"}, {"text": "and more", "source": "web"}])
    glob = str(tmp_path / f"*{suffix}")
    assert list(sources.iter_documents(cfg_for(glob))) == first + ["from the second file", "and more"]

    write_records(tmp_path / f"c{suffix}", [{"body": "no text field here"}])
    with pytest.raises(DataError) as e:
        list(sources.iter_documents(cfg_for(glob)))
    message = str(e.value)
    assert f"c{suffix}, one of the files of data.dataset '{glob}', has no field 'text' (its fields: body)" in message
    assert "give every file a 'text' field, set data.text_field to a field every file has, or pass one file" in message
    assert "\n" not in message and "Couldn't cast" not in message
    result = run_cli("data", "prepare", "--preset", "tiny", "--set", f'data.dataset="{glob}"',
                     env={"HYBRIDCTL_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [f"error: {message}"]  # nothing the library logged on the way


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_glob_file_with_only_some_of_the_fields_is_named_not_dropped(tmp_path, suffix):
    """A later file whose fields are a subset of the first file's, without the text field: read with the first
    file's fields it would give nulls, and its documents would vanish without a word."""
    write_records(tmp_path / f"a{suffix}", [{"text": "first", "source": "web"}, {"text": "second", "source": "web"}])
    write_records(tmp_path / f"b{suffix}", [{"source": "books"}] * 3)
    glob = str(tmp_path / f"*{suffix}")
    with pytest.raises(DataError) as e:
        list(sources.iter_documents(cfg_for(glob)))
    assert f"b{suffix}, one of the files of data.dataset '{glob}', has no field 'text' (its fields: source)" in str(e.value)
    write_records(tmp_path / f"b{suffix}", [{"source": "books", "text": "third"}])
    assert list(sources.iter_documents(cfg_for(glob))) == ["first", "second", "third"]


def test_records_with_new_fields_inside_one_file_are_one_line(tmp_path):
    # the json builder takes its fields from the first 10 MB of the file and refuses a record with others later
    path = tmp_path / "d.jsonl"
    path.write_text((json.dumps({"text": "x" * 4000}) + "\n") * 2700 + json.dumps({"text": "y", "source": "web"}) + "\n")
    with pytest.raises(DataError) as e:
        list(sources.iter_documents(cfg_for(str(path))))
    assert "its records do not all have the same fields (some have text, source, the first ones text)" in str(e.value)
    assert "give every record the same fields" in str(e.value) and "\n" not in str(e.value)


def test_text_values_that_are_not_strings_are_refused(tmp_path):
    numbers = tmp_path / "numbers.jsonl"
    write_records(numbers, [{"text": i} for i in range(5)])
    with pytest.raises(DataError) as e:
        list(sources.iter_documents(cfg_for(str(numbers))))
    message = str(e.value)
    assert f"{numbers} has int values in field 'text' (e.g. 0), not strings" in message
    assert "set data.text_field to a field of text" in message and "\n" not in message
    # a record without a value is no document, as an empty one is
    gaps = tmp_path / "gaps.parquet"
    write_records(gaps, [{"text": "kept"}, {"text": None}, {"text": ""}, {"text": "also kept"}])
    assert list(sources.iter_documents(cfg_for(str(gaps)))) == ["kept", "also kept"]


def test_packing_splits_by_document_with_eos(corpus, docs):
    cfg = cfg_for(corpus.jsonl, val_fraction=0.2)
    data = load_token_data(cfg)
    eos = data.tokenizer.eos_id
    want_val = [d for i, d in enumerate(docs) if is_val_document(i, 0.2)]
    want_train = [d for i, d in enumerate(docs) if not is_val_document(i, 0.2)]
    assert want_val and want_train
    assert [bytes(d.astype(np.uint8)).decode() for d in split_at_eos(data.train, eos)] == want_train
    assert [bytes(d.astype(np.uint8)).decode() for d in split_at_eos(data.val, eos)] == want_val
    assert data.train[-1] == eos and data.info["train_documents"] == len(want_train)
    assert list(training_documents(cfg)) == want_train


def test_max_tokens_caps_train_and_val(corpus, docs):
    cfg = cfg_for(corpus.jsonl, max_tokens=5000, val_fraction=0.2)
    data = load_token_data(cfg)
    assert len(data.train) == 5000 and len(data.val) == 1250  # val is 20% of the total
    first = next(d for i, d in enumerate(docs) if not is_val_document(i, 0.2))
    assert bytes(np.asarray(data.train[: len(first)], dtype=np.uint8)).decode() == first


def test_local_val_split_is_a_second_glob(corpus, docs, tmp_path):
    val_file = tmp_path / "val.jsonl"
    val_file.write_text("".join(json.dumps({"text": d}) + "\n" for d in ["held out one", "held out two"]))
    data = load_token_data(cfg_for(corpus.jsonl, val_split=str(val_file)))
    assert data.info["train_documents"] == len(docs)  # nothing carved out of train when val has its own files
    assert [bytes(d.astype(np.uint8)).decode() for d in split_at_eos(data.val, 256)] == ["held out one", "held out two"]


def test_val_split_that_holds_training_files_is_refused(corpus):
    spelled_otherwise = str(corpus.root / "txt" / ".." / "a.jsonl")  # the same file as the glob's a.jsonl
    for val_split, shared in ((spelled_otherwise, str(corpus.root / "a.jsonl")),
                              (str(corpus.root), f"{corpus.root / 'a.jsonl'}, {corpus.root / 'b.jsonl'}")):
        with pytest.raises(DataError) as e:
            load_token_data(cfg_for(corpus.jsonl, val_split=val_split))
        message = str(e.value)
        assert f"data.val_split '{val_split}' and data.dataset '{corpus.jsonl}' share {shared};" in message
        assert "point data.val_split at other files" in message and "\n" not in message
    for dataset in (corpus.jsonl, "hybridctl-test/no-such-dataset"):  # refused before the hub is asked
        with pytest.raises(DataError, match=r"data.val_split 'train' is the training split \(data.split\)"):
            load_token_data(cfg_for(dataset, val_split="train"))


def test_bad_val_split_names_data_val_split(corpus):
    missing = str(corpus.root / "nope" / "*.jsonl")
    with pytest.raises(DataError) as e:
        load_token_data(cfg_for(corpus.jsonl, val_split=missing))
    assert str(e.value) == f"data.val_split '{missing}' matches no .txt, .jsonl or .parquet files; check the path or glob"
    with pytest.raises(DataError) as e:
        load_token_data(cfg_for("builtin:stdlib", val_split=str(corpus.root / "a.jsonl")))
    assert "data.val_split is for hub and local datasets" in str(e.value) and "unset data.val_split" in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# Cache


def test_second_load_reads_the_cache_and_tokenises_nothing(corpus, monkeypatch):
    cfg = cfg_for(corpus.parquet, text_field="body", tokenizer="bpe:300")
    fresh = load_token_data(cfg)
    assert not fresh.info["cached"] and (token_cache_dir(cfg) / "tokenizer.json").is_file()

    def forbidden(*a, **k):
        raise AssertionError("the cached load tokenised or read the corpus")

    for module, name in ((token_cache, "pack_documents"), (token_cache, "iter_documents"), (subword, "train_bpe"),
                         (sources, "iter_documents")):
        monkeypatch.setattr(module, name, forbidden)
    again = load_token_data(cfg)
    assert again.info["cached"] and again.info["seconds"] < 1.0
    assert np.array_equal(again.train, fresh.train) and np.array_equal(again.val, fresh.val)
    assert again.tokenizer.vocab_size == fresh.tokenizer.vocab_size == 300


def test_cache_cut_short_is_tokenised_again(corpus, capsys):
    cfg = cfg_for(corpus.jsonl, val_fraction=0.2, tokenizer="bpe:300")
    fresh = load_token_data(cfg)
    train, val = np.array(fresh.train), np.array(fresh.val)
    folder = token_cache_dir(cfg)
    assert "note:" not in capsys.readouterr().err  # a first build is no news
    for damage in (lambda: os.truncate(folder / "train.bin", 1000), lambda: (folder / "val.bin").unlink(),
                   lambda: (folder / "tokenizer.json").unlink()):
        damage()
        again = load_token_data(cfg)
        assert not again.info["cached"]  # like a cache folder without meta.json: rebuilt, not read
        assert np.array_equal(again.train, train) and np.array_equal(again.val, val)
        assert f"note: the token cache {folder} is incomplete" in capsys.readouterr().err
    assert load_token_data(cfg).info["cached"]
    assert capsys.readouterr().err == ""


def test_changed_local_file_is_tokenised_again(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "version one of the text"}) + "\n")
    cfg = cfg_for(str(path), val_fraction=0.0)
    assert bytes(np.asarray(load_token_data(cfg).train[:-1], dtype=np.uint8)).decode() == "version one of the text"
    time.sleep(0.01)
    path.write_text(json.dumps({"text": "version two"}) + "\n")
    data = load_token_data(cfg)
    assert not data.info["cached"] and bytes(np.asarray(data.train[:-1], dtype=np.uint8)).decode() == "version two"


def test_cached_load_does_not_import_datasets(corpus):
    cfg = cfg_for(corpus.jsonl, tokenizer="bpe:300")
    load_token_data(cfg)
    code = (
        "import sys; sys.modules['datasets'] = None\n"  # any import of datasets now fails
        "from hybridctl.core.config import DataConfig\nfrom hybridctl.core.data.token_cache import load_token_data\n"
        f"d = load_token_data(DataConfig(dataset={corpus.jsonl!r}, tokenizer='bpe:300'))\nprint(d.info['cached'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


# ---------------------------------------------------------------------------------------------------------
# Tokenizers


def test_bpe_is_deterministic_cached_and_round_trips(corpus, docs, tmp_path):
    cfg = cfg_for(corpus.jsonl, tokenizer="bpe:400")
    tok = tokenizer.get_tokenizer("bpe:400", cfg)
    path = subword.bpe_path(cfg, 400)
    assert path.is_file() and tok.vocab_size == 400 and tok.eos_id == tok.tokenizer.token_to_id("<|endoftext|>")
    other = DataConfig(**{**cfg.__dict__, "cache_dir": str(tmp_path / "elsewhere")})
    retrained = tokenizer.get_tokenizer("bpe:400", other)
    assert subword.bpe_path(other, 400).read_text() == path.read_text()  # same merges from scratch
    for d in docs[:5]:
        ids = tok.encode(d)
        assert tok.decode(ids) == d and retrained.encode(d) == ids
    assert sum(len(tok.encode(d)) for d in docs) < 0.6 * sum(len(d.encode()) for d in docs)  # merges learned
    assert [list(a) for a in tok.encode_batch(docs[:3])] == [tok.encode(d) for d in docs[:3]]
    assert tok.encode("<|endoftext|>") != [tok.eos_id]  # written in a document it is text


def test_bpe_learns_from_training_documents_only(docs, tmp_path):
    word = " zqxwvk"
    val_index = next(i for i in range(len(docs)) if is_val_document(i, 0.2))
    results = {}
    for where, index in (("val", val_index), ("train", val_index + 1 if not is_val_document(val_index + 1, 0.2) else 0)):
        assert is_val_document(index, 0.2) == (where == "val")
        body = list(docs[:60])
        body[index] = word * 800
        path = tmp_path / f"{where}.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in body))
        tok = tokenizer.get_tokenizer("bpe:400", cfg_for(str(path), val_fraction=0.2))
        results[where] = len(tok.encode(word))
    assert results["train"] == 1 and results["val"] >= 4  # merged only when the trainer saw it


def test_tokenizer_file_eos_found_or_added(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    plain = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    plain.pre_tokenizer = pre_tokenizers.Whitespace()
    plain.save(str(tmp_path / "plain.json"))
    tok = subword.load_tokenizer(str(tmp_path / "plain.json"))
    assert tok.vocab_size == 4 and tok.eos_id == 3 and tok.encode("a b a") == [0, 1, 0]
    plain.add_special_tokens(["</s>"])
    (tmp_path / "folder").mkdir()
    plain.save(str(tmp_path / "folder" / "tokenizer.json"))
    tok = subword.load_tokenizer(str(tmp_path / "folder"))
    assert tok.vocab_size == 4 and tok.eos_id == 3 and tok.tokenizer.id_to_token(3) == "</s>"


def test_hub_tokenizer_offline_fails_fast_in_one_line():
    start = time.perf_counter()
    with pytest.raises(DataError) as e:
        subword.load_tokenizer("hybridctl-test/no-such-tokenizer")
    message = str(e.value)
    assert time.perf_counter() - start < 5
    assert "'hybridctl-test/no-such-tokenizer'" in message and "HF_HUB_OFFLINE=1" in message
    assert "local tokenizer.json" in message and "\n" not in message


def test_hub_dataset_offline_fails_fast_in_one_line():
    start = time.perf_counter()
    with pytest.raises(DataError) as e:
        load_token_data(cfg_for("hybridctl-test/no-such-dataset", config="small"))
    message = str(e.value)
    assert time.perf_counter() - start < 10
    assert "'hybridctl-test/no-such-dataset' (config 'small')" in message and "not in the local cache" in message
    assert "point data.dataset at local files" in message and "\n" not in message


@pytest.mark.parametrize("spec,local", [
    ("owner/name", False), ("HuggingFaceTB/smollm-corpus", False), ("wikitext", False),
    ("nofolder/", True), ("a/b/c", True), ("a//b", True), ("/owner", True), ("owner\\name", True), ("own?r/name", True),
])
def test_a_hub_name_is_owner_slash_name_and_any_other_path_is_local(spec, local):
    assert sources.is_local(spec) is local


@pytest.mark.parametrize("spec", ["no-such-folder/", "no-such-folder/sub/part", "./no-such-folder"])
def test_a_missing_local_folder_is_no_such_folder_not_a_hub_problem(spec, tmp_path):
    result = run_cli("data", "prepare", "--preset", "tiny", "--set", f'data.dataset="{spec}"', cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: data.dataset '{spec}': no such file or folder; give a path to .txt, .jsonl "
                                     "or .parquet files or a glob like 'data/*.txt'")


def test_bad_tokenizer_specs():
    with pytest.raises(DataError, match="bpe:N with N >= 260"):
        subword.load_tokenizer("bpe:100", cfg_for("builtin:stdlib"))
    for spec in ("./nowhere/tokenizer.json", "nowhere/", "no/where/deep"):  # a path, not a hub name to fetch
        with pytest.raises(DataError, match="no such file"):
            subword.load_tokenizer(spec)


# ---------------------------------------------------------------------------------------------------------
# synthetic:mqar


def test_mqar_examples_are_recall_problems():
    spec = "synthetic:mqar:pairs=6,vocab=64,seed=3"
    data = load_token_data(cfg_for(spec, max_tokens=24 * 50))
    again = load_token_data(cfg_for(spec, max_tokens=24 * 50))
    other_seed = load_token_data(cfg_for(spec.replace("seed=3", "seed=4"), max_tokens=24 * 50))
    assert np.array_equal(data.train, again.train) and not np.array_equal(data.train, other_seed.train)
    assert data.vocab_size == 64 and len(data.train) == 24 * 50 and len(data.val) % 24 == 0
    n_keys = 63 // 2
    for tokens, answers in ((data.train, None), (data.val, data.val_answers)):
        examples = np.asarray(tokens, dtype=np.int64).reshape(-1, 24)
        for i, ex in enumerate(examples):
            keys, values = ex[0:12:2], ex[1:12:2]
            assert len(set(keys)) == 6 and keys.min() >= 1 and keys.max() <= n_keys
            assert values.min() > n_keys and values.max() < 64
            pairs = dict(zip(keys, values))
            queries, replies = ex[12::2], ex[13::2]
            assert sorted(queries) == sorted(keys) and all(pairs[q] == r for q, r in zip(queries, replies))
            if answers is not None:
                dist = answers[i * 24 : (i + 1) * 24]
                assert list(np.flatnonzero(dist)) == list(range(13, 24, 2)) and list(dist[13::2]) == list(range(13, 24, 2))
    assert not np.array_equal(data.train[: len(data.val)], data.val)


def test_mqar_examples_longer_than_seq_len_are_refused():
    spec = cfg_for("synthetic:mqar:pairs=40")
    with pytest.raises(DataError) as e:
        synthetic.check_seq_len(spec, 64)
    message = str(e.value)
    assert "'synthetic:mqar:pairs=40' makes examples of 160 tokens (4 x pairs), longer than train.seq_len=64" in message
    assert "use pairs=16 or fewer, or set train.seq_len=160 or more" in message and "\n" not in message
    synthetic.check_seq_len(spec, 160)  # whole examples fit


def test_bad_mqar_options():
    for spec, needle in (("synthetic:nope", "unknown synthetic task"), ("synthetic:mqar:pairs=x", "bad option"),
                         ("synthetic:mqar:pairs=40,vocab=64", "pairs must be in 1..31")):
        with pytest.raises(DataError, match=needle):
            load_token_data(cfg_for(spec))


class Recall(torch.nn.Module):
    """Predicts, after each token, the token that followed its latest earlier occurrence in the window (else 0):
    a perfect associative memory that never looks outside the window."""

    def forward(self, x, y, return_logits=True):
        logits = torch.zeros(*x.shape, 64)
        for b in range(x.shape[0]):
            last = {}
            for t in range(x.shape[1]):
                token = int(x[b, t])
                logits[b, t, int(x[b, last[token] + 1]) if token in last else 0] = 1.0
                last[token] = t
        return SimpleNamespace(ce_loss=torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()), logits=logits)


def test_mqar_metric_scores_answerable_positions_only():
    # seq_len 40 does not divide into 24-token examples: windows cut examples, whose cut answers are not scored
    cfg = micro_config(['data.dataset="synthetic:mqar:pairs=6,vocab=64"', "train.seq_len=40", "train.eval_batches=3"])
    data = load_token_data(cfg.data)
    metrics = evaluate(Recall(), data, cfg, torch.device("cpu"), micro_batch=4)
    assert metrics["val_mqar_acc"] == 1.0 and metrics["val_acc"] < 0.5
    every_answer = SimpleNamespace(**{**data.__dict__, "val_answers": (data.val_answers > 0).astype(np.int32)})
    assert evaluate(Recall(), every_answer, cfg, torch.device("cpu"), micro_batch=4)["val_mqar_acc"] < 1.0
    blind = Recall()
    blind.forward = lambda x, y, return_logits=True: SimpleNamespace(ce_loss=torch.tensor(4.0), logits=torch.zeros(*x.shape, 64))
    assert evaluate(blind, data, cfg, torch.device("cpu"), micro_batch=4)["val_mqar_acc"] == 0.0


def test_mqar_training_logs_the_metric(tmp_path):
    cfg = micro_config(['data.dataset="synthetic:mqar:pairs=4,vocab=128"'])
    run = RunDir(tmp_path / "mqar")
    run.create(cfg)
    train(cfg, run)
    evals = [r for r in run.read_metrics() if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6] and all(0.0 <= r["val_mqar_acc"] <= 1.0 for r in evals)
    assert load_config_file(run.config_path).model.vocab_size == 128
    assert run.read_summary()["final_val_mqar_acc"] == evals[-1]["val_mqar_acc"]
    result = run_cli("compare", str(run.path), "--metric", "final_val_mqar_acc", "--json-out", str(tmp_path / "c.json"))
    assert result.returncode == 0, result.stderr
    assert "recall acc" in result.stdout
    (record,) = json.loads((tmp_path / "c.json").read_text())
    assert record["final_val_mqar_acc"] == evals[-1]["val_mqar_acc"] and record["metric"] == "final_val_mqar_acc"


# ---------------------------------------------------------------------------------------------------------
# Resume and CLI


def test_resume_is_bit_exact_on_local_files_with_bpe(corpus, tmp_path):
    extra = [f'data.dataset="{corpus.jsonl}"', 'data.tokenizer="bpe:300"']
    full = RunDir(tmp_path / "full")
    cfg = micro_config(extra)
    full.create(cfg)
    train(cfg, full)
    half = RunDir(tmp_path / "half")
    cfg = micro_config(extra)
    half.create(cfg)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, half, callback=StopAfter(3))
    train(load_config_file(half.config_path), half, resume_from=half.resolve_checkpoint("latest"))
    assert losses(half) == losses(full) and len(losses(full)) == 6
    assert load_config_file(full.config_path).model.vocab_size == 300


def test_data_prepare_cli(corpus, tmp_path):
    args = ["data", "prepare", "--preset", "tiny", "--set", f'data.dataset="{corpus.parquet}"',
            "--set", "data.text_field=body", "--set", 'data.tokenizer="bpe:320"']
    env = {"HYBRIDCTL_CACHE": str(tmp_path / "cache"), "COLUMNS": "200"}
    first = run_cli(*args, env=env)
    assert first.returncode == 0, first.stderr
    assert "fresh" in first.stdout and "bpe:320 (vocab 320" in first.stdout and str(tmp_path / "cache") in first.stdout
    second = run_cli(*args, env=env)
    assert second.returncode == 0 and "cached" in second.stdout and "fresh" not in second.stdout
    meta = json.loads(next((tmp_path / "cache" / "tokens").glob("*/meta.json")).read_text())
    assert f"{meta['train_documents']} train, {meta['val_documents']} val" in second.stdout
    listed = run_cli("data", "list", env=env)
    assert listed.returncode == 0 and "builtin:python" in listed.stdout and "synthetic:mqar" in listed.stdout
    assert "bpe:320" in listed.stdout and "ready" in listed.stdout and "incomplete" not in listed.stdout
    train_bin = next((tmp_path / "cache" / "tokens").glob("*/train.bin"))
    train_bin.write_bytes(train_bin.read_bytes()[:-2])  # a copy cut short
    cut = run_cli("data", "list", env=env)
    assert cut.returncode == 0 and "incomplete: tokenised again at its next use" in cut.stdout


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe:300"])
def test_cache_that_cannot_be_written_is_one_line_and_leaves_nothing(corpus, tmp_path, monkeypatch, tokenizer):
    cache = tmp_path / "cache"
    overrides = [f'data.dataset="{corpus.jsonl}"', f'data.tokenizer="{tokenizer}"']
    args = ["data", "prepare", "--preset", "tiny", "--set", overrides[0], "--set", overrides[1]]

    def small_file_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    full = subprocess.run([sys.executable, "-m", "hybridctl", *args], env={**os.environ, "HYBRIDCTL_CACHE": str(cache)},
                          capture_output=True, text=True, timeout=300, preexec_fn=small_file_limit)
    cfg = DataConfig(**{**load_config("tiny", overrides).data.__dict__, "cache_dir": str(cache)})
    if tokenizer == "bytes":
        what, folder = "token cache", token_cache_dir(cfg)
    else:  # the BPE tokenizer is trained and saved before any token is written, and its file alone passes the limit
        what, folder = "tokenizer cache", subword.bpe_path(cfg, 300).parent
    assert full.returncode == 1 and full.stderr.splitlines() == [
        f"error: cannot write {what} {folder}: File too large; free some space, "
        "or set HYBRIDCTL_CACHE or data.cache_dir to a folder on a disk with room"]
    assert not [f for f in cache.rglob("*") if f.is_file()]  # nothing half-written for a later run to read
    assert "fresh" in run_cli(*args, env={"HYBRIDCTL_CACHE": str(cache)}).stdout

    def disk_full(self, ids, eos_id):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(token_cache.SplitWriter, "add", disk_full)
    with pytest.raises(DataError, match=r"cannot write token cache .*: the disk is full; free some space"):
        load_token_data(DataConfig(**{**cfg.__dict__, "cache_dir": str(tmp_path / "other")}))
    assert list((tmp_path / "other" / "tokens").iterdir()) == []


def test_data_prepare_cli_errors(tmp_path):
    offline = run_cli("data", "prepare", "--preset", "hybrid_sparse", env={"HYBRIDCTL_CACHE": str(tmp_path)})
    assert offline.returncode == 1 and "Traceback" not in offline.stderr
    assert len(offline.stderr.strip().splitlines()) == 1 and "HuggingFaceTB/smollm-corpus" in offline.stderr
    missing = run_cli("data", "prepare", "--preset", "tiny", "--set", 'data.dataset="/nonexistent/*.txt"')
    assert missing.returncode == 1 and "matches no" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    too_long = run_cli("data", "prepare", "--preset", "tiny", "--set", 'data.dataset="synthetic:mqar:pairs=40"',
                       "--set", "train.seq_len=64")
    assert too_long.returncode == 1 and len(too_long.stderr.strip().splitlines()) == 1
    assert "examples of 160 tokens (4 x pairs), longer than train.seq_len=64" in too_long.stderr


def test_hub_names_say_what_a_run_would_fetch(tmp_path):
    """What --dry-run warns of: hub datasets and tokenizers not cached here; nothing for offline corpora, local
    files, bytes / bpe:N, or data whose tokens are cached."""
    local = tmp_path / "corpus.txt"
    local.write_text("\n\n".join(f"local document {i}" for i in range(200)))
    assert token_cache.hub_names(DataConfig(dataset="owner/corpus", tokenizer="owner/tokenizer")) == {
        "data.dataset": "owner/corpus", "data.tokenizer": "owner/tokenizer"}
    assert token_cache.hub_names(DataConfig(dataset="builtin:stdlib", tokenizer="owner/tokenizer")) == {
        "data.tokenizer": "owner/tokenizer"}
    assert token_cache.hub_names(DataConfig(dataset=str(local), tokenizer="bpe:300")) == {}
    assert token_cache.hub_names(DataConfig(dataset="synthetic:mqar", tokenizer="bytes")) == {}
    cached = DataConfig(dataset=str(local), tokenizer="bytes", max_tokens=1000)
    token_cache.load_token_data(cached)
    assert token_cache.hub_names(cached) == {}


def test_dry_run_says_the_data_needs_the_hub(tmp_path):
    args = ["ablate", "lr", "--preset", "tiny", "--values", "1e-3", "--steps", "2", "--out", str(tmp_path / "runs"),
            "--dry-run"]
    hub = run_cli(*args, "--set", 'data.dataset="owner/corpus"')
    assert hub.returncode == 0, hub.stderr
    assert "fetch from the Hugging Face hub: data.dataset owner/corpus; without the network, set data.dataset to " \
           "local files or builtin:python" in hub.stdout
    tokenizer_only = run_cli(*args, "--set", 'data.tokenizer="owner/tokenizer"').stdout
    assert "hub: data.tokenizer owner/tokenizer; without the network, set data.tokenizer to bpe:16384" in tokenizer_only
    assert "Hugging Face hub" not in run_cli(*args).stdout  # tiny: the offline standard library
    assert not (tmp_path / "runs").exists()
