"""The stages on hand-built scenes, and the whole pure pipeline (no Prefect) at a small size."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from config import load_config
from conftest import REPO
from models.mcq import format_prompt
from models.perception_baseline import PerceptionBaselineDefender, find_blobs
from models.roles import Proposal
from models.synthetic import SceneDetector, SceneInpainter, SceneJudge, SceneOutpainter, SceneSegmenter
from stages.base import ShardContext
from stages.implant import ask, implant_row
from stages.registry import load
from stages.runner import BOOTSTRAP, plan, run_bootstrap, run_stage
from storage import ShardStore, decode_image, image_cell
from world import Background, Scene, SceneObject, answer_from_scene, render

BG = Background("plain", (232, 228, 220), 8, 8)


def scene(objs, size=(128, 128), origin=(0.0, 0.0)) -> Scene:
    return Scene(
        1,
        128,
        BG,
        [SceneObject(i, c, k, list(map(float, b))) for i, (c, k, b) in enumerate(objs)],
        list(origin),
        list(size),
    )


QUESTION = "Where is the red circle relative to the blue square?"
OPTIONS = ["left", "right", "above", "below"]


def base_scene() -> Scene:
    # red circle left of the blue square; a green triangle elsewhere; a red circle outside the window.
    return scene(
        [
            ("circle", "red", [20, 60, 36, 76]),
            ("square", "blue", [80, 60, 96, 76]),
            ("triangle", "green", [50, 100, 66, 116]),
            ("circle", "red", [150, 20, 166, 36]),
        ]
    )


# ------------------------------------------------------------ oracle judge
def test_duplication_check_finds_a_new_target_in_the_border():
    s = base_scene()
    ext = s.copy()
    ext.origin, ext.size = [-32.0, -32.0], [192, 192]
    img = render(ext)
    original_box = [32.0, 32.0, 160.0, 160.0]
    res = SceneJudge().check_duplication(img, ["red circle", "blue square"], original_box, ext.to_dict())
    assert not res.passed and "red circle" in res.reason  # the outside red circle is now visible
    res = SceneJudge().check_duplication(img, ["blue square"], original_box, ext.to_dict())
    assert res.passed


def test_realism_and_composition_checks():
    s = base_scene()
    painted = SceneOutpainter(seam_rate=1.0).outpaint(render(s), (160, 160), (16, 16), s.to_dict())
    assert painted.context["artefacts"] == ["seam"]
    assert not SceneJudge().check_realism(painted.image, painted.context).passed
    clean = SceneOutpainter(seam_rate=0.0).outpaint(render(s), (160, 160), (16, 16), s.to_dict())
    assert SceneJudge().check_realism(clean.image, clean.context).passed
    # The pasted region is bit-identical, so composition passes with SSIM 1; a changed pixel block fails it.
    judge = SceneJudge()
    ok = judge.check_composition(render(s), clean.image, (16, 16), clean.context)
    assert ok.passed and ok.score == 1.0
    broken = np.asarray(clean.image).copy()
    broken[40:100, 40:100] = 0
    from PIL import Image

    bad = judge.check_composition(render(s), Image.fromarray(broken), (16, 16), clean.context)
    assert not bad.passed and bad.score < 0.98


def test_outpainter_keeps_the_source_bit_identical():
    s = base_scene()
    src = render(s)
    out = SceneOutpainter(seam_rate=0.0).outpaint(src, (200, 180), (36, 26), s.to_dict()).image
    assert np.array_equal(np.asarray(out)[26:154, 36:164], np.asarray(src))
    assert out.size == (200, 180)


# ------------------------------------------------------- baseline defender
def test_baseline_blobs_and_answers():
    s = base_scene()
    img = render(s)
    blobs = find_blobs(img)
    assert [(b.colour, b.shape) for b in blobs] == [("red", "circle"), ("blue", "square"), ("green", "triangle")]
    prompt = format_prompt(QUESTION, OPTIONS)
    assert PerceptionBaselineDefender().generate([img], [prompt]) == ["\\boxed{A}"]  # left


def test_a_same_colour_distractor_above_fools_the_baseline():
    s = base_scene()
    img = render(s)
    painted = SceneInpainter().fill(img, [84, 10, 100, 26], "red triangle", s.to_dict())
    prompt = format_prompt(QUESTION, OPTIONS)
    # The first red blob is now the triangle, right of and above the square: it answers "above".
    assert PerceptionBaselineDefender().generate([painted.image], [prompt]) == ["\\boxed{C}"]
    # The ground truth did not move: the scene still says "left".
    assert answer_from_scene("relative_position", QUESTION, Scene.from_dict(painted.context), OPTIONS) == "A"


# ---------------------------------------------------------- implant stage
class ScriptedJudge(SceneJudge):
    def __init__(self, proposals):
        super().__init__()
        self.proposals = proposals

    def propose_distractors(self, *args, **kwargs):
        return self.proposals


def _row(s: Scene) -> dict:
    return {
        "id": "r0",
        "image": image_cell(render(s)),
        "question": QUESTION,
        "options": OPTIONS,
        "answer": "A",
        "target_names": ["red circle", "blue square"],
        "target_boxes": [s.image_box(s.objects[0]), s.image_box(s.objects[1])],
        "scene": json.dumps(s.to_dict()),
    }


def _models(proposals):
    return {
        "judge": ScriptedJudge(proposals),
        "inpainter": SceneInpainter(),
        "detector": SceneDetector(),
        "segmenter": SceneSegmenter(),
        "defender": PerceptionBaselineDefender(),
    }


def test_implant_row_records_each_proposal_outcome():
    cfg = load_config("synthetic")
    ctx = ShardContext("implant", cfg, 0)
    proposals = [
        Proposal([22, 40, 38, 58], "yellow square"),  # 2 px above the red circle, inside the 4 px margin
        Proposal([100, 100, 116, 116], "red circle"),  # names a target: prompt check
        Proposal([84, 10, 124, 26], "red triangle"),  # elongated: the drawn shape fills < half: detector
        Proposal([50, 20, 66, 36], "green square"),  # valid, but not red: the baseline is not fooled
        Proposal([84, 10, 100, 26], "red triangle"),  # effective
        Proposal([100, 100, 116, 116], "red square"),  # passes the cheap checks, never painted: not_tried
    ]
    out, why = implant_row(_row(base_scene()), ctx, _models(proposals))
    assert why is None
    attempts = json.loads(out["attempts"])
    assert [a["outcome"] for a in attempts] == [
        "box_check",
        "prompt_check",
        "detector",
        "not_effective",
        "effective",
        "not_tried",
    ]
    assert out["distractor_boxes"] == [[84.0, 10.0, 100.0, 26.0]]
    assert out["distractor_descriptions"] == ["red triangle"]
    assert out["target_ssim_min"] == 1.0
    assert out["clean_correct"] is True and out["defender_answers"] == ["C"]
    assert out["distractor_mask_areas"][0] > 60
    # Only pixels inside the distractor box changed.
    diff = np.any(np.asarray(decode_image(out["image"])) != np.asarray(decode_image(out["adversarial_image"])), axis=-1)
    ys, xs = np.nonzero(diff)
    assert xs.min() >= 84 and xs.max() < 100 and ys.min() >= 10 and ys.max() < 26


def test_implant_row_reject_reasons():
    cfg = load_config("synthetic")
    ctx = ShardContext("implant", cfg, 0)
    out, why = implant_row(_row(base_scene()), ctx, _models([Proposal([50, 20, 66, 36], "green square")]))
    assert out is None and why[0] == "not_effective"
    out, why = implant_row(_row(base_scene()), ctx, _models([Proposal([-5, 0, 10, 15], "green square")]))
    assert out is None and why[0] == "no_valid_edit" and "box_check" in why[1]
    # A scene where the baseline is already wrong on the clean image (a red square above both).
    s = base_scene()
    s.objects.append(SceneObject(9, "square", "red", [100.0, 5.0, 116.0, 21.0]))
    out, why = implant_row(_row(s), ctx, _models([Proposal([84, 10, 100, 26], "red triangle")]))
    assert out is None and why[0] == "defender_wrong_on_clean"


# ---------------------------------------------------- the whole pipeline
def test_pure_pipeline_counts_lineage_and_ground_truth(tmp_path, small_config):
    store = ShardStore(str(tmp_path / "a"))
    summaries = run_bootstrap(store, small_config)
    assert [s.stage for s in summaries] == list(BOOTSTRAP)
    for s in summaries:
        assert s.rows_in == s.rows + s.rejected, s  # nothing silently dropped
        assert sum(s.reasons.values()) == s.rejected
    assert summaries[0].rows_in == 24 and summaries[0].shards == 3
    # tracking.report_to's default (tensorboard): each stage's counts and reject reasons, read back
    # from the version's own event files with TensorBoard's reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for s in summaries:
        m = store.manifest(s.version)
        folder = tmp_path / "events" / s.stage
        store.fetch_files(m, str(folder))
        acc = EventAccumulator(str(folder / "tensorboard"))
        acc.Reload()
        got = {tag: acc.Scalars(tag)[0].value for tag in acc.Tags()["scalars"]}
        want = {"rows_in": s.rows_in, "rows": s.rows, "rejects": s.rejected}
        want |= {f"reject/{k}": v for k, v in s.reasons.items()}
        assert got == want, s.stage
    assert any(s.reasons for s in summaries)  # some stage rejected something, and said why
    for prev, cur in zip(summaries, summaries[1:]):
        assert cur.rows_in == prev.rows
        assert store.manifest(cur.version).parents == [prev.version]
    export = store.read(summaries[-1].version)
    assert export.height == summaries[-1].rows > 0
    defender = load("defender", small_config.model_spec("defender"))  # Stage 2's own base defender
    for r in export.iter_rows(named=True):
        clean, adv = decode_image(r["clean_image"]), decode_image(r["adversarial_image"])
        assert clean.size == adv.size == (r["width"], r["height"])
        assert 1.5 <= r["canvas_scale"] <= 2.0
        adv_scene = Scene.from_dict(json.loads(r["adversarial_scene"]))
        # The edit kept the ground truth (exact), and fooled the defender while it was right on clean.
        assert answer_from_scene(r["question_type"], r["question"], adv_scene, r["options"]) == r["answer"]
        n = len(r["options"])
        assert ask(defender, clean, r["prompt"], 1, n) == [r["answer"]]
        assert ask(defender, adv, r["prompt"], 1, n) != [r["answer"]]
        # Target boxes still hold the targets: every target box lies inside the image.
        for b in r["target_boxes"]:
            assert 0 <= b[0] < b[2] <= r["width"] and 0 <= b[1] < b[3] <= r["height"]
    # Rejects keep the row: ids of kept + rejected rows cover the input exactly once.
    f = store.manifest(summaries[2].version)
    kept_ids = set(store.read(f)["id"].to_list())
    rej_ids = set(store.read(f, "rejects")["id"].to_list())
    src_ids = set(store.read(summaries[1].version)["id"].to_list())
    assert kept_ids | rej_ids == src_ids and not kept_ids & rej_ids


def test_pipeline_is_deterministic_and_cached(tmp_path, small_config):
    a = run_bootstrap(ShardStore(str(tmp_path / "a")), small_config)
    store_b = ShardStore(str(tmp_path / "b"))
    b = run_bootstrap(store_b, small_config)
    assert [s.version for s in a] == [s.version for s in b]
    ma = ShardStore(str(tmp_path / "a")).manifest(a[-1].version)
    mb = store_b.manifest(b[-1].version)
    assert [p.sha256 for p in ma.parts] == [p.sha256 for p in mb.parts]  # byte-identical parts
    again = run_bootstrap(store_b, small_config)
    assert [s.version for s in again] == [s.version for s in b]
    assert all(s.reused_version and s.recomputed == 0 for s in again)


def test_config_change_gives_a_new_version_only_downstream(tmp_path, small_config):
    store = ShardStore(str(tmp_path))
    first = {s.stage: s.version for s in run_bootstrap(store, small_config)}
    cfg2 = load_config("synthetic", {"source": {"num_scenes": 24, "shard_size": 8}, "implant": {"num_proposals": 3}})
    second = {s.stage: s.version for s in run_bootstrap(store, cfg2)}
    assert [first[k] == second[k] for k in BOOTSTRAP] == [True, True, True, False, False]


def test_stage_refuses_an_input_of_the_wrong_stage(tmp_path, small_config):
    from stages.base import StageError

    store = ShardStore(str(tmp_path))
    src = run_stage(store, "source", small_config)
    with pytest.raises(StageError, match="takes a filter version"):
        plan(store, "implant", small_config, src.version)
    with pytest.raises(StageError, match="needs --input"):
        plan(store, "extend", small_config, None)


def test_synthetic_preset_on_rows_without_scenes_fails_with_the_fix(tmp_path, small_config):
    from models.synthetic import MissingSceneError

    store = ShardStore(str(tmp_path))
    src = run_stage(store, "source", small_config)
    m = store.manifest(src.version)
    df = store.read(m).with_columns(pl.lit(None, pl.String).alias("scene"))
    rec = store.write_shard(
        "photos",
        "source",
        "v-noscene",
        0,
        "k",
        df.height,
        df,
        pl.DataFrame(schema={"id": pl.String, "reason": pl.String}),
    )
    store.commit("photos", "source", "v-noscene", [rec], config={}, parents=[], code_version="x")
    with pytest.raises(MissingSceneError, match="--preset tiny"):
        run_stage(store, "extend", small_config, "v-noscene")


# The fewest rows Stage 2 keeps on the embedded default that a machine of this kind may give: over
# source seeds 0-5 the measured spread is 10-21 rows with the shipped warm-up, 20 for seed 0
# (docs/reproducibility.md); 8 stays below every measurement.
DEFAULT_MIN_KEPT = 8


def _readme_quickstart() -> dict:
    """The per-stage rows of the table README.md prints under its quickstart."""
    block = (REPO / "README.md").read_text().split("reject reasons\n", 1)[1].split("\n\n", 1)[0]
    out = {}
    for line in block.splitlines():
        stage, _, rows_in, kept, rejected, *_ = line.split()
        reasons = line.split(maxsplit=8)[8].strip() if len(line.split()) > 8 else "-"
        out[stage] = (int(rows_in), int(kept), int(rejected), reasons)
    return out


def test_default_preset_reproduces_the_readme_table(tmp_path):
    """The embedded default (64 scenes), as README.md prints it: the exact stages (the world, the
    oracles, the filter's decisions) give exactly its counts and reasons on every machine; Stage 2's
    kept rows depend on the CPU's kernels, so they are held to the measured floor."""
    readme = _readme_quickstart()
    summaries = {s.stage: s for s in run_bootstrap(ShardStore(str(tmp_path)), load_config("synthetic"))}
    for stage in ("source", "extend", "filter"):
        s = summaries[stage]
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(s.reasons.items(), key=lambda kv: -kv[1])) or "-"
        assert (s.rows_in, s.rows, s.rejected, reasons) == readme[stage], stage
    implant, export = summaries["implant"], summaries["export"]
    assert implant.rows_in == readme["implant"][0] and implant.rows + implant.rejected == implant.rows_in
    assert set(implant.reasons) <= {"defender_wrong_on_clean", "not_effective", "no_valid_edit"}
    assert export.rows == implant.rows >= DEFAULT_MIN_KEPT, [s.to_dict() for s in summaries.values()]


