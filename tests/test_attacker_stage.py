"""The attacker as DAG stages: cold start -> Flow-GRPO against a frozen defender -> curriculum,
every output a version with lineage, and the curriculum trains the defender."""

from __future__ import annotations

import pytest

from config import load_config
from stages.attacker import load_attacker, train_attacker_version
from stages.curriculum import generate_curriculum_version
from stages.defender import examples_from_version, train_defender_version
from stages.runner import run_bootstrap
from storage import ShardStore

SMALL = {
    "source": {"num_scenes": 16, "shard_size": 8},
    "defender": {
        "warmup": {"steps": 2, "batch_prompts": 8},
        "model": {"backend": "tiny", "seed": 0, "min_pixels": 1024, "max_pixels": 4096},
    },
    "attacker": {
        # the paper's attacker, whose edits the integrity gate judges (the embedded default keeps
        # the targets: its unfitted editor keeps none)
        "keep_targets": False,
        "model": {"backend": "tiny", "seed": 0, "resolution": 32, "cfg_scale": 1.0},
        "cold_start": {"steps": 2, "sft_batch": 2},
        "rl": {
            "steps": 2,
            "groups_per_step": 1,
            "flow_grpo": {"group_size": 4, "sampling_steps": 3},
            "reward": {"queries": 2, "tau": -1.0},
        },
        "curriculum": {"sampling_steps": 3, "max_items": 6, "clean_fraction": 0.5},
    },
}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    store = ShardStore(str(tmp_path_factory.mktemp("attstage")))
    cfg = load_config("synthetic", SMALL)
    v = {s.stage: s.version for s in run_bootstrap(store, cfg)}
    v["defender"] = train_defender_version(store, cfg, v["export"], mode="sft")[0].version
    return store, cfg, v


def test_cold_start_then_flow_grpo_then_curriculum(chain):
    store, cfg, v = chain
    cold, trained = train_attacker_version(store, cfg, v["export"], mode="sft")
    assert trained and cold.stage == "attacker" and cold.parents == [v["export"]]
    assert {"lora.safetensors", "trainer_state.json", "samples.parquet", "metrics.png"} <= {f.path for f in cold.files}
    assert store.read(cold)["step"].to_list() == [1, 2]
    assert train_attacker_version(store, cfg, v["export"], mode="sft") == (cold, False)  # never recomputed

    with pytest.raises(ValueError, match="frozen defender"):
        train_attacker_version(store, cfg, v["filter"], mode="grpo")
    rl, _ = train_attacker_version(store, cfg, v["filter"], v["defender"], init_version=cold.version, mode="grpo")
    assert rl.parents == [v["filter"], v["defender"], cold.version]
    metrics = store.read(rl)
    assert metrics["step"].to_list() == [1, 2] and "aot/efficacy" in metrics.columns
    # The trained LoRA round-trips through the version.
    ed = load_attacker(store, rl.version, cfg.attacker.model)
    assert len(ed.lora_parameters()) > 0 and any(float(p.detach().abs().sum()) > 0 for p in ed.lora_parameters())

    cur = generate_curriculum_version(store, cfg, rl.version, v["filter"], v["defender"])
    assert cur.stage == "curriculum" and cur.parents == [rl.version, v["filter"], v["defender"]]
    assert {f.path for f in cur.files} == {"grid.png", "strategies.png"}
    s = cur.extra["summary"]
    df = store.read(cur)
    adv = df.filter(df["kind"] == "adversarial")
    assert s["items"] == 6 and s["kept"] == adv.height == 6  # tau -1: every edit passes integrity
    assert df.filter(df["kind"] == "clean").height == s["clean"] == 6  # clean_fraction 0.5
    assert set(adv["strategy"].to_list()) <= set(s["strategy_mix"]) and abs(sum(s["strategy_mix"].values()) - 1) < 1e-9
    assert all(0 <= e <= 1 for e in adv["efficacy"].to_list())
    # Every kept edit carries the defender's efficacy on its unedited image; the summary's baseline
    # and lift are those columns' rates (queries 2: efficacy in {0, 0.5, 1}).
    ce = adv["clean_efficacy"].to_list()
    assert (
        all(e in (0.0, 0.5, 1.0) for e in ce) and df.filter(df["kind"] == "clean")["clean_efficacy"].null_count() == 6
    )
    assert s["clean_failure_rate"] == sum(e > 0 for e in ce) / 6
    assert s["attack_lift"] == pytest.approx(s["attack_success_rate"] - s["clean_failure_rate"])
    # The defender stage consumes a curriculum version like any dataset version.
    ex = examples_from_version(store, cur)
    # attacker.edits_at_source_size (on in the preset): both rows of an item at the item's own size
    from stages.attacker import items_from_version

    own = {it.id: it.image.size for it in items_from_version(store, store.manifest(v["filter"]), 0)}
    assert cfg.attacker.edits_at_source_size and len(ex) == 12
    assert all(e.image.size == own[e.id.split(":")[0]] for e in ex) and len({e.image.size for e in ex}) > 1
    # off: every row at the editor's 32 px, the clean rows too (a size would tell them apart)
    at_edit = load_config("synthetic", {**SMALL, "attacker": {**SMALL["attacker"], "edits_at_source_size": False}})
    small = examples_from_version(
        store, generate_curriculum_version(store, at_edit, rl.version, v["filter"], v["defender"])
    )
    assert len(small) == 12 and {e.image.size for e in small} == {(32, 32)}


