"""Text -> GPT-2 tokens -> token shards on disk: the writer side of gpt2/data.py.

Every document becomes `<|endoftext|>` followed by its tokens (`encode_ordinary`), in input order.
The token stream is cut into shards: 1-D uint16 `.npy` files named `<name>_{train|val}_{index:06d}.npy`.
For FineWeb-Edu the first `shard_size` tokens are the validation shard (index 0), as build-nanogpt
does, and the rest are train shards 1, 2, ...; tinyshakespeare is split 90 % train / 10 % val.

Files in an output folder, besides the shards:

    meta.json      tokenizer, dtype, shard size, source (and a fingerprint of local input files): once the
                   folder holds shards (or consumed.txt lists some), a rerun with other settings is refused
    DONE           written last; lists every shard. Without it a producer is (or was) still running,
                   and the loader waits for more train shards instead of ending the epoch
    consumed.txt   train shards the trainer deleted (--delete_consumed_shards); a rerun skips them
    progress.json  where the document stream stood after the last shard: a rerun starts there

Every file is written under a temporary name and renamed (os.replace), so a reader never sees half a
shard and a killed run leaves only complete shards. A rerun continues after the last shard that
progress.json records (reading, but not tokenizing, the documents before it); if a shard was deleted by
hand it tokenizes the stream from the start, skips the shards that are there (or consumed) and writes
the missing ones. Either way the files are byte for byte those of an uninterrupted run.

With `max_shards_on_disk=K` the producer waits while K train shards are on disk; a trainer that
deletes consumed shards (ShardLoader(..., delete_consumed=True)) frees room as it goes, so the two
run side by side through a disk that holds K shards.
"""
import csv
import ctypes
import hashlib
import importlib.resources
import io
import itertools
import json
import lzma
import multiprocessing
import os
import pathlib
import re
import signal
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np

from gpt2.files import remove_stale_tmp_files, write_atomic
from gpt2.tokenizer import ENCODING_NAME, EOT_TOKEN, encode, get_encoding

META_FILE = "meta.json"
DONE_FILE = "DONE"
CONSUMED_FILE = "consumed.txt"
PROGRESS_FILE = "progress.json"
FORMAT = "gpt2-triton token shards v1"
SPLITS = ("train", "val")
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"  # = the shipped copy
FINEWEB_DATASET = "HuggingFaceFW/fineweb-edu"
FINEWEB_CONFIG = "sample-10BT"
# the settings a rerun must share with the shards already in a folder
META_KEYS = ("format", "name", "tokenizer", "dtype", "shard_size", "val_shards", "source", "fingerprint")
# prepare_data.py's smallest --shard_size: smaller shards would write a file (and fsync it) every few tokens.
# The functions here take any positive size, so that tests can cut a few documents into many shards.
MIN_SHARD_SIZE = 1000
FINGERPRINT_BYTES = 1 << 20  # an input file's fingerprint hashes its size and this many bytes at each end


# ----------------------------------------------------------------------------- file helpers

def shard_name(name: str, split: str, index: int) -> str:
    return f"{name}_{split}_{index:06d}.npy"


def save_shard(path, tokens: np.ndarray) -> None:
    """Write a 1-D uint16 token array as .npy, atomically."""
    tokens = np.asarray(tokens)
    assert tokens.ndim == 1 and tokens.dtype == np.uint16, (tokens.shape, tokens.dtype)
    write_atomic(path, lambda f: np.save(f, tokens, allow_pickle=False))


def write_json(path, obj) -> None:
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    write_atomic(path, lambda f: f.write(data))


# what to do about a damaged file: the smallest step after which a rerun writes it again, keeping the shards
DAMAGED_FIX = {
    META_FILE: "without it the shards cannot be checked: delete the folder {folder} and run prepare_data.py again",
    DONE_FILE: "delete it and run the same prepare_data.py command again: it keeps the shards and rewrites {name}",
    PROGRESS_FILE: "delete it and run the same prepare_data.py command again: it keeps the shards on disk "
                   "(tokenizing the input from the start to find where they end) and rewrites {name}",
}