def test_category_only_targets_get_valid_distractor_proposals():
    """Colour and count questions name their target by category alone: every proposal must be
    another category (any instance of the target's would change the answer), so the prompt check
    passes. Asked for the target's colour, a proposal never takes a colour a target instance has
    (that one is harmless: the reader who takes it for the target still answers right); asked to
    count, about half borrow a target instance's colour (confusable)."""
    import numpy as np

    from models.synthetic import SceneJudge
    from stages.checks import prompt_check
    from world import WorldConfig, generate_world, make_question, render

    judge = SceneJudge()
    for qtype, lo, hi in (("colour", 0.0, 0.0), ("count", 0.35, 0.7)):
        descriptions, borrowed = [], 0
        for seed in range(40):
            scene = generate_world(seed, WorldConfig(resolution=64))
            try:
                q = make_question(scene, qtype, np.random.default_rng(seed))
            except Exception:
                continue
            own = {o.colour for o in scene.visible(1e-9) if o.category == q.target_names[0]}
            props = judge.propose_distractors(render(scene), q.text, q.target_names, [], 8, seed, scene.to_dict())
            for p in props:
                assert prompt_check(p.description, q.target_names)[0], p.description
                assert q.target_names[0] not in p.description
                borrowed += p.description.split()[0] in own
                descriptions.append(p.description)
        assert len(descriptions) >= 200, qtype
        assert lo <= borrowed / len(descriptions) <= hi, (qtype, borrowed / len(descriptions))


