"""Benchmark readers on fixture files in each published format, strict vs paper protocols,
metrics by hand, and resuming an interrupted evaluation."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest

from evaluation.harness import PAPER, STRICT, AnswerCache, evaluate, metrics, present
from evaluation.readers import (
    FormatError,
    image_b64,
    read_hallusionbench,
    read_hrbench,
    read_pope,
    read_tsv,
    read_vstar,
)
from world import generate_world, render


def _img(i: int):
    return render(generate_world(100 + i)).resize((64, 64))


def _write_tsv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(header)
        w.writerows(rows)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    vstar = d / "vstar"
    for cat in ("relative_position", "direct_attributes"):
        (vstar / cat).mkdir(parents=True)
        for i in range(20):
            _img(i).save(vstar / cat / f"{i}.jpg")
            json.dump(
                {"question": f"Q{i}?", "options": ["right", "left", "up", "down"], "bbox": [[1, 2, 3, 4]]},
                open(vstar / cat / f"{i}.json", "w"),
            )
    json.dump({"question": "orphan", "options": ["a", "b"]}, open(vstar / "relative_position" / "99.json", "w"))
    _img(98).save(vstar / "direct_attributes" / "98.png")
    (vstar / "direct_attributes" / "98.json").write_text("{not json")
    hr = d / "hr4k.tsv"
    _write_tsv(
        hr,
        ["index", "image", "question", "answer", "category", "A", "B", "C", "D", "cycle_category"],
        [[str(i), image_b64(_img(i)), f"q{i}", "ABCD"[i % 4], "single", "w", "x", "y", "z", ""] for i in range(8)]
        + [
            ["bad1", image_b64(_img(1)), "q", "E", "single", "w", "x", "y", "z", ""],
            ["bad2", "bm90IGFuIGltYWdl", "q", "A", "cross", "w", "x", "y", "z", ""],
        ],
    )
    pope = d / "pope.tsv"
    _write_tsv(
        pope,
        ["index", "image", "question", "answer", "category"],
        [
            [
                str(i),
                image_b64(_img(i)),
                f"Is there a cup {i}?",
                "Yes" if i % 2 == 0 else "no",
                "adversarial,popular" if i < 4 else "random",
            ]
            for i in range(8)
        ]
        + [["9", image_b64(_img(9)), "q", "maybe", "random"]],
    )
    hb_dir = d / "hb_images"
    hb_dir.mkdir()
    hb = d / "hallusionbench.tsv"
    rows = []
    for fig in range(2):
        for q in range(2):
            name = f"f{fig}q{q}.png"
            _img(fig * 2 + q).save(hb_dir / name)
            rows.append(
                [f"VS_chart_x_{0}_{fig}_{q}", f"question {q}?", "Yes" if q == 0 else "No", "VS", "chart", name, ""]
            )
    _write_tsv(hb, ["index", "question", "answer", "category", "l2-category", "image_path", "image"], rows)
    return d, vstar, hr, pope, hb, hb_dir


def test_readers_round_trip_and_reject(fixtures):
    d, vstar, hr, pope, hb, hb_dir = fixtures
    items, rej = read_vstar(vstar)
    assert len(items) == 40 and {r.reason for r in rej} == {"missing_image", "bad_record"}
    assert items[0].answer == "A" and items[0].options[0] == "right" and items[0].image.size == (64, 64)
    items, rej = read_hrbench(hr, "hrbench4k")
    assert len(items) == 8 and [r.reason for r in rej] == ["bad_answer", "bad_image"]
    assert [i.answer for i in items[:4]] == ["A", "B", "C", "D"]
    items, rej = read_pope(pope)
    assert len(items) == 8 and [r.reason for r in rej] == ["bad_answer"]
    assert items[0].categories == ["adversarial", "popular"] and items[1].answer == "no"
    items, rej = read_hallusionbench(hb, hb_dir)
    # fAcc / qAcc group by (l2-category, set, figure / question), as VLMEvalKit rates HallusionBench
    assert len(items) == 4 and not rej and items[1].meta == {"set": "0", "figure": "chart_0_0", "question": "chart_0_1"}


def test_wrong_format_names_the_expected_columns(tmp_path):
    p = tmp_path / "x.tsv"
    _write_tsv(p, ["id", "img", "q"], [["1", "", ""]])
    with pytest.raises(FormatError, match=r"lacks column\(s\) \['index', 'image', 'question', 'answer', 'category'\]"):
        read_pope(p)
    with pytest.raises(FormatError, match="expected a TSV"):
        read_tsv(p, ["index", "question"], "HRBench")


class Always:
    def __init__(self, text):
        self.text = text
        self.calls = 0

    def generate(self, images, prompts, temperature=0.0, seed=0):
        self.calls += len(prompts)
        return [self.text] * len(prompts)


def test_always_a_scores_100_under_paper_and_chance_under_strict(fixtures):
    items, _ = read_vstar(fixtures[1])
    paper = metrics(evaluate(Always("\\boxed{A}"), "always-a", items, PAPER))["vstar"]
    strict_rows = evaluate(Always("\\boxed{A}"), "always-a", items, STRICT)
    strict = metrics(strict_rows)["vstar"]
    assert paper["accuracy"] == 1.0
    expected = sum(present(i, STRICT)[1] == "A" for i in items) / len(items)  # how often shuffling put the truth at A
    assert strict["accuracy"] == expected and 0.1 < expected < 0.45
    assert all(r["permutation"] is not None for r in strict_rows)  # recorded per item


def test_unparsed_answers_are_counted_not_guessed(fixtures):
    items, _ = read_hrbench(fixtures[2], "hrbench4k")
    rows = evaluate(Always("I would say B, probably."), "words", items, STRICT)
    m = metrics(rows)["hrbench4k"]
    assert m["unparsed"] == 1.0 and m["accuracy"] == 0.0
    paper = metrics(evaluate(Always("I would say B, probably."), "words", items, PAPER))["hrbench4k"]
    assert paper["unparsed"] == 0.0 and paper["accuracy"] == pytest.approx(2 / 8)  # first A-D letter: "B"


def test_pope_and_hallusionbench_metrics_by_hand(fixtures):
    d, vstar, hr, pope, hb, hb_dir = fixtures
    items, _ = read_pope(pope)
    m = metrics(evaluate(Always("\\boxed{Yes}"), "yes", items, STRICT))["pope"]
    assert (m["accuracy"], m["precision"], m["recall"], m["f1"]) == (0.5, 0.5, 1.0, pytest.approx(2 / 3))
    assert m["categories"]["random"]["n"] == 4 and m["categories"]["adversarial"]["n"] == 4
    items, _ = read_hallusionbench(hb, hb_dir)
    m = metrics(evaluate(Always("\\boxed{Yes}"), "yes", items, STRICT))["hallusionbench"]
    # Truth: q0 yes, q1 no on both figures -> aAcc 0.5; no figure all right; question 0 right on all figures.
    assert (m["aAcc"], m["fAcc"], m["qAcc"]) == (0.5, 0.0, 0.5)


def test_interrupted_evaluation_resumes_without_asking_again(fixtures, tmp_path):
    items, _ = read_hrbench(fixtures[2], "hrbench4k")

    class Dies(Always):
        def generate(self, images, prompts, temperature=0.0, seed=0):
            if self.calls >= 4:
                raise KeyboardInterrupt
            return super().generate(images, prompts, temperature, seed)

    cache_path = tmp_path / "answers.jsonl"
    with pytest.raises(KeyboardInterrupt):
        evaluate(Dies("\\boxed{C}"), "m", items, STRICT, AnswerCache(cache_path), batch_size=2)
    resumed = Always("\\boxed{C}")
    rows = evaluate(resumed, "m", items, STRICT, AnswerCache(cache_path), batch_size=2)
    assert resumed.calls == 4 and len(rows) == 8  # only the 4 unanswered items were asked
    again = Always("\\boxed{C}")
    evaluate(again, "m", items, STRICT, AnswerCache(cache_path))
    assert again.calls == 0


def test_evaluation_says_progress_about_every_tenth_of_the_answers_to_get(fixtures, tmp_path):
    """label: one line per tenth of the answers still to get (jumps of a batch at a time cross a
    tenth at most once each), ending at T/T; answers from the cache are not counted."""
    from models import progress

    items, _ = read_hrbench(fixtures[2], "hrbench4k")
    lines: list[str] = []
    progress.SINKS.append(lines.append)
    try:
        cache = AnswerCache(tmp_path / "a.jsonl")
        evaluate(Always("\\boxed{C}"), "m", items[:3], PAPER, cache, batch_size=2, label="evaluate hr")
        # 3 items x 3 trials, one call per trial in batches of 2 and 1; a tenth of 9 is 1 answer
        assert [ln.split(",")[0] for ln in lines] == [f"evaluate hr: answer {n}/9" for n in (2, 3, 5, 6, 8, 9)]
        lines.clear()
        evaluate(Always("\\boxed{C}"), "m", items, PAPER, cache, batch_size=5, label="evaluate hr")
        # 8 items x 3 trials, 9 cached: 15 to get, 5 per call, a tenth is 1 answer
        assert [ln.split(",")[0] for ln in lines] == [f"evaluate hr: answer {n}/15" for n in (5, 10, 15)]
        lines.clear()
        evaluate(Always("\\boxed{C}"), "m", items, PAPER, cache, label="evaluate hr")
        assert lines == []  # all cached: nothing to wait for
    finally:
        progress.SINKS.remove(lines.append)


def test_tiny_defender_runs_on_every_format(fixtures):
    from models.qwen_vl import QwenVLPolicy, TinyDefenderSpec

    d, vstar, hr, pope, hb, hb_dir = fixtures
    policy = QwenVLPolicy.tiny(spec=TinyDefenderSpec(min_pixels=1024, max_pixels=4096))
    items = (
        read_vstar(vstar)[0][:4]
        + read_hrbench(hr, "hrbench4k")[0][:4]
        + read_pope(pope)[0][:4]
        + read_hallusionbench(hb, hb_dir)[0]
    )
    m = metrics(evaluate(policy, "tiny", items, STRICT))
    assert set(m) == {"vstar", "hrbench4k", "pope", "hallusionbench"}
    assert all(0.0 <= v["accuracy"] <= 1.0 and 0.0 <= v["unparsed"] <= 1.0 for v in m.values())


def test_aot_eval_cli_writes_a_results_version(fixtures, tmp_path, capsys, monkeypatch):
    import stages.benchmark
    from aot.cli import main
    from storage import ShardStore

    d, vstar, hr, pope, hb, hb_dir = fixtures
    asked, evaluate = [], stages.benchmark.evaluate
    monkeypatch.setattr(  # the command's --prefetch reaches the evaluator
        stages.benchmark, "evaluate", lambda *a, **kw: asked.append(kw["prefetch"]) or evaluate(*a, **kw)
    )
    rc = main(
        [
            "eval",
            "--root",
            str(tmp_path),
            "--benchmark",
            f"vstar={vstar}",
            "--benchmark",
            f"pope={pope}",
            "--protocol",
            "paper",
            "--cache",
            str(tmp_path / "c.jsonl"),
            "--set",  # any defender will do: the results version is under test
            "models.defender=perception-baseline",
            "--prefetch",
            "3",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert asked == [3]
    version = out.split("results version: ")[1].split()[0]
    m = ShardStore(str(tmp_path)).manifest(version)
    assert m.rows == 48 and m.reject_rows == 3 and m.extra["columns"] == ["vstar", "pope"]
    bad = tmp_path / "bad.tsv"
    _write_tsv(bad, ["id", "picture"], [["1", "x"]])
    assert main(["eval", "--root", str(tmp_path), "--benchmark", f"pope={bad}"]) == 2  # wrong format: one line
    err = capsys.readouterr().err
    assert err.startswith("error: POPE") and "lacks column" in err and "Traceback" not in err
    assert main(["eval", "--root", str(tmp_path), "--benchmark", f"pope={pope}", "--prefetch", "-1"]) == 2
    assert capsys.readouterr().err.startswith("error: --prefetch N needs N >= 0")


def test_chat_endpoint_concurrency_retries_and_errors(fixtures, monkeypatch):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from evaluation.endpoint import ChatEndpoint, EndpointError

    state = {"active": 0, "peak": 0, "calls": 0, "auth": set()}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                state["calls"] += 1
                n = state["calls"]
                state["active"] += 1
                state["peak"] = max(state["peak"], state["active"])
                state["auth"].add(self.headers.get("Authorization"))
            import time as _t

            _t.sleep(0.05)
            with lock:
                state["active"] -= 1
            if body["model"] == "refuse":
                self.send_response(400)
                self.end_headers()
                self.wfile.write(b"bad model")
                return
            if n == 1:  # the first request meets a transient failure
                self.send_response(503)
                self.end_headers()
                return
            text = body["messages"][0]["content"][1]["text"]
            ok = body["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
            out = json.dumps({"choices": [{"message": {"content": f"\\\\boxed{{A}} {len(text) if ok else -1}"}}]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(out.encode())

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AOT_TEST_KEY", "sk-test")
        base = f"http://127.0.0.1:{server.server_port}/v1"
        ep = ChatEndpoint(base, "m", api_key_env="AOT_TEST_KEY", concurrency=3, backoff=0.01)
        items, _ = read_vstar(fixtures[1])
        rows = evaluate(ep, "endpoint", items[:12], PAPER)
        assert all(r["score"] == 1.0 for r in rows)  # every answer came back (paper: 3 trials each)
        assert state["calls"] == 12 * 3 + 1  # one retry
        assert state["peak"] <= 3 and state["auth"] == {"Bearer sk-test"}
        with pytest.raises(EndpointError, match=r"refused the request \(400\): bad model"):
            ChatEndpoint(base, "refuse", backoff=0.01).generate([items[0].image], ["q"])
        with pytest.raises(EndpointError, match="still failing after 2 tries"):
            ChatEndpoint("http://127.0.0.1:9/v1", "m", max_retries=1, backoff=0.01, timeout=1).generate(
                [items[0].image], ["q"]
            )
    finally:
        server.shutdown()


def test_synthetic_robustness_suite_measures_the_drop(tmp_path):
    from config import load_config
    from models.perception_baseline import PerceptionBaselineDefender
    from stages.robustness import robustness_suite
    from storage import ShardStore

    cfg = load_config("synthetic", {"source": {"shard_size": 8}, "models": {"defender": "perception-baseline"}})
    r = robustness_suite(ShardStore(str(tmp_path)), cfg, PerceptionBaselineDefender(), "baseline", scenes=24)
    # The implanter kept only edits that fool this very defender while it was right on the clean image:
    assert r["rows"] > 0 and r["clean_accuracy"] == 1.0 and r["attacked_accuracy"] == 0.0 and r["drop"] == 1.0


def test_aot_eval_uses_the_presets_defender_and_sampled_trials(fixtures, tmp_path, capsys):
    from aot.cli import main
    from storage import ShardStore

    rc = main(
        [
            "eval",
            "--root",
            str(tmp_path),
            "--benchmark",
            f"hrbench4k={fixtures[2]}",
            "--preset",
            "tiny",
            "--trials",
            "2",
            "--temperature",
            "1.0",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    m = ShardStore(str(tmp_path)).manifest(out.split("results version: ")[1].split()[0])
    assert m.config["protocol"]["trials"] == 2 and m.config["model"].startswith('defender:{"backend": "tiny"')
    rows = ShardStore(str(tmp_path)).read(m)
    assert all(len(json.loads(p)) == 2 for p in rows["parsed"].to_list())  # two sampled answers per item


def test_an_edited_benchmark_file_is_a_new_input(fixtures, tmp_path):
    import shutil
    import time

    from stages.benchmark import evaluate_benchmarks
    from storage import ShardStore

    hr = tmp_path / "hr.tsv"
    shutil.copy(fixtures[2], hr)
    store = ShardStore(str(tmp_path / "data"))
    run = lambda: evaluate_benchmarks(store, {"hrbench4k": str(hr)}, Always("\\boxed{A}"), "a", "paper")  # noqa: E731
    first = run()
    assert run().version == first.version
    time.sleep(0.01)
    hr.write_text(hr.read_text().replace("\tA\tsingle", "\tB\tsingle", 1))  # same rows, one answer changed
    second = run()
    assert second.version != first.version
    # Unshuffled, always-"A" is right where the answer is A: rows 0 and 4 before, only row 4 after.
    assert (first.extra["summary"]["hrbench4k"]["accuracy"], second.extra["summary"]["hrbench4k"]["accuracy"]) == (
        2 / 8,
        1 / 8,
    )


def test_synthetic_suite_without_items_says_why(tmp_path):
    """No kept edit on the held-out scenes: a clear error naming the fix, not a KeyError."""
    from config import load_config
    from models.perception_baseline import PerceptionBaselineDefender
    from stages.robustness import robustness_suite
    from storage import ShardStore

    cfg = load_config(
        "synthetic",
        {
            "source": {"shard_size": 4},
            "models": {"defender": "perception-baseline"},
            "implant": {"num_proposals": 1, "detector_iou_min": 1.0},
        },
    )
    with pytest.raises(ValueError, match="no items: Stage 2 kept no edit on 4 held-out scenes.*more scenes"):
        robustness_suite(ShardStore(str(tmp_path)), cfg, PerceptionBaselineDefender(), "baseline", scenes=4)


# ------------------------------------------------------------------ numbers a user can trust
class Oracle:
    """Answers every question right: looks the shown prompt and image up in ``truth``."""

    def __init__(self, items, protocol):
        from evaluation.harness import image_digest

        self.truth = {}
        for it in items:
            prompt, shown, _ = present(it, protocol)
            answer = shown if it.options else shown.capitalize()
            self.truth[(prompt, image_digest(it.image))] = "\\boxed{" + answer + "}"

    def generate(self, images, prompts, temperature=0.0, seed=0):
        from evaluation.harness import image_digest

        return [self.truth[(p, image_digest(im))] for im, p in zip(images, prompts)]


def test_benchmarks_with_colliding_ids_keep_their_own_answers(fixtures):
    """HRBench and POPE both number items from 0: one run over both must not mix their answers."""
    hr_items, _ = read_hrbench(fixtures[2], "hrbench4k")
    pope_items, _ = read_pope(fixtures[3])
    assert {i.id for i in hr_items} & {i.id for i in pope_items}  # the fixture collides on purpose
    for protocol in (STRICT, PAPER):
        m = metrics(evaluate(Oracle(hr_items + pope_items, protocol), "oracle", hr_items + pope_items, protocol))
        assert m["hrbench4k"]["accuracy"] == 1.0 and m["pope"]["accuracy"] == 1.0, protocol.name


def test_unparsed_pope_answers_score_zero(fixtures):
    items, _ = read_pope(fixtures[3])
    m = metrics(evaluate(Always("I cannot tell."), "mute", items, STRICT))["pope"]
    assert m["accuracy"] == 0.0 and m["unparsed"] == 1.0 and m["f1"] == 0.0 and m["recall"] == 0.0


def test_images_differing_in_a_small_patch_get_their_own_cached_answers(tmp_path):
    """HallusionBench's edited figures: same question, images differing in a few pixels."""
    import numpy as np
    from PIL import Image

    from evaluation.readers import Item

    base = np.full((96, 96, 3), 200, np.uint8)
    edited = base.copy()
    edited[40:43, 50:53] = 0  # a 3x3 patch, between any sampling grid's points
    a = Item("fig-a", "hallusionbench", Image.fromarray(base), "Is the dot there?", "no", None, ["VS", "chart"])
    b = Item("fig-b", "hallusionbench", Image.fromarray(edited), "Is the dot there?", "yes", None, ["VS", "chart"])

    class Looks:
        calls = 0

        def generate(self, images, prompts, temperature=0.0, seed=0):
            self.calls += len(images)
            return ["\\boxed{Yes}" if np.asarray(im).min() == 0 else "\\boxed{No}" for im in images]

    cache = AnswerCache(tmp_path / "c.jsonl")
    model = Looks()
    assert [r["score"] for r in evaluate(model, "looks", [a, b], STRICT, cache)] == [1.0, 1.0]
    again = Looks()  # from the cache: each image its own answer, nothing asked
    assert [r["score"] for r in evaluate(again, "looks", [b, a], STRICT, AnswerCache(tmp_path / "c.jsonl"))] == [1, 1]
    assert model.calls == 2 and again.calls == 0