def test_keep_target_shapes_gives_back_the_objects_not_their_boxes(chain):
    """attacker.keep_target_shapes: each item's mask is its target objects' rendered pixels (the
    scene's own), so a kept edit has every target pixel clean while its box's corners carry the
    edit; without keep_targets the option is refused; its curriculum is its own version."""
    import dataclasses
    import json

    import numpy as np

    from config import ConfigError
    from stages.attacker import items_from_version
    from world import Scene, object_mask

    store, cfg, v = chain
    with pytest.raises(ConfigError, match="keep_targets"):
        load_config("synthetic", {**SMALL, "attacker": {**SMALL["attacker"], "keep_target_shapes": True}})
    shaped = load_config(
        "synthetic", {**SMALL, "attacker": {**SMALL["attacker"], "keep_targets": True, "keep_target_shapes": True}}
    )
    rows = {r["id"]: r for r in store.read(store.manifest(v["filter"])).iter_rows(named=True)}
    items = items_from_version(store, store.manifest(v["filter"]), 0, shapes=True)
    assert items and all(it.target_mask is not None and it.target_mask.size == it.image.size for it in items)
    for it in items:
        scene = Scene.from_dict(json.loads(rows[it.id]["scene"]))
        boxes = [[int(round(x)) for x in b] for b in it.target_boxes]
        targets = [o for o in scene.visible(1e-9) if [int(round(x)) for x in scene.image_box(o)] in boxes]
        assert len(targets) == len(boxes)  # every target box is a scene object's
        assert np.array_equal(np.asarray(it.target_mask) > 0, object_mask(scene, targets))
    plain = items_from_version(store, store.manifest(v["filter"]), 0)
    assert all(it.target_mask is None for it in plain)

    cold, _ = train_attacker_version(store, cfg, v["export"], mode="sft")
    boxed_cfg = load_config("synthetic", {**SMALL, "attacker": {**SMALL["attacker"], "keep_targets": True}})
    ids = {
        generate_curriculum_version(store, c, cold.version, v["filter"], v["defender"]).version
        for c in (boxed_cfg, shaped)
    }
    assert len(ids) == 2
    from stages.curriculum import edit_items
    from training.attacker import Placement, scored_item

    editor = load_attacker(store, cold.version, cfg.attacker.model)
    its = [scored_item(editor, it, True) for it in items[:4]]
    seeds = list(range(len(its)))
    kept = edit_items(editor, its, seeds, steps=3, batch=4, placement=Placement(keep_targets=True, at_source_size=True))
    free = edit_items(
        editor,
        [dataclasses.replace(it, target_mask=None) for it in its],
        seeds,
        3,
        4,
        placement=Placement(at_source_size=True),
    )
    corners = 0
    for it, k, f in zip(its, kept, free):
        k, f, c = (np.asarray(x.convert("RGB"), dtype=np.int16) for x in (k, f, it.image))
        m = np.asarray(it.target_mask) > 0
        assert np.array_equal(k[m], c[m])  # every target pixel clean
        x0, y0, x1, y1 = (int(round(x)) for x in it.target_boxes[0])
        box = np.zeros_like(m)
        box[y0:y1, x0:x1] = True
        far = box & ~_dilate(m)
        assert np.array_equal(k[far], f[far])  # the box's corners keep the edit
        corners += int((k[far] != c[far]).any())
    assert corners > 0  # and some edit changed a corner: no clean rectangle left there