def test_warmup_pool_keeps_its_own_fewest_objects_and_only_that():
    """coevolution.warmup_objects_min: defender 0's pool has >= that many objects in every scene; the
    run's own items and the held-out world keep source.objects_min (1 here)."""
    from stages.source import heldout_config, warmup_config, world_rows

    base = ["source.objects_min=1", "source.objects_max=3", "coevolution.warmup_scenes=40"]
    preset = str(REPO / "experiments/evidence.yaml")
    cfg = load_config(preset, [*base, "coevolution.warmup_objects_min=2"])

    def object_counts(c) -> list[int]:
        rows = world_rows(40, c.source.seed, c)
        return [len(Scene.from_dict(json.loads(r["scene"])).visible()) for r in rows]

    pool = warmup_config(cfg)
    assert pool.source.objects_min == 2 and pool.source.num_scenes == 40
    assert min(object_counts(pool)) == 2 and max(object_counts(pool)) == 3
    assert cfg.source.objects_min == 1 and min(object_counts(heldout_config(cfg, 40))) == 1
    # 0 (the field's default; the preset sets 2) is the run's own world, under the pool's seed
    same = warmup_config(load_config(preset, [*base, "coevolution.warmup_objects_min=0"]))
    assert same.source.objects_min == 1 and same.source.seed == pool.source.seed
    with pytest.raises(ValueError, match=r"coevolution.warmup_objects_min.*within 1..source.objects_max \(3\)"):
        load_config(preset, [*base, "coevolution.warmup_objects_min=4"])