def read_json(path, required=()):
    """The file's JSON content, or None if it does not exist. A damaged file, one that is not a JSON object
    or lacks one of the `required` keys, is an error that names it and the fix."""
    path = pathlib.Path(path)
    if not path.exists():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _damaged(path, str(err)) from None
    if not isinstance(content, dict):
        raise _damaged(path, f"it holds a {type(content).__name__}, not an object")
    missing = [k for k in required if k not in content]
    if missing:
        raise _damaged(path, f"no {missing[0]!r} in it")
    return content


def _damaged(path: pathlib.Path, problem: str) -> ValueError:
    fix = DAMAGED_FIX.get(path.name, DAMAGED_FIX[META_FILE]).format(folder=path.parent, name=path.name)
    return ValueError(f"{path} is damaged ({problem}); prepare_data.py writes it: {fix}")


def read_meta(folder):
    return read_json(pathlib.Path(folder) / META_FILE)


def read_done(folder):
    """The DONE marker's content ({"shards": {split: [file names]}, ...}), or None while still producing."""
    return read_json(pathlib.Path(folder) / DONE_FILE, required=("shards", "tokens"))


def read_consumed(folder) -> set:
    path = pathlib.Path(folder) / CONSUMED_FILE
    if not path.exists():
        return set()
    return set(path.read_text().split())


def delete_consumed_shards(folder, names) -> None:
    """Record the shards as consumed (the producer then skips them on a rerun), then delete them."""
    if not names:
        return
    folder = pathlib.Path(folder)
    with open(folder / CONSUMED_FILE, "a") as f:
        f.write("".join(n + "\n" for n in names))
        f.flush()
        os.fsync(f.fileno())
    for n in names:
        (folder / n).unlink(missing_ok=True)


def count_shards(folder, split: str) -> int:
    return sum(1 for _ in pathlib.Path(folder).glob(f"*_{split}_*.npy"))


class WaitStopped(Exception):
    """wait_until gave up because `stop()` said so (the trainer got Ctrl-C or SIGTERM)."""


def wait_until(ready, message, warn_after: float = 60.0, max_sleep: float = 2.0, stop=None) -> None:
    """Poll `ready()` with a growing sleep; print `message` (a string, or a function that returns one)
    after warn_after seconds, then every few minutes. WaitStopped as soon as `stop()` is true: a signal
    handler can only set a flag, and the sleeps would never end on their own."""
    start = last_warn = time.monotonic()
    warned_once = False
    sleep = 0.01
    while not ready():
        if stop is not None and stop():
            raise WaitStopped
        time.sleep(sleep)
        sleep = min(max_sleep, sleep * 1.5)
        now = time.monotonic()
        if now - last_warn >= (300.0 if warned_once else warn_after):
            text = message() if callable(message) else message
            print(f"[{now - start:.0f} s] {text}", file=sys.stderr, flush=True)
            last_warn, warned_once = now, True


# ----------------------------------------------------------------------------- metadata

def check_or_write_meta(folder: pathlib.Path, meta: dict) -> None:
    """Refuse a folder that holds shards of other settings; otherwise (re)write meta.json.

    A folder whose meta.json describes no shard (a run that failed before its first one, say without
    `datasets`) takes the new settings: the old ones, and their DONE and progress.json, go.
    """
    old = read_meta(folder)
    if old is None:
        foreign = sorted(p.name for p in folder.glob("*.npy"))
        if foreign:
            raise ValueError(
                f"{folder} already holds .npy files ({foreign[0]}, ...) but no {META_FILE}: they were not "
                "written by prepare_data.py. Use an empty or new --out folder."
            )
    else:
        # the fingerprint is not compared where an older version did not write it: its folders stay usable
        diff = [f"{k}: {old.get(k)!r} there, {meta.get(k)!r} now" for k in META_KEYS
                if old.get(k) != meta.get(k) and (k != "fingerprint" or k in old)]
        if diff and holds_shards(folder):
            raise ValueError(
                f"{folder} holds shards made with other settings ({'; '.join(diff)}). "
                "Use another --out folder, or empty this one to start over."
            )
        if diff:
            for name in (DONE_FILE, PROGRESS_FILE):
                (folder / name).unlink(missing_ok=True)
    try:
        write_json(folder / META_FILE, meta)
    except OSError as err:  # the first write: its error would name a temporary file
        raise OSError(f"cannot write in the output folder {folder} ({err.strerror}): "
                      "pass an --out folder you can write to") from None


