import io
import json
import lzma
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from helpers.data import get_batch, is_val, iter_sequential, open_split, prepare, read_meta, verify
from helpers.errors import DataError
from helpers.tokenizer import gpt2_encoding

DOCS = {f"urlsf_subset00-{i}_data/{i:07d}-{'abcdef'[i % 6]}.txt": f"Document {i}. " + "Some text here, número {i}! " * (i % 7 + 1)
        for i in range(60)}


def tar_bytes(files: dict, compress_xz=False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in files.items():
            data = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    return lzma.compress(raw) if compress_xz else raw


def make_owt(path, docs=DOCS, per_member=20, corrupt_member=False):
    """An archive in OpenWebText's exact subset layout: outer tar -> openwebtext/*.xz -> tar -> .txt"""
    items = list(docs.items())
    members = {}
    for k in range(0, len(items), per_member):
        members[f"openwebtext/urlsf_subset00-{k // per_member}_data.xz"] = tar_bytes(dict(items[k:k + per_member]), True)
    if corrupt_member:
        good = next(iter(members.values()))
        members["openwebtext/urlsf_subset00-99_data.xz"] = good[: len(good) // 2]  # truncated xz
    path.write_bytes(tar_bytes(members))
    return path


def decode_docs(data_dir, split):
    enc = gpt2_encoding()
    ids = np.fromfile(data_dir / f"{split}.bin", dtype=np.uint16).tolist()
    return [d for d in enc.decode(ids).split("<|endoftext|>") if d]


def test_owt_archive_token_counts_split_and_val_roundtrip(tmp_path):
    archive = make_owt(tmp_path / "urlsf_subset00.tar")
    meta = prepare(str(archive), tmp_path / "out", val_fraction=0.2, seed=7, progress=False)
    enc = gpt2_encoding()
    expected_tokens = sum(len(enc.encode_ordinary(t)) + 1 for t in DOCS.values())
    got = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    assert got == expected_tokens
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(DOCS)
    # the held-out documents come back, in order, from val.bin
    held_out = [t for n, t in DOCS.items() if is_val(f"openwebtext/urlsf_subset00-{list(DOCS).index(n) // 20}_data.xz/{n}", 7, 0.2)]
    assert decode_docs(tmp_path / "out", "val") == held_out and held_out
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["eot"] == 50256
    verify(tmp_path / "out")  # sha256 in meta.json matches the files


def test_split_is_deterministic_and_seed_dependent(tmp_path):
    archive = make_owt(tmp_path / "a.tar")
    a = prepare(str(archive), tmp_path / "a", val_fraction=0.3, seed=1, progress=False)
    b = prepare(str(archive), tmp_path / "b", val_fraction=0.3, seed=1, progress=False, num_threads=1)
    c = prepare(str(archive), tmp_path / "c", val_fraction=0.3, seed=2, progress=False)
    assert a["sha256"] == b["sha256"]  # same bytes whatever the thread count
    assert a["sha256"] != c["sha256"]


def test_folder_of_xz_files_equals_the_tar(tmp_path):
    archive = make_owt(tmp_path / "a.tar")
    (tmp_path / "xz").mkdir()
    with tarfile.open(archive) as t:
        for m in t.getmembers():
            (tmp_path / "xz" / os.path.basename(m.name)).write_bytes(t.extractfile(m).read())
    a = prepare(str(archive), tmp_path / "a", progress=False)
    b = prepare(str(tmp_path / "xz"), tmp_path / "b", progress=False)
    assert a["splits"]["train"]["tokens"] + a["splits"]["val"]["tokens"] == \
        b["splits"]["train"]["tokens"] + b["splits"]["val"]["tokens"]


def test_text_jsonl_glob_and_caps(tmp_path):
    (tmp_path / "t").mkdir()
    for i in range(30):
        (tmp_path / "t" / f"{i}.txt").write_text(f"file {i} " * 50)
    with open(tmp_path / "d.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"content": f"row {i} " * 40}) + "\n")
    a = prepare(str(tmp_path / "t"), tmp_path / "o1", val_fraction=0.2, progress=False)
    b = prepare(str(tmp_path / "d.jsonl"), tmp_path / "o2", text_field="content", val_fraction=0.2, progress=False)
    c = prepare(str(tmp_path / "t" / "*.txt"), tmp_path / "o3", val_fraction=0.2, progress=False, max_docs=10)
    assert sum(a["splits"][s]["documents"] for s in a["splits"]) == 30
    assert sum(b["splits"][s]["documents"] for s in b["splits"]) == 30
    assert sum(c["splits"][s]["documents"] for s in c["splits"]) == 10
    d = prepare(str(tmp_path / "t"), tmp_path / "o4", val_fraction=0.5, progress=False, max_tokens=500)
    assert 500 <= sum(d["splits"][s]["tokens"] for s in d["splits"]) < 500 + 200


def test_split_does_not_depend_on_where_the_corpus_lies(tmp_path):
    # names are relative to the folder or the glob's fixed prefix, so a copied corpus splits the same
    metas = []
    for where in ("here", "elsewhere/deeper"):
        (tmp_path / where / "t").mkdir(parents=True)
        for i in range(40):
            (tmp_path / where / "t" / f"{i}.txt").write_text(f"file {i} " * 20)
        metas.append([prepare(src, tmp_path / where / f"o{k}", val_fraction=0.3, progress=False)
                      for k, src in enumerate((str(tmp_path / where / "t"), str(tmp_path / where / "t" / "*.txt")))])
    for k in range(2):
        assert metas[0][k]["splits"] == metas[1][k]["splits"]
        assert metas[0][k]["sha256"] == metas[1][k]["sha256"]
    assert metas[0][0]["splits"] == metas[0][1]["splits"]


def test_embedded_default_records_its_files(tmp_path):
    meta = prepare("stdlib", tmp_path / "s", max_docs=40, progress=False)
    assert len(meta["files"]) > 500 and meta["files"] == sorted(meta["files"]) and meta["python"]
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 40


def test_corrupt_member_is_skipped_and_counted_or_fatal_when_strict(tmp_path):
    archive = make_owt(tmp_path / "a.tar", corrupt_member=True)
    with pytest.warns(UserWarning, match="skipping"):
        meta = prepare(str(archive), tmp_path / "o", progress=False)
    assert meta["skipped"]["count"] == 1 and "corrupt" in meta["skipped"]["examples"][0]["reason"]
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(DOCS)
    with pytest.raises(DataError, match="strict=True"):
        prepare(str(archive), tmp_path / "strict", strict=True, progress=False)
    assert not (tmp_path / "strict" / "train.bin").exists()


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_bytes(b"caf\xe9 au lait \xff\xfe ok " * 20)
    for i in range(20):
        (tmp_path / "t" / f"b{i}.txt").write_text("clean text " * 20)
    meta = prepare(str(tmp_path / "t"), tmp_path / "o", val_fraction=0.3, progress=False)
    assert meta["replaced_chars"] == 60 and meta["docs_with_replacements"] == 1


@pytest.mark.parametrize("vf", [0, 1, -0.1, 1.5])
def test_val_fraction_out_of_range(tmp_path, vf):
    with pytest.raises(DataError, match="val_fraction"):
        prepare("stdlib", tmp_path / "o", val_fraction=vf, progress=False)


def test_missing_path_and_empty_archive(tmp_path):
    with pytest.raises(DataError, match="no such file or folder.*stdlib"):
        prepare(str(tmp_path / "nope.tar"), tmp_path / "o", progress=False)
    (tmp_path / "empty.tar").write_bytes(tar_bytes({"openwebtext/x.xz": tar_bytes({"readme.md": "x"}, True)}))
    with pytest.raises(DataError, match="0 training tokens"):
        prepare(str(tmp_path / "empty.tar"), tmp_path / "o", progress=False)
    assert not (tmp_path / "o" / "train.bin").exists() and not (tmp_path / "o" / "meta.json").exists()


def test_unwritable_out_dir(tmp_path):
    (tmp_path / "file").write_text("x")  # a folder below a plain file can never be created
    with pytest.raises(DataError, match="not writable"):
        prepare("stdlib", tmp_path / "file" / "sub", progress=False)
    assert (tmp_path / "file").read_text() == "x"


def test_rerun_reuses_and_never_overwrites_another_dataset(tmp_path):
    archive = make_owt(tmp_path / "a.tar")
    out = tmp_path / "o"
    first = prepare(str(archive), out, progress=False)
    mtime = (out / "train.bin").stat().st_mtime_ns
    assert prepare(str(archive), out, progress=False)["created"] == first["created"]
    assert (out / "train.bin").stat().st_mtime_ns == mtime
    with pytest.raises(DataError, match="different dataset"):
        prepare("stdlib", out, progress=False, max_docs=5)
    assert read_meta(out)["sha256"] == first["sha256"]
    verify(out)
    prepare("stdlib", out, progress=False, max_docs=5, overwrite=True)
    assert read_meta(out)["source"] == "stdlib"


def test_killed_run_leaves_no_finished_looking_output(tmp_path):
    """SIGKILL a preparation midway: no train.bin or meta.json appears; a rerun completes."""
    big = tmp_path / "big"
    big.mkdir()
    for i in range(400):
        (big / f"{i}.txt").write_text(("word " * 5000) + str(i))
    code = ("import sys, time; import helpers.data as d; orig = d.encode_ids\n"
            "def slow(*a, **k):\n    time.sleep(0.02); return orig(*a, **k)\n"
            "d.encode_ids = slow\n"
            "d.prepare(sys.argv[1], sys.argv[2], progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(big), str(tmp_path / "o")])
    import time
    deadline = time.time() + 30
    while time.time() < deadline and not list((tmp_path / "o").glob(".train.bin.tmp")):
        time.sleep(0.05)
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    assert not (tmp_path / "o" / "train.bin").exists() and not (tmp_path / "o" / "meta.json").exists()
    meta = prepare(str(big), tmp_path / "o", progress=False)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 400


def test_batches_and_sequential_pass(tmp_path):
    prepare("stdlib", tmp_path / "s", max_docs=30, progress=False, val_fraction=0.2)
    train, val = open_split(tmp_path / "s", "train"), open_split(tmp_path / "s", "val")
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x1, y1 = get_batch(train, 32, 4, g1)
    x2, y2 = get_batch(train, 32, 4, g2)
    assert torch.equal(x1, x2) and x1.shape == (4, 32) and torch.equal(x1[:, 1:], y1[:, :-1])
    seen = torch.cat([y[y >= 0] for _, y in iter_sequential(val, 64, 3)])
    assert torch.equal(seen, torch.from_numpy(np.asarray(val[1:]).astype(np.int64)))


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_one_document_is_split_by_position(tmp_path, kind):
    """One novel as input.txt (or a .jsonl of one record): the last val_fraction of its tokens are
    the validation split, in order, and meta.json says the split was by position."""
    text = "".join(f"Chapter {i}. It was a dark and stormy night, número {i}.\n" for i in range(200))
    src = tmp_path / f"input.{kind}"
    src.write_text(text if kind == "txt" else json.dumps({"text": text}) + "\n")
    meta = prepare(str(src), tmp_path / "out", val_fraction=0.1, progress=False)
    enc = gpt2_encoding()
    ids = enc.encode_ordinary(text) + [enc.eot_token]
    n_val = round(len(ids) * 0.1)
    train = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16).tolist()
    val = np.fromfile(tmp_path / "out" / "val.bin", dtype=np.uint16).tolist()
    assert train + val == ids and len(val) == n_val
    assert meta["split"]["method"] == "position" and meta["split"]["val_from_token"] == len(ids) - n_val
    assert meta["splits"]["val"]["tokens"] == n_val and read_meta(tmp_path / "out") == meta
    verify(tmp_path / "out")  # hashes describe the rewritten files
    assert prepare(str(src), tmp_path / "out", val_fraction=0.1, progress=False) == meta  # reused as is


def test_many_documents_keep_the_hash_split(tmp_path):
    (tmp_path / "docs").mkdir()
    for name, text in list(DOCS.items())[:30]:
        (tmp_path / "docs" / f"{name.replace('/', '_')}").write_text(text)
    meta = prepare(str(tmp_path / "docs"), tmp_path / "out", val_fraction=0.2, progress=False)
    assert meta["split"] == {"method": "hash", "seed": 1337} and meta["splits"]["val"]["documents"] > 0


def test_overwrite_replaces_a_damaged_meta_json(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("Some text here, again and again. " * 200)
    prepare(str(src), tmp_path / "out", progress=False)
    (tmp_path / "out" / "meta.json").write_text('{"version": 1, "par')  # truncated
    with pytest.raises(DataError, match="damaged.*overwrite=True"):
        prepare(str(src), tmp_path / "out", progress=False)
    meta = prepare(str(src), tmp_path / "out", overwrite=True, progress=False)
    assert read_meta(tmp_path / "out") == meta
    verify(tmp_path / "out")


def test_jsonl_records_whose_text_is_not_a_string_are_skipped(tmp_path):
    src = tmp_path / "d.jsonl"
    rows = [{"text": f"row {i} " * 40} for i in range(20)] + [{"text": 5}, {"text": None}, {"text": ["a"]}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match="d.jsonl:21: not a JSON object with a 'text' string"):
        meta = prepare(str(src), tmp_path / "out", val_fraction=0.2, progress=False)
    assert meta["skipped"]["count"] == 3
    assert sum(meta["splits"][s]["documents"] for s in meta["splits"]) == 20
    with pytest.raises(DataError, match="d.jsonl:21: not a JSON object with a 'text' string"):
        prepare(str(src), tmp_path / "strict", strict=True, progress=False)


def test_meta_json_without_params_names_the_folder(tmp_path):
    """A meta.json made by something else (valid JSON, no params) is another dataset, said in one line."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "meta.json").write_text('{"version": 1}')
    with pytest.raises(DataError, match="holds a different dataset.*overwrite=True"):
        prepare("stdlib", tmp_path / "out", max_docs=5, progress=False)


def test_verify_names_a_missing_bin_file(tmp_path):
    prepare("stdlib", tmp_path / "s", max_docs=10, progress=False, val_fraction=0.2)
    (tmp_path / "s" / "val.bin").unlink()
    with pytest.raises(DataError, match="val.bin: missing; prepare the data again"):
        verify(tmp_path / "s")


def test_hf_dataset_rows_without_the_text_field_are_named(tmp_path, monkeypatch):
    """hf:<id> with the wrong text_field: one error naming the row, the fields it has and the fix."""
    import types
    rows = [{"content": f"row {i} " * 30, "id": i} for i in range(5)]
    fake = types.SimpleNamespace(load_dataset=lambda name, split, streaming: iter(rows))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataError, match=r"hf:some/set:0: no 'text' string in this row \(fields: \['content', 'id'\]\); "
                                        "pass text_field=<the text column>"):
        prepare("hf:some/set", tmp_path / "a", strict=True, progress=False)
    meta = prepare("hf:some/set", tmp_path / "b", text_field="content", val_fraction=0.4, progress=False)
    assert sum(meta["splits"][s]["documents"] for s in meta["splits"]) == 5
