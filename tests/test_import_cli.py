"""`aot import` row validation, the config layer, and the CLI's non-Prefect commands."""

from __future__ import annotations

import json

import polars as pl
import pytest
from PIL import Image

from aot.cli import main
from config import ConfigError, parse_overrides
from conftest import REPO, prefect_home
from stages.importer import import_records
from stages.registry import resolve_config as load_config
from storage import ShardStore, decode_image


@pytest.fixture
def photo_dir(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(d / "good.png")
    Image.new("RGB", (120, 120), (1, 2, 3)).save(d / "big.png")
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    good = {
        "question": "Where is the cup?",
        "options": ["left", "right"],
        "answer": "A",
        "target_boxes": [[2, 3, 20, 30]],
        "target_names": ["cup"],
    }
    rows = [
        dict(good, id="ok", image="good.png"),
        dict(good, id="corrupt", image="corrupt.jpg"),
        dict(good, id="bomb", image="big.png"),
        dict(good, id="nofile", image="missing.png"),
        dict(good, id="outside", image="good.png", target_boxes=[[50, 10, 70, 20]]),
        dict(good, id="degenerate", image="good.png", target_boxes=[[5, 5, 5, 20]]),
        dict(good, id="badletter", image="good.png", answer="C"),
        {k: v for k, v in dict(good, id="noquestion", image="good.png").items() if k != "question"},
        dict(good, id="oneoption", image="good.png", options=["left"]),
        dict(good, id="escape", image="../secret.png"),
    ]
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, "{this is not json")
    (tmp_path / "records.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_import_keeps_good_rows_and_rejects_each_bad_kind(photo_dir):
    store = ShardStore(str(photo_dir / "root"))
    cfg = load_config("synthetic", {"source": {"shard_size": 4, "max_image_pixels": 10_000}})
    m = import_records(store, photo_dir / "records.jsonl", photo_dir / "images", cfg, dataset="photos")
    assert (m.rows_in, m.rows, m.reject_rows) == (11, 1, 10)
    assert m.reasons == {
        "bad_answer": 1,
        "bad_box": 2,
        "bad_image": 2,
        "bad_options": 1,
        "bad_record": 1,
        "missing_field": 1,
        "missing_image": 2,
    }
    assert len(m.parts) == 3  # 11 records in shards of 4
    kept = store.read(m)
    row = kept.row(0, named=True)
    assert row["id"] == "ok" and row["target_boxes"] == [[2.0, 3.0, 20.0, 30.0]] and row["scene"] is None
    assert decode_image(row["image"]).getpixel((0, 0)) == (10, 200, 30)
    rej = {r["id"]: r for r in store.read(m, "rejects").iter_rows(named=True)}
    assert rej["bomb"]["reason"] == "bad_image" and "decompression-bomb" in rej["bomb"]["detail"]
    assert rej["outside"]["reason"] == "bad_box" and "outside" in rej["outside"]["detail"]
    assert rej["escape"]["reason"] == "missing_image" and "outside the images folder" in rej["escape"]["detail"]
    assert json.loads(rej["badletter"]["record"])["answer"] == "C"  # the rejected row is kept whole
    # Same inputs, same version: nothing is rewritten.
    again = import_records(store, photo_dir / "records.jsonl", photo_dir / "images", cfg, dataset="photos")
    assert again.version == m.version and again.created == m.created


def test_import_xywh_and_parquet_with_bytes(tmp_path):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    Image.new("RGB", (40, 40), (200, 0, 0)).save(img_dir / "a.png")
    recs = pl.DataFrame(
        [
            {
                "image": "a.png",
                "question": "q?",
                "options": ["x", "y", "z"],
                "answer": "B",
                "target_boxes": [[4.0, 5.0, 10.0, 20.0]],
            }
        ]
    )
    recs.write_parquet(tmp_path / "r.parquet")
    store = ShardStore(str(tmp_path / "root"))
    m = import_records(store, tmp_path / "r.parquet", img_dir, load_config("synthetic"), box_format="xywh")
    assert m.rows == 1
    assert store.read(m)["target_boxes"].to_list() == [[[4.0, 5.0, 14.0, 25.0]]]


def test_overrides_and_config_errors():
    assert parse_overrides(["extend.canvas_scale=1.75", "models.clip=tiny", "filter.clip_threshold=null"]) == {
        "extend": {"canvas_scale": 1.75},
        "models": {"clip": "tiny"},
        "filter": {"clip_threshold": None},
    }
    cfg = load_config("synthetic", parse_overrides(["extend.canvas_scale=1.75", "source.num_scenes=8"]))
    assert cfg.extend.canvas_scale == 1.75 and cfg.source.num_scenes == 8
    with pytest.raises(ConfigError, match="unknown config key 'extend.canvas'"):
        load_config("synthetic", {"extend": {"canvas": 2}})
    with pytest.raises(ConfigError, match="extend.canvas_scale"):
        load_config("synthetic", {"extend": {"canvas_scale": 9}})
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config("synthetic", {"source": {"num_scenes": "many"}})
    with pytest.raises(ConfigError, match="no backend 'gpt' for role 'judge'"):
        load_config("synthetic", {"models": {"judge": "gpt"}})
    with pytest.raises(ConfigError, match="no preset 'nope'"):
        load_config("nope")
    # an override changes one key of a preset's model spec and keeps the rest (it replaced the spec once)
    ev = load_config(
        str(REPO / "experiments" / "evidence.yaml"), ["defender.model.device=cpu", "attacker.model.vae_fit.steps=3"]
    )
    assert ev.defender.model["device"] == "cpu" and ev.defender.model["hidden"] == 256
    assert ev.attacker.model["vae_fit"] == {"steps": 3, "scenes": 512, "batch": 32} and ev.attacker.model["layers"] == 4
    # ... but a spec naming another backend replaces it whole: the tiny defender's options are not a version's
    syn = load_config("synthetic", ["models.defender.warmup.steps=5"])
    assert (
        syn.models["defender"]["warmup"] == {"steps": 5, "scenes": 4096, "canvas_scale": [1.0, 2.0]}
        and syn.models["defender"]["max_pixels"] == 65536
    )
    swap = load_config("synthetic", ["models.defender={backend: version, version: v1, root: ./aot-data}"])
    assert swap.models["defender"] == {"backend": "version", "version": "v1", "root": "./aot-data"}
    assert load_config("synthetic", ["models.defender=perception-baseline"]).models["defender"] == "perception-baseline"
    # YAML 1.1 reads "1e-3" (no dot) as text: a float field still takes it; text stays an error
    assert load_config("synthetic", ["defender.warmup.lr=1e-3"]).defender.warmup.lr == 0.001
    with pytest.raises(ConfigError, match="expected a number"):
        load_config("synthetic", ["defender.warmup.lr=fast"])
    with pytest.raises(ConfigError, match="source.object_size"):
        load_config("synthetic", ["source.object_size=[0.3, 0.2]"])
    with pytest.raises(ConfigError, match="source.colour_options"):
        load_config("synthetic", ["source.colour_options=7"])
    with pytest.raises(ConfigError, match="defender.warmup.lr_schedule"):
        load_config("synthetic", ["defender.warmup.lr_schedule=linear"])


def test_cli_errors_are_one_line_with_the_fix(tmp_path, capsys):
    assert main(["run", "--root", str(tmp_path), "--set", "extend.canvas_scale=9", "--no-prefect"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config extend.canvas_scale") and "Traceback" not in err
    assert main(["show", "deadbeef", "--root", str(tmp_path)]) == 2
    assert "aot ls" in capsys.readouterr().err
    assert main(["stage", "extend", "--root", str(tmp_path), "--no-prefect"]) == 2
    assert "needs --input" in capsys.readouterr().err


def test_cli_import_ls_show_gc(photo_dir, capsys):
    root = str(photo_dir / "root")
    assert (
        main(
            [
                "import",
                "--records",
                str(photo_dir / "records.jsonl"),
                "--images",
                str(photo_dir / "images"),
                "--root",
                root,
                "--dataset",
                "photos",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "imported 11 lines: 2 kept, 9 rejected" in out  # default bomb limit: big.png is fine
    version = out.split("source version: ")[1].split()[0]
    assert main(["ls", "--root", root]) == 0
    assert version in capsys.readouterr().out
    assert main(["show", version, "--root", root, "--rejects", "3"]) == 0
    shown = capsys.readouterr().out
    assert "2 kept, 9 rejected" in shown and "first 3 rejects" in shown
    assert main(["gc", "--root", root, "--min-age", "0", "--dry-run"]) == 0
    assert "0 paths would be removed" in capsys.readouterr().out


# ------------------------------------------------------------------ every kind of bad record
BAD_RECORDS = {  # id -> (the record's fields over a good one, the reason it must be rejected for)
    "no-image": ({"image": None}, "missing_field"),
    "empty-image": ({"image": ""}, "missing_field"),
    "no-question": ({"question": None}, "missing_field"),
    "no-options": ({"options": None}, "missing_field"),
    "empty-options": ({"options": []}, "missing_field"),
    "no-answer": ({"answer": None}, "missing_field"),
    "question-number": ({"question": 7}, "bad_question"),
    "question-blank": ({"question": "   "}, "bad_question"),
    "question-huge": ({"question": "why? " * 1000}, "bad_question"),
    "one-option": ({"options": ["left"]}, "bad_options"),
    "options-text": ({"options": "left,right"}, "bad_options"),
    "option-number": ({"options": ["left", 2]}, "bad_options"),
    "option-empty": ({"options": ["left", ""]}, "bad_options"),
    "options-repeat": ({"options": ["left", "Left"]}, "bad_options"),
    "options-27": ({"options": [f"o{i}" for i in range(27)]}, "bad_options"),
    "option-huge": ({"options": ["left", "x" * 2000]}, "bad_options"),
    "answer-letter-out": ({"answer": "C"}, "bad_answer"),
    "answer-number": ({"answer": 1}, "bad_answer"),
    "answer-word": ({"answer": "left"}, "bad_answer"),
    "answer-lower": ({"answer": "a"}, "bad_answer"),
    "names-text": ({"target_names": "cup"}, "bad_names"),
    "names-number": ({"target_names": [1]}, "bad_names"),
    "boxes-empty": ({"target_boxes": []}, "no_targets"),
    "boxes-null": ({"target_boxes": None}, "no_targets"),
    "boxes-text": ({"target_boxes": "2,3,20,30"}, "bad_box"),
    "box-three": ({"target_boxes": [[2, 3, 20]]}, "bad_box"),
    "box-bool": ({"target_boxes": [[True, 3, 20, 30]]}, "bad_box"),
    "box-text-number": ({"target_boxes": [["2", 3, 20, 30]]}, "bad_box"),
    "box-nan": ({"target_boxes": [[2, 3, 20, float("nan")]]}, "bad_box"),
    "box-degenerate": ({"target_boxes": [[5, 5, 5, 20]]}, "bad_box"),
    "box-outside": ({"target_boxes": [[50, 10, 70, 20]]}, "bad_box"),
    "box-negative": ({"target_boxes": [[-1, 3, 20, 30]]}, "bad_box"),
    "image-missing": ({"image": "missing.png"}, "missing_image"),
    "image-escape": ({"image": "../secret.png"}, "missing_image"),
    "image-number": ({"image": 5}, "missing_field"),
    "image-corrupt": ({"image": "corrupt.jpg"}, "bad_image"),
    "image-bomb": ({"image": "big.png"}, "bad_image"),
    "id-bool": ({"id": True}, "bad_id"),
    "id-huge": ({"id": "x" * 300}, "bad_id"),
    "ok": ({"id": "dup"}, None),
    "dup": ({"id": "dup"}, "duplicate_id"),
    "ok-2": ({}, None),
}
RAW_LINES = {  # lines that are no record at all
    b"": "blank_line",
    b"   ": "blank_line",
    b"{not json": "bad_record",
    b"[1, 2]": "bad_record",
    b'"a string"': "bad_record",
    b'{"question": "caf\xe9 without UTF-8"}': "bad_encoding",
}


def test_import_rejects_every_kind_of_bad_record_and_counts_every_line(photo_dir):
    good = {
        "image": "good.png",
        "question": "Where is the cup?",
        "options": ["left", "right"],
        "answer": "A",
        "target_boxes": [[2, 3, 20, 30]],
        "target_names": ["cup"],
    }
    lines, expected = [], {}
    for rid, (fields, reason) in BAD_RECORDS.items():
        rec = {**good, "id": rid, **fields}
        lines.append(json.dumps({k: v for k, v in rec.items()}).encode())
        expected[len(lines)] = reason
    for raw, reason in RAW_LINES.items():
        lines.insert(3, raw)
        expected = {(k + 1 if k >= 4 else k): v for k, v in expected.items()}
        expected[4] = reason
    path = photo_dir / "many.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    store = ShardStore(str(photo_dir / "root"))
    cfg = load_config("synthetic", {"source": {"shard_size": 8, "max_image_pixels": 10_000}})
    m = import_records(store, path, photo_dir / "images", cfg, dataset="many")
    kinds = {r for r in expected.values() if r}
    assert len(BAD_RECORDS) + len(RAW_LINES) - 2 >= 30 and len(kinds) >= 12
    assert m.rows_in == len(lines) == m.rows + m.reject_rows  # every line counted, blank ones included
    kept = store.read(m)
    assert sorted(kept["id"].to_list()) == ["dup", "ok-2"]  # the first line with id "dup" keeps it
    rejects = store.read(m, "rejects")
    by_line = {json.loads(r["record"])["line"]: r["reason"] for r in rejects.iter_rows(named=True)}
    assert by_line == {k: v for k, v in expected.items() if v}
    assert all(r["detail"] for r in rejects.iter_rows(named=True))  # each with its reason spelled out


def test_import_of_nothing_says_so_and_the_dataset_is_in_the_id(photo_dir, capsys):
    empty = photo_dir / "empty.jsonl"
    empty.write_text("\n\n")
    root = str(photo_dir / "root")
    assert main(["import", "--records", str(empty), "--images", str(photo_dir / "images"), "--root", root]) == 2
    assert "holds no record" in capsys.readouterr().err
    args = [
        "import",
        "--records",
        str(photo_dir / "records.jsonl"),
        "--images",
        str(photo_dir / "images"),
        "--root",
        root,
    ]
    ids = []
    for dataset in ("a", "b"):
        assert main([*args, "--dataset", dataset]) == 0
        ids.append(capsys.readouterr().out.split("source version: ")[1].split()[0])
    assert ids[0] != ids[1]  # the same files under two datasets: two versions, `aot show` names each


def test_a_photo_above_pils_limit_decodes_when_the_limit_is_raised(tmp_path):
    """PIL's own bomb guard (~89 MP) no longer caps source.max_image_pixels."""
    from storage.images import ImageDecodeError

    path = tmp_path / "huge.png"
    Image.new("L", (10_000, 10_000), 7).save(path)  # 100 MP, a few KB as PNG
    data = path.read_bytes()
    with pytest.raises(ImageDecodeError, match="above the limit"):
        decode_image(data, max_pixels=90_000_000)
    assert decode_image(data, max_pixels=200_000_000).size == (10_000, 10_000)


def test_cli_errors_are_one_line_exit_2_and_no_traceback(photo_dir, tmp_path):
    """Each error a user can cause exits 2 with one line naming the fix, through the real entry
    point (a subprocess: what a user sees, stderr whole)."""
    import subprocess
    import sys

    records = photo_dir / "records.jsonl"
    root = str(tmp_path / "root")
    imported = subprocess.run(
        [
            sys.executable,
            "-m",
            "aot.cli",
            "import",
            "--records",
            str(records),
            "--images",
            str(photo_dir / "images"),
            "--root",
            root,
        ],
        capture_output=True,
        text=True,
    )
    source = imported.stdout.split("source version: ")[1].split()[0]
    tsv = tmp_path / "h.tsv"
    tsv.write_text("index\tquestion\tanswer\tcategory\tA\tB\tC\tD\n0\tq\tA\tsingle\tw\tx\ty\tz\n")
    cases = {
        "records folder": ["import", "--records", str(photo_dir / "images"), "--images", str(photo_dir / "images")],
        "benchmark without =": ["eval", "--benchmark", str(tsv)],
        "unknown benchmark": ["eval", "--benchmark", f"mmlu={tsv}"],
        "endpoint down": [
            "eval",
            "--benchmark",
            f"hrbench4k={tsv}",
            "--endpoint",
            "http://127.0.0.1:9/v1",
            "--endpoint-model",
            "m",
        ],
        "synthetic preset on photos": ["run", "--source", source, "--no-prefect"],
        "synthetic preset on photos, Prefect": ["run", "--source", source],
    }
    for case, args in cases.items():
        out = subprocess.run(
            [sys.executable, "-m", "aot.cli", *args, "--root", root],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=300,
        )
        err = [ln for ln in out.stderr.splitlines() if ln.strip()]
        assert out.returncode == 2 and "Traceback" not in out.stderr, (case, out.stderr[-1500:])
        assert len(err) == 1 and err[0].startswith("error: "), (case, err)
    assert "--preset tiny" in err[0]  # the photos case names the fix


def test_sigterm_to_aot_run_leaves_no_process_behind(tmp_path):
    """The ephemeral Prefect server an `aot run` starts ends with it when the run is terminated."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = dict(os.environ, PREFECT_HOME=prefect_home(tmp_path / "home"))
    args = [
        "run",
        "--root",
        str(tmp_path / "data"),
        "--no-progress",
        "--scenes",
        "400",
        "--set",
        "models.defender=perception-baseline",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "aot.cli", *args],
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    def session() -> list[int]:
        ps = subprocess.run(["ps", "-e", "-o", "pid=,sid="], capture_output=True, text=True).stdout.split("\n")
        return [int(ln.split()[0]) for ln in ps if ln.split() and int(ln.split()[1]) == proc.pid]

    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (len(session()) > 1 and (tmp_path / "data" / "synthetic").exists()):
            time.sleep(0.5)  # the CLI and its Prefect server are up, and stages are writing
        assert len(session()) > 1, "the run never started its Prefect server"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
        time.sleep(2)
        assert session() == [], "processes of the terminated run are still alive"
        assert "terminated: finished shards are kept" in proc.stderr.read()
    finally:
        for pid in session():
            os.kill(pid, signal.SIGKILL)


def test_store_commands_do_not_import_torch(photo_dir):
    """`aot ls`, `show`, `gc`, `config` answer from manifests: no model library loads (torch alone is
    ~800 MB of memory)."""
    import subprocess
    import sys

    root = str(photo_dir / "root")
    code = (
        "import sys; from aot.cli import main\n"
        f"for args in (['ls', '--root', {root!r}], ['gc', '--dry-run', '--root', {root!r}], ['config']):\n"
        "    main(args)\n"
        "print('heavy:', sorted(m for m in ('torch', 'transformers', 'diffusers', 'prefect') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-1000:]
    assert out.stdout.strip().splitlines()[-1] == "heavy: []"