def _dilate(m):
    from scipy import ndimage

    return ndimage.binary_dilation(m, iterations=1)


def test_curriculum_with_a_judge_description(chain):
    store, cfg, v = chain
    described = load_config(
        "synthetic",
        {
            **SMALL,
            "models": {"judge": {"backend": "tiny", "max_new_tokens": 4}},
            "attacker": {
                **SMALL["attacker"],
                "curriculum": {**SMALL["attacker"]["curriculum"], "describe": True, "max_items": 3},
            },
        },
    )
    cold, _ = train_attacker_version(store, described, v["export"], mode="sft")
    cur = generate_curriculum_version(store, described, cold.version, v["filter"], v["defender"])
    df = store.read(cur)
    adv = df.filter(df["kind"] == "adversarial")
    assert adv.height == 3 and all(isinstance(d, str) for d in adv["description"].to_list())
    assert cur.config["judge"] == {"backend": "tiny", "max_new_tokens": 4}
    with pytest.raises(ValueError, match="MLLM judge"):
        generate_curriculum_version(
            store,
            load_config(
                "synthetic",
                {
                    **SMALL,
                    "attacker": {
                        **SMALL["attacker"],
                        "curriculum": {**SMALL["attacker"]["curriculum"], "describe": True},
                    },
                },
            ),
            cold.version,
            v["filter"],
            v["defender"],
        )


def test_integrity_gate_rejects_with_a_reason(chain):
    store, cfg, v = chain
    strict = load_config(
        "synthetic",
        {
            **SMALL,
            "attacker": {
                **SMALL["attacker"],
                "rl": {**SMALL["attacker"]["rl"], "reward": {"queries": 1, "tau": 0.999}},
            },
        },
    )
    cold, _ = train_attacker_version(store, strict, v["export"], mode="sft")
    cur = generate_curriculum_version(store, strict, cold.version, v["filter"], v["defender"])
    # A barely trained tiny editor repaints everything: no target survives tau 0.999. Items whose
    # question has no target box (e.g. "is there a ...?" with none in the scene) have nothing to protect.
    df = store.read(cur)
    adv = df.filter(df["kind"] == "adversarial")
    assert cur.reasons == {"integrity": cur.reject_rows} and cur.reject_rows >= 4
    assert all(len(b) == 0 for b in adv["target_boxes"].to_list())
    assert cur.reject_rows + adv.height == 6
    # few kept edits: clean items fill the curriculum up to attacker.curriculum.min_rows (here: all 6)
    assert df.filter(df["kind"] == "clean").height == cur.extra["summary"]["clean"] == 6


