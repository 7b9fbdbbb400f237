"""The AOT loop on the embedded default at toy size: two iterations, every output a version,
a rerun recomputes nothing, and the report lands."""

from __future__ import annotations

import dataclasses
import io
import os
import re
import shutil

import pytest
from PIL import Image

from config import load_config
from conftest import prefect_home
from stages.coevolution import run_coevolution
from stages.steps import LocalSteps
from storage import ShardStore

TOY = {
    "source": {"num_scenes": 16, "shard_size": 8},
    "defender": {
        "warmup": {"steps": 2, "batch_prompts": 8},
        "rl": {"steps": 1, "batch_prompts": 2, "dapo": {"dynamic_sampling": False}},
        "model": {"backend": "tiny", "seed": 0, "min_pixels": 1024, "max_pixels": 4096},
    },
    "attacker": {
        "model": {"backend": "tiny", "seed": 0, "resolution": 32, "cfg_scale": 1.0},
        "cold_start_scenes": 0,
        "cold_start": {"steps": 1, "sft_batch": 2},
        "rl": {
            "steps": 1,
            "groups_per_step": 1,
            "flow_grpo": {"group_size": 4, "sampling_steps": 3},
            "reward": {"queries": 2, "tau": 0.0},
        },
        "curriculum": {"sampling_steps": 3, "max_items": 4},
    },
    "coevolution": {"iterations": 2, "heldout_scenes": 8},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory, mlflow_server):
    """The toy loop, reported to TensorBoard and to a real MLflow server (tracking.report_to)."""
    store = ShardStore(str(tmp_path_factory.mktemp("coevo")))
    cfg = load_config("synthetic", {**TOY, "tracking": {"report_to": ["tensorboard", "mlflow"]}})
    events = []
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")}
    os.environ.update(MLFLOW_TRACKING_URI=mlflow_server, MLFLOW_EXPERIMENT_NAME="aot-toy")
    try:
        m = run_coevolution(store, cfg, LocalSteps(store, cfg, events.append))
        yield store, cfg, m, events
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_two_iterations_chain_their_checkpoints(run, tmp_path):
    store, cfg, m, events = run
    assert m.stage == "coevolution" and m.rows == 2
    df = store.read(m)
    assert df["iteration"].to_list() == [1, 2]
    lin = m.extra["lineage"]
    it1, it2 = lin["iteration_1"], lin["iteration_2"]
    # attacker 2 starts from attacker 1 and plays defender 1; defender 2 starts from defender 1
    a2 = store.manifest(it2["attacker"])
    assert a2.parents == [lin["items"], it1["defender"], it1["attacker"]]
    assert store.manifest(it1["attacker"]).parents == [lin["items"], lin["defender_0"], lin["attacker_cold_start"]]
    d2 = store.manifest(it2["defender"])
    assert d2.parents == [it2["curriculum"], it1["defender"]]
    assert store.manifest(it2["curriculum"]).parents == [it2["attacker"], lin["items"], it1["defender"]]
    for col in (
        "attack_success_start",
        "attack_success_before",
        "attack_success_after",
        "defender_clean_accuracy",
        "strategy_none",
    ):
        assert all(v is not None and 0 <= v <= 1 for v in df[col].to_list()), col
    # attacker 2's phase starts where defender phase 1 ended: attacker 1 against defender 1, the same items
    assert df["attack_success_start"][1] == df["attack_success_after"][0]
    assert {"iterations.png"} <= {f.path for f in m.files}
    # the per-iteration table in TensorBoard (tracking.report_to): one step per iteration, defender 0 at 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store.fetch_files(m, str(tmp_path))
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    clean = acc.Scalars("defender_clean_accuracy")
    assert [e.step for e in clean] == [0, 1, 2]
    assert [e.value for e in clean] == pytest.approx([m.extra["base_clean_accuracy"], *df["defender_clean_accuracy"]])
    assert [e.value for e in acc.Scalars("attack_success_before")] == pytest.approx(
        df["attack_success_before"].to_list()
    )
    # each iteration's clean-over-edited grid as an image panel, the curriculum's own picture
    grids = acc.Images("clean_vs_edited")
    assert [e.step for e in grids] == [1, 2]
    for e, n in zip(grids, (1, 2)):
        curriculum = store.manifest(lin[f"iteration_{n}"]["curriculum"])
        grid = store.read_file(curriculum, "grid.png")
        assert (e.width, e.height) == Image.open(io.BytesIO(grid)).size
    # held-out scenes are another world: no scene id in common with the training items
    held = set(store.read(store.manifest(lin["heldout"]))["scene"].to_list())
    train = set(store.read(store.manifest(lin["items"]))["scene"].to_list())
    assert held and not (held & train)


