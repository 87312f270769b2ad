"""prepare_data.py / gpt2/shards.py: shards round-trip to the input documents, with tiktoken's counts,
the asked sizes, atomic and resumable writes, and clear errors."""
import json
import os
import sys
import types
import urllib.error

import numpy as np
import pytest
import tiktoken

import prepare_data
from gpt2 import shards

from conftest import need_package, running, wait_for

SHARD = 7000


@pytest.fixture
def enc():
    return tiktoken.get_encoding("gpt2")


@pytest.fixture
def fineweb(shared_data):
    path = shared_data / "fineweb_sample" / "fineweb_edu_150.jsonl"
    docs = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    return path, docs


def reference_stream(enc, docs):
    """Independent of gpt2/shards.py: <|endoftext|> before every document, straight from tiktoken."""
    return np.concatenate([[enc.eot_token] + enc.encode_ordinary(d) for d in docs]).astype(np.int64)


def shard_files(folder):
    return sorted(folder.glob("*.npy"), key=lambda p: p.name.rsplit("_", 1)[-1])


def load_all(folder):
    return {p.name: np.load(p) for p in shard_files(folder)}


def test_shakespeare_round_trip(shared_data, tmp_path, enc):
    text_file = shared_data / "tinyshakespeare.txt"
    prepare_data.main(["shakespeare", "--input", str(text_file), "--out", str(tmp_path)])
    val = np.load(tmp_path / "shakespeare_val_000000.npy")
    train = np.load(tmp_path / "shakespeare_train_000001.npy")
    assert val.dtype == train.dtype == np.uint16 and val.ndim == train.ndim == 1
    text = text_file.read_text(encoding="utf-8")
    expected = [enc.eot_token] + enc.encode_ordinary(text)
    assert len(train) + len(val) == len(expected) == 338_026
    assert len(train) == int(0.9 * len(expected))
    assert np.array_equal(np.concatenate([train, val]), expected)  # train first, val the last 10 %
    assert enc.decode(np.concatenate([train, val]).tolist()) == "<|endoftext|>" + text
    # ensure_shakespeare finds it prepared and rewrites nothing
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    shards.ensure_shakespeare(tmp_path)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == mtimes