@pytest.mark.slow
def test_curriculum_shards_resume_after_a_crash_and_match_one_shard(chain, monkeypatch):
    """Shards of 4 items: a crash in the second shard keeps the first; the rerun computes only the
    rest, and the version holds exactly what one unsharded run gives: a sampler call never spans a
    multiple of the batch size (2 here), so the shards make the unsharded run's calls, bit for bit."""
    import stages.curriculum as stage

    store, cfg, v = chain
    cold, _ = train_attacker_version(store, cfg, v["export"], mode="sft")

    def with_shards(n):
        return load_config(
            "synthetic",
            {
                **SMALL,
                "attacker": {
                    **SMALL["attacker"],
                    "curriculum": {**SMALL["attacker"]["curriculum"], "shard_size": n, "batch": 2},
                },
            },
        )

    whole = generate_curriculum_version(store, with_shards(0), cold.version, v["filter"], v["defender"])
    real, calls = stage._curriculum_shard, []

    def crash_on_second(*a, **k):
        calls.append(a[5])  # the shard's item range
        if len(calls) == 2:
            raise RuntimeError("injected crash")
        return real(*a, **k)

    monkeypatch.setattr(stage, "_curriculum_shard", crash_on_second)
    with pytest.raises(RuntimeError, match="injected"):
        generate_curriculum_version(store, with_shards(4), cold.version, v["filter"], v["defender"])
    assert calls == [range(0, 4), range(4, 6)]
    calls.clear()
    monkeypatch.setattr(stage, "_curriculum_shard", lambda *a, **k: (calls.append(a[5]), real(*a, **k))[1])
    said = []
    sharded = generate_curriculum_version(
        store, with_shards(4), cold.version, v["filter"], v["defender"], on_item=stage.curriculum_progress(said.append)
    )
    assert calls == [range(4, 6)]  # the first shard was not redone
    assert said == ["curriculum: 4/6 items edited", "curriculum: 6/6 items edited"]  # the finished shard at once
    assert len(sharded.parts) == 3 and sharded.extra["summary"]["shards"] == 2  # 2 edit shards + the clean fill
    assert store.read(whole).equals(store.read(sharded))  # every column, the edited images' bytes included
    assert {k: v for k, v in sharded.extra["summary"].items() if k != "shards"} == {
        k: v for k, v in whole.extra["summary"].items() if k != "shards"
    }


def test_flows_give_the_same_versions_and_the_cli_names_the_missing_defender(chain, tmp_path, monkeypatch, capsys):
    store, cfg, v = chain
    from aot.cli import main
    from flows.attacker import generate_curriculum, train_attacker

    root = store.root
    cold = train_attacker(data_version=v["export"], mode="sft", root=root, overrides=SMALL)
    assert cold["version"] == train_attacker_version(store, cfg, v["export"], mode="sft")[0].version
    cur = generate_curriculum(
        attacker_version=cold["version"],
        data_version=v["filter"],
        defender_version=v["defender"],
        root=root,
        overrides=SMALL,
    )
    assert (
        cur["items"] == 6
        and cur["version"]
        == generate_curriculum_version(store, cfg, cold["version"], v["filter"], v["defender"]).version
    )
    assert main(["train-attacker", "--data", v["filter"], "--mode", "grpo", "--root", root, "--no-prefect"]) == 2
    assert "--defender VERSION" in capsys.readouterr().err


def test_a_crashed_attacker_training_resumes_from_the_store(chain):
    import torch
    from safetensors.torch import load_file

    from stages.attacker import pairs_from_version
    from training.attacker import AttackerTrainer, Placement

    store, _, v = chain
    cfg = load_config(
        "synthetic",
        {
            **SMALL,
            "attacker": {
                **SMALL["attacker"],
                "cold_start": {"steps": 3, "sft_batch": 2, "checkpoint_every": 1, "lr": 5e-3},
            },
        },
    )

    def crash(row):
        if row["step"] == 2:  # before step 2's checkpoint is saved: only step 1's is in the store
            raise RuntimeError("injected crash")

    with pytest.raises(RuntimeError, match="injected"):
        train_attacker_version(store, cfg, v["export"], mode="sft", on_step=crash)
    seen = []
    m, trained = train_attacker_version(store, cfg, v["export"], mode="sft", on_step=lambda r: seen.append(r["step"]))
    assert trained and seen == [2, 3]  # resumed after step 1
    # The same training without a crash, in one process, on the pairs the stage builds (the
    # preset's share of named instructions, its item cap): identical LoRA weights.
    a = cfg.attacker
    ref = AttackerTrainer(
        load_attacker(store, None, a.model),
        a.cold_start,
        pairs=pairs_from_version(store, store.manifest(v["export"]), a.max_items, a.cold_start_named),
        placement=Placement.of(a),
    )
    ref.train()
    got = load_file(str(_local(store, m, "lora.safetensors")))
    want = ref.editor.lora_state()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def _local(store, m, name):
    from stages.defender import fetch_version

    return fetch_version(store, m) / name