def test_mlflow_holds_the_loop_nested_with_its_metrics_params_and_versions(run, mlflow_server):
    """MLflow, read back through its own client: the co-evolution run holds the warm-up and the
    cold start, then one run per iteration, each holding the attacker and defender runs that
    trained it; metrics per step, the resolved config as params, the version ids as tags."""
    from mlflow import MlflowClient

    store, cfg, m, _ = run
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("aot-toy")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    by_version = {r.data.tags.get("aot.version"): r for r in runs}
    parent = lambda r: r.data.tags.get("mlflow.parentRunId")  # noqa: E731
    top = by_version[m.version]
    assert top.data.tags["aot.stage"] == "coevolution" and parent(top) is None
    assert top.data.params["coevolution.iterations"] == "2"
    clean = client.get_metric_history(top.info.run_id, "defender_clean_accuracy")
    assert [h.step for h in sorted(clean, key=lambda h: h.step)] == [0, 1, 2]
    lin = m.extra["lineage"]
    for key in ("defender_0", "attacker_cold_start"):
        assert parent(by_version[lin[key]]) == top.info.run_id, key
    iterations = {r.data.tags["aot.iteration"]: r for r in runs if r.data.tags.get("aot.stage") == "iteration"}
    assert sorted(iterations) == ["1", "2"]
    df = store.read(m)
    for n, it in iterations.items():
        assert parent(it) == top.info.run_id
        row = df.filter(df["iteration"] == int(n)).row(0, named=True)
        assert it.data.metrics["attack_success_after"] == pytest.approx(row["attack_success_after"])
        for phase in ("attacker", "defender"):
            trained = by_version[lin[f"iteration_{n}"][phase]]
            assert parent(trained) == it.info.run_id, (n, phase)
            assert trained.info.status == "FINISHED" and trained.data.tags["aot.stage"] == phase
            assert "loss" in trained.data.metrics or "reward" in trained.data.metrics
    attacker = by_version[lin["iteration_1"]["attacker"]]
    steps = client.get_metric_history(attacker.info.run_id, "reward")
    assert [h.step for h in steps] == list(range(1, cfg.attacker.rl.steps + 1))
    assert attacker.data.params["attacker.train.flow_grpo.group_size"] == "4"  # the version's resolved config
    # the image panel: one clean-over-edited grid per iteration, at its step
    images = [a.path for a in client.list_artifacts(top.info.run_id, "images")]
    steps = {
        int(m[1]) for p in images if p.endswith(".png") and (m := re.search(r"clean_vs_edited\W+step\W+(\d+)\W", p))
    }
    assert steps == {1, 2}, images


def test_curriculum_replay_trains_defender_n_on_earlier_curricula_too(run, capsys):
    """coevolution.curriculum_replay = 1: defender 2 trains on curricula 2 and 1; everything before
    it is the run's own versions (found, not recomputed), and the Prefect seam gives the same id."""
    store, cfg, m, _ = run
    lin = m.extra["lineage"]
    it1, it2 = lin["iteration_1"], lin["iteration_2"]
    replay = dataclasses.replace(cfg, coevolution=dataclasses.replace(cfg.coevolution, curriculum_replay=1))
    events = []
    lin2 = run_coevolution(store, replay, LocalSteps(store, replay, events.append)).extra["lineage"]
    assert lin2["iteration_1"] == it1  # nothing to replay in iteration 1
    assert lin2["iteration_2"]["attacker"] == it2["attacker"] and lin2["iteration_2"]["curriculum"] == it2["curriculum"]
    assert [e for e in events if " trained" in e] == [
        f"defender dapo trained: {lin2['iteration_2']['defender']} (1 steps)"
    ]
    d2 = store.manifest(lin2["iteration_2"]["defender"])
    assert d2.version != it2["defender"]
    assert d2.parents == [it2["curriculum"], it1["curriculum"], it1["defender"]]
    assert d2.config["defender"]["also"] == [it1["curriculum"]]
    # its examples are both curricula's (one image per curriculum row)
    cur1, cur2 = store.manifest(it1["curriculum"]), store.manifest(it2["curriculum"])
    assert d2.rows_in == cur1.rows + cur2.rows and store.manifest(it2["defender"]).rows_in == cur2.rows
    # the same call through Prefect (the flow's also_versions) finds that very version
    from flows.steps import PrefectSteps

    over = {**TOY, "coevolution": {**TOY["coevolution"], "curriculum_replay": 1}}
    prefect = PrefectSteps(store.root, "synthetic", over, None, progress=False)
    assert prefect.train_defender(it2["curriculum"], it1["defender"], "dapo", "both", also=[it1["curriculum"]]) == (
        d2.version
    )
    # and so does the one-stage command (`aot train-defender --also`)
    from aot.cli import main

    sets = [a for k, v in _dotted(over).items() for a in ("--set", f"{k}={v}")]  # defender.images: both by default
    argv = ["train-defender", "--data", it2["curriculum"], "--init", it1["defender"], "--mode", "dapo"]
    assert main([*argv, "--also", it1["curriculum"], "--root", store.root, "--no-prefect", *sets]) == 0
    assert f"defender version: {d2.version}" in capsys.readouterr().out


