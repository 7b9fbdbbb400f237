"""Issue 8: pluggable attacks, and the evidence experiment at toy size (every arm and every
evaluation produces its numbers; the effect size is the GPU run's business)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from config import load_config
from evaluation.attacks import ATTACKS, Attacked, build_attack, register_attack
from stages.attack import attack_version
from stages.runner import run_bootstrap
from storage import ShardStore, decode_image
from world import Scene, relation


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    """Relation questions on synthetic scenes (the filter version's rows)."""
    store = ShardStore(str(tmp_path_factory.mktemp("attacks")))
    cfg = load_config(
        "synthetic",
        {
            "source": {
                "num_scenes": 24,
                "shard_size": 24,
                "question_types": ["relative_position"],
                "question_weights": [1.0],
            }
        },
    )
    filt = run_bootstrap(store, cfg, until="filter")[-1].version
    return store, cfg, filt


def test_swap_pair_places_mirrored_decoys_and_keeps_the_answer(items):
    store, cfg, filt = items
    attack = build_attack("swap-pair", cfg)
    rows = store.read(store.manifest(filt)).to_dicts()
    done = 0
    for row in rows:
        out = attack(row)
        if isinstance(out, str):
            continue
        done += 1
        assert out.meta["target_ssim_min"] == pytest.approx(1.0)  # no target pixel touched
        scene = Scene.from_dict(out.scene)
        a_name, b_name = row["target_names"]
        (ca, ka), (cb, kb) = (n.split() for n in (a_name, b_name))
        new = scene.objects[-len(out.meta["distractors"]) :]
        assert all(o.name not in (a_name, b_name) for o in new)  # decoys are never a target
        for o in new:
            # A's colour is placed beyond B (and B's beyond A): read by colour alone, the relation flips
            own, about = (
                (row["target_boxes"][0], row["target_boxes"][1])
                if o.colour == ca
                else (row["target_boxes"][1], row["target_boxes"][0])
            )
            rel_true, rel_decoy = relation(own, about), relation(scene.image_box(o), about)
            if rel_true and rel_decoy:
                assert rel_decoy != rel_true
        # the edited image differs from the clean one exactly where decoys were drawn
        clean = decode_image(row["image"])
        assert clean.size == out.image.size and clean.tobytes() != out.image.tobytes()
    assert done >= len(rows) // 3, f"swap-pair attacked only {done} of {len(rows)} relation questions"


def test_option_decoys_paint_wrong_options_beside_the_target(tmp_path):
    """Colour questions: each decoy is another shape in a wrong option's colour, next to the
    target (gap of 2 px), the target's pixels untouched and the answer unchanged."""
    from metrics import intersection

    store = ShardStore(str(tmp_path))
    cfg = load_config(
        "synthetic",
        {
            "source": {
                "num_scenes": 24,
                "shard_size": 24,
                "question_types": ["colour"],
                "question_weights": [1.0],
                "shuffle_options": False,
            }
        },
    )
    rows = store.read(store.manifest(run_bootstrap(store, cfg, until="filter")[-1].version)).to_dicts()
    attack, done = build_attack("option-decoys", cfg), 0
    assert build_attack("option-decoys", cfg)({**rows[0], "question_type": "relative_position"}).startswith(
        "option-decoys attacks colour questions"
    )
    for row in rows:
        out = attack(row)
        if isinstance(out, str):
            continue
        done += 1
        assert out.meta["target_ssim_min"] == pytest.approx(1.0)
        truth = row["options"][ord(row["answer"]) - ord("A")]
        target = row["target_boxes"][0]
        scene = Scene.from_dict(out.scene)
        for o in scene.objects[-len(out.meta["distractors"]) :]:
            assert o.colour in row["options"] and o.colour != truth and o.category != row["target_names"][0]
            box = scene.image_box(o)
            assert intersection(box, target) == 0
            near = [box[0] - target[2], target[0] - box[2], box[1] - target[3], target[1] - box[3]]
            assert max(near) <= 3  # beside the target: within the 2 px gap (drawn square may shrink by 1)
        assert attack(row).image.tobytes() == out.image.tobytes()  # deterministic per row
    assert done >= len(rows) // 2, f"option-decoys attacked only {done} of {len(rows)} colour questions"


def test_backdrop_tint_changes_only_background_pixels_near_the_target(tmp_path):
    """Colour questions: the background around the target moves towards a wrong option's colour;
    no object's pixels change (every object box is kept exactly), so the answer stands; pixels far
    from the target are untouched."""
    from world import COLOURS

    store = ShardStore(str(tmp_path))
    cfg = load_config(
        "synthetic",
        {"source": {"num_scenes": 16, "shard_size": 16, "question_types": ["colour"], "question_weights": [1.0]}},
    )
    rows = store.read(store.manifest(run_bootstrap(store, cfg, until="filter")[-1].version)).to_dicts()
    attack, done = build_attack("backdrop-tint", cfg), 0
    assert attack({**rows[0], "question_type": "relative_position"}).startswith("backdrop-tint attacks colour")
    for row in rows:
        out = attack(row)
        if isinstance(out, str):
            continue
        done += 1
        truth = row["options"][ord(row["answer"]) - ord("A")]
        assert out.meta["tint"] in row["options"] and out.meta["tint"] != truth
        assert out.meta["target_ssim_min"] == pytest.approx(1.0)
        clean = np.asarray(decode_image(row["image"]).convert("RGB"), dtype=np.int16)
        edited = np.asarray(out.image, dtype=np.int16)
        changed = np.abs(edited - clean).sum(-1) > 0
        scene = Scene.from_dict(json.loads(row["scene"]))
        for o in scene.visible(1e-9):  # every object's box, pixel for pixel
            x0, y0, x1, y1 = (int(round(v)) for v in scene.image_box(o))
            assert not changed[y0:y1, x0:x1].any()
        x0, y0, x1, y1 = row["target_boxes"][0]
        r = 0.75 * max(x1 - x0, y1 - y0)
        ys, xs = np.nonzero(changed)
        assert len(xs) > 0 and xs.min() >= x0 - r - 1 and xs.max() <= x1 + r and ys.min() >= y0 - r - 1
        towards = np.abs(edited[changed] - np.asarray(COLOURS[out.meta["tint"]])).sum(-1)
        assert (towards < np.abs(clean[changed] - np.asarray(COLOURS[out.meta["tint"]])).sum(-1)).all()
    assert done >= len(rows) // 2, f"backdrop-tint attacked only {done} of {len(rows)} colour questions"


def test_object_mask_is_what_render_paints():
    """The mask is the objects' exact pixels: where the render differs from the bare background
    (no world colour is a background tone), seeds 0-7, every object in view."""
    from world import WorldConfig, generate_world, object_mask, render
    from world.render import background_pixels

    for seed in range(8):
        scene = generate_world(seed, WorldConfig(resolution=64))
        bare = background_pixels(scene.background, scene.origin, scene.size, scene.scale)
        painted = np.any(np.asarray(render(scene), dtype=np.int16) != bare, axis=-1)
        mask = object_mask(scene)
        assert mask.shape == painted.shape and mask.sum() > 0
        assert (mask == painted).all(), seed
        one = object_mask(scene, scene.visible(1.0)[:1])  # a subset: only its pixels
        assert one.sum() > 0 and not (one & ~mask).any() and one.sum() < mask.sum()


def test_backdrop_tint_outline_tints_up_to_the_shapes_without_a_rectangle(tmp_path):
    """The outline variant keeps exactly the objects' pixels (their outlines, ``gap`` px wide) and
    tints the background inside the target's box corners too: no untinted rectangle is left."""
    from world import object_mask

    store = ShardStore(str(tmp_path))
    cfg = load_config(
        "synthetic",
        {"source": {"num_scenes": 16, "shard_size": 16, "question_types": ["colour"], "question_weights": [1.0]}},
    )
    rows = store.read(store.manifest(run_bootstrap(store, cfg, until="filter")[-1].version)).to_dicts()
    boxes, shapes = build_attack("backdrop-tint", cfg), build_attack("backdrop-tint-outline", cfg)
    corners = done = 0
    for row in rows:
        out, ref = shapes(row), boxes(row)
        if isinstance(out, str):
            continue
        done += 1
        assert out.meta["keep"] == "shapes" and not isinstance(ref, str) and ref.meta["keep"] == "boxes"
        assert out.meta["tint"] == ref.meta["tint"]  # the same wrong option: only the kept region differs
        clean = np.asarray(decode_image(row["image"]).convert("RGB"), dtype=np.int16)
        changed = np.abs(np.asarray(out.image, dtype=np.int16) - clean).sum(-1) > 0
        scene = Scene.from_dict(json.loads(row["scene"]))
        assert not (changed & object_mask(scene)).any()  # no object pixel changes
        # every pixel the box variant tints, the outline variant tints too (it keeps less)
        boxed = np.abs(np.asarray(ref.image, dtype=np.int16) - clean).sum(-1) > 0
        assert not (boxed & ~changed).any() and changed.sum() > boxed.sum()
        x0, y0, x1, y1 = (int(round(v)) for v in row["target_boxes"][0])
        corners += int(changed[y0:y1, x0:x1].any())
    assert done >= len(rows) // 2
    # circles, triangles and diamonds leave background in their boxes' corners (7 of 14 here)
    assert corners >= done // 4, f"{corners} of {done} target boxes tinted inside: the rectangle is left"


def test_attacks_are_pluggable_and_versioned(items):
    store, cfg, filt = items
    with pytest.raises(ValueError, match="registered attacks are"):
        build_attack("no-such-attack", cfg)

    @register_attack("test-invert")
    def invert(cfg, store=None, **_):
        from PIL import ImageOps

        def attack(row):
            if row["id"].endswith("0"):
                return "skipped on purpose"
            return Attacked(ImageOps.invert(decode_image(row["image"])), None, {"kind": "invert"})

        return attack

    try:
        m = attack_version(store, cfg, filt, "test-invert")
        n_rows = store.manifest(filt).rows
        skipped = sum(r["id"].endswith("0") for r in store.read(store.manifest(filt)).to_dicts())
        assert m.rows == n_rows - skipped and m.extra["summary"] == {"attacked": n_rows - skipped, "rejected": skipped}
        df = store.read(m)
        assert set(df["attack"].to_list()) == {"test-invert"} and json.loads(df["meta"][0]) == {"kind": "invert"}
        assert attack_version(store, cfg, filt, "test-invert").version == m.version  # found, not redone
        imp = attack_version(store, cfg, filt, "implanter")
        assert imp.rows > 0 and imp.version != m.version
        metas = [json.loads(x) for x in store.read(imp)["meta"].to_list()]
        assert all(x["target_ssim_min"] >= cfg.implant.target_ssim_min for x in metas)
    finally:
        ATTACKS.pop("test-invert")


def test_goals_apply_issue_21s_thresholds_per_arm_and_per_seed():
    from experiments.evidence import EvidenceConfig, goals

    ecfg = EvidenceConfig(
        attacks=["implanter", "option-decoys", "backdrop-tint"], unseen=["option-decoys", "backdrop-tint"]
    )
    clean_only = {
        "arm": "clean-only",
        "clean": 0.80,
        "implanter": 0.70,
        "option-decoys": 0.60,
        "backdrop-tint": 0.40,
        "aot-attacker": 0.40,
    }
    aot = {
        "arm": "aot",
        "clean": 0.785,
        "implanter": 0.80,
        "option-decoys": 0.64,
        "backdrop-tint": 0.45,
        "aot-attacker": 0.75,
    }

    def phase(seed, start, before, after):
        return {
            "seed": seed,
            "attack_success_start": start,
            "attack_success_before": before,
            "attack_success_after": after,
        }

    curve = [phase(0, 0.3, 0.6, 0.4), phase(0, 0.4, 0.5, 0.3), phase(0, 0.3, 0.2, 0.25)]  # 2 of 3 rise, 2 of 3 fall
    curve += [phase(1, 0.3, 0.6, 0.7), phase(1, 0.7, 0.6, 0.5), phase(1, 0.5, 0.6, 0.65)]  # 2 of 3 rise, 1 of 3 falls
    g = goals([clean_only, aot], curve, ecfg)
    assert g["implanter_gain"] == pytest.approx(0.10) and g["implanter_goal"] is True  # +10 exactly: met
    assert g["aot-attacker_goal"] is True
    assert g["option-decoys_gain"] == pytest.approx(0.04) and g["option-decoys_goal"] is False  # +5 asked
    assert g["backdrop-tint_goal"] is True
    assert g["clean_gain"] == pytest.approx(-0.015) and g["clean_goal"] is True  # within 2 points
    assert goals([clean_only, {**aot, "clean": 0.775}], curve, ecfg)["clean_goal"] is False
    assert g["attacker_rises_within_phase"] == 4 and g["attack_falls_after_defender"] == 3 and g["phases"] == 6
    assert g["curve_goal_per_seed"] == [True, False] and g["curve_goal"] is False


def test_lured_share_counts_answers_that_name_a_colour_the_attack_added():
    from experiments.evidence import lure_colours, lured_share

    opts = ["red", "green", "blue", "yellow"]
    rows = [
        {"id": "a", "options": opts, "meta": json.dumps({"tint": "blue", "alpha": 0.6})},
        {"id": "b", "options": opts, "meta": json.dumps({"distractors": ["yellow circle", "red square"]})},
        {"id": "c", "options": opts, "meta": json.dumps({"distractors": ["green triangle"]})},
        {"id": "d", "options": opts, "meta": json.dumps({"target_ssim_min": 1.0})},  # no colour added
        {"id": "e", "options": opts, "meta": json.dumps({"tint": "red"})},  # not answered: not counted
    ]
    assert lure_colours({"distractors": ["yellow circle", "red square"]}) == {"yellow", "red"}
    # a: C = blue, the tint (lured); b: A = red, a decoy (lured); c: B = green... C = blue (not lured)
    predictions = {"a": "C", "b": "A", "c": "C", "d": "B"}
    assert lured_share(predictions, rows) == pytest.approx(2 / 3)
    assert lured_share({"c": None}, rows) == 0.0  # unparsed: counted, never lured
    assert lured_share({"d": "A"}, rows) is None  # only an attack that added no colour


def test_toy_evidence_run_gives_every_number(tmp_path):
    from experiments.aot_evidence import main

    result = main(["--tiny", "--seeds", "0", "1", "--root", str(tmp_path / "root"), "--out", str(tmp_path)])
    cols = ["clean", "implanter", "swap-pair", "aot-attacker"]
    assert result["columns"] == cols
    assert [s["arm"] for s in result["summary"]] == ["base", "clean-only", "aot"]
    for s in result["summary"]:
        assert s["seeds"] == 2
        for c in cols:
            assert s[c] is not None and 0 <= s[c] <= 1 and s[f"{c}_sd"] >= 0, (s["arm"], c)
    for r in result["arms"]:
        for c in cols[1:]:
            assert r[f"{c}_n"] > 0, (r["arm"], c)  # every attack edited some held-out scenes
        # swap-pair's decoys carry colours; the learned attacker's edits name none
        assert r["aot-attacker_lured"] is None and 0 <= r["swap-pair_lured"] <= 1
    # arms share the starting defender; clean-only and AOT each moved away from it
    by = {(r["seed"], r["arm"]): r["defender"] for r in result["arms"]}
    assert len({by[(0, a)] for a in ("base", "clean-only", "aot")}) == 3
    assert by[(0, "base")] != by[(1, "base")]  # seeds differ
    assert len(result["curve"]) == 2 and all(r["attacker_reward_first"] is not None for r in result["curve"])
    g = result["goals"]
    assert g["attacker_rises_within_phase"] == sum(
        r["attack_success_before"] > r["attack_success_start"] for r in result["curve"]
    )
    assert g["phases"] == 2 and set(g) >= {"implanter_goal", "swap-pair_goal", "clean_goal"}
    # defender 0 warmed up on a pool of fresh scenes (coevolution.warmup_scenes), shared by no other set
    store = ShardStore(str(tmp_path / "root"))
    lin = store.manifest(result["runs"][0]).extra["lineage"]
    pool = store.manifest(lin["warmup"])
    assert pool.stage == "source" and pool.rows == 16 and store.manifest(lin["defender_0"]).parents == [pool.version]
    scenes = {k: set(store.read(store.manifest(lin[k]))["scene"].to_list()) for k in ("warmup", "items", "heldout")}
    assert not (scenes["warmup"] & scenes["items"]) and not (scenes["warmup"] & scenes["heldout"])
    saved = json.loads((tmp_path / "aot_evidence_tiny.json").read_text())
    assert saved["results"][0]["table"] == result["summary"]
    assert (tmp_path / "aot_evidence_curve_tiny.png").stat().st_size > 1000
    # --merge (one process per seed on a card, then one table) under its own --name
    merged = main(["--merge", str(tmp_path / "aot_evidence_tiny.json"), "--out", str(tmp_path), "--name", "replay"])
    assert merged["summary"] == result["summary"] and merged["goals"] == result["goals"]
    assert json.loads((tmp_path / "replay.json").read_text())["results"][0]["table"] == result["summary"]


def test_attacker_learnability_scores_every_try_on_the_same_items(tmp_path):
    from experiments.attacker_learnability import main

    with pytest.raises(SystemExit, match="attacker.rl"):
        main(["--tiny", "--root", str(tmp_path / "r"), "--out", str(tmp_path), "--try", "defender.rl.lr=1"])
    rows = main(
        [
            "--tiny",
            "--root",
            str(tmp_path / "r"),
            "--out",
            str(tmp_path),
            "--score-noise",
            "1.0",
            "--try",
            "",
            "--try",
            "attacker.rl.lr=1e-12",
            "--try",
            "attacker.cold_start.steps=2,attacker.rl.steps=0",
            "--try",
            "attacker.cold_start_scenes=6,attacker.cold_start_named=0.0,attacker.rl.steps=0",
            "--try",
            "attacker.cold_start.steps=2",
        ]
    )
    assert [r["try"] for r in rows] == [
        "oracle implanter",
        "cold start",
        "preset",
        "attacker.rl.lr=1e-12",
        "cold start attacker.cold_start.steps=2",
        "cold start attacker.cold_start_scenes=6,attacker.cold_start_named=0.0",
        "attacker.cold_start.steps=2",
    ]
    implanter, cold, preset, frozen, own, pooled, from_own = rows
    assert from_own["from"] == own["try"]  # the same cold start again: scored once, trained from
    # its own cold start (2 steps, not the toy's 1), scored alone; every attacker also scored with SDE edits
    assert own["attacker"] != cold["attacker"] and "steps" not in own
    assert pooled["attacker"] not in (cold["attacker"], own["attacker"])  # pairs of a fresh pool
    assert all(0 <= r["sde_attack_success"] <= 1 and r["sde_items"] == r["items"] for r in rows[1:])
    assert preset["sde_success_gain"] == preset["sde_attack_success"] - cold["sde_attack_success"]
    assert preset["lift_gain"] == pytest.approx(preset["lift"] - cold["lift"])
    for r in rows:  # the lift is success over the same items' unedited failures; the implanter's too
        assert r["lift"] == pytest.approx(r["attack_success"] - r["clean_failure"])
    assert len({r["items"] for r in rows}) == 1 and all(0 <= r["attack_success"] <= 1 for r in rows)
    assert implanter["integrity"] > 0  # the oracle implanter edits most held-out items
    assert preset["attacker"] != frozen["attacker"] and preset["steps"] == frozen["steps"] == 2
    # lr 1e-12: the LoRA does not move, so its edits are scored as the cold start's
    assert (frozen["attack_success"], frozen["integrity"]) == (cold["attack_success"], cold["integrity"])
    saved = json.loads((tmp_path / "attacker_learnability.json").read_text())
    assert [r["try"] for r in saved["results"]] == [r["try"] for r in rows] and saved["info"]["score_noise"] == 1.0


def test_defender_robustness_splits_clean_accuracy_by_crowding():
    from experiments.common import accuracy_by_crowding

    ids = ["a", "b", "c", "d", "e", "f"]
    correct = [True, False, True, True, False, True]
    crowded = {"a": False, "b": False, "c": True, "d": True, "e": True}  # f: not a held-out scene
    got = accuracy_by_crowding(ids, correct, crowded)
    assert got == {"clean_1obj": 0.5, "clean_1obj_n": 2, "clean_multi": 2 / 3, "clean_multi_n": 3}
    assert accuracy_by_crowding([], [], {})["clean_multi"] is None


def test_no_binding_reference_picks_uniformly_among_colours_in_view():
    from experiments.common import no_binding_accuracy

    # one object: always right; red + blue: 1/2; a decoy of a colour already in view adds nothing
    items = [["red"], ["red", "blue"], ["red", "blue", "blue"], []]
    assert no_binding_accuracy(items) == (1 + 0.5 + 0.5) / 3
    assert no_binding_accuracy([]) is None


def test_defender_learnability_splits_heldout_accuracy_and_states_the_no_binding_bar(tmp_path):
    from experiments.defender_learnability import TINY, main
    from stages.source import heldout_config, world_rows

    rows = main(["--tiny", "--out", str(tmp_path), "--eval-every", "2"])
    info = json.loads((tmp_path / "defender_learnability.json").read_text())["info"]
    # the bar, recomputed from the held-out scenes: 1 / distinct colours of the objects in view
    cfg = load_config("synthetic", TINY)
    scenes = [
        Scene.from_dict(json.loads(r["scene"]))
        for r in world_rows(cfg.coevolution.heldout_scenes, heldout_config(cfg).source.seed, cfg)
    ]
    shares = [1 / len({o.colour for o in s.visible()}) for s in scenes]
    several = [len(s.visible()) > 1 for s in scenes]
    nb = info["no_binding"]
    assert nb["clean"] == pytest.approx(sum(shares) / len(shares))
    assert nb["clean_multi_n"] == sum(several) and nb["clean_1obj_n"] == len(scenes) - sum(several)
    assert nb["clean_1obj"] == 1.0 and 0 < nb["clean_multi"] < 1
    # every held-out scene falls in one side of the split, so the two sides average to the whole
    for r in [row for row in rows if row["step"] > 0]:
        whole = r["heldout_1obj"] * nb["clean_1obj_n"] + r["heldout_multi"] * nb["clean_multi_n"]
        assert whole == pytest.approx(r["heldout_accuracy"] * len(scenes))
