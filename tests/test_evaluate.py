"""The standalone evaluator: it reproduces a training run's final metrics from the adapter
export, writes and re-scores the official submission formats, predicts unlabelled test splits,
and refuses bad prediction files with what is wrong."""

import json
import runpy
import sys
import tarfile
from pathlib import Path

import pytest

from tests.helpers import train_run
from vlds.eval.metrics import METRICS
from vlds.eval.submission import FILE_NAMES, PredictionError, read_predictions, write_predictions
from vlds.evaluate import reference_rows, score_file

REPO = Path(__file__).resolve().parent.parent


def evaluate_cli(run_dir: Path, shards: Path, *args):
    """`python -m vlds.evaluate --checkpoint RUN/adapter --shards SHARDS ARGS...` (its main,
    forked from the tests' warm server, one torch thread: tests/warm.py)"""
    argv = ["--checkpoint", run_dir / "adapter", "--shards", shards, *args]
    # one thread, as the training run: the same float arithmetic
    p = train_run(argv, timeout=300, entry="vlds.evaluate:main")
    return p.stdout + p.stderr


def test_training_metrics_and_evaluator_agree(shapes_root, tmp_path):
    out = tmp_path / "run"
    train_run(  # a world of one (the launcher is tested in test_train.py)
        [
            "--deepspeed",
            "ds_configs/zero2.json",
            f"--data.root={shapes_root}",
            f"--train.out_dir={out}",
            "--data.batch_size=16",
            "--train.max_steps=3",
            "--eval.max_samples=16",
            "--eval.batch_size=8",
            "--eval.caption_beams=2",
            "--data.num_workers=1",
        ]
    )
    trained = json.loads((out / "metrics.json").read_text())["metrics"]

    ev = tmp_path / "eval"
    evaluate_cli(out, shapes_root, "--max-samples", "16", "--out", str(ev))
    evaluated = json.loads((ev / "metrics.json").read_text())["metrics"]
    tasks = ("vqa", "gqa", "nlvr", "caption")
    assert set(trained) == set(evaluated) == {*tasks, "average", "shuffled_average", "loss"}
    assert evaluated["loss"] == trained["loss"]
    for t in tasks:
        # every value, not only the score: breakdowns, consistency, BLEU..CIDEr
        assert evaluated[t] == trained[t], t
        assert trained[t]["n"] == 16
        # the same strings were generated: the frozen backbone was rebuilt from the seed
        ours = read_predictions(t, ev / FILE_NAMES[t])
        assert len(ours) == 16
        assert ours == read_predictions(t, out / FILE_NAMES[t])  # the run's official file
        # scoring the written file without a model gives the numbers again (captions skipped
        # for time, another METEOR start: their file reading is in the round-trip test)
        if t != "caption":
            # (a file holds the real predictions only: no shuffled-image score, and without a
            # model no validation loss)
            scored = {k: v for k, v in trained[t].items() if k not in ("shuffled_score", "loss")}
            assert score_file(ev / FILE_NAMES[t], t, shapes_root, max_samples=16) == scored
    assert evaluated["average"] == trained["average"]
    assert "per_answer_type" in trained["vqa"] and "consistency" in trained["nlvr"]

    # --eval.KEY=VALUE decodes the same checkpoint another way: here without the shuffled pass
    ev_plain = tmp_path / "eval-plain"
    argv = ("--max-samples", "16", "--out", str(ev_plain), "--eval.shuffled_images=false")
    evaluate_cli(out, shapes_root, *argv)
    plain = json.loads((ev_plain / "metrics.json").read_text())
    assert plain["eval_overrides"] == {"eval.shuffled_images": "false"}
    assert "shuffled_average" not in plain["metrics"]
    assert all("shuffled_score" not in plain["metrics"][t] for t in tasks)
    assert plain["metrics"]["average"] == trained["average"]
    assert {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr"} <= set(trained["caption"])

    # An unlabelled test split (as the shard writer marks GQA test, VQA test-dev, ...): the
    # same first 16 validation samples without their labels are predicted, not scored, and
    # the submission files hold the very predictions the labelled split got.
    test_root = unlabelled_copy(shapes_root, tmp_path / "test-data", tasks, 16)
    ev_test = tmp_path / "eval-test"
    evaluate_cli(out, test_root, "--split", "test", "--out", str(ev_test))
    unscored = json.loads((ev_test / "metrics.json").read_text())["metrics"]
    assert unscored == {
        **{t: {"score": None, "n": 16, "labelled": False} for t in tasks},
        "average": None,
        "shuffled_average": None,  # nothing scored, with or without images
    }
    for t in tasks:
        assert read_predictions(t, ev_test / FILE_NAMES[t]) == read_predictions(
            t, ev / FILE_NAMES[t]
        )
    with pytest.raises(ValueError, match="gqa/test has no labels"):
        score_file(ev_test / FILE_NAMES["gqa"], "gqa", test_root, split="test")

    # A split written from odd release files (NLVR2 ".png" files holding WEBP, TIFF, GIF and
    # ICO bytes) by the release writer: its prediction file meets the official NLVR2 scorer's
    # completeness rule, every identifier of the annotation file exactly once.
    from tests.test_release_files import nlvr2_odd_release
    from tests.test_shards import convert

    (tmp_path / "odd").mkdir()
    images, ann = nlvr2_odd_release(tmp_path / "odd", broken=False)
    odd_root = linked_root(shapes_root, tmp_path / "odd-data", tasks)
    s = convert(
        "nlvr2", "--annotations", ann, "--images", images, "--split", "val", "--out", odd_root
    )
    assert len(s["repaired"]) == 4 and not s["skipped"]
    ev_odd = tmp_path / "eval-odd"
    evaluate_cli(out, odd_root, "--task", "nlvr", "--out", str(ev_odd))
    ids = [line.split(",")[0] for line in (ev_odd / FILE_NAMES["nlvr"]).read_text().splitlines()]
    want = [json.loads(line)["identifier"] for line in ann.read_text().splitlines()]
    assert sorted(ids) == sorted(want) and len(ids) == len(want) == 6


def linked_root(root: Path, dst: Path, tasks) -> Path:
    """A data root holding links to root's files except its task folders."""
    dst.mkdir()
    for entry in root.iterdir():
        if entry.name not in tasks:
            (dst / entry.name).symlink_to(entry)
    return dst


def unlabelled_copy(root: Path, dst: Path, tasks, n: int) -> Path:
    """A data root (the others' files linked) whose "test" split holds the first n validation
    samples of each task without their label field, marked unlabelled in its index as the
    shard writer marks a test split."""
    from vlds.data.prep import shardwrite
    from vlds.data.shardio import load_index
    from vlds.data.tasks import LABEL

    linked_root(root, dst, tasks)
    for t in tasks:
        members: dict[str, dict] = {}
        for path, _ in load_index(root, t, "val").shards:
            with tarfile.open(path) as tar:
                for m in tar:
                    key, ext = m.name.split(".", 1)
                    members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        keys = list(members)[:n]
        (dst / t).mkdir()
        with shardwrite.open_shard(dst / t / "test-00000.tar") as tar:
            for k in keys:
                rec = json.loads(members[k]["json"])
                del rec[LABEL[t]]
                shardwrite.write_sample(tar, k, {**members[k], "json": rec})
        shard = {"url": "test-00000.tar", "samples": len(keys)}
        shardwrite.write_index(dst / t, t, "test", [shard], labelled=False)
    return dst


def _rows(ids, preds, meta=None):
    meta = meta or [{} for _ in ids]
    return [{"id": i, "prediction": p, "meta": m} for i, p, m in zip(ids, preds, meta, strict=True)]


def test_submission_formats_round_trip(tmp_path):
    cases = {
        "vqa": (["3", "10"], ["2", "yes"]),
        "gqa": (["201", "7"], ["red", "left"]),
        "nlvr": (["dev-1-0-0", "dev-1-1-0"], ["true", "false"]),
        "caption": (["42", "x7"], ["a red circle", 'a "quoted", caption']),
        "tvqa": (["5", "6"], ["a3", "a0"]),
        "how2qa": (["5", "6"], ["a4", "a1"]),
        "tvc": (["tvc_val_000001", "tvc_val_000002"], ["the circle moves left", ""]),
        "yc2c": (["12", "13"], ["move the square up, then stop", "a b"]),
    }
    for task, (ids, preds) in cases.items():
        path = write_predictions(task, _rows(ids, preds), tmp_path)
        assert path.name == FILE_NAMES[task]
        assert sorted(read_predictions(task, path)) == sorted(zip(ids, preds, strict=True))
    # the official shapes: numeric ids as numbers, NLVR2 as True/False csv without a header
    assert json.loads((tmp_path / "predictions_vqa.json").read_text())[0] == {
        "question_id": 10,
        "answer": "yes",
    }
    assert json.loads((tmp_path / "predictions_gqa.json").read_text())[0]["questionId"] == "201"
    assert (tmp_path / "predictions_nlvr.csv").read_text() == "dev-1-0-0,True\ndev-1-1-0,False\n"
    first = json.loads((tmp_path / "predictions_tvqa.jsonl").read_text().splitlines()[0])
    assert first == {"qid": 5, "answer_idx": 3}
    tvc = json.loads((tmp_path / "predictions_tvc.jsonl").read_text().splitlines()[0])
    assert tvc == {"clip_id": "tvc_val_000001", "descs": [{"desc": "the circle moves left"}]}
    # a generation that is no choice tag is written as answer_idx -1 and never counts
    write_predictions("tvqa", _rows(["1"], ["a 3"]), tmp_path)
    assert read_predictions("tvqa", tmp_path / "predictions_tvqa.jsonl") == [("1", "a-1")]


@pytest.mark.parametrize("task", ["tvqa", "how2qa", "nlvr", "gqa", "vqa"])
def test_scoring_a_file_matches_the_metric(shapes_root, tmp_path, task):
    refs = reference_rows(shapes_root, task, "val")
    ids = sorted(refs)
    # every other sample answered right, the rest wrong
    preds = [refs[i][0][0] if k % 2 == 0 else "a9" for k, i in enumerate(ids)]
    path = write_predictions(task, _rows(ids, preds, [refs[i][1] for i in ids]), tmp_path)
    got = score_file(path, task, shapes_root)
    want = METRICS[task](
        [p.lower() if task == "nlvr" else p for p in preds],
        [refs[i][0] for i in ids],
        [refs[i][1] for i in ids],
    )
    assert got == want
    if task != "vqa":  # one gold answer: accuracy is exactly the half we got right
        assert got["score"] == pytest.approx(100 * len(ids[::2]) / len(ids))
    if task == "nlvr":  # synthetic identifiers "{split}-{n}-{pair}-0" group by "{split}-{n}"
        groups = {}
        for k, i in enumerate(ids):
            groups.setdefault(i.rsplit("-", 2)[0], []).append(k % 2 == 0)
        assert got["consistency"] == pytest.approx(
            100 * sum(all(g) for g in groups.values()) / len(groups)
        )


def _write_vqa(path: Path, ids) -> Path:
    path.write_text(json.dumps([{"question_id": i, "answer": "yes"} for i in ids]))
    return path


def test_evaluation_overrides_take_eval_keys_only(tmp_path, capsys):
    from vlds.config import ConfigError
    from vlds.evaluate import main, parse_args

    base = ["--checkpoint", "run", "--shards", "data"]
    args = parse_args([*base, "--eval.choice_predict", "rank", "--eval.caption_beams=2"])
    assert args.eval_overrides == {"eval.choice_predict": "rank", "eval.caption_beams": "2"}
    with pytest.raises(SystemExit):  # the model and data are the checkpoint's
        parse_args([*base, "--model.d_model=8", "--data.tasks=vqa"])
    assert "--model.d_model, --data.tasks: only eval.* keys can change" in capsys.readouterr().err
    # a bad value fails with the valid ones before any model or data is read
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    from dataclasses import asdict

    from vlds.checkpoint import ADAPTER_CONFIG
    from vlds.config import build_config

    (adapter / ADAPTER_CONFIG).write_text(json.dumps({"config": asdict(build_config("tiny"))}))
    with pytest.raises(ConfigError, match="eval.choice_predict='vote'; valid: generate"):
        main(
            ["--checkpoint", str(adapter), "--shards", str(tmp_path), "--eval.choice_predict=vote"]
        )


def test_bad_prediction_files_name_the_ids(shapes_root, tmp_path):
    ids = sorted(reference_rows(shapes_root, "vqa", "val"), key=int)
    n = len(ids)
    f = _write_vqa(tmp_path / "missing.json", [int(i) for i in ids[3:]])
    with pytest.raises(PredictionError, match=rf"3 id\(s\) missing \(0, 1, 2\).*each of the {n}"):
        score_file(f, "vqa", shapes_root)

    f = _write_vqa(tmp_path / "dup.json", [int(i) for i in ids] + [5, 7])
    with pytest.raises(PredictionError, match=r"2 duplicate id\(s\) \(5, 7\)"):
        score_file(f, "vqa", shapes_root)

    f = _write_vqa(tmp_path / "unknown.json", [int(i) for i in ids] + list(range(900, 907)))
    with pytest.raises(
        PredictionError, match=r"7 id\(s\) not in the reference split \(900, 901, 902, 903, 904, ."
    ):
        score_file(f, "vqa", shapes_root)

    # with --max-samples only the first samples are references: the others are unknown
    f = _write_vqa(tmp_path / "all.json", [int(i) for i in ids])
    with pytest.raises(PredictionError, match=rf"{n - 16} id\(s\) not in the reference split"):
        score_file(f, "vqa", shapes_root, max_samples=16)

    (tmp_path / "keys.json").write_text(json.dumps([{"question_id": 0, "pred": "yes"}]))
    with pytest.raises(PredictionError, match=r"entry 0: expected an object with keys"):
        score_file(tmp_path / "keys.json", "vqa", shapes_root)
    (tmp_path / "bad.csv").write_text("val-0-0-0\n")
    with pytest.raises(PredictionError, match=r"bad.csv:1: expected 'identifier,True\|False'"):
        score_file(tmp_path / "bad.csv", "nlvr", shapes_root)


def test_cli_exits_2_with_the_reason(shapes_root, tmp_path, monkeypatch, capsys):
    f = _write_vqa(tmp_path / "p.json", [0, 0])
    argv = ["vlds.evaluate", "--predictions", str(f), "--task", "vqa", "--shards", str(shapes_root)]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delitem(sys.modules, "vlds.evaluate")  # run it fresh, as `python -m` would
    with pytest.raises(SystemExit) as e:
        runpy.run_module("vlds.evaluate", run_name="__main__")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "missing" in err and "1 duplicate id(s) (0)" in err
