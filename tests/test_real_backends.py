"""The data-stage roles on real model classes (tiny random weights, no download): fill
pipeline, MLLM judge, Grounding DINO, SAM, open_clip, and the whole DAG on the tiny preset."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from models.mllm_judge import MLLMJudge, parse_proposals, parse_yes_no
from world import generate_world, render


@pytest.fixture(scope="module")
def scene_image():
    return render(generate_world(3))  # 128 x 128


@pytest.fixture(scope="module")
def filler():
    from models.diffusion_fill import DiffusersFiller

    return DiffusersFiller.tiny()


def test_outpaint_keeps_the_source_bit_identical_and_fills_the_border(filler, scene_image):
    out = filler.outpaint(scene_image, (190, 170), (31, 21), None).image
    a = np.asarray(out)
    assert out.size == (190, 170)
    assert np.array_equal(a[21:149, 31:159], np.asarray(scene_image))
    # The border is the model's, not the edge-replicated starting canvas.
    start = np.pad(np.asarray(scene_image), ((21, 21), (31, 31), (0, 0)), mode="edge")
    border = np.ones((170, 190), dtype=bool)
    border[21:149, 31:159] = False
    assert (a[border] != start[border]).any(axis=-1).mean() > 0.5


def test_fill_touches_only_the_box(filler, scene_image):
    out = filler.fill(scene_image, [10.5, 20, 50, 45], "red circle", None).image
    diff = np.any(np.asarray(out) != np.asarray(scene_image), axis=-1)
    ys, xs = np.nonzero(diff)
    assert diff.sum() > 0.5 * 40 * 25
    assert xs.min() >= 10 and xs.max() < 50 and ys.min() >= 20 and ys.max() < 45


# ----------------------------------------------------------------- judge
@pytest.mark.parametrize(
    "text,expected",
    [
        ("\\boxed{Yes}", True),
        ("\\boxed{no}", False),
        ("I think yes.", True),
        ("No, it does not.", False),
        ("yes and no", None),
        ("\\boxed{Yes} ... \\boxed{No}", None),
        ("banana", None),
        ("", None),
    ],
)
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) is expected


def test_parse_proposals_good_partial_and_garbage():
    good = 'Sure: [{"box": [1, 2, 30, 40], "description": "a blue cup"}, {"box": [5, 5, 9, 9], "description": "lamp"}]'
    props, bad = parse_proposals(good, 100, 100)
    assert [(p.box, p.description) for p in props] == [
        ([1.0, 2.0, 30.0, 40.0], "a blue cup"),
        ([5.0, 5.0, 9.0, 9.0], "lamp"),
    ]
    assert bad == 0
    partial = (
        '[{"box": [1, 2, 30, 40], "description": "a blue cup"}, {"box": [5, 5], "description": "x"}, {"box": [1, 2'
    )
    props, bad = parse_proposals(partial, 100, 100)
    assert [p.description for p in props] == ["a blue cup"] and bad == 1
    assert parse_proposals("no json here", 100, 100) == ([], 0)
    assert parse_proposals('[1, "two", {"box": "nope"}]', 100, 100)[0] == []


class ScriptedMLLM:
    def __init__(self, answers):
        self.answers = list(answers)
        self.prompts = []

    def generate(self, images, prompts, *, temperature=0.0, max_new_tokens=16):
        self.prompts += prompts
        return [self.answers.pop(0) for _ in prompts]


def test_mllm_judge_checks_and_unparsed_policy(scene_image):
    ext = Image.new("RGB", (160, 160), (9, 9, 9))
    ext.paste(scene_image, (16, 16))
    judge = MLLMJudge(ScriptedMLLM(["\\boxed{Yes}", "\\boxed{No}", "\\boxed{Yes}", "gibberish"]))
    assert judge.check_composition(scene_image, ext, (16, 16), None).passed
    dup = judge.check_duplication(ext, ["red circle", "blue square"], [16, 16, 144, 144], None)
    assert not dup.passed and "blue square" in dup.reason  # second target: "Yes, there is another one"
    real = judge.check_realism(ext, None)
    assert not real.passed and "unparseable" in real.reason
    lenient = MLLMJudge(ScriptedMLLM(["gibberish"]), unparsed="pass")
    assert lenient.check_realism(ext, None).passed
    # The pixel part of composition fails without asking the model.
    changed = ext.copy()
    changed.paste((0, 0, 0), (40, 40, 120, 120))
    silent = ScriptedMLLM([])
    assert not MLLMJudge(silent).check_composition(scene_image, changed, (16, 16), None).passed and not silent.prompts


def test_mllm_judge_proposals_and_fallback(scene_image):
    js = '[{"box": [10, 10, 30, 30], "description": "a green book"}]'
    judge = MLLMJudge(ScriptedMLLM([js]))
    props = judge.propose_distractors(scene_image, "Where is the cup?", ["cup"], [[50, 50, 60, 60]], 3, 0, None)
    assert [p.description for p in props] == ["a green book"]
    assert "cup" in judge.mllm.prompts[0] and "[[50, 50, 60, 60]]" in judge.mllm.prompts[0]
    fallback = MLLMJudge(ScriptedMLLM(["###"]), fallback_random=True)
    props = fallback.propose_distractors(scene_image, "q?", ["cup"], [], 3, 7, None)
    assert len(props) == 3 and all(0 <= p.box[0] < p.box[2] <= 128 for p in props)


def test_tiny_mllm_judge_runs_on_the_real_model(scene_image):
    from stages.registry import load

    judge = load("judge", {"backend": "tiny", "unparsed": "pass", "fallback_random": True})
    assert judge.check_realism(scene_image, None).passed
    assert len(judge.propose_distractors(scene_image, "q?", ["red circle"], [], 2, 0, None)) == 2


# ------------------------------------------------------ detector, segmenter
def test_detector_boxes_are_in_image_coordinates():
    from models.grounding import GroundingDinoDetector

    img = Image.new("RGB", (190, 150), (200, 200, 200))
    dets = GroundingDinoDetector.tiny(box_threshold=0.0, text_threshold=0.0).detect(img, "a red circle", None)
    assert len(dets) == 10  # num_queries of the tiny config, nothing thresholded away
    for d in dets:
        x0, y0, x1, y1 = d.box
        assert 0 <= x0 <= x1 <= 190 and 0 <= y0 <= y1 <= 150 and 0 <= d.score <= 1


def test_segmenter_mask_is_full_resolution_boolean():
    from models.grounding import SamSegmenter

    img = Image.new("RGB", (190, 150), (120, 30, 30))
    mask = SamSegmenter.tiny().segment(img, [10, 20, 60, 70], None)
    assert mask.shape == (150, 190) and mask.dtype == bool


def test_clip_scores_are_deterministic_under_a_seed(scene_image):
    from models.clip import OpenClipScorer

    a = OpenClipScorer(seed=0).score([scene_image, scene_image], ["a red circle", "a blue square"])
    b = OpenClipScorer(seed=0).score([scene_image, scene_image], ["a red circle", "a blue square"])
    c = OpenClipScorer(seed=1).score([scene_image, scene_image], ["a red circle", "a blue square"])
    assert a == b and a != c and all(-1 <= v <= 1 for v in a)


# --------------------------------------------------------- the tiny preset
def test_aot_run_on_the_tiny_preset(tmp_path, capsys):
    import json

    import datasets

    from aot.cli import main
    from storage import ShardStore

    rc = main(
        [
            "run",
            "--preset",
            "tiny",
            "--root",
            str(tmp_path),
            "--no-prefect",
            "--no-progress",
            "--set",
            "source.num_scenes=4",
            "--set",
            "source.shard_size=2",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    version = out.split("AOT-SFT version: ")[1].split()[0]
    store = ShardStore(str(tmp_path))
    export = store.manifest(version)
    lines = {
        ln.split()[0]: ln.split()
        for ln in out.splitlines()
        if ln.split() and ln.split()[0] in ("source", "extend", "filter", "implant", "export")
    }
    assert [int(lines[s][2]) for s in ("source", "extend", "filter")] == [4, 4, 4]  # rows in
    assert export.rows == int(lines["export"][3])
    if export.rows:
        ds = datasets.load_dataset(
            "parquet", data_files=store.data_files(export), split="train", cache_dir=str(tmp_path / "hf")
        )
        assert ds[0]["adversarial_image"].size == ds[0]["clean_image"].size
    implant = store.read(store.manifest(export.parents[0]))
    attempts = [a for js in implant["attempts"].to_list() for a in json.loads(js)]
    # Every check of Stage 2 ran on real models: some proposals reached the defender.
    assert any("answers" in a for a in attempts)


# ------------------------------------------------------------------ batching
def test_filler_batches_same_size_images_into_one_pipeline_call(filler, scene_image):
    small = scene_image.resize((64, 64))
    boxes = [[2, 2, 20, 20], [30, 30, 60, 60], [10, 40, 30, 60]]
    before = filler.pipeline_calls
    outs = filler.fill_many(scene_image, boxes, ["a", "b", "c"], None)
    assert filler.pipeline_calls - before == 1  # batch_size 4: one call for three fills of one image
    for box, painted in zip(boxes, outs):
        diff = np.any(np.asarray(painted.image) != np.asarray(scene_image), axis=-1)
        ys, xs = np.nonzero(diff)
        assert xs.min() >= box[0] and xs.max() < box[2] and ys.min() >= box[1] and ys.max() < box[3]
    before = filler.pipeline_calls
    outs = filler.outpaint_many(
        [scene_image, small, scene_image],
        [(160, 160), (96, 96), (160, 160)],
        [(16, 16), (16, 16), (16, 16)],
        [None] * 3,
    )
    assert filler.pipeline_calls - before == 2  # two canvas sizes
    assert [o.image.size for o in outs] == [(160, 160), (96, 96), (160, 160)]
    assert np.array_equal(np.asarray(outs[1].image)[16:80, 16:80], np.asarray(small))


def test_judge_batches_prompts_across_a_shard(scene_image):
    from models.roles import SceneChecks

    ext = Image.new("RGB", (160, 160), (9, 9, 9))
    ext.paste(scene_image, (16, 16))
    items = [
        SceneChecks(scene_image, ext, (16, 16), names, [16, 16, 144, 144])
        for names in (["red circle"], ["red circle", "blue square"], [])
    ]
    # Prompts per item: composition + duplication per name + realism = 3, 4, 2 -> 9 prompts.
    answers = [
        "\\boxed{Yes}",
        "\\boxed{No}",
        "\\boxed{No}",
        "\\boxed{Yes}",
        "\\boxed{No}",
        "\\boxed{Yes}",
        "\\boxed{No}",
        "\\boxed{No}",
        "\\boxed{Yes}",
    ]
    mllm = ScriptedMLLM(answers)
    calls = []
    inner = mllm.generate
    mllm.generate = lambda images, prompts, **kw: calls.append(len(prompts)) or inner(images, prompts, **kw)
    verdicts = MLLMJudge(mllm, batch_size=4).check_scenes(items)
    assert calls == [4, 4, 1]
    assert [(c.passed, d.passed, r.passed) for c, d, r in verdicts] == [
        (True, True, True),
        (True, False, True),
        (False, True, False),
    ]
    assert "blue square" in verdicts[1][1].reason


def test_stage2_fill_batch_keeps_the_same_edit(tmp_path):
    from config import load_config
    from stages.runner import run_bootstrap
    from storage import ShardStore

    base = {"source": {"num_scenes": 8, "shard_size": 8}}
    one = run_bootstrap(ShardStore(str(tmp_path / "a")), load_config("synthetic", base), until="implant")
    store = ShardStore(str(tmp_path / "b"))
    three = run_bootstrap(store, load_config("synthetic", {**base, "implant": {"fill_batch": 3}}), until="implant")
    a = ShardStore(str(tmp_path / "a")).read(one[-1].version)
    b = store.read(three[-1].version)
    assert a.height >= 1  # something was implanted and compared
    assert a["id"].to_list() == b["id"].to_list() and a["distractor_boxes"].to_list() == b["distractor_boxes"].to_list()
    assert a["image"].to_list() == b["image"].to_list()  # the same edit, byte for byte


def test_shards_on_worker_threads_give_the_serial_runs_bytes(tmp_path):
    """Shard tasks share each loaded model across threads (Prefect's thread pool; the registry
    loads a model once per process). With the tiny real backends (a FluxFill pipeline whose
    scheduler keeps state, Qwen2.5-VL judge and defender, Grounding DINO, SAM, open_clip), 4 shards
    per stage on 3 threads give exactly the serial run's parts."""
    from concurrent.futures import ThreadPoolExecutor

    from config import load_config
    from stages.runner import commit, plan, run_bootstrap, run_shard
    from storage import ShardStore

    cfg = load_config("tiny", {"source": {"num_scenes": 8, "shard_size": 2}, "implant": {"num_proposals": 2}})
    serial = {s.stage: s.version for s in run_bootstrap(ShardStore(str(tmp_path / "serial")), cfg, until="implant")}
    store = ShardStore(str(tmp_path / "threads"))
    version = None
    for stage in ("source", "extend", "filter", "implant"):
        p = plan(store, stage, cfg, version)
        assert len(p.shards) == 4
        with ThreadPoolExecutor(3) as pool:
            records = list(pool.map(lambda s: run_shard(store, p, s, cfg)[0], p.shards))
        m = commit(store, p, records)
        a = ShardStore(str(tmp_path / "serial")).manifest(serial[stage])
        assert m.version == a.version and [x.sha256 for x in m.parts] == [x.sha256 for x in a.parts], stage
        version = m.version
