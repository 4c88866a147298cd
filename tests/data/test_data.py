import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmem.data import (
    ManifestEntry,
    read_entries,
    read_manifest,
    read_prompt_records,
    read_prompts,
    split_entries,
    write_manifest,
)
from diffmem.errors import DiffmemError, PromptFileError

from published import DATA, NEMO_MEM, NEMO_UNMEM, WEN, needs_data


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_for(path: Path) -> str:
    with pytest.raises(PromptFileError) as info:
        read_prompts(path)
    message = str(info.value)
    assert "\n" not in message
    assert isinstance(info.value, DiffmemError)
    return message


# -- real published prompt lists ----------------------------------------------------------------------------


@needs_data
def test_nemo_memorized_csv():
    records = read_prompt_records(NEMO_MEM)
    assert len(records) == 500
    assert Counter(r["type"] for r in records) == {"TM": 388, "VM": 112}
    assert records[0]["prompt"] == "The No Limits Business Woman Podcast"
    assert records[0]["Index"] == "1030727993"
    assert records[0]["URL"].startswith("https://")
    # Row 3 is a quoted field with doubled quotes; the CSV reading unescapes one level.
    assert records[3]["prompt"] == "\"Watch: Passion Pit's New Video, \"\"Lifted Up (1985)\"\"\""
    assert all(r["prompt"] == r["Caption"] for r in records)


@needs_data
def test_nemo_unmemorized_csv():
    prompts = read_prompts(NEMO_UNMEM)
    assert len(prompts) == 500
    assert prompts[1] == "Soaring by Peter Eades"
    assert len(set(read_prompt_records(NEMO_UNMEM)[0])) == 5  # column_0, Caption, URL, Index, prompt


@needs_data
def test_wen_jsonl_matches_nemo_captions():
    records = read_prompt_records(WEN)
    assert len(records) == 500
    assert {"caption", "index", "url", "prompt"} <= set(records[0])
    by_index = {r["index"]: r["prompt"] for r in records}
    nemo = read_prompt_records(NEMO_MEM)
    # The same 500 captions, doubled quotes included.
    assert all(by_index[int(r["Index"])] == r["prompt"] for r in nemo)


# -- formats ------------------------------------------------------------------------------------------------


def test_txt(tmp_path):
    path = write(tmp_path, "p.txt", "  a cat  \n\n\na dog\n   \n")
    assert read_prompts(path) == ["a cat", "a dog"]


def test_jsonl_prompt_preferred_over_caption(tmp_path):
    path = write(tmp_path, "p.jsonl", '{"prompt": "x", "caption": "y"}\n\n{"Caption": " z ", "id": 3}\n')
    records = read_prompt_records(path)
    assert [r["prompt"] for r in records] == ["x", "z"]
    assert records[1]["id"] == 3 and records[1]["Caption"] == " z "


@pytest.mark.parametrize("delimiter", [",", ";", "\t", "|"])
def test_csv_delimiters(tmp_path, delimiter):
    rows = [["id", "PROMPT", "note"], ["1", 'say "hi", then; go|on', "a"], ["2", "plain", "b"]]
    text = "\n".join(delimiter.join('"' + c.replace('"', '""') + '"' for c in row) for row in rows) + "\n"
    path = write(tmp_path, "p.csv", text)
    records = read_prompt_records(path)
    assert [r["prompt"] for r in records] == ['say "hi", then; go|on', "plain"]
    assert records[1]["note"] == "b"


def test_csv_multiline_field_and_line_numbers(tmp_path):
    path = write(tmp_path, "p.csv", 'prompt,n\n"two\nlines",1\nok,2\nbad\n')
    assert f"{path}:5:" in error_for(path)


# -- malformed files ----------------------------------------------------------------------------------------


def test_bad_json_line_7(tmp_path):
    lines = [json.dumps({"prompt": f"p{i}"}) for i in range(6)] + ['{"prompt": "oops"']
    path = write(tmp_path, "p.jsonl", "\n".join(lines) + "\n")
    message = error_for(path)
    assert message.startswith(f"{path}:7:") and "bad JSON" in message


