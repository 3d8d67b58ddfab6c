"""Shards from URLs (vlds.data.remote): s3:// on a real S3-compatible server (moto's, its own
process), http:// on Python's http.server (with a 403 path and a truncating path: tests/servers/
http_shards.py), pipe: and file://, all on 127.0.0.1. Every location reads the same samples
as the local folder, resumes at a sample's offset, and a bad URL fails in seconds with the URL
and the fix. Training from s3:// (losses, resume): tests/test_reliability.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, S3_ENV
from vlds.data import remote
from vlds.data.shardio import DataError, SkipCounter, load_index, read_samples
from vlds.distributed import free_port


class Skips(SkipCounter):
    """A SkipCounter that keeps its messages (`text`: all of them, one per line)."""

    text = ""

    def __call__(self, exn, shard=None):
        self.text += f"{exn}\n"
        return super().__call__(exn, shard)


def samples(path, expected=None, start=0):
    """[(key, offset, {member: bytes})] of a shard and its SkipCounter (`count` bad ones)."""
    sk = Skips()
    out = [
        (s["__key__"], s["__off__"], {k: v for k, v in s.items() if not k.startswith("__")})
        for s in read_samples(path, sk, expected, start=start)
    ]
    return out, sk


@pytest.mark.parametrize("task", ["vqa", "tvc"])  # images (GROUP samples) and video frames
def test_every_location_reads_the_same_samples(shapes_root, s3_shapes, http_shapes, task):
    url, env = s3_shapes
    os.environ.update(env)
    local = load_index(shapes_root, task, "train")
    roots = {
        "s3": url,
        "http": http_shapes,
        "file": f"file://{shapes_root}",
        "pipe": f"pipe:cat {shapes_root}/{{}}",
    }
    want = [samples(p, n)[0] for p, n in local.shards[:2]]
    # a gzip-compressed shard over a stream (GzipFile reading a forward-only pipe)
    assert samples(f"pipe:gzip -c {local.shards[0][0]}", local.shards[0][1])[0] == want[0]
    for name, root in roots.items():
        idx = load_index(root, task, "train")
        assert [n for _, n in idx.shards] == [n for _, n in local.shards], name
        assert idx.sentences == local.sentences and idx.meta == local.meta, name
        for (p, n), w in zip(idx.shards[:2], want, strict=True):
            got, sk = samples(p, n)
            assert got == w and sk.count == 0, name
        # a resumed reader starts at a sample's offset: a seek (s3, file) or a read over (http,
        # pipe)
        p, n = idx.shards[0]
        offs = sorted({off for _, off, _ in want[0]})
        start = offs[len(offs) // 2]
        got, _ = samples(p, start=start)
        assert got == [s for s in want[0] if s[1] >= start] and got, name


def test_a_url_root_keeps_credentials_out_of_messages():
    assert remote.redact("https://user:hunter2@h/x/a.tar?X-Amz-Signature=s3cr3t") == (
        "https://***@h/x/a.tar?***"
    )
    with pytest.raises(DataError) as e:
        load_index("http://user:hunter2@127.0.0.1:9/shards", "vqa", "train")
    assert "hunter2" not in str(e.value) and "http://***@127.0.0.1:9/shards" in str(e.value)
    with pytest.raises(ValueError, match="unsupported URL scheme 'ftp'"):
        load_index("ftp://host/shards", "vqa", "train")
    with pytest.raises(ValueError, match=r"needs \{\} where the path"):
        load_index("pipe:cat shards.tar", "vqa", "train")


def test_an_index_may_not_run_commands(tmp_path):
    (tmp_path / "vqa").mkdir()
    index = {"shards": [{"url": "pipe:touch /tmp/owned", "samples": 1}]}
    (tmp_path / "vqa" / "train.index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="must not run commands"):
        load_index(tmp_path, "vqa", "train")


def test_unreachable_servers_fail_in_seconds_with_the_fix():
    port = free_port()  # nothing listens there
    os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"})
    for root, fix in [
        (f"s3://vlds-none-{port}/shards", "AWS_ENDPOINT_URL_S3"),
        (f"http://127.0.0.1:{port}/shards", "server is up"),
    ]:
        t0 = time.monotonic()
        with pytest.raises(DataError) as e:
            load_index(root, "vqa", "train")
        msg = str(e.value)
        assert f"{root}/vqa/train.index.json" in msg and f"after {remote.TRIES} tries" in msg
        assert fix in msg
        assert time.monotonic() - t0 < 60  # bounded retries with backoff, never a hang


def test_missing_credentials_name_where_they_come_from(s3_server, tmp_path):
    """A process without any AWS credentials (no variables, no ~/.aws files)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {
        "AWS_ENDPOINT_URL_S3": s3_server["AWS_ENDPOINT_URL_S3"],
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
    }
    code = (
        "from vlds.data.shardio import load_index as f; f('s3://vlds-test/shapes', 'vqa', 'train')"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert p.returncode != 0
    assert "no credentials found" in p.stderr and "AWS_ACCESS_KEY_ID" in p.stderr, p.stderr[-2000:]


def test_forbidden_missing_and_cut_remote_files(shapes_root, http_shapes, s3_shapes):
    with pytest.raises(DataError, match=r"access denied .*check the URL and that the server"):
        load_index(f"{http_shapes}/403", "vqa", "train")
    with pytest.raises(DataError, match=r"/nothing/vqa/train.index.json: it does not exist"):
        load_index(f"{http_shapes}/nothing", "vqa", "train")
    # a truncated read: the shard is skipped and counted, with its URL
    idx = load_index(shapes_root, "vqa", "train")
    rel = os.path.relpath(idx.shards[0][0], shapes_root)
    cut = f"{http_shapes}/cut/{rel}"
    got, sk = samples(cut, idx.shards[0][1])
    n = idx.shards[0][1]
    assert len(got) < n and sk.count == 1 + (n - len(got))  # the error, then the missing ones
    assert f"cannot read {cut} (ContentLengthError" in sk.text and "Not enough data" in sk.text
    # a shard that disappears after its index was read (s3): skipped and counted, named
    url, env = s3_shapes
    os.environ.update(env)
    fs, _ = remote.filesystem(url)
    fs.copy(f"vlds-test/shapes/vqa/{rel.split('/')[-1]}", "vlds-test/gone/x.tar")
    got, sk = samples("s3://vlds-test/gone/x.tar", 5)
    assert got
    fs.rm("vlds-test/gone/x.tar")
    got, sk = samples("s3://vlds-test/gone/x.tar", 5)
    assert got == [] and sk.count == 1 + 5 and "s3://vlds-test/gone/x.tar" in sk.text
    assert "does not exist" in sk.text


def test_a_failing_pipe_command_is_an_error_with_its_output(shapes_root):
    idx = load_index(f"pipe:cat {shapes_root}/{{}}", "vqa", "train")
    bad = idx.shards[0][0].replace("cat ", "cat /no/such/dir/", 1)
    got, sk = samples(bad, idx.shards[0][1])
    assert got == [] and sk.count == 1 + idx.shards[0][1]  # the error, then the missing ones
    assert "the command exited with 1" in sk.text and "No such file" in sk.text


def test_feature_extraction_reads_and_writes_urls(shapes_root, s3_shapes, tmp_path):
    """--shards s3://... --out s3://...: the same feature shards, byte for byte, and the same
    index as from and to local folders; the staging folder is gone after the upload."""
    from vlds.data.prep.extract import main as extract

    url, env = s3_shapes
    os.environ.update(env)
    args = ["--tasks", "vqa", "--splits", "val", "--vision", "vlds-tiny-rn"]
    args += ["--vision-pretrained", "", "--grid-pool", "3", "--workers", "0", "--quiet"]
    extract(["--shards", str(shapes_root), "--out", str(tmp_path / "feats"), *args])
    extract(["--shards", url, "--out", "s3://vlds-test/feats", *args])
    fs, _ = remote.filesystem(url)
    local = tmp_path / "feats" / "vqa"
    files = sorted(p.name for p in local.glob("val-*.tar"))
    assert (
        files
        and fs.cat("vlds-test/feats/vqa/val.index.json") == (local / "val.index.json").read_bytes()
    )
    for name in files:
        assert fs.cat(f"vlds-test/feats/vqa/{name}") == (local / name).read_bytes()
    assert fs.isdir("vlds-test/feats/tokenizer")
    assert not (remote.cache_dir("s3://vlds-test/feats") / "stage").exists()
    assert load_index("s3://vlds-test/feats", "vqa", "val").features["vision"] == "vlds-tiny-rn"
