import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from owl.data.url_lists import PRESETS, UrlListSpec, check_url_list, fetch_url, read_url_list

ROWS = [
    {"URL": "http://a/1.jpg", "TEXT": "a cat", "similarity": 0.3, "width": 10},
    {"URL": " ", "TEXT": "no url", "similarity": 0.4, "width": 20},
    {"URL": "http://a/2.jpg", "TEXT": None, "similarity": 0.5, "width": 30},
]


def _write(tmp_path, fmt: str) -> str:
    path = tmp_path / f"list.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    elif fmt in ("csv", "tsv"):
        sep = "\t" if fmt == "tsv" else ","
        lines = [sep.join(ROWS[0])] + [
            sep.join("" if v is None else str(v) for v in row.values()) for row in ROWS
        ]
        path.write_text("\n".join(lines) + "\n")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    else:
        path.write_text(json.dumps(ROWS))
    return str(path)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl", "json"])
def test_every_format_normalises_to_url_caption_and_extras(tmp_path, fmt):
    spec = UrlListSpec(fmt, url_col="URL", caption_col="TEXT")
    [(file, table, missing)] = list(read_url_list(_write(tmp_path, fmt), spec))
    assert file.endswith(f"list.{fmt}")
    assert missing == 1  # the blank URL
    # `width` is a name img2dataset writes itself: kept under another name.
    assert table.column_names == ["url", "caption", "similarity", "source_width"]
    assert table.column("url").to_pylist() == ["http://a/1.jpg", "http://a/2.jpg"]
    assert table.column("caption").to_pylist() == ["a cat", ""]
    assert table.column("similarity").to_pylist() == [0.3, 0.5]


def test_laion_preset_keeps_its_score_columns(tmp_path):
    rows = [{"URL": "http://x/1.png", "TEXT": "t", "similarity": 0.3, "punsafe": 0.1,
             "pwatermark": 0.2, "hash": 5}]  # fmt: skip
    path = tmp_path / "laion.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    [(_, table, _)] = list(read_url_list(str(path), PRESETS["laion"]))
    assert table.column_names == ["url", "caption", "similarity", "punsafe", "pwatermark"]


def test_headerless_cc3m_tsv(tmp_path):
    path = tmp_path / "cc3m.tsv"
    path.write_text("a dog on grass\thttp://x/1.jpg\na red car\thttp://x/2.jpg\n")
    [(_, table, _)] = list(read_url_list(str(path), PRESETS["cc3m"]))
    assert table.to_pylist() == [
        {"url": "http://x/1.jpg", "caption": "a dog on grass"},
        {"url": "http://x/2.jpg", "caption": "a red car"},
    ]


def test_folder_of_files_is_read_in_name_order(tmp_path):
    for name in ("b", "a"):
        pq.write_table(
            pa.table({"url": [f"http://{name}"], "caption": [name]}), tmp_path / f"{name}.parquet"
        )
    (tmp_path / "ignored.csv").write_text("url,caption\nhttp://c,c\n")
    files = [f for f, _, _ in read_url_list(str(tmp_path), UrlListSpec("parquet"))]
    assert [f.rsplit("/", 1)[1] for f in files] == ["a.parquet", "b.parquet"]


def test_missing_column_names_file_and_column(tmp_path):
    path = _write(tmp_path, "csv")
    with pytest.raises(ValueError, match=r"list\.csv: no column 'url' \(url_col\)"):
        check_url_list(path, UrlListSpec("csv"))
    with pytest.raises(ValueError, match=r"no column\(s\) \['punsafe'\] \(extra_cols\)"):
        check_url_list(path, UrlListSpec("csv", "URL", "TEXT", extra_cols=("punsafe",)))


def test_unreadable_or_absent_file_is_a_value_error(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="bad.parquet: cannot read it as parquet"):
        check_url_list(str(bad), UrlListSpec("parquet"))
    with pytest.raises(ValueError, match="URL list not found"):
        check_url_list(str(tmp_path / "nope.parquet"), UrlListSpec("parquet"))
    with pytest.raises(ValueError, match="no \\*.jsonl files"):
        check_url_list(str(tmp_path), UrlListSpec("jsonl"))
    with pytest.raises(ValueError, match="input_format='xml'"):
        UrlListSpec("xml")


def test_urls_are_kept_as_given_and_fetched_encoded(tmp_path):
    """A URL's spaces, non-ASCII characters and surrounding blanks stay in `url` (every output
    row joins back to its input row); only the request is encoded."""
    given = [
        "http://a/with space.jpg",
        "http://a/caf\u00e9 \u00fc.jpg?q=\u00fc",
        " http://a/padded.jpg\t",
        "http://b\u00fccher.example/x.jpg",
        "http://a/already%20encoded.jpg",
    ]
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": given, "caption": ["c"] * len(given)}), path)
    [(_, table, missing)] = list(read_url_list(str(path), UrlListSpec("parquet")))
    assert missing == 0 and table.column("url").to_pylist() == given
    assert [fetch_url(u) for u in given] == [
        "http://a/with%20space.jpg",
        "http://a/caf%C3%A9%20%C3%BC.jpg?q=%C3%BC",
        "http://a/padded.jpg",
        "http://xn--bcher-kva.example/x.jpg",
        "http://a/already%20encoded.jpg",
    ]