def test_missing_field_line_3(tmp_path):
    path = write(tmp_path, "p.jsonl", '{"prompt": "a"}\n{"caption": "b"}\n{"text": "c"}\n')
    message = error_for(path)
    assert message.startswith(f"{path}:3:") and "'prompt' or 'caption'" in message


def test_non_string_prompt(tmp_path):
    path = write(tmp_path, "p.jsonl", '{"prompt": 5}\n')
    assert f"{path}:1:" in error_for(path)


def test_wrong_column_count(tmp_path):
    path = write(tmp_path, "p.csv", "prompt;url\na;b\nc;d;e\n")
    message = error_for(path)
    assert message.startswith(f"{path}:3:") and "3 columns, expected 2" in message


def test_csv_without_prompt_column(tmp_path):
    path = write(tmp_path, "p.csv", "text,url\na,b\n")
    message = error_for(path)
    assert f"{path}:1:" in message and "text" in message


@pytest.mark.parametrize("name,text", [("p.txt", ""), ("p.jsonl", "\n  \n"), ("p.csv", "")])
def test_empty_file(tmp_path, name, text):
    assert "empty file" in error_for(write(tmp_path, name, text))


def test_header_only_csv(tmp_path):
    assert "no prompts" in error_for(write(tmp_path, "p.csv", "prompt,url\n"))


def test_unknown_extension_and_missing_file(tmp_path):
    message = error_for(write(tmp_path, "p.json", "[]"))
    assert "unknown prompt file type '.json'" in message and ".jsonl" in message
    missing = tmp_path / "nope.txt"
    assert error_for(missing) == f"{missing}: no such file"


# -- manifests ----------------------------------------------------------------------------------------------


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    return tmp_path


def manifest_line(**overrides):
    entry = {"prompt": "the zorblax emblem", "memorized": True, "duplicates": 32, "reference": "train/0.png",
             "split": "locate"}
    entry.update(overrides)
    return json.dumps({k: v for k, v in entry.items() if v is not ...})


def test_read_manifest(image_dir):
    lines = [
        manifest_line(seed=3),
        manifest_line(prompt="the quibble emblem", split="heldout", reference="train/1.png"),
        "",
        manifest_line(prompt="a red circle on blue", memorized=False, duplicates=1, split="nonmem",
                      reference="./train/2.png"),
        manifest_line(prompt="a lone prompt", memorized=False, duplicates=0, split="nonmem", reference=None),
    ]
    path = write(image_dir, "manifest.jsonl", "\n".join(lines) + "\n")
    entries = read_manifest(path)
    assert len(entries) == 4
    first = entries[0]
    assert first.prompt == "the zorblax emblem" and first.memorized is True and first.duplicates == 32
    assert first.reference == (image_dir / "train" / "0.png").resolve() and first.reference.is_absolute()
    assert first.extra == {"seed": 3}
    assert entries[3].reference is None
    assert [e.prompt for e in split_entries(entries, "nonmem")] == ["a red circle on blue", "a lone prompt"]
    assert len(split_entries(entries, "heldout")) == 1
    with pytest.raises(ValueError, match="locate"):
        split_entries(entries, "train")


def test_manifest_round_trip(image_dir, tmp_path):
    entries = [
        ManifestEntry("a", True, 8, "locate", (image_dir / "train" / "1.png").resolve(), {"seed": 1}),
        ManifestEntry("b", False, 0, "nonmem"),
    ]
    out = write_manifest(entries, image_dir / "m.jsonl")
    assert json.loads(out.read_text().splitlines()[0])["reference"] == "train/1.png"
    assert read_manifest(out) == entries


@pytest.mark.parametrize(
    "line,problem",
    [
        (manifest_line(memorized="yes"), "'memorized'"),
        (manifest_line(duplicates=2.5), "'duplicates'"),
        (manifest_line(duplicates=True), "'duplicates'"),
        (manifest_line(duplicates=-1), "'duplicates'"),
        (manifest_line(split="train"), "'split'"),
        (manifest_line(reference="train/missing.png"), "does not exist"),
        (manifest_line(reference=7), "'reference'"),
        (manifest_line(prompt=""), "'prompt'"),
        (manifest_line(memorized=...), "missing field 'memorized'"),
        ("[1, 2]", "JSON object"),
        ("{oops", "bad JSON"),
    ],
)
def test_manifest_errors_name_file_and_line(image_dir, line, problem):
    path = write(image_dir, "manifest.jsonl", manifest_line() + "\n" + line + "\n")
    with pytest.raises(PromptFileError) as info:
        read_manifest(path)
    message = str(info.value)
    assert message.startswith(f"{path}:2:") and problem in message and "\n" not in message


