"""`aot import` row validation, the config layer, and the CLI's non-Prefect commands."""

from __future__ import annotations

import json

import polars as pl
import pytest
from PIL import Image

from aot.cli import main
from config import ConfigError, parse_overrides
from conftest import REPO
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
        syn.models["defender"]["warmup"] == {"steps": 5, "scenes": 4096}
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
    assert "imported 11 records: 2 kept, 9 rejected" in out  # default bomb limit: big.png is fine
    version = out.split("source version: ")[1].split()[0]
    assert main(["ls", "--root", root]) == 0
    assert version in capsys.readouterr().out
    assert main(["show", version, "--root", root, "--rejects", "3"]) == 0
    shown = capsys.readouterr().out
    assert "2 kept, 9 rejected" in shown and "first 3 rejects" in shown
    assert main(["gc", "--root", root, "--min-age", "0", "--dry-run"]) == 0
    assert "0 paths would be removed" in capsys.readouterr().out
