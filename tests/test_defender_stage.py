"""The defender as a DAG stage: versioned checkpoints with lineage, crash-resume through the
store, evaluation tables, and a trained defender as Stage 2's base defender."""

from __future__ import annotations

import pytest

from config import load_config
from evaluation.answers import mcq_accuracy as evaluate
from stages.defender import evaluate_defender_version, examples_from_version, load_defender, train_defender_version
from stages.runner import run_bootstrap, run_stage
from storage import ShardStore, sha256_bytes

SMALL = {
    "source": {"num_scenes": 16, "shard_size": 8},
    "defender": {
        "warmup": {"steps": 4, "batch_prompts": 8},
        "model": {"backend": "tiny", "seed": 0, "min_pixels": 1024, "max_pixels": 4096},
    },
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("defstage")
    store = ShardStore(str(root))
    cfg = load_config("synthetic", SMALL)
    summaries = {s.stage: s.version for s in run_bootstrap(store, cfg)}
    return root, store, cfg, summaries


def _model_sha(store, version):
    m = store.manifest(version)
    ref = next(f for f in m.files if f.path == "model.safetensors")
    return sha256_bytes(store.fs.cat_file(store.part_path(m, ref)))


def test_training_writes_a_version_with_lineage_and_is_never_repeated(base):
    root, store, cfg, v = base
    m, trained = train_defender_version(store, cfg, v["export"], mode="sft")
    assert trained and m.stage == "defender" and m.parents == [v["export"]]
    assert {"model.safetensors", "config.json", "trainer_state.json", "trainer_state.safetensors", "metrics.png"} <= {
        f.path for f in m.files
    }
    metrics = store.read(m)
    assert metrics["step"].to_list() == [1, 2, 3, 4]
    again, trained_again = train_defender_version(store, cfg, v["export"], mode="sft")
    assert again.version == m.version and not trained_again
    # A DAPO run from that checkpoint has both parents.
    cfg2 = load_config(
        "synthetic",
        {
            **SMALL,
            "defender": {
                **SMALL["defender"],
                "rl": {"steps": 1, "batch_prompts": 2, "dapo": {"dynamic_sampling": False}},
            },
        },
    )
    rl, _ = train_defender_version(store, cfg2, v["export"], init_version=m.version, mode="dapo")
    assert rl.parents == [v["export"], m.version] and store.read(rl)["step"].to_list() == [1]


def test_a_crashed_training_resumes_from_the_store_to_identical_weights(base, tmp_path):
    _, _, _, _ = base
    cfg = load_config(
        "synthetic",
        {**SMALL, "defender": {**SMALL["defender"], "warmup": {"steps": 6, "batch_prompts": 8, "checkpoint_every": 2}}},
    )
    ref_store = ShardStore(str(tmp_path / "ref"))
    data = run_stage(ref_store, "source", cfg).version
    ref, _ = train_defender_version(ref_store, cfg, data, mode="sft")

    store = ShardStore(str(tmp_path / "crash"))
    assert run_stage(store, "source", cfg).version == data

    class Crash(Exception):
        pass

    def crash_at_5(row):
        if row["step"] == 5:
            raise Crash()

    with pytest.raises(Crash):
        train_defender_version(store, cfg, data, mode="sft", on_step=crash_at_5)
    assert store.manifest_at("synthetic", "defender", ref.version) is None  # not visible
    seen = []
    m, _ = train_defender_version(store, cfg, data, mode="sft", on_step=lambda r: seen.append(r["step"]))
    assert seen == [5, 6]  # resumed after the step-4 checkpoint
    assert m.version == ref.version
    assert _model_sha(store, m.version) == _model_sha(ref_store, ref.version)  # bit-identical weights
    assert store.read(m)["step"].to_list() == [1, 2, 3, 4, 5, 6]


def test_evaluation_splits_clean_and_adversarial(base):
    root, store, cfg, v = base
    m, _ = train_defender_version(store, cfg, v["export"], mode="sft")
    ev = evaluate_defender_version(store, cfg, m.version, v["export"])
    s = ev.extra["summary"]
    table = store.read(ev)
    n_rows = store.manifest(v["export"]).rows
    assert s["clean_n"] == s["adversarial_n"] == n_rows and table.height == 2 * n_rows
    examples = examples_from_version(store, store.manifest(v["export"]), "adversarial")
    direct = evaluate(load_defender(store, m.version), examples)
    assert s["adversarial_accuracy"] == pytest.approx(direct["accuracy"])
    assert ev.parents == [m.version, v["export"]]


def test_stage2_can_use_a_trained_defender_version(base):
    root, store, cfg, v = base
    m, _ = train_defender_version(store, cfg, v["export"], mode="sft")
    cfg_neural = load_config(
        "synthetic",
        {
            **SMALL,
            "implant": {"require_clean_correct": False, "num_proposals": 3},
            "models": {"defender": {"backend": "version", "version": m.version, "root": str(root)}},
        },
    )
    out = run_stage(store, "implant", cfg_neural, v["filter"])
    assert out.rows_in == out.rows + out.rejected > 0
    assert out.version != v["implant"]  # the defender is part of the stage's identity
    rows = store.read(out.version)
    assert rows.height == out.rows > 0  # a near-random tiny defender is fooled by some edits
    assert all(len(a) == 1 and a[0] != r for a, r in zip(rows["defender_answers"].to_list(), rows["answer"].to_list()))


def test_warmup_mode_trains_defender_0_in_the_warmup_configs_own_mode(base):
    from stages.defender import defender_train_config

    root, store, cfg, v = base
    assert defender_train_config(cfg, "warmup").mode == "sft"  # the tiny defender starts supervised
    with pytest.raises(ValueError, match="sft.*dapo.*warmup"):
        defender_train_config(cfg, "rl")
    # a pretrained defender's warm-up is a DAPO stage on clean data (AOT): the warm-up settings, by DAPO
    rl_warm = load_config(
        "synthetic",
        {
            **SMALL,
            "defender": {
                **SMALL["defender"],
                "warmup": {
                    "mode": "dapo",
                    "steps": 2,
                    "batch_prompts": 2,
                    "lr": 1e-3,
                    "max_new_tokens": 3,
                    "dapo": {"dynamic_sampling": False},
                },
            },
        },
    )
    assert defender_train_config(rl_warm, "sft").mode == "sft"  # --mode sft keeps meaning supervised
    m, trained = train_defender_version(store, rl_warm, v["export"], mode="warmup")
    metrics = store.read(m)
    assert (
        trained
        and metrics["step"].to_list() == [1, 2]
        and "reward" in metrics.columns
        and "kept_group_fraction" in metrics.columns
    )
    assert m.config["defender"]["train"]["mode"] == "dapo" and m.config["defender"]["mode"] == "warmup"


def test_the_full_preset_trains_the_defender_at_aots_values():
    # Its own settings, not the tiny defender's (lr 1e-3, 3-token answers, no dynamic sampling).
    cfg = load_config("full", {})
    for t in (cfg.defender.warmup, cfg.defender.rl):
        assert (t.mode, t.lr, t.max_new_tokens, t.temperature, t.weight_decay, t.grad_clip) == (
            "dapo",
            1e-6,
            4096,
            1.0,
            1e-2,
            1.0,
        )
        assert t.dapo.group_size == 5 and t.dapo.dynamic_sampling and t.gradient_checkpointing
        assert t.compile_update and t.decode_cache == "loop"  # the measured GPU setup (RESULTS.md)
    over = load_config("full", {"defender": {"rl": {"lora_rank": 64}}})
    assert (
        over.defender.rl.lora_rank == 64 and over.defender.warmup.lora_rank == 0
    )  # one stage's override stays its own


def test_the_loop_can_start_from_stage_2s_base_defender(tmp_path, monkeypatch):
    """``defender.model: {backend: base}``: defender 0 starts from Stage 2's base defender (its
    warm-up included), as a fresh copy of the same weights, never the registry's shared instance;
    its resolved spec (so its warm-up) is part of the spec the version id hashes. A base that is
    no policy is refused with the fix named."""
    import torch

    from stages.coevolution import run_coevolution
    from stages.defender import _initial_policy, initial_model_spec
    from stages.registry import load, resolve_config
    from stages.steps import LocalSteps

    monkeypatch.setenv("AOT_CACHE", str(tmp_path))
    tiny = {"backend": "tiny", "seed": 0, "min_pixels": 1024, "max_pixels": 4096}
    over = {"models": {"defender": {**tiny, "warmup": {"steps": 2, "scenes": 8, "batch": 4}}}}
    cfg = resolve_config("synthetic", {**over, "defender": {"model": {"backend": "base"}}})
    spec = initial_model_spec(cfg)
    assert spec["backend"] == "base" and spec["base"] == cfg.model_spec("defender")
    assert spec["base"]["warmup"]["source"]["question_types"] == ["colour"]  # the run's world rides along
    other = resolve_config(
        "synthetic",
        {
            "models": {"defender": {**tiny, "warmup": {"steps": 3, "scenes": 8, "batch": 4}}},
            "defender": {"model": cfg.defender.model},
        },
    )
    assert initial_model_spec(other) != spec
    shared = load("defender", cfg.model_spec("defender"))
    policy = _initial_policy(None, cfg, None)
    assert policy is not shared and policy.model is not shared.model
    theirs = shared.model.state_dict()
    for name, value in policy.model.state_dict().items():
        assert torch.equal(value, theirs[name]), name
    # A data-only run may use any base defender; the loop refuses one that is no policy, before
    # its bootstrap runs, naming the fix.
    plain = resolve_config(
        "synthetic", {"models": {"defender": "perception-baseline"}, "defender": {"model": cfg.defender.model}}
    )
    store = ShardStore(str(tmp_path / "store"))
    with pytest.raises(ValueError, match=r"perception-baseline.*set models.defender"):
        run_coevolution(store, plain, LocalSteps(store, plain))
    assert not list((tmp_path / "store").rglob("manifest.json"))