def test_manifest_missing_and_empty(tmp_path):
    with pytest.raises(PromptFileError, match="no such file"):
        read_manifest(tmp_path / "none.jsonl")
    with pytest.raises(PromptFileError, match="empty manifest"):
        read_manifest(write(tmp_path, "m.jsonl", "\n"))


# -- read_entries: manifests and prompt files as entries ----------------------------------------------------


@needs_data
def test_read_entries_nemo_csv_keeps_urls():
    entries = read_entries(NEMO_MEM)
    assert len(entries) == 500
    assert all(e.split == "nonmem" and e.memorized is False and e.duplicates == 0 for e in entries)
    first = entries[0]
    assert first.prompt == "The No Limits Business Woman Podcast"
    assert first.reference == "https://onlinecoach1.hipcast.com/albumart/1000_1618923228.jpg"
    assert first.row == f"{NEMO_MEM}:2" and first.folder == DATA.resolve()
    assert first.extra["type"] == "VM" and first.extra["Index"] == "1030727993"
    assert not {"Caption", "URL", "prompt"} & set(first.extra)
    assert all(isinstance(e.reference, str) and e.reference.startswith("http") for e in entries)
    assert [e.prompt for e in read_entries(NEMO_UNMEM)] == read_prompts(NEMO_UNMEM)


@needs_data
def test_read_entries_wen_jsonl_matches_nemo():
    wen = read_entries(WEN)
    assert len(wen) == 500 and wen[0].line == 1 and wen[0].extra == {"index": 1030727993}
    nemo = {e.prompt: e.reference for e in read_entries(NEMO_MEM)}
    assert {e.prompt: e.reference for e in wen} == nemo


def test_read_entries_manifest_and_plain_files(image_dir):
    manifest = write(image_dir, "m.jsonl", manifest_line() + "\n")
    assert read_entries(manifest) == read_manifest(manifest)
    assert read_entries(manifest)[0].split == "locate"
    txt = write(image_dir, "p.txt", "a cat\n\na dog\n")
    entries = read_entries(txt)
    assert entries == [ManifestEntry("a cat", False, 0, "nonmem"), ManifestEntry("a dog", False, 0, "nonmem")]
    assert [e.row for e in entries] == [f"{txt}:1", f"{txt}:3"]
    # a jsonl without split/memorized is a prompt file; a local "reference" column is checked like a manifest's
    plain = write(image_dir, "p.jsonl", '{"prompt": "x", "reference": "train/1.png", "seed": 4}\n{"prompt": "y"}\n')
    entries = read_entries(plain)
    assert entries[0].reference == (image_dir / "train" / "1.png").resolve() and entries[0].extra == {"seed": 4}
    assert entries[1].reference is None


@pytest.mark.parametrize(
    "name,text,problem",
    [
        ("p.csv", "prompt,url\na,https://x.invalid/a.png\nb,/etc/passwd\n", "is not an http(s) URL"),
        ("p.jsonl", '{"prompt": "a", "url": 5}\n', "must be an http(s) URL string"),
        ("p.jsonl", '{"prompt": "a", "reference": "../outside.png"}\n', "lies outside the folder"),
        ("p.jsonl", '{"prompt": "a", "reference": "train/none.png"}\n', "does not exist"),
    ],
)
def test_read_entries_bad_reference_names_file_and_line(image_dir, name, text, problem):
    path = write(image_dir, name, text)
    with pytest.raises(PromptFileError) as info:
        read_entries(path)
    line = 3 if name == "p.csv" else 1
    assert str(info.value).startswith(f"{path}:{line}: field ") and problem in str(info.value)


def test_read_entries_empty_url_is_no_reference(tmp_path):
    path = write(tmp_path, "p.csv", "Caption;URL\na;\nb;https://x.invalid/b.png\n")
    assert [e.reference for e in read_entries(path)] == [None, "https://x.invalid/b.png"]