def test_batched_edits_equal_one_by_one_edits():
    """Each edit's noise is seeded by its item alone: batching items (and splitting where the edit
    size changes) gives the one-by-one edits up to float rounding."""
    import dataclasses

    import numpy as np
    from PIL import Image

    from models.editor import QwenImageEditor
    from stages.curriculum import edit_items
    from training.attacker import Placement
    from training.attacker_rewards import AttackItem

    editor = QwenImageEditor.tiny(seed=0, resolution=32)
    rng = np.random.default_rng(0)
    sizes = [(32, 32)] * 3 + [(48, 32)] * 2  # the last two have another edit size
    items = [
        AttackItem(
            f"i{k}",
            editor.resize(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))),
            f"add a red square number {k}",
            [],
        )
        for k, (w, h) in enumerate(sizes)
    ]
    seeds = [11, 12, 13, 14, 15]
    calls = []
    one = edit_items(editor, items, seeds, steps=3, batch=1)
    batched = edit_items(editor, items, seeds, steps=3, batch=4, on_item=lambda i, n: calls.append(i))
    # one call for the three 32x32 items; the two others in two calls, since a call never spans a
    # multiple of the batch size (item 4 starts one), so shards of a run batch as the whole run does
    assert calls == [3, 4, 5]
    for a, b in zip(one, batched):
        assert a.size == b.size
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 2
    assert np.asarray(one[0]).tobytes() != np.asarray(one[1]).tobytes()  # seeds differ, edits differ
    # SDE edits (attacker.curriculum.noise_level > 0): seeded per item, so the same whatever the
    # batch setting, and not the ODE edits.
    sde = edit_items(editor, items, seeds, steps=3, batch=1, noise_level=1.0)
    assert [np.asarray(a).tobytes() for a in sde] == [
        np.asarray(a).tobytes() for a in edit_items(editor, items, seeds, steps=3, batch=4, noise_level=1.0)
    ]
    assert all(np.asarray(a).tobytes() != np.asarray(b).tobytes() for a, b in zip(sde, one))
    # attacker.keep_targets: each item's target box comes back from its own clean image, the rest
    # is the edit (the same ODE edit as without it)
    boxed = [dataclasses.replace(it, target_boxes=[[4, 6, 20, 14]]) for it in items]
    kept = edit_items(editor, boxed, seeds, steps=3, batch=4, placement=Placement(keep_targets=True))
    for it, k, b in zip(boxed, kept, batched):
        k, c, b = np.array(k), np.asarray(it.image), np.asarray(b)
        assert np.array_equal(k[6:14, 4:20], c[6:14, 4:20]) and not np.array_equal(b[6:14, 4:20], c[6:14, 4:20])
        k[6:14, 4:20] = b[6:14, 4:20]
        assert np.array_equal(k, b)
    # attacker.edits_at_source_size: items at twice the edit size come back at their own size, the
    # clean image plus the change of the same edit; items already at the edit size are unchanged
    from training.attacker import carry_edit

    big = [dataclasses.replace(it, image=it.image.resize((2 * it.image.width, 2 * it.image.height))) for it in items]
    carried = edit_items(editor, big, seeds, steps=3, batch=4, placement=Placement(at_source_size=True))
    small = [editor.resize(it.image) for it in big]
    assert [c.size for c in carried] == [it.image.size for it in big]
    for it, s, c, e in zip(big, small, carried, edit_items(editor, big, seeds, steps=3, batch=4)):
        assert e.size == s.size and np.array_equal(np.asarray(c), np.asarray(carry_edit(it.image, s, e)))
    same = edit_items(editor, items, seeds, steps=3, batch=4, placement=Placement(at_source_size=True))
    assert [np.asarray(a).tobytes() for a in same] == [np.asarray(b).tobytes() for b in batched]