def test_shipped_shakespeare_is_the_text_and_its_tokens(shared_data, enc):
    text = shards.shipped_shakespeare_text()
    assert text == (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")
    tokens = shards.shipped_shakespeare_tokens()
    assert tokens.dtype == np.uint16 and np.array_equal(tokens, [enc.eot_token] + enc.encode_ordinary(text))


def test_shakespeare_offline_from_the_shipped_copy(shared_data, tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(shards.urllib.request, "urlopen", offline)
    monkeypatch.setattr(shards, "tokenize_document", None)  # the shipped text needs no BPE
    shards.ensure_shakespeare(tmp_path / "shipped")
    prepare_data.main(["shakespeare", "--out", str(tmp_path / "cli")])
    monkeypatch.undo()
    prepare_data.main(["shakespeare", "--input", str(shared_data / "tinyshakespeare.txt"), "--out", str(tmp_path / "file")])
    for name in ("shakespeare_val_000000.npy", "shakespeare_train_000001.npy", "meta.json", "DONE"):
        assert (tmp_path / "shipped" / name).read_bytes() == (tmp_path / "file" / name).read_bytes()
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "file" / name).read_bytes()
    monkeypatch.setattr(shards.urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit, match="--input FILE"):
        prepare_data.main(["shakespeare", "--url", "https://example.com/x.txt", "--out", str(tmp_path / "url")])


def test_the_wheel_ships_the_shakespeare_assets(tmp_path):
    """A non-editable install finds the shipped text and tokens (pyproject's package-data)."""
    import subprocess
    import zipfile

    from conftest import REPO

    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    source = tmp_path / "source"
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes((REPO / name).read_bytes())
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "wheel"), str(source)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "wheel").glob("*.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "installed")
    code = "from gpt2 import shards; print(shards.__file__, len(shards.shipped_shakespeare_tokens()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "installed")}).stdout
    assert out.startswith(str(tmp_path / "installed")) and out.split()[-1] == "338026", out


def test_fineweb_shards_round_trip(fineweb, tmp_path, enc):
    path, docs = fineweb
    done = shards.prepare_fineweb(tmp_path, inputs=[path], shard_size=SHARD, workers=1, progress=False)
    files = shard_files(tmp_path)
    names = [p.name for p in files]
    assert names[0] == "edufineweb_val_000000.npy"
    assert names[1:] == [f"edufineweb_train_{i:06d}.npy" for i in range(1, len(files))]
    assert done["shards"] == {"val": names[:1], "train": names[1:]}
    arrays = [np.load(p) for p in files]
    assert all(a.dtype == np.uint16 and a.ndim == 1 for a in arrays)
    assert [len(a) for a in arrays[:-1]] == [SHARD] * (len(arrays) - 1) and 0 < len(arrays[-1]) <= SHARD
    stream = np.concatenate(arrays).astype(np.int64)
    expected = reference_stream(enc, docs)
    assert len(stream) == len(expected) == 89_288 + 150
    assert np.array_equal(stream, expected)
    # round trip: split at <|endoftext|> and decode
    cuts = np.flatnonzero(stream == enc.eot_token)
    decoded = [enc.decode(stream[a + 1:b].tolist()) for a, b in zip(cuts, list(cuts[1:]) + [len(stream)])]
    assert decoded == docs
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["tokenizer"] == "gpt2" and meta["shard_size"] == SHARD and meta["dtype"] == "uint16"
    assert done["tokens"] == {"val": SHARD, "train": len(expected) - SHARD}


def test_pool_and_csv_give_the_same_shards(fineweb, shared_data, tmp_path):
    path, _ = fineweb
    shards.prepare_fineweb(tmp_path / "one", inputs=[path], shard_size=SHARD, workers=1, progress=False)
    csv_path = shared_data / "fineweb_sample" / "fineweb_edu_150_scored.csv"
    shards.prepare_fineweb(tmp_path / "pool", inputs=[csv_path], shard_size=SHARD, workers=2, progress=False)
    one, pool = load_all(tmp_path / "one"), load_all(tmp_path / "pool")
    assert one.keys() == pool.keys()
    assert all(np.array_equal(one[k], pool[k]) for k in one)


def test_pool_keeps_document_order_across_chunks(fineweb):
    import multiprocessing

    _, docs = fineweb
    docs = docs[:40]
    with multiprocessing.get_context().Pool(2) as pool:
        pooled = list(shards.tokenize_stream(iter(docs), pool, chunk_docs=7))
    serial = list(shards.tokenize_stream(docs))
    assert len(pooled) == len(serial) == 40
    assert all(np.array_equal(a, b) for a, b in zip(pooled, serial))


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def disk_full(f, arr, allow_pickle):
        f.write(b"\x93NUMPY half a shard")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shards.np, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        shards.save_shard(tmp_path / "x_train_000001.npy", np.arange(10, dtype=np.uint16))
    assert list(tmp_path.iterdir()) == []


def test_rerun_skips_complete_shards_and_is_identical(fineweb, tmp_path, monkeypatch):
    path, _ = fineweb
    shards.prepare_fineweb(tmp_path, inputs=[path], shard_size=SHARD, workers=1, progress=False)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in shard_files(tmp_path)}
    tokenized = []
    monkeypatch.setattr(shards, "tokenize_document", tokenized.append)
    shards.prepare_fineweb(tmp_path, inputs=[path], shard_size=SHARD, workers=1, progress=False)
    assert tokenized == [], "a complete folder needs no tokenizing"
    monkeypatch.undo()
    missing = "edufineweb_train_000003.npy"
    (tmp_path / missing).unlink()
    shards.prepare_fineweb(tmp_path, inputs=[path], shard_size=SHARD, workers=1, progress=False)
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in shard_files(tmp_path)}
    assert after.keys() == before.keys()
    for name in before:
        assert after[name][0] == before[name][0], name
        if name != missing:
            assert after[name][1] == before[name][1], f"{name} was rewritten"


