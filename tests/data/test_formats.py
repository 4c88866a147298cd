"""Published prompt-set formats: Webster's parquet, MemBench's csv, the seeded split and `diffmem manifest convert`."""

import io
import json
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmem.cli import main
from diffmem.data import (
    ManifestEntry,
    SplitConfig,
    convert_manifest,
    fetch_references,
    read_entries,
    read_manifest,
    read_prompt_records,
    read_prompts,
    write_manifest,
)
from diffmem.errors import PromptFileError
from diffmem.data.formats import WEBSTER_LABELS, assign_splits, detect_format

from published import NEMO_MEM, NEMO_UNMEM, WEN, needs_data

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:
    pa = pq = None

needs_pyarrow = pytest.mark.skipif(pq is None, reason="pyarrow is not installed (pip install 'diffmem[formats]')")


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Never touch the real ~/.cache, and never send 127.0.0.1 requests through a proxy."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DIFFMEM_CACHE", raising=False)
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # keeps main() from sizing torch threads


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(PromptFileError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


WEBSTER_ROWS = [
    # caption, url, overfit_type, retrieved_urls, mse_real_gen
    ("Galaxy Women's Leather Boots", "http://h.invalid/boots.jpg", "TV", ["http://h.invalid/t1.jpg"], 812.5),
    ("Mothers influence on her young hippo", "http://h.invalid/hippo.jpg", "MV", [], 120.0),
    ("a retrieved one", "http://h.invalid/r.jpg", "RV", ["http://h.invalid/r2.jpg", "http://h.invalid/r3.jpg"], 9e3),
    ("an ordinary caption", "http://h.invalid/n.jpg", "N", [], float("nan")),
    ("another ordinary caption", None, "N", [], 1e4),
]


def webster_parquet(tmp_path: Path, rows=WEBSTER_ROWS, name="sdv1_bb_edge_groundtruth.parquet", **columns) -> Path:
    data = {
        "caption": [r[0] for r in rows],
        "url": [r[1] for r in rows],
        "overfit_type": [r[2] for r in rows],
        "retrieved_urls": [r[3] for r in rows],
        "mse_real_gen": [r[4] for r in rows],
        "gen_seeds": [[0, 3] if r[2] != "N" else [] for r in rows],
        "__index_level_0__": list(range(100, 100 + len(rows))),  # what pandas writes for a non-default index
        **columns,
    }
    path = tmp_path / name
    pq.write_table(pa.table(data), path)
    return path


MEMBENCH = (
    ",prompt,urls\n"
    "0,The No Limits Business Woman Podcast,\"['http://m.invalid/a.jpg', 'http://m.invalid/b.jpg']\"\n"
    "1,\"Sting Like A Bee, By Louisa\",['http://m.invalid/c.jpg']\n"
    "2,a prompt without images,[]\n"
    "3,another memorized prompt,\"('http://m.invalid/d.jpg',)\"\n"
)


# -- the seeded split -------------------------------------------------------------------------------------------


def test_split_is_seeded_exact_and_order_free():
    prompts = [f"prompt {i}" for i in range(101)]
    labels = [i % 10 != 0 for i in range(101)]  # 90 memorized, 11 not
    splits = assign_splits(prompts, labels, SplitConfig(seed=0))
    assert Counter(splits) == Counter({"locate": 45, "heldout": 45, "nonmem": 11})
    assert all(s == "nonmem" for s, m in zip(splits, labels) if not m)
    assert assign_splits(prompts, labels, SplitConfig(seed=0)) == splits  # deterministic
    order = list(reversed(range(101)))
    shuffled = assign_splits([prompts[i] for i in order], [labels[i] for i in order], SplitConfig(seed=0))
    assert dict(zip([prompts[i] for i in order], shuffled)) == dict(zip(prompts, splits))  # row order does not matter
    other = assign_splits(prompts, labels, SplitConfig(seed=1))
    assert other != splits and Counter(other) == Counter(splits)
    quarter = Counter(assign_splits(prompts, labels, SplitConfig(seed=0, locate_fraction=0.25)))
    assert quarter["locate"] == 23 and quarter["heldout"] == 67  # floor(22.5 + 0.5)
    assert set(assign_splits(prompts, labels, SplitConfig(locate_fraction=0))) == {"heldout", "nonmem"}
    assert set(assign_splits(prompts, labels, SplitConfig(locate_fraction=1))) == {"locate", "nonmem"}


def test_split_keeps_identical_prompts_together():
    prompts = ["a", "b", "c", "d", "a", "b", "c", "d"]
    for seed in range(5):
        splits = assign_splits(prompts, [True] * 8, SplitConfig(seed=seed))
        assert splits[:4] == splits[4:] and Counter(splits) == Counter({"locate": 4, "heldout": 4})


@pytest.mark.parametrize("kwargs", [{"seed": -1}, {"seed": 1.5}, {"seed": True}, {"locate_fraction": 1.5},
                                    {"locate_fraction": -0.1}])
def test_split_config_checks_its_values(kwargs):
    with pytest.raises(ValueError, match="is invalid"):
        SplitConfig(**kwargs)


# -- Webster's ground-truth parquet ---------------------------------------------------------------------------


@needs_pyarrow
def test_webster_label_mapping(tmp_path):
    path = webster_parquet(tmp_path)
    entries = read_entries(path)
    assert [e.prompt for e in entries] == [r[0] for r in WEBSTER_ROWS]
    assert [e.extra["kind"] for e in entries] == ["TV", "MV", "RV", "N", "N"]
    assert [e.memorized for e in entries] == [True, True, True, False, False]
    assert all(e.split in ("locate", "heldout") for e in entries[:3])
    assert [e.split for e in entries[3:]] == ["nonmem", "nonmem"]
    assert [e.reference for e in entries] == [r[1] for r in WEBSTER_ROWS]  # the url column, as given
    first = entries[0]
    assert first.extra == {"kind": "TV", "retrieved_urls": ["http://h.invalid/t1.jpg"], "mse_real_gen": 812.5,
                           "gen_seeds": [0, 3]}  # no caption, url, overfit_type or pandas index column
    assert entries[3].extra["mse_real_gen"] is None  # NaN becomes null, so the manifest is strict JSON
    assert first.row == f"{path} row 1" and entries[4].line == 5 and first.duplicates == 0
    assert WEBSTER_LABELS == {"MV": True, "RV": True, "TV": True, "N": False}


@needs_pyarrow
def test_webster_split_follows_the_seed(tmp_path):
    rows = [(f"caption {i}", f"http://h.invalid/{i}.jpg", "MV", [], 1.0) for i in range(40)]
    path = webster_parquet(tmp_path, rows)
    first = [e.split for e in read_entries(path)]
    assert Counter(first) == Counter({"locate": 20, "heldout": 20})
    assert [e.split for e in read_entries(path)] == first
    assert [e.split for e in read_entries(path, split=SplitConfig(seed=7))] != first
    assert Counter(e.split for e in read_entries(path, split=SplitConfig(locate_fraction=0.1))) == Counter(
        {"locate": 4, "heldout": 36})


@needs_pyarrow
def test_webster_as_plain_prompt_file(tmp_path):
    path = webster_parquet(tmp_path)
    assert read_prompts(path) == [r[0] for r in WEBSTER_ROWS]
    record = read_prompt_records(path)[1]
    assert record["overfit_type"] == "MV" and record["prompt"] == "Mothers influence on her young hippo"
    assert detect_format(path, record) == "webster"


@needs_pyarrow
@pytest.mark.parametrize("kind", ["XV", "", None, "verbatim"])
def test_webster_unknown_type_names_file_and_row(tmp_path, kind):
    rows = list(WEBSTER_ROWS)
    rows[2] = (rows[2][0], rows[2][1], kind, [], 1.0)
    path = webster_parquet(tmp_path, rows)
    message = error_of(read_entries, path)
    assert message.startswith(f"{path} row 3: field 'overfit_type' is {kind!r}") and "MV, RV, TV, N" in message


@needs_pyarrow
def test_webster_bad_rows_name_file_and_row(tmp_path):
    rows = list(WEBSTER_ROWS)
    rows[1] = ("   ", *rows[1][1:])
    assert error_of(read_entries, webster_parquet(tmp_path, rows)).endswith("row 2: field 'caption' is empty")
    rows = list(WEBSTER_ROWS)
    rows[3] = (rows[3][0], "ftp://h.invalid/n.jpg", *rows[3][2:])
    message = error_of(read_entries, webster_parquet(tmp_path, rows, name="b.parquet"))
    assert message.startswith(f"{tmp_path / 'b.parquet'} row 4: field 'url'") and "is not an http(s) URL" in message


@needs_pyarrow
def test_parquet_file_problems_are_one_line(tmp_path):
    assert error_of(read_prompts, write(tmp_path, "x.parquet", "not parquet")).startswith(
        f"{tmp_path / 'x.parquet'}: not a readable parquet file")
    assert "no such file" in error_of(read_entries, tmp_path / "none.parquet")
    no_caption = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": ["a"], "overfit_type": ["MV"]}), no_caption)
    assert "no 'prompt' or 'caption' column (columns: text, overfit_type)" in error_of(read_entries, no_caption)
    empty = tmp_path / "e.parquet"
    pq.write_table(pa.table({"caption": pa.array([], pa.string())}), empty)
    assert "no prompts" in error_of(read_prompts, empty)


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = write(tmp_path, "sdv1_bb_edge_groundtruth.parquet", "whatever")
    message = error_of(read_entries, path)
    assert message == (f"{path}: reading parquet files needs pyarrow: pip install 'diffmem[formats]' "
                       "(or pip install pyarrow)")
    assert not (tmp_path / "out.jsonl").exists()
    assert error_of(convert_manifest, path, tmp_path / "out.jsonl") == message
    assert not (tmp_path / "out.jsonl").exists()


# -- MemBench's csv ---------------------------------------------------------------------------------------------


def test_membench_rows_are_memorized_with_first_url_as_reference(tmp_path):
    path = write(tmp_path, "SD1_final.csv", MEMBENCH)
    entries = read_entries(path)
    assert [e.prompt for e in entries] == ["The No Limits Business Woman Podcast", "Sting Like A Bee, By Louisa",
                                           "a prompt without images", "another memorized prompt"]
    assert all(e.memorized and e.split in ("locate", "heldout") for e in entries)
    assert Counter(e.split for e in entries) == Counter({"locate": 2, "heldout": 2})
    assert [e.reference for e in entries] == ["http://m.invalid/a.jpg", "http://m.invalid/c.jpg", None,
                                              "http://m.invalid/d.jpg"]
    assert entries[0].extra == {"column_0": "0", "extra_references": ["http://m.invalid/b.jpg"]}
    assert entries[1].extra == {"column_0": "1"}
    assert [e.row for e in entries] == [f"{path}:{n}" for n in (2, 3, 4, 5)]
    assert read_prompts(path) == [e.prompt for e in entries]


@pytest.mark.parametrize(
    "urls,problem",
    [
        ("\"['http://m.invalid/a.jpg'\"", "field 'urls' is not a Python-style list of URLs"),
        ("\"[1, 2]\"", "field 'urls' must be a list of URL strings"),
        ("\"{'a': 1}\"", "field 'urls' must be a list of URL strings"),
        ("\"['/etc/passwd']\"", "field 'urls' '/etc/passwd' is not an http(s) URL"),
        ("\"['http://m.invalid/a.jpg', 'file:///etc/passwd']\"", "is not an http(s) URL"),
    ],
)
def test_membench_bad_urls_name_file_and_line(tmp_path, urls, problem):
    path = write(tmp_path, "SD1_final.csv", ",prompt,urls\n0,fine,[]\n1,\"two\nlines\",[]\n2,bad," + urls + "\n")
    message = error_of(read_entries, path)
    assert message.startswith(f"{path}:5: ") and problem in message


def test_membench_urls_are_never_evaluated(tmp_path):
    marker = tmp_path / "evaluated"
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    path = write(tmp_path, "SD1_final.csv", f",prompt,urls\n0,p,\"{code}\"\n")
    assert "not a Python-style list" in error_of(read_entries, path)
    assert not marker.exists()


def test_files_with_labels_refuse_a_label(tmp_path):
    membench = write(tmp_path, "SD1_final.csv", MEMBENCH)
    assert "a MemBench csv carries its own labels" in error_of(read_entries, membench, memorized=True)
    manifest = write(tmp_path, "m.jsonl", json.dumps({"prompt": "a", "memorized": True, "duplicates": 2,
                                                       "split": "locate", "reference": None}) + "\n")
    assert "a diffmem manifest carries its own labels" in error_of(convert_manifest, manifest, tmp_path / "o.jsonl",
                                                                   memorized=False)
    assert not (tmp_path / "o.jsonl").exists()


def test_plain_prompt_lists_take_a_label(tmp_path):
    path = write(tmp_path, "p.txt", "a\nb\n\nc\nd\n")
    assert [e.split for e in read_entries(path)] == ["nonmem"] * 4  # unlabelled, as before
    assert read_entries(path, memorized=False) == read_entries(path)
    labelled = read_entries(path, memorized=True)
    assert all(e.memorized for e in labelled) and Counter(e.split for e in labelled) == Counter(
        {"locate": 2, "heldout": 2})


# -- convert ------------------------------------------------------------------------------------------------------


def round_trip(src: Path, out: Path, **kwargs) -> list[ManifestEntry]:
    summary = convert_manifest(src, out, **kwargs)
    written = read_manifest(out)
    expected = read_entries(src, memorized=kwargs.get("memorized"), split=kwargs.get("split"))
    assert written == expected and summary.rows == len(written)
    assert [e.line for e in written] == list(range(1, len(written) + 1))
    return written


@needs_pyarrow
def test_convert_webster_round_trip(tmp_path):
    out = tmp_path / "out" / "webster.jsonl"
    summary = convert_manifest(webster_parquet(tmp_path), out)
    assert summary.format == "webster"
    written = round_trip(webster_parquet(tmp_path), out)
    assert summary.counts["not memorized"] == {"nonmem": 2} and sum(summary.counts["memorized"].values()) == 3
    assert summary.text.startswith(f"wrote {out}: 5 rows from ")
    assert "(Webster ground-truth parquet); memorized 3 (" in summary.text
    assert summary.text.endswith("; not memorized 2 (nonmem 2)")
    line = json.loads(out.read_text().splitlines()[3])
    assert line["mse_real_gen"] is None and line["kind"] == "N" and line["reference"] == "http://h.invalid/n.jpg"
    assert written[0].extra["retrieved_urls"] == ["http://h.invalid/t1.jpg"]


def test_convert_membench_and_manifest_round_trip(tmp_path):
    src = write(tmp_path, "SD1_final.csv", MEMBENCH)
    written = round_trip(src, tmp_path / "membench.jsonl", split=SplitConfig(seed=3, locate_fraction=0.75))
    assert Counter(e.split for e in written) == Counter({"locate": 3, "heldout": 1})
    assert written[0].extra["extra_references"] == ["http://m.invalid/b.jpg"]
    # a manifest converts to itself (its splits kept), with local references relative to the new folder
    (tmp_path / "train").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / "0.png")
    manifest = tmp_path / "m.jsonl"
    write_manifest([ManifestEntry("a", True, 32, "locate", tmp_path / "train" / "0.png", {"seed": 1}),
                    ManifestEntry("b", False, 1, "nonmem")], manifest)
    again = round_trip(manifest, tmp_path / "copy.jsonl", split=SplitConfig(seed=9))
    assert [e.split for e in again] == ["locate", "nonmem"]
    assert again[0].reference == (tmp_path / "train" / "0.png").resolve()
    message = error_of(convert_manifest, manifest, tmp_path / "sub" / "out.jsonl")
    assert message.startswith(f"{manifest}:1: reference ") and "lies outside the folder of" in message
    assert not (tmp_path / "sub" / "out.jsonl").exists()
    convert_manifest(manifest, tmp_path / "sub" / "out.jsonl", allow_outside=True)
    assert read_manifest(tmp_path / "sub" / "out.jsonl", allow_outside=True) == again