def test_edits_from_the_reconstruction_leave_what_the_editor_left_clean(monkeypatch):
    """attacker.change_from_reconstruction: an editor that outputs its input's latents unchanged
    (what an edit that changes nothing denoises to) gives every item's clean image back exactly, at
    the edit size and at twice it; without the option the same edits are its autoencoder's round
    trip, which differs from the clean image. A real edit's change is its distance from that round
    trip: the carried difference equals edit - reconstruction."""
    import dataclasses

    import numpy as np
    from PIL import Image

    import rl.flow_sampler
    from models.editor import QwenImageEditor
    from stages.curriculum import edit_items
    from training.attacker import Placement, reconstructions
    from training.attacker_rewards import AttackItem

    editor = QwenImageEditor.tiny(seed=0, resolution=32)
    rng = np.random.default_rng(1)
    items = [
        AttackItem(f"i{k}", Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)), "add", [[4, 4, 12, 12]])
        for k in range(3)
    ]
    big = [dataclasses.replace(it, image=it.image.resize((64, 64))) for it in items]
    seeds = [7, 8, 9]
    real = edit_items(editor, items, seeds, steps=2, batch=2)
    cond = editor.condition([it.image for it in items], [it.instruction for it in items])
    recon = reconstructions(editor, cond)
    got = edit_items(editor, items, seeds, steps=2, batch=2, placement=Placement(from_reconstruction=True))
    for it, r, e, g in zip(items, recon, real, got):  # clean + (edit - reconstruction), rounded
        want = np.clip(np.asarray(it.image, dtype=int) + np.asarray(e, dtype=int) - np.asarray(r, dtype=int), 0, 255)
        assert np.array_equal(np.asarray(g, dtype=int), want)

    class NoEdit:  # the sampler's trajectory, ending on the condition latents
        def __init__(self, x):
            self.final = x

    monkeypatch.setattr(rl.flow_sampler, "sample", lambda ed, cond, *a, **k: NoEdit(cond.image_latents))
    for its, at_source in ((items, False), (big, True)):
        lossy = edit_items(editor, its, seeds, steps=2, batch=2, placement=Placement(at_source_size=at_source))
        same = edit_items(
            editor,
            its,
            seeds,
            steps=2,
            batch=2,
            placement=Placement(at_source_size=at_source, from_reconstruction=True),
        )
        assert [np.asarray(a).tobytes() for a in same] == [np.asarray(it.image).tobytes() for it in its]
        assert all(np.asarray(a).tobytes() != np.asarray(it.image).tobytes() for a, it in zip(lossy, its))


def test_cold_start_pairs_name_the_distractor_in_the_configured_share(chain):
    """attacker.cold_start_named: 1 names every pair's distractor (AOT-SFT's description), 0 none —
    the instruction fresh items get — and a share in between splits by row id, the same rows in
    any order."""
    from stages.attacker import pairs_from_version

    store, _, v = chain
    export = store.manifest(v["export"])
    instructions = {n: [p.instruction for p in pairs_from_version(store, export, named=n)] for n in (0.0, 0.5, 1.0)}
    assert len(instructions[1.0]) >= 4
    assert all(i.startswith("Add ") for i in instructions[1.0])
    assert all(i.startswith("Change the scene") for i in instructions[0.0])
    # Which rows a share names depends on the ids this machine's Stage 2 kept (a handful here), so
    # shares from 0.1 to 0.9: each names a growing set of rows, the rest keep the plain instruction,
    # and some share names some rows and not others.
    counts, before = [], set()
    for share in [k / 10 for k in range(1, 10)]:
        got = [p.instruction for p in pairs_from_version(store, export, named=share)]
        named = [i.startswith("Add ") for i in got]
        assert [a if n else b for a, b, n in zip(instructions[1.0], instructions[0.0], named)] == got
        now = {j for j, n in enumerate(named) if n}
        assert before <= now
        before = now
        counts.append(len(now))
    assert any(0 < c < len(instructions[1.0]) for c in counts), counts