@pytest.fixture
def chat_server():
    """A stand-in OpenAI-compatible chat server on 127.0.0.1: answers \\boxed{A} and records each
    request's seed and prompt. Yields (base URL, list of recorded requests)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                seen.append({"seed": body.get("seed"), "text": body["messages"][0]["content"][1]["text"]})
            out = json.dumps({"choices": [{"message": {"content": "\\boxed{A}"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(out)

    servers = []

    def start():
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/v1"

    yield start, seen
    for s in servers:
        s.shutdown()


def test_two_endpoints_on_one_root_are_two_versions(fixtures, tmp_path, chat_server, capsys):
    from aot.cli import main

    start, seen = chat_server
    versions = []
    for url in (start(), start()):  # two servers, one model name
        before = len(seen)
        args = [
            "eval",
            "--root",
            str(tmp_path),
            "--benchmark",
            f"hrbench4k={fixtures[2]}",
            "--endpoint",
            url,
            "--endpoint-model",
            "qwen2.5-vl-7b",
        ]
        assert main(args) == 0
        versions.append(capsys.readouterr().out.split("results version: ")[1].split()[0])
        assert len(seen) - before == 8  # the second server was asked too, not served the first's numbers
    assert versions[0] != versions[1]


def test_sampled_trials_send_each_trial_its_own_seed(fixtures, tmp_path, chat_server, capsys):
    from aot.cli import main

    start, seen = chat_server
    url = start()
    args = [
        "eval",
        "--root",
        str(tmp_path),
        "--benchmark",
        f"hrbench4k={fixtures[2]}",
        "--endpoint",
        url,
        "--endpoint-model",
        "m",
        "--trials",
        "3",
        "--temperature",
        "0.7",
    ]
    assert main(args) == 0
    by_prompt: dict[str, list] = {}
    for r in seen:
        by_prompt.setdefault(r["text"], []).append(r["seed"])
    assert len(by_prompt) == 8 and all(len(s) == 3 and len(set(s)) == 3 for s in by_prompt.values()), by_prompt
    assert len({s for v in by_prompt.values() for s in v}) == 24  # and no two items share one either


def test_hallusionbench_in_its_published_layout_through_the_cli(fixtures, tmp_path, capsys):
    """The TSV in one folder, its images in another: --benchmark-images names that folder; without
    it every row is rejected, which is an error naming the option, not a missing line."""
    import shutil

    from aot.cli import main

    d, vstar, hr, pope, hb, hb_dir = fixtures
    (tmp_path / "tsv").mkdir()
    tsv = shutil.copy(hb, tmp_path / "tsv" / "HallusionBench.tsv")
    base = [
        "eval",
        "--root",
        str(tmp_path / "data"),
        "--benchmark",
        f"hallusionbench={tsv}",
        "--set",
        "models.defender=perception-baseline",
    ]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: hallusionbench: no usable row") and "--benchmark-images hallusionbench=DIR" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main([*base, "--benchmark-images", f"hallusionbench={hb_dir}", "--benchmark", f"pope={pope}"]) == 0
    out = capsys.readouterr().out
    assert "hallusionbench: n=4" in out and "fAcc=" in out and "qAcc=" in out  # the benchmark's own metrics
    assert "pope: n=8  rejected=1" in out and "precision=" in out and "f1=" in out
    assert "  adversarial" in out and "  chart" in out  # per category


def test_hrbench_answers_are_one_option_letter(tmp_path):
    p = tmp_path / "hr.tsv"
    rows = [
        [str(i), image_b64(_img(i)), "q", ans, "single", "w", "x", "y", "z", ""]
        for i, ans in enumerate(["A", "AB", "BC", "", " c ", "ABCD"])
    ]
    _write_tsv(p, ["index", "image", "question", "answer", "category", "A", "B", "C", "D", "cycle_category"], rows)
    items, rej = read_hrbench(p, "hrbench4k")
    assert [i.answer for i in items] == ["A", "C"]
    assert [(r.id, r.reason) for r in rej] == [
        ("1", "bad_answer"),
        ("2", "bad_answer"),
        ("3", "bad_answer"),
        ("5", "bad_answer"),
    ]


class _Prefetching:
    """A model that prepares its inputs apart (as QwenVLPolicy does): records which batch was
    prepared when, in which thread, and what generate was handed."""

    def __init__(self, fail_at: int | None = None):
        import threading

        self.log, self.main, self.fail_at = [], threading.get_ident(), fail_at

    def prepare(self, images, prompts):
        import threading

        if self.fail_at is not None and prompts[0] == f"p{self.fail_at}":
            raise ValueError("unreadable image")
        self.log.append(("prepare", prompts[0], threading.get_ident() != self.main))
        return [p.upper() for p in prompts]

    def generate(self, images, prompts, *, temperature=0.0, seed=0, encoded=None):
        self.log.append(("generate", prompts[0], encoded))
        return list(encoded) if encoded is not None else [p + "!" for p in prompts]


def test_ask_prepares_the_next_batch_in_a_worker_and_answers_alike():
    from evaluation.answers import ask

    prompts = [f"p{i}" for i in range(7)]
    model = _Prefetching()
    got = ask(model, [None] * 7, prompts, batch_size=3)
    assert got == [p.upper() for p in prompts]  # every batch answered from its own prepared inputs
    gens = [e for e in model.log if e[0] == "generate"]
    assert [g[1] for g in gens] == ["p0", "p3", "p6"] and [g[2] for g in gens] == [
        ["P0", "P1", "P2"],
        ["P3", "P4", "P5"],
        ["P6"],
    ]
    preps = [e for e in model.log if e[0] == "prepare"]
    assert [p[1] for p in preps] == ["p0", "p3", "p6"] and all(p[2] for p in preps)  # off the main thread
    # batch n+1 is prepared before batch n is answered: the worker stays one batch ahead
    order = [e[:2] for e in model.log]
    assert order.index(("prepare", "p3")) < order.index(("generate", "p3"))
    # prefetch off: the model makes its own inputs, as before
    plain = _Prefetching()
    assert ask(plain, [None] * 7, prompts, batch_size=3, prefetch=False) == [p + "!" for p in prompts]
    assert all(e[0] == "generate" and e[2] is None for e in plain.log)
    # a batch whose inputs cannot be made fails the call with its own error, after the answers before it
    seen = []
    with pytest.raises(ValueError, match="unreadable image"):
        ask(_Prefetching(fail_at=3), [None] * 7, prompts, batch_size=3, on_answer=lambda i, t: seen.append(i))
    assert seen == [0, 1, 2]


def test_ask_prepares_several_batches_at_once_and_answers_in_order():
    import threading

    from evaluation.answers import ask

    started = threading.Barrier(3, timeout=30)  # the first three prepares must run at the same time

    class Concurrent(_Prefetching):
        def prepare(self, images, prompts):
            if prompts[0] in ("p0", "p1", "p2"):
                started.wait()  # raises BrokenBarrierError if the workers took turns
            return super().prepare(images, prompts)

    prompts = [f"p{i}" for i in range(7)]
    model = Concurrent()
    assert ask(model, [None] * 7, prompts, batch_size=1, prefetch=3) == [p.upper() for p in prompts]
    assert [e[1] for e in model.log if e[0] == "generate"] == prompts  # answered in order
    assert sorted(e[1] for e in model.log if e[0] == "prepare") == prompts  # each batch prepared once
    # never more than three batches ahead: batch n+3 starts when batch n's inputs are taken, so
    # only after batch n-1 was answered
    order = [e[:2] for e in model.log]
    for n in range(1, 4):
        assert order.index(("generate", f"p{n - 1}")) < order.index(("prepare", f"p{n + 3}"))


def test_private_copies_are_one_per_concurrent_caller_and_reused():
    import threading

    from models.roles import private_copy

    class Thing:
        copies = 0

        def __deepcopy__(self, memo):
            Thing.copies += 1
            return Thing()

    obj, both_inside, held = Thing(), threading.Barrier(2, timeout=30), []

    def use():
        with private_copy(obj) as mine:
            held.append(mine)
            both_inside.wait()  # two callers at once: each has its own copy

    threads = [threading.Thread(target=use) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(h) for h in held}) == 2 and obj not in held and Thing.copies == 2
    for _ in range(3):  # later callers, one at a time, reuse an idle copy
        with private_copy(obj) as mine:
            assert mine in held
    assert Thing.copies == 2


def test_tiny_defender_answers_the_same_with_inputs_prepared_ahead(fixtures):
    import torch

    from models.qwen_vl import QwenVLPolicy, TinyDefenderSpec

    d, vstar, hr, pope, hb, hb_dir = fixtures
    policy = QwenVLPolicy.tiny(spec=TinyDefenderSpec(min_pixels=1024, max_pixels=4096))
    items = read_vstar(vstar)[0][:4] + read_hrbench(hr, "hrbench4k")[0][:4] + read_pope(pope)[0][:4]
    sampled = dataclasses.replace(PAPER, temperature=1.0, trials=2)
    for protocol in (STRICT, sampled):  # greedy and seeded sampling alike
        ahead = evaluate(policy, "a", items, protocol, batch_size=3)
        inline = evaluate(policy, "b", items, protocol, batch_size=3, prefetch=False)
        assert [r["responses"] for r in ahead] == [r["responses"] for r in inline]
        several = evaluate(policy, "c", items, protocol, batch_size=3, prefetch=3)  # three workers, own processors
        assert [r["responses"] for r in several] == [r["responses"] for r in inline]
    # the image processor placed explicitly on the CPU gives the very same model inputs
    images, prompts = [it.image for it in items[:3]], ["q"] * 3
    placed = QwenVLPolicy.tiny(spec=TinyDefenderSpec(min_pixels=1024, max_pixels=4096), image_device="cpu")
    a, b = policy.prepare(images, prompts)[0], placed.prepare(images, prompts)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # workers preparing at once (each with a private processor) while the main thread encodes
    # with the shared one: no "Already borrowed", and every batch the shared processor's inputs
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        made = [pool.submit(policy.prepare, images, prompts) for _ in range(8)]
        inline = [policy.encode(images, prompts)[0] for _ in range(4)]
        made = [f.result()[0] for f in made]
    assert all(m.keys() == a.keys() and all(torch.equal(m[k], a[k]) for k in a) for m in made + inline)


def test_eval_throughput_profile_times_the_vision_tower_apart(tmp_path, monkeypatch):
    """``experiments/eval_throughput.py --profile``: one more pass whose vision-tower forwards are
    timed apart — one per batch call (4 items in batches of 2: 2 calls), no more than the pass took —
    and the traced operators' time split into shares that sum to 1; the timed rows are unchanged."""
    import sys

    from experiments import eval_throughput

    argv = ["x", "--tiny", "--items", "4", "--batches", "2", "--modes", "inline", "--profile", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    eval_throughput.main()
    rows = json.loads((tmp_path / "eval_throughput.json").read_text())["results"]
    assert [r["mode"] for r in rows] == ["inline", "profile"] and rows[0]["answers_identical"]
    prof = rows[1]
    assert prof["vision_calls"] == 2 and prof["top"]
    assert 0 < prof["vision_s_per_item"] * 4 <= prof["seconds"]
    assert prof["rest_s_per_item"] == pytest.approx(prof["seconds"] / 4 - prof["vision_s_per_item"])
    assert sum(prof[f"{c}_share"] for c in ("attention", "matmul", "other")) == pytest.approx(1.0)


def test_eval_throughput_floor_counts_the_tiny_architecture_by_hand():
    """``item_flops`` on the tiny Qwen2.5-VL architecture against its weights counted by hand, and
    ``item_floors``' seconds from those FLOPs and the decoding reads at given rates."""
    from experiments import eval_throughput as et

    policy, (w, h), _ = et.benchmark_policy("cpu", tiny=True)
    model = policy.model
    # vision (hidden 64, MLP 128, 2 blocks, full attention in block 1): patch embedding 3*2*14*14*64,
    # per block 2 norms + qkv (64*192+192) + proj (64*64+64) + gate, up (64*128+128) + down (128*64+64)
    per_patch = 3 * 2 * 14 * 14 * 64 + 2 * (64 + 64 + 12480 + 4160 + 8320 + 8320 + 8256)
    merger = 64 + (256 * 256 + 256) + (256 * 64 + 64)  # norm, then 4 merged patches -> 256 -> 64
    # text (hidden 64, 2 query heads and 1 key-value head of 32, MLP 128, 2 layers, head tied)
    layer = (64 * 64 + 64) + 2 * (64 * 32 + 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64
    weights = 2 * layer + 64
    P, T = 100, 60
    got = et.item_flops(model, P, T)
    assert got["vision"] == 2 * per_patch * P + 2 * merger * P // 4 + 1 * 4 * P**2 * 64
    assert got["prefill"] == 2 * weights * T + 2 * 2 * T**2 * 64 + 2 * 512 * 64

    item = et.Item("i0", "hrbench4k", et.random_images(1, w, h)[0], et.QUESTION, "A", ["a", "b", "c", "d"], ["s"])
    f, f8 = et.item_floors(policy, item, new_tokens=16, batches=[4, 8], tflops=1e-6, gbs=1.0)
    flops = et.item_flops(model, f["patches"], f["prompt_tokens"])
    assert f["patches"] % 4 == 0 and f["prompt_tokens"] > f["patches"] // 4  # image tokens and the text
    assert f["compute_s"] == pytest.approx((flops["vision"] + flops["prefill"]) / 1e6)
    assert f["decode_s"] == pytest.approx(15 * (2 * layer + 512 * 64) * 4 / 1e9 / 4)  # fp32 weights
    assert f["ceiling_items_per_s"] == pytest.approx(1 / (f["compute_s"] + f["decode_s"]))
    assert f8["compute_s"] == f["compute_s"] and f8["decode_s"] == pytest.approx(
        f["decode_s"] / 2
    )  # shared by the batch