def make_out_dir(folder) -> pathlib.Path:
    """Create the output folder (and its parents); an error names the folder and what to do."""
    folder = pathlib.Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {folder} is a file, not a folder: pass a new folder, or one prepare_data.py wrote")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create the output folder {folder} ({err.strerror}): "
                      "pass an --out folder you can write to") from None
    return folder


def holds_shards(folder: pathlib.Path) -> bool:
    """Shards on disk, or shards a trainer consumed (a rerun must not write them again)."""
    return any(folder.glob("*.npy")) or bool(read_consumed(folder))


def make_meta(name: str, shard_size, val_shards: int, source: str, max_shards_on_disk=None,
              fingerprint=None) -> dict:
    return {
        "format": FORMAT, "name": name, "tokenizer": ENCODING_NAME, "dtype": "uint16",
        "shard_size": shard_size, "val_shards": val_shards, "source": source, "fingerprint": fingerprint,
        "max_shards_on_disk": max_shards_on_disk,
    }


# ----------------------------------------------------------------------------- documents

def tokenize_document(text: str) -> np.ndarray:
    """<|endoftext|> followed by the document's tokens, as uint16. Runs in the worker processes."""
    tokens = np.array([EOT_TOKEN] + encode(text), dtype=np.int64)
    assert tokens.max() < 2**16, "a token id does not fit in uint16"
    return tokens.astype(np.uint16)


def _text_of(row, where: str) -> str:
    if not isinstance(row, dict) or "text" not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"{where} has no 'text' field (it has: {keys}); every document needs one")
    return _check_text(row["text"], where)


def _check_text(text, where: str) -> str:
    # checked here, in the parent, where the file and line are known: a worker would fail without them
    if not isinstance(text, str):
        kind = "null" if text is None else type(text).__name__
        raise ValueError(f"{where}: 'text' is {kind}, not a string; every document's text must be a string")
    return text


def check_input_file(path, what: str = "the files in it (e.g. {folder}/*.jsonl)") -> pathlib.Path:
    path = pathlib.Path(path)
    if path.is_dir():
        raise ValueError(f"input {path} is a folder: pass {what.format(folder=path)}")
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    return path