def test_trainers_report_every_step_to_tensorboard(chain, tmp_path):
    """tracking.report_to [tensorboard] (the default): the defender and both attacker modes write
    event files that TensorBoard's own reader reads back — every numeric column of each step's
    row as a scalar at that step, the config and version ids as text — live under _work on a
    local root and as the version's files once it commits; report_to [none] writes none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from config import ConfigError

    store, cfg, v = chain

    def events(m, where: str):
        folder = tmp_path / m.version
        files = [f for f in m.files if f.path.startswith("tensorboard/")]
        assert files, f"{m.stage} {m.version} has no event files"
        if where == "version":
            store.fetch_files(m, str(folder))
            path = folder / "tensorboard"
        else:
            path = store.version_path(m.dataset, m.stage, m.version) + "/_work/tensorboard"
        acc = EventAccumulator(str(path))
        acc.Reload()
        return acc

    cold, _ = train_attacker_version(store, cfg, v["export"], mode="sft")
    rl, _ = train_attacker_version(store, cfg, v["filter"], v["defender"], init_version=cold.version, mode="grpo")
    defender = store.manifest(v["defender"])
    for m, expect in (
        (cold, {"loss", "grad_norm", "pairs", "lr", "seconds"}),
        (rl, {"reward", "aot/integrity", "aot/efficacy", "clip_fraction", "kl", "grad_norm", "lr"}),
        (defender, {"loss", "grad_norm", "lr", "tokens"}),
    ):
        metrics = store.read(m)
        for where in ("version", "live"):
            acc = events(m, where)
            scalars = set(acc.Tags()["scalars"])
            assert expect <= scalars, (m.stage, expect - scalars)
            for tag in expect:
                assert [e.step for e in acc.Scalars(tag)] == metrics["step"].to_list(), (m.stage, tag)
            assert [e.value for e in acc.Scalars("lr")] == pytest.approx(metrics["lr"].to_list(), rel=1e-6)
            text = acc.Tensors("tags/text_summary")[0].tensor_proto.string_val[0].decode()
            assert m.version in text and all(p in text for p in m.parents)
    with pytest.raises(ConfigError, match="tracking.report_to"):
        load_config("synthetic", {**SMALL, "tracking": {"report_to": ["tensorboard", "neptune"]}})
    other = {**SMALL["attacker"], "cold_start": {"steps": 1, "sft_batch": 2}}  # a version not trained yet
    quiet = load_config("synthetic", {**SMALL, "attacker": other, "tracking": {"report_to": ["none"]}})
    assert quiet.tracking.report_to == ["none"]
    silent, _ = train_attacker_version(store, quiet, v["export"], mode="sft")
    assert not [f for f in silent.files if f.path.startswith("tensorboard/")]


def test_trainers_report_every_step_to_wandb(chain, tmp_path, monkeypatch):
    """tracking.report_to [wandb]: one offline W&B run per trained version under WANDB_DIR, read
    back from W&B's own run log (tests/wandb_log.py): every step's row at its step, the resolved
    config, the version id as tag and config, a clean exit."""
    from wandb_log import runs

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    store, _, v = chain
    other = {**SMALL["attacker"], "cold_start": {"steps": 3, "sft_batch": 2}}  # a version not trained yet
    cfg = load_config("synthetic", {**SMALL, "attacker": other, "tracking": {"report_to": ["wandb"]}})
    m, _ = train_attacker_version(store, cfg, v["export"], mode="sft")
    (run,) = runs(tmp_path)
    metrics = store.read(m)
    assert [r["_step"] for r in run["history"]] == metrics["step"].to_list() == [1, 2, 3]
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in run["history"]] == pytest.approx(metrics[key].to_list(), rel=1e-6), key
    assert f"version:{m.version}" in run["tags"] and run["config"]["aot"]["version"] == m.version
    assert run["config"]["attacker"]["train"]["steps"] == 3 and run["name"] == f"attacker {m.version}"
    assert run["exit_code"] == 0
    assert not [f for f in m.files if f.path.startswith("tensorboard/")]  # wandb only: no event files