def test_convert_plain_list_needs_a_label(tmp_path):
    src = write(tmp_path, "prompts.txt", "a cat\na dog\n")
    message = error_of(convert_manifest, src, tmp_path / "m.jsonl")
    assert message == (f"{src}: a prompt list does not say which prompts are memorized; give memorized=True or False "
                       "(--memorized / --not-memorized)")
    written = round_trip(src, tmp_path / "m.jsonl", memorized=False)
    assert [(e.memorized, e.split) for e in written] == [(False, "nonmem")] * 2
    assert "a manifest is a .jsonl file" in error_of(convert_manifest, src, tmp_path / "m.csv", memorized=True)


def test_malformed_input_writes_nothing(tmp_path):
    out = write(tmp_path, "m.jsonl", "earlier content\n")
    src = write(tmp_path, "SD1_final.csv", ",prompt,urls\n0,a,[]\n1,b,[oops\n")
    assert error_of(convert_manifest, src, out).startswith(f"{src}:3: field 'urls' is not a Python-style list")
    assert out.read_text() == "earlier content\n"
    assert not list(tmp_path.glob(".m.jsonl.*"))


# -- the command line ---------------------------------------------------------------------------------------------


def test_cli_convert_prints_one_line(tmp_path, capsys):
    src = write(tmp_path, "SD1_final.csv", MEMBENCH)
    out = tmp_path / "m.jsonl"
    assert main(["manifest", "convert", str(src), str(out), "--split-seed", "4", "--locate-fraction", "0.25"]) == 0
    stdout = capsys.readouterr().out
    assert stdout == (f"wrote {out}: 4 rows from {src} (MemBench csv); memorized 4 (locate 1, heldout 3); "
                      "not memorized 0\n")
    assert read_manifest(out) == read_entries(src, split=SplitConfig(seed=4, locate_fraction=0.25))