def test_rerun_after_the_trainer_deleted_shards_does_not_rewrite_them(fineweb, tmp_path):
    path, _ = fineweb
    done = shards.prepare_fineweb(tmp_path, inputs=[path], shard_size=SHARD, workers=1, progress=False)
    consumed = done["shards"]["train"][:5]
    shards.delete_consumed_shards(tmp_path, consumed)
    (tmp_path / "DONE").unlink()
    (tmp_path / "progress.json").unlink()  # the slow path: tokenize everything, skip what exists or was consumed
    assert shards.prepare_fineweb(tmp_path, inputs=[path], shard_size=SHARD, workers=1, progress=False) == done
    assert not any((tmp_path / n).exists() for n in consumed)
    assert shards.read_consumed(tmp_path) == set(consumed)


def test_killed_run_leaves_only_complete_shards(fineweb, tmp_path, monkeypatch):
    tokenize = shards.tokenize_document
    path, docs = fineweb
    shards.prepare_fineweb(tmp_path / "ref", inputs=[path], shard_size=SHARD, workers=1, progress=False)
    reference = load_all(tmp_path / "ref")

    def killed_midway():
        yield from docs[:70]
        raise KeyboardInterrupt("killed")

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        shards.write_shards(killed_midway(), out, "edufineweb", SHARD, source=shards.describe_local_inputs([path]),
                            fingerprint=shards.fingerprint_local_inputs([path]), progress=False)
    left = sorted(p.name for p in out.iterdir())
    assert "DONE" not in left and {"meta.json", "progress.json"} <= set(left)
    written = load_all(out)
    assert 0 < len(written) < len(reference) and len(left) == len(written) + 2  # no temporary file left
    assert all(np.array_equal(written[k], reference[k]) for k in written)
    # a SIGKILL in the middle of a write leaves a temporary file; the rerun removes it
    stale = out / ".edufineweb_train_000009.npy.tmp.999999999"
    stale.write_bytes(b"half a shard")
    tokenized = []
    monkeypatch.setattr(shards, "tokenize_document", lambda text: tokenized.append(text) or tokenize(text))
    shards.prepare_fineweb(out, inputs=[path], shard_size=SHARD, workers=1, progress=False)
    assert not stale.exists()
    finished = load_all(out)
    assert finished.keys() == reference.keys()
    assert all(np.array_equal(finished[k], reference[k]) for k in reference)
    # the rerun resumed inside the document where the last complete shard ended
    n_tokens = sum(len(a) for a in written.values())
    first = np.searchsorted(np.cumsum([len(tokenize(d)) for d in docs]), n_tokens, side="right")
    assert tokenized == docs[first:], f"tokenized from document {docs.index(tokenized[0])}, expected {first}"


def test_folder_of_other_settings_is_refused(fineweb, tmp_path):
    path, docs = fineweb
    shards.prepare_fineweb(tmp_path, inputs=[path], shard_size=SHARD, workers=1, progress=False)
    with pytest.raises(ValueError, match="shard_size: 7000 there, 8000 now"):
        shards.prepare_fineweb(tmp_path, inputs=[path], shard_size=8000, workers=1, progress=False)
    meta = json.loads((tmp_path / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "tokenizer": "cl100k_base"}))
    with pytest.raises(ValueError, match="tokenizer: 'cl100k_base' there, 'gpt2' now"):
        shards.prepare_fineweb(tmp_path, inputs=[path], shard_size=SHARD, workers=1, progress=False)
    (tmp_path / "meta.json").unlink()
    with pytest.raises(ValueError, match="not written by prepare_data.py"):
        shards.prepare_fineweb(tmp_path, inputs=[path], shard_size=SHARD, workers=1, progress=False)