def iter_local_documents(paths):
    """Texts of local files, in order: .jsonl (one object per line), .parquet and .csv (a `text`
    column) hold one document per row/line with a `text` field; a .txt file is one document."""
    for path in map(check_input_file, paths):
        try:
            yield from _iter_file(path)
        except UnicodeDecodeError as err:  # its message has a position but no file name
            raise ValueError(f"{path} is not UTF-8 text ({err.reason}, byte {err.object[err.start]:#04x}): "
                             "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _iter_file(path: pathlib.Path):
    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield path.read_text(encoding="utf-8")
    elif suffix == ".jsonl":
        with open(path, "rb") as f:  # decoded line by line, so that an error names its line
            for lineno, raw in enumerate(f, 1):
                where = f"{path}:{lineno}"
                line = _utf8_line(raw, where)
                if line.strip():
                    yield _text_of(_json_line(line, where), where)
    elif suffix == ".csv":
        csv.field_size_limit(2**31 - 1)
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: the BOM Excel writes is no header
            for rowno, row in enumerate(csv.DictReader(f), 1):
                yield _text_of(row, f"{path} row {rowno}")
    elif suffix == ".parquet":
        yield from _iter_parquet(path)
    else:
        raise ValueError(f"input file {path}: unknown type {suffix!r} (use .jsonl, .parquet, .csv or .txt)")


def _utf8_line(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{where} is not UTF-8 text ({err.reason}, byte {raw[err.start]:#04x} at column "
                         f"{err.start + 1}): convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _json_line(line: str, where: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:  # its own "line 1 column 10" counts within this one line
        raise ValueError(f"{where} is not valid JSON ({err.msg} at column {err.colno}); every line of a "
                         ".jsonl file holds one JSON object") from None


def _iter_parquet(path: pathlib.Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    import pyarrow as pa

    try:
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise ValueError(f"{path} has no 'text' column (it has: {pf.schema_arrow.names})")
        row = 0
        for batch in pf.iter_batches(columns=["text"], batch_size=1024):
            for text in batch.column(0).to_pylist():
                row += 1
                yield _check_text(text, f"{path} row {row}")
    except pa.ArrowException as err:  # e.g. "Parquet magic bytes not found in footer", without the file
        raise ValueError(f"{path} is not a readable parquet file ({err}): a partial download? "
                         "Fetch it again, or leave it out of --input") from None


def iter_hub_documents(dataset: str, config: str, split: str = "train"):
    """Stream a Hugging Face dataset's `text` column (streaming=True: nothing is downloaded up front).

    Connects and reads the first row at once, so that a missing package or network fails here.
    """
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "streaming from the Hugging Face hub needs the `datasets` package: "
            "pip install datasets (or pip install -e .[data]); or pass local files with --input"
        ) from None
    where = f"{dataset} ({config})" if config else dataset
    try:
        rows = iter(datasets.load_dataset(dataset, name=config, split=split, streaming=True))
        first = next(rows, None)
    except Exception as err:  # requests, huggingface_hub and fsspec each raise their own kinds
        raise RuntimeError(
            f"could not stream {where} from the Hugging Face hub ({type(err).__name__}: {err}). "
            "Without network access, pass local .jsonl/.parquet/.txt files with --input."
        ) from None
    return _hub_texts(first, rows, where)


def _hub_texts(first, rows, where):
    if first is None:
        return
    yield _text_of(first, f"{where} row 1")
    for i, row in enumerate(rows, 2):
        yield _text_of(row, f"{where} row {i}")


def describe_local_inputs(paths) -> str:
    """Names and sizes: a rerun over other files would write other shards, so meta.json records this
    (and their fingerprint). An empty file is refused here, before anything is written."""
    parts = []
    for path in map(check_input_file, paths):
        if path.stat().st_size == 0:
            raise ValueError(f"input file {path} holds no text (it is empty): pass a file with documents")
        parts.append(f"{path.name}:{path.stat().st_size}")
    return "files:" + ",".join(parts)


def fingerprint_local_inputs(paths) -> str:
    """A hash of each file's size and first and last FINGERPRINT_BYTES: cheap for files of gigabytes, and
    a file of the same name and size but other content (another download, an edited copy) differs."""
    digest = hashlib.sha256()
    for path in map(check_input_file, paths):
        size = path.stat().st_size
        digest.update(f"{size}:".encode())
        with open(path, "rb") as f:
            digest.update(f.read(FINGERPRINT_BYTES))
            f.seek(max(0, size - FINGERPRINT_BYTES))
            digest.update(f.read(FINGERPRINT_BYTES))
    return "sha256:" + digest.hexdigest()[:32]


# ----------------------------------------------------------------------------- the writer

class ShardWriter:
    """Cuts a stream of documents' token arrays into shards of exactly `shard_size` tokens (the last one
    shorter). Shards 0 .. val_shards-1 are the val split, the rest train.

    A rerun skips the shards already on disk or consumed. After every shard, progress.json records where
    the stream stands (documents done, tokens of the current one already in shards), so that a rerun
    skips the documents of the finished shards without tokenizing them again (resume()). With
    max_shards_on_disk, waits before each train shard while that many train shards are on disk.
    """

    def __init__(self, folder, name, shard_size, val_shards=1, max_shards_on_disk=None, warn_after=60.0):
        self.folder, self.name, self.shard_size = pathlib.Path(folder), name, shard_size
        self.val_shards, self.max_shards_on_disk, self.warn_after = val_shards, max_shards_on_disk, warn_after
        self.buffer = shard_buffer(shard_size)
        self.fill = 0
        self.index = 0
        self.docs, self.doc_offset = 0, 0   # documents added; tokens of the next one already in shards
        self.written, self.skipped = 0, 0
        self.names = {split: [] for split in SPLITS}
        self.tokens = {split: 0 for split in SPLITS}
        self.consumed = read_consumed(self.folder)

    def resume(self) -> int:
        """Continue after the shards progress.json records, if they are all still there (or consumed);
        returns the number of documents to skip."""
        progress = read_json(self.folder / PROGRESS_FILE, required=("next_index", "docs", "doc_offset", "tokens"))
        if progress is None:
            return 0
        names = [shard_name(self.name, self._split(i), i) for i in range(progress["next_index"])]
        if not all((self.folder / n).exists() or n in self.consumed for n in names):
            return 0  # a shard was deleted by hand: tokenize from the start, rewriting only what is missing
        for i, n in enumerate(names):
            self.names[self._split(i)].append(n)
        self.index, self.tokens = progress["next_index"], progress["tokens"]
        self.docs, self.doc_offset = progress["docs"], progress["doc_offset"]
        self.skipped = len(names)
        return self.docs

    def add(self, tokens: np.ndarray) -> None:
        """One document's tokens (the next after those already added)."""
        tokens = tokens[self.doc_offset:]  # nonzero only for the first document after resume()
        while len(tokens):
            n = min(len(tokens), self.shard_size - self.fill)
            self.buffer[self.fill:self.fill + n] = tokens[:n]
            self.fill += n
            self.doc_offset += n
            tokens = tokens[n:]
            if self.fill == self.shard_size:
                self._flush()
        self.docs, self.doc_offset = self.docs + 1, 0

    def finish(self) -> dict:
        """Write the last, partial shard and the DONE marker; returns the DONE content."""
        if self.fill:
            self._flush()
        done = {"shards": self.names, "tokens": self.tokens}
        write_json(self.folder / DONE_FILE, done)
        return done

    def _split(self, index: int) -> str:
        return "val" if index < self.val_shards else "train"

    def _flush(self) -> None:
        split = self._split(self.index)
        name = shard_name(self.name, split, self.index)
        path = self.folder / name
        if path.exists() or name in self.consumed:
            self.skipped += 1
        else:
            if split == "train" and self.max_shards_on_disk:
                wait_until(
                    lambda: count_shards(self.folder, "train") < self.max_shards_on_disk,
                    f"waiting: {self.max_shards_on_disk} train shards are on disk in {self.folder} "
                    "(--max_shards_on_disk); a trainer with --delete_consumed_shards frees room as it goes",
                    self.warn_after,
                )
            save_shard(path, self.buffer[:self.fill])
            self.written += 1
        self.names[split].append(name)
        self.tokens[split] += self.fill
        self.index += 1
        self.fill = 0
        write_json(self.folder / PROGRESS_FILE, {"next_index": self.index, "docs": self.docs,
                                                 "doc_offset": self.doc_offset, "tokens": self.tokens})


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped write_shards; the message says what was written and how to continue."""


def write_shards(texts, folder, name, shard_size, *, source, val_shards=1, workers=1,
                 max_shards_on_disk=None, progress=True, fingerprint=None) -> dict:
    """Tokenize `texts` (an iterable of documents) into shards in `folder`; returns the DONE content.
    `source` and `fingerprint` identify the input in meta.json (describe_local_inputs, fingerprint_local_inputs).

    Ctrl-C raises Interrupted once the pool is stopped: the folder then holds only complete shards, and
    the same call again continues where this one stopped."""
    _check_settings(name, shard_size, max_shards_on_disk)
    folder = make_out_dir(folder)
    get_encoding()  # a missing BPE fails here, with tiktoken's message, not inside a worker
    writer = ShardWriter(folder, name, shard_size, val_shards, max_shards_on_disk)  # allocates: before meta.json
    check_or_write_meta(folder, make_meta(name, shard_size, val_shards, source, max_shards_on_disk, fingerprint))
    remove_stale_tmp_files(folder)
    skip = writer.resume()
    if skip:
        print(f"{folder}: shards up to index {writer.index - 1} are done; skipping their {skip:,} documents",
              file=sys.stderr)
        texts = itertools.islice(texts, skip, None)
    bar = _progress_bar(progress)
    pool = None
    try:
        if workers > 1:
            pool = _tokenizer_pool(workers)
        for tokens in tokenize_stream(texts, pool, chunk_docs=256 * workers):
            writer.add(tokens)
            if bar is not None:
                bar.update(len(tokens))
                bar.set_postfix(shards=writer.written, skipped=writer.skipped, refresh=False)
        if writer.docs == 0:
            raise ValueError(f"the input ({source}) holds no text (no documents): pass files with documents")
        done = writer.finish()
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: {writer.written} shards written to {folder} by this run ({writer.index} "
                          "done in all); run the same command again to continue") from None
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()
    return done


def _tokenizer_pool(workers: int):
    # forked workers keep the parent's handlers until _init_worker runs: a Ctrl-C there, or a SIGTERM from
    # Pool.terminate turned into KeyboardInterrupt by prepare_data.py's handler, would print a traceback
    main = threading.current_thread() is threading.main_thread()  # handlers are the main thread's to set
    previous = ((signal.signal(signal.SIGINT, signal.SIG_IGN), signal.signal(signal.SIGTERM, signal.SIG_DFL))
                if main else None)
    try:
        return multiprocessing.get_context().Pool(workers, initializer=_init_worker)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous[0])
            signal.signal(signal.SIGTERM, previous[1])


def _init_worker() -> None:
    """Ctrl-C reaches the whole process group, but only the parent reacts (it stops the pool): a worker
    would print a traceback of its own. And a worker ends with its parent, even one killed by SIGKILL,
    rather than live on and print BrokenPipeError tracebacks when it hands back its results."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # Linux: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # elsewhere, a thread watches for the parent
        threading.Thread(target=_exit_without_parent, daemon=True).start()
    # the process that made the pool (not os.getppid(): under forkserver that is the server), if it died
    # before the lines above
    if not multiprocessing.parent_process().is_alive():
        os._exit(1)


def _exit_without_parent() -> None:
    multiprocessing.parent_process().join()
    os._exit(1)


def tokenize_stream(texts, pool=None, chunk_docs=1024):
    """Token arrays of the documents, in order. With a pool, one chunk is tokenized while the previous
    one is written: Pool.imap would read the whole stream ahead into memory while the writer waits
    for disk room, so the look-ahead is bounded to two chunks."""
    if pool is None:
        yield from map(tokenize_document, texts)
        return
    texts = iter(texts)
    pending = None
    while chunk := list(itertools.islice(texts, chunk_docs)):
        job = pool.map_async(tokenize_document, chunk, chunksize=16)
        if pending is not None:
            yield from pending.get()
        pending = job
    if pending is not None:
        yield from pending.get()


def _check_settings(name, shard_size, max_shards_on_disk) -> None:
    check_prefix(name)
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    if max_shards_on_disk is not None and max_shards_on_disk < 2:
        raise ValueError("max_shards_on_disk must be at least 2: a training step may span two shards")


def check_prefix(name: str) -> None:
    """A shard file name prefix: a plain file name (no folder, not hidden), under which no val shard
    matches the train shards' pattern *_train_*.npy (count_shards, and gpt2/data.py's loader) or back."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
        raise ValueError(f"--prefix {name!r} is not a plain file name: use 1 to 100 letters, digits, '-', '_' "
                         "and '.', starting with a letter or digit")
    for split in SPLITS:
        if f"_{split}_" in f"{name}_":
            raise ValueError(f"--prefix {name!r}: its shards would match the pattern *_{split}_*.npy of the "
                             f"{split} shards; use a prefix without '_{split}' (e.g. {name.replace('_' + split, '')})")


def shard_buffer(shard_size: int) -> np.ndarray:
    """The writer's buffer of one shard (2 bytes a token), refused with a message that names
    --shard_size where it cannot be allocated or would not fit in this machine's memory."""
    fix = f"--shard_size {shard_size:,} needs a buffer of {2 * shard_size / 1e9:.1f} GB"
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on Linux or macOS
        memory = None
    if memory and 2 * shard_size > memory:
        raise ValueError(f"{fix}, more than this machine's {memory / 1e9:.1f} GB: use a smaller --shard_size "
                         "(the default is 1e8)")
    try:
        return np.empty(shard_size, dtype=np.uint16)
    except MemoryError:
        raise ValueError(f"{fix}, which could not be allocated: use a smaller --shard_size "
                         "(the default is 1e8)") from None


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(unit="tok", unit_scale=True, desc="tokens", dynamic_ncols=True)


# ----------------------------------------------------------------------------- datasets

def prepare_fineweb(out_dir, inputs=None, dataset=FINEWEB_DATASET, config=FINEWEB_CONFIG,
                    shard_size=100_000_000, workers=1, max_shards_on_disk=None, name="edufineweb",
                    progress=True) -> dict:
    """FineWeb-Edu (streamed from the hub) or local text files -> shards; the first shard is val."""
    _check_settings(name, shard_size, max_shards_on_disk)
    shard_buffer(shard_size)  # a size too large fails now, before meta.json (the writer allocates it again)
    if inputs:
        source, fingerprint = describe_local_inputs(inputs), fingerprint_local_inputs(inputs)
    else:
        source, fingerprint = f"hub:{dataset}/{config}", None
    # meta.json first, before the hub is reached: a trainer started beside this producer takes a folder
    # with meta.json and no DONE as "shards still to come" and waits for them (should the hub fail, a
    # rerun with other settings replaces this meta.json: it describes no shard)
    out_dir = make_out_dir(out_dir)
    check_or_write_meta(out_dir, make_meta(name, shard_size, 1, source, max_shards_on_disk, fingerprint))
    texts = iter_local_documents(inputs) if inputs else iter_hub_documents(dataset, config)
    return write_shards(texts, out_dir, name, shard_size, source=source, workers=workers,
                        max_shards_on_disk=max_shards_on_disk, progress=progress, fingerprint=fingerprint)


def download_text(dest, url) -> pathlib.Path:
    """The text at url, saved as dest (prepare_data.py shakespeare --url)."""
    dest = pathlib.Path(dest)
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as err:
        raise RuntimeError(
            f"could not download {url} ({err}). Offline, pass a local copy: "
            f"python prepare_data.py shakespeare --input FILE --out {dest.parent}"
        ) from None
    write_atomic(dest, lambda f: f.write(data))
    return dest


# tinyshakespeare ships with the package (gpt2/assets/README.md), with its tokens, so that the default
# run needs neither the network nor the GPT-2 BPE files
SHIPPED_TEXT = "tinyshakespeare.txt.xz"
SHIPPED_TOKENS = "tinyshakespeare_tokens.npy.xz"


def _asset(name: str):
    return importlib.resources.files("gpt2") / "assets" / name


def shipped_shakespeare_text() -> str:
    return lzma.decompress(_asset(SHIPPED_TEXT).read_bytes()).decode("utf-8")


def shipped_shakespeare_tokens() -> np.ndarray:
    """tokenize_document(shipped_shakespeare_text()), read from the package rather than tokenized."""
    return np.load(io.BytesIO(lzma.decompress(_asset(SHIPPED_TOKENS).read_bytes())), allow_pickle=False)


def write_shipped_tokens() -> None:
    """Remake gpt2/assets/tinyshakespeare_tokens.npy.xz from the shipped text (needs the BPE)."""
    buffer = io.BytesIO()
    np.save(buffer, tokenize_document(shipped_shakespeare_text()), allow_pickle=False)
    data = lzma.compress(buffer.getvalue(), preset=9 | lzma.PRESET_EXTREME)
    write_atomic(pathlib.Path(__file__).parent / "assets" / SHIPPED_TOKENS, lambda f: f.write(data))


def _sha256(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def prepare_shakespeare(out_dir, input_file=None, url=None) -> dict:
    """tinyshakespeare as one document: the first 90 % of its tokens are train, the last 10 % val.

    Writes shakespeare_val_000000.npy and shakespeare_train_000001.npy from input_file, or from the text
    at url (downloaded into out_dir/input.txt), or by default from the copy shipped with the package,
    whose tokens ship too: the default needs no network and no BPE. Returns the DONE content.
    """
    if input_file is not None:
        check_input_file(input_file, "one text file")  # before --out is made
    out_dir = make_out_dir(out_dir)
    if url is not None:
        input_file = out_dir / "input.txt"
        if not input_file.exists():
            download_text(input_file, url)
    text = shipped_shakespeare_text() if input_file is None else read_text_file(input_file)
    source = _sha256(text)
    shipped = source == _sha256(shipped_shakespeare_text())
    tokens = shipped_shakespeare_tokens() if shipped else tokenize_document(text)
    n_train = shakespeare_split(len(tokens), input_file)  # before meta.json: a text too short writes nothing
    check_or_write_meta(out_dir, make_meta("shakespeare", None, 1, source))
    parts = {"val": (0, tokens[n_train:]), "train": (1, tokens[:n_train])}
    names = {}
    for split, (index, part) in parts.items():
        names[split] = [shard_name("shakespeare", split, index)]
        if not (out_dir / names[split][0]).exists():
            save_shard(out_dir / names[split][0], part)
    done = {"shards": names, "tokens": {split: len(part) for split, (_, part) in parts.items()}}
    write_json(out_dir / DONE_FILE, done)
    return done


def read_text_file(path) -> str:
    """A whole UTF-8 text file; an empty or undecodable one is an error that names it."""
    path = check_input_file(path, "one text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:  # its message has a position but no file name
        raise ValueError(f"{path} is not UTF-8 text ({err.reason}, byte {err.object[err.start]:#04x} at offset "
                         f"{err.start}): convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    if not text.strip():
        raise ValueError(f"input file {path} holds no text: pass a file with some")
    return text


def shakespeare_split(n_tokens: int, source) -> int:
    """Tokens of the train split (the first 90 %); refuses a text too short to give both splits the
    2 tokens of one (input, target) pair."""
    n_train = int(0.9 * n_tokens)
    if min(n_train, n_tokens - n_train) < 2:
        needed = next(n for n in itertools.count(n_tokens) if min(int(0.9 * n), n - int(0.9 * n)) >= 2)
        raise ValueError(f"input file {source} holds only {n_tokens} tokens (with <|endoftext|>): a train and "
                         f"a val split (90 % / 10 %) need at least {needed}; pass a longer text")
    return n_train


def ensure_shakespeare(data_dir, input_file=None) -> pathlib.Path:
    """Prepare tinyshakespeare in data_dir unless it is already there (DONE written); returns data_dir.

    Safe to call from every rank at once (all writes are atomic and identical), though calling it on
    rank 0 before a barrier saves the others the work.
    """
    data_dir = pathlib.Path(data_dir)
    meta = read_meta(data_dir)
    if read_done(data_dir) is not None and meta is not None and meta.get("name") == "shakespeare":
        return data_dir
    prepare_shakespeare(data_dir, input_file)
    return data_dir