@pytest.mark.parametrize(
    "args,message",
    [
        (["{src}", "{out}"], "{src}:3: field 'urls' is not a Python-style list of URLs (SyntaxError)"),
        (["{txt}", "{out}"], "{txt}: a prompt list does not say which prompts are memorized"),
        (["{txt}", "{out}", "--memorized", "--not-memorized"], "argument --not-memorized: not allowed with argument"),
        (["{txt}", "{out}", "--locate-fraction", "1.5"], "argument --locate-fraction: 1.5 must be in [0, 1]"),
        (["{txt}", "{out}", "--split-seed", "-1"], "argument --split-seed: '-1' must be an integer >= 0"),
    ],
)
def test_cli_convert_errors_are_one_line_and_write_nothing(tmp_path, capsys, args, message):
    names = {"src": str(write(tmp_path, "SD1_final.csv", ",prompt,urls\n0,a,[]\n1,b,['x'\n")),
             "txt": str(write(tmp_path, "p.txt", "a\n")), "out": str(tmp_path / "m.jsonl")}
    try:
        code = main(["manifest", "convert", *(a.format(**names) for a in args)])
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("diffmem: error: ")
    assert message.format(**names) in err
    assert not (tmp_path / "m.jsonl").exists()


# -- references of the new formats go through fetch_references -------------------------------------------------


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), (200, 30, 30), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        pass

    def do_GET(self):  # noqa: N802 - BaseHTTPRequestHandler's naming
        self.server.requests[self.path] += 1
        if self.path == "/good.png":
            body = png_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404, "Not Found")


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.requests = Counter()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield lambda path: f"http://127.0.0.1:{srv.server_address[1]}{path}"
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def check_one_dead(entries, dead_row: str, cache: Path) -> None:
    with pytest.raises(PromptFileError) as info:
        fetch_references(entries, cache=cache)
    assert str(info.value).startswith(f"{dead_row}: reference ") and "HTTP 404 Not Found" in str(info.value)
    ok, failures = fetch_references(entries, skip_missing=True, cache=cache)
    assert [e.row for e in ok] == [e.row for e in entries if e.row != dead_row]
    assert [f.row for f in failures] == [dead_row]
    assert failures[0].reason == "could not be downloaded: HTTP 404 Not Found"