def test_input_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        shards.prepare_fineweb(tmp_path / "o1", inputs=[tmp_path / "nope.jsonl"], shard_size=SHARD, progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"content": "no text here"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 has no 'text' field \(it has: \['content'\]\)"):
        shards.prepare_fineweb(tmp_path / "o2", inputs=[bad], shard_size=SHARD, progress=False)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n\n{"text": oops}\n')
    with pytest.raises(ValueError, match=f"{broken}:3 is not valid JSON"):
        list(shards.iter_local_documents([broken]))
    odd = tmp_path / "docs.xml"
    odd.write_text("<doc/>")
    with pytest.raises(ValueError, match="unknown type"):
        list(shards.iter_local_documents([odd]))
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    parquet = tmp_path / "docs.parquet"
    parquet.write_bytes(b"PAR1")
    with pytest.raises(ImportError, match="pip install pyarrow"):
        list(shards.iter_local_documents([parquet]))


def test_text_too_short_for_a_train_shard_is_an_error_that_names_the_fix(shared_data, tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("A few words, far fewer than one shard of tokens.")
    with pytest.raises(SystemExit) as stop:
        prepare_data.main(["fineweb", "--input", str(text), "--out", str(tmp_path / "out"), "--no_progress"])
    assert "holds no train shard" in str(stop.value) and "more than 1,000 tokens: pass more text" in str(stop.value)
    assert "train: 0 shards" in capsys.readouterr().err
    assert list((tmp_path / "out").glob("*_val_*.npy"))  # what was written stays
    # enough text for a smaller shard size: the advice names one (a tenth of the text, at least 1000)
    with pytest.raises(SystemExit, match=r"all 89,438 tokens went to the val shard .* --shard_size 8,943$"):
        prepare_data.main(["fineweb", "--input", str(shared_data / "fineweb_sample" / "fineweb_edu_150.jsonl"),
                           "--out", str(tmp_path / "out2"), "--no_progress", "--shard_size", "1e5"])


def test_parquet_input(fineweb, tmp_path, enc):
    pa = need_package("pyarrow")
    import pyarrow.parquet as pq

    _, docs = fineweb
    docs = docs[:30]
    pq.write_table(pa.table({"id": list(range(30)), "text": docs}), tmp_path / "docs.parquet", row_group_size=7)
    shards.prepare_fineweb(tmp_path / "out", inputs=[tmp_path / "docs.parquet"], shard_size=SHARD, progress=False)
    stream = np.concatenate(list(load_all(tmp_path / "out").values()))
    assert np.array_equal(stream, reference_stream(enc, docs))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "no_text.parquet")
    with pytest.raises(ValueError, match="no 'text' column"):
        list(shards.iter_local_documents([tmp_path / "no_text.parquet"]))


def test_plain_text_files_are_documents(tmp_path, enc):
    texts = ["First document.\n", "Second one, with <|endoftext|> as plain text."]
    paths = []
    for i, text in enumerate(texts):
        paths.append(tmp_path / f"{i}.txt")
        paths[-1].write_text(text)
    shards.prepare_fineweb(tmp_path / "out", inputs=paths, shard_size=5, workers=1, progress=False)
    stream = np.concatenate(list(load_all(tmp_path / "out").values()))
    assert np.array_equal(stream, reference_stream(enc, texts))


def test_hub_streaming_and_its_errors(tmp_path, monkeypatch, enc):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"pip install datasets \(or pip install -e .\[data\]\)"):
        shards.prepare_fineweb(tmp_path / "a", shard_size=SHARD, progress=False)

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb-edu' on the Hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=unreachable))
    with pytest.raises(RuntimeError, match="Hugging Face hub .*pass local .* with --input"):
        shards.prepare_fineweb(tmp_path / "b", shard_size=SHARD, progress=False)

    docs = ["one streamed document", "and another"]
    calls = []

    def load_dataset(path, name, split, streaming):
        calls.append((path, name, split, streaming))
        return iter({"text": d, "id": i} for i, d in enumerate(docs))

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    shards.prepare_fineweb(tmp_path / "c", shard_size=4, progress=False)
    assert calls == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)]
    stream = np.concatenate(list(load_all(tmp_path / "c").values()))
    assert np.array_equal(stream, reference_stream(enc, docs))