def test_a_rerun_finds_every_step_done(run):
    store, cfg, m, _ = run
    events = []
    again = run_coevolution(store, cfg, LocalSteps(store, cfg, events.append))
    assert again.version == m.version
    assert events and all(" found" in e or e.startswith(("curriculum", "evaluation")) for e in events), events


@pytest.mark.parametrize("fmt", ["md", "html"])
def test_the_report_is_self_contained(run, fmt):
    from stages.coevolution import render_report

    store, _, m, _ = run
    text = render_report(store, m.version, fmt)
    assert text.count("data:image/png;base64,") >= 3  # curve, rewards, mix (+ grids when edits were kept)
    assert "attack_success_before" in text and m.version in text
    assert "file://" not in text and "http" not in text.replace("https://", "")
    with pytest.raises(ValueError, match="coevolution run"):
        render_report(store, m.extra["lineage"]["export"], fmt)


@pytest.mark.slow
def test_aot_run_until_coevolution_through_prefect_writes_the_report(run, tmp_path):
    """The documented command, through Prefect (the `coevolution` flow and every stage task),
    on the same store: the same run version, nothing retrained, and the report file."""
    import subprocess
    import sys

    store, _, m, _ = run
    args = [
        "run",
        "--until",
        "coevolution",
        "--root",
        store.root,
        "--no-progress",
        "--report",
        str(tmp_path / "r.html"),
    ]
    for k, v in _dotted(TOY).items():
        args += ["--set", f"{k}={v}"]
    import os

    env = dict(os.environ, PREFECT_HOME=prefect_home(tmp_path / "home"))
    proc = subprocess.run(
        [sys.executable, "-m", "aot.cli", *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"coevolution run: {m.version}" in proc.stdout
    html = (tmp_path / "r.html").read_text()
    assert html.startswith("<!doctype html>") and html.count("data:image/png;base64,") >= 3


def _dotted(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "model":
            out.update(_dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it: apt-get install chromium)")
def test_the_mlflow_ui_charts_the_coevolution_run(run, mlflow_server, tmp_path):
    """What a user opens: MLflow's own UI, headless Chromium, the co-evolution run's metric
    charts. The screenshot is the test's artifact (its tmp folder)."""
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    from mlflow import MlflowClient

    _, _, m, _ = run
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("aot-toy")
    top = client.search_runs([exp.experiment_id], f"tags.`aot.version` = '{m.version}'")[0]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs/{top.info.run_id}/model-metrics")
        page.get_by_text("attack_success_after").first.wait_for(timeout=60_000)  # charts, alphabetical
        page.get_by_placeholder("Search metric charts").fill("accuracy")  # the loop's accuracy curves
        page.get_by_text("defender_clean_accuracy").first.wait_for(timeout=30_000)
        page.wait_for_timeout(2000)  # the charts draw after their data arrives
        page.screenshot(path=str(tmp_path / "mlflow-coevolution-metrics.png"))
        body = page.inner_text("body")
        browser.close()
    assert f"coevolution {m.version}" in body  # the run's name
    for metric in ("defender_clean_accuracy", "defender_attacked_accuracy"):
        assert metric in body, metric
    assert "attack_success_after" not in body  # the search narrowed the charts to the accuracy curves
    assert (tmp_path / "mlflow-coevolution-metrics.png").stat().st_size > 20_000


def test_an_mlflow_server_that_does_not_answer_fails_in_seconds_naming_the_fix(monkeypatch):
    """MLflow's client retries a dead server for minutes; the tracker checks first."""
    import time

    from conftest import free_port
    from training.tracking import RunTracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    t = time.monotonic()
    with pytest.raises(ConnectionError, match="no MLflow server answers.*MLFLOW_TRACKING_URI"):
        RunTracker(["mlflow"], "")
    assert time.monotonic() - t < 30