@needs_pyarrow
def test_webster_dead_url_reported_per_row(tmp_path, server):
    rows = [("a good one", server("/good.png"), "MV", [], 1.0), ("a dead one", server("/gone.png"), "TV", [], 1.0)]
    path = webster_parquet(tmp_path, rows)
    check_one_dead(read_entries(path), f"{path} row 2", tmp_path / "cache")
    out = tmp_path / "m.jsonl"
    convert_manifest(path, out)  # converting does not download anything
    check_one_dead(read_manifest(out), f"{out}:2", tmp_path / "cache2")


def test_membench_dead_url_reported_per_row(tmp_path, server):
    good, other, dead = server("/good.png"), server("/other.png"), server("/x.png")
    text = f",prompt,urls\n0,good,\"['{good}', '{other}']\"\n1,dead,['{dead}']\n"
    path = write(tmp_path, "SD1_final.csv", text)
    entries = read_entries(path)
    check_one_dead(entries, f"{path}:3", tmp_path / "cache")
    ok, _ = fetch_references(entries, skip_missing=True, cache=tmp_path / "cache")
    assert ok[0].reference == server("/good.png")  # the first URL is the reference; the others are not fetched


# -- the real published files -----------------------------------------------------------------------------------


@needs_data
def test_real_wen_and_nemo_convert_to_the_same_split(tmp_path):
    wen = round_trip(WEN, tmp_path / "wen.jsonl", memorized=True)
    nemo = round_trip(NEMO_MEM, tmp_path / "nemo.jsonl", memorized=True)
    assert Counter(e.split for e in wen) == Counter({"locate": 250, "heldout": 250})
    assert {e.prompt: (e.split, e.reference) for e in wen} == {e.prompt: (e.split, e.reference) for e in nemo}
    assert Counter(e.extra["type"] for e in nemo) == Counter({"TM": 388, "VM": 112})
    assert detect_format(WEN, {"caption": 0, "index": 0, "url": 0}) == "wen"
    again = tmp_path / "again.jsonl"
    convert_manifest(WEN, again, memorized=True)
    assert again.read_bytes() == (tmp_path / "wen.jsonl").read_bytes()  # deterministic, byte for byte
    reseeded = convert_manifest(WEN, tmp_path / "seed1.jsonl", memorized=True, split=SplitConfig(seed=1))
    assert reseeded.counts == {"memorized": {"locate": 250, "heldout": 250}, "not memorized": {}}
    assert [e.split for e in read_manifest(tmp_path / "seed1.jsonl")] != [e.split for e in wen]


@needs_data
def test_real_nemo_unmemorized_converts_to_nonmem(tmp_path, capsys):
    out = tmp_path / "nonmem.jsonl"
    assert main(["manifest", "convert", str(NEMO_UNMEM), str(out), "--not-memorized"]) == 0
    assert capsys.readouterr().out == (f"wrote {out}: 500 rows from {NEMO_UNMEM} (NeMo csv); memorized 0; "
                                       "not memorized 500 (nonmem 500)\n")
    entries = read_manifest(out)
    assert all(e.split == "nonmem" and not e.memorized for e in entries) and len(entries) == 500
    assert entries[0].reference.startswith("https://")