def test_a_failed_hub_prepare_does_not_hold_the_folder(tmp_path, monkeypatch):
    """prepare_data.py fineweb fails before its first shard (no `datasets` here): the folder holds no shards,
    so a prepare with other settings may still use it."""
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        shards.prepare_fineweb(tmp_path, shard_size=SHARD, progress=False)
    text = tmp_path / "doc.txt"
    text.write_text("A local document instead.")
    shards.prepare_fineweb(tmp_path, inputs=[text], shard_size=5, workers=1, progress=False)
    assert json.loads((tmp_path / "meta.json").read_text())["source"].startswith("files:doc.txt")
    with pytest.raises(ValueError, match="holds shards made with other settings"):  # now it holds shards
        shards.prepare_fineweb(tmp_path, shard_size=SHARD, progress=False)


# -- Ctrl-C, kill -9 ------------------------------------------------------------------------------------------

def run_prepare(args, **kwargs):
    """prepare_data.py in its own process group (Ctrl-C in a terminal signals the whole group), with the
    default SIGINT handling even where this test runs as a background job (which ignores SIGINT)."""
    import signal
    import subprocess

    from conftest import REPO

    return subprocess.Popen([sys.executable, str(REPO / "prepare_data.py"), *map(str, args)], cwd=REPO,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("stop", ["ctrl-c", "kill"])
def test_a_stop_prints_one_line_and_the_rerun_finishes(fineweb, tmp_path, workers, stop):
    """SIGINT to the process group (Ctrl-C) or SIGTERM to the producer alone (kill) while it waits for disk
    room (--max_shards_on_disk 2): one line, exit code 130 or 143, no traceback from the parent or a pool
    worker; the rerun writes the uninterrupted files."""
    import signal

    path, _ = fineweb
    shards.prepare_fineweb(tmp_path / "ref", inputs=[path], shard_size=1000, workers=1, progress=False)
    out = tmp_path / "out"
    args = ["fineweb", "--input", path, "--out", out, "--shard_size", 1000, "--workers", workers, "--no_progress"]
    producer = run_prepare(args + ["--max_shards_on_disk", 2])
    try:
        wait_for(lambda: producer.poll() is not None or len(list(out.glob("*_train_*.npy"))) == 2, "2 train shards")
        wait_for(lambda: json.loads((out / "progress.json").read_text())["next_index"] == 3, "progress.json")
        if stop == "ctrl-c":
            os.killpg(producer.pid, signal.SIGINT)
        else:
            producer.send_signal(signal.SIGTERM)
        err = producer.communicate(timeout=60)[1]
    finally:
        producer.kill()
    assert producer.returncode == {"ctrl-c": 130, "kill": 143}[stop], err
    assert err.splitlines() == [f"prepare_data.py: interrupted: 3 shards written to {out} by this run (3 done in "
                                "all); run the same command again to continue"], err
    rerun = run_prepare(args)
    assert rerun.communicate(timeout=120)[1].endswith("tokens\n") and rerun.returncode == 0
    reference = load_all(tmp_path / "ref")
    assert load_all(out).keys() == reference.keys()
    assert all(np.array_equal(load_all(out)[k], reference[k]) for k in reference)


def test_pool_workers_end_with_their_parent(tmp_path):
    """kill -9 of the producer: its tokenizer processes, even busy ones, end at once (and print nothing),
    rather than finish their work and fail with BrokenPipeError tracebacks."""
    import signal
    import subprocess

    code = ("import sys, time; from gpt2 import shards; pool = shards._tokenizer_pool(2); "
            "[pool.apply_async(time.sleep, (60,)) for _ in range(2)]; "
            "print(*[p.pid for p in pool._pool], flush=True); time.sleep(60)")
    from conftest import REPO

    parent = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(workers) == 2
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    wait_for(lambda: not any(map(running, workers)), "the workers to end", timeout=5)


def test_busy_pool_workers_stop_without_a_traceback(tmp_path):
    """prepare_data.py turns SIGTERM into KeyboardInterrupt; workers forked with that handler, sent SIGTERM
    by Pool.terminate while busy (or before their initializer ran), would each print a traceback."""
    import subprocess

    from conftest import REPO

    code = ("import signal, time; from gpt2 import shards\n"
            "def stop(signum, frame): raise KeyboardInterrupt\n"
            "signal.signal(signal.SIGTERM, stop); pool = shards._tokenizer_pool(2)\n"
            "jobs = [pool.apply_async(time.sleep, (60,)) for _ in range(2)]; time.sleep(2)\n"
            "pool.terminate(); pool.join(); print('stopped')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.stdout == "stopped\n" and result.stderr == "", result.stderr[-2000:]


def test_a_pool_starts_from_another_thread_too(tmp_path):
    """Signal handlers can only be set on the main thread: a producer run in a thread keeps them as they are."""
    import threading

    result = {}
    thread = threading.Thread(target=lambda: result.update(done=shards.write_shards(
        [f"document {i} " * 20 for i in range(300)], tmp_path, "pool", 2000, source="test", workers=2,
        progress=False)))
    thread.start()
    thread.join(timeout=120)
    assert len(result["done"]["shards"]["train"]) > 1


@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_pool_workers_start_under_every_start_method(tmp_path, start_method):
    """Under forkserver a worker's parent process is the server, not the producer: a worker that took the
    server for a dead producer would exit at once, and the pool would start workers forever."""
    import subprocess

    from conftest import REPO

    code = ("import multiprocessing\n"
            "if __name__ == '__main__':\n"
            f"    multiprocessing.set_start_method({start_method!r})\n"
            "    from gpt2.shards import write_shards\n"
            "    texts = [f'document {i} ' * 20 for i in range(300)]\n"
            f"    done = write_shards(texts, {str(tmp_path)!r}, 'pool', 2000, source='test', workers=2, progress=False)\n"
            "    print(len(done['shards']['train']))\n")
    script = tmp_path / "pool.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0 and int(result.stdout) > 1, result.stderr[-2000:]


# -- input errors name the file, the line and the fix --------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_a_text_that_is_not_a_string_names_file_and_line(tmp_path, workers):
    for value, kind in [("5", "int"), ("null", "null"), ('["a"]', "list")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"text": "fine"}\n' + '{"text": %s}\n' % value)
        with pytest.raises(ValueError, match=rf"^{bad}:2: 'text' is {kind}, not a string"):
            shards.prepare_fineweb(tmp_path / kind, inputs=[bad], shard_size=SHARD, workers=workers, progress=False)


def test_a_csv_with_a_byte_order_mark_reads_as_without(tmp_path):
    """Excel writes UTF-8 CSVs with a BOM, which would otherwise make the header '\ufefftext', not 'text'."""
    plain, marked = tmp_path / "plain.csv", tmp_path / "marked.csv"
    plain.write_bytes(b"text,id\nhello world,1\n")
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert list(shards.iter_local_documents([marked])) == list(shards.iter_local_documents([plain])) == ["hello world"]


def test_parquet_errors_name_the_file(tmp_path):
    pa = need_package("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["fine", None]}), tmp_path / "null.parquet")
    with pytest.raises(ValueError, match=r"null.parquet row 2: 'text' is null, not a string"):
        list(shards.iter_local_documents([tmp_path / "null.parquet"]))
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"not a parquet file at all")
    with pytest.raises(ValueError, match=rf"^{corrupt} is not a readable parquet file \(.*\): a partial download"):
        list(shards.iter_local_documents([corrupt]))


def test_prefix_must_be_a_plain_name_that_keeps_the_splits_apart(fineweb, tmp_path):
    path, _ = fineweb
    for prefix in ["../esc", "sub/x", "", ".hidden", "my_train", "a_val", "x_val_y"]:
        with pytest.raises(SystemExit, match=rf"^prepare_data.py: error: --prefix {prefix!r}"):
            prepare_data.main(["fineweb", "--input", str(path), "--out", str(tmp_path / "out"), "--prefix", prefix,
                               "--shard_size", "1000", "--workers", "1", "--no_progress"])
    assert list(tmp_path.rglob("*.npy")) == [] and not (tmp_path / "esc_val_000000.npy").exists()
    with pytest.raises(ValueError, match=r"would match the pattern \*_train_\*.npy .* \(e.g. my\)"):
        shards.check_prefix("my_train")
    for prefix in ["my-data.v2", "fineweb_edu", "trainset", "valid_x", "x_trainer"]:
        shards.check_prefix(prefix)


def test_empty_or_too_short_input_is_an_error_that_says_so(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    for text in (empty, blank):
        with pytest.raises(ValueError, match=rf"^input file {text} holds no text"):
            shards.prepare_shakespeare(tmp_path / "s", text)
    short = tmp_path / "short.txt"
    short.write_text("Hello there")  # 2 tokens and <|endoftext|>
    with pytest.raises(ValueError, match=r"holds only 3 tokens .* need at least 11; pass a longer text"):
        shards.prepare_shakespeare(tmp_path / "s", short)
    assert list((tmp_path / "s").iterdir()) == []  # no meta.json: the folder stays free for any text
    jsonl = tmp_path / "empty.jsonl"
    jsonl.write_text("")
    with pytest.raises(ValueError, match=rf"^input file {jsonl} holds no text"):
        shards.prepare_fineweb(tmp_path / "f", inputs=[jsonl], shard_size=SHARD, progress=False)
    jsonl.write_text("\n\n")
    with pytest.raises(ValueError, match=r"holds no text \(no documents\)"):
        shards.prepare_fineweb(tmp_path / "f", inputs=[jsonl], shard_size=SHARD, progress=False)
    assert not list((tmp_path / "f").glob("*.npy")) and not (tmp_path / "f" / "DONE").exists()


def test_file_and_folder_errors_name_them_and_the_fix(tmp_path, monkeypatch):
    latin1 = "caf\xe9 au lait".encode("latin-1")
    for name, data in [("a.txt", latin1), ("b.jsonl", b'{"text": "ok"}\n{"text": "' + latin1 + b'"}\n'),
                       ("c.csv", b"text\n" + latin1 + b"\n")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=rf"^{tmp_path / name}(:2)? is not UTF-8 text .* convert"):
            list(shards.iter_local_documents([tmp_path / name]))
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'a.txt'} is not UTF-8 text .*byte 0xe9 at offset 3"):
        shards.prepare_shakespeare(tmp_path / "s", tmp_path / "a.txt")
    with pytest.raises(ValueError, match=rf"^input {tmp_path} is a folder: pass the files in it"):
        shards.prepare_fineweb(tmp_path / "o", inputs=[tmp_path], shard_size=SHARD, progress=False)
    with pytest.raises(ValueError, match=rf"^--out {tmp_path / 'a.txt'} is a file, not a folder"):
        shards.prepare_shakespeare(tmp_path / "a.txt")
    with pytest.raises(OSError, match=rf"^cannot create the output folder {tmp_path / 'a.txt' / 'sub'} \(Not a"):
        shards.prepare_shakespeare(tmp_path / "a.txt" / "sub")

    def read_only(path, write):
        raise PermissionError(13, "Permission denied", str(path.with_name(f".{path.name}.tmp.1226")))

    monkeypatch.setattr(shards, "write_atomic", read_only)  # tests may run as root, which chmod does not stop
    with pytest.raises(OSError, match=rf"^cannot write in the output folder {tmp_path / 'ro'} \(Permission denied\)"):
        shards.prepare_shakespeare(tmp_path / "ro")


# -- settings ------------------------------------------------------------------------------------------------

def test_shard_size_takes_1e8_and_refuses_sizes_that_cannot_work(tmp_path, monkeypatch, capsys):
    def shard_size(text):
        return prepare_data.parse_args(["fineweb", "--out", "x", "--shard_size", text]).shard_size

    assert shard_size("1e8") == shard_size("100_000_000") == 100_000_000 and shard_size("1000") == 1000
    for text in ["999", "1e2", "1500.5", "lots", "inf"]:
        with pytest.raises(SystemExit):
            shard_size(text)
        assert "--shard_size" in capsys.readouterr().err
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"^--shard_size 1,000,000,000,000,000 needs a buffer of 2000000.0 GB"):
        shards.prepare_fineweb(out, inputs=[tmp_path], shard_size=10**15, progress=False)
    assert not out.exists()  # refused before meta.json

    physical = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 250_000}  # 1 GB, where overcommit would not say so
    monkeypatch.setattr(shards.os, "sysconf", physical.__getitem__)
    with pytest.raises(ValueError, match=r"^--shard_size 600,000,000 needs .* more than this machine's 1.0 GB"):
        shards.shard_buffer(600_000_000)

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(shards.np, "empty", no_memory)
    with pytest.raises(ValueError, match=r"^--shard_size 10,000 needs .* could not be allocated: use a smaller"):
        shards.shard_buffer(10_000)


def test_workers_must_be_positive(capsys):
    for workers in ["0", "-2", "two"]:
        with pytest.raises(SystemExit):
            prepare_data.parse_args(["fineweb", "--out", "x", "--workers", workers])
        assert "--workers" in capsys.readouterr().err
    assert prepare_data.parse_args(["fineweb", "--out", "x", "--workers", "3"]).workers == 3


def test_an_input_of_the_same_name_and_size_but_other_content_is_refused(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "the first version of this document"}\n' * 50)
    out = tmp_path / "out"
    shards.prepare_fineweb(out, inputs=[docs], shard_size=50, workers=1, progress=False)
    docs.write_text('{"text": "the other version of this document"}\n' * 50)  # same name, same size
    with pytest.raises(ValueError, match=r"holds shards made with other settings \(fingerprint: 'sha256:"):
        shards.prepare_fineweb(out, inputs=[docs], shard_size=50, workers=1, progress=False)
    # a folder an older version prepared has no fingerprint in meta.json: still accepted
    docs.write_text('{"text": "the first version of this document"}\n' * 50)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "fingerprint"}))
    shards.prepare_fineweb(out, inputs=[docs], shard_size=50, workers=1, progress=False)
    assert json.loads((out / "meta.json").read_text()) == meta


def test_a_damaged_progress_json_costs_only_itself(fineweb, tmp_path):
    path, _ = fineweb
    reference = shards.prepare_fineweb(tmp_path, inputs=[path], shard_size=SHARD, workers=1, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in shard_files(tmp_path)}
    (tmp_path / "DONE").unlink()
    for damage in ["{}", '{"next_index": 3', "[1, 2]"]:
        (tmp_path / "progress.json").write_text(damage)
        with pytest.raises(ValueError, match=r"progress.json is damaged \(.*\); .*: delete it and run the same "
                                             r"prepare_data.py command again: it keeps the shards"):
            shards.prepare_fineweb(tmp_path, inputs=[path], shard_size=SHARD, workers=1, progress=False)
    # the advice holds: without progress.json the rerun finds every shard there and rewrites none
    (tmp_path / "progress.json").unlink()
    assert shards.prepare_fineweb(tmp_path, inputs=[path], shard_size=SHARD, workers=1, progress=False) == reference
    assert {p.name: p.stat().st_mtime_ns for p in shard_files(tmp_path)} == before
